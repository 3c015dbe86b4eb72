//! The Prometheus endpoint as a monitoring system sees it: scraped from a running gateway (two
//! workers) on `plugin_attr.prometheus.export_addr`, parsed strictly, and checked against the
//! traffic the test sent.

mod common;

use common::prom::Page;
use common::{http, Gateway, TestUpstream};
use serde_json::json;
use std::time::Duration;

fn scrape(gw: &Gateway) -> (Page, String) {
    let url = format!(
        "http://127.0.0.1:{}/apisix/prometheus/metrics",
        gw.metrics_port
    );
    let r = http("GET", &url, &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    (Page::parse(&text), text)
}

/// A gateway whose route `api` (`/status/*`) runs the `rewrite` plugin, and its upstream.
fn with_api_route() -> (Gateway, TestUpstream) {
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    let conf = json!({"response_set": {"x-hello": "wasm"}}).to_string();
    gw.route(
        "api",
        json!({"uri": "/status/*", "plugins": {"rewrite": {"conf": conf}}}),
        Some(&app),
    );
    (gw, app)
}

/// Requests by route and status, latency histograms by type, bandwidth, plugin contexts and
/// worker counters — summed over both workers.
#[test]
fn scraped_metrics_count_what_was_sent() {
    let (gw, app) = with_api_route();
    gw.route("slow", json!({"uri": "/delay/*"}), Some(&app));

    for _ in 0..20 {
        assert_eq!(http("GET", &gw.url("/status/200"), &[], None).status, 200);
    }
    for _ in 0..7 {
        assert_eq!(http("GET", &gw.url("/status/503"), &[], None).status, 503);
    }
    for _ in 0..4 {
        let r = http("POST", &gw.url("/status/201"), &[], Some(&[b'x'; 1000]));
        assert_eq!(r.status, 201);
    }
    for _ in 0..5 {
        assert_eq!(http("GET", &gw.url("/nowhere"), &[], None).status, 404);
    }
    for _ in 0..3 {
        assert_eq!(http("GET", &gw.url("/delay/60"), &[], None).status, 200);
    }
    // An answer whose head comes at once and whose body takes 30 × 2 ms: the upstream's
    // time runs to the body's end, as nginx's `$upstream_response_time` does.
    gw.route("streamed", json!({"uri": "/stream/*"}), Some(&app));
    for _ in 0..3 {
        assert_eq!(http("GET", &gw.url("/stream/30"), &[], None).status, 200);
    }
    // An upstream that times out: its time is the wait, not nothing.
    gw.route(
        "late",
        json!({"uri": "/delay/1000/*", "timeout": {"connect": 1, "send": 1, "read": 0.2}}),
        Some(&app),
    );
    assert_eq!(http("GET", &gw.url("/delay/1000/x"), &[], None).status, 504);
    // Ingress: the bytes the client sent, to the byte.
    gw.route("bytes", json!({"uri": "/bytes"}), Some(&app));
    let raw = b"GET /bytes HTTP/1.1\r\nHost: metrics.test\r\nX-Pad: 0123456789\r\nConnection: close\r\n\r\n";
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        c.write_all(raw).unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    // A route of a service: APISIX's `service` label names it.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/services/svc",
        Some(json!({"upstream": {"nodes": {app.addr(): 1}}})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/in-svc",
        Some(json!({"uri": "/in-svc/*", "service_id": "svc"})),
    );
    assert_eq!(s, 201, "{v}");
    gw.wait_propagated();
    for _ in 0..2 {
        assert_eq!(
            http("GET", &gw.url("/in-svc/status/200"), &[], None).status,
            200
        );
    }

    // The log phase runs when the response body ends: allow it a moment.
    let mut page;
    let mut tries = 0;
    loop {
        page = scrape(&gw).0;
        let total: f64 = page
            .find("apisix_http_status", &[])
            .iter()
            .map(|s| s.value)
            .sum();
        if total >= 46.0 || tries == 50 {
            break;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // APISIX's names, so that its dashboards and alerts find them: no `_total` on these.
    assert_eq!(page.types["apisix_http_status"], "counter");
    assert_eq!(page.types["apisix_bandwidth"], "counter");
    assert_eq!(page.types["apisix_http_latency"], "histogram");
    for name in ["apisix_http_status_total", "apisix_bandwidth_total"] {
        assert!(!page.types.contains_key(name), "{name}");
    }
    let in_svc = [("code", "200"), ("route", "in-svc"), ("service", "svc")];
    assert_eq!(page.value("apisix_http_status", &in_svc), 2.0);
    assert_eq!(
        page.value(
            "apisix_http_status",
            &[("code", "200"), ("route", "api"), ("service", "")]
        ),
        20.0
    );
    let status = |code: &str, route: &str| {
        page.value("apisix_http_status", &[("code", code), ("route", route)])
    };
    assert_eq!(status("200", "api"), 20.0);
    assert_eq!(status("503", "api"), 7.0);
    assert_eq!(status("201", "api"), 4.0);
    assert_eq!(status("404", ""), 5.0);
    assert_eq!(status("200", "slow"), 3.0);

    // APISIX's modify indexes: each kind's last change, as the Admin API lists it.
    let (_, list) = gw.admin("GET", "/apisix/admin/routes", None);
    let last_route = list["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["modifiedIndex"].as_u64())
        .max()
        .unwrap();
    let index = |key: &str| page.value("apisix_etcd_modify_indexes", &[("key", key)]);
    assert_eq!(index("routes"), last_route as f64);
    assert!(index("services") > 0.0 && index("services") < index("routes"));
    assert_eq!(index("upstreams"), 0.0);
    assert_eq!(index("max_modify_index"), index("routes"));
    assert!(index("x_etcd_index") >= index("max_modify_index"));

    page.check_histograms();
    let lat = |t: &str, route: &str, what: &str| {
        page.value(
            &format!("apisix_http_latency_{what}"),
            &[("type", t), ("route", route)],
        )
    };
    assert_eq!(lat("request", "api", "count"), 31.0);
    assert_eq!(lat("upstream", "api", "count"), 31.0);
    assert_eq!(lat("apisix", "api", "count"), 31.0);
    // The upstream waited 60 ms: nothing at or under 50 ms, the sum at least 3 × 60 ms.
    let slow_upstream_le_50 = page.value(
        "apisix_http_latency_bucket",
        &[("type", "upstream"), ("route", "slow"), ("le", "50")],
    );
    assert_eq!(slow_upstream_le_50, 0.0);
    assert!(lat("upstream", "slow", "sum") >= 180.0);
    assert!(lat("request", "slow", "sum") >= lat("upstream", "slow", "sum"));
    let streamed = lat("upstream", "streamed", "sum");
    assert!(streamed >= 3.0 * 55.0, "upstream {streamed} ms");
    assert!(
        lat("apisix", "streamed", "sum") < streamed / 2.0,
        "the body's wait was put on the gateway: {}",
        lat("apisix", "streamed", "sum")
    );
    assert_eq!(lat("upstream", "late", "count"), 1.0);
    assert!(lat("upstream", "late", "sum") >= 190.0);

    let bw =
        |t: &str, route: &str| page.value("apisix_bandwidth", &[("type", t), ("route", route)]);
    assert!(bw("ingress", "api") >= 4000.0, "{}", bw("ingress", "api"));
    assert_eq!(bw("ingress", "bytes"), raw.len() as f64);
    assert!(bw("egress", "api") > 0.0);

    // Plugin contexts: the route's plugin ran once per request.
    let ctx = [
        ("plugin", "rewrite"),
        ("owner_kind", "route"),
        ("owner_id", "api"),
    ];
    assert_eq!(page.value("apisix_wasm_plugin_requests_total", &ctx), 31.0);
    assert_eq!(page.value("apisix_wasm_plugin_traps_total", &ctx), 0.0);
    assert_eq!(
        page.value("apisix_wasm_plugin_time_seconds_count", &ctx),
        31.0
    );

    // Workers: both listed, and their requests add up to the gateway's total.
    let workers = page.find("apisix_worker_requests_total", &[]);
    assert_eq!(workers.len(), 2, "{workers:?}");
    let per_worker: f64 = workers.iter().map(|s| s.value).sum();
    assert_eq!(per_worker, page.value("apisix_http_requests_total", &[]));
    assert!(per_worker >= 39.0);
    assert_eq!(page.find("apisix_worker_restarts", &[]).len(), 2);
    assert!(page.value("apisix_config_generation", &[]) >= 2.0);
    assert_eq!(page.types["apisix_nginx_http_current_connections"], "gauge");
}

/// Counters only grow while the master runs: a reload replaces both workers and a killed
/// worker is replaced, and what they had counted stays in the totals (APISIX's counters
/// outlive a reload in nginx's shared dictionaries).
#[test]
fn counters_go_on_across_a_reload_and_a_crash() {
    let (gw, _app) = with_api_route();
    let send = |n: usize| {
        for _ in 0..n {
            assert_eq!(http("GET", &gw.url("/status/200"), &[], None).status, 200);
        }
    };
    let ctx = [
        ("plugin", "rewrite"),
        ("owner_kind", "route"),
        ("owner_id", "api"),
    ];
    // (responses of the route, its plugin's requests, all requests, /wasmgate/stats' count)
    let counted = || {
        let page = scrape(&gw).0;
        let (_, stats) = gw.admin("GET", "/wasmgate/stats", None);
        let in_stats = stats["contexts"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["owner_id"] == "api"))
            .and_then(|c| c["requests"].as_u64());
        (
            page.value("apisix_http_status", &[("code", "200"), ("route", "api")]),
            page.value("apisix_wasm_plugin_requests_total", &ctx),
            page.value("apisix_http_requests_total", &[]),
            in_stats,
        )
    };
    let reaches = |n: f64| {
        common::eventually(Duration::from_secs(10), &format!("{n} counted"), || {
            let (status, plugin, all, stats) = counted();
            status == n && plugin == n && all >= n && stats == Some(n as u64)
        });
    };
    let gone = |pids: &[i32]| {
        common::eventually(Duration::from_secs(15), "the old workers gone", || {
            pids.iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        });
    };
    send(10);
    reaches(10.0);
    let old = gw.worker_pids();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    gone(&old);
    reaches(10.0);
    send(5);
    reaches(15.0);
    // A worker killed — one that served some of them: the master replaces it and keeps its
    // counts.
    let status = gw.status();
    let served = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["requests"].as_u64() > Some(0))
        .unwrap_or_else(|| panic!("no worker served: {status}"));
    let victim = served["pid"].as_i64().unwrap() as i32;
    let number = served["worker_id"].to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    gone(&[victim]);
    common::eventually(Duration::from_secs(10), "two workers again", || {
        let pids = gw.worker_pids();
        pids.len() == 2 && !pids.contains(&victim) && pids.iter().all(|p| *p != 0)
    });
    reaches(15.0);
    // The respawn is counted under the worker's number, one series whatever its pid.
    let restarts = scrape(&gw).0;
    let restarts = restarts.find("apisix_worker_restarts", &[("worker", number.as_str())]);
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0].value, 1.0);
    assert!(!restarts[0].labels.contains_key("pid"));
    send(5);
    reaches(20.0);
    // Connections accepted go on too (a connection per request here), as nginx's `accepts`.
    let accepted = scrape(&gw).0.value(
        "apisix_nginx_http_current_connections",
        &[("state", "accepted")],
    );
    assert!(accepted >= 20.0, "{accepted}");
}

/// `apisix_nginx_http_current_connections` has nginx's stub_status states, as APISIX's
/// dashboard reads them: idle keep-alive connections wait, one whose head is half sent
/// reads, one whose request is being handled writes; accepted and handled only grow.
#[test]
fn connection_states_as_nginx_counts_them() {
    use std::io::{BufRead, BufReader, Read, Write};
    let gw = Gateway::start();
    let app = TestUpstream::start("app");
    gw.route("r", json!({"uri": "/*"}), Some(&app));
    let states = || {
        let page = scrape(&gw).0;
        let v = |s: &str| page.value("apisix_nginx_http_current_connections", &[("state", s)]);
        [
            "accepted", "handled", "active", "reading", "writing", "waiting",
        ]
        .map(v)
    };
    // Three keep-alive connections, each after one request: waiting.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        c.write_all(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        idle.push((c, r));
    }
    // One whose head is half sent: reading.
    let mut half = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    half.write_all(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // One whose request waits on a slow upstream: writing.
    let slow_port = gw.proxy_port;
    let slow = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", slow_port)).unwrap();
        c.write_all(b"GET /delay/1500 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    });
    common::eventually(Duration::from_secs(5), "the states counted", || {
        let [_, _, active, reading, writing, waiting] = states();
        (active, reading, writing, waiting) == (5.0, 1.0, 1.0, 3.0)
    });
    let [accepted, handled, ..] = states();
    assert_eq!(accepted, 5.0);
    assert_eq!(handled, accepted);
    assert!(slow.join().unwrap().starts_with("HTTP/1.1 200"));
    drop(idle);
    drop(half);
    common::eventually(Duration::from_secs(5), "all closed", || {
        states() == [5.0, 5.0, 0.0, 0.0, 0.0, 0.0]
    });
}

/// Only the configured path is served; the Admin API's `/wasmgate/metrics` has the same
/// families, behind the key.
#[test]
fn the_export_listener_serves_only_its_path() {
    let gw = Gateway::start();
    let base = format!("http://127.0.0.1:{}", gw.metrics_port);
    let r = http("GET", &format!("{base}/metrics"), &[], None);
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("/apisix/prometheus/metrics"),
        "{}",
        r.text()
    );
    let r = http(
        "POST",
        &format!("{base}/apisix/prometheus/metrics"),
        &[],
        None,
    );
    assert_eq!(r.status, 405);

    let (page, _) = scrape(&gw);
    let admin = gw.admin_url("/wasmgate/metrics");
    assert_eq!(http("GET", &admin, &[], None).status, 401);
    let r = http("GET", &admin, &[("X-API-KEY", common::KEY)], None);
    let via_admin = Page::parse(&r.text());
    let mut a: Vec<_> = page.types.keys().collect();
    let mut b: Vec<_> = via_admin.types.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

/// `metric_prefix` renames the gateway's families; `enable_export_server: false` closes the
/// listener (the Admin API still serves the page).
#[test]
fn prefix_and_disabled_export_server() {
    let port = common::free_port();
    let gw = Gateway::start_with(common::Setup {
        raw_yaml: Some(format!(
            "apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {{proxy}}}}]\n\
             deployment:\n  admin:\n    admin_key: [{{name: admin, key: {key}}}]\n    admin_listen: {{ip: 127.0.0.1, port: {{admin}}}}\n\
             nginx_config:\n  worker_processes: 1\n\
             plugin_attr:\n  prometheus:\n    enable_export_server: false\n    export_addr: {{ip: 127.0.0.1, port: {port}}}\n    metric_prefix: edge_\n",
            key = common::KEY
        )),
        workers: 1,
        ..Default::default()
    });
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let r = http(
        "GET",
        &gw.admin_url("/wasmgate/metrics"),
        &[("X-API-KEY", common::KEY)],
        None,
    );
    let page = Page::parse(&r.text());
    assert!(
        page.types.contains_key("edge_http_requests_total"),
        "{}",
        r.text()
    );
    assert!(
        !page.types.keys().any(|k| k.starts_with("apisix_")),
        "{}",
        r.text()
    );
}

/// Waits until the page has the one sample `name{labels}` with the value `n` (requests are
/// counted in their log phase, which may end after the client has its answer).
fn counted(gw: &Gateway, name: &str, labels: &[(&str, &str)], n: f64) {
    common::eventually(
        Duration::from_secs(10),
        &format!("{name}{labels:?} = {n}"),
        || {
            let page = scrape(gw).0;
            let found = page.find(name, labels);
            found.len() == 1 && found[0].value == n
        },
    );
}

/// Routes created and deleted through the Admin API for as long as a worker lives: a deleted
/// route's series end once its requests are counted, and its records (route traffic, its
/// plugin's context) are taken by the next route, so that a worker that saw more routes come
/// and go than its tables hold (4 096 routes, 4 096 plugin contexts) still counts each live
/// route under its own id — not under `route="*"`, and not left out.
#[test]
fn deleted_routes_leave_the_metrics_and_their_records_serve_new_routes() {
    let gw = Gateway::start_with(common::Setup {
        workers: 1,
        ..Default::default()
    });
    let app = TestUpstream::start("app");
    let upstream = json!({"type": "roundrobin", "nodes": {app.addr(): 1}});
    let plugin = json!({"rewrite": {"conf": json!({"response_set": {"x-n": "1"}}).to_string()}});
    let mut client = common::client::KeepAlive::new(&gw.url("/"));
    // A route disabled and enabled again is not deleted: its counters go on.
    gw.route(
        "kept",
        json!({"uri": "/kept", "plugins": plugin}),
        Some(&app),
    );
    for status in [None, Some(0), Some(1)] {
        if let Some(status) = status {
            let (s, v) = gw.admin(
                "PATCH",
                "/apisix/admin/routes/kept",
                Some(json!({"status": status})),
            );
            assert_eq!(s, 200, "{v}");
            gw.wait_propagated();
            // The housekeeping that releases records of deleted objects runs meanwhile.
            std::thread::sleep(Duration::from_millis(600));
        }
        if status != Some(0) {
            assert_eq!(client.get("/kept").unwrap().status, 200);
        }
    }
    let kept = [("code", "200"), ("route", "kept")];
    counted(&gw, "apisix_http_status", &kept, 2.0);
    let kept = [("plugin", "rewrite"), ("owner_id", "kept")];
    counted(&gw, "apisix_wasm_plugin_requests_total", &kept, 2.0);
    let (s, v) = gw.admin("DELETE", "/apisix/admin/routes/kept", None);
    assert_eq!(s, 200, "{v}");
    let started = std::time::Instant::now();
    let routes = wasmgate_shared::traffic::ROUTES_PER_SLOT + 100;
    for i in 0..routes {
        let body = json!({"uri": format!("/r/{i}"), "upstream": upstream, "plugins": plugin});
        let (s, v) = gw.admin("PUT", &format!("/apisix/admin/routes/r{i}"), Some(body));
        assert!(s == 200 || s == 201, "route r{i}: {s} {v}");
        let r = client.get(&format!("/r/{i}")).unwrap();
        assert_eq!(r.status, 200, "/r/{i}: {}", r.text());
        if i % 200 == 0 {
            // The series of a live route, before it goes.
            let id = format!("r{i}");
            let code = [("code", "200"), ("route", id.as_str())];
            counted(&gw, "apisix_http_status", &code, 1.0);
            let ctx = [("plugin", "rewrite"), ("owner_id", id.as_str())];
            counted(&gw, "apisix_wasm_plugin_requests_total", &ctx, 1.0);
        }
        let (s, v) = gw.admin("DELETE", &format!("/apisix/admin/routes/r{i}"), None);
        assert_eq!(s, 200, "delete r{i}: {v}");
    }
    eprintln!(
        "{routes} routes created, served and deleted in {:?}",
        started.elapsed()
    );
    gw.route(
        "last",
        json!({"uri": "/last", "plugins": plugin}),
        Some(&app),
    );
    for _ in 0..3 {
        assert_eq!(client.get("/last").unwrap().status, 200);
    }
    let last = [("code", "200"), ("route", "last")];
    counted(&gw, "apisix_http_status", &last, 3.0);
    let ctx = [("plugin", "rewrite"), ("owner_id", "last")];
    counted(&gw, "apisix_wasm_plugin_requests_total", &ctx, 3.0);
    let text = scrape(&gw).1;
    let named: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("apisix_http_status{"))
        .collect();
    assert_eq!(
        named.len(),
        1,
        "only the live route has a series: {named:?}"
    );
    // Contexts go with the worker's housekeeping (every 200 ms), after their route.
    common::eventually(
        Duration::from_secs(10),
        "only the live route's context",
        || {
            let text = scrape(&gw).1;
            let contexts = text
                .lines()
                .filter(|l| l.starts_with("apisix_wasm_plugin_requests_total{"));
            contexts.count() == 1
        },
    );
    // A reload replaces the worker: the deleted routes do not come back from the counts the
    // master keeps of the workers that left.
    let old = gw.worker_pids();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    common::eventually(Duration::from_secs(15), "the old worker gone", || {
        old.iter().all(|p| !common::alive(*p))
    });
    assert_eq!(http("GET", &gw.url("/last"), &[], None).status, 200);
    common::eventually(Duration::from_secs(10), "4 requests counted", || {
        scrape(&gw).0.value("apisix_http_status", &last) == 4.0
    });
    let text = scrape(&gw).1;
    let routes: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("apisix_http_status{"))
        .collect();
    assert_eq!(routes.len(), 1, "{routes:?}");
}

/// When each served SSL object's certificate expires, for an alert on it: the certificate's
/// notAfter; none for an object kept but not served.
#[test]
fn certificate_expiry_is_exported() {
    let gw = Gateway::start();
    let ca = common::tls::Ca::new("metrics CA");
    let (cert, key) = ca.issue("a.test", &["a.test"]);
    let mut body = json!({"cert": cert.pem(), "key": key.serialize_pem(), "snis": ["a.test"]});
    let (s, v) = gw.admin("PUT", "/apisix/admin/ssls/1", Some(body.clone()));
    assert_eq!(s, 201, "{v}");
    let expiry = "apisix_ssl_certificate_not_after_seconds";
    let (page, text) = scrape(&gw);
    // rcgen's default notAfter: 4096-01-01.
    assert_eq!(page.value(expiry, &[("id", "1")]), 67090118400.0, "{text}");
    body["status"] = json!(0);
    let (s, v) = gw.admin("PUT", "/apisix/admin/ssls/1", Some(body));
    assert_eq!(s, 200, "{v}");
    let (page, text) = scrape(&gw);
    assert!(page.find(expiry, &[]).is_empty(), "{text}");
}
