//! The proxy through a running gateway, as an HTTP client sees it: route matching, load
//! balancing, retries and timeouts, headers crossing the proxy, bodies in both directions,
//! upstream keep-alive and services.

mod common;

use common::{eventually, free_port, http, Gateway, Resp, Setup, TestUpstream};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An upstream object over `(address, weight)` nodes, map form.
fn nodes(list: &[(String, u32)]) -> Value {
    let map: serde_json::Map<String, Value> = list
        .iter()
        .map(|(addr, w)| (addr.clone(), json!(w)))
        .collect();
    json!({"type": "roundrobin", "nodes": map})
}

/// PUTs any Admin API object and waits until every worker serves it.
fn put(gw: &Gateway, path: &str, body: Value) {
    let (status, v) = gw.admin("PUT", &format!("/apisix/admin/{path}"), Some(body));
    assert!(status == 200 || status == 201, "PUT {path}: {status} {v}");
    gw.wait_propagated();
}

/// PATCHes an Admin API object and waits until every worker serves it.
fn patch(gw: &Gateway, path: &str, body: Value) {
    let (status, v) = gw.admin("PATCH", &format!("/apisix/admin/{path}"), Some(body));
    assert_eq!(status, 200, "PATCH {path}: {v}");
    gw.wait_propagated();
}

/// One request through the gateway.
fn send(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let body: Option<&[u8]> = match method {
        "POST" | "PUT" | "PATCH" => Some(b""),
        _ => None,
    };
    http(method, &gw.url(path), headers, body)
}

/// Who answered: the test upstream's name (`x-upstream`), else the status code.
fn who(gw: &Gateway, method: &str, path: &str, host: Option<&str>) -> String {
    let headers: Vec<(&str, &str)> = host.map(|h| ("Host", h)).into_iter().collect();
    let r = send(gw, method, path, &headers);
    match r.header("x-upstream") {
        Some(name) if r.status == 200 => name.to_string(),
        _ => r.status.to_string(),
    }
}

/// The echo of a GET that must reach an upstream.
fn echo(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Value {
    let r = send(gw, "GET", path, headers);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// A 404 from the router, exactly as APISIX writes it.
fn assert_route_not_found(r: &Resp) {
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json(), json!({"error_msg": "404 Route Not Found"}));
}

/// A loopback address on which nothing listens.
fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A minimal HTTP/1.1 keep-alive upstream that answers every request with fixed bytes and
/// counts the connections it accepts.
struct RawUpstream {
    port: u16,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawUpstream {
    /// `response` is a whole HTTP/1.1 response with a `Content-Length`.
    fn start(response: &'static [u8]) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (conns.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let r = r.clone();
                        std::thread::spawn(move || serve_keepalive(stream, r, response));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawUpstream {
            port,
            conns,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers requests on one connection until the peer closes it (or 10 s of silence).
fn serve_keepalive(stream: TcpStream, requests: Arc<AtomicUsize>, response: &[u8]) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.trim_end().is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        if w.write_all(response).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Routing
// ---------------------------------------------------------------------------------------------

/// An exact `uri` wins over prefixes, the longest prefix over shorter ones; `uris` lists work.
#[test]
fn exact_uri_beats_prefix_and_longest_prefix_wins() {
    let (a, b, c, d) = (
        TestUpstream::start("a"),
        TestUpstream::start("b"),
        TestUpstream::start("c"),
        TestUpstream::start("d"),
    );
    let gw = Gateway::start();
    gw.route("short", json!({"uri": "/a/*"}), Some(&a));
    gw.route("long", json!({"uri": "/a/b/*"}), Some(&b));
    gw.route("exact", json!({"uri": "/a/b/c"}), Some(&c));
    gw.route("list", json!({"uris": ["/u1", "/u2/*"]}), Some(&d));

    assert_eq!(who(&gw, "GET", "/a/b/c", None), "c");
    assert_eq!(who(&gw, "GET", "/a/b/c?x=1", None), "c");
    assert_eq!(who(&gw, "GET", "/a/b/c/d", None), "b");
    assert_eq!(who(&gw, "GET", "/a/b/x", None), "b");
    assert_eq!(who(&gw, "GET", "/a/x", None), "a");
    // Path and query reach the upstream as the client wrote them.
    assert_eq!(
        echo(&gw, "/a/x%2Fy?q=%41&r&s=a+b", &[])["uri"],
        "/a/x%2Fy?q=%41&r&s=a+b"
    );
    assert_eq!(who(&gw, "GET", "/u1", None), "d");
    assert_eq!(who(&gw, "GET", "/u2/deep/path", None), "d");
    // `/u1` is exact: neither a longer path nor another path of the list's prefix matches.
    assert_route_not_found(&send(&gw, "GET", "/u1/more", &[]));
    assert_route_not_found(&send(&gw, "GET", "/u3", &[]));
    assert_route_not_found(&send(&gw, "GET", "/b/c", &[]));
}

/// `methods` split one path between routes; a method no route lists is a 404.
#[test]
fn methods_select_the_route() {
    let (getter, poster) = (TestUpstream::start("get"), TestUpstream::start("post"));
    let gw = Gateway::start();
    gw.route("g", json!({"uri": "/m", "methods": ["GET"]}), Some(&getter));
    gw.route(
        "p",
        json!({"uri": "/m", "methods": ["POST"]}),
        Some(&poster),
    );

    assert_eq!(who(&gw, "GET", "/m", None), "get");
    assert_eq!(who(&gw, "POST", "/m", None), "post");
    let r = send(&gw, "POST", "/m", &[]);
    assert_eq!(r.json()["method"], "POST");
    assert_route_not_found(&send(&gw, "PUT", "/m", &[]));
    assert_route_not_found(&send(&gw, "DELETE", "/m", &[]));
    assert_eq!(getter.hits(), 1);
    assert_eq!(poster.hits(), 2);
}

/// `host` matches exactly (case- and port-insensitive); `*.example.com` matches sub-domains
/// only, not `example.com` itself.
#[test]
fn host_and_wildcard_hosts() {
    let (api, wild) = (TestUpstream::start("api"), TestUpstream::start("wild"));
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/h", "host": "api.test"}), Some(&api));
    gw.route(
        "2",
        json!({"uri": "/h", "hosts": ["*.example.com", "other.test"]}),
        Some(&wild),
    );

    assert_eq!(who(&gw, "GET", "/h", Some("api.test")), "api");
    assert_eq!(who(&gw, "GET", "/h", Some("API.Test:9080")), "api");
    assert_eq!(who(&gw, "GET", "/h", Some("foo.example.com")), "wild");
    assert_eq!(who(&gw, "GET", "/h", Some("a.b.example.com")), "wild");
    assert_eq!(who(&gw, "GET", "/h", Some("Foo.Example.COM:8080")), "wild");
    assert_eq!(who(&gw, "GET", "/h", Some("other.test")), "wild");
    for host in [
        "example.com",
        "notexample.com",
        "api.test.evil",
        "x.api.test",
    ] {
        let r = send(&gw, "GET", "/h", &[("Host", host)]);
        assert_route_not_found(&r);
    }
    // As APISIX's radixtree_host_uri: a host's routes before any route without hosts, even
    // one with a more specific path, so that a host's own plugins cannot be passed by.
    let plain = TestUpstream::start("plain");
    gw.route("3", json!({"uri": "/login"}), Some(&plain));
    gw.route("4", json!({"uri": "/*", "host": "api.test"}), Some(&api));
    assert_eq!(who(&gw, "GET", "/login", Some("api.test")), "api");
    assert_eq!(who(&gw, "GET", "/login", Some("elsewhere.test")), "plain");
    assert_eq!(who(&gw, "GET", "/login", Some("foo.example.com")), "plain");
    gw.route(
        "5",
        json!({"uri": "/log*", "host": "*.example.com"}),
        Some(&wild),
    );
    assert_eq!(who(&gw, "GET", "/login", Some("foo.example.com")), "wild");
    assert_eq!(who(&gw, "GET", "/h", Some("api.test")), "api");
}

/// Among routes on the same path the higher `priority` wins; `status: 0` takes a route out of
/// service and PATCH `{"status": 1}` brings it back.
#[test]
fn priority_and_status() {
    let (low, high) = (TestUpstream::start("low"), TestUpstream::start("high"));
    let gw = Gateway::start();
    // The lower id would win a tie, so only the priority can send traffic to "high".
    gw.route("1", json!({"uri": "/p", "priority": 1}), Some(&low));
    gw.route("2", json!({"uri": "/p", "priority": 10}), Some(&high));
    assert_eq!(who(&gw, "GET", "/p", None), "high");

    // Disabling the winner falls back to the other route.
    patch(&gw, "routes/2", json!({"status": 0}));
    assert_eq!(who(&gw, "GET", "/p", None), "low");
    patch(&gw, "routes/2", json!({"status": 1}));
    assert_eq!(who(&gw, "GET", "/p", None), "high");

    // A route created disabled is not served at all.
    gw.route("3", json!({"uri": "/s", "status": 0}), Some(&low));
    assert_route_not_found(&send(&gw, "GET", "/s", &[]));
    patch(&gw, "routes/3", json!({"status": 1}));
    assert_eq!(who(&gw, "GET", "/s", None), "low");
}

/// `vars` and `remote_addrs` narrow a route; a request they reject falls through to the next
/// route on the path, or to a 404.
#[test]
fn vars_and_remote_addrs() {
    let (base, special) = (TestUpstream::start("base"), TestUpstream::start("special"));
    let gw = Gateway::start();
    gw.route("base", json!({"uri": "/v"}), Some(&base));
    gw.route(
        "vars",
        json!({"uri": "/v", "priority": 5, "vars": [["arg_v", "==", "2"]]}),
        Some(&special),
    );
    assert_eq!(who(&gw, "GET", "/v?v=2", None), "special");
    assert_eq!(who(&gw, "GET", "/v?x=1&v=2", None), "special");
    assert_eq!(who(&gw, "GET", "/v?v=3", None), "base");
    assert_eq!(who(&gw, "GET", "/v", None), "base");
    // Header variables: `http_x_env` is the X-Env header.
    gw.route(
        "header-var",
        json!({"uri": "/hv", "vars": [["http_x_env", "==", "canary"]]}),
        Some(&special),
    );
    let canary = send(&gw, "GET", "/hv", &[("X-Env", "canary")]);
    assert_eq!(canary.header("x-upstream"), Some("special"));
    assert_route_not_found(&send(&gw, "GET", "/hv", &[("X-Env", "prod")]));
    // `request_uri` is APISIX 3's: the normalized path with the query, so an escaped or
    // dotted path cannot pass a rule on it; the target as sent is `real_request_uri`.
    gw.route(
        "ru",
        json!({"uri": "/ru/*", "vars": [["request_uri", "~~", "^/ru/admin\\?k=1$"]]}),
        Some(&special),
    );
    gw.route(
        "raw",
        json!({"uri": "/ru/*", "priority": -1, "vars": [["real_request_uri", "~~", "%61"]]}),
        Some(&base),
    );
    assert_eq!(who(&gw, "GET", "/ru/admin?k=1", None), "special");
    assert_eq!(who(&gw, "GET", "/ru/%61dmin?k=1", None), "special");
    assert_eq!(who(&gw, "GET", "/ru/x/../admin?k=1", None), "special");
    assert_eq!(who(&gw, "GET", "/ru/%61dmin?k=2", None), "base");
    // nginx's server variables; a variable wasmgate lacks is accepted and said in the log.
    let port = gw.proxy_port.to_string();
    gw.route(
        "sp",
        json!({"uri": "/sp", "vars": [["server_port", "==", port], ["server_protocol", "==", "HTTP/1.1"], ["is_args", "==", "?"]]}),
        Some(&special),
    );
    assert_eq!(who(&gw, "GET", "/sp?a=1", None), "special");
    assert_route_not_found(&send(&gw, "GET", "/sp", &[]));
    gw.route(
        "unknown-var",
        json!({"uri": "/uv", "vars": [["post_arg_name", "==", "x"]]}),
        Some(&special),
    );
    assert!(
        gw.error_log()
            .contains("route unknown-var: reads $post_arg_name, which wasmgate does not provide"),
        "{}",
        gw.error_log()
    );
    // The same for each variable of a `vars_combinations` key, and for a plain chash key
    // (`hash_on` left out is `vars`).
    let (code, body) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/combo",
        Some(json!({"type": "chash", "hash_on": "vars_combinations",
                    "key": "$remote_addr-$upstream_bytes_sent", "nodes": {"127.0.0.1:9": 1}})),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let (code, body) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/plain-key",
        Some(json!({"type": "chash", "key": "request_length", "nodes": {"127.0.0.1:9": 1}})),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let log = gw.error_log();
    assert!(
        log.contains("upstream combo: reads $upstream_bytes_sent, which wasmgate")
            && !log.contains("reads $remote_addr")
            && log.contains("upstream plain-key: reads $request_length, which wasmgate"),
        "{log}"
    );

    // The test client is 127.0.0.1: outside 10.0.0.0/8, inside 127.0.0.0/8.
    gw.route("r-base", json!({"uri": "/r"}), Some(&base));
    gw.route(
        "r-ten",
        json!({"uri": "/r", "priority": 5, "remote_addrs": ["10.0.0.0/8"]}),
        Some(&special),
    );
    gw.route(
        "only-ten",
        json!({"uri": "/only-ten", "remote_addrs": ["10.0.0.0/8"]}),
        Some(&special),
    );
    gw.route(
        "loopback",
        json!({"uri": "/loopback", "remote_addrs": ["10.0.0.0/8", "127.0.0.0/8"]}),
        Some(&special),
    );
    assert_eq!(who(&gw, "GET", "/r", None), "base");
    assert_route_not_found(&send(&gw, "GET", "/only-ten", &[]));
    assert_eq!(who(&gw, "GET", "/loopback", None), "special");
}

// ---------------------------------------------------------------------------------------------
// 2. Upstreams
// ---------------------------------------------------------------------------------------------

/// Weighted round robin: weights 3 and 1 share 80 requests about 60/20 (each worker keeps its
/// own smooth-WRR state, hence the slack).
#[test]
fn weighted_round_robin_follows_weights() {
    let (heavy, light) = (TestUpstream::start("heavy"), TestUpstream::start("light"));
    let gw = Gateway::start();
    put(
        &gw,
        "routes/wrr",
        json!({"uri": "/w", "upstream": nodes(&[(heavy.addr(), 3), (light.addr(), 1)])}),
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..80 {
        *seen.entry(who(&gw, "GET", "/w", None)).or_default() += 1;
    }
    let (h, l) = (seen.get("heavy").copied(), seen.get("light").copied());
    assert_eq!(h.unwrap_or(0) + l.unwrap_or(0), 80, "{seen:?}");
    assert!(l.unwrap_or(0) > 0, "light never picked: {seen:?}");
    let h = h.unwrap_or(0);
    assert!((50..=70).contains(&h), "heavy got {h} of 80: {seen:?}");
    assert_eq!((heavy.hits(), light.hits()), (h, 80 - h));
}

/// `nodes` in list form, and an upstream object referenced by `upstream_id` whose nodes
/// change under a route.
#[test]
fn list_nodes_and_upstream_id() {
    let (a, b) = (TestUpstream::start("a"), TestUpstream::start("b"));
    let gw = Gateway::start();
    put(
        &gw,
        "routes/list",
        json!({"uri": "/list", "upstream": {"type": "roundrobin",
            "nodes": [{"host": "127.0.0.1", "port": a.port, "weight": 1}]}}),
    );
    for _ in 0..4 {
        assert_eq!(who(&gw, "GET", "/list", None), "a");
    }
    // A node of weight 0 gets nothing.
    put(
        &gw,
        "routes/zero",
        json!({"uri": "/zero", "upstream": {"type": "roundrobin", "nodes": [
            {"host": "127.0.0.1", "port": a.port, "weight": 1},
            {"host": "127.0.0.1", "port": b.port, "weight": 0}]}}),
    );
    for _ in 0..6 {
        assert_eq!(who(&gw, "GET", "/zero", None), "a");
    }
    assert_eq!(b.hits(), 0);
    // Nothing to pick is APISIX's answer, with its log line: 503 for no node, 502 for
    // weight-0 ones. A lone node is taken whatever its weight, as APISIX takes it.
    put(
        &gw,
        "routes/none",
        json!({"uri": "/none", "upstream": {"type": "roundrobin", "nodes": {}}}),
    );
    put(
        &gw,
        "routes/zeros",
        json!({"uri": "/zeros", "upstream": {"nodes": {b.addr(): 0, a.addr(): 0}}}),
    );
    put(
        &gw,
        "routes/lone",
        json!({"uri": "/lone", "upstream": {"nodes": {b.addr(): 0}}}),
    );
    assert_eq!(http("GET", &gw.url("/none"), &[], None).status, 503);
    assert_eq!(http("GET", &gw.url("/zeros"), &[], None).status, 502);
    assert_eq!(b.hits(), 0);
    assert_eq!(gw.error_log().matches("no valid upstream node").count(), 2);
    assert_eq!(who(&gw, "GET", "/lone", None), "b");

    put(&gw, "upstreams/u1", nodes(&[(a.addr(), 1)]));
    put(
        &gw,
        "routes/byid",
        json!({"uri": "/byid", "upstream_id": "u1"}),
    );
    assert_eq!(who(&gw, "GET", "/byid", None), "a");
    put(&gw, "upstreams/u1", nodes(&[(b.addr(), 1)]));
    for _ in 0..4 {
        assert_eq!(who(&gw, "GET", "/byid", None), "b");
    }
}

/// `chash` on `arg_user`: a user always lands on the same node (whichever worker serves the
/// request), and different users spread over both nodes.
#[test]
fn chash_on_a_query_argument_is_sticky() {
    let (a, b) = (TestUpstream::start("a"), TestUpstream::start("b"));
    let gw = Gateway::start();
    put(
        &gw,
        "routes/ch",
        json!({"uri": "/c", "upstream": {"type": "chash", "hash_on": "vars", "key": "arg_user",
            "nodes": {a.addr(): 1, b.addr(): 1}}}),
    );
    let mut used = HashSet::new();
    for user in 0..16 {
        let path = format!("/c?user=user-{user}");
        let first = who(&gw, "GET", &path, None);
        assert!(first == "a" || first == "b", "{path}: {first}");
        for _ in 0..4 {
            assert_eq!(who(&gw, "GET", &path, None), first, "{path} moved");
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 2, "16 users all on one node: {used:?}");
    // Without the argument, the client's address is hashed (APISIX's fallback), not round
    // robin: one client stays on one node.
    let anonymous: HashSet<String> = (0..8).map(|_| who(&gw, "GET", "/c", None)).collect();
    assert_eq!(anonymous.len(), 1, "{anonymous:?}");
    // A header key is read as APISIX reads it (`$http_x_user`: `X-User` is found by
    // `x_user`), and a request without the header stays on one node too.
    put(
        &gw,
        "routes/ch",
        json!({"uri": "/c", "upstream": {"type": "chash", "hash_on": "header", "key": "x_user",
            "nodes": {a.addr(): 1, b.addr(): 1}}}),
    );
    let mut used = HashSet::new();
    for user in 0..16 {
        let u = format!("user-{user}");
        let by = |gw: &Gateway| {
            let r = send(gw, "GET", "/c", &[("X-User", u.as_str())]);
            r.header("x-upstream").unwrap_or("-").to_string()
        };
        let first = by(&gw);
        for _ in 0..3 {
            assert_eq!(by(&gw), first, "{u} moved");
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 2, "16 users all on one node: {used:?}");
    let anonymous: HashSet<String> = (0..8).map(|_| who(&gw, "GET", "/c", None)).collect();
    assert_eq!(anonymous.len(), 1, "{anonymous:?}");
}

/// Connect failures move on to the next node; with `retries: 0` they do not; all nodes dead
/// is a 502.
#[test]
fn dead_nodes_are_retried_and_all_dead_is_502() {
    let live = TestUpstream::start("live");
    let gw = Gateway::start();
    put(
        &gw,
        "routes/retry",
        json!({"uri": "/retry", "upstream": nodes(&[(dead_addr(), 1), (live.addr(), 1)])}),
    );
    for i in 0..20 {
        let r = send(&gw, "GET", "/retry", &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-upstream"), Some("live"));
    }
    assert_eq!(live.hits(), 20);

    let mut up = nodes(&[(dead_addr(), 1), (live.addr(), 1)]);
    up["retries"] = json!(0);
    put(
        &gw,
        "routes/noretry",
        json!({"uri": "/noretry", "upstream": up}),
    );
    // Equal weights alternate per worker, so 10 requests meet both nodes.
    let statuses: HashSet<u16> = (0..10)
        .map(|_| send(&gw, "GET", "/noretry", &[]).status)
        .collect();
    assert_eq!(statuses, HashSet::from([200, 502]));

    put(
        &gw,
        "routes/dead",
        json!({"uri": "/dead", "upstream": nodes(&[(dead_addr(), 1), (dead_addr(), 1)])}),
    );
    let started = Instant::now();
    let r = send(&gw, "GET", "/dead", &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("502 Bad Gateway"), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(5));
    // The error log names the request each failure was for, as nginx's line does.
    let log = gw.error_log();
    let line = log
        .lines()
        .find(|l| l.contains("connect() to") && l.contains("GET /dead HTTP/1.1"))
        .unwrap_or_else(|| panic!("no connect() line for /dead: {log}"));
    assert!(line.contains("[error]"), "{line}");
    assert!(
        line.contains("while connecting to upstream, client: 127.0.0.1"),
        "{line}"
    );
    assert!(line.contains("upstream: \"http://127.0.0.1:"), "{line}");
}

/// `timeout.read` turns a slow upstream into a 504 without waiting for it, whether set on the
/// upstream or on the route (over an inline upstream, an `upstream_id` or a service's
/// upstream); routes sharing that upstream without a timeout of their own keep the default.
#[test]
fn read_timeout_is_504() {
    let up = TestUpstream::start("slow");
    let gw = Gateway::start();
    let t = json!({"connect": 1, "send": 1, "read": 0.5});
    put(&gw, "upstreams/shared", nodes(&[(up.addr(), 1)]));
    put(
        &gw,
        "services/svc",
        json!({"upstream": nodes(&[(up.addr(), 1)])}),
    );
    let mut with_timeout = nodes(&[(up.addr(), 1)]);
    with_timeout["timeout"] = t.clone();
    let routes = [
        (
            "route.test",
            json!({"upstream": nodes(&[(up.addr(), 1)]), "timeout": t}),
        ),
        ("upstream.test", json!({"upstream": with_timeout})),
        ("byid.test", json!({"upstream_id": "shared", "timeout": t})),
        ("service.test", json!({"service_id": "svc", "timeout": t})),
        ("byid-none.test", json!({"upstream_id": "shared"})),
        ("service-none.test", json!({"service_id": "svc"})),
    ];
    for (host, mut body) in routes {
        body["uri"] = json!("/delay/*");
        body["host"] = json!(host);
        put(&gw, &format!("routes/{host}"), body);
    }

    for host in ["route.test", "upstream.test", "byid.test", "service.test"] {
        let started = Instant::now();
        let r = send(&gw, "GET", "/delay/2000", &[("Host", host)]);
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{host}: {}", r.text());
        assert!(r.text().contains("504 Gateway Time"), "{}", r.text());
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "{host}: 504 after {took:?}"
        );
        assert_eq!(who(&gw, "GET", "/delay/50", Some(host)), "slow", "{host}");
    }
    for host in ["byid-none.test", "service-none.test"] {
        assert_eq!(who(&gw, "GET", "/delay/900", Some(host)), "slow", "{host}");
    }
}

/// `pass_host`: `pass` sends the client's Host, `node` the node's `host:port`, `rewrite` the
/// configured `upstream_host`.
#[test]
fn pass_host_modes() {
    let up = TestUpstream::start("h");
    let gw = Gateway::start();
    let with = |mode: Value| {
        let mut u = nodes(&[(up.addr(), 1)]);
        for (k, v) in mode.as_object().unwrap() {
            u[k] = v.clone();
        }
        u
    };
    put(
        &gw,
        "routes/default",
        json!({"uri": "/default", "upstream": nodes(&[(up.addr(), 1)])}),
    );
    put(
        &gw,
        "routes/pass",
        json!({"uri": "/pass", "upstream": with(json!({"pass_host": "pass"}))}),
    );
    put(
        &gw,
        "routes/node",
        json!({"uri": "/node", "upstream": with(json!({"pass_host": "node"}))}),
    );
    put(
        &gw,
        "routes/rewrite",
        json!({"uri": "/rewrite", "upstream":
            with(json!({"pass_host": "rewrite", "upstream_host": "internal.svc"}))}),
    );

    let client_host = [("Host", "client.test:8080")];
    assert_eq!(
        echo(&gw, "/default", &client_host)["headers"]["host"],
        "client.test:8080"
    );
    assert_eq!(
        echo(&gw, "/pass", &client_host)["headers"]["host"],
        "client.test:8080"
    );
    assert_eq!(
        echo(&gw, "/node", &client_host)["headers"]["host"],
        up.addr()
    );
    assert_eq!(
        echo(&gw, "/rewrite", &client_host)["headers"]["host"],
        "internal.svc"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Headers
// ---------------------------------------------------------------------------------------------

/// Hop-by-hop headers of the request (fixed ones and those named in `Connection`) stop at the
/// proxy, other headers go through; responses carry `Server: wasmgate/…`.
#[test]
fn request_hop_by_hop_headers_stop_at_the_proxy() {
    let up = TestUpstream::start("e");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/e"}), Some(&up));

    let r = send(
        &gw,
        "GET",
        "/e",
        &[
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "x"),
            ("TE", "trailers"),
            ("X-Keep", "yes"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    for gone in ["x-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    if let Some(c) = h.get("connection").and_then(Value::as_str) {
        assert!(!c.to_ascii_lowercase().contains("x-secret"), "{h}");
    }
    assert_eq!(h["x-keep"], "yes");
    // Naming the body's length takes nothing away: the body goes on, framed as it came.
    let r = http(
        "POST",
        &gw.url("/e"),
        &[("Connection", "content-length, host")],
        Some(b"hello"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(
        (h["content-length"].as_str(), r.json()["body_len"].as_u64()),
        (Some("5"), Some(5)),
        "{h}"
    );
    // Naming a field takes away what the client sent, not what the gateway or a plugin sets
    // (RFC 9110 §7.6.1): the request id and the plugin's field reach the node.
    gw.route(
        "2",
        json!({"uri": "/p", "plugins": {"rewrite": {"conf": "{\"set\": {\"x-user\": \"alice\"}}"}}}),
        Some(&up),
    );
    let r = send(
        &gw,
        "GET",
        "/p",
        &[
            ("Connection", "x-user, x-request-id"),
            ("X-User", "mallory"),
            ("X-Request-Id", "mine"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-user"], "alice", "{h}");
    let id = h["x-request-id"].as_str().unwrap_or_default();
    assert!(id.len() == 36 && id != "mine", "{h}");
    let server = r.header("server").unwrap_or_default();
    assert!(server.starts_with("wasmgate/"), "server: {server:?}");
    // The upstream's own headers come back.
    assert_eq!(r.header("x-upstream"), Some("e"));

    // The gateway's own answers carry the Server header too.
    let r = send(&gw, "GET", "/nowhere", &[]);
    assert_route_not_found(&r);
    assert!(r
        .header("server")
        .is_some_and(|s| s.starts_with("wasmgate/")));
}

/// Hop-by-hop headers of the response (including those its `Connection` names) do not reach
/// the client; its other headers do.
#[test]
fn response_hop_by_hop_headers_stop_at_the_proxy() {
    let up = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\n\
          X-Internal: 1\r\nKeep-Alive: timeout=5\r\nX-Public: 1\r\n\r\nok",
    );
    let gw = Gateway::start();
    put(
        &gw,
        "routes/raw",
        json!({"uri": "/raw", "upstream": nodes(&[(up.addr(), 1)])}),
    );
    let r = send(&gw, "GET", "/raw", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("x-public"), Some("1"));
    assert_eq!(r.header("x-internal"), None, "{:?}", r.headers);
    assert_eq!(r.header("keep-alive"), None, "{:?}", r.headers);

    // A field the node names is the node's: one a plugin sets in the response phase under
    // that name reaches the client.
    let up = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-frame-options\r\n\
          X-Frame-Options: ALLOW\r\n\r\nok",
    );
    put(
        &gw,
        "routes/set",
        json!({"uri": "/set", "upstream": nodes(&[(up.addr(), 1)]),
               "plugins": {"rewrite": {"conf": "{\"response_set\": {\"x-frame-options\": \"DENY\"}}"}}}),
    );
    let r = send(&gw, "GET", "/set", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{:?}", r.headers);
}

/// X-Forwarded-For appends the client to what came in (several header lines being one
/// list), X-Real-IP is the client, X-Forwarded-Proto/-Host say how the client came.
#[test]
fn forwarded_headers() {
    let up = TestUpstream::start("f");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/f"}), Some(&up));

    let h = &echo(&gw, "/f", &[("Host", "client.test")])["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "client.test");
    assert_eq!(h["x-forwarded-port"], gw.proxy_port.to_string());

    let h = &echo(&gw, "/f", &[("X-Forwarded-For", "1.2.3.4")])["headers"];
    assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");

    let two_lines = [
        ("X-Forwarded-For", "1.1.1.1"),
        ("X-Forwarded-For", "2.2.2.2"),
    ];
    let h = &echo(&gw, "/f", &two_lines)["headers"];
    assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");

    // What the client claims under the proxy's own names is replaced, not passed on beside
    // the proxy's value (the echo joins repeated lines with ", ").
    let spoofed = [
        ("Host", "client.test"),
        ("X-Real-IP", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "443"),
        ("X-Other", "kept"),
    ];
    let h = &echo(&gw, "/f", &spoofed)["headers"];
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "client.test");
    assert_eq!(h["x-forwarded-port"], gw.proxy_port.to_string());
    assert_eq!(h["host"], "client.test");
    assert_eq!(h["x-other"], "kept");

    // A `Connection` header naming Host removes the client's line, not the Host the request
    // was routed by: the upstream still gets it.
    let h = &echo(
        &gw,
        "/f",
        &[("Host", "client.test"), ("Connection", "host")],
    )["headers"];
    assert_eq!(h["host"], "client.test");
    assert_eq!(h["x-forwarded-host"], "client.test");
}

/// `real_ip_from` / `real_ip_header` / `real_ip_recursive` (nginx's realip module, APISIX's
/// keys): a trusted peer names the client, which routes, `X-Real-IP` and `X-Forwarded-For`
/// then see; a value that is no address leaves the peer.
#[test]
fn real_ip_from_a_trusted_proxy() {
    let (inside, outside) = (
        TestUpstream::start("inside"),
        TestUpstream::start("outside"),
    );
    let lb = TestUpstream::start("lb");
    let gw = Gateway::start_with(Setup {
        http_extra: vec![
            "real_ip_from: [127.0.0.1, \"unix:\"]".into(),
            "real_ip_header: X-Forwarded-For".into(),
            "real_ip_recursive: \"on\"".into(),
        ],
        apisix_extra: vec!["trusted_addresses: [127.0.0.1]".into()],
        workers: 1,
        ..Setup::default()
    });
    // What only the load balancer (127.0.0.1) itself may reach.
    gw.route(
        "lb-only",
        json!({"uri": "/r", "remote_addrs": ["127.0.0.0/8"], "priority": 2}),
        Some(&lb),
    );
    gw.route(
        "in",
        json!({"uri": "/r", "remote_addrs": ["10.1.0.0/16"], "priority": 1}),
        Some(&inside),
    );
    gw.route("out", json!({"uri": "/r"}), Some(&outside));
    // The last address that is not a trusted proxy: 10.1.2.3 (127.0.0.1 is ours).
    let r = echo(
        &gw,
        "/r",
        &[("X-Forwarded-For", "6.6.6.6, 10.1.2.3, 127.0.0.1")],
    );
    let h = &r["headers"];
    assert_eq!(h["x-real-ip"], "10.1.2.3", "{r}");
    assert_eq!(
        h["x-forwarded-for"],
        "6.6.6.6, 10.1.2.3, 127.0.0.1, 10.1.2.3"
    );
    assert_eq!(who(&gw, "GET", "/r", None), "lb");
    let named = |xff: &str| {
        let r = send(&gw, "GET", "/r", &[("X-Forwarded-For", xff)]);
        r.header("x-upstream").unwrap_or_default().to_string()
    };
    assert_eq!(named("10.1.9.9"), "inside");
    assert_eq!(named("[::ffff:10.1.9.9]:443"), "outside");
    assert_eq!(named("10.1.9.9:5555"), "inside");
    // Read from the right, no further than needed: what a client wrote on the left cannot
    // make the load balancer itself the client.
    assert_eq!(named("garbage, 10.1.9.9"), "inside");
    assert_eq!(named("unknown, 1.2.3.4"), "outside");
    // Nothing usable where the load balancer writes: the peer stays the client, as nginx.
    assert_eq!(named("not-an-address"), "lb");
    // A client whose `Connection` (passed on by the load balancer) names the header cannot
    // take away the address the load balancer wrote: it is read before the named fields go.
    let r = send(
        &gw,
        "GET",
        "/r",
        &[
            ("X-Forwarded-For", "10.1.9.9"),
            ("Connection", "x-forwarded-for"),
        ],
    );
    assert_eq!(r.header("x-upstream"), Some("inside"), "{:?}", r.headers);
    // The load balancer is a trusted address too: its X-Forwarded-Proto goes on, though
    // realip named another client.
    let h = &echo(
        &gw,
        "/r",
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
        ],
    )["headers"];
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-real-ip"], "6.6.6.6");
}

/// From `apisix.trusted_addresses` (a load balancer that terminated TLS), the client's
/// X-Forwarded-Proto/-Host/-Port go upstream as they came; what it did not send is the
/// gateway's. X-Forwarded-For and X-Real-IP are the gateway's either way.
#[test]
fn trusted_addresses_pass_their_forwarded_headers_on() {
    let up = TestUpstream::start("f");
    let gw = Gateway::start_with(Setup {
        apisix_extra: vec!["trusted_addresses: [10.0.0.0/8, 127.0.0.1]".into()],
        workers: 1,
        ..Setup::default()
    });
    gw.route("1", json!({"uri": "/f"}), Some(&up));
    let lb = [
        ("Host", "client.test"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "shop.example"),
        ("X-Forwarded-Port", "443"),
        ("X-Real-IP", "6.6.6.6"),
    ];
    let h = &echo(&gw, "/f", &lb)["headers"];
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-port"], "443");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    let h = &echo(&gw, "/f", &[("Host", "client.test")])["headers"];
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "client.test");
    assert_eq!(h["x-forwarded-port"], gw.proxy_port.to_string());
}

// ---------------------------------------------------------------------------------------------
// 4. Bodies
// ---------------------------------------------------------------------------------------------

/// A 3 MiB request body reaches the upstream byte for byte.
#[test]
fn large_request_body_arrives_intact() {
    let up = TestUpstream::start("b");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/upload"}), Some(&up));
    let body: Vec<u8> = (0..3usize << 20)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect();
    let sum: u64 = body.iter().map(|b| *b as u64).sum();
    let r = http("POST", &gw.url("/upload"), &[], Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body_len"], body.len());
    assert_eq!(v["body_sum"], sum);
}

/// A chunked request body (no Content-Length) streams to the upstream intact.
#[test]
fn chunked_request_body_arrives_intact() {
    let up = TestUpstream::start("c");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/upload"}), Some(&up));
    let mut req = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                    Connection: close\r\n\r\n"
        .to_vec();
    let mut sent = Vec::new();
    for i in 0..64usize {
        let chunk: Vec<u8> = (0..1000 + i * 37).map(|j| (i * 7 + j * 13) as u8).collect();
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
        sent.extend_from_slice(&chunk);
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&req).unwrap();
    let r = common::client::read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["body_len"], sent.len());
    assert_eq!(v["body_sum"], sent.iter().map(|b| *b as u64).sum::<u64>());
}

/// A client that sends `Expect: 100-continue` (curl does for bodies over 1 MiB) is told to go
/// on, and its body then arrives intact, without the `Expect` the gateway answered.
#[test]
fn expect_continue_upload() {
    let up = TestUpstream::start("x");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/upload"}), Some(&up));
    let body: Vec<u8> = (0..(2usize << 20) + 3).map(|i| (i % 253) as u8).collect();
    let mut s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let interim = common::client::read_response(&mut r, true).unwrap();
    assert_eq!(interim.status, 100, "{interim:?}");
    r.get_mut().write_all(&body).unwrap();
    let resp = common::client::read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["body_len"], body.len());
    assert_eq!(v["body_sum"], body.iter().map(|b| *b as u64).sum::<u64>());
    // The gateway answered the expectation itself: the upstream is not asked again (nginx).
    assert_eq!(v["headers"].get("expect"), None, "{v}");
}

/// Responses stream through untouched: a chunked stream, a 5 MB body, and an upstream error
/// status passed through as is.
#[test]
fn response_bodies_stream_through() {
    let up = TestUpstream::start("r");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/*"}), Some(&up));

    let r = send(&gw, "GET", "/stream/500", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 500 * 1024);
    for i in 0..500 {
        let want = b'a' + (i % 26) as u8;
        assert_eq!(r.body[i * 1024], want, "chunk {i}");
        assert_eq!(r.body[i * 1024 + 1023], want, "chunk {i} end");
    }

    let r = send(&gw, "GET", "/big/5000000", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 5_000_000);
    assert!(r.body.iter().all(|b| *b == b'x'));

    // HEAD: the upstream's length, no body.
    let r = send(&gw, "HEAD", "/big/1000", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert!(r.body.is_empty());

    // The upstream's 503 is its own page, not the gateway's.
    let r = send(&gw, "GET", "/status/503", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "status 503");
    assert_eq!(r.header("x-upstream"), Some("r"));
}

// ---------------------------------------------------------------------------------------------
// 5. Upstream keep-alive
// ---------------------------------------------------------------------------------------------

/// 30 sequential requests reuse pooled upstream connections (one pool per worker) instead of
/// opening one connection each.
#[test]
fn upstream_connections_are_reused() {
    let up = RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let gw = Gateway::start();
    put(
        &gw,
        "routes/ka",
        json!({"uri": "/ka", "upstream": nodes(&[(up.addr(), 1)])}),
    );
    for i in 0..30 {
        let r = send(&gw, "GET", "/ka", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(up.requests.load(Ordering::Relaxed), 30);
    let conns = up.conns.load(Ordering::Relaxed);
    assert!(
        (1..=4).contains(&conns),
        "30 requests over {conns} upstream connections"
    );
}

/// An upstream that answers each request with raw bytes chosen by its method and path, and
/// closes a connection after an answer when told to, or after 150 ms of silence (a node with
/// a short keep-alive timeout).
struct ScriptedUpstream {
    port: u16,
    conns: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The bytes to answer, and whether to close the connection after them.
type Script = fn(&str, &str) -> (&'static [u8], bool);

impl ScriptedUpstream {
    fn start(script: Script) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || serve_script(stream, script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ScriptedUpstream {
            port,
            conns,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers bodiless requests on one connection by the script.
fn serve_script(stream: TcpStream, script: Script) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match r.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => {}
            }
        }
        let mut words = request_line.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let (answer, close) = script(method, path);
        if w.write_all(answer).is_err() || close {
            return;
        }
    }
}

fn framings(method: &str, path: &str) -> (&'static [u8], bool) {
    match (method, path) {
        ("HEAD", _) => (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
        (_, "/chunked") => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        ),
        (_, "/continue") => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        (_, "/no-content") => (b"HTTP/1.1 204 No Content\r\nX-Seen: 1\r\n\r\n", false),
        (_, "/not-modified") => (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
            false,
        ),
        (_, "/to-close") => (b"HTTP/1.0 200 OK\r\n\r\nread to the close", true),
        (_, "/conn-close") => (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
            true,
        ),
        (_, "/garbage") => (b"SPDY/9 what\r\n\r\n", true),
        (_, "/two-lengths") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
            true,
        ),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    }
}

/// Every way an upstream may frame its answer reaches the client as the upstream meant it,
/// and the connections carry on afterwards: chunked with extensions and trailers, a 100
/// Continue before the answer, HEAD / 204 / 304 without a body, a body read to the close, an
/// answer with `Connection: close`, and a pooled connection the node closed while idle. An
/// answer that is not HTTP, or whose length is ambiguous, is a 502.
#[test]
fn upstream_framings_and_idle_closes() {
    let up = ScriptedUpstream::start(framings);
    let gw = Gateway::start();
    let addr = format!("127.0.0.1:{}", up.port);
    put(
        &gw,
        "routes/f",
        json!({"uri": "/*", "upstream": nodes(&[(addr, 1)])}),
    );
    for round in 0..3 {
        let r = send(&gw, "GET", "/chunked", &[]);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "hello world"),
            "round {round}"
        );
        let r = send(&gw, "GET", "/continue", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "round {round}");
        let r = send(&gw, "HEAD", "/anything", &[]);
        assert_eq!(r.status, 200, "round {round}");
        assert_eq!(r.header("content-length"), Some("1000"));
        assert!(r.body.is_empty());
        let r = send(&gw, "GET", "/no-content", &[]);
        assert_eq!(
            (r.status, r.header("x-seen")),
            (204, Some("1")),
            "round {round}"
        );
        let r = send(&gw, "GET", "/not-modified", &[]);
        assert_eq!(r.status, 304, "round {round}");
        assert!(r.body.is_empty());
        let r = send(&gw, "GET", "/to-close", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "read to the close"));
        let r = send(&gw, "GET", "/conn-close", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "bye"), "round {round}");
        let r = send(&gw, "GET", "/garbage", &[]);
        assert_eq!(r.status, 502, "round {round}");
        let r = send(&gw, "GET", "/two-lengths", &[]);
        assert_eq!(r.status, 502, "round {round}");
        // The node closes its idle connections after 150 ms: the pooled ones are stale now.
        std::thread::sleep(Duration::from_millis(400));
        let r = send(&gw, "GET", "/plain", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "round {round}");
    }
    let log = gw.error_log();
    assert!(
        log.contains("invalid response"),
        "the 502s are explained: {log}"
    );
    // Connections end only where the answers said so (and at the node's idle close), so the
    // bodiless and chunked answers left theirs reusable.
    let conns = up.conns.load(Ordering::Relaxed);
    assert!(
        conns <= 3 * 6,
        "{conns} upstream connections for 30 requests"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Services
// ---------------------------------------------------------------------------------------------

/// A route with `service_id` uses the service's upstream and, having no hosts of its own, the
/// service's `hosts`; a route's own hosts and upstream win over the service's.
#[test]
fn routes_inherit_from_their_service() {
    let (svc, own) = (TestUpstream::start("svc"), TestUpstream::start("own"));
    let gw = Gateway::start();
    put(
        &gw,
        "services/s1",
        json!({"upstream": nodes(&[(svc.addr(), 1)]), "hosts": ["svc.test"]}),
    );
    put(&gw, "routes/1", json!({"uri": "/svc", "service_id": "s1"}));
    assert_eq!(who(&gw, "GET", "/svc", Some("svc.test")), "svc");
    assert_route_not_found(&send(&gw, "GET", "/svc", &[("Host", "other.test")]));

    put(
        &gw,
        "routes/2",
        json!({"uri": "/own-hosts", "service_id": "s1", "hosts": ["own.test"]}),
    );
    assert_eq!(who(&gw, "GET", "/own-hosts", Some("own.test")), "svc");
    assert_route_not_found(&send(&gw, "GET", "/own-hosts", &[("Host", "svc.test")]));

    put(
        &gw,
        "routes/3",
        json!({"uri": "/own-upstream", "service_id": "s1",
            "upstream": nodes(&[(own.addr(), 1)])}),
    );
    assert_eq!(who(&gw, "GET", "/own-upstream", Some("svc.test")), "own");

    // A service's `upstream_id` works the same way.
    put(&gw, "upstreams/u-own", nodes(&[(own.addr(), 1)]));
    put(&gw, "services/s2", json!({"upstream_id": "u-own"}));
    put(&gw, "routes/4", json!({"uri": "/s2", "service_id": "s2"}));
    assert_eq!(who(&gw, "GET", "/s2", Some("anything.test")), "own");

    // Changing the service's upstream moves its routes.
    put(
        &gw,
        "services/s1",
        json!({"upstream": nodes(&[(own.addr(), 1)]), "hosts": ["svc.test"]}),
    );
    assert_eq!(who(&gw, "GET", "/svc", Some("svc.test")), "own");
}

/// An upstream's 204 loses the `Content-Length` a 204 may not carry (RFC 9110 §8.6, as
/// nginx); a status outside 100–599 is not an HTTP answer: 502.
#[test]
fn answers_outside_the_rules_are_mended_or_refused() {
    let no_content = RawUpstream::start(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
    let odd = RawUpstream::start(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok");
    let gw = Gateway::start();
    put(
        &gw,
        "routes/nc",
        json!({"uri": "/nc", "upstream": nodes(&[(no_content.addr(), 1)])}),
    );
    put(
        &gw,
        "routes/odd",
        json!({"uri": "/odd", "upstream": nodes(&[(odd.addr(), 1)])}),
    );
    let r = send(&gw, "GET", "/nc", &[]);
    assert_eq!((r.status, r.header("content-length")), (204, None));
    // The connection is still good for the next answer.
    let r = send(&gw, "GET", "/nc", &[]);
    assert_eq!(r.status, 204);
    let r = send(&gw, "GET", "/odd", &[]);
    assert_eq!(r.status, 502, "{}", r.text());
}

/// A node that answers before reading the whole body (a 413) and closes: the body it left
/// unread makes its kernel reset the connection, so the gateway's next write fails. The
/// answer it had sent is relayed, not a 502 (RFC 9112 §9.5 lets a server answer early).
#[test]
fn an_early_answer_before_a_reset_is_relayed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let node = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let (mut got, mut buf) = (0, [0u8; 65536]);
                while got < 100_000 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 7\r\n\r\ntoo big",
                );
                // Dropped with unread bytes: the kernel answers them with a reset.
            });
        }
    });
    let gw = Gateway::start();
    put(
        &gw,
        "routes/big",
        json!({"uri": "/big", "upstream": nodes(&[(node, 1)])}),
    );
    for round in 0..4 {
        let s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let head = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n";
            if w.write_all(head).is_err() {
                return;
            }
            let chunk = vec![0u8; 65536];
            for _ in 0..458 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let r = common::client::read_response(&mut BufReader::new(s), false).unwrap();
        assert_eq!(
            (r.status, r.text().as_str()),
            (413, "too big"),
            "round {round}"
        );
        let _ = writer.join();
    }
}

/// `least_conn` counts a request on its node until it ends, however it ends: requests whose
/// clients left while the node kept them waiting give the node back, and the two nodes share
/// the traffic again afterwards (a count leaked by each would send everything to the other).
#[test]
fn a_left_request_gives_its_least_conn_node_back() {
    let slow = TestUpstream::start("slow");
    let quick = RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let gw = Gateway::start_with(common::Setup {
        workers: 1,
        ..Default::default()
    });
    let nodes = json!({(slow.addr()): 1, (quick.addr()): 1});
    put(
        &gw,
        "routes/lc",
        json!({"uri": "/*", "upstream": {"type": "least_conn", "nodes": nodes}}),
    );
    // `slow` holds those it gets (`quick` answers at once) until their clients leave.
    let waiting: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
            s.write_all(b"GET /delay/4000 HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s
        })
        .collect();
    common::eventually(Duration::from_secs(3), "slow held some", || slow.hits() > 0);
    drop(waiting);
    std::thread::sleep(Duration::from_millis(300));
    let before = slow.hits();
    for _ in 0..20 {
        assert_eq!(send(&gw, "GET", "/quick", &[]).status, 200);
    }
    assert!(
        slow.hits() - before >= 5,
        "the slow node got {} of 20: its abandoned requests still count",
        slow.hits() - before
    );
}

/// `n` nodes that take connections (the kernel's backlog does) and never answer, kept open
/// while the listeners live, with their addresses at weight 1.
fn silent_nodes(n: usize) -> (Vec<TcpListener>, Vec<(String, u32)>) {
    let silent: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = silent
        .iter()
        .map(|l| (l.local_addr().unwrap().to_string(), 1))
        .collect();
    (silent, addrs)
}

/// A node that reads one request's first bytes on each connection, writes `answer` and
/// closes; its address.
fn node_answering(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(answer);
        }
    });
    addr
}

/// `retries` as nginx's default `proxy_next_upstream error timeout`: a node that takes the
/// request and closes without answering makes an idempotent request without a body go to the
/// next node; a POST is not sent twice (502).
#[test]
fn idempotent_requests_move_on_from_a_node_that_fails_them() {
    // Takes the request, closes without an answer.
    let dead_addr = node_answering(b"");
    let good = RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let gw = Gateway::start();
    put(
        &gw,
        "routes/two",
        json!({"uri": "/two", "upstream": nodes(&[(dead_addr, 1), (good.addr(), 1)])}),
    );
    for i in 0..6 {
        let r = send(&gw, "GET", "/two", &[]);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "GET {i}");
    }
    let posts: Vec<u16> = (0..6)
        .map(|_| http("POST", &gw.url("/two"), &[], Some(b"x")).status)
        .collect();
    assert!(
        posts.contains(&502),
        "a POST the dead node took is not replayed: {posts:?}"
    );
    assert!(posts.contains(&200), "{posts:?}");

    // Two nodes that never answer: both tried, and the answer is the last one's, a 504.
    let (silent, addrs) = silent_nodes(2);
    let mut upstream = nodes(&addrs);
    upstream["timeout"] = json!({"connect": 1, "send": 1, "read": 1});
    put(
        &gw,
        "routes/silent",
        json!({"uri": "/silent", "upstream": upstream}),
    );
    let started = Instant::now();
    let r = send(&gw, "GET", "/silent", &[]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "both nodes waited on"
    );
    drop(silent);
}

/// `retry_timeout` ending the retries `retries` still allowed is APISIX's 502 with its line,
/// not the last attempt's answer: two nodes that never answer, a 1 s read timeout, retries
/// allowed for 0.5 s — the first node is waited on, the second never.
#[test]
fn retry_timeout_ends_with_a_502() {
    let (silent, addrs) = silent_nodes(2);
    let gw = Gateway::start();
    let mut upstream = nodes(&addrs);
    upstream["timeout"] = json!({"connect": 1, "send": 1, "read": 1});
    upstream["retry_timeout"] = json!(0.5);
    put(
        &gw,
        "routes/rt",
        json!({"uri": "/rt", "upstream": upstream}),
    );
    let started = Instant::now();
    let r = send(&gw, "GET", "/rt", &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "one node waited on"
    );
    assert!(gw
        .error_log()
        .contains("proxy retry timeout, retry count: 0"));
    drop(silent);
}

/// A lone node is tried again as `retries` says (APISIX takes a lone node for every attempt):
/// one that closes its first connection without answering serves the request on the next.
#[test]
fn a_lone_node_is_tried_again() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            // The first connection closes unanswered; the others answer.
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        }
    });
    let gw = Gateway::start();
    let mut upstream = nodes(&[(addr, 1)]);
    upstream["retries"] = json!(1);
    put(
        &gw,
        "routes/lone",
        json!({"uri": "/lone", "upstream": upstream}),
    );
    let r = send(&gw, "GET", "/lone", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An answer whose body the upstream cuts short (it closes before the `Content-Length` it
/// announced) is cut for the client too, and said in the error log: the access log shows
/// the 200 that went out.
#[test]
fn an_answer_cut_by_the_upstream_is_logged() {
    let node = node_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort");
    let gw = Gateway::start();
    put(
        &gw,
        "routes/cut",
        json!({"uri": "/cut", "upstream": nodes(&[(node, 1)])}),
    );
    let mut s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("short"),
        "{got}"
    );
    common::eventually(Duration::from_secs(5), "the error-log line", || {
        gw.error_log().contains("its body failed")
    });
}

/// A body plugin reads the answer's body before its head goes out: a node that cuts the body
/// there gets nginx's 502 (a stall, its 504) and an error-log line, not a plugin's 503 and
/// nothing said.
#[test]
fn an_answer_cut_before_a_body_plugin_had_it_is_a_502() {
    let cut = node_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
    let stall = RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
    let gw = Gateway::start();
    let plugins = json!({"body_rewrite": {"conf": "{\"redact\": \"secret\"}"}});
    put(
        &gw,
        "routes/cut",
        json!({"uri": "/cut", "plugins": plugins, "upstream": nodes(&[(cut, 1)])}),
    );
    let mut upstream = nodes(&[(stall.addr(), 1)]);
    upstream["timeout"] = json!({"connect": 2, "send": 2, "read": 1});
    put(
        &gw,
        "routes/stall",
        json!({"uri": "/stall", "plugins": plugins, "upstream": upstream}),
    );
    let r = send(&gw, "GET", "/cut", &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    let r = send(&gw, "GET", "/stall", &[]);
    assert_eq!(r.status, 504, "{}", r.text());
    let said = "upstream prematurely closed the answer's body";
    eventually(Duration::from_secs(5), "two error-log lines", || {
        common::log_lines(&gw.error_log(), said).len() == 2
    });
    // Each says where, as the other upstream errors do.
    let log = gw.error_log();
    let lines = common::log_lines(&log, said);
    for (path, why) in [("/cut", "inside the body"), ("/stall", "timed out")] {
        let request = format!("request: \"GET {path} HTTP/1.1\"");
        assert!(
            lines.iter().any(|l| l.contains(why)
                && l.contains(&request)
                && l.contains("upstream: \"http://127.0.0.1:")),
            "{path}: {lines:?}"
        );
    }
}

/// A transfer coding other than chunked would reach the client undeclared (the field stops
/// at the proxy): nginx's 502, said in the error log.
#[test]
fn an_unknown_transfer_coding_from_a_node_is_a_502() {
    let gzip = node_answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nGZGZG\r\n0\r\n\r\n",
    );
    let gw = Gateway::start();
    put(
        &gw,
        "routes/gz",
        json!({"uri": "/gz", "upstream": nodes(&[(gzip, 1)])}),
    );
    let r = send(&gw, "GET", "/gz", &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    eventually(Duration::from_secs(5), "the error-log line", || {
        gw.error_log().contains("unknown Transfer-Encoding")
    });
}

/// Sends a WebSocket handshake for `path`; the connection and the answer's head.
fn handshake(gw: &Gateway, path: &str) -> (TcpStream, String) {
    let mut c = TcpStream::connect(
        gw.url("")
            .trim_start_matches("http://")
            .trim_end_matches('/'),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = common::client::websocket_upgrade(&mut c, path, "ws.test");
    (c, head.to_ascii_lowercase())
}

/// `enable_websocket`: the handshake reaches the node with its `Upgrade`, the client gets the
/// node's 101, and bytes then cross both ways on the same connection until it closes; a
/// route without it drops `Upgrade` like any hop-by-hop field; a tunnel idle for the route's
/// `timeout.read` is closed.
#[test]
fn websocket_routes_tunnel_after_the_handshake() {
    let (node, heads) = common::upstream::switching_node();
    let gw = Gateway::start();
    let upstream = nodes(&[(node, 1)]);
    put(
        &gw,
        "routes/ws",
        json!({"uri": "/ws", "enable_websocket": true, "upstream": upstream.clone()}),
    );
    put(
        &gw,
        "routes/plain",
        json!({"uri": "/plain", "upstream": upstream.clone()}),
    );
    put(
        &gw,
        "routes/short",
        json!({"uri": "/short", "enable_websocket": true, "timeout": {"read": 1},
               "upstream": upstream}),
    );

    let (mut c, head) = handshake(&gw, "/ws");
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(head.contains("\r\nsec-websocket-accept: "), "{head}");
    let node_head = heads.lock().unwrap().last().cloned().unwrap();
    assert!(
        node_head.contains("\r\nconnection: upgrade\r\n"),
        "{node_head}"
    );
    assert!(node_head.contains("\r\nsec-websocket-key: "), "{node_head}");
    for word in ["ping", "again"] {
        c.write_all(word.as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("echo:{word}").as_bytes());
    }
    // The request is logged when its tunnel closes, as nginx logs an upgraded request.
    let access_log = || std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap();
    let ws_line = || {
        access_log()
            .lines()
            .find(|l| l.contains("\"GET /ws HTTP/1.1\" 101 "))
            .map(str::to_string)
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ws_line(), None, "logged before the tunnel closed");
    // The client's close reaches the node, whose close ends the tunnel.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    eventually(
        Duration::from_secs(5),
        "the tunnel's access log line",
        || ws_line().is_some(),
    );
    // `$body_bytes_sent` counts what the tunnel carried to the client: "echo:ping" and
    // "echo:again".
    let line = ws_line().unwrap();
    let sent = line
        .split("\" 101 ")
        .nth(1)
        .and_then(|r| r.split(' ').next());
    assert_eq!(sent, Some("19"), "{line}");

    let (_, head) = handshake(&gw, "/plain");
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let node_head = heads.lock().unwrap().last().cloned().unwrap();
    assert!(!node_head.contains("upgrade"), "{node_head}");

    let (mut c, head) = handshake(&gw, "/short");
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    let started = Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(8), "closed after {waited:?}");

    // A node that switches to another protocol than the one asked for, or does not say
    // which, opens no tunnel: 502.
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
    ] {
        let odd = RawUpstream::start(answer);
        put(
            &gw,
            "routes/odd",
            json!({"uri": "/odd", "enable_websocket": true,
                   "upstream": nodes(&[(odd.addr(), 1)])}),
        );
        let (_, head) = handshake(&gw, "/odd");
        assert!(head.starts_with("http/1.1 502 "), "{head}");
    }
}

/// Global rules run for a request no route matched, as APISIX runs them before its 404: an
/// auth plugin in a global rule answers such a request; let through, it gets the 404.
#[test]
fn global_rules_run_when_no_route_matches() {
    let gw = Gateway::start();
    let up = TestUpstream::start("up");
    gw.route("r", json!({"uri": "/known"}), Some(&up));
    assert_eq!(send(&gw, "GET", "/unknown", &[]).status, 404);
    put(
        &gw,
        "global_rules/g",
        json!({"plugins": {"wasm_auth": {"conf": "tok"}}}),
    );
    assert_eq!(send(&gw, "GET", "/unknown", &[]).status, 401);
    let r = send(&gw, "GET", "/unknown", &[("Authorization", "Bearer tok")]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error_msg"], "404 Route Not Found");
    let r = send(&gw, "GET", "/known", &[("Authorization", "Bearer tok")]);
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("up")));
    assert_eq!(send(&gw, "GET", "/known", &[]).status, 401);
}
