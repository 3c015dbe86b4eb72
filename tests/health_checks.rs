//! Upstream health checks (`checks`), through a running gateway: the master's active probes
//! take a failing node out and bring it back, the workers' passive counts take one out from
//! the traffic alone, every node unhealthy still serves, and the state shows in the metrics
//! and `GET /wasmgate/healthcheck`.

mod common;

use common::client::{http, Resp};
use common::{eventually, log_lines, Gateway};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A node that answers every request with the status it is set to (`X-Node: name`), and
/// keeps the heads of the probes it is sent (those with the health check's User-Agent).
struct Node {
    addr: String,
    status: Arc<AtomicU16>,
    served: Arc<AtomicUsize>,
    probes: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(name: &'static str) -> Node {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let status = Arc::new(AtomicU16::new(200));
        let served = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let (st, sv, pr) = (status.clone(), served.clone(), probes.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (st, sv, pr) = (st.clone(), sv.clone(), pr.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut head = String::new();
                    while reader.read_line(&mut head).unwrap_or(0) > 2 {}
                    if head.is_empty() {
                        return;
                    }
                    match head.contains("(health check)") {
                        true => pr.lock().unwrap().push(head),
                        false => _ = sv.fetch_add(1, Ordering::Relaxed),
                    }
                    let status = st.load(Ordering::Relaxed);
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nX-Node: {name}\r\nContent-Length: 2\r\n\
                         Connection: close\r\n\r\nok"
                    );
                    let _ = conn.write_all(answer.as_bytes());
                });
            }
        });
        Node {
            addr,
            status,
            served,
            probes,
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }

    fn probes(&self) -> Vec<String> {
        self.probes.lock().unwrap().clone()
    }
}

fn put(gw: &Gateway, path: &str, body: Value) {
    let (status, v) = gw.admin("PUT", &format!("/apisix/admin/{path}"), Some(body));
    assert!(status == 200 || status == 201, "PUT {path}: {status} {v}");
    gw.wait_propagated();
}

fn get(gw: &Gateway, path: &str) -> Resp {
    http("GET", &gw.url(path), &[], None)
}

/// Which nodes answered `n` requests to `path`.
fn answered_by(gw: &Gateway, path: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = get(gw, path);
            r.header("x-node").unwrap_or("-").to_string() + &format!("/{}", r.status)
        })
        .collect()
}

fn metrics(gw: &Gateway) -> String {
    let url = format!(
        "http://127.0.0.1:{}/apisix/prometheus/metrics",
        gw.metrics_port
    );
    http("GET", &url, &[], None).text()
}

fn status_metric(gw: &Gateway, owner: &str, node: &Node) -> Option<String> {
    let needle = format!(
        "apisix_upstream_status{{name=\"/apisix/{owner}\",ip=\"127.0.0.1\",port=\"{}\"}} ",
        node.port()
    );
    let page = metrics(gw);
    let line = page.lines().find(|l| l.starts_with(&needle))?;
    Some(line[needle.len()..].to_string())
}

#[test]
fn active_checks_take_a_failing_node_out_and_bring_it_back() {
    let (a, b) = (Node::start("a"), Node::start("b"));
    let gw = Gateway::start();
    let checks = json!({"active": {
        "http_path": "/healthz",
        "host": "probe.example",
        "req_headers": ["X-Probe: yes"],
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "http_failures": 2}
    }});
    put(
        &gw,
        "upstreams/hc",
        json!({"nodes": {a.addr.clone(): 1, b.addr.clone(): 1}, "checks": checks}),
    );
    put(&gw, "routes/hc", json!({"uri": "/hc", "upstream_id": "hc"}));
    assert_eq!(get(&gw, "/hc").status, 200);
    eventually(Duration::from_secs(5), "b probed", || {
        !b.probes().is_empty()
    });
    // The probe is the one configured, sent once per interval by the master — not once per
    // worker (this gateway runs two).
    let probe = b.probes()[0].to_ascii_lowercase();
    assert!(probe.starts_with("get /healthz http/1.0\r\n"), "{probe}");
    assert!(probe.contains("\r\nhost: probe.example:"), "{probe}");
    assert!(probe.contains("\r\nx-probe: yes\r\n"), "{probe}");
    let before = b.probes().len();
    std::thread::sleep(Duration::from_millis(3200));
    let sent = b.probes().len() - before;
    assert!(
        (2..=4).contains(&sent),
        "{sent} probes in 3.2 s at 1 s intervals"
    );
    assert_eq!(status_metric(&gw, "upstreams/hc", &b).as_deref(), Some("1"));

    // b fails its probes: within two intervals it is left out.
    b.set(500);
    eventually(Duration::from_secs(6), "b marked unhealthy", || {
        status_metric(&gw, "upstreams/hc", &b).as_deref() == Some("0")
    });
    let served = b.served.load(Ordering::Relaxed);
    let seen = answered_by(&gw, "/hc", 20);
    assert!(seen.iter().all(|s| s == "a/200"), "{seen:?}");
    assert_eq!(b.served.load(Ordering::Relaxed), served);
    let log = gw.error_log();
    let line = log_lines(
        &log,
        &format!("upstream node {} of upstreams/hc is unhealthy", b.addr),
    );
    assert!(
        line.iter()
            .any(|l| l.contains("2 × unhealthy HTTP in a row (active check: status 500)")),
        "{log}"
    );
    // `wasmgate status` names it, as the status endpoint does.
    let out = common::run_ok(
        std::process::Command::new(common::bin())
            .args(["status", "-p"])
            .arg(gw.prefix()),
    );
    let line = format!(
        "upstream nodes 2 checked, 1 UNHEALTHY: {} (/apisix/upstreams/hc)",
        b.addr
    );
    assert!(out.contains(&line), "{out}");
    let status = gw.status();
    assert_eq!(status["master"]["health"]["checked"], 2, "{status}");
    let (_, hc) = gw.admin("GET", "/wasmgate/healthcheck", None);
    let up = &hc.as_array().unwrap()[0];
    assert_eq!(up["name"], "/apisix/upstreams/hc");
    assert_eq!(up["type"], "http");
    let nodes = up["nodes"].as_array().unwrap();
    let of = |n: &Node| {
        nodes
            .iter()
            .find(|v| v["port"].as_u64().map(|p| p.to_string()).as_deref() == Some(n.port()))
            .unwrap()
            .clone()
    };
    assert_eq!(of(&a)["status"], "healthy");
    assert_eq!(of(&b)["status"], "unhealthy");

    // Every node unhealthy: the nodes are tried all the same.
    a.set(503);
    eventually(Duration::from_secs(6), "a marked unhealthy", || {
        status_metric(&gw, "upstreams/hc", &a).as_deref() == Some("0")
    });
    let seen = answered_by(&gw, "/hc", 4);
    assert!(
        seen.iter().all(|s| s == "a/503" || s == "b/500"),
        "{seen:?}"
    );

    // Back: one successful probe (successes: 1) and b serves again.
    a.set(200);
    b.set(200);
    eventually(Duration::from_secs(6), "b back", || {
        status_metric(&gw, "upstreams/hc", &b).as_deref() == Some("1")
    });
    eventually(Duration::from_secs(5), "b serving", || {
        answered_by(&gw, "/hc", 4).iter().any(|s| s == "b/200")
    });
    let log = gw.error_log();
    assert!(
        !log_lines(
            &log,
            &format!("upstream node {} of upstreams/hc is healthy again", b.addr)
        )
        .is_empty(),
        "{log}"
    );

    // The upstream gone, so are its records and its probes.
    let (status, _) = gw.admin("DELETE", "/apisix/admin/routes/hc", None);
    assert_eq!(status, 200);
    let (status, _) = gw.admin("DELETE", "/apisix/admin/upstreams/hc", None);
    assert_eq!(status, 200);
    eventually(Duration::from_secs(3), "records removed", || {
        status_metric(&gw, "upstreams/hc", &b).is_none()
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = b.probes().len();
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(
        b.probes().len(),
        before,
        "probes after the upstream was deleted"
    );
}

#[test]
fn passive_checks_take_a_node_out_from_its_answers() {
    let (a, b) = (Node::start("a"), Node::start("b"));
    let gw = Gateway::start();
    // Active TCP checks, far apart: only the traffic's answers take b out within the test.
    let checks = json!({
        "active": {"type": "tcp", "healthy": {"interval": 3600}, "unhealthy": {"interval": 3600}},
        "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 2}}
    });
    let upstream = json!({"nodes": {a.addr.clone(): 1, b.addr.clone(): 1}, "checks": checks});
    put(&gw, "routes/p", json!({"uri": "/p", "upstream": upstream}));
    b.set(500);
    // Each worker balances on its own: b answers some of the first requests, and once two of
    // its 500s were counted — by any worker — it answers no more.
    eventually(Duration::from_secs(5), "b out", || {
        get(&gw, "/p");
        status_metric(&gw, "routes/p", &b).as_deref() == Some("0")
    });
    let seen = answered_by(&gw, "/p", 20);
    assert!(seen.iter().all(|s| s == "a/200"), "{seen:?}");
    let log = gw.error_log();
    assert!(
        log_lines(
            &log,
            &format!("upstream node {} of routes/p is unhealthy", b.addr)
        )
        .iter()
        .any(|l| l.contains("(passive check: status 500)")),
        "{log}"
    );
    assert!(b.probes().is_empty(), "TCP probes send no request");
    assert_eq!(status_metric(&gw, "routes/p", &a).as_deref(), Some("1"));

    // b recovers, and its checks are edited to probe every second: the new interval applies
    // at once (not after the hour the old one would wait), and the node keeps its state.
    b.set(200);
    let checks = json!({"active": {"unhealthy": {"interval": 1}, "healthy": {"interval": 1}}});
    let upstream = json!({"nodes": {a.addr.clone(): 1, b.addr.clone(): 1}, "checks": checks});
    put(&gw, "routes/p", json!({"uri": "/p", "upstream": upstream}));
    assert_eq!(status_metric(&gw, "routes/p", &b).as_deref(), Some("0"));
    eventually(Duration::from_secs(6), "b back", || {
        status_metric(&gw, "routes/p", &b).as_deref() == Some("1")
    });
    assert!(b.probes().len() >= 2, "{:?}", b.probes());
}

/// Retries stay among the healthy nodes, as APISIX builds its picker from them: once they
/// are tried the request has its answer, and a node found unhealthy is not asked again. Node
/// `a` takes each request and closes without answering (retried: a GET); `b` answers 500,
/// which the passive checks count once.
#[test]
fn retries_leave_unhealthy_nodes_out() {
    let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = closing.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in closing.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
        }
    });
    let b = Node::start("b");
    b.set(500);
    let gw = Gateway::start();
    let checks = json!({
        "active": {"type": "tcp", "healthy": {"interval": 3600}, "unhealthy": {"interval": 3600}},
        "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 1, "tcp_failures": 254}}
    });
    let upstream = json!({"nodes": {a: 1, b.addr.clone(): 1}, "checks": checks});
    put(&gw, "routes/r", json!({"uri": "/r", "upstream": upstream}));
    eventually(Duration::from_secs(5), "b out", || {
        get(&gw, "/r");
        status_metric(&gw, "routes/r", &b).as_deref() == Some("0")
    });
    let served = b.served.load(Ordering::Relaxed);
    for _ in 0..5 {
        assert_eq!(get(&gw, "/r").status, 502);
    }
    assert_eq!(
        b.served.load(Ordering::Relaxed),
        served,
        "b was asked again"
    );
}

#[test]
fn checks_are_validated_with_named_fields() {
    let gw = Gateway::start();
    let bad = |checks: Value| {
        let body =
            json!({"uri": "/x", "upstream": {"nodes": {"127.0.0.1:1": 1}, "checks": checks}});
        let (status, v) = gw.admin("PUT", "/apisix/admin/routes/x", Some(body));
        assert_eq!(status, 400, "{v}");
        v["error_msg"].as_str().unwrap().to_string()
    };
    assert!(bad(json!({"passive": {}})).contains("\"upstream.checks.active\" validation failed"));
    assert!(
        bad(json!({"active": {"healthy": {"successes": 0}}})).contains(
            "\"upstream.checks.active.healthy.successes\" validation failed: expected 1 to 254"
        )
    );
    assert!(bad(json!({"active": {"req_headers": ["A: b\r\nC: d"]}}))
        .contains("upstream.checks.active.req_headers"));
    assert!(bad(json!({"active": {"type": "grpc"}})).contains("unknown variant"));
    // A whole APISIX example is taken as written, defaults filled in when read back.
    let body = json!({"nodes": {"127.0.0.1:1": 1}, "checks": {
        "active": {"timeout": 5, "http_path": "/status", "host": "foo.com",
                   "healthy": {"interval": 2, "successes": 1},
                   "unhealthy": {"interval": 1, "http_failures": 2},
                   "req_headers": ["User-Agent: curl/7.29.0"]},
        "passive": {"healthy": {"http_statuses": [200, 201], "successes": 3},
                    "unhealthy": {"http_statuses": [500], "http_failures": 3, "tcp_failures": 3}}
    }});
    let (status, v) = gw.admin("PUT", "/apisix/admin/upstreams/ok", Some(body));
    assert_eq!(status, 201, "{v}");
    let (_, v) = gw.admin("GET", "/apisix/admin/upstreams/ok", None);
    assert_eq!(v["value"]["checks"]["active"]["healthy"]["interval"], 2);
    assert_eq!(
        v["value"]["checks"]["passive"]["unhealthy"]["http_failures"],
        3
    );
}
