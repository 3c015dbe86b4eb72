//! The complete Proxy-Wasm host through a running gateway with two workers and real Rust SDK
//! plugins (tests/plugins/): call-outs that pause and resume requests, body rewriting with
//! buffering and caps, shared data, queues and metrics shared by all workers, ticks.

mod common;

use common::{eventually, http, Gateway, Setup, TestUpstream};
use serde_json::json;
use std::io::Write;

/// A bump allocator for hand-written plugins: `malloc` hands out memory from 8 KiB on,
/// never freed (a test plugin lives for a few requests).
const BUMP_MALLOC: &str = r#"(global $heap (mut i32) (i32.const 8192))
      (func (export "malloc") (param $n i32) (result i32)
        (local $p i32)
        (local.set $p (global.get $heap))
        (global.set $heap (i32.add (global.get $heap) (local.get $n)))
        (local.get $p))"#;
use std::time::{Duration, Instant};

/// One plugin, one verdict per route: `proxy_on_configure` keeps the first byte of each root's
/// configuration at 3000 + root, `proxy_on_context_create` the root of the last HttpContext
/// made at 208, and `$verdict` reads the current request's (made just before its headers
/// callback). Needs `$gbb` (`proxy_get_buffer_bytes`) imported.
const VERDICT_BY_ROOT: &str = r#"(func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
        (if (i32.ne (local.get $parent) (i32.const 0)) (then (i32.store (i32.const 208) (local.get $parent)))))
      (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
        (drop (call $gbb (i32.const 7) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204)))
        (i32.store8 (i32.add (i32.const 3000) (local.get $root)) (i32.load8_u (i32.load (i32.const 200))))
        (i32.const 1))
      (func $verdict (result i32)
        (i32.load8_u (i32.add (i32.const 3000) (i32.load (i32.const 208)))))"#;

fn get(gw: &Gateway, path: &str) -> common::Resp {
    http("GET", &gw.url(path), &[], None)
}

/// A gateway with one worker (so that requests meet the same plugin instance) and an upstream.
fn one_worker_and_app() -> (Gateway, TestUpstream) {
    let gw = Gateway::start_with(Setup {
        workers: 1,
        ..Setup::default()
    });
    (gw, TestUpstream::start("app"))
}

/// Sends `(method, path, body)` to a plugin that never resumes it under a `pause_timeout` of
/// 400 ms: answered 503 no sooner, with the error line `line`.
fn fails_at_pause_timeout(
    gw: &Gateway,
    (method, path, body): (&str, &str, Option<&[u8]>),
    line: &str,
) {
    let started = Instant::now();
    let r = http(method, &gw.url(path), &[], body);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(400));
    eventually(Duration::from_secs(3), "the pause_timeout line", || {
        gw.error_log().contains(line)
    });
}

/// Workers that served at least one request.
fn busy_workers(gw: &Gateway) -> usize {
    gw.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["requests"].as_u64().unwrap_or(0) > 0)
        .count()
}

/// Adds the WAT module `wat` to config.yaml as plugin `name`, reloads, and puts it on a route
/// at `uri`.
/// Header pairs in the ABI's map encoding, as WAT string escapes, and their length.
fn wat_map(pairs: &[(&str, &str)]) -> (String, usize) {
    let mut map = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        map.extend((k.len() as u32).to_le_bytes());
        map.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        map.extend(k.bytes().chain([0]).chain(v.bytes()).chain([0]));
    }
    (
        map.iter().map(|b| format!("\\{b:02x}")).collect(),
        map.len(),
    )
}

/// WAT for a plugin whose configuration is a call-out target (`host:port`): kept in `$tptr`
/// and `$tlen` by `proxy_on_configure` (needs `$gbb`, `proxy_get_buffer_bytes`).
const CALL_TARGET_FROM_CONF: &str = r#"(global $tptr (mut i32) (i32.const 0))
      (global $tlen (mut i32) (i32.const 0))
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (drop (call $gbb (i32.const 7) (i32.const 0) (local.get 1) (i32.const 200) (i32.const 204)))
        (global.set $tptr (i32.load (i32.const 200)))
        (global.set $tlen (i32.load (i32.const 204)))
        (i32.const 1))"#;

/// WAT calling `$call` (`proxy_http_call`) to that target with the headers at 300 (`len`
/// bytes, from [`wat_map`]), no body or trailers, the token written at 208.
fn dispatch(len: usize, timeout_ms: u32) -> String {
    format!(
        "(call $call (global.get $tptr) (global.get $tlen) (i32.const 300) (i32.const {len})
                     (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                     (i32.const {timeout_ms}) (i32.const 208))"
    )
}

fn wat_plugin_on_route(gw: &Gateway, name: &str, wat: &str, uri: &str) {
    wat_plugin_with(gw, name, wat, uri, "")
}

/// [`wat_plugin_on_route`] with more settings in the plugin's entry (`extra`: `, key: value`).
fn wat_plugin_with(gw: &Gateway, name: &str, wat: &str, uri: &str, extra: &str) {
    let file = format!("{name}.wasm");
    std::fs::write(gw.prefix().join(&file), wat::parse_str(wat).unwrap()).unwrap();
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        format!("{config}    - {{name: {name}, priority: 1, file: {file}{extra}}}\n"),
    )
    .unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    gw.route(
        name,
        json!({"uri": uri, "plugins": {name: {"conf": "-"}}}),
        None,
    );
}

/// Sends `n` requests from `threads` threads, each on its own connection (so both workers
/// take some), and returns their statuses.
fn burst(gw: &Gateway, path: &str, threads: usize, n: usize) -> Vec<u16> {
    let url = gw.url(path);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                (0..n)
                    .map(|_| http("GET", &url, &[], None).status)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// `proxy_http_call` from an HTTP context: the request pauses until the auth service answers,
/// then is resumed with headers the plugin added, or answered by the plugin.
#[test]
fn http_call_pauses_then_resumes_or_answers() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let auth = TestUpstream::start("auth");
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/auth-svc",
        Some(json!({"type": "roundrobin", "nodes": {auth.addr(): 1}})),
    );
    assert!(s == 200 || s == 201, "{s} {v}");
    let conf = |target: &str, timeout: u64| json!({"conf": json!({"upstream": target, "timeout_ms": timeout}).to_string()});
    gw.route(
        "by-id",
        json!({"uri": "/private", "plugins": {"http_auth": conf("auth-svc", 2000)}}),
        Some(&app),
    );
    gw.route(
        "literal",
        json!({"uri": "/literal", "plugins": {"http_auth": conf(&auth.addr(), 2000)}}),
        Some(&app),
    );
    // A peer that accepts connections (the kernel's backlog does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    gw.route(
        "silent",
        json!({"uri": "/silent", "plugins": {"http_auth": conf(&silent_addr, 300)}}),
        Some(&app),
    );
    gw.route(
        "refused",
        json!({"uri": "/refused", "plugins": {"http_auth": conf("127.0.0.1:1", 2000)}}),
        Some(&app),
    );
    gw.route(
        "unknown",
        json!({"uri": "/unknown", "plugins": {"http_auth": conf("no-such-upstream", 2000)}}),
        Some(&app),
    );

    let good = [("Authorization", "Bearer good")];
    for path in ["/private", "/literal"] {
        let r = http("GET", &gw.url(path), &good, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let seen = r.json();
        assert_eq!(seen["server"], "app");
        assert_eq!(seen["headers"]["x-auth-user"], "alice", "{seen}");
        assert_eq!(seen["headers"]["x-auth-body"], "ok-body");
    }
    let hits_before = auth.hits();
    let r = http(
        "GET",
        &gw.url("/private"),
        &[("Authorization", "Bearer bad")],
        None,
    );
    assert_eq!(
        (r.status, r.header("x-auth-status"), r.text().as_str()),
        (403, Some("401"), "denied by auth")
    );
    assert_eq!(auth.hits(), hits_before + 1);

    // Failure and timeout reach the plugin as Envoy's answers: 503 for a node that cannot be
    // reached, 504 for the call's timeout (the plugin denies any status but 200, saying it).
    let r = get(&gw, "/refused");
    assert_eq!((r.status, r.header("x-auth-status")), (403, Some("503")));
    let started = Instant::now();
    let r = get(&gw, "/silent");
    assert_eq!((r.status, r.header("x-auth-status")), (403, Some("504")));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the call's 300 ms timeout applies"
    );
    // Missing :path → BadArgument to the plugin, which answers 500 itself.
    let r = http(
        "GET",
        &gw.url("/private"),
        &[("Authorization", "Bearer good"), ("x-auth-bad-call", "1")],
        None,
    );
    assert_eq!(
        (r.status, r.header("x-auth-error")),
        (500, Some("dispatch"))
    );

    // A target that is neither an upstream nor host:port: BadArgument at dispatch, as
    // Envoy answers for an unknown cluster (not a failed call later).
    let r = get(&gw, "/unknown");
    assert_eq!(
        (r.status, r.header("x-auth-error")),
        (500, Some("dispatch"))
    );

    // Paused requests do not hold the worker: many wait on the auth service at once.
    let url = gw.url("/private");
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                http("GET", &url, &[("Authorization", "Bearer good")], None).status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    drop(silent);
}

/// Body callbacks: the request body gets a suffix before it reaches the upstream; the response
/// body is buffered whole, redacted and prefixed, with Content-Length fixed; buffers over the
/// plugin's `body_buffer_limit` (64k here) answer 413 / 502.
#[test]
fn bodies_are_buffered_and_rewritten() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let conf = json!({"redact": "secret", "request_append": "+tail", "response_prepend": "<<"});
    gw.route(
        "b",
        json!({"uri": "/*", "plugins": {"body_rewrite": {"conf": conf.to_string()}}}),
        Some(&app),
    );

    let r = http(
        "POST",
        &gw.url("/echo"),
        &[("x-note", "my secret word")],
        Some(b"hello"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-body-rewrite"), Some("on"));
    let text = r.text();
    assert!(text.starts_with("<<{"), "{text}");
    assert!(
        !text.contains("secret") && text.contains("my ****** word"),
        "{text}"
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let seen: serde_json::Value = serde_json::from_str(&text[2..]).unwrap();
    assert_eq!(
        seen["body_len"], 10,
        "hello+tail reached the upstream: {seen}"
    );
    assert_eq!(seen["headers"]["content-length"], "10");

    // A streamed (chunked) response is buffered to its end, then rewritten.
    let r = get(&gw, "/stream/40");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 40 * 1024 + 2);
    assert!(r.body.starts_with(b"<<aaaa"));

    // Over the cap: 502 for a response, 413 for a request body; the worker lives on.
    assert_eq!(get(&gw, "/big/100000").status, 502);
    let big = vec![b'x'; 100_000];
    assert_eq!(http("POST", &gw.url("/echo"), &[], Some(&big)).status, 413);
    assert_eq!(get(&gw, "/small").status, 200);

    // The gateway's own error page, through a body plugin that leaves it as it is, keeps its
    // length (nginx sends one), not chunked.
    gw.route(
        "dead",
        json!({"uri": "/dead", "plugins": {"body_rewrite": {"conf": "{}"}},
               "upstream": {"nodes": {"127.0.0.1:1": 1}}}),
        None,
    );
    let r = get(&gw, "/dead");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );

    eventually(Duration::from_secs(5), "the plugin's log line", || {
        gw.error_log().contains(
            "body_rewrite: request_body_calls=1 request_body_size=5 response_body_calls=1",
        )
    });
}

/// `get/set_shared_data` with CAS is one store for every worker: concurrent increments from
/// both workers add up exactly; an oversized value is refused without harming the store.
#[test]
fn shared_data_is_gateway_wide() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    gw.route(
        "c",
        json!({"uri": "/counter/*", "plugins": {"shared_counter": {"conf": "-"}}}),
        Some(&app),
    );
    // The first write creates the key (the ABI has no atomic create): done alone.
    let r = get(&gw, "/counter/inc");
    assert_eq!((r.status, r.header("x-counter")), (200, Some("1")));
    let statuses = burst(&gw, "/counter/inc", 8, 25);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(get(&gw, "/counter/read").text(), "201");
    assert_eq!(busy_workers(&gw), 2, "both workers took part");

    let r = get(&gw, "/counter/big?size=2000000");
    assert_eq!((r.status, r.text().as_str()), (507, "InternalFailure"));
    assert_eq!(get(&gw, "/counter/read").text(), "201");
    assert!(gw.error_log().contains("write refused"));
}

/// Setting a tick period starts it again, the same period included, as Envoy makes a new
/// timer on each set: a plugin that sets 1.5 s on every request ticks 1.5 s after the last
/// one, not every 1.5 s while they come. The plugin answers 200 + the ticks its worker saw.
#[test]
fn a_tick_period_set_again_starts_again() {
    let gw = Gateway::start_with(Setup {
        workers: 1,
        ..Setup::default()
    });
    let wat = r#"(module
      (import "env" "proxy_set_tick_period_milliseconds" (func $period (param i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $ticks (mut i32) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_tick") (param i32)
        (global.set $ticks (i32.add (global.get $ticks) (i32.const 1))))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $period (i32.const 1500)))
        (drop (call $reply (i32.add (i32.const 200) (global.get $ticks)) (i32.const 0) (i32.const 0)
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#;
    wat_plugin_on_route(&gw, "debounce", wat, "/debounce");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        assert_eq!(
            get(&gw, "/debounce").status,
            200,
            "a tick while requests came"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eventually(
        Duration::from_secs(8),
        "the tick after the last request",
        || {
            std::thread::sleep(Duration::from_millis(2000));
            get(&gw, "/debounce").status == 201
        },
    );
}

/// `proxy_set_tick_period_milliseconds` → `proxy_on_tick` in every worker at that period until
/// it is set to 0; a root context's `proxy_http_call` is answered to that root context.
#[test]
fn ticks_and_root_context_calls() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    gw.route(
        "hb",
        json!({"uri": "/hb", "plugins": {"heartbeat": {"conf": json!({"upstream": app.addr()}).to_string()}}}),
        None,
    );
    // Each worker's VM root context ticks 5 times at 20 ms, then stops.
    eventually(
        Duration::from_secs(10),
        "five ticks in each worker and the call's answer",
        || {
            let t = get(&gw, "/hb").text();
            t.contains("local=5") && t.contains("call=200")
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let statuses = burst(&gw, "/hb", 4, 5);
    assert!(statuses.iter().all(|s| *s == 200));
    for _ in 0..10 {
        let t = get(&gw, "/hb").text();
        assert!(
            t.contains("local=5"),
            "ticks stopped at 5 in every worker: {t}"
        );
    }
    // One plugin context per worker that served /hb, each making exactly one call-out (its
    // first tick comes 50 ms after that worker's first /hb).
    eventually(Duration::from_secs(5), "one call-out per worker", || {
        app.hits() == busy_workers(&gw)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(app.hits(), busy_workers(&gw));
}

/// Shared queues: registered by each worker's root context, filled by requests in any worker,
/// drained by `proxy_on_queue_ready`.
#[test]
fn shared_queues_cross_workers() {
    let gw = Gateway::start();
    gw.route(
        "q",
        json!({"uri": "/queue/*", "plugins": {"queue": {"conf": "-"}}}),
        None,
    );
    let push = |item: &str| {
        let r = get(&gw, &format!("/queue/push?item={item}"));
        assert_eq!((r.status, r.text().as_str()), (200, "queued"));
    };
    push("first");
    eventually(Duration::from_secs(5), "the first item consumed", || {
        get(&gw, "/queue/stats").text() == "consumed=1 last=first"
    });
    let url = gw.url("/queue/push");
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let r = http("GET", &format!("{url}?item=t{t}i{i}"), &[], None);
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    eventually(Duration::from_secs(5), "41 items consumed", || {
        get(&gw, "/queue/stats").text().starts_with("consumed=41 ")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(get(&gw, "/queue/stats").text().starts_with("consumed=41 "));
}

/// A queue at its item limit (10,000) takes a new item by dropping its oldest, and says so
/// in the error log, rather than refusing it: the SDKs trap on a refused enqueue, so a queue
/// whose consumer stopped would fail every request of its producer. The plugin enqueues
/// 10,001 items (their numbers) and answers 200 + refusals + 10 × the first item left.
#[test]
fn a_full_queue_drops_its_oldest_item() {
    let gw = Gateway::start();
    let wat = format!(
        r#"(module
      (import "env" "proxy_register_shared_queue" (func $reg (param i32 i32 i32) (result i32)))
      (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
      (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "bounded")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $i i32) (local $refused i32) (local $t i32)
        (drop (call $reg (i32.const 100) (i32.const 7) (i32.const 200)))
        (local.set $t (i32.load (i32.const 200)))
        (block $done
          (loop $next
            (br_if $done (i32.ge_u (local.get $i) (i32.const 10001)))
            (i32.store (i32.const 300) (local.get $i))
            (if (i32.ne (call $enq (local.get $t) (i32.const 300) (i32.const 4)) (i32.const 0))
              (then (local.set $refused (i32.add (local.get $refused) (i32.const 1)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next)))
        (drop (call $deq (local.get $t) (i32.const 204) (i32.const 208)))
        (drop (call $reply
          (i32.add (i32.add (i32.const 200) (local.get $refused))
                   (i32.mul (i32.const 10) (i32.load (i32.load (i32.const 204)))))
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#
    );
    wat_plugin_on_route(&gw, "producer", &wat, "/produce");
    // No refusal, and item 0 made room for item 10,000: item 1 comes out first.
    assert_eq!(get(&gw, "/produce").status, 210);
    assert!(
        gw.error_log().contains("oldest item(s) to take new ones"),
        "{}",
        gw.error_log()
    );
    assert_eq!(gw.plugin_faults(), 0);
}

/// `proxy_on_queue_ready` comes once per item enqueued, as proxy-wasm-cpp-host calls it once
/// per enqueue: a plugin that takes one item a call (the Go SDK's example) gets them all, not
/// one per look. Five items enqueued in one callback; each call dequeues one and counts it.
#[test]
fn queue_ready_comes_once_per_item() {
    let gw = Gateway::start();
    let wat = r#"(module
      (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
      (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
      (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
      (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "one_at_a_time")
      (data (i32.const 120) "one_at_a_time_dequeued")
      (data (i32.const 150) "item")
      (global $queue (mut i32) (i32.const 0))
      (global $metric (mut i32) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
        (drop (call $register (i32.const 100) (i32.const 13) (i32.const 200)))
        (global.set $queue (i32.load (i32.const 200)))
        (drop (call $define (i32.const 0) (i32.const 120) (i32.const 22) (i32.const 204)))
        (global.set $metric (i32.load (i32.const 204)))
        (i32.const 1))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $i i32)
        (loop $five
          (drop (call $enqueue (global.get $queue) (i32.const 150) (i32.const 4)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $five (i32.lt_u (local.get $i) (i32.const 5))))
        (drop (call $reply (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 150) (i32.const 4)
                           (i32.const 0) (i32.const 0) (i32.const 0)))
        (i32.const 1))
      (func (export "proxy_on_queue_ready") (param i32 i32)
        (if (i32.eqz (call $dequeue (local.get 1) (i32.const 300) (i32.const 304)))
          (then (drop (call $increment (global.get $metric) (i64.const 1)))))))"#;
    wat_plugin_on_route(&gw, "one_at_a_time", wat, "/one");
    assert_eq!(get(&gw, "/one").text(), "item");
    let url = gw.admin_url("/wasmgate/metrics");
    let dequeued = || {
        let text = http("GET", &url, &[("X-API-KEY", common::KEY)], None).text();
        text.lines()
            .find_map(|l| l.strip_prefix("one_at_a_time_dequeued_total "))
            .map(|v| v.to_string())
    };
    eventually(Duration::from_secs(5), "five items dequeued", || {
        dequeued().as_deref() == Some("5")
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dequeued().as_deref(), Some("5"));
}

/// Metrics defined by a plugin are one set for the gateway: increments from both workers add
/// up, read back by `proxy_get_metric` and exported in Prometheus text format.
#[test]
fn plugin_metrics_aggregate_and_export() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    gw.route(
        "m",
        json!({"uri": "/metrics/*", "plugins": {"metrics": {"conf": "-"}}}),
        Some(&app),
    );
    let statuses = burst(&gw, "/metrics/x", 5, 6);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let r = get(&gw, "/metrics/read");
    assert_eq!(r.text(), "requests=31");
    let url = gw.admin_url("/wasmgate/metrics");
    let text = http("GET", &url, &[("X-API-KEY", common::KEY)], None).text();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .to_string()
    };
    assert_eq!(line("wasm_requests_total "), "wasm_requests_total 31");
    assert!(text.contains("# TYPE wasm_path_len histogram"));
    assert_eq!(line("wasm_path_len_count "), "wasm_path_len_count 31");
    assert_eq!(line("wasm_last_path_len "), "wasm_last_path_len 13");
    assert!(
        text.contains("apisix_worker_requests_total{worker=\"0\""),
        "{text}"
    );
}

/// A plugin passing out-of-bounds pointers gets InvalidMemoryAccess, absurd lengths and
/// malformed maps BadArgument, for each call (never a host panic, never a trap), as
/// proxy-wasm-cpp-host answers them; gRPC and foreign functions, which wasmgate does not
/// provide, answer with a status the SDKs handle.
#[test]
fn hostile_arguments_are_refused() {
    let gw = Gateway::start();
    let wat = r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_header_map_pairs" (func $shp (param i32 i32 i32) (result i32)))
      (import "env" "proxy_set_buffer_bytes" (func $sbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $hc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_shared_data" (func $ssd (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_property" (func $gp (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_grpc_call" (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      ;; a map claiming 5 pairs with one size entry
      (data (i32.const 16) "\05\00\00\00\01\00\00\00\01\00\00\00")
      (data (i32.const 64) "127.0.0.1:1")
      (global $bad (mut i32) (i32.const 0))
      ;; +1 per BadArgument, +5 per InvalidMemoryAccess
      (func $count (param $s i32)
        (if (i32.eq (local.get $s) (i32.const 2))
          (then (global.set $bad (i32.add (global.get $bad) (i32.const 1)))))
        (if (i32.eq (local.get $s) (i32.const 6))
          (then (global.set $bad (i32.add (global.get $bad) (i32.const 5))))))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $extra i32)
        (global.set $bad (i32.const 0))
        (call $count (call $ghv (i32.const 0) (i32.const -16) (i32.const 100) (i32.const 0) (i32.const 4)))
        (call $count (call $shp (i32.const 0) (i32.const 0) (i32.const 0x7fffffff)))
        (call $count (call $shp (i32.const 0) (i32.const 16) (i32.const 12)))
        (call $count (call $sbb (i32.const 1) (i32.const 0) (i32.const 0) (i32.const -256) (i32.const 1000)))
        (call $count (call $hc (i32.const 64) (i32.const 11) (i32.const 16) (i32.const 12) (i32.const 0)
                               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0)))
        (call $count (call $ssd (i32.const -1) (i32.const 2) (i32.const 0) (i32.const 0) (i32.const 0)))
        (call $count (call $gp (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 4)))
        (call $count (call $log (i32.const 2) (i32.const -16) (i32.const 64)))
        ;; informational statuses are no answer
        (call $count (call $reply (i32.const 101) (i32.const 0) (i32.const 0) (i32.const 0)
                               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (call $count (call $reply (i32.const 100) (i32.const 0) (i32.const 0) (i32.const 0)
                               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (if (i32.eq (call $ff (i32.const 64) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 4))
                    (i32.const 1))
          (then (local.set $extra (i32.const 40))))
        (if (i32.eq (call $grpc (i32.const 64) (i32.const 3) (i32.const 64) (i32.const 3) (i32.const 64) (i32.const 3)
                                (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0))
                    (i32.const 10))
          (then (local.set $extra (i32.add (local.get $extra) (i32.const 80)))))
        (drop (call $reply (i32.add (i32.add (i32.const 200) (global.get $bad)) (local.get $extra))
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#;
    wat_plugin_on_route(&gw, "hostile", wat, "/hostile");
    for _ in 0..5 {
        // 6 BadArguments (lengths, maps, a local reply of 101 or 100), 4 InvalidMemoryAccess
        // (pointers: +20), NotFound from the foreign function (+40), InternalFailure from
        // gRPC (+80).
        assert_eq!(get(&gw, "/hostile").status, 346);
    }
    let faults = gw.plugin_faults();
    assert_eq!(faults, 0);
}

/// A plugin that sets an answer's `:status` to an informational one does not make the
/// gateway send a 1xx (or a 101 that switches nothing) as the answer: the upstream's status
/// goes, with an error-log line, and the connection serves its next request.
#[test]
fn a_plugin_cannot_make_an_answer_informational() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = r#"(module
      (import "env" "proxy_replace_header_map_value" (func $rhv (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) ":status")
      (data (i32.const 110) "103")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
        (drop (call $rhv (i32.const 2) (i32.const 100) (i32.const 7) (i32.const 110) (i32.const 3)))
        (i32.const 0)))"#;
    wat_plugin_on_route(&gw, "early", wat, "/unused");
    gw.route(
        "early-hints",
        json!({"uri": "/early", "plugins": {"early": {"conf": "-"}}}),
        Some(&app),
    );
    let mut c = common::client::KeepAlive::new(&gw.url("/"));
    for _ in 0..2 {
        let r = c.get("/early").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(gw
        .error_log()
        .contains("not sent: a final status is 200-599"));
}

/// `proxy_get_header_map_value` finds a header by its name in any case, the same way when the
/// instance asks for the same bytes again (remembered names), never a previous request's
/// value, pseudo-headers by text, and answers BadArgument for a name that is not UTF-8. The
/// plugin replies with one bit per check passed.
#[test]
fn header_names_are_found_in_any_case_and_bad_text_refused() {
    let gw = Gateway::start();
    let wat = r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "X-Test")
      (data (i32.const 110) "x-test")
      (data (i32.const 120) "\ff\fe")
      (data (i32.const 130) ":method")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      ;; 1 when the header is found with a 3-byte value starting with $first
      (func $has (param $k i32) (param $l i32) (param $first i32) (result i32)
        (if (i32.ne (call $ghv (i32.const 0) (local.get $k) (local.get $l) (i32.const 200) (i32.const 204))
                    (i32.const 0))
          (then (return (i32.const 0))))
        (i32.and (i32.eq (i32.load (i32.const 204)) (i32.const 3))
                 (i32.eq (i32.load8_u (i32.load (i32.const 200))) (local.get $first))))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $s i32)
        (local.set $s (call $has (i32.const 100) (i32.const 6) (i32.const 97)))
        (local.set $s (i32.or (local.get $s)
          (i32.shl (call $has (i32.const 110) (i32.const 6) (i32.const 97)) (i32.const 1))))
        (local.set $s (i32.or (local.get $s)
          (i32.shl (call $has (i32.const 110) (i32.const 6) (i32.const 97)) (i32.const 2))))
        (local.set $s (i32.or (local.get $s)
          (i32.shl (call $has (i32.const 130) (i32.const 7) (i32.const 71)) (i32.const 3))))
        (if (i32.eq (call $ghv (i32.const 0) (i32.const 120) (i32.const 2) (i32.const 200) (i32.const 204))
                    (i32.const 2))
          (then (local.set $s (i32.or (local.get $s) (i32.const 16)))))
        (drop (call $reply (i32.add (i32.const 200) (local.get $s))
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#;
    wat_plugin_on_route(&gw, "names", wat, "/names");
    let url = gw.url("/names");
    for _ in 0..3 {
        // Every check passes: "X-Test" and "x-test" (twice) find "abc", `:method` is "GET",
        // and the name that is not UTF-8 gets BadArgument.
        assert_eq!(http("GET", &url, &[("x-test", "abc")], None).status, 231);
        // Without the header, the remembered name finds nothing from the request before.
        assert_eq!(http("GET", &url, &[], None).status, 224);
    }
}

/// An AssemblyScript SDK plugin (tests/plugins/assemblyscript/assembly/body.ts) that pauses
/// until `end_of_stream` and rewrites both bodies with `proxy_set_buffer_bytes`: "+as" appended
/// to the request body, the response body upper-cased, `x-as-body: on` added.
#[test]
fn assemblyscript_plugin_rewrites_bodies() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    gw.route(
        "asb",
        json!({"uri": "/*", "plugins": {"as_body": {"conf": "-"}}}),
        Some(&app),
    );

    let r = http("POST", &gw.url("/echo"), &[], Some(b"hello"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.error_log());
    assert_eq!(r.header("x-as-body"), Some("on"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let text = r.text();
    assert_eq!(text, text.to_ascii_uppercase());
    assert!(
        text.contains("\"BODY_LEN\":8"),
        "hello+as reached the upstream: {text}"
    );
    assert!(text.contains("\"SERVER\":\"APP\""), "{text}");
    let sum: u32 = b"hello+as".iter().map(|b| *b as u32).sum();
    assert!(text.contains(&format!("\"BODY_SUM\":{sum}")), "{text}");
    assert!(text.contains("\"CONTENT-LENGTH\":\"8\""), "{text}");

    // A streamed (chunked) response is buffered to its end, then upper-cased whole.
    let r = get(&gw, "/stream/20");
    assert_eq!(r.status, 200, "{}", gw.error_log());
    assert_eq!(r.header("x-as-body"), Some("on"));
    assert_eq!(r.body.len(), 20 * 1024);
    assert!(r.body.iter().all(u8::is_ascii_uppercase));
    assert!(r.body.starts_with(b"AAAA") && r.body.ends_with(b"TTTT"));
}

/// A plugin reading the response headers after they were sent — in its body callback and in
/// `proxy_on_log`, as a header or as the `response.headers.*` property — reads them as the
/// client got them: the upstream's, and the gateway's own (`Server`), whether or not the
/// plugin has body callbacks.
#[test]
fn response_headers_read_after_sending_are_the_ones_sent() {
    let gw = Gateway::start();
    let up = TestUpstream::start("sent-upstream");
    let module = |body_callback: bool| {
        let body = match body_callback {
            true => {
                r#"(func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
                 (call $show (i32.const 100) (i32.const 10)) (i32.const 0))"#
            }
            false => "",
        };
        format!(
            r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-upstream")
      (data (i32.const 120) "server")
      (data (i32.const 140) "no such response header")
      (data (i32.const 170) "response\00headers\00server")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      ;; logs the response header's value at error level, or that it is missing
      (func $show (param $k i32) (param $l i32)
        (if (i32.eq (call $ghv (i32.const 2) (local.get $k) (local.get $l) (i32.const 200) (i32.const 204))
                    (i32.const 0))
          (then (drop (call $log (i32.const 4) (i32.load (i32.const 200)) (i32.load (i32.const 204)))))
          (else (drop (call $log (i32.const 4) (i32.const 140) (i32.const 23))))))
      {body}
      (func (export "proxy_on_log") (param i32)
        ;; the property first: it alone has to bring in the gateway's own fields
        (if (i32.eq (call $prop (i32.const 170) (i32.const 23) (i32.const 200) (i32.const 204))
                    (i32.const 0))
          (then (drop (call $log (i32.const 4) (i32.load (i32.const 200)) (i32.load (i32.const 204)))))
          (else (drop (call $log (i32.const 4) (i32.const 140) (i32.const 23)))))
        (call $show (i32.const 100) (i32.const 10))
        (call $show (i32.const 120) (i32.const 6))))"#
        )
    };
    for (name, body_callback) in [("sent_log", false), ("sent_body", true)] {
        wat_plugin_on_route(&gw, name, &module(body_callback), &format!("/{name}"));
        gw.route(
            name,
            json!({"uri": format!("/{name}"), "plugins": {name: {"conf": "-"}}}),
            Some(&up),
        );
        let r = get(&gw, &format!("/{name}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    eventually(Duration::from_secs(5), "the plugins' log lines", || {
        let log = gw.error_log();
        // on_log twice (two routes) and the body callback once; `Server` as a property and
        // as a header in each on_log.
        log.matches("sent-upstream").count() >= 3 && log.matches("wasmgate/").count() >= 4
    });
    assert!(
        !gw.error_log().contains("no such response header"),
        "{}",
        gw.error_log()
    );
}

/// `wasm.plugins[].root_id` is what `plugin_root_id` answers (the C++ SDK's default root id
/// is ""), and `vm_config` the buffer `proxy_on_vm_start` reads, with its size; without them,
/// the plugin's name and an empty configuration.
#[test]
fn root_id_and_vm_config_come_from_the_plugin_entry() {
    let gw = Gateway::start();
    let up = TestUpstream::start("ids");
    let wat = r#"(module
      (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "plugin_root_id")
      (data (i32.const 120) "x-root-id")
      (data (i32.const 140) "x-vm-config")
      (global $vm_ptr (mut i32) (i32.const 0))
      (global $vm_len (mut i32) (i32.const 0))
      (global $heap (mut i32) (i32.const 4096))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param $n i32) (result i32)
        (local $p i32)
        (local.set $p (global.get $heap))
        (global.set $heap (i32.add (global.get $heap) (local.get $n)))
        (local.get $p))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
        (global.set $vm_len (local.get 1))
        (if (i32.gt_u (local.get 1) (i32.const 0))
          (then
            (drop (call $gbb (i32.const 6) (i32.const 0) (local.get 1) (i32.const 200) (i32.const 204)))
            (global.set $vm_ptr (i32.load (i32.const 200)))))
        (i32.const 1))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $prop (i32.const 100) (i32.const 14) (i32.const 208) (i32.const 212)))
        (drop (call $add (i32.const 0) (i32.const 120) (i32.const 9)
                         (i32.load (i32.const 208)) (i32.load (i32.const 212))))
        (drop (call $add (i32.const 0) (i32.const 140) (i32.const 11)
                         (global.get $vm_ptr) (global.get $vm_len)))
        (i32.const 0)))"#;
    std::fs::write(gw.prefix().join("ids.wasm"), wat::parse_str(wat).unwrap()).unwrap();
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        format!(
            "{config}    - {{name: ids_set, priority: 1, file: ids.wasm, root_id: my_root, vm_config: \"mode=fast\"}}\n\
             \x20   - {{name: ids_default, priority: 1, file: ids.wasm}}\n"
        ),
    )
    .unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    for name in ["ids_set", "ids_default"] {
        gw.route(
            name,
            json!({"uri": format!("/{name}"), "plugins": {name: {"conf": "-"}}}),
            Some(&up),
        );
    }
    let h = get(&gw, "/ids_set").json()["headers"].clone();
    assert_eq!(
        (&h["x-root-id"], &h["x-vm-config"]),
        (&json!("my_root"), &json!("mode=fast")),
        "{h}"
    );
    let h = get(&gw, "/ids_default").json()["headers"].clone();
    assert_eq!(
        (&h["x-root-id"], &h["x-vm-config"]),
        (&json!("ids_default"), &json!("")),
        "{h}"
    );
}

/// `request.headers.<name>` gives every value of the name joined with `,`, as Envoy's
/// attribute does (a repeated `x-forwarded-for` reads whole); one value is given as it is.
#[test]
fn header_properties_join_every_value() {
    let gw = Gateway::start();
    let up = TestUpstream::start("joined");
    let wat = r#"(module
      (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "request\00headers\00x-multi")
      (data (i32.const 140) "x-multi-property")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (if (i32.eqz (call $prop (i32.const 100) (i32.const 23) (i32.const 200) (i32.const 204)))
          (then (drop (call $add (i32.const 0) (i32.const 140) (i32.const 16)
                                 (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
        (i32.const 0)))"#;
    wat_plugin_on_route(&gw, "joined", wat, "/joined");
    gw.route(
        "joined",
        json!({"uri": "/joined", "plugins": {"joined": {"conf": "-"}}}),
        Some(&up),
    );
    let seen = |headers: &[(&str, &str)]| {
        let r = http("GET", &gw.url("/joined"), headers, None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["headers"]["x-multi-property"].clone()
    };
    assert_eq!(
        seen(&[("x-multi", "a"), ("x-multi", "b"), ("x-multi", "c")]),
        "a,b,c"
    );
    assert_eq!(seen(&[("x-multi", "only")]), "only");
    assert!(seen(&[]).is_null());
}

/// Edge answers as proxy-wasm-cpp-host and Envoy give them, which SDKs rely on (the Rust SDK
/// panics on any status it does not expect): a header map the phase has not got yet is an
/// empty map (Ok, null pointer); an empty value or an empty range of a body is Ok with a null
/// pointer and no call to the plugin's allocator; an unknown map type is a BadArgument; a
/// property set by the plugin does not hide the host's own (`request.path`); integers
/// (`response.code`) are 8 bytes, little-endian. Each request-phase check is one bit of the
/// `x-bits` answer header ('0' + bits); `x-code` says whether `response.code` read as 200.
#[test]
fn edge_answers_match_envoy() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = r#"(module
      (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $ahv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_property" (func $gp (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_property" (func $sp (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-empty")
      (data (i32.const 120) "request\00path")
      (data (i32.const 140) "/forged")
      (data (i32.const 160) "response\00code")
      (data (i32.const 180) "x-bits")
      (data (i32.const 190) "x-code")
      (global $mallocs (mut i32) (i32.const 0))
      (global $bits (mut i32) (i32.const 0))
      (func (export "malloc") (param $n i32) (result i32)
        (global.set $mallocs (i32.add (global.get $mallocs) (i32.const 1)))
        (i32.const 4096))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      ;; sets bit $b when $ok
      (func $bit (param $ok i32) (param $b i32)
        (if (local.get $ok)
          (then (global.set $bits (i32.or (global.get $bits) (i32.shl (i32.const 1) (local.get $b)))))))
      ;; Ok, and a null pointer with no bytes at 200/204 (preset to 0xAA bytes)
      (func $null (param $status i32) (result i32)
        (i32.and (i32.eqz (local.get $status))
          (i32.and (i32.eqz (i32.load (i32.const 200))) (i32.eqz (i32.load (i32.const 204))))))
      (func $preset
        (i32.store (i32.const 200) (i32.const 0xAAAAAAAA))
        (i32.store (i32.const 204) (i32.const 0xAAAAAAAA)))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $bits (i32.const 0))
        (global.set $mallocs (i32.const 0))
        (call $preset)
        (call $bit (call $null (call $pairs (i32.const 2) (i32.const 200) (i32.const 204))) (i32.const 0))
        (call $preset)
        (call $bit (call $null (call $ghv (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 200) (i32.const 204))) (i32.const 1))
        (call $preset)
        (call $bit (call $null (call $gbb (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 200) (i32.const 204))) (i32.const 2))
        (call $bit (i32.eq (call $pairs (i32.const 99) (i32.const 200) (i32.const 204)) (i32.const 2)) (i32.const 3))
        (call $bit (i32.eqz (global.get $mallocs)) (i32.const 4))
        (drop (call $sp (i32.const 120) (i32.const 12) (i32.const 140) (i32.const 7)))
        ;; the real path (/edge), not /forged: its second byte is 'e'
        (if (i32.eqz (call $gp (i32.const 120) (i32.const 12) (i32.const 200) (i32.const 204)))
          (then (call $bit (i32.eq (i32.load8_u (i32.add (i32.load (i32.const 200)) (i32.const 1)))
                                   (i32.const 101))
                           (i32.const 5))))
        (i32.const 0))
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
        (i32.store8 (i32.const 210) (i32.add (i32.const 48) (global.get $bits)))
        (drop (call $ahv (i32.const 2) (i32.const 180) (i32.const 6) (i32.const 210) (i32.const 1)))
        (i32.store8 (i32.const 211) (i32.const 78))
        (if (i32.eqz (call $gp (i32.const 160) (i32.const 13) (i32.const 200) (i32.const 204)))
          (then (if (i32.and (i32.eq (i32.load (i32.const 204)) (i32.const 8))
                             (i64.eq (i64.load (i32.load (i32.const 200))) (i64.const 200)))
            (then (i32.store8 (i32.const 211) (i32.const 89))))))
        (drop (call $ahv (i32.const 2) (i32.const 190) (i32.const 6) (i32.const 211) (i32.const 1)))
        (i32.const 0)))"#;
    wat_plugin_on_route(&gw, "edges", wat, "/edge");
    gw.route(
        "edges",
        json!({"uri": "/edge", "plugins": {"edges": {"conf": "-"}}}),
        Some(&app),
    );
    let r = http("GET", &gw.url("/edge"), &[("x-empty", "")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let bits = r.header("x-bits").map(|b| b.as_bytes()[0] - b'0');
    assert_eq!(bits, Some(0b11_1111), "bits passed: {bits:?}");
    assert_eq!(r.header("x-code"), Some("Y"));
}

/// Envoy's contexts for call-outs and held headers: the answer to a call-out made from an
/// HTTP context comes to its root context (`proxy_on_http_call_response(root, …)`, which the
/// Go SDK requires), and the plugin then sets the HTTP context as effective to change the
/// request (an id no live context has is refused, as proxy-wasm-cpp-host does). Paused
/// headers hold a request's body too, as Envoy holds it: the body callback runs once the
/// call-out's answer resumed the stream, and may still change the headers until the upstream
/// is contacted.
#[test]
fn call_outs_answer_the_root_and_held_headers_take_body_changes() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (memory (export "memory") 1)
      ;; :method GET, :path /, :authority x
      (data (i32.const 100) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00x\00")
      (data (i32.const 200) "x-root")
      (data (i32.const 210) "x-from-body")
      (data (i32.const 230) "yes")
      (data (i32.const 240) "no")
      (data (i32.const 250) ":authority")
      (data (i32.const 270) "internal.svc")
      (data (i32.const 340) "x-unknown-refused")
      (global $root (mut i32) (i32.const 0))
      (global $http (mut i32) (i32.const 0))
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
        (if (i32.and (i32.eqz (local.get $parent)) (i32.gt_u (local.get $id) (i32.const 1)))
          (then (global.set $root (local.get $id)))))
      ;; the plugin configuration is the call-out's target (host:port), kept at 300/304
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (drop (call $gbb (i32.const 7) (i32.const 0) (i32.const 64) (i32.const 300) (i32.const 304)))
        (i32.const 1))
      (func (export "proxy_on_request_headers") (param $id i32) (param i32) (param $eos i32) (result i32)
        (global.set $http (local.get $id))
        (drop (call $call (i32.load (i32.const 300)) (i32.load (i32.const 304))
                          (i32.const 100) (i32.const 61) (i32.const 0) (i32.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 2000) (i32.const 320)))
        ;; a request with a body: a new authority now, one more header with the body
        (if (i32.eqz (local.get $eos))
          (then (drop (call $replace (i32.const 0) (i32.const 250) (i32.const 10) (i32.const 270) (i32.const 12)))))
        (i32.const 1))
      (func (export "proxy_on_http_call_response") (param $ctx i32) (param i32 i32 i32 i32)
        ;; an id no context has is refused (BadArgument), and the effective context stays
        (local $unknown i32)
        (local.set $unknown (call $effective (i32.const 99999)))
        (drop (call $effective (global.get $http)))
        (if (i32.eq (local.get $unknown) (i32.const 2))
          (then (drop (call $add (i32.const 0) (i32.const 340) (i32.const 17) (i32.const 230) (i32.const 3)))))
        (if (i32.eq (local.get $ctx) (global.get $root))
          (then (drop (call $add (i32.const 0) (i32.const 200) (i32.const 6) (i32.const 230) (i32.const 3))))
          (else (drop (call $add (i32.const 0) (i32.const 200) (i32.const 6) (i32.const 240) (i32.const 2)))))
        (drop (call $continue (i32.const 0))))
      (func (export "proxy_on_request_body") (param i32) (param i32) (param $eos i32) (result i32)
        (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
        (drop (call $add (i32.const 0) (i32.const 210) (i32.const 11) (i32.const 230) (i32.const 3)))
        (i32.const 0)))"#
    );
    wat_plugin_on_route(&gw, "contexts", &wat, "/ctx");
    gw.route(
        "contexts",
        json!({"uri": "/ctx", "plugins": {"contexts": {"conf": app.addr()}}}),
        Some(&app),
    );
    let r = get(&gw, "/ctx");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-root"], "yes", "{}", r.text());
    assert_eq!(
        r.json()["headers"]["x-unknown-refused"],
        "yes",
        "{}",
        r.text()
    );
    let r = http("POST", &gw.url("/ctx"), &[], Some(b"some body"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-root"], "yes", "{}", r.text());
    assert_eq!(r.json()["headers"]["x-from-body"], "yes", "{}", r.text());
    // A `:authority` set with the headers survives the body callback's change.
    assert_eq!(r.json()["headers"]["host"], "internal.svc", "{}", r.text());
    assert_eq!(r.json()["body_len"], 9);
}

/// A call that fails before its node answers reaches the plugin as Envoy's async client
/// answers it, not as an answer without headers (which the SDKs' `:status` readers do not
/// expect): 503 with the reset's reason when the node cannot be reached, 504 when the call's
/// timeout ends first. The plugin answers with the status and the body it was given.
#[test]
fn failed_call_outs_are_answered_as_envoy_answers_them() {
    let gw = Gateway::start();
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "auth"),
    ]);
    let call = dispatch(len, 300);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_header_map_value" (func $hget (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 700) ":status")
      (data (i32.const 760) "no headers")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop {call})
        (i32.const 1))
      ;; answers with the call's `:status` (three digits) and its body
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (local $s i32)
        (if (i32.eqz (local.get 2))
          (then
            (drop (call $reply (i32.const 502) (i32.const 0) (i32.const 0) (i32.const 760)
                               (i32.const 10) (i32.const 0) (i32.const 0) (i32.const 0)))
            (return)))
        (drop (call $hget (i32.const 6) (i32.const 700) (i32.const 7) (i32.const 720) (i32.const 724)))
        (local.set $s (i32.load (i32.const 720)))
        (drop (call $gbb (i32.const 4) (i32.const 0) (local.get 3) (i32.const 728) (i32.const 732)))
        (drop (call $reply
          (i32.add (i32.add
            (i32.mul (i32.sub (i32.load8_u (local.get $s)) (i32.const 48)) (i32.const 100))
            (i32.mul (i32.sub (i32.load8_u offset=1 (local.get $s)) (i32.const 48)) (i32.const 10)))
            (i32.sub (i32.load8_u offset=2 (local.get $s)) (i32.const 48)))
          (i32.const 0) (i32.const 0)
          (i32.load (i32.const 728)) (i32.load (i32.const 732))
          (i32.const 0) (i32.const 0) (i32.const 0)))))"#
    );
    wat_plugin_on_route(&gw, "caller", &wat, "/unused");
    // A peer that accepts connections (the kernel's backlog does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let targets = [
        ("/refused", "127.0.0.1:1".to_string()),
        ("/silent", silent.local_addr().unwrap().to_string()),
    ];
    for (uri, target) in &targets {
        let route = json!({"uri": uri, "plugins": {"caller": {"conf": target}}});
        gw.route(uri.trim_start_matches('/'), route, None);
    }
    let r = get(&gw, "/refused");
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
        )
    );
    let started = Instant::now();
    let r = get(&gw, "/silent");
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the call's 300 ms timeout"
    );
    assert!(!gw.error_log().contains("panicked"));
}

/// A local reply sent from another callback to a request that went on (not paused) is not
/// taken: the request gets its upstream's answer, and the error log says the reply was
/// ignored and why. The plugin dispatches a call-out and lets the request go on; the call's
/// answer, while the request waits on a slow upstream, makes its context effective and
/// answers 403.
#[test]
fn a_reply_to_a_request_that_went_on_is_ignored_and_said() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/fast"),
        (":authority", "app"),
    ]);
    let call = dispatch(len, 2000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      ;; the last HttpContext made, at 400
      (func (export "proxy_on_context_create") (param i32 i32)
        (if (local.get 1) (then (i32.store (i32.const 400) (local.get 0)))))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop {call})
        (i32.const 0))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (if (i32.eqz (call $effective (i32.load (i32.const 400))))
          (then (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0)
                                   (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))))))"#
    );
    wat_plugin_on_route(&gw, "late", &wat, "/unused");
    gw.route(
        "slow",
        json!({"uri": "/delay/*", "plugins": {"late": {"conf": app.addr()}}}),
        Some(&app),
    );
    let r = get(&gw, "/delay/600/slow");
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(Duration::from_secs(5), "the warning", || {
        gw.error_log().contains("a local reply for context")
    });
    assert!(gw.error_log().contains("is not paused"));
}

/// A body callback that pauses with a call-out of its own in flight holds the body until the
/// answer (as Envoy holds a body a filter stopped): the answer's callback resumes the stream
/// — the body then goes upstream — or answers in its place, and the body never leaves. The
/// plugin dispatches at the body's end to the target its configuration names; an answer
/// of status 2xx resumes, another (the 503 of a call that cannot connect) answers 403. A
/// call-out dispatched in `proxy_on_log` goes out as well.
#[test]
fn body_callbacks_wait_for_their_call_outs() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let auth = TestUpstream::start("auth");
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "auth"),
    ]);
    let call_2000 = dispatch(len, 2000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $cont (param i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_header_map_value" (func $hget (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 600) "denied")
      (data (i32.const 700) ":status")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
      (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
        (if (local.get 2)
          (then (drop {call_2000})))
        (i32.const 1))
      ;; a call-out from the log phase goes out too (its answer comes to the root context)
      (func (export "proxy_on_log") (param i32)
        (drop {call_2000}))
      ;; the answer's `:status` read into 720/724 (at 720, "denied" until it is read)
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (i32.store (i32.const 720) (i32.const 600))
        (drop (call $hget (i32.const 6) (i32.const 700) (i32.const 7) (i32.const 720) (i32.const 724)))
        (if (i32.eq (i32.load8_u (i32.load (i32.const 720))) (i32.const 50))
          (then (drop (call $cont (i32.const 0))))
          (else (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 600)
                                   (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 0)))))))"#
    );
    wat_plugin_on_route(&gw, "body_check", &wat, "/unused");
    let conf = |target: String| json!({"conf": target});
    gw.route(
        "allow",
        json!({"uri": "/allow", "plugins": {"body_check": conf(auth.addr())}}),
        Some(&app),
    );
    gw.route(
        "deny",
        json!({"uri": "/deny", "plugins": {"body_check": conf("127.0.0.1:1".into())}}),
        Some(&app),
    );
    let hits = app.hits();
    let r = http("POST", &gw.url("/deny"), &[], Some(b"evil payload"));
    assert_eq!((r.status, r.text().as_str()), (403, "denied"));
    // A local reply's body with no type of the plugin's is text, as Envoy says.
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(app.hits(), hits, "the held body never reached the upstream");
    let r = http("POST", &gw.url("/allow"), &[], Some(b"good payload"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 12);
    // The body's call, then the log phase's.
    common::eventually(Duration::from_secs(5), "the log phase's call-out", || {
        auth.hits() == 2
    });
    assert!(!gw.error_log().contains("panicked"));
}

/// A request paused on a call-out whose client gives up before the answer: the answer still
/// comes, to the root context, once it is there (Envoy's calls belong to the root context);
/// a dropped answer would leave the SDK's callback for it behind forever. The abandoned
/// request's `proxy_on_log` still reads its headers: the stream it left with the instance
/// while it waited comes back to it.
#[test]
fn an_abandoned_requests_call_out_still_answers() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/delay/400/abandoned"),
        (":authority", "app"),
    ]);
    let call_5000 = dispatch(len, 5000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 600) "the abandoned request's call answered")
      (data (i32.const 700) ":path")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop {call_5000})
        (i32.const 1))
      (func (export "proxy_on_log") (param i32)
        (if (i32.eqz (call $get (i32.const 0) (i32.const 700) (i32.const 5) (i32.const 800) (i32.const 804)))
          (then (drop (call $log (i32.const 2) (i32.load (i32.const 800)) (i32.load (i32.const 804)))))))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (if (i32.gt_u (local.get 2) (i32.const 0))
          (then (drop (call $log (i32.const 2) (i32.const 600) (i32.const 37)))))))"#
    );
    wat_plugin_on_route(&gw, "abandon", &wat, "/unused");
    gw.route(
        "abandon",
        json!({"uri": "/abandon", "plugins": {"abandon": {"conf": app.addr()}}}),
        Some(&app),
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /abandon HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the abandoned request's answer",
        || {
            gw.error_log()
                .contains("the abandoned request's call answered")
        },
    );
    assert!(
        gw.error_log().contains("abandon: /abandon"),
        "{}",
        gw.error_log()
    );
    assert!(!gw.error_log().contains("panicked"));
}

/// `proxy_continue_stream` resumes the stream it names, as Envoy continues decoding or
/// encoding: a paused request is not resumed by resuming the response (1) or the downstream
/// connection (2, Ok with nothing done); the upstream connection (3) is Unimplemented. The
/// request here, still paused after the first answer, waits for a second call-out whose
/// answer resumes it.
#[test]
fn continue_stream_resumes_the_stream_it_names() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let (escaped, len) = wat_map(&[(":method", "GET"), (":path", "/x"), (":authority", "app")]);
    let call_5000 = dispatch(len, 5000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 600) "x-continue-rc")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      (global $answers (mut i32) (i32.const 0))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $answers (i32.const 0))
        (drop {call_5000})
        (i32.const 1))
      ;; first answer: the three statuses as '0' + status each, and a second call; second
      ;; answer: them on the request, which it resumes
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (global.set $answers (i32.add (global.get $answers) (i32.const 1)))
        (if (i32.eq (global.get $answers) (i32.const 1))
          (then
            (i32.store8 (i32.const 640) (i32.add (i32.const 48) (call $continue (i32.const 1))))
            (i32.store8 (i32.const 641) (i32.add (i32.const 48) (call $continue (i32.const 2))))
            (i32.store8 (i32.const 642) (i32.add (i32.const 48) (call $continue (i32.const 3))))
            (drop {call_5000}))
          (else
            (drop (call $add (i32.const 0) (i32.const 600) (i32.const 13) (i32.const 640) (i32.const 3)))
            (drop (call $continue (i32.const 0)))))))"#
    );
    wat_plugin_on_route(&gw, "wrong_stream", &wat, "/unused");
    gw.route(
        "wrong_stream",
        json!({"uri": "/wrong", "plugins": {"wrong_stream": {"conf": app.addr()}}}),
        Some(&app),
    );
    let r = get(&gw, "/wrong");
    assert_eq!(r.status, 200, "{}", r.text());
    // Resumed by the first answer, the request would have gone without the header.
    assert_eq!(r.json()["headers"]["x-continue-rc"], "00<", "{}", r.text());
}

/// A call-out whose request did not wait for it is still answered once the request is over,
/// on the root context (Envoy makes every call on the root): the Rust and Go SDKs keep a
/// callback per token until then. Here the answer sets a shared-data key that the next
/// requests show.
#[test]
fn call_outs_of_finished_requests_still_answer_the_root() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/delay/300/late"),
        (":authority", "app"),
    ]);
    let call_5000 = dispatch(len, 5000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 600) "late-answer")
      (data (i32.const 620) "x-late-answer")
      (data (i32.const 640) "yes")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      ;; shows whether an earlier call's answer came, then calls and lets the request go on
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (if (i32.eqz (call $get (i32.const 600) (i32.const 11) (i32.const 210) (i32.const 214) (i32.const 218)))
          (then (drop (call $add (i32.const 0) (i32.const 620) (i32.const 13) (i32.const 640) (i32.const 3)))))
        (drop {call_5000})
        (i32.const 0))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (if (i32.gt_u (local.get 2) (i32.const 0))
          (then (drop (call $set (i32.const 600) (i32.const 11) (i32.const 640) (i32.const 3) (i32.const 0)))))))"#
    );
    wat_plugin_on_route(&gw, "late", &wat, "/unused");
    gw.route(
        "late",
        json!({"uri": "/late", "plugins": {"late": {"conf": app.addr()}}}),
        Some(&app),
    );
    let r = get(&gw, "/late");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["headers"]["x-late-answer"].is_null(),
        "{}",
        r.text()
    );
    common::eventually(Duration::from_secs(5), "the late answer", || {
        get(&gw, "/late").json()["headers"]["x-late-answer"] == "yes"
    });
    assert!(!gw.error_log().contains("panicked"));
}

/// `proxy_on_request_trailers` runs once the body is through, with the request's trailers as
/// map type 1; a plugin with no body callback of its own still gets it. Here the plugin
/// answers with the value of the trailer it read.
#[test]
fn trailers_reach_the_trailers_callback() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-t")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
        (if (i32.eqz (call $ghv (i32.const 1) (i32.const 100) (i32.const 3) (i32.const 200) (i32.const 204)))
          (then (drop (call $reply (i32.const 200) (i32.const 0) (i32.const 0)
                                   (i32.load (i32.const 200)) (i32.load (i32.const 204))
                                   (i32.const 0) (i32.const 0) (i32.const 0)))))
        (i32.const 0)))"#
    );
    wat_plugin_on_route(&gw, "trailers", &wat, "/unused");
    gw.route(
        "t",
        json!({"uri": "/t", "plugins": {"trailers": {"conf": "-"}}}),
        Some(&app),
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-t: from-trailer\r\n\r\n",
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let resp = common::client::read_response(&mut r, false).unwrap();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "from-trailer"),
        "{}",
        gw.error_log()
    );
    // Without trailers the request goes through as usual.
    let resp = http("POST", &gw.url("/t"), &[], Some(b"plain"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["body_len"], 5);
    let chunked = |path: &str, trailer: &str, body: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        let chunk = match body.len() {
            0 => String::new(),
            n => format!("{n:x}\r\n{body}\r\n"),
        };
        s.write_all(format!("{head}{chunk}0\r\n{trailer}\r\n\r\n").as_bytes())
            .unwrap();
        common::client::read_response(&mut std::io::BufReader::new(s), false).unwrap()
    };
    // An empty body with trailers the plugin lets pass stays chunked (a length of 0 would
    // drop the trailers).
    let resp = chunked("/t", "x-other: 1", "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["headers"]["transfer-encoding"], "chunked");
    // With the whole body held by another plugin, the trailers' callback runs before the
    // upstream is contacted: its answer comes first and nothing is sent.
    gw.route(
        "held",
        json!({"uri": "/held", "plugins": {"trailers": {"conf": "-"}, "body_rewrite": {"conf": "{}"}}}),
        Some(&app),
    );
    let hits = app.hits();
    let resp = chunked("/held", "x-t: early", "hello");
    assert_eq!((resp.status, resp.text().as_str()), (200, "early"));
    assert_eq!(app.hits(), hits, "the upstream was contacted");
}

/// A plugin's local reply carries the details it gave, blanks made `_` as Envoy does: a
/// logging plugin reads them as `response.code_details` in its log phase, next to no flags.
#[test]
fn a_local_reply_gives_its_details_to_the_log_phase() {
    let gw = Gateway::start();
    // Its headers: one HTTP cannot carry (left out, and said), one it can.
    let (escaped, len) = wat_map(&[("bad name", "v"), ("x-ok", "1")]);
    let wat = format!(
        r#"(module
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "denied by\tpolicy")
      (data (i32.const 300) "{escaped}")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $reply (i32.const 403) (i32.const 100) (i32.const 16) (i32.const 0) (i32.const 0)
                           (i32.const 300) (i32.const {len}) (i32.const -1)))
        (i32.const 1)))"#
    );
    wat_plugin_on_route(&gw, "denier", &wat, "/unused");
    gw.route(
        "deny",
        json!({"uri": "/deny", "plugins": {"denier": {"conf": "-"}, "rec_a": {"conf": "denied"}}}),
        None,
    );
    let r = get(&gw, "/deny");
    assert_eq!((r.status, r.header("x-ok")), (403, Some("1")));
    assert!(
        gw.error_log()
            .contains("a plugin's local reply: field \"bad name\" left out: not a valid name"),
        "{}",
        gw.error_log()
    );
    let prefix = "recorder denied: attributes ";
    eventually(Duration::from_secs(5), "the log phase", || {
        !common::log_lines(&gw.error_log(), prefix).is_empty()
    });
    let log = gw.error_log();
    let line = common::log_lines(&log, prefix)[0];
    assert!(
        line.contains(" response.code_details=denied_by_policy"),
        "{line}"
    );
    assert!(line.contains(" response.flags=0 "), "{line}");
    assert!(line.contains(" response.code=403 "), "{line}");
}

/// A plugin's call-outs in flight hold no more bytes of requests than its `memory_limit`:
/// past it a call fails at once with InternalFailure (Envoy's circuit breaker fails a call over
/// its limits too), said in the error log (at most every 10 s), and the room comes back when
/// calls end. The
/// plugin answers `200 + 10 × first call's status + second's`: each request dispatches two
/// calls of 1.2 MB to a peer that never answers, under a 2 MB budget.
#[test]
fn call_outs_in_flight_have_a_budget() {
    // One worker: the budget is a worker's.
    let gw = Gateway::start_with(common::Setup {
        workers: 1,
        ..Default::default()
    });
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (escaped, len) = wat_map(&[
        (":method", "POST"),
        (":path", "/big"),
        (":authority", "peer"),
    ]);
    let call = format!(
        "(call $call (global.get $tptr) (global.get $tlen) (i32.const 300) (i32.const {len})
                     (i32.const 65536) (i32.const 1200000) (i32.const 0) (i32.const 0)
                     (i32.const 400) (i32.const 208))"
    );
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 20)
      (data (i32.const 300) "{escaped}")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $first i32)
        (local.set $first {call})
        (drop (call $reply
          (i32.add (i32.const 200) (i32.add (i32.mul (local.get $first) (i32.const 10)) {call}))
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.const -1)))
        (i32.const 1))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)))"#
    );
    wat_plugin_with(&gw, "budget", &wat, "/unused", ", memory_limit: 2m");
    gw.route(
        "budget",
        json!({"uri": "/budget", "plugins": {"budget": {"conf": silent.local_addr().unwrap().to_string()}}}),
        None,
    );
    // The first call goes (0), the second is over the budget (InternalFailure, 10).
    assert_eq!(get(&gw, "/budget").status, 210);
    common::eventually(Duration::from_secs(5), "the refusal's line", || {
        gw.error_log().contains("budget: 1 call-outs refused")
    });
    // Once the calls time out (0.4 s), their room is back: the first call goes again.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(get(&gw, "/budget").status, 210);
    drop(silent);
}

/// A table is host memory too: one grown past its limit is the instance's fault (503), not
/// memory taken from the worker without end.
#[test]
fn a_table_grown_past_its_limit_is_a_fault() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = r#"(module
      (memory (export "memory") 1)
      (table $t 1 funcref)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (table.grow $t (ref.null func) (i32.const 2000000)))
        (i32.const 0)))"#;
    wat_plugin_on_route(&gw, "tables", wat, "/unused");
    gw.route(
        "tables",
        json!({"uri": "/tables", "plugins": {"tables": {"conf": "-"}}}),
        Some(&app),
    );
    assert_eq!(get(&gw, "/tables").status, 503);
    common::eventually(Duration::from_secs(5), "the fault's line", || {
        gw.error_log()
            .contains("tables: trap: a table grew past its limit of 1048576 elements")
    });
}

/// A fault names the callback it happened in: `proxy_on_done` and `proxy_on_delete` are not
/// `proxy_on_log`.
#[test]
fn a_fault_names_its_callback() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = r#"(module
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_done") (param i32) (result i32)
        (loop $l (br $l))
        (i32.const 1)))"#;
    wat_plugin_with(
        &gw,
        "stuck_done",
        wat,
        "/unused",
        ", callback_timeout: 100ms",
    );
    gw.route(
        "done",
        json!({"uri": "/done", "plugins": {"stuck_done": {"conf": "-"}}}),
        Some(&app),
    );
    assert_eq!(get(&gw, "/done").status, 200);
    common::eventually(Duration::from_secs(5), "the fault's line", || {
        gw.error_log()
            .contains("stuck_done: callback exceeded its time limit in proxy_on_done")
    });
}

/// The upstream's trailers stay readable in the log phase (map type 3 and the
/// `response.trailers.<name>` property), as Envoy keeps them for its access log, and still
/// reach the client.
#[test]
fn response_trailers_are_read_in_the_log_phase() {
    let gw = Gateway::start();
    // An upstream that answers chunked, with a trailer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match std::io::Read::read(&mut conn, &mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-trl\r\n\
                  Connection: close\r\n\r\n2\r\nok\r\n0\r\nx-trl: kept\r\n\r\n",
            );
        }
    });
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-trl")
      (data (i32.const 120) "response\00trailers\00x-trl")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) (i32.const 0))
      (func (export "proxy_on_log") (param i32)
        (if (i32.eqz (call $ghv (i32.const 3) (i32.const 100) (i32.const 5) (i32.const 200) (i32.const 204)))
          (then (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
        (if (i32.eqz (call $prop (i32.const 120) (i32.const 23) (i32.const 200) (i32.const 204)))
          (then (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))))))"#
    );
    wat_plugin_on_route(&gw, "trailer_log", &wat, "/unused");
    gw.route(
        "trl",
        json!({"uri": "/trl", "plugins": {"trailer_log": {"conf": "-"}},
               "upstream": {"type": "roundrobin", "nodes": {node: 1}}}),
        None,
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /trl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.contains("x-trl: kept"),
        "the trailer reaches the client: {got}"
    );
    eventually(
        Duration::from_secs(5),
        "both reads in the log phase",
        || gw.error_log().matches("trailer_log: kept").count() == 2,
    );
}

/// `proxy_close_stream` resets the HTTP stream, as Envoy does: closed in the request phase, the
/// upstream is never contacted and the client gets no answer, only the connection's close; in
/// the response phase, the upstream's answer is dropped the same way. The access log shows
/// nginx's 444. The connection types (downstream, upstream) are a network filter's: Ok with
/// nothing done for an HTTP plugin, as Envoy answers; an unknown type is a BadArgument.
#[test]
fn close_stream_resets_the_request() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = r#"(module
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $ahv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-reset-request")
      (data (i32.const 120) "x-reset-response")
      (data (i32.const 140) "x-close-args")
      (global $later (mut i32) (i32.const 0))
      (global $args (mut i32) (i32.const 0))
      (func (export "malloc") (param i32) (result i32) (i32.const 4096))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; two digits: the status of closing the downstream connection, then of type 9
        (global.set $args (i32.add (i32.mul (call $close (i32.const 2)) (i32.const 10))
                                   (call $close (i32.const 9))))
        (global.set $later (i32.eqz
          (call $ghv (i32.const 0) (i32.const 120) (i32.const 16) (i32.const 200) (i32.const 204))))
        (if (i32.eqz (call $ghv (i32.const 0) (i32.const 100) (i32.const 15) (i32.const 200) (i32.const 204)))
          (then (drop (call $close (i32.const 0)))))
        (i32.const 0))
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
        (i32.store8 (i32.const 160) (i32.add (i32.const 48) (i32.div_u (global.get $args) (i32.const 10))))
        (i32.store8 (i32.const 161) (i32.add (i32.const 48) (i32.rem_u (global.get $args) (i32.const 10))))
        (drop (call $ahv (i32.const 2) (i32.const 140) (i32.const 12) (i32.const 160) (i32.const 2)))
        (if (global.get $later) (then (drop (call $close (i32.const 1)))))
        (i32.const 0)))"#;
    wat_plugin_on_route(&gw, "closer", wat, "/unused");
    gw.route(
        "closer",
        json!({"uri": "/close", "plugins": {"closer": {"conf": "-"}, "rec_a": {"conf": "closed"}}}),
        Some(&app),
    );
    // What a client gets: every byte until the gateway closes.
    let raw = |header: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET /close HTTP/1.1\r\nHost: x\r\n{header}\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let read = std::io::Read::read_to_end(&mut s, &mut got);
        assert!(
            read.is_ok()
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the connection was not closed: {read:?}"
        );
        String::from_utf8_lossy(&got).into_owned()
    };
    let r = http("GET", &gw.url("/close"), &[], None);
    assert_eq!(r.status, 200, "{}", gw.error_log());
    assert_eq!(r.header("x-close-args"), Some("02"));
    assert_eq!(app.hits(), 1);
    assert_eq!(raw("x-reset-request: 1\r\n"), "");
    assert_eq!(app.hits(), 1, "a reset request reached the upstream");
    assert_eq!(raw("x-reset-response: 1\r\n"), "");
    assert_eq!(app.hits(), 2);
    // The log phase ran for both, with no answer to read: not the upstream's, dropped (the
    // first request's line has its 200).
    eventually(Duration::from_secs(5), "the recorder's log phase", || {
        let log = gw.error_log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("recorder closed: attributes "))
            .collect();
        lines.len() == 3
            && lines
                .iter()
                .filter(|l| {
                    l.contains(" response.code=<none> ") && l.contains(" response.total_size=0 ")
                })
                .count()
                == 2
    });
    // The gateway goes on serving, and logged both with 444.
    assert_eq!(get(&gw, "/close").status, 200);
    eventually(Duration::from_secs(5), "444 in the access log", || {
        let log = std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /close HTTP/1.1\" 444 "))
            .count()
            == 2
    });
}

/// WASI as toolchains use it, answered without blocking the worker (wasmtime-wasi's own
/// functions for streams would start a tokio runtime inside the worker's and panic):
/// stdout and stderr go to the error log a line at a time, stdin is empty, the standard
/// descriptors are character devices, there are no files, `poll_oneoff` sleeps. A panic in a
/// host function would be the instance's fault, never the worker's.
#[test]
fn wasi_output_goes_to_the_log_and_nothing_blocks() {
    let gw = Gateway::start();
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (import "wasi_unstable" "fd_write" (func $write0 (param i32 i32 i32 i32) (result i32)))
      (import "wasi_unstable" "poll_oneoff" (func $poll0 (param i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_get_header_map_value" (func $ghv (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 20)
      (data (i32.const 100) "hello from stdout\nhalf a ")
      (data (i32.const 130) "line\n")
      (data (i32.const 140) "panic: on stderr\nunfinished")
      (data (i32.const 180) "etc/passwd")
      (data (i32.const 190) "x-flood")
      ;; the same sleep as wasi_unstable lays it out: userdata 9, an identifier (5: not a
      ;; clock, were it read as preview1's clock id), the monotonic clock, 2 ms
      (data (i32.const 700) "\09\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\05\00\00\00\00\00\00\00\01\00\00\00\00\00\00\00\80\84\1e\00\00\00\00\00")
      ;; written by the module's start function, which runs as the instance is made
      (data (i32.const 900) "from start\n")
      (data (i32.const 920) "\84\03\00\00\0b\00\00\00")
      (func $at_start (drop (call $write (i32.const 1) (i32.const 920) (i32.const 1) (i32.const 940))))
      (start $at_start)
      ;; iovecs at 200: [100, 25]; at 208: [130, 5]; at 216: [140, 27]
      (data (i32.const 200) "\64\00\00\00\19\00\00\00\82\00\00\00\05\00\00\00\8c\00\00\00\1b\00\00\00")
      ;; a clock subscription at 300: userdata 7, tag 0, monotonic clock, 3 ms, relative
      (data (i32.const 300) "\07\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\01\00\00\00\00\00\00\00\c0\c6\2d\00\00\00\00\00")
      (global $bits (mut i32) (i32.const 0))
      ;; 1 MiB of empty lines in one write: 64 KiB of it taken (the rest is for further calls),
      ;; at once (the lines past the log budget are dropped): answers 201 then.
      (func $flood (result i32)
        (memory.fill (i32.const 0x10000) (i32.const 10) (i32.const 0x100000))
        (i32.store (i32.const 240) (i32.const 0x10000))
        (i32.store (i32.const 244) (i32.const 0x100000))
        (drop (call $reply
          (i32.add (i32.const 200)
            (i32.and (i32.eqz (call $write (i32.const 1) (i32.const 240) (i32.const 1) (i32.const 404)))
                     (i32.eq (i32.load (i32.const 404)) (i32.const 65536))))
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1))
      (func $bit (param $ok i32) (param $b i32)
        (if (local.get $ok)
          (then (global.set $bits (i32.or (global.get $bits) (i32.shl (i32.const 1) (local.get $b)))))))
      (func (export "malloc") (param i32) (result i32) (i32.const 4096))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "_initialize")
        ;; as Go's runtime starts: the standard descriptors checked
        (drop (call $fdstat (i32.const 1) (i32.const 500))))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $bits (i32.const 0))
        (if (i32.eqz (call $ghv (i32.const 0) (i32.const 190) (i32.const 7) (i32.const 400) (i32.const 404)))
          (then (return (call $flood))))
        ;; stdout: one line and half of the next, then its end; the count written is 30
        (call $bit (i32.eqz (call $write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 400))) (i32.const 0))
        (call $bit (i32.eqz (call $write (i32.const 1) (i32.const 208) (i32.const 1) (i32.const 404))) (i32.const 1))
        (call $bit (i32.eq (i32.add (i32.load (i32.const 400)) (i32.load (i32.const 404))) (i32.const 30)) (i32.const 2))
        ;; stderr through the older module name; an unfinished line, logged at the callback's end
        (call $bit (i32.eqz (call $write0 (i32.const 2) (i32.const 216) (i32.const 1) (i32.const 400))) (i32.const 3))
        ;; stdin: at its end
        (i32.store (i32.const 400) (i32.const 99))
        (call $bit (i32.and (i32.eqz (call $read (i32.const 0) (i32.const 200) (i32.const 1) (i32.const 400)))
                            (i32.eqz (i32.load (i32.const 400)))) (i32.const 4))
        ;; a character device (filetype 2); no descriptor 3
        (call $bit (i32.and (i32.eqz (call $fdstat (i32.const 2) (i32.const 500)))
                            (i32.eq (i32.load8_u (i32.const 500)) (i32.const 2))) (i32.const 5))
        ;; no files: EBADF
        (call $bit (i32.and (i32.eq (call $fdstat (i32.const 3) (i32.const 500)) (i32.const 8))
                            (i32.eq (call $open (i32.const 3) (i32.const 0) (i32.const 180) (i32.const 10) (i32.const 0)
                                                (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 400))
                                    (i32.const 8))) (i32.const 6))
        ;; a 3 ms sleep: one event, the clock's; and a 2 ms one under wasi_unstable
        (call $bit (i32.and (i32.and (i32.eqz (call $poll (i32.const 300) (i32.const 600) (i32.const 1) (i32.const 400)))
                                     (i32.and (i32.eq (i32.load (i32.const 400)) (i32.const 1))
                                              (i32.eq (i32.load (i32.const 600)) (i32.const 7))))
                            (i32.and (i32.eqz (call $poll0 (i32.const 700) (i32.const 800) (i32.const 1) (i32.const 400)))
                                     (i32.and (i32.eq (i32.load (i32.const 400)) (i32.const 1))
                                              (i32.eq (i32.load (i32.const 800)) (i32.const 9))))) (i32.const 7))
(drop (call $reply (i32.add (i32.const 200) (global.get $bits))
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#;
    wat_plugin_on_route(&gw, "wasi_io", wat, "/wasi");
    let started = Instant::now();
    let r = get(&gw, "/wasi");
    assert_eq!(r.status, 200 + 0b1111_1111, "{}", gw.error_log());
    assert!(started.elapsed() >= Duration::from_millis(5));
    eventually(
        Duration::from_secs(5),
        "the plugin's output in the log",
        || {
            let log = gw.error_log();
            let line = |level: &str, text: &str| {
                log.lines()
                    .any(|l| l.contains(level) && l.ends_with(&format!("wasi_io: {text}")))
            };
            line("[info]", "from start")
                && line("[info]", "hello from stdout")
                && line("[info]", "half a line")
                && line("[error]", "panic: on stderr")
                && line("[error]", "unfinished")
        },
    );
    let r = http("GET", &gw.url("/wasi"), &[("x-flood", "1")], None);
    assert_eq!(r.status, 201, "{}", gw.error_log());
    let faults = gw.plugin_faults();
    assert_eq!(faults, 0);
}

/// A reload compiles a plugin file again only when its bytes changed: the same file is
/// reused (and logged so), a file rewritten in place is compiled and served anew.
#[test]
fn reloads_compile_only_changed_plugins() {
    let gw = Gateway::start();
    let answering = |status: u16| {
        format!(
            r#"(module
              (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (func (export "malloc") (param i32) (result i32) (i32.const 4096))
              (func (export "proxy_abi_version_0_2_1"))
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                (drop (call $reply (i32.const {status}) (i32.const 0) (i32.const 0) (i32.const 0)
                                   (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
                (i32.const 1)))"#
        )
    };
    wat_plugin_on_route(&gw, "versioned", &answering(201), "/versioned");
    assert_eq!(get(&gw, "/versioned").status, 201);
    let reload = || {
        let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
        assert_eq!(s, 200, "{v}");
    };
    reload();
    assert!(
        gw.error_log()
            .contains("wasm plugin \"versioned\": unchanged, its compiled code reused"),
        "{}",
        gw.error_log()
    );
    assert_eq!(get(&gw, "/versioned").status, 201);
    std::fs::write(
        gw.prefix().join("versioned.wasm"),
        wat::parse_str(answering(202)).unwrap(),
    )
    .unwrap();
    reload();
    // The old workers stop accepting as their drain signal lands, a moment after the reload
    // answers: a connection made in between may still reach one (as with nginx).
    eventually(Duration::from_secs(5), "the new plugin serving", || {
        get(&gw, "/versioned").status == 202
    });
}

/// A root context whose `proxy_on_done` returns false lives on until it calls `proxy_done`,
/// as in Envoy: here it flushes through a call-out when its route goes away and when its
/// worker exits on a reload, and is deleted only once the answer came and it said so.
#[test]
fn a_root_context_finishes_its_work_before_it_is_deleted() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let flush = TestUpstream::start("flush");
    let (escaped, len) = wat_map(&[
        (":method", "GET"),
        (":path", "/flush"),
        (":authority", "flush"),
    ]);
    let call = dispatch(len, 5000);
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (import "env" "proxy_done" (func $done (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 300) "{escaped}")
      (data (i32.const 700) "flushing")
      (data (i32.const 720) "flushed")
      (data (i32.const 740) "done ok")
      (data (i32.const 760) "done again: not found")
      (data (i32.const 800) "root deleted")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      ;; which contexts are PluginContexts: a byte each at 2000 + id
      (func $is_root (param $id i32) (result i32)
        (if (result i32) (i32.and (i32.ne (local.get $id) (i32.const 1)) (i32.lt_u (local.get $id) (i32.const 4000)))
          (then (i32.load8_u (i32.add (i32.const 2000) (local.get $id))))
          (else (i32.const 0))))
      (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
        (if (i32.and (i32.eqz (local.get $parent)) (i32.lt_u (local.get $id) (i32.const 4000)))
          (then (i32.store8 (i32.add (i32.const 2000) (local.get $id)) (i32.const 1)))))
      {CALL_TARGET_FROM_CONF}
      (func (export "proxy_on_done") (param $id i32) (result i32)
        (if (result i32) (call $is_root (local.get $id))
          (then
            (drop (call $log (i32.const 2) (i32.const 700) (i32.const 8)))
            (drop {call})
            (i32.const 0))
          (else (i32.const 1))))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (drop (call $log (i32.const 2) (i32.const 720) (i32.const 7)))
        (if (i32.eqz (call $done))
          (then (drop (call $log (i32.const 2) (i32.const 740) (i32.const 7)))))
        (if (i32.eq (call $done) (i32.const 1))
          (then (drop (call $log (i32.const 2) (i32.const 760) (i32.const 21))))))
      (func (export "proxy_on_delete") (param $id i32)
        (if (call $is_root (local.get $id))
          (then (drop (call $log (i32.const 2) (i32.const 800) (i32.const 12)))))))"#
    );
    wat_plugin_on_route(&gw, "flusher", &wat, "/unused");
    let route = json!({"uri": "/flushed", "plugins": {"flusher": {"conf": flush.addr()}}});
    gw.route("flusher", route.clone(), Some(&app));
    assert_eq!(get(&gw, "/flushed").status, 200);
    assert_eq!(flush.hits(), 0);
    let lines = |what: &str| {
        gw.error_log()
            .lines()
            .filter(|l| l.contains(&format!("flusher: {what}")))
            .count()
    };
    // The route goes away: its context flushes, then is deleted once it called proxy_done.
    assert_eq!(
        gw.admin("DELETE", "/apisix/admin/routes/flusher", None).0,
        200
    );
    common::eventually(Duration::from_secs(5), "the retired root deleted", || {
        lines("root deleted") == 1
    });
    assert_eq!(flush.hits(), 1);
    assert_eq!(
        (lines("flushing"), lines("flushed"), lines("done ok")),
        (1, 1, 1)
    );
    assert_eq!(lines("done again: not found"), 1);
    // A worker that exits (replaced by a reload) finishes its contexts the same way.
    gw.route("flusher", route, Some(&app));
    assert_eq!(get(&gw, "/flushed").status, 200);
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    common::eventually(
        Duration::from_secs(10),
        "the exiting worker's flush",
        || lines("root deleted") == 2,
    );
    assert_eq!(flush.hits(), 2);
    assert_eq!(lines("done ok"), 2);
    assert!(!gw.error_log().contains("proxy_done in time"));
}

/// A request paused with nothing in flight waits until another callback resumes it, as in
/// Envoy: here the plugin holds each request in `proxy_on_request_headers` and its root
/// context lets it go on its next tick, through `proxy_set_effective_context` — resumed with
/// a header added (conf `r`), answered 429 (conf `d`), or left paused (conf `n`), which
/// `pause_timeout` ends with a 503.
#[test]
fn a_paused_request_is_let_go_from_a_tick() {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "held, then denied")
      (data (i32.const 120) "x-released")
      (data (i32.const 140) "tick")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      ;; an HttpContext's root at 16384 + 4 * id
      (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
        (if (i32.and (i32.ne (local.get $parent) (i32.const 0)) (i32.lt_u (local.get $id) (i32.const 8000)))
          (then (i32.store (i32.add (i32.const 16384) (i32.shl (local.get $id) (i32.const 2))) (local.get $parent)))))
      ;; a root's verdict (the conf's first byte) at 3000 + root; it ticks every 20 ms
      (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
        (drop (call $gbb (i32.const 7) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204)))
        (i32.store8 (i32.add (i32.const 3000) (local.get $root)) (i32.load8_u (i32.load (i32.const 200))))
        (drop (call $tick (i32.const 20)))
        (i32.const 1))
      ;; the request held by its root, at 4000 + 4 * root
      (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
        (i32.store
          (i32.add (i32.const 4000) (i32.shl (i32.load (i32.add (i32.const 16384) (i32.shl (local.get $id) (i32.const 2)))) (i32.const 2)))
          (local.get $id))
        (i32.const 1))
      (func (export "proxy_on_tick") (param $root i32)
        (local $slot i32) (local $held i32) (local $verdict i32)
        (local.set $slot (i32.add (i32.const 4000) (i32.shl (local.get $root) (i32.const 2))))
        (local.set $held (i32.load (local.get $slot)))
        (if (i32.eqz (local.get $held)) (then (return)))
        (i32.store (local.get $slot) (i32.const 0))
        (drop (call $eff (local.get $held)))
        (local.set $verdict (i32.load8_u (i32.add (i32.const 3000) (local.get $root))))
        (if (i32.eq (local.get $verdict) (i32.const 114))
          (then
            (drop (call $add (i32.const 0) (i32.const 120) (i32.const 10) (i32.const 140) (i32.const 4)))
            (drop (call $continue (i32.const 0)))))
        (if (i32.eq (local.get $verdict) (i32.const 100))
          (then (drop (call $reply (i32.const 429) (i32.const 0) (i32.const 0)
                                   (i32.const 100) (i32.const 17) (i32.const 0) (i32.const 0) (i32.const 0)))))))"#
    );
    wat_plugin_with(&gw, "holder", &wat, "/unused", ", pause_timeout: 400ms");
    for (id, conf) in [("resume", "r"), ("deny", "d"), ("never", "n")] {
        gw.route(
            id,
            json!({"uri": format!("/held/{id}"), "plugins": {"holder": {"conf": conf}}}),
            Some(&app),
        );
    }
    for _ in 0..3 {
        let r = get(&gw, "/held/resume");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["server"], "app");
        assert_eq!(r.json()["headers"]["x-released"], "tick", "{}", r.text());
        let r = get(&gw, "/held/deny");
        assert_eq!((r.status, r.text()), (429, "held, then denied".to_string()));
    }
    fails_at_pause_timeout(
        &gw,
        ("GET", "/held/never", None),
        "holder: paused the request in proxy_on_request_headers and did not resume it within 400ms (pause_timeout)",
    );
    assert_eq!(app.hits(), 3);
}

/// Any callback can let a paused request go — `proxy_on_context_create` of the next request
/// here, which runs no stream of its own: the held request's headers are lent to it and the
/// resume reaches the held request, not the last callback's.
#[test]
fn a_paused_request_is_let_go_from_another_contexts_creation() {
    let (gw, app) = one_worker_and_app();
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-hold")
      (data (i32.const 120) "x-let-go")
      (data (i32.const 140) "context_create")
      {BUMP_MALLOC}
      (global $held (mut i32) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      ;; an HttpContext made while one is held lets it go, stamped
      (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
        (local $h i32)
        (local.set $h (global.get $held))
        (if (i32.and (i32.ne (local.get $parent) (i32.const 0)) (i32.ne (local.get $h) (i32.const 0)))
          (then
            (global.set $held (i32.const 0))
            (drop (call $eff (local.get $h)))
            (drop (call $add (i32.const 0) (i32.const 120) (i32.const 8) (i32.const 140) (i32.const 14)))
            (drop (call $continue (i32.const 0))))))
      ;; a request with x-hold is held
      (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
        (if (i32.eqz (call $get (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 200) (i32.const 204)))
          (then (global.set $held (local.get $id)) (return (i32.const 1))))
        (i32.const 0)))"#
    );
    wat_plugin_with(&gw, "creator", &wat, "/unused", ", pause_timeout: 20s");
    gw.route(
        "cc",
        json!({"uri": "/cc", "plugins": {"creator": {"conf": "-"}}}),
        Some(&app),
    );
    let url = gw.url("/cc");
    let held = std::thread::spawn(move || http("GET", &url, &[("x-hold", "1")], None));
    // Held, with its headers callback the instance's last call: then the next request.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&gw, "/cc").status, 200);
    eventually(Duration::from_secs(3), "the held request let go", || {
        held.is_finished()
    });
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["headers"]["x-let-go"],
        "context_create",
        "{}",
        r.text()
    );
}

/// A body paused at its end with nothing in flight waits until another callback resumes it,
/// as Envoy holds a body a filter stopped: here the VM's root context, on its tick, makes the
/// held request's context effective, prepends to its body and resumes it — the upstream gets
/// the changed body. A body never resumed fails at `pause_timeout` with a line that says so.
#[test]
fn a_body_held_at_its_end_is_let_go_from_a_tick() {
    let (gw, app) = one_worker_and_app();
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (import "env" "proxy_set_buffer_bytes" (func $sbb (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "released:")
      {BUMP_MALLOC}
      (global $held (mut i32) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
        (drop (call $tick (i32.const 20)))
        (i32.const 1))
      ;; buffered to its end, then held; a body starting with 'n' is never let go
      (func (export "proxy_on_request_body") (param $id i32) (param $size i32) (param $eos i32) (result i32)
        (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
        (drop (call $gbb (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 200) (i32.const 204)))
        (if (i32.ne (i32.load8_u (i32.load (i32.const 200))) (i32.const 110))
          (then (global.set $held (local.get $id))))
        (i32.const 1))
      (func (export "proxy_on_tick") (param i32)
        (local $h i32)
        (local.set $h (global.get $held))
        (if (i32.eqz (local.get $h)) (then (return)))
        (global.set $held (i32.const 0))
        (drop (call $eff (local.get $h)))
        (drop (call $sbb (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 9)))
        (drop (call $continue (i32.const 0)))))"#
    );
    wat_plugin_with(&gw, "bodyhold", &wat, "/unused", ", pause_timeout: 400ms");
    gw.route(
        "held",
        json!({"uri": "/bodyhold", "plugins": {"bodyhold": {"conf": "-"}}}),
        Some(&app),
    );
    let r = http("POST", &gw.url("/bodyhold"), &[], Some(b"abc"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 12, "{}", r.text());
    fails_at_pause_timeout(
        &gw,
        ("POST", "/bodyhold", Some(b"never")),
        "bodyhold: paused the body in proxy_on_request_body and did not resume it within 400ms (pause_timeout)",
    );
    assert_eq!(app.hits(), 1);
}

/// A request paused with nothing in flight outlives the instance it waits in: when another
/// request's fault discards that instance, the held request takes its stream back and fails as
/// the instance's requests do — with `fail_open`, it goes on to its upstream with the headers
/// the plugin set before pausing, long before its `pause_timeout`.
#[test]
fn a_paused_request_survives_the_fault_that_discards_its_instance() {
    let (gw, app) = one_worker_and_app();
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-held")
      (data (i32.const 120) "yes")
      {BUMP_MALLOC}
      (func (export "proxy_abi_version_0_2_1"))
      {VERDICT_BY_ROOT}
      ;; 'h': marked and held; 't': traps
      (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
        (if (i32.eq (call $verdict) (i32.const 116)) (then unreachable))
        (drop (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 120) (i32.const 3)))
        (i32.const 1)))"#
    );
    wat_plugin_with(
        &gw,
        "fragile",
        &wat,
        "/unused",
        ", fail_open: true, pause_timeout: 20s",
    );
    for (id, conf) in [("held", "h"), ("trap", "t")] {
        gw.route(
            id,
            json!({"uri": format!("/fragile/{id}"), "plugins": {"fragile": {"conf": conf}}}),
            Some(&app),
        );
    }
    let started = Instant::now();
    let url = gw.url("/fragile/held");
    let held = std::thread::spawn(move || http("GET", &url, &[], None));
    // A fault before the held request is parked leaves it in the next instance: again.
    eventually(
        Duration::from_secs(10),
        "the held request let go by a fault",
        || {
            assert_eq!(get(&gw, "/fragile/trap").status, 200);
            held.is_finished()
        },
    );
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-held"], "yes", "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(gw.error_log().contains("instance discarded"));
    assert!(!gw.error_log().contains("lost in a plugin"));
}

/// What a callback can do for another request it made effective, here from another request's
/// headers callback: change the held request's headers (its paused stream is left with the
/// VM) and resume it, as in Envoy, without touching its own request; setting its own context
/// back gives it its own stream again. Paused headers hold the whole message, its body too,
/// as Envoy holds it: the held request is a POST, and its body waits with it (it used to go
/// on to the body callback, and so upstream, at once); so do paused response headers.
#[test]
fn another_requests_context_is_changed_and_resumed_through_its_paused_stream() {
    let (gw, app) = one_worker_and_app();
    let wat = format!(
        r#"(module
      (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
      (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
      (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "x-foreign")
      (data (i32.const 120) "yes")
      (data (i32.const 140) "x-rc")
      {BUMP_MALLOC}
      (global $held (mut i32) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      {VERDICT_BY_ROOT}
      (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
        (local $verdict i32)
        (local.set $verdict (call $verdict))
        ;; 'h': held until another request lets it go
        (if (i32.eq (local.get $verdict) (i32.const 104))
          (then (global.set $held (local.get $id)) (return (i32.const 1))))
        ;; 'x': writes a header on the held one, lets it go, and says how the write went
        (if (i32.eq (local.get $verdict) (i32.const 120))
          (then
            (drop (call $eff (global.get $held)))
            (i32.store8 (i32.const 160)
              (i32.add (i32.const 48) (call $add (i32.const 0) (i32.const 100) (i32.const 9) (i32.const 120) (i32.const 3))))
            (drop (call $continue (i32.const 0)))
            (drop (call $eff (local.get $id)))
            (drop (call $add (i32.const 0) (i32.const 140) (i32.const 4) (i32.const 160) (i32.const 1)))))
        (i32.const 0))
      ;; 'p': pauses the response headers, nothing in flight
      (func (export "proxy_on_response_headers") (param $id i32) (param i32 i32) (result i32)
        (i32.eq (call $verdict) (i32.const 112))))"#
    );
    wat_plugin_with(&gw, "peer", &wat, "/unused", ", pause_timeout: 5s");
    for (id, conf) in [("held", "h"), ("other", "x"), ("answer", "p")] {
        gw.route(
            id,
            json!({"uri": format!("/peer/{id}"), "plugins": {"peer": {"conf": conf}}}),
            Some(&app),
        );
    }
    let url = gw.url("/peer/held");
    let held = std::thread::spawn(move || http("POST", &url, &[], Some(b"held body")));
    // Until the held request is parked, the other one finds no context to let go (its
    // effective context stays its own, and the write lands on itself): it is sent again.
    eventually(Duration::from_secs(5), "the held request let go", || {
        let r = get(&gw, "/peer/other");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["headers"]["x-rc"], "0", "{}", r.text());
        r.json()["headers"]["x-foreign"].is_null()
    });
    // The write went to the held request, and reached its upstream.
    let held = held.join().unwrap();
    assert_eq!(held.status, 200, "{}", held.text());
    assert_eq!(
        held.json()["headers"]["x-foreign"],
        "yes",
        "{}",
        held.text()
    );
    assert_eq!(held.json()["body_len"], 9, "{}", held.text());
    // Response headers paused with nothing in flight and no one to resume them: held, body
    // and all, until the pause_timeout (5 s) fails the request.
    let started = Instant::now();
    let r = get(&gw, "/peer/answer");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        gw.error_log().contains("proxy_on_response_headers"),
        "{}",
        gw.error_log()
    );
}

/// `proxy_get_status` answers as Envoy does without a gRPC call: Ok, code 0, no message (the
/// Rust SDK's `get_grpc_status` panics on any other status).
#[test]
fn get_status_answers_ok_with_code_zero() {
    let (gw, _app) = one_worker_and_app();
    let wat = r#"(module
      (import "env" "proxy_get_status" (func $status (param i32 i32 i32) (result i32)))
      (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (i32.store (i32.const 400) (i32.const 7))
        (i32.store (i32.const 408) (i32.const 7))
        (i32.store8 (i32.const 500) (i32.add (i32.const 48) (call $status (i32.const 400) (i32.const 404) (i32.const 408))))
        (i32.store8 (i32.const 501) (i32.add (i32.const 48) (i32.load (i32.const 400))))
        (i32.store8 (i32.const 502) (i32.add (i32.const 48) (i32.load (i32.const 408))))
        (drop (call $reply (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 3)
                           (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1)))"#;
    wat_plugin_on_route(&gw, "status", wat, "/status");
    let r = get(&gw, "/status");
    assert_eq!((r.status, r.text().as_str()), (200, "000"));
}

/// A client that leaves while a plugin holds its POST (headers paused, the body unread, as
/// Envoy holds the whole message) is seen at once: logged 499 with "client prematurely
/// closed connection", not held until pause_timeout and answered 503 to no one.
#[test]
fn a_held_post_whose_client_leaves_is_a_499() {
    let (gw, app) = one_worker_and_app();
    let wat = r#"(module
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (i32.const 1)))"#;
    wat_plugin_with(&gw, "holder", wat, "/unused", ", pause_timeout: 20s");
    gw.route(
        "held",
        json!({"uri": "/held", "plugins": {"holder": {"conf": "-"}}}),
        Some(&app),
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.write_all(b"POST /held HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let left = Instant::now();
    drop(s);
    eventually(Duration::from_secs(5), "the 499 in the access log", || {
        let log = std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("\"POST /held HTTP/1.1\" 499 "))
    });
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "{:?}",
        left.elapsed()
    );
    assert!(gw
        .error_log()
        .contains("client prematurely closed connection"));
    assert_eq!(app.hits(), 0, "the held body never went upstream");
}
