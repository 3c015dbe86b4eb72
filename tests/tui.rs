//! The terminal console (`wasmgate tui`, crate `wasmgate-tui`) against a real gateway: its
//! client fetches real Admin API answers, its keys make real writes, and every screen is drawn
//! into ratatui's `TestBackend` at 80×24 and a larger size and read back as text.
//!
//! `plugins_screen_counts_requests`, `log_screen_tails_the_error_log` and
//! `workers_screen_shows_memory` need `/wasmgate/plugins`, `/wasmgate/stats`, `/wasmgate/log`
//! and the workers' `rss_bytes`.

mod common;

use common::{http, Gateway, TestUpstream, KEY};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use serde_json::json;
use std::time::{Duration, Instant};
use wasmgate_tui::app::{App, Command, Modal, Poll, Screen, Update};
use wasmgate_tui::client::Client;
use wasmgate_tui::transport;

const SMALL: (u16, u16) = (80, 24);
const LARGE: (u16, u16) = (120, 40);

/// The screen as text, one line per row.
fn screen(app: &App, (w, h): (u16, u16)) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| wasmgate_tui::render::draw(f, app)).unwrap();
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..h {
        for x in 0..w {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

/// The first line of the screen that holds every one of `parts`.
fn line_with<'a>(text: &'a str, parts: &[&str]) -> Option<&'a str> {
    text.lines().find(|l| parts.iter().all(|p| l.contains(p)))
}

#[track_caller]
fn assert_line(text: &str, parts: &[&str]) {
    assert!(
        line_with(text, parts).is_some(),
        "no line with {parts:?} on the screen:\n{text}"
    );
}

fn client(gw: &Gateway) -> Client {
    Client::new(&format!("127.0.0.1:{}", gw.admin_port), Some(KEY.into()))
}

fn console(gw: &Gateway) -> App {
    App::new(&format!("127.0.0.1:{}", gw.admin_port))
}

/// Polls until `ok` holds for the answers (the gateway's counters are published
/// asynchronously), and returns that poll.
fn poll_until(c: &Client, what: &str, ok: impl Fn(&Poll) -> bool) -> Box<Poll> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = transport::poll(c);
        if let Update::Poll(p) = &last {
            if ok(p) {
                return p.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last poll: {last:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn poll(c: &Client) -> Box<Poll> {
    poll_until(c, "a poll", |_| true)
}

fn press(app: &mut App, code: KeyCode) -> Option<Command> {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(app: &mut App, c: char) -> Option<Command> {
    app.on_key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

/// Sends `n` requests and checks they were proxied.
fn send(gw: &Gateway, path: &str, n: usize) {
    for _ in 0..n {
        let r = http("GET", &gw.url(path), &[], None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
}

/// Requests counted for `plugin` on route `route` in a poll's stats.
fn requests(p: &Poll, plugin: &str, route: &str) -> Option<u64> {
    p.stats.as_ref().ok()?.contexts.iter().find_map(|c| {
        (c.plugin == plugin
            && c.owner_kind.as_deref() == Some("route")
            && c.owner_id.as_deref() == Some(route))
        .then_some(c.requests?)
    })
}

/// Requests counted for `plugin`, whatever it runs for (a global rule's kind may be named
/// differently).
fn requests_of(p: &Poll, plugin: &str) -> Option<u64> {
    let stats = p.stats.as_ref().ok()?;
    let counts: Vec<u64> = stats
        .contexts
        .iter()
        .filter(|c| c.plugin == plugin)
        .filter_map(|c| c.requests)
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

fn put(gw: &Gateway, path: &str, body: serde_json::Value) {
    let (s, v) = gw.admin("PUT", path, Some(body));
    assert!(s == 200 || s == 201, "PUT {path}: {s} {v}");
}

/// Routes from the Admin API in the table; the editor, the confirmation dialog, the status
/// toggle and the help overlay make real writes and show real answers.
#[test]
fn routes_screen_editor_and_dialogs() {
    let gw = Gateway::start();
    let app_up = TestUpstream::start("app");
    put(
        &gw,
        "/apisix/admin/upstreams/u1",
        json!({"type": "roundrobin", "nodes": {app_up.addr(): 1}}),
    );
    gw.route(
        "1",
        json!({"uri": "/a", "name": "first", "plugins": {"rec_a": {"conf": "a"}, "wasm_log": {"conf": "l"}}}),
        Some(&app_up),
    );
    gw.route(
        "2",
        json!({"uri": "/b", "status": 0, "upstream_id": "u1"}),
        None,
    );
    gw.route(
        "web",
        json!({"uris": ["/w", "/x/*"], "hosts": ["example.com"], "methods": ["GET", "HEAD"]}),
        Some(&app_up),
    );
    let c = client(&gw);
    let mut app = console(&gw);
    app.on_update(Update::Poll(poll(&c)));

    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        assert!(s.contains("Routes (3)"), "{s}");
        assert_line(&s, &["1", "/a", "rec_a", "127.0.0.1:", "enabled"]);
        assert_line(&s, &["2", "/b", "upstream u1", "disabled"]);
        assert_line(
            &s,
            &["web", "/w /x/*", "example.com", "GET,HEAD", "enabled"],
        );
        assert_line(&s, &["● 127.0.0.1:", "n new"]);
    }
    let s = screen(&app, LARGE);
    assert_line(&s, &["rec_a,wasm_log"]);
    assert!(
        s.contains("Route 1 — first"),
        "the selected route's JSON: {s}"
    );
    assert_line(&s, &["\"uri\": \"/a\""]);

    // Help.
    press(&mut app, KeyCode::Char('?'));
    let s = screen(&app, SMALL);
    assert_line(&s, &["Keys"]);
    assert_line(&s, &["R", "reload (asks first)"]);
    assert_line(&s, &["Ctrl-S", "save (PUT)"]);
    press(&mut app, KeyCode::Esc);

    // A new route with a mistake: the Admin API's message shows in the editor, the text stays.
    press(&mut app, KeyCode::Char('n'));
    for _ in 0..20 {
        ctrl(&mut app, 'k');
    }
    let typed = format!(
        "{{\"uri\": \"/new\", \"colour\": \"red\", \"upstream\": {{\"nodes\": {{\"{}\": 1}}}}}}",
        app_up.addr()
    );
    app.on_paste(&typed);
    let cmd = ctrl(&mut app, 's').expect("Ctrl-S saves");
    assert_eq!(
        cmd,
        Command::SaveRoute {
            id: "3".into(),
            body: typed.clone()
        }
    );
    let done = transport::execute(&c, &cmd);
    app.on_update(done);
    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        assert!(s.contains("New route"), "{s}");
        assert!(s.contains("not saved"), "{s}");
        assert!(
            s.contains("400: invalid configuration: additional properties forbidden, found"),
            "{s}"
        );
        assert!(s.contains("\"colour\": \"red\""), "the text is kept: {s}");
    }
    assert_eq!(gw.admin("GET", "/apisix/admin/routes/3", None).0, 404);

    // Broken JSON: the parser's position moves the cursor; then a fixed route is saved.
    let Some(Modal::Editor(ed)) = &mut app.modal else {
        panic!("the editor closed")
    };
    ed.body = wasmgate_tui::editor::TextArea::new("{\n  \"uri\": \"/new\"\n  \"upstream\": 1\n}");
    let cmd = ctrl(&mut app, 's').unwrap();
    app.on_update(transport::execute(&c, &cmd));
    let Some(Modal::Editor(ed)) = &app.modal else {
        panic!("the editor closed")
    };
    assert!(
        ed.error
            .as_deref()
            .unwrap()
            .contains("invalid request body"),
        "{:?}",
        ed.error
    );
    assert_eq!(
        ed.body.cursor().0,
        2,
        "the cursor is on the line the parser stopped at"
    );
    let s = screen(&app, SMALL);
    assert!(s.contains("invalid request body"), "{s}");

    let Some(Modal::Editor(ed)) = &mut app.modal else {
        unreachable!()
    };
    let fixed = format!(
        "{{\"uri\": \"/new\", \"upstream\": {{\"type\": \"roundrobin\", \"nodes\": {{\"{}\": 1}}}}}}",
        app_up.addr()
    );
    ed.body = wasmgate_tui::editor::TextArea::new(&fixed);
    let cmd = ctrl(&mut app, 's').unwrap();
    app.on_update(transport::execute(&c, &cmd));
    assert!(app.modal.is_none(), "saved: the editor closes");
    let (status, v) = gw.admin("GET", "/apisix/admin/routes/3", None);
    assert_eq!((status, v["value"]["uri"].as_str()), (200, Some("/new")));
    app.on_update(Update::Poll(poll(&c)));
    let s = screen(&app, SMALL);
    assert!(s.contains("Routes (4)"), "{s}");
    assert_line(&s, &["route 3 saved"]);
    assert_line(&s, &["3", "/new", "enabled"]);

    // Edit: the stored JSON without id and timestamps.
    press(&mut app, KeyCode::Home);
    press(&mut app, KeyCode::Char('e'));
    let s = screen(&app, LARGE);
    assert!(s.contains("Edit route 1"), "{s}");
    assert!(s.contains("\"name\": \"first\""), "{s}");
    assert!(!s.contains("create_time"), "{s}");
    press(&mut app, KeyCode::Esc);

    // Someone else changes route 1 while it is open here: saving asks before replacing it.
    press(&mut app, KeyCode::Char('e'));
    let (st, v) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/1",
        Some(json!({"desc": "theirs"})),
    );
    assert_eq!(st, 200, "{v}");
    app.on_update(Update::Poll(poll(&c)));
    assert_eq!(ctrl(&mut app, 's'), None);
    let s = screen(&app, LARGE);
    assert!(s.contains("was changed since you opened it"), "{s}");
    press(&mut app, KeyCode::Char('n'));
    press(&mut app, KeyCode::Esc);
    assert!(app.modal.is_none());
    assert_eq!(
        gw.admin("GET", "/apisix/admin/routes/1", None).1["value"]["desc"],
        "theirs"
    );

    // Space disables route 1, once confirmed.
    assert_eq!(press(&mut app, KeyCode::Char(' ')), None);
    assert_line(&screen(&app, SMALL), &["Disable route 1"]);
    let cmd = press(&mut app, KeyCode::Char('y')).unwrap();
    app.on_update(transport::execute(&c, &cmd));
    assert_eq!(
        gw.admin("GET", "/apisix/admin/routes/1", None).1["value"]["status"],
        0
    );
    app.on_update(Update::Poll(poll(&c)));
    assert_line(&screen(&app, SMALL), &["1", "/a", "disabled"]);
    gw.wait_propagated();
    assert_eq!(http("GET", &gw.url("/a"), &[], None).status, 404);

    // Delete asks first.
    press(&mut app, KeyCode::Char('d'));
    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        assert!(s.contains("Delete route 1 (first, /a)?"), "{s}");
        assert_line(&s, &["y yes", "n no"]);
    }
    press(&mut app, KeyCode::Char('n'));
    assert!(app.modal.is_none());
    assert_eq!(gw.admin("GET", "/apisix/admin/routes/1", None).0, 200);
    press(&mut app, KeyCode::Char('d'));
    let cmd = press(&mut app, KeyCode::Char('y')).unwrap();
    app.on_update(transport::execute(&c, &cmd));
    assert_eq!(gw.admin("GET", "/apisix/admin/routes/1", None).0, 404);
    app.on_update(Update::Poll(poll(&c)));
    let s = screen(&app, SMALL);
    assert!(s.contains("Routes (3)"), "{s}");
    assert_line(&s, &["route 1 deleted"]);
}

/// Screen 2: the loaded plugins, and per-context counters with req/s from two polls.
/// Needs `/wasmgate/plugins` and `/wasmgate/stats`.
#[test]
fn plugins_screen_counts_requests() {
    let gw = Gateway::start();
    let up = TestUpstream::start("app");
    put(
        &gw,
        "/apisix/admin/global_rules/g1",
        json!({"plugins": {"rec_b": {"conf": "global"}}}),
    );
    gw.route(
        "1",
        json!({"uri": "/a", "plugins": {"rec_a": {"conf": "a"}}}),
        Some(&up),
    );
    let c = client(&gw);
    let mut app = console(&gw);
    app.screen = Screen::Plugins;

    send(&gw, "/a", 10);
    let t0 = Instant::now();
    let mut p = poll_until(&c, "10 requests counted", |p| {
        requests(p, "rec_a", "1") == Some(10) && requests_of(p, "rec_b") == Some(10)
    });
    p.at = t0;
    app.on_update(Update::Poll(p));
    send(&gw, "/a", 20);
    let mut p = poll_until(&c, "30 requests counted", |p| {
        requests(p, "rec_a", "1") == Some(30) && requests_of(p, "rec_b") == Some(30)
    });
    p.at = t0 + Duration::from_secs(2);
    app.on_update(Update::Poll(p));

    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        // The plugins of config.yaml, with their priority and phase.
        assert!(
            s.contains(&format!("Plugins ({})", common::PLUGINS.len())),
            "{s}"
        );
        assert_line(&s, &["wasm_log", "7999", "access"]);
        assert_line(&s, &["wasm_auth", "8000", "rewrite"]);
        // 20 requests in 2 s on route 1.
        assert_line(&s, &["rec_a", "route 1", "10.0", "30"]);
        // The global rule ran for the same requests.
        assert_line(&s, &["rec_b", "10.0", "30"]);
        assert!(s.contains("req/s —"), "the sparkline: {s}");
    }
    // The table sorts by requests, largest first, then reversed.
    for _ in 0..3 {
        press(&mut app, KeyCode::Char('s'));
    }
    let s = screen(&app, LARGE);
    assert!(s.contains("sorted by requests ▼"), "{s}");
    press(&mut app, KeyCode::Char('r'));
    assert!(screen(&app, LARGE).contains("sorted by requests ▲"));

    // The Routes screen counts each route's requests and errors: 30 answered, and 4 that
    // the route's unreachable upstream turned into 502s on a second route.
    gw.route(
        "2",
        json!({"uri": "/dead", "upstream": {"nodes": {"127.0.0.1:1": 1}}}),
        None,
    );
    for _ in 0..4 {
        assert_eq!(http("GET", &gw.url("/dead"), &[], None).status, 502);
    }
    let p = poll_until(&c, "the 502s counted", |p| {
        p.traffic.as_ref().is_ok_and(|t| {
            t.of("2").and_then(|r| r.server_errors) == Some(4)
                && t.of("1").and_then(|r| r.requests) == Some(30)
        })
    });
    app.on_update(Update::Poll(p));
    app.screen = Screen::Routes;
    let s = screen(&app, LARGE);
    assert_line(&s, &["1", "/a", "30", "0", "0", "enabled"]);
    assert_line(&s, &["2", "/dead", "4", "0", "4", "enabled"]);
}

/// Screen 3: the master and a live worker table; `R` reloads through the Admin API and the
/// new epoch rolls in on the next poll.
#[test]
fn workers_screen_and_reload() {
    let gw = Gateway::start();
    let c = client(&gw);
    let mut app = console(&gw);
    press(&mut app, KeyCode::Char('3'));
    app.on_update(Update::Poll(poll(&c)));
    let status = gw.status();
    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        assert!(s.contains("Workers (2)"), "{s}");
        assert_line(
            &s,
            &["pid", &status["master"]["pid"].to_string(), "epoch 0"],
        );
        for w in status["workers"].as_array().unwrap() {
            assert_line(&s, &[&w["pid"].to_string(), "running"]);
        }
        // The tab line shows the generation where it has room (not at 80 columns, where
        // the seven tabs fill it; the Master box above shows it there).
        if size == LARGE {
            assert_line(&s, &["gen ", "epoch 0"]);
        }
    }

    // Reload through the transport thread, as the console does.
    press(&mut app, KeyCode::Char('R'));
    let s = screen(&app, SMALL);
    assert!(s.contains("Reload config.yaml and plugins"), "{s}");
    let cmd = press(&mut app, KeyCode::Char('y')).unwrap();
    assert_eq!(cmd, Command::Reload);
    assert!(screen(&app, SMALL).contains("reloading…"));
    let (commands, updates) = transport::spawn(c.clone(), Duration::from_millis(200));
    commands.send(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut reloaded = false;
    while Instant::now() < deadline {
        match updates.recv_timeout(Duration::from_secs(1)) {
            Ok(u @ Update::Done { .. }) => {
                app.on_update(u);
                reloaded = true;
                let s = screen(&app, SMALL);
                assert_line(&s, &["reloaded: epoch 1"]);
            }
            Ok(u) => {
                app.on_update(u);
                if reloaded && screen(&app, SMALL).contains("epoch 1") {
                    let epoch_one = app
                        .status
                        .data
                        .as_ref()
                        .unwrap()
                        .workers
                        .iter()
                        .all(|w| w.epoch == Some(1));
                    if epoch_one {
                        break;
                    }
                }
            }
            Err(_) => {}
        }
    }
    assert!(reloaded, "no answer to the reload");
    let s = screen(&app, LARGE);
    assert_line(&s, &["gen ", "epoch 1"]);
    let status = gw.status();
    for w in status["workers"].as_array().unwrap() {
        if w["epoch"] == 1 {
            assert_line(&s, &[&w["pid"].to_string(), "running"]);
        }
    }
}

/// The workers' memory. Needs `rss_bytes` in `/wasmgate/status`.
#[test]
fn workers_screen_shows_memory() {
    let gw = Gateway::start();
    let c = client(&gw);
    let mut app = console(&gw);
    app.screen = Screen::Workers;
    app.on_update(Update::Poll(poll(&c)));
    let workers = &app.status.data.as_ref().unwrap().workers;
    assert!(
        workers.iter().all(|w| w.rss_bytes.unwrap_or(0) > 0),
        "{workers:?}"
    );
    let s = screen(&app, SMALL);
    for w in workers {
        let rss = wasmgate_tui::fmt::bytes(w.rss_bytes);
        assert!(rss.ends_with('M') || rss.ends_with('G'), "{rss}");
        assert_line(&s, &[&w.pid.unwrap().to_string(), "running", &rss]);
    }
}

/// Screen 4: the error log's tail. Needs `/wasmgate/log`.
#[test]
fn log_screen_tails_the_error_log() {
    let gw = Gateway::start();
    let up = TestUpstream::start("app");
    gw.route("logged-route", json!({"uri": "/l"}), Some(&up));
    let c = client(&gw);
    let mut app = console(&gw);
    press(&mut app, KeyCode::Char('4'));
    let p = poll_until(&c, "the write in the log", |p| {
        p.log.as_ref().is_ok_and(|l| {
            l.lines
                .iter()
                .any(|l| l.contains("PUT /apisix/admin/routes/logged-route"))
        })
    });
    app.on_update(Update::Poll(p));
    let s = screen(&app, SMALL);
    assert!(s.contains("logs/error.log (following)"), "{s}");
    let s = screen(&app, (200, 50));
    assert_line(&s, &["[info]", "PUT /apisix/admin/routes/logged-route"]);
    // Scrolling back shows where the window is; it stops once the first line is at the top.
    let short = (200, 8);
    screen(&app, short);
    press(&mut app, KeyCode::Up);
    let s = screen(&app, short);
    assert!(s.contains(" of "), "{s}");
    press(&mut app, KeyCode::Char('g'));
    let s = screen(&app, short);
    assert!(s.contains("(1-4 of "), "the first four lines: {s}");
    // In a pane that holds the whole log, there is nothing to scroll back to.
    let s = screen(&app, (200, 200));
    assert!(s.contains("(following)"), "{s}");
}

/// When the gateway goes away the console keeps its data and says it is retrying; the
/// transport thread reconnects by itself when the gateway is back.
#[test]
fn disconnected_then_reconnected() {
    let mut gw = Gateway::start();
    let up = TestUpstream::start("app");
    gw.route("kept", json!({"uri": "/k"}), Some(&up));
    let mut app = console(&gw);
    let (_commands, updates) = transport::spawn(client(&gw), Duration::from_millis(100));
    let next = |app: &mut App, want: fn(&Update) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = updates
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the transport thread reports");
            let done = want(&u);
            app.on_update(u);
            if done {
                return;
            }
        }
    };
    next(&mut app, |u| matches!(u, Update::Poll(_)));
    assert_line(&screen(&app, SMALL), &["kept", "/k"]);

    gw.signal(nix::sys::signal::Signal::SIGTERM);
    gw.wait_exit(Duration::from_secs(10));
    next(&mut app, |u| matches!(u, Update::Unreachable(_)));
    for size in [SMALL, LARGE] {
        let s = screen(&app, size);
        assert!(s.contains("disconnected, retrying…"), "{s}");
        assert_line(&s, &["kept", "/k"]);
    }

    let gw = gw.restart();
    next(&mut app, |u| matches!(u, Update::Poll(_)));
    let s = screen(&app, SMALL);
    assert!(!s.contains("disconnected"), "{s}");
    assert_line(&s, &["● 127.0.0.1:"]);
    assert_line(&s, &["kept", "/k"]);
    drop(gw);
}

/// Screen 5: the SSL objects a real gateway stores, with their certificates' expiry as the
/// Admin API filled it from each certificate.
#[test]
fn certificates_screen_lists_ssl_objects_by_expiry() {
    let gw = Gateway::start();
    let ca = common::tls::Ca::new("console CA");
    for (id, name) in [("a", "a.example.com"), ("b", "b.example.com")] {
        let (cert, key) = ca.issue(name, &[name]);
        let body = json!({"cert": cert.pem(), "key": key.serialize_pem(), "snis": [name]});
        put(&gw, &format!("/apisix/admin/ssls/{id}"), body);
    }
    let c = client(&gw);
    let mut app = console(&gw);
    press(&mut app, KeyCode::Char('5'));
    app.on_update(Update::Poll(poll(&c)));
    let s = screen(&app, (120, 30));
    assert!(
        s.contains("Certificates (2) — 0 served expired or expire within 14 days"),
        "{s}"
    );
    // rcgen's default notAfter, 4096-01-01.
    assert_line(&s, &["a", "a.example.com", "4096-01-01", "on"]);
    assert_line(&s, &["b", "b.example.com", "4096-01-01", "on"]);
}

/// The routes screen's `healthy` column: nodes the gateway's health checks found healthy, of
/// all the nodes of the route's upstream (a node nothing listens on fails its TCP probes).
#[test]
fn routes_screen_shows_upstream_health() {
    let gw = Gateway::start();
    let up = TestUpstream::start("up");
    let dead = format!("127.0.0.1:{}", common::free_port());
    let checks =
        json!({"active": {"type": "tcp", "unhealthy": {"interval": 1, "tcp_failures": 1}}});
    let nodes = json!({up.addr(): 1, dead.clone(): 1});
    put(
        &gw,
        "/apisix/admin/routes/checked",
        json!({"uri": "/checked", "upstream": {"nodes": nodes, "checks": checks}}),
    );
    put(
        &gw,
        "/apisix/admin/upstreams/u1",
        json!({"name": "pool", "nodes": {up.addr(): 3}}),
    );
    put(
        &gw,
        "/apisix/admin/routes/plain",
        json!({"uri": "/plain", "upstream_id": "u1"}),
    );
    let c = client(&gw);
    let mut app = console(&gw);
    let p = poll_until(&c, "the dead node found", |p| {
        let h = p.health.as_ref().ok();
        h.and_then(|h| h.of("/apisix/routes/checked")) == Some((1, 2))
    });
    app.on_update(Update::Poll(p));
    let s = screen(&app, (120, 30));
    assert_line(&s, &["checked", "/checked", "1/2", "enabled"]);
    assert_line(&s, &["plain", "/plain", " - ", "enabled"]);

    // The Upstreams screen: each node, what the checks find it, the routes using it.
    press(&mut app, KeyCode::Char('6'));
    let s = screen(&app, (120, 30));
    assert_line(
        &s,
        &[
            "upstreams/u1 (pool)",
            "roundrobin http",
            &up.addr(),
            " 3 ",
            " - ",
            " 1 ",
        ],
    );
    assert_line(&s, &["route checked", "roundrobin http", "tcp"]);
    assert_line(
        &s,
        &[&format!("{} 1", up.addr()), "healthy", "0 ok, 0 failed"],
    );
    assert_line(&s, &[&format!("{dead} 1"), "UNHEALTHY"]);
    assert!(s.contains("3 nodes, 1 unhealthy"), "{s}");
}

/// Screen 7: each service with its hosts, plugins and upstream, the routes that name it and
/// their requests added up.
#[test]
fn services_screen_counts_its_routes() {
    let gw = Gateway::start();
    let up = TestUpstream::start("up");
    put(
        &gw,
        "/apisix/admin/services/s1",
        json!({"name": "shop", "hosts": ["shop.test"], "upstream": {"nodes": {up.addr(): 1}}}),
    );
    put(
        &gw,
        "/apisix/admin/upstreams/u9",
        json!({"nodes": {up.addr(): 1}}),
    );
    put(
        &gw,
        "/apisix/admin/services/lonely",
        json!({"upstream_id": "u9"}),
    );
    for (id, uri) in [("a", "/a"), ("b", "/b")] {
        put(
            &gw,
            &format!("/apisix/admin/routes/{id}"),
            json!({"uri": uri, "service_id": "s1"}),
        );
    }
    gw.wait_propagated();
    for path in ["/a", "/a", "/b"] {
        let r = http("GET", &gw.url(path), &[("host", "shop.test")], None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let c = client(&gw);
    let mut app = console(&gw);
    let p = poll_until(&c, "the requests counted", |p| {
        p.traffic.as_ref().is_ok_and(|t| {
            t.of("a").and_then(|r| r.requests) == Some(2)
                && t.of("b").and_then(|r| r.requests) == Some(1)
        })
    });
    app.on_update(Update::Poll(p));
    press(&mut app, KeyCode::Char('7'));
    let s = screen(&app, (120, 30));
    assert!(s.contains("Services (2)"), "{s}");
    assert_line(
        &s,
        &["s1 (shop)", "shop.test", &up.addr(), " 2 ", " 3 ", " 0"],
    );
    assert_line(&s, &["lonely", "upstream u9", " 0 "]);
}
