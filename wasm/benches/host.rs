//! Micro-benchmarks of the Proxy-Wasm host without any networking: what one plugin costs a
//! request in the host and the guest, and the header-map codec; and the one-off costs around
//! requests: a PluginContext (`proxy_on_context_create` + `proxy_on_configure`), which the first
//! request on a route (or after the route changed) pays per plugin, and a plugin VM
//! (instantiation, `_initialize`, the VM root context and `proxy_on_vm_start`), which a worker
//! pays per plugin at start and after a plugin fault.
//!
//! `cargo bench -p wasmgate-wasm` (uses the committed `example_headers` plugin, the Rust SDK
//! `header_rewrite` fixture; `WASMGATE_BENCH_PLUGIN=<file>` runs another, such as
//! `benches/noop.wat`, whose callbacks do nothing).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::HeaderMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmgate_wasm::map::{self, Pairs};
use wasmgate_wasm::{
    Downstream, Head, HeaderList, PluginModule, PluginVm, Properties, Settings, Stream,
};

/// As in the gateway binary: allocation costs measured here are the ones it pays.
#[global_allocator]
static GLOBAL: wasmgate_shared::alloc::Mimalloc = wasmgate_shared::alloc::Mimalloc;

struct NoProps;

fn downstream() -> Downstream {
    let at = |port| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    Downstream {
        peer: at(40000),
        local: at(9080),
        connection: 1,
        version: http::Version::HTTP_11,
        tls: None,
        started: wasmgate_shared::clock::Tick::now(),
    }
}

impl Properties for NoProps {
    fn get(&self, _path: &[&str], _request: &Head, _from: &Downstream) -> Option<Vec<u8>> {
        None
    }
}

/// A request head with the four pseudo-headers and 10 ordinary headers, as the gateway lends
/// it to plugins.
fn request_head() -> Head {
    Head::request(&mut request_parts(), "http")
}

/// Built as hyper builds a request it read: the values are slices of one shared buffer (the
/// connection's read buffer), so cloning one counts a reference instead of copying; custom
/// names are copied out, as hyper does.
fn request_parts() -> http::request::Parts {
    let mut text = String::from("api.example.com");
    let mut ranges = Vec::new();
    ranges.push(0..text.len());
    for i in 0..9 {
        let start = text.len();
        text.push_str(&format!("value number {i}"));
        ranges.push(start..text.len());
    }
    let buf = bytes::Bytes::from(text);
    let value =
        |i: usize| http::HeaderValue::from_maybe_shared(buf.slice(ranges[i].clone())).unwrap();
    let mut b = http::Request::builder()
        .uri("/api/v1/orders?limit=10")
        .header("host", value(0));
    for i in 0..9 {
        b = b.header(format!("x-header-{i}"), value(i + 1));
    }
    b.body(()).unwrap().into_parts().0
}

/// The same request as a pair list.
fn request() -> Pairs {
    let mut p: Pairs = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/api/v1/orders?limit=10".to_vec()),
        (":authority".into(), b"api.example.com".to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    for i in 0..10 {
        p.push((
            format!("x-header-{i}"),
            format!("value number {i}").into_bytes(),
        ));
    }
    p
}

fn plugin() -> PluginModule {
    let default = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/example_headers.wasm"
    );
    let path = std::env::var("WASMGATE_BENCH_PLUGIN").unwrap_or_else(|_| default.into());
    let settings = Settings {
        name: Arc::from("example_headers"),
        callback_timeout: Some(Duration::from_secs(1)),
        memory_limit: 64 << 20,
        log_level: 4,
        log_gate: Arc::default(),
        targets: Default::default(),
        call_budget: Arc::new(wasmgate_wasm::state::CallBudget::new(64 << 20)),
        root_id: Arc::from("example_headers"),
        vm_config: Arc::from(&b""[..]),
    };
    PluginModule::load(settings, std::path::Path::new(&path)).expect("the example plugin loads")
}

/// One request through one plugin as the gateway runs it: the request head lent, an
/// HttpContext, request headers, the response head, response headers, a one-chunk response
/// body, log, done and delete.
#[inline(never)]
fn one_request(
    vm: &mut PluginVm,
    root: u32,
    mut parts: http::request::Parts,
    props: &Arc<dyn Properties>,
) -> (Option<Box<Stream>>, http::request::Parts, HeaderMap) {
    let mut stream = Some(Box::new(Stream::new(
        Head::request(&mut parts, "http"),
        props.clone(),
        downstream(),
    )));
    let id = vm.create_http_context(root).unwrap();
    vm.on_request_headers(id, &mut stream, true).unwrap();
    // As the gateway does: the headers come back from the head for the upstream request,
    // and the response headers go in and come back for the client.
    let mut response = HeaderMap::new();
    if let Some(s) = stream.as_mut() {
        parts.headers = s.request.headers().clone();
        s.response = Some(Head::response(http::StatusCode::OK, HeaderMap::new()));
    }
    vm.on_response_headers(id, &mut stream, false).unwrap();
    if let Some(s) = stream.as_mut() {
        if let Some(r) = &s.response {
            response = r.headers().clone();
        }
        s.response_body = Bytes::from_static(b"ok\n").into();
    }
    vm.on_response_body(id, &mut stream, true).unwrap();
    vm.on_log(id, &mut stream).unwrap();
    vm.finish_http(id).unwrap();
    (stream, parts, response)
}

/// With `WASMGATE_BENCH_REQUESTS=n`, runs [`one_request`] n times and exits before criterion
/// starts: `scripts/bench/instructions.sh` counts its instructions under callgrind, a figure
/// that does not move with the machine's load.
fn fixed_requests() {
    let Some(n) = std::env::var("WASMGATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let module = plugin();
    let mut vm = PluginVm::new(&module).unwrap();
    let root = vm.create_plugin_context(CONF).unwrap().unwrap();
    let props: Arc<dyn Properties> = Arc::new(NoProps);
    // Each request gets its own head, as each arrives with its own (made outside the count).
    let heads: Vec<_> = (0..n).map(|_| request_parts()).collect();
    for parts in heads {
        black_box(one_request(&mut vm, root, parts, &props));
    }
    std::process::exit(0);
}

const CONF: &[u8] = br#"{"set": {"x-a": "1"}, "response_set": {"x-b": "2"}}"#;

fn round_trip(c: &mut Criterion) {
    fixed_requests();
    let module = plugin();
    let mut vm = PluginVm::new(&module).unwrap();
    let root = vm.create_plugin_context(CONF).unwrap().unwrap();
    let props: Arc<dyn Properties> = Arc::new(NoProps);
    let req = request_head();
    let parts = request_parts();
    c.bench_function(
        "plugin request: head lent, context, headers both ways, body, log, done",
        |b| {
            b.iter_batched(
                || parts.clone(),
                |p| black_box(one_request(&mut vm, root, p, &props)),
                BatchSize::SmallInput,
            )
        },
    );
    c.bench_function("plugin: proxy_on_request_headers alone (10 headers)", |b| {
        let id = vm.create_http_context(root).unwrap();
        b.iter(|| {
            let mut stream = Some(Box::new(Stream::new(
                req.clone(),
                props.clone(),
                downstream(),
            )));
            black_box(vm.on_request_headers(id, &mut stream, true).unwrap());
        })
    });
}

fn codec(c: &mut Criterion) {
    let req = request();
    let encoded = map::encode(req.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    c.bench_function("header map encode (14 pairs)", |b| {
        b.iter(|| {
            black_box(map::encode(
                req.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            ))
        })
    });
    c.bench_function("header map decode (14 pairs)", |b| {
        b.iter(|| black_box(map::decode(black_box(&encoded)).unwrap()))
    });
    let head = request_head();
    c.bench_function(
        "request head encode (14 pairs, proxy_get_header_map_pairs)",
        |b| b.iter(|| black_box(black_box(&head).encode())),
    );
    c.bench_function(
        "request head lent to plugins (Head::request, 14 pairs)",
        |b| {
            let parts = request_parts();
            b.iter_batched(
                || parts.clone(),
                |mut p| black_box(Head::request(&mut p, "http")),
                BatchSize::SmallInput,
            )
        },
    );
}

fn setup_costs(c: &mut Criterion) {
    let module = plugin();
    let mut vm = PluginVm::new(&module).unwrap();
    let conf = CONF;
    c.bench_function(
        "plugin context: proxy_on_context_create + proxy_on_configure (small JSON conf)",
        |b| {
            // Only the creation is timed; each context is finished (proxy_on_done,
            // proxy_on_delete) outside the timing so the guest does not accumulate them.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let id = vm.create_plugin_context(black_box(conf)).unwrap();
                    total += t.elapsed();
                    vm.finish(id.expect("the example plugin accepts its configuration"))
                        .unwrap();
                }
                total
            })
        },
    );
    c.bench_function(
        "plugin VM: instantiate, _initialize, proxy_on_vm_start",
        |b| b.iter_with_large_drop(|| PluginVm::new(&module).unwrap()),
    );
}

criterion_group!(benches, round_trip, codec, setup_costs);
criterion_main!(benches);
