//! Micro-benchmarks of the Proxy-Wasm host without any networking: what one plugin costs a
//! request in the host and the guest, and the header-map codec.
//!
//! `cargo bench -p wasmgate-wasm` (uses the committed `example_headers` plugin, the Rust SDK
//! `header_rewrite` fixture).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use wasmgate_wasm::map::{self, Pairs};
use wasmgate_wasm::{PluginModule, PluginVm, Properties, Settings, Stream};

struct NoProps;

impl Properties for NoProps {
    fn get(&self, _path: &[&str], _request: &Pairs) -> Option<Vec<u8>> {
        None
    }
}

/// A request with the four pseudo-headers and 10 ordinary headers.
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
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/example_headers.wasm"
    );
    let settings = Settings {
        name: Arc::from("example_headers"),
        callback_timeout: Duration::from_secs(1),
        memory_limit: 64 << 20,
        log_level: 4,
        log_gate: Arc::default(),
    };
    PluginModule::load(settings, std::path::Path::new(path)).expect("the example plugin loads")
}

fn round_trip(c: &mut Criterion) {
    let module = plugin();
    let mut vm = PluginVm::new(&module).unwrap();
    let conf = br#"{"set": {"x-a": "1"}, "response_set": {"x-b": "2"}}"#;
    let root = vm.create_plugin_context(conf).unwrap().unwrap();
    let props: Arc<dyn Properties> = Arc::new(NoProps);
    let req = request();
    c.bench_function(
        "plugin request: context, request and response headers, log, done",
        |b| {
            b.iter(|| {
                let mut stream = Some(Stream::new(req.clone(), props.clone()));
                let id = vm.create_http_context(root).unwrap();
                vm.on_request_headers(id, &mut stream, true).unwrap();
                if let Some(s) = stream.as_mut() {
                    s.response = Some(vec![(":status".into(), b"200".to_vec())]);
                }
                vm.on_response_headers(id, &mut stream, false).unwrap();
                vm.on_log(id, &mut stream).unwrap();
                vm.finish(id).unwrap();
                black_box(stream)
            })
        },
    );
    c.bench_function("plugin: proxy_on_request_headers alone (10 headers)", |b| {
        let id = vm.create_http_context(root).unwrap();
        b.iter(|| {
            let mut stream = Some(Stream::new(req.clone(), props.clone()));
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
}

criterion_group!(benches, round_trip, codec);
criterion_main!(benches);
