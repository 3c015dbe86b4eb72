//! Every screen and overlay drawn from fixed data at 80×24 and 120×40, compared with the
//! snapshots in `src/snapshots/` (review changes with `cargo insta review`, or rerun with
//! `INSTA_UPDATE=always` and read the diff). Rendering from real Admin API answers is tested in
//! the root package's `tests/tui.rs`.

use crate::app::{App, Command, Modal, Poll, Screen, Update};
use crate::client::ApiError;
use crate::model::{parse_routes, GatewayStatus, LogTail, Plugins, Stats, Traffic};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use serde_json::json;
use std::time::{Duration, Instant};

const SIZES: [(u16, u16); 2] = [(80, 24), (120, 40)];

/// The screen as text, one line per row.
pub fn text(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| crate::render::draw(f, app)).unwrap();
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..h {
        let mut line = String::new();
        for x in 0..w {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn key(app: &mut App, code: KeyCode) -> Option<Command> {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn stats(requests: [u64; 3]) -> Stats {
    serde_json::from_value(json!({"generation": 7, "contexts": [
        {"plugin": "example_headers", "owner_kind": "route", "owner_id": "1",
         "requests": requests[0], "local_replies": 0, "errors": 0, "traps": 0, "timeouts": 0,
         "memory_hits": 0, "configures": 1, "time_us": 5400, "p50_us": 41.0, "p99_us": 180.5,
         "workers": [{"worker_id": 0, "requests": requests[0]}]},
        {"plugin": "auth", "owner_kind": "global_rule", "owner_id": "g1",
         "requests": requests[1], "local_replies": 12, "errors": 1, "traps": 0, "timeouts": 0,
         "memory_hits": 0, "configures": 1, "time_us": 90000, "p50_us": 850.0, "p99_us": 2300.0},
        {"plugin": "faulty", "owner_kind": "route", "owner_id": "api",
         "requests": requests[2], "errors": 3, "traps": 2, "timeouts": 1},
    ]}))
    .unwrap()
}

/// A gateway with three routes, two plugins, two workers and a few log lines, polled twice a
/// second apart.
fn app() -> App {
    let routes = parse_routes(&json!({"total": 3, "list": [
        {"key": "/apisix/routes/1", "value": {"id": "1", "uri": "/*", "name": "site",
          "plugins": {"example_headers": {"conf": {"response_set": {"x-hello": "wasm"}}}},
          "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1980": 1}}}},
        {"key": "/apisix/routes/2", "value": {"id": "2", "uris": ["/old", "/legacy/*"],
          "hosts": ["example.com"], "methods": ["GET", "HEAD"], "status": 0,
          "upstream_id": "backend"}},
        {"key": "/apisix/routes/api", "value": {"id": "api", "uri": "/api/*",
          "plugins": {"faulty": {"conf": "x"}, "auth": {"conf": "y"}},
          "upstream": {"nodes": [{"host": "10.0.0.7", "port": 8080, "weight": 1}]}}},
    ]}))
    .unwrap();
    let status: GatewayStatus = serde_json::from_value(json!({
    "master": {"pid": 4242, "version": "0.1.0", "uptime_s": 3725, "epoch": 2,
               "generation": 7, "config": "/srv/wasmgate/conf/config.yaml"},
    "workers": [
        {"worker_id": 0, "slot": 2, "pid": 4250, "state": "running", "epoch": 2,
         "uptime_s": 600, "restarts": 0, "generation_seen": 7, "requests": 1520,
         "active_connections": 3, "plugin_faults": 0, "rss_bytes": 35651584},
        {"worker_id": 1, "slot": 3, "pid": 4251, "state": "running", "epoch": 2,
         "uptime_s": 42, "restarts": 1, "generation_seen": 6, "requests": 980,
         "active_connections": 1, "plugin_faults": 2},
    ]}))
    .unwrap();
    let plugins: Plugins = serde_json::from_value(json!({"plugins": [
        {"name": "example_headers", "priority": 1000, "phase": "access",
         "file": "/srv/wasmgate/plugins/example_headers.wasm", "fail_open": false,
         "instances": [{"worker_id": 0, "slot": 2, "memory_bytes": 1179648},
                       {"worker_id": 1, "slot": 3, "memory_bytes": 1179648}]},
        {"name": "auth", "priority": 8000, "phase": "rewrite", "file": "plugins/auth.wasm",
         "fail_open": true, "instances": []},
    ]}))
    .unwrap();
    let log = LogTail {
        path: Some("/srv/wasmgate/logs/error.log".into()),
        lines: (1..=30)
            .map(|i| match i % 10 {
                0 => format!("2025/11/25 12:00:{i:02} [warn] 4250#worker: plugin faulty: callback timed out after 200ms (request {i})"),
                5 => format!("2025/11/25 12:00:{i:02} [error] 4251#worker: upstream 10.0.0.7:8080: connection refused"),
                _ => format!("2025/11/25 12:00:{i:02} [info] 4242#master: PUT /apisix/admin/routes/{i} key=admin client=127.0.0.1 status=200"),
            })
            .collect(),
    };
    let traffic: Traffic = serde_json::from_value(json!({"routes": [
        {"route": "1", "requests": 2480, "2xx": 2400, "4xx": 60, "5xx": 20},
        {"route": "api", "requests": 35, "2xx": 0, "4xx": 0, "5xx": 35},
    ]}))
    .unwrap();
    let mut app = App::new("127.0.0.1:9180");
    let t0 = Instant::now();
    // 2026-12-01: one certificate expired, one expiring in 9 days, one asking for client
    // certificates, one not served, one written without its dates.
    let day = 86_400;
    let now = 1_796_083_200;
    let ssls = parse_routes(&json!({"list": [
        {"value": {"id": "api", "snis": ["api.example.com", "*.api.example.com"],
                   "validity_end": now + 400 * day}},
        {"value": {"id": "old", "snis": ["old.example.com"], "validity_end": now - 3 * day}},
        {"value": {"id": "soon", "sni": "soon.example.com", "validity_end": now + 9 * day + 60,
                   "ssl_protocols": ["TLSv1.3"]}},
        {"value": {"id": "mtls", "snis": ["internal.example.com"], "validity_end": now + 90 * day,
                   "client": {"ca": "-----BEGIN CERTIFICATE-----"}}},
        {"value": {"id": "off", "snis": ["off.example.com"], "validity_end": now + 2 * day,
                   "status": 0}},
        {"value": {"id": "etcd", "snis": ["etcd.example.com"]}},
    ]}))
    .unwrap();
    app.fixed_now = Some(now);
    let mut p = Poll {
        at: t0,
        routes: Some(Ok(routes)),
        services: Some(Ok(vec![])),
        plugin_configs: Some(Ok(vec![])),
        upstreams: Some(Ok(parse_routes(&json!({"list": [
            {"value": {"id": "backend", "name": "pool", "type": "chash", "key": "remote_addr",
                       "nodes": {"10.0.0.1:80": 1, "10.0.0.2:80": 2},
                       "checks": {"active": {"type": "tcp"}}}},
            {"value": {"id": "spare", "scheme": "https", "nodes": []}},
        ]}))
        .unwrap())),
        ssls: Some(Ok(ssls)),
        status: Ok(status),
        plugins: Ok(plugins),
        stats: Ok(stats([100, 40, 0])),
        log: Ok(log),
        traffic: Ok(traffic),
        // Route 1's own upstream is checked and healthy; one node of `backend` is down.
        health: Ok(serde_json::from_value(json!([
            {"name": "/apisix/routes/1", "type": "http",
             "nodes": [{"ip": "127.0.0.1", "port": 1980, "status": "healthy",
                        "counter": {"success": 0}}]},
            {"name": "/apisix/upstreams/backend", "type": "tcp",
             "nodes": [{"ip": "10.0.0.1", "port": 80, "status": "healthy"},
                       {"ip": "10.0.0.2", "port": 80, "status": "unhealthy",
                        "counter": {"tcp_failure": 1, "success": 1}}]},
        ]))
        .unwrap()),
    };
    app.on_update(Update::Poll(Box::new(p.clone())));
    for (i, n) in [[120, 45, 2], [150, 46, 2], [190, 52, 5]]
        .into_iter()
        .enumerate()
    {
        p.at = t0 + Duration::from_secs(i as u64 + 1);
        p.stats = Ok(stats(n));
        app.on_update(Update::Poll(Box::new(p.clone())));
    }
    app
}

fn check(name: &str, app: &App) {
    for (w, h) in SIZES {
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), text(app, w, h));
    }
}

#[test]
fn routes() {
    check("routes", &app());
}

/// The filter as it is typed, in the title, and a filter that lets nothing through.
#[test]
fn a_filtered_list_says_what_it_shows() {
    let mut a = app();
    key(&mut a, KeyCode::Char('/'));
    for c in "legacy".chars() {
        key(&mut a, KeyCode::Char(c));
    }
    let screen = text(&a, 100, 24);
    assert!(screen.contains("Routes (1 of 3) /legacy▏"), "{screen}");
    assert!(screen.contains("Enter keep filter"), "{screen}");
    assert!(!screen.contains("site"), "{screen}");
    key(&mut a, KeyCode::Char('x'));
    key(&mut a, KeyCode::Enter);
    let screen = text(&a, 100, 24);
    assert!(screen.contains("Routes (0 of 3) /legacyx "), "{screen}");
    assert!(
        screen.contains("No route matches the filter: Esc drops it."),
        "{screen}"
    );
}

#[test]
fn plugins() {
    let mut a = app();
    a.screen = Screen::Plugins;
    check("plugins", &a);
}

#[test]
fn workers() {
    let mut a = app();
    a.screen = Screen::Workers;
    check("workers", &a);
}

/// Each upstream's nodes with what the health checks find them, and the routes using it; an
/// upstream written inside a route shows when it is checked.
#[test]
fn upstreams() {
    let mut a = app();
    key(&mut a, KeyCode::Char('6'));
    assert_eq!(a.screen, Screen::Upstreams);
    check("upstreams", &a);
    let screen = text(&a, 120, 40);
    assert!(
        screen.contains("Upstreams (3) — 3 nodes, 1 unhealthy"),
        "{screen}"
    );
    let row = (screen.lines())
        .find(|l| l.contains("10.0.0.2:80"))
        .unwrap_or_else(|| panic!("{screen}"));
    assert!(row.contains("UNHEALTHY 1 ok, 1 failed"), "{screen}");
    assert!(screen.contains("route 1"), "{screen}");
    assert!(screen.contains("no nodes"), "{screen}");
    key(&mut a, KeyCode::End);
    assert_eq!(
        a.upstream_selected, 3,
        "one row per node, one for the upstream without"
    );
}

/// Each service with its hosts, plugins and upstream (its health when checked), and the
/// routes that name it with their traffic added up.
#[test]
fn services() {
    let mut a = app();
    key(&mut a, KeyCode::Char('7'));
    assert_eq!(a.screen, Screen::Services);
    let screen = text(&a, 120, 30);
    assert!(screen.contains("No services"), "{screen}");
    a.services.data = Some(
        parse_routes(&json!({"list": [
            {"value": {"id": "s1", "name": "shop", "hosts": ["shop.example.com"],
                       "plugins": {"auth": {"conf": "y"}, "example_headers": {"conf": "{}"}},
                       "upstream_id": "backend"}},
            {"value": {"id": "s2", "enable_websocket": true,
                       "upstream": {"nodes": {"10.0.0.9:8080": 1}}}},
        ]}))
        .unwrap(),
    );
    // Routes 1 and api take their settings from s1.
    let routes = a.routes.data.as_mut().unwrap();
    for r in routes.iter_mut().filter(|r| r.id == "1" || r.id == "api") {
        r.value["service_id"] = json!("s1");
    }
    check("services", &a);
    let screen = text(&a, 120, 30);
    assert!(screen.contains("Services (2)"), "{screen}");
    let row = |id: &str| {
        (screen.lines())
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id}: {screen}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Two routes, 2480 + 35 requests, 20 + 35 answered 5xx; backend has one node down of two.
    assert!(
        row("s1 (shop)")
            .contains("shop.example.com auth,example_headers upstream backend 1/2 2 2515 55"),
        "{screen}"
    );
    assert!(row("s2").contains("10.0.0.9:8080 - 0 0 0"), "{screen}");
    key(&mut a, KeyCode::End);
    assert_eq!(a.service_selected, 1);
}

/// The soonest to expire first, the days left coloured by how soon; those not served dimmed.
#[test]
fn certificates() {
    let mut a = app();
    key(&mut a, KeyCode::Char('5'));
    assert_eq!(a.screen, Screen::Certificates);
    check("certificates", &a);
    let screen = text(&a, 120, 40);
    let order: Vec<usize> = ["│old ", "│off ", "│soon ", "│mtls ", "│api ", "│etcd "]
        .iter()
        .map(|id| screen.find(id).unwrap_or_else(|| panic!("{id}: {screen}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{screen}");
    assert!(
        screen.contains("Certificates (6) — 2 served expired or expire within 14 days"),
        "{screen}"
    );
}

/// Cluster mode with etcd refusing the node: said on every screen's top line, and why on the
/// Workers screen.
#[test]
fn etcd_away() {
    let mut a = app();
    let mut status = a.status.data.clone().unwrap();
    status.store = serde_json::from_value(json!({
        "kind": "etcd", "endpoints": ["http://10.0.0.5:2379"], "prefix": "/apisix",
        "reachable": false, "revision": 812,
        "error": "etcd refused user \"gw\": etcdserver: authentication failed, invalid user ID or password (deployment.etcd.user and password)"
    }))
    .unwrap();
    a.status.data = Some(status);
    a.screen = Screen::Workers;
    check("etcd_away", &a);
}

#[test]
fn log() {
    let mut a = app();
    a.screen = Screen::Log;
    check("log", &a);
}

#[test]
fn help() {
    let mut a = app();
    key(&mut a, KeyCode::Char('?'));
    check("help", &a);
}

#[test]
fn confirm_delete() {
    let mut a = app();
    key(&mut a, KeyCode::Char('G'));
    key(&mut a, KeyCode::Char('d'));
    check("confirm_delete", &a);
}

#[test]
fn editor_with_error() {
    let mut a = app();
    key(&mut a, KeyCode::Char('e'));
    let cmd = a
        .on_key(KeyEvent::new(KeyCode::Char('s'), KeyModifiers::CONTROL))
        .unwrap();
    a.on_update(Update::Done {
        command: cmd,
        result: Err(ApiError::Status {
            status: 400,
            message: "invalid configuration: additional properties forbidden, found colour".into(),
        }),
    });
    assert!(matches!(a.modal, Some(Modal::Editor(_))));
    check("editor_error", &a);
}

#[test]
fn new_route_editor() {
    let mut a = app();
    key(&mut a, KeyCode::Char('n'));
    check("editor_new", &a);
}

#[test]
fn disconnected() {
    let mut a = app();
    a.on_update(Update::Unreachable(
        "io: Connection refused (os error 111)".into(),
    ));
    check("disconnected", &a);
}

/// A wrong key is said in the status bar, in red, not shown as a connection that loads for ever.
#[test]
fn key_refused() {
    let mut a = app();
    a.on_update(Update::Refused(
        "admin key refused (failed to check token: wrong apikey)".into(),
    ));
    check("key_refused", &a);
}

#[test]
fn reload_failed() {
    let mut a = app();
    a.screen = Screen::Workers;
    a.on_update(Update::Done {
        command: Command::Reload,
        result: Err(ApiError::Status {
            status: 400,
            message: "reload refused: conf/config.yaml:3: unknown field `colour`".into(),
        }),
    });
    check("reload_failed", &a);
}

#[test]
fn endpoints_not_there_yet() {
    // An older gateway: no /wasmgate/stats, /wasmgate/plugins or /wasmgate/log, no rss_bytes.
    let mut a = App::new("127.0.0.1:9180");
    let missing = |p: &str| ApiError::Status {
        status: 404,
        message: format!("not found: /wasmgate/{p}"),
    };
    a.on_update(Update::Poll(Box::new(Poll {
        at: Instant::now(),
        routes: Some(Ok(vec![])),
        services: Some(Ok(vec![])),
        plugin_configs: None,
        upstreams: None,
        ssls: None,
        status: Ok(GatewayStatus::default()),
        plugins: Err(missing("plugins")),
        stats: Err(missing("stats")),
        log: Err(missing("log")),
        traffic: Err(missing("traffic")),
        health: Err(missing("healthcheck")),
    })));
    a.screen = Screen::Plugins;
    check("plugins_missing", &a);
    a.screen = Screen::Routes;
    check("routes_empty", &a);
}

#[test]
fn tiny_terminals_do_not_panic() {
    let mut a = app();
    for screen in Screen::ALL {
        a.screen = screen;
        for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 10), (300, 100)] {
            text(&a, w, h);
        }
    }
    for k in ['?', 'n'] {
        let mut a = app();
        key(&mut a, KeyCode::Char(k));
        for (w, h) in [(1, 1), (10, 3), (20, 5)] {
            text(&a, w, h);
        }
    }
}

/// A route gone from the configuration keeps its plugin counts (they outlive reloads), marked
/// as deleted; live routes are not marked.
#[test]
fn a_deleted_routes_counts_are_marked() {
    let mut a = app();
    a.screen = Screen::Plugins;
    if let Some(routes) = a.routes.data.as_mut() {
        routes.retain(|r| r.id != "api");
    }
    let s = text(&a, 120, 40);
    assert!(s.contains("route api (deleted)"), "{s}");
    assert!(!s.contains("route 1 (deleted)"), "{s}");
}

/// A poll of `routes` and `services` (JSON objects with their ids) and nothing else.
fn config_poll(routes: Vec<serde_json::Value>, services: Vec<serde_json::Value>) -> Update {
    objects_poll(routes, services, vec![])
}

/// A poll of routes, services and plugin configs (JSON objects with their ids) and nothing
/// else.
fn objects_poll(
    routes: Vec<serde_json::Value>,
    services: Vec<serde_json::Value>,
    plugin_configs: Vec<serde_json::Value>,
) -> Update {
    let list = |kind: &str, objects: Vec<serde_json::Value>| {
        let list: Vec<_> = objects
            .into_iter()
            .map(|v| json!({"key": format!("/apisix/{kind}/{}", v["id"]), "value": v}))
            .collect();
        parse_routes(&json!({ "list": list })).unwrap()
    };
    Update::Poll(Box::new(Poll {
        at: Instant::now(),
        routes: Some(Ok(list("routes", routes))),
        services: Some(Ok(list("services", services))),
        plugin_configs: Some(Ok(list("plugin_configs", plugin_configs))),
        upstreams: None,
        ssls: None,
        status: Ok(GatewayStatus::default()),
        plugins: Ok(Plugins::default()),
        stats: Ok(Stats::default()),
        log: Ok(LogTail::default()),
        traffic: Ok(Traffic::default()),
        health: Ok(Default::default()),
    }))
}

/// A question's whole text shows, however it wraps at words.
#[test]
fn dialogs_are_as_tall_as_their_wrapped_text() {
    let mut a = app();
    key(&mut a, KeyCode::Char('e'));
    a.modal = match a.modal.take() {
        Some(Modal::Editor(editor)) => Some(Modal::Overwrite {
            why: "Route api was changed since you opened it (revision 12, now 13): saving \
                  replaces that change with this text. Save anyway?"
                .into(),
            save: Command::Reload,
            editor,
        }),
        other => panic!("{other:?}"),
    };
    for (w, h) in SIZES {
        let s = text(&a, w, h);
        assert!(s.contains("anyway?"), "{s}");
    }
    let long = "reload refused: conf/config.yaml:12: plugin wasm_auth: cannot load \
                plugins/auth.wasm: No such file or directory (os error 2); the previous \
                workers keep serving";
    a.on_update(Update::Done {
        command: Command::Reload,
        result: Err(ApiError::Status {
            status: 400,
            message: long.into(),
        }),
    });
    let s = text(&a, 80, 24);
    assert!(s.contains("keep serving"), "{s}");
}

/// Every cut cell ends with `…`; columns that cannot fit are left out rather than cut bare.
#[test]
fn narrow_terminals_cut_with_an_ellipsis() {
    let mut a = App::new("127.0.0.1:9180");
    let routes = (2981..=2989)
        .map(|i| json!({"id": i.to_string(), "uri": format!("/some/long/path/{i}")}))
        .collect();
    a.on_update(config_poll(routes, vec![]));
    let s = text(&a, 40, 10);
    for i in 2981..=2985 {
        assert!(s.contains(&format!("│{i} ")), "id {i} whole: {s}");
    }
    assert!(s.contains("│2981 /so… "), "{s}");
    let s = text(&a, 12, 10);
    assert!(s.contains("│2…") || s.contains("│2981"), "{s}");
    assert!(!s.contains("│29 "), "cut without …: {s}");
}

/// Too small to show a question or the editor whole: a notice, and `y`/Ctrl-S do nothing.
#[test]
fn too_small_for_a_question_says_so() {
    let mut a = app();
    key(&mut a, KeyCode::Char('d'));
    let s = text(&a, 20, 6);
    assert!(s.contains("Terminal too"), "{s}");
    assert_eq!(key(&mut a, KeyCode::Char('y')), None);
    assert!(matches!(a.modal, Some(Modal::Confirm(_))));
    text(&a, 80, 24);
    assert!(key(&mut a, KeyCode::Char('y')).is_some(), "shown: answered");

    key(&mut a, KeyCode::Char('e'));
    assert!(text(&a, 20, 6).contains("Terminal too"));
    let save = KeyEvent::new(KeyCode::Char('s'), KeyModifiers::CONTROL);
    assert_eq!(a.on_key(save), None);
    text(&a, 80, 24);
    assert!(a.on_key(save).is_some());
}

/// A route with a `service_id` shows the hosts and plugins it takes from the service.
#[test]
fn routes_show_what_their_service_gives_them() {
    let mut a = App::new("127.0.0.1:9180");
    a.on_update(config_poll(
        vec![
            json!({"id": "1", "uri": "/a", "service_id": "s1"}),
            json!({"id": "2", "uri": "/b", "service_id": "s1", "hosts": ["own.example.com"],
                   "plugins": {"echo": {"conf": "x"}}}),
        ],
        vec![json!({"id": "s1", "hosts": ["svc.example.com"],
                    "plugins": {"auth": {"conf": "y"}}})],
    ));
    let s = text(&a, 160, 24);
    assert!(
        s.contains("svc.example.com (service s1) -       auth (service s1)"),
        "{s}"
    );
    assert!(
        s.contains("own.example.com              -       echo + auth (service s1)"),
        "{s}"
    );
}

/// A route with a `plugin_config_id` shows the plugins it takes from it, after its own and
/// before its service's; one whose plugin config is gone says so (it answers 503).
#[test]
fn routes_show_what_their_plugin_config_gives_them() {
    let mut a = App::new("127.0.0.1:9180");
    a.on_update(objects_poll(
        vec![
            json!({"id": "1", "uri": "/a", "plugin_config_id": "pc1", "service_id": "s1",
                   "plugins": {"echo": {"conf": "x"}}}),
            json!({"id": "2", "uri": "/b", "plugin_config_id": "gone"}),
        ],
        vec![json!({"id": "s1", "plugins": {"auth": {"conf": "y"}, "cors": {"conf": "z"}}})],
        vec![json!({"id": "pc1", "plugins": {"echo": {"conf": "p"}, "cors": {"conf": "q"}}})],
    ));
    let s = text(&a, 160, 24);
    assert!(
        s.contains("echo + cors (plugin config pc1) + auth (service s1)"),
        "{s}"
    );
    assert!(s.contains("plugin config gone MISSING"), "{s}");
}

/// A console that never got through says why in the table, and offers no new route.
#[test]
fn never_connected_says_why() {
    let mut a = App::new("127.0.0.1:9180");
    a.on_update(Update::Refused(
        "admin key refused (failed to check token: wrong apikey)".into(),
    ));
    let s = text(&a, 80, 24);
    assert!(!s.contains("Loading"), "{s}");
    assert!(
        s.contains("│  admin key refused (failed to check token"),
        "{s}"
    );
    assert!(!s.contains(" n new"), "{s}");
    a.on_update(Update::Unreachable("io: Connection refused".into()));
    let s = text(&a, 80, 24);
    assert!(
        s.contains("gateway unreachable: io: Connection refused"),
        "{s}"
    );
}

/// Thousands of routes: only the rows in view are drawn, the selection stays in view, and the
/// widths over the whole list are measured once per change of the list.
#[test]
fn many_routes_draw_the_rows_in_view() {
    let mut a = App::new("127.0.0.1:9180");
    let routes = (1..=5000)
        .map(|i| json!({"id": i.to_string(), "uri": format!("/r{i}")}))
        .collect();
    a.on_update(config_poll(routes, vec![]));
    key(&mut a, KeyCode::End);
    let s = text(&a, 80, 24);
    assert!(s.contains("│5000 /r5000"), "{s}");
    assert_eq!(a.page.get(), 19);
    key(&mut a, KeyCode::PageUp);
    let s = text(&a, 80, 24);
    assert!(s.contains("│4981 /r4981"), "{s}");
    let measured = a.route_widths.borrow().clone();
    assert_eq!(measured.as_ref().map(|m| m.0), Some(a.config_version));
    a.route_widths
        .replace(Some((a.config_version, vec![4, 6, 5, 7, 7, 8, 4, 3, 3, 6])));
    text(&a, 80, 24);
    assert_eq!(
        a.route_widths.borrow().as_ref().unwrap().1[0],
        4,
        "not measured again while the list stands"
    );
}
