//! Real Proxy-Wasm SDK plugins (tests/plugins/, Rust SDK) through a running gateway: contexts
//! created lazily per route, header rewriting both ways, local replies, phase order, faults.

mod common;

use common::{alive, eventually, http, Gateway, Setup, TestUpstream};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn one_worker() -> Gateway {
    Gateway::start_with(Setup {
        workers: 1,
        ..Setup::default()
    })
}

fn echo(gw: &Gateway, path: &str) -> Value {
    let r = http("GET", &gw.url(path), &[("X-Probe", "p1")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo"), Some("1"));
    r.json()
}

/// The seed's model: one PluginContext per route, created by the first request (not by the
/// Admin API write), configured with that route's `conf`; a route update makes a new one.
#[test]
fn plugin_contexts_are_per_route_and_lazy() {
    let gw = one_worker();
    gw.route(
        "a",
        json!({"uri": "/a", "name": "route-a", "plugins": {"echo": {"conf": "A"}}}),
        None,
    );
    gw.route(
        "b",
        json!({"uri": "/b", "plugins": {"echo": {"conf": {"k": "B"}}}}),
        None,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !gw.error_log().contains("echo: configured root context"),
        "configured before any request"
    );

    let a = echo(&gw, "/a?a=42");
    assert_eq!(
        (a["conf"].as_str(), a["configures"].as_u64()),
        (Some("A"), Some(1))
    );
    assert_eq!(a["vm_starts"], 1);
    assert_eq!(
        echo(&gw, "/a")["configures"],
        1,
        "second request reuses the context"
    );
    let b = echo(&gw, "/b");
    assert_eq!(
        (b["conf"].as_str(), b["configures"].as_u64()),
        (Some("{\"k\":\"B\"}"), Some(2))
    );
    assert_ne!(a["root_id"], b["root_id"]);
    assert_ne!(
        a["context_id"],
        echo(&gw, "/a")["context_id"],
        "one HttpContext per request"
    );

    // Properties: Envoy names, the plugin's own, APISIX's nginx variables.
    assert_eq!(a["plugin_name"], "echo");
    assert_eq!(a["plugin_root_id"], "echo");
    assert_eq!(a["route_name"], "route-a");
    assert_eq!(a["xds_route_name"], "route-a");
    assert_eq!(a["protocol"], "HTTP/1.1");
    assert_eq!(a["route_id"], "a");
    assert_eq!(a["path"], "/a?a=42");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["host"], format!("127.0.0.1:{}", gw.proxy_port));
    assert!(a["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(a["arg_a"], "42");
    let headers = a["headers"].as_array().unwrap();
    assert!(
        headers.contains(&json!([":method", "GET"])) && headers.contains(&json!(["x-probe", "p1"])),
        "{headers:?}"
    );

    // An update: new PluginContext with the new conf.
    let (s, _) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/a",
        Some(json!({"plugins": {"echo": {"conf": "A2"}}})),
    );
    assert_eq!(s, 200);
    gw.wait_propagated();
    let a2 = echo(&gw, "/a");
    assert_eq!(
        (a2["conf"].as_str(), a2["configures"].as_u64()),
        (Some("A2"), Some(3))
    );
    assert_ne!(a2["root_id"], a["root_id"]);
}

/// APISIX's plugin configs: a route with `plugin_config_id` runs the plugin config's plugins
/// under its own (a plugin it configures itself keeps the route's settings); an edit of the
/// plugin config reaches its routes as new PluginContexts; deleting one in use is refused,
/// and when forced, its routes answer 503 instead of running without the plugins.
#[test]
fn plugin_configs_give_routes_their_plugins() {
    let gw = one_worker();
    let pc = "/apisix/admin/plugin_configs";
    let (s, v) = gw.admin(
        "PUT",
        &format!("{pc}/pc1"),
        Some(json!({"desc": "shared", "plugins": {"echo": {"conf": "from-config"}}})),
    );
    assert_eq!(
        (s, v["key"].as_str()),
        (201, Some("/apisix/plugin_configs/pc1")),
        "{v}"
    );
    // APISIX's rules: the id is required (no POST), and so are the plugins, known ones.
    let (s, v) = gw.admin("POST", pc, Some(json!({"plugins": {}})));
    assert_eq!(s, 405, "{v}");
    let (s, v) = gw.admin(
        "PUT",
        &format!("{pc}/bad"),
        Some(json!({"plugins": {"nope": {"conf": "x"}}})),
    );
    assert_eq!(
        (s, v["error_msg"].as_str()),
        (400, Some("unknown plugin [nope]"))
    );
    let (s, v) = gw.admin("PUT", &format!("{pc}/bad"), Some(json!({"desc": "x"})));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("\"plugins\" is required"),
        "{v}"
    );
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/x",
        Some(json!({"uri": "/x", "plugin_config_id": "nope"})),
    );
    assert_eq!(
        (s, v["error_msg"].as_str()),
        (
            400,
            Some(
                "failed to fetch plugin config info by plugin config id [nope], response code: 404"
            )
        )
    );

    gw.route("a", json!({"uri": "/a", "plugin_config_id": "pc1"}), None);
    gw.route(
        "b",
        json!({"uri": "/b", "plugin_config_id": "pc1", "plugins": {"echo": {"conf": "own"}}}),
        None,
    );
    let a = echo(&gw, "/a");
    assert_eq!(a["conf"], "from-config");
    assert_eq!(
        echo(&gw, "/b")["conf"],
        "own",
        "the route's own settings win"
    );

    // Edited: its routes get a new context with the new settings; the route with its own
    // settings keeps them.
    let (s, v) = gw.admin(
        "PATCH",
        &format!("{pc}/pc1"),
        Some(json!({"plugins": {"echo": {"conf": "v2"}}})),
    );
    assert_eq!(s, 200, "{v}");
    gw.wait_propagated();
    let a2 = echo(&gw, "/a");
    assert_eq!(a2["conf"], "v2");
    assert_ne!(a2["root_id"], a["root_id"]);
    assert_eq!(echo(&gw, "/b")["conf"], "own");

    // In use: kept, unless forced.
    let (s, v) = gw.admin("DELETE", &format!("{pc}/pc1"), None);
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("can not delete this plugin config, route ["),
        "{v}"
    );
    let (s, v) = gw.admin("DELETE", &format!("{pc}/pc1?force=true"), None);
    assert_eq!(s, 200, "{v}");
    gw.wait_propagated();
    let r = http("GET", &gw.url("/a"), &[], None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-echo"), None, "no plugin ran");
    assert!(
        gw.error_log()
            .contains("route a: failed to fetch plugin config by id: pc1"),
        "{}",
        gw.error_log()
    );
    // Written again: served again.
    let (s, _) = gw.admin(
        "PUT",
        &format!("{pc}/pc1"),
        Some(json!({"plugins": {"echo": {"conf": "v3"}}})),
    );
    assert_eq!(s, 201);
    gw.wait_propagated();
    assert_eq!(echo(&gw, "/a")["conf"], "v3");
    let (s, v) = gw.admin("GET", pc, None);
    assert_eq!((s, v["total"].as_u64()), (200, Some(1)), "{v}");
}

#[test]
fn headers_are_rewritten_both_ways() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    let conf = json!({
        "set": {"x-set": "1", "user-agent": "wasm"},
        "add": {"x-added": "2"},
        "remove": ["x-remove-me"],
        "path": "/rewritten?q=1",
        "response_set": {"x-resp": "yes"},
        "response_remove": ["x-upstream"]
    });
    gw.route(
        "1",
        json!({"uri": "/orig", "plugins": {"rewrite": {"conf": conf}}}),
        Some(&up),
    );
    let r = http(
        "GET",
        &gw.url("/orig"),
        &[("X-Remove-Me", "x"), ("User-Agent", "curl")],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["uri"], "/rewritten?q=1");
    let h = &echo["headers"];
    assert_eq!(
        (
            h["x-set"].as_str(),
            h["x-added"].as_str(),
            h["user-agent"].as_str()
        ),
        (Some("1"), Some("2"), Some("wasm"))
    );
    assert!(h.get("x-remove-me").is_none(), "{h}");
    assert_eq!(h["x-wasm-plugin"], "rewrite");
    assert_eq!(r.header("x-resp"), Some("yes"));
    assert_eq!(r.header("x-upstream"), None);
}

/// A plugin that sets, removes or replaces the answer's framing fields (`Content-Length`,
/// `Transfer-Encoding`) cannot make the gateway send a body that disagrees with them: the
/// framing is worked out again from the body the plugins let through. One that leaves them
/// alone keeps the upstream's.
#[test]
fn plugins_cannot_break_the_answers_framing() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    let routes = [
        ("wrong", json!({"response_set": {"content-length": "999"}})),
        ("gone", json!({"response_remove": ["content-length"]})),
        (
            "chunked",
            json!({"response_set": {"transfer-encoding": "chunked"}}),
        ),
        ("other", json!({"response_set": {"x-other": "1"}})),
    ];
    for (id, conf) in &routes {
        gw.route(
            id,
            json!({"uri": format!("/{id}"), "plugins": {"rewrite": {"conf": conf}}}),
            Some(&up),
        );
    }
    for (id, _) in &routes {
        // The client reads exactly Content-Length bytes: a wrong one would cut the JSON short
        // or leave it waiting for bytes that never come.
        let r = http("GET", &gw.url(&format!("/{id}")), &[], None);
        assert_eq!(r.status, 200, "/{id}: {}", r.text());
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "/{id}: {:?}",
            r.headers
        );
        assert_eq!(
            r.header("transfer-encoding"),
            None,
            "/{id}: {:?}",
            r.headers
        );
        assert_eq!(r.json()["uri"], format!("/{id}"), "/{id}");
    }

    // The request's side: a length a plugin sets on a request without a body goes upstream
    // as 0. As written, the node would wait for 7 bytes, or take the next request's.
    gw.route(
        "req",
        json!({"uri": "/req", "plugins": {"rewrite": {"conf": {"set": {"content-length": "7"}}}}}),
        Some(&up),
    );
    let mut c = common::client::KeepAlive::new(&gw.url(""));
    for _ in 0..2 {
        let r = c.get("/req").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["headers"]["content-length"], "0", "{}", r.text());
    }
    // A length that is not a number is not sent beside the body's own framing (two lengths,
    // or a length and chunks, which a node reads one way and a proxy in front of it another).
    gw.route(
        "badlen",
        json!({"uri": "/badlen", "plugins": {"rewrite": {"conf": {"set": {"content-length": "0x5"}}}}}),
        Some(&up),
    );
    let r = http("POST", &gw.url("/badlen"), &[], Some(b"hello"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(
        (
            j["headers"]["content-length"].as_str(),
            j["body_len"].as_u64()
        ),
        (Some("5"), Some(5)),
        "{j}"
    );
    assert!(j["headers"].get("transfer-encoding").is_none(), "{j}");
}

/// `callback_timeout: off` runs a plugin without a time limit, compiled without the checks a
/// limit needs (another engine): the same file under two entries, one with a limit and one
/// without, serves both, at start and after a reload that reuses the compiled code. A limit
/// of 0 is refused, naming `off`.
#[test]
fn a_plugin_without_a_time_limit_runs_beside_the_same_file_with_one() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    let file = common::fixture("header_rewrite");
    let with = |limit: &str| {
        format!(
            "{good}    - {{name: free, priority: 2, file: \"{file}\", callback_timeout: {limit}}}\n"
        )
    };
    std::fs::write(gw.config_path(), with("off")).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    for (id, plugin) in [("limited", "rewrite"), ("free", "free")] {
        let conf = json!({"response_set": {"x-by": plugin}});
        gw.route(
            id,
            json!({"uri": format!("/{id}"), "plugins": {plugin: {"conf": conf}}}),
            Some(&up),
        );
    }
    let check = || {
        for (id, plugin) in [("limited", "rewrite"), ("free", "free")] {
            let r = http("GET", &gw.url(&format!("/{id}")), &[], None);
            assert_eq!((r.status, r.header("x-by")), (200, Some(plugin)), "/{id}");
        }
    };
    check();
    let (s, plugins) = gw.admin("GET", "/wasmgate/plugins", None);
    assert_eq!(s, 200, "{plugins}");
    let limit = |name: &str| {
        plugins["plugins"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .map(|p| p["callback_timeout_ms"].clone())
    };
    assert_eq!(limit("free"), Some(Value::Null), "{plugins}");
    assert_eq!(limit("rewrite"), Some(json!(100)), "{plugins}");
    // Reloaded unchanged: each entry's compiled code is reused on its own engine.
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    check();
    std::fs::write(gw.config_path(), with("0")).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"].as_str().unwrap().contains("say `off`"),
        "{v}"
    );
    check();
}

/// `WASMGATE_PERF_MAP=1`: each worker writes /tmp/perf-<pid>.map naming the plugins' compiled
/// functions, so that `perf` attributes a worker's samples inside plugin code.
#[test]
fn perf_map_names_the_plugins_code() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        workers: 1,
        env: vec![("WASMGATE_PERF_MAP", "1")],
        ..Setup::default()
    });
    let conf = json!({"response_set": {"x-resp": "yes"}});
    gw.route(
        "1",
        json!({"uri": "/p", "plugins": {"rewrite": {"conf": conf}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/p"), &[], None);
    assert_eq!((r.status, r.header("x-resp")), (200, Some("yes")));
    for pid in gw.worker_pids() {
        let path = format!("/tmp/perf-{pid}.map");
        let map = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let _ = std::fs::remove_file(&path);
        // perf's format: `<start, hex> <size, hex> <name>`, one function a line.
        let functions = map
            .lines()
            .filter(|l| {
                let mut f = l.splitn(3, ' ');
                let (Some(start), Some(size), Some(name)) = (f.next(), f.next(), f.next()) else {
                    return false;
                };
                u64::from_str_radix(start.trim_start_matches("0x"), 16).is_ok()
                    && u64::from_str_radix(size, 16).is_ok_and(|n| n > 0)
                    && name.contains("function[")
            })
            .count();
        assert!(
            functions > 50,
            "{functions} plugin functions in {path}:\n{map:.2000}"
        );
    }
}

#[test]
fn local_response_ends_the_request() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route(
        "1",
        json!({"uri": "/private", "plugins": {"wasm_auth": {"conf": "s3cret"}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/private"), &[], None);
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "unauthorized\n");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"wasmgate\"")
    );
    let r = http(
        "GET",
        &gw.url("/private"),
        &[("Authorization", "Bearer wrong")],
        None,
    );
    assert_eq!(r.status, 401);
    assert_eq!(up.hits(), 0);
    let r = http(
        "GET",
        &gw.url("/private"),
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-authenticated"], "yes");
    assert!(h.get("authorization").is_none());
    assert_eq!(up.hits(), 1);
}

/// A local reply goes through the response phase of the contexts that saw the request, the
/// replying one included (Envoy's filters, APISIX's header_filter): headers a plugin adds to
/// every answer reach a 401 made by another plugin; a plugin that never ran does not see it.
#[test]
fn local_replies_go_through_the_response_phase() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/global_rules/1",
        Some(json!({"plugins": {"rec_b": {"conf": "global-b"}}})),
    );
    assert_eq!(s, 201, "{v}");
    // Rewrite phase: the global rule's rec_b, then the route's wasm_auth; access: rec_a.
    gw.route(
        "1",
        json!({"uri": "/guarded", "plugins": {"wasm_auth": {"conf": "s3cret"}, "rec_a": {"conf": "route-a"}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/guarded"), &[], None);
    assert_eq!(r.status, 401, "{}", gw.error_log());
    assert_eq!(r.text(), "unauthorized\n");
    assert_eq!(r.header("x-order-response"), Some("global-b"));
    assert_eq!(r.header("x-status-seen-by-global-b"), Some("401"));
    assert_eq!(r.header("x-status-seen-by-route-a"), None);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"wasmgate\"")
    );
    // Its length stays in its head, though the recorder's body callbacks held it.
    assert_eq!(r.header("content-length"), Some("13"));
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(up.hits(), 0);
    // Let through, the upstream's answer gets all three.
    let r = http(
        "GET",
        &gw.url("/guarded"),
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-order-response"), Some("global-b,route-a"));
    // A 404 for a request no route matched, from the global rule's point of view.
    let r = http("GET", &gw.url("/nowhere"), &[], None);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-status-seen-by-global-b"), Some("404"));
}

/// global rules before the route (their access-phase plugins before the route's rewrite-phase
/// ones, as APISIX runs global rules first); rewrite before access; higher priority first —
/// the plugins of all global rules ordered together, not rule by rule; a global rule plus a
/// route make two HttpContexts for one request, each finished at the end.
#[test]
fn phases_priorities_and_global_rules() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/global_rules/1",
        Some(json!({"plugins": {"rec_a": {"conf": "global-a"}}})),
    );
    assert_eq!(s, 201, "{v}");
    // A second rule's rewrite-phase plugin and its higher-priority access-phase one run
    // before the first rule's rec_a.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/global_rules/2",
        Some(json!({"plugins": {"rec_b": {"conf": "global2-b"}, "wasm_log": {"conf": "global2-log"}}})),
    );
    assert_eq!(s, 201, "{v}");
    gw.route(
        "1",
        json!({"uri": "/o", "plugins": {"rec_b": {"conf": "route-b"}, "wasm_log": {"conf": "route-log"}, "rec_a": {"conf": "route-a"}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/o"), &[], None);
    assert_eq!(r.status, 200, "{}", gw.error_log());
    let order = "global2-b,global2-log,global-a,route-b,route-log,route-a";
    assert_eq!(r.json()["headers"]["x-order"], order);
    assert_eq!(r.header("x-order-response"), Some(order));
    assert_eq!(r.header("x-status-seen-by-global-a"), Some("200"));
    eventually(Duration::from_secs(5), "log and done callbacks", || {
        let log = gw.error_log();
        let all = [
            "global2-b",
            "global2-log",
            "global-a",
            "route-b",
            "route-log",
            "route-a",
        ];
        all.iter().all(|l| {
            log.contains(&format!("recorder {l}: on_log"))
                && log.contains(&format!("recorder {l}: on_done"))
        })
    });
}

#[test]
fn refused_configuration_answers_503() {
    let gw = Gateway::start();
    gw.route(
        "1",
        json!({"uri": "/r", "plugins": {"echo": {"conf": "refuse"}}}),
        None,
    );
    for _ in 0..3 {
        assert_eq!(http("GET", &gw.url("/r"), &[], None).status, 503);
    }
    assert!(
        gw.error_log()
            .contains("echo: failed to configure the plugin for route 1"),
        "{}",
        gw.error_log()
    );
    // Its statistics count the requests it failed as requests, each an error: the route is
    // failing, not idle.
    eventually(Duration::from_secs(5), "3 requests, 3 errors", || {
        let (_, v) = gw.admin("GET", "/wasmgate/stats", None);
        v["contexts"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["plugin"] == "echo"
                    && c["owner_id"] == "1"
                    && c["requests"] == 3
                    && c["errors"] == 3
            })
        })
    });
}

/// Traps, endless loops and memory bombs fail the request closed (503), are logged, and the
/// plugin gets a fresh instance; `fail_open` lets the request through; the worker never dies.
#[test]
fn misbehaving_plugins_are_contained() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    let pids = gw.worker_pids();
    for (id, mode) in [
        ("trap", "trap"),
        ("loop", "loop"),
        ("oom", "oom"),
        ("ok", "fine"),
    ] {
        gw.route(
            id,
            json!({"uri": format!("/{id}"), "plugins": {"faulty": {"conf": mode}}}),
            Some(&up),
        );
    }
    gw.route(
        "open",
        json!({"uri": "/open", "plugins": {"faulty_open": {"conf": "trap"}}}),
        Some(&up),
    );

    assert_eq!(http("GET", &gw.url("/trap"), &[], None).status, 503);
    let t = Instant::now();
    assert_eq!(http("GET", &gw.url("/loop"), &[], None).status, 503);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "loop ran {:?}",
        t.elapsed()
    );
    assert_eq!(http("GET", &gw.url("/oom"), &[], None).status, 503);
    // Later requests succeed on a fresh instance.
    for _ in 0..4 {
        let r = http("GET", &gw.url("/ok"), &[], None);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["headers"]["x-faulty"], "ok");
    }
    // fail_open: the plugin traps, the request goes on without it.
    let r = http("GET", &gw.url("/open"), &[], None);
    assert_eq!(r.status, 200);
    let log = gw.error_log();
    assert!(log.contains("faulty: trap"), "{log}");
    assert!(
        log.contains("faulty: callback exceeded its time limit"),
        "{log}"
    );
    assert!(
        log.contains("faulty: instance exceeded its memory limit"),
        "{log}"
    );
    assert!(
        log.contains("faulty_open: trap") && log.contains("fail_open: the request continues"),
        "{log}"
    );
    assert_eq!(gw.worker_pids(), pids, "a worker died");
    let faults = gw.plugin_faults();
    assert_eq!(
        faults, 4,
        "trap, loop, oom and the fail_open trap are counted"
    );
    assert!(pids.iter().all(|p| alive(*p)));
}

fn write_module(gw: &Gateway, file: &str, wat: &str) {
    std::fs::write(gw.prefix().join(file), wat::parse_str(wat).unwrap()).unwrap();
}

/// Modules that cannot work are refused at start and at reload, naming the plugin and the
/// symbol; on reload the old configuration keeps serving.
#[test]
fn bad_modules_are_refused_with_the_symbol_named() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route(
        "1",
        json!({"uri": "/x", "plugins": {"wasm_log": {"conf": "c"}}}),
        Some(&up),
    );
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    let with = |file: &str| format!("{good}    - {{name: extra, priority: 1, file: {file}}}\n");
    write_module(
        &gw,
        "no_marker.wasm",
        r#"(module (memory (export "memory") 1) (func (export "proxy_on_context_create") (param i32 i32)))"#,
    );
    write_module(
        &gw,
        "bad_import.wasm",
        r#"(module (import "env" "proxy_does_not_exist" (func (param i32) (result i32)))
                   (memory (export "memory") 1)
                   (func (export "proxy_abi_version_0_2_1"))
                   (func (export "proxy_on_context_create") (param i32 i32)))"#,
    );
    // A second memory would be outside `memory_limit`.
    write_module(
        &gw,
        "two_memories.wasm",
        r#"(module (memory (export "memory") 1) (memory $other 1)
                   (func (export "proxy_abi_version_0_2_1"))
                   (func (export "proxy_on_context_create") (param i32 i32)))"#,
    );
    for (file, expect) in [
        ("no_marker.wasm", "no Proxy-Wasm ABI marker"),
        ("two_memories.wasm", "memories"),
        (
            "bad_import.wasm",
            "unknown import env::proxy_does_not_exist",
        ),
        ("missing.wasm", "cannot read"),
    ] {
        std::fs::write(gw.config_path(), with(file)).unwrap();
        let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
        assert_eq!(s, 400, "{v}");
        let msg = v["error_msg"].as_str().unwrap();
        assert!(msg.contains("\"extra\"") && msg.contains(expect), "{msg}");
        assert_eq!(http("GET", &gw.url("/x"), &[], None).status, 200);
        // `wasmgate test` says the same.
        let out = std::process::Command::new(common::bin())
            .args(["test", "-p"])
            .arg(gw.prefix())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect));
    }
    // ABI 0.2.0 modules (Go SDKs) load, and so do modules importing WASI under either name.
    write_module(
        &gw,
        "abi020.wasm",
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                   (import "wasi_unstable" "clock_time_get" (func (param i32 i64 i32) (result i32)))
                   (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
                   (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0")) (func (export "proxy_on_context_create") (param i32 i32)))"#,
    );
    std::fs::write(gw.config_path(), with("abi020.wasm")).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
}

/// The request headers stay readable after they went upstream: in `proxy_on_response_headers`
/// (copied into a response header here) and in `proxy_on_log` (logged). A module written in
/// the text format, so the check does not depend on an SDK.
#[test]
fn request_headers_are_readable_in_later_callbacks() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    write_module(
        &gw,
        "late_reader.wasm",
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "x-probe")
  (data (i32.const 32) "x-seen")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  ;; The request's x-probe: its pointer at 64, its length at 68; 0 when found.
  (func $probe (result i32)
    (call $get (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 64) (i32.const 68)))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $probe))
      (then (drop (call $add (i32.const 2) (i32.const 32) (i32.const 6)
                      (i32.load (i32.const 64)) (i32.load (i32.const 68))))))
    (i32.const 0))
  (func (export "proxy_on_log") (param i32)
    (if (i32.eqz (call $probe))
      (then (drop (call $log (i32.const 4) (i32.load (i32.const 64)) (i32.load (i32.const 68))))))))"#,
    );
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    let config = format!("{config}    - {{name: late, priority: 1, file: late_reader.wasm}}\n");
    std::fs::write(gw.config_path(), config).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    gw.route(
        "1",
        json!({"uri": "/late", "plugins": {"late": {"conf": "-"}}}),
        Some(&up),
    );
    let r = http(
        "GET",
        &gw.url("/late"),
        &[("X-Probe", "seen-after-upstream")],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-seen"), Some("seen-after-upstream"));
    // The upstream got the request headers too.
    assert!(r.text().contains("seen-after-upstream"), "{}", r.text());
    eventually(Duration::from_secs(5), "proxy_on_log's line", || {
        gw.error_log().contains("seen-after-upstream")
    });
}

/// The committed .wasm fixtures match their sources (scripts/build-plugins.sh records the
/// checksums): a source changed without rebuilding fails here.
#[test]
fn plugin_fixtures_are_not_stale() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plugins");
    let manifest = common::run_ok(std::process::Command::new("bash").arg(dir.join("manifest.sh")));
    let recorded = std::fs::read_to_string(dir.join("wasm/MANIFEST")).unwrap();
    assert_eq!(
        manifest, recorded,
        "tests/plugins changed without scripts/build-plugins.sh being run"
    );
    let example = std::fs::read(dir.join("../../plugins/example_headers.wasm")).unwrap();
    assert_eq!(
        example,
        std::fs::read(dir.join("wasm/header_rewrite.wasm")).unwrap()
    );
}

/// A route whose plugin config is deleted (forced) answers 503 without running a plugin, and
/// the PluginContexts it had are finished as a deleted route's are — also when the route's own
/// revision is the newer one, so that its contexts' key is unchanged.
#[test]
fn a_force_deleted_plugin_config_finishes_its_routes_contexts() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/plugin_configs/pc1",
        Some(json!({"plugins": {"wasm_log": {"conf": "pc-ctx"}}})),
    );
    assert_eq!(s, 201, "{v}");
    // Written after the plugin config: the route's revision is the newest of the two.
    gw.route(
        "1",
        json!({"uri": "/p", "plugin_config_id": "pc1"}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/p"), &[], None);
    assert_eq!(r.json()["headers"]["x-order"], "pc-ctx");
    let (s, v) = gw.admin(
        "DELETE",
        "/apisix/admin/plugin_configs/pc1?force=true",
        None,
    );
    assert_eq!(s, 200, "{v}");
    gw.wait_propagated();
    assert_eq!(http("GET", &gw.url("/p"), &[], None).status, 503);
    eventually(
        Duration::from_secs(5),
        "the route's context finished",
        || {
            gw.error_log()
                .contains("recorder pc-ctx: plugin context on_done")
        },
    );
}

/// A route update creates a new PluginContext; the old one is finished (`proxy_on_done`) once
/// it has no request in flight — or, without a request, once the worker applies the change,
/// as it does for a deleted route.
#[test]
fn an_updated_route_finishes_its_old_plugin_context() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    gw.route(
        "1",
        json!({"uri": "/v", "plugins": {"wasm_log": {"conf": "v1"}}}),
        Some(&up),
    );
    assert_eq!(http("GET", &gw.url("/v"), &[], None).status, 200);
    assert!(!gw
        .error_log()
        .contains("recorder v1: plugin context on_done"));
    let (s, _) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/1",
        Some(json!({"plugins": {"wasm_log": {"conf": "v2"}}})),
    );
    assert_eq!(s, 200);
    gw.wait_propagated();
    let r = http("GET", &gw.url("/v"), &[], None);
    assert_eq!(r.json()["headers"]["x-order"], "v2");
    eventually(Duration::from_secs(5), "old context finished", || {
        gw.error_log()
            .contains("recorder v1: plugin context on_done")
    });
    assert!(!gw
        .error_log()
        .contains("recorder v2: plugin context on_done"));
    // Changed again with no request since, or deleted: the context ends all the same (its
    // ticks and queues would otherwise live on until a reload).
    let (s, _) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/1",
        Some(json!({"plugins": {"wasm_log": {"conf": "v3"}}})),
    );
    assert_eq!(s, 200);
    eventually(Duration::from_secs(5), "v2's context finished", || {
        gw.error_log()
            .contains("recorder v2: plugin context on_done")
    });
    assert_eq!(http("GET", &gw.url("/v"), &[], None).status, 200);
    let (s, _) = gw.admin("DELETE", "/apisix/admin/routes/1", None);
    assert_eq!(s, 200);
    eventually(
        Duration::from_secs(5),
        "the deleted route's context finished",
        || {
            gw.error_log()
                .contains("recorder v3: plugin context on_done")
        },
    );
}

/// A plugin built with the AssemblyScript SDK (ABI 0.2.0, `wasi_unstable` import, root context
/// chosen by the `plugin_root_id` property) works unmodified.
#[test]
fn assemblyscript_sdk_plugin() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route(
        "1",
        json!({"uri": "/as", "plugins": {"as_headers": {"conf": "hello-as"}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/as"), &[], None);
    assert_eq!(r.status, 200, "{}", gw.error_log());
    assert_eq!(r.json()["headers"]["x-as-plugin"], "hello-as");
    assert_eq!(r.header("x-as-response"), Some("1"));
}

/// Envoy's connection, timing and size attributes as the Rust SDK reads them (8-byte
/// little-endian integers, nanoseconds for times): the sizes and the duration only in
/// `proxy_on_log`, once the request is over; the node the request went to once it answered.
#[test]
fn connection_timing_and_size_attributes() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    gw.route(
        "1",
        json!({"uri": "/attrs", "plugins": {"rec_a": {"conf": "attrs"}}}),
        Some(&up),
    );
    let epoch_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64
    };
    let before = epoch_ns();
    let r = http(
        "POST",
        &gw.url("/attrs"),
        &[("User-Agent", "attrs-test/1")],
        Some(b"hello"),
    );
    let after = epoch_ns();
    assert_eq!(r.status, 200, "{}", r.text());
    let line = |prefix: &str| {
        let log = gw.error_log();
        let line = common::log_lines(&log, prefix).first()?.to_string();
        Some(line[line.find(prefix).unwrap() + prefix.len()..].to_string())
    };
    eventually(Duration::from_secs(5), "the log phase's attributes", || {
        line("recorder attrs: attributes ").is_some()
    });
    // The log phase measures the duration once the last byte is written, as nginx's
    // `$request_time`: the client may have read it before, so the bound is the log line.
    let logged = epoch_ns();
    let early = line("recorder attrs: early ").expect("the request phase's line");
    assert!(
        early.starts_with("duration=<none> response.size=<none> upstream=<none> "),
        "not known before the request is over: {early}"
    );
    let attrs = line("recorder attrs: attributes ").unwrap();
    let map: std::collections::HashMap<&str, &str> = attrs
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let int = |k: &str| -> i64 {
        map.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {attrs}"))
    };
    assert!(
        (before..=after).contains(&int("request.time")),
        "request.time {} within [{before}, {after}]",
        int("request.time")
    );
    // The same start time at every read of the request.
    assert!(
        early.ends_with(&format!(" request.time={}", int("request.time"))),
        "{early} / {attrs}"
    );
    let duration = int("request.duration");
    assert!(duration > 0 && duration <= logged - before, "{attrs}");
    assert_eq!(int("request.size"), 5, "{attrs}");
    assert!(int("request.total_size") > 5 + 40, "head and body: {attrs}");
    assert_eq!(int("response.size"), r.body.len() as i64, "{attrs}");
    assert!(
        int("response.total_size") > r.body.len() as i64,
        "with the headers: {attrs}"
    );
    let gateway = format!("127.0.0.1:{}", gw.proxy_port);
    assert_eq!(map["destination.address"], gateway, "{attrs}");
    assert_eq!(int("destination.port"), gw.proxy_port as i64);
    assert!(map["source.address"].starts_with("127.0.0.1:"), "{attrs}");
    assert_eq!(
        map["source.address"].rsplit(':').next().unwrap(),
        int("source.port").to_string()
    );
    assert_eq!(map["upstream.address"], up.addr(), "{attrs}");
    assert_eq!(
        int("upstream.port").to_string(),
        up.addr().rsplit(':').next().unwrap()
    );
    assert_eq!(map["request.useragent"], "attrs-test/1");
    // Why the answer is what it is, as Envoy says it: the upstream's, no flag; gRPC's Unknown
    // for an HTTP 200.
    assert_eq!(map["response.code_details"], "via_upstream", "{attrs}");
    assert_eq!(int("response.flags"), 0);
    assert_eq!(int("response.grpc_status"), 2);
    // Whole maps, in the pairs encoding: each name once, `Host` as the `:authority`.
    let names: Vec<&str> = map["request.headers"].split(',').collect();
    for name in [":method", ":path", ":authority", ":scheme", "user-agent"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert!(!names.contains(&"host"), "{names:?}");
    assert_eq!(map["request.headers[user-agent]"], "attrs-test/1");
    let names: Vec<&str> = map["response.headers"].split(',').collect();
    assert!(
        names.contains(&":status") && names.contains(&"x-upstream"),
        "{names:?}"
    );
    // Each connection its own id (the test client opens one per request).
    let first = int("connection.id");
    assert_ne!(first, 0);
    assert_eq!(http("GET", &gw.url("/attrs"), &[], None).status, 200);
    eventually(
        Duration::from_secs(5),
        "the second request's attributes",
        || common::log_lines(&gw.error_log(), "recorder attrs: attributes ").len() == 2,
    );
    let log = gw.error_log();
    let second = common::log_lines(&log, "recorder attrs: attributes ")[1];
    assert!(
        !second.contains(&format!("connection.id={first} ")),
        "{second}"
    );
    assert!(second.contains("request.size=0 "), "no body: {second}");
    assert!(second.contains("response.code=200 "), "{second}");

    // A plugin's local reply (echo answers itself) is the response the log phase reads.
    gw.route(
        "2",
        json!({"uri": "/echoed", "plugins": {"rec_a": {"conf": "echoed"}, "echo": {"conf": "x"}}}),
        None,
    );
    let r = http("GET", &gw.url("/echoed"), &[], None);
    assert_eq!((r.status, r.header("x-echo")), (200, Some("1")));
    let attributes = |label: &str| {
        let prefix = format!("recorder {label}: attributes ");
        eventually(Duration::from_secs(5), &prefix, || {
            !common::log_lines(&gw.error_log(), &prefix).is_empty()
        });
        common::log_lines(&gw.error_log(), &prefix)[0].to_string()
    };
    let line = attributes("echoed");
    assert!(line.contains("response.code=200 "), "{line}");
    assert!(
        line.contains(&format!("response.size={} ", r.body.len())),
        "{line}"
    );
    assert!(
        line.contains("response.headers.content-type=application/json"),
        "{line}"
    );
    assert!(line.contains("upstream.address=<none>"), "{line}");

    // The gateway's own answers say why, with Envoy's details and flag bits: an upstream
    // that refuses the connection (UF, 0x20), a route with no upstream at all (NC).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = closed.local_addr().unwrap().to_string();
    drop(closed);
    gw.route(
        "3",
        json!({"uri": "/refused", "plugins": {"rec_a": {"conf": "refused"}},
               "upstream": {"type": "roundrobin", "nodes": {node: 1}}}),
        None,
    );
    gw.route(
        "4",
        json!({"uri": "/nowhere", "plugins": {"rec_a": {"conf": "nowhere"}}}),
        None,
    );
    assert_eq!(http("GET", &gw.url("/refused"), &[], None).status, 502);
    assert_eq!(http("GET", &gw.url("/nowhere"), &[], None).status, 503);
    let refused = attributes("refused");
    assert!(
        refused.contains(
            " response.code_details=upstream_reset_before_response_started{connection_failure}"
        ),
        "{refused}"
    );
    assert!(refused.contains(" response.flags=32 "), "{refused}");
    assert!(refused.contains(" response.grpc_status=14 "), "{refused}");
    let nowhere = attributes("nowhere");
    assert!(
        nowhere.contains(" response.code_details=cluster_not_found"),
        "{nowhere}"
    );
    assert!(nowhere.contains(" response.flags=16777216 "), "{nowhere}");
}

/// A plugin written in C against the raw ABI and built with clang + wasi-libc as a WASI
/// reactor (tests/plugins/c/build.sh), as with the C++ SDK's toolchain: wasi-libc's malloc
/// handed to the host as `proxy_on_memory_allocate`, a conf per root context, the serialized
/// header map read and written whole, a held body replaced, a local reply.
#[test]
fn c_wasi_libc_plugin() {
    let up = TestUpstream::start("u");
    let gw = one_worker();
    for (id, uri, conf) in [("1", "/c/a/*", "alpha"), ("2", "/c/b/*", "beta")] {
        gw.route(
            id,
            json!({"uri": uri, "plugins": {"c_headers": {"conf": conf}}}),
            Some(&up),
        );
    }

    // Each route's conf is its own root context's. The request map, read whole with
    // proxy_get_header_map_pairs: :method :path :authority :scheme, x-one, connection and the
    // gateway's x-request-id (`Host` is the :authority, as in Envoy: no pair of its own). The response map is set back whole with x-c-pairs added.
    for (path, conf) in [("/c/a/1", "alpha"), ("/c/b/1", "beta"), ("/c/a/2", "alpha")] {
        let r = http("GET", &gw.url(path), &[("X-One", "1")], None);
        assert_eq!(r.status, 200, "{}", gw.error_log());
        let h = &r.json()["headers"];
        assert_eq!(h["x-c-conf"], conf, "{h}");
        assert_eq!(h["x-c-header-count"], "7", "{h}");
        assert_eq!(r.header("x-c-plugin"), Some(conf));
        assert_eq!(r.header("x-c-pairs"), Some("yes"));
        assert_eq!(
            r.header("x-upstream"),
            Some("u"),
            "the upstream's headers are kept"
        );
    }
    let r = http(
        "GET",
        &gw.url("/c/a/dup"),
        &[("X-One", "1"), ("X-Dup", "1"), ("X-Dup", "2")],
        None,
    );
    let h = &r.json()["headers"];
    assert_eq!(
        (&h["x-c-header-count"], &h["x-dup"]),
        (&json!("9"), &json!("1, 2"))
    );

    // x-c-upper: the body is held to its end, uppercased and put back (start 0, size = its
    // length: a replacement); the upstream gets it with its Content-Length, chunked or not.
    let body = b"hello, World! abc xyz 123\n".repeat(40);
    let sum = |b: &[u8]| b.iter().map(|&c| c as u64).sum::<u64>();
    let upper = sum(&body.to_ascii_uppercase());
    assert_ne!(upper, sum(&body));
    let r = http(
        "POST",
        &gw.url("/c/a/post"),
        &[("x-c-upper", "1")],
        Some(&body),
    );
    let j = r.json();
    assert_eq!(
        (j["body_len"].as_u64(), j["body_sum"].as_u64()),
        (Some(1040), Some(upper))
    );
    assert_eq!(j["headers"]["content-length"], "1040");
    let chunked = {
        use std::io::{BufReader, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
        write!(
            s,
            "POST /c/b/post HTTP/1.1\r\nHost: x\r\nx-c-upper: 1\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        for part in body.chunks(100) {
            write!(s, "{:x}\r\n", part.len()).unwrap();
            s.write_all(part).unwrap();
            s.write_all(b"\r\n").unwrap();
        }
        s.write_all(b"0\r\n\r\n").unwrap();
        common::client::read_response(&mut BufReader::new(s), false).unwrap()
    };
    let j = chunked.json();
    assert_eq!(
        (j["body_len"].as_u64(), j["body_sum"].as_u64()),
        (Some(1040), Some(upper))
    );
    assert_eq!(j["headers"]["content-length"], "1040");
    assert!(j["headers"].get("transfer-encoding").is_none(), "{j}");
    let j = http("POST", &gw.url("/c/b/post"), &[], Some(&body)).json();
    assert_eq!(
        j["body_sum"].as_u64(),
        Some(sum(&body)),
        "untouched without x-c-upper"
    );

    // x-c-deny: a local reply, which then goes through the plugin's response phase.
    let hits = up.hits();
    for (path, conf) in [("/c/a/deny", "alpha"), ("/c/b/deny", "beta")] {
        let r = http("GET", &gw.url(path), &[("x-c-deny", "yes")], None);
        assert_eq!(r.status, 418);
        assert_eq!(r.text(), "teapot\n");
        assert_eq!(r.header("x-c-reason"), Some("denied"));
        assert_eq!(r.header("x-c-plugin"), Some(conf));
        assert_eq!(r.header("x-c-pairs"), Some("yes"));
    }
    assert_eq!(up.hits(), hits);

    // proxy_log (Info) from proxy_on_configure and proxy_on_log; an updated route's old root
    // context is deleted, and the plugin frees its conf then.
    let (s, _) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/1",
        Some(json!({"plugins": {"c_headers": {"conf": "alpha2"}}})),
    );
    assert_eq!(s, 200);
    gw.wait_propagated();
    let r = http("GET", &gw.url("/c/a/3"), &[], None);
    assert_eq!(r.header("x-c-plugin"), Some("alpha2"));
    eventually(
        Duration::from_secs(5),
        "the old root context deleted",
        || {
            let log = gw.error_log();
            log.lines()
                .any(|l| l.contains("c_headers: deleted root context") && l.ends_with(": alpha"))
        },
    );
    let log = gw.error_log();
    for line in [
        "c_headers: VM started",
        ": alpha2",
        "c_headers: GET /c/a/1 -> 200",
        "c_headers: GET /c/b/deny -> 418",
        "c_headers: POST /c/a/post -> 200",
    ] {
        assert!(log.contains(line), "{line:?} not in {log}");
    }
    assert!(log.contains("c_headers: configured root context"), "{log}");
    assert!(!log.contains("num_headers"), "{log}");
}

/// A gateway with one worker whose only plugin is the fixture `fixture`, declared as `name`
/// with the extra settings `extra` (`, key: value`).
fn gateway_with_only(name: &str, fixture: &str, extra: &str) -> Gateway {
    Gateway::start_with(Setup {
        workers: 1,
        raw_yaml: Some(format!(
            "apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {{proxy}}}}]\n\
             deployment:\n  admin:\n    admin_key: [{{name: admin, key: {key}, role: admin}}]\n    admin_listen: {{ip: 127.0.0.1, port: {{admin}}}}\n\
             nginx_config:\n  worker_processes: 1\n  error_log_level: info\n\
             wasm:\n  plugins:\n    - {{name: {name}, file: \"{file}\"{extra}}}\n",
            key = common::KEY,
            file = common::fixture(fixture),
        )),
        ..Setup::default()
    })
}

/// A gateway whose only plugin is the Go fixture (tests/plugins/go: the standard Go toolchain,
/// GOOS=wasip1, built the way the Go SDK builds plugins), so the other tests do not compile it
/// (a Go module is 2.5 MB: about 2 s of compilation).
fn go_gateway() -> Gateway {
    gateway_with_only(
        "go_headers",
        "go_headers",
        ", priority: 60, http_request_phase: access",
    )
}

/// A Go plugin — its runtime and garbage collector, `fmt` and `os` set up at its start through
/// WASI — reads its conf, rewrites headers both ways, answers locally and logs, request after
/// request; a Go panic (printed to stderr, then the runtime aborts) is a plugin fault like a
/// Rust panic: 503, logged with the panic's message, a new instance for the next request.
#[test]
fn go_plugins_run_and_their_panics_are_contained() {
    let up = TestUpstream::start("u");
    let gw = go_gateway();
    let pids = gw.worker_pids();
    gw.route(
        "go",
        json!({"uri": "/go/*", "plugins": {"go_headers": {"conf": "hello"}}}),
        Some(&up),
    );
    let r = http("GET", &gw.url("/go/x?q=1"), &[("X-Probe", "p1")], None);
    assert_eq!(r.status, 200, "{}", gw.error_log());
    let h = &r.json()["headers"];
    assert_eq!(h["x-go-conf"], "hello", "{h}");
    assert_eq!(h["x-go-path"], "/go/x?q=1", "{h}");
    assert_eq!(r.header("x-go-plugin"), Some("hello"));
    assert_eq!(r.header("x-go-status-seen"), Some("200"));
    // A local reply: the upstream never sees it; the response callback runs on it.
    let hits = up.hits();
    let r = http("GET", &gw.url("/go/deny"), &[("x-go-deny", "yes")], None);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "denied by go\n");
    assert_eq!(r.header("x-go-status-seen"), Some("403"));
    assert_eq!(up.hits(), hits, "a denied request reached the upstream");
    let r = http("GET", &gw.url("/go/p"), &[("x-go-panic", "yes")], None);
    assert_eq!(r.status, 503, "{}", r.text());
    let r = http("GET", &gw.url("/go/b"), &[], None);
    assert_eq!(r.status, 200, "{}", gw.error_log());
    assert_eq!(r.header("x-go-plugin"), Some("hello"));
    // Enough garbage for the Go GC to run in the instance (after the panic's lines: these
    // requests' own lines use up the plugin's log budget for the second).
    for i in 0..500 {
        let r = http("GET", &gw.url(&format!("/go/n{i}")), &[], None);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["headers"]["x-go-path"], format!("/go/n{i}"));
    }
    eventually(Duration::from_secs(5), "the plugin's log lines", || {
        let log = gw.error_log();
        log.contains("go_headers: go_headers: on_vm_start (go1.")
            && log.contains("go_headers: go_headers hello: on_log /go/x?q=1 200")
            && log.contains("go_headers: go_headers hello: on_log /go/deny 403")
            && log.contains("[error]")
            && log.contains("go_headers: panic: go_headers: asked to panic on /go/p")
            && log.contains("go_headers: trap: wasm `unreachable` instruction executed in proxy_on_request_headers (serving route go)")
    });
    assert_eq!(gw.worker_pids(), pids, "a worker died");
    assert_eq!(gw.status()["workers"][0]["plugin_faults"], 1);
}

/// Rust SDK, beyond the callback at hand (tests/plugins/gatekeeper): a request paused with
/// nothing in flight is let go by another request's `on_log`, which changes its headers
/// (`set_effective_context`, `set_http_request_header`, `resume_http_request`), one at a time; a PluginContext whose
/// `on_done` returns false flushes through a call-out when its route goes, and its `done()`
/// ends it.
#[test]
fn rust_sdk_requests_are_let_go_by_other_requests_and_contexts_flush() {
    let gw = gateway_with_only(
        "gatekeeper",
        "gatekeeper",
        ", priority: 1, pause_timeout: 20s",
    );
    let app = TestUpstream::start("app");
    let flush = TestUpstream::start("flush");
    gw.route(
        "gated",
        json!({"uri": "/delay/*", "plugins": {"gatekeeper": {"conf": {"flush": flush.addr()}}}}),
        Some(&app),
    );
    let send = |path: &str| {
        let url = gw.url(path);
        std::thread::spawn(move || {
            let r = http("GET", &url, &[], None);
            (
                r.status,
                r.json()["headers"]["x-held"].clone(),
                Instant::now(),
            )
        })
    };
    let first = send("/delay/700/first");
    eventually(Duration::from_secs(5), "the first request upstream", || {
        app.hits() == 1
    });
    let held: Vec<_> = ["/delay/10/second", "/delay/10/third"]
        .iter()
        .map(|p| send(p))
        .collect();
    let (status, mark, first_done) = first.join().unwrap();
    assert_eq!((status, mark), (200, Value::Null));
    let mut ends = Vec::new();
    for h in held {
        let (status, mark, done) = h.join().unwrap();
        // Marked when held, and changed by the request that let it go.
        assert_eq!((status, mark), (200, json!("released")));
        ends.push(done);
    }
    // Held until the gate's holder was done.
    assert!(ends.iter().all(|e| *e > first_done));
    assert_eq!(app.hits(), 3);
    // The route goes: its context flushes, then says it is done.
    assert_eq!(
        gw.admin("DELETE", "/apisix/admin/routes/gated", None).0,
        200
    );
    eventually(Duration::from_secs(5), "the flush", || {
        gw.error_log().contains("gatekeeper: flushed 200")
    });
    assert_eq!(flush.hits(), 1);
    let log = gw.error_log();
    assert!(log.contains("gatekeeper: flushing"), "{log}");
    assert!(
        !log.contains("proxy_done in time") && !log.contains("panicked"),
        "{log}"
    );
}
