//! Micro-benchmarks of the worker's router with 10,000 routes.
//!
//! - Lookup (`Router::find`), which every request pays before any plugin runs:
//!   - an exact `uri` hit (one hash lookup);
//!   - prefix (`/api/rN/*`) hits among 10,000 prefixes: the prefixes are scanned longest
//!     first, so the cost depends on where the matching one sits (one half-way through the
//!     list, and the one checked last);
//!   - a host-matched route, the last of 100 routes sharing one `uri` that differ only by host;
//!   - misses (404): with only exact routes, and after scanning all 10,000 prefixes.
//! - Build: what a worker pays on every configuration change, on the first request after it,
//!   before that request is routed: copying the snapshot out of shared memory, decoding it,
//!   parsing each route's JSON and indexing the router (`Live::new` at worker start;
//!   `Live::current` after a new whole snapshot, which reuses the routes and upstreams that did
//!   not change: either none did, or one route was edited; and after one route's edit
//!   published as a delta, as the master does), and `Router::new` alone (the indexing part).
//!
//! Routes are built the way the worker builds them: the master's snapshot of route JSON,
//! published into a shared-memory segment and compiled by `live::Live`.
//!
//! `cargo bench -p wasmgate-worker --bench router`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::snapshot::{Change, Delta, KindTag, Snapshot, SnapshotObject};
use wasmgate_worker::live::Live;
use wasmgate_worker::router::{HostPattern, RequestView, RouteEntry, Router};

#[global_allocator]
static GLOBAL: wasmgate_shared::alloc::Mimalloc = wasmgate_shared::alloc::Mimalloc;

const ROUTES: usize = 10_000;
/// Routes sharing the `uri` `/tenant`, one per host, in the exact-uri configuration.
const TENANTS: usize = 100;

/// A route object as the Admin API stores it (`uri` ends with `*` for a prefix).
fn route_json(id: &str, uri: &str, host: Option<&str>) -> String {
    let host = host
        .map(|h| format!(r#""hosts":["{h}"],"#))
        .unwrap_or_default();
    format!(
        r#"{{"id":"{id}","uri":"{uri}",{host}"methods":["GET"],"upstream":{{"type":"roundrobin","nodes":{{"127.0.0.1:1980":1}}}},"plugins":{{"example_headers":{{"conf":{{"response_set":{{"x-hello":"wasm"}}}}}}}}}}"#
    )
}

/// The encoded snapshot of `routes` (id, JSON) at `generation`, as the master publishes it:
/// every route at revision 1 but the `edited` one, at revision `generation`.
fn encode(generation: u64, routes: &[(String, String)], edited: Option<usize>) -> Vec<u8> {
    Snapshot {
        generation,
        objects: routes
            .iter()
            .enumerate()
            .map(|(i, (id, json))| SnapshotObject {
                kind: KindTag::Route,
                id: id.clone(),
                revision: if Some(i) == edited { generation } else { 1 },
                json: json.clone(),
            })
            .collect(),
    }
    .encode()
}

/// 10,000 prefix routes `/api/r<i>/*`.
fn prefix_routes() -> Vec<(String, String)> {
    (0..ROUTES)
        .map(|i| {
            let id = format!("r{i}");
            let json = route_json(&id, &format!("/api/r{i}/*"), None);
            (id, json)
        })
        .collect()
}

/// 9,900 exact routes `/api/r<i>` and 100 routes on `/tenant`, one per host `t<k>.example.com`.
fn exact_routes() -> Vec<(String, String)> {
    let exact = (0..ROUTES - TENANTS).map(|i| {
        let id = format!("r{i}");
        let json = route_json(&id, &format!("/api/r{i}"), None);
        (id, json)
    });
    let tenants = (0..TENANTS).map(|k| {
        let id = format!("t{k}");
        let json = route_json(&id, "/tenant", Some(&format!("t{k}.example.com")));
        (id, json)
    });
    exact.chain(tenants).collect()
}

/// A segment holding the snapshot of `routes` at generation 1, and the worker's view of it.
fn live(routes: &[(String, String)]) -> (Arc<Segment>, Live) {
    let seg = Arc::new(Segment::create(16 << 20).expect("creating a shared-memory segment"));
    seg.publish(1, &encode(1, routes, None)).unwrap();
    let live = Live::new(seg.clone(), 0);
    assert_eq!(live.current().router.len(), routes.len());
    (seg, live)
}

/// The route serving `GET http://host/path`.
fn find<'r>(router: &'r Router, host: &str, path: &str) -> Option<&'r Arc<RouteEntry>> {
    let none = |_: &str| None;
    let req = RequestView {
        method: &http::Method::GET,
        host,
        path,
        remote: IpAddr::from([127, 0, 0, 1]),
        vars: &none,
    };
    router.find(black_box(&req))
}

fn lookup(c: &mut Criterion) {
    let (_seg, exact) = live(&exact_routes());
    let exact = exact.current();
    let (_seg, prefix) = live(&prefix_routes());
    let prefix = prefix.current();
    let last_tenant = format!("t{}.example.com", TENANTS - 1);
    let cases: [(&str, &Router, &str, &str, Option<&str>); 6] = [
        (
            "exact uri hit",
            &exact.router,
            "api.example.com",
            "/api/r5000",
            Some("r5000"),
        ),
        (
            "prefix hit, half-way through the prefixes",
            &prefix.router,
            "api.example.com",
            "/api/r5000/orders",
            Some("r5000"),
        ),
        (
            "prefix hit, the prefix checked last",
            &prefix.router,
            "api.example.com",
            "/api/r0/orders",
            Some("r0"),
        ),
        (
            "host-matched route, last of 100 on one uri",
            &exact.router,
            &last_tenant,
            "/tenant",
            Some("t99"),
        ),
        (
            "miss (404), exact routes only",
            &exact.router,
            "api.example.com",
            "/nothing/here",
            None,
        ),
        (
            "miss (404), after all 10,000 prefixes",
            &prefix.router,
            "api.example.com",
            "/api/unknown",
            None,
        ),
    ];
    let mut g = c.benchmark_group("router lookup, 10,000 routes");
    for (name, router, host, path, expect) in cases {
        assert_eq!(
            find(router, host, path).map(|r| r.id.as_str()),
            expect,
            "{name}"
        );
        g.bench_function(name, |b| b.iter(|| black_box(find(router, host, path))));
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let routes = prefix_routes();
    let mut g = c.benchmark_group("router build, 10,000 routes");
    g.sample_size(10);

    // Worker start: read, decode and compile everything, no previous generation.
    let seg = Arc::new(Segment::create(16 << 20).expect("creating a shared-memory segment"));
    seg.publish(1, &encode(1, &routes, None)).unwrap();
    g.bench_function("worker start (Live::new: read, decode, compile)", |b| {
        // The previous result is dropped outside the timing: a starting worker has none.
        b.iter_with_large_drop(|| Live::new(seg.clone(), 0))
    });

    // A configuration change: the master publishes a new generation (not timed) and the next
    // request's `Live::current` applies it and drops the previous generation. Either nothing
    // about the routes changed (another object did: every route and the index are reused), or
    // one route was edited (it is compiled again and the index rebuilt).
    let live = Live::new(seg.clone(), 0);
    let mut generation = 1;
    for (name, edited) in [
        ("configuration change, routes unchanged", None),
        ("configuration change, one route edited", Some(ROUTES / 2)),
    ] {
        // Two generations, alternated so each publish is a new one.
        let encoded: Vec<(u64, Vec<u8>)> = (0..2)
            .map(|_| {
                generation += 1;
                (generation, encode(generation, &routes, edited))
            })
            .collect();
        let mut k = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    k ^= 1;
                    let (published, bytes) = &encoded[k];
                    seg.publish(*published, bytes).unwrap();
                    let t = Instant::now();
                    let cur = live.current();
                    total += t.elapsed();
                    assert_eq!(cur.generation, *published);
                    black_box(cur);
                }
                total
            })
        });
    }

    // The same edit as the master publishes it now: one delta appended to the journal, read
    // and applied by the next `Live::current`. When the area is full the journal starts again
    // (not timed).
    let edit = |generation: u64| {
        let i = ROUTES / 2;
        let (id, json) = &routes[i];
        let json = json.replace(
            &format!("/api/r{i}/*"),
            &format!("/api/r{i}/v{generation}/*"),
        );
        let change = Change {
            kind: KindTag::Route,
            id,
            revision: generation,
            json: Some(&json),
        };
        Delta {
            generation,
            changes: vec![change],
        }
        .encode()
    };
    g.bench_function("configuration change, one route edited, as a delta", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                generation += 1;
                if seg.append(generation, &edit(generation)).is_err() {
                    seg.publish(generation, &encode(generation, &routes, None))
                        .unwrap();
                    live.current();
                    generation += 1;
                    seg.append(generation, &edit(generation)).unwrap();
                }
                let t = Instant::now();
                let cur = live.current();
                total += t.elapsed();
                assert_eq!(cur.generation, generation);
                black_box(cur);
            }
            total
        })
    });

    // The indexing alone, from already compiled entries.
    let entries: Vec<Arc<RouteEntry>> = (0..ROUTES)
        .map(|i| {
            Arc::new(RouteEntry {
                id: format!("r{i}"),
                name: None,
                revision: 1,
                priority: 0,
                paths: vec![format!("/api/r{i}/*")],
                methods: vec![http::Method::GET],
                hosts: Vec::<HostPattern>::new(),
                remote_addrs: vec![],
                vars: None,
                plugins: vec![],
                resolved: Default::default(),
                owner: format!("route:r{i}:1").into(),
                upstream: None,
                websocket: false,
                broken: None,
                traffic_record: Default::default(),
            })
        })
        .collect();
    g.bench_function("Router::new alone (indexing)", |b| {
        b.iter_with_large_drop(|| Router::new(black_box(&entries)))
    });
    g.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
