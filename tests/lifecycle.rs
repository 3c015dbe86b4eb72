//! The process model as an operator sees it: daemon and CLI, worker respawn, reload under load
//! with zero failed requests, refused reloads, persistence across `kill -9`, stops, bad config.

mod common;

use common::client::KeepAlive;
use common::{alive, bin, eventually, http, Gateway, TestUpstream, KEY};
use nix::sys::signal::Signal;
use serde_json::json;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn proxied_route(gw: &Gateway, up: &TestUpstream) {
    gw.route(
        "1",
        json!({"uri": "/*", "plugins": {"wasm_log": {"conf": "c"}}}),
        Some(up),
    );
}

/// Writes `wat` as `refuser.wasm` and config.yaml as `good` with it added as plugin `refuser`.
fn add_refuser(gw: &Gateway, good: &str, wat: &str) {
    std::fs::write(
        gw.prefix().join("refuser.wasm"),
        wat::parse_str(wat).unwrap(),
    )
    .unwrap();
    std::fs::write(
        gw.config_path(),
        format!("{good}    - {{name: refuser, priority: 1, file: refuser.wasm}}\n"),
    )
    .unwrap();
}

/// Asks the Admin API at `url` (`.../wasmgate/reload`) to reload: refused (400), saying `says`.
fn reload_refused(url: &str, key: &str, says: &str) {
    let (s, v) = common::client::admin(url, "POST", Some(key), None);
    assert_eq!(s, 400, "{v}");
    let msg = v["error_msg"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "{v}");
}

#[test]
fn worker_killed_is_respawned_and_traffic_continues() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    proxied_route(&gw, &up);
    let before = gw.status();
    let victim = &before["workers"][0];
    let (victim_pid, victim_id) = (
        victim["pid"].as_i64().unwrap() as i32,
        victim["worker_id"].clone(),
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim_pid), Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(10), "worker respawned", || {
        let s = gw.status();
        s["workers"].as_array().unwrap().iter().any(|w| {
            w["worker_id"] == victim_id
                && w["restarts"] == 1
                && w["state"] == "running"
                && w["pid"].as_i64() != Some(victim_pid as i64)
        })
    });
    assert!(!alive(victim_pid));
    for _ in 0..20 {
        assert_eq!(http("GET", &gw.url("/x"), &[], None).status, 200);
    }
    assert!(
        gw.error_log()
            .contains("exited unexpectedly: killed by signal SIGKILL"),
        "{}",
        gw.error_log()
    );
}

/// Clients hammer the gateway (keep-alive and one-shot) while it reloads several times: not a
/// single request may fail, and no old worker may be left behind.
#[test]
fn reload_under_load_fails_no_request() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    proxied_route(&gw, &up);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, ok, failures, base) = (stop.clone(), ok.clone(), failures.clone(), gw.url(""));
        clients.push(std::thread::spawn(move || {
            let mut ka = KeepAlive::new(&base);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = if i % 2 == 0 {
                    ka.get("/load")
                } else {
                    common::client::request("GET", &format!("{base}/load"), &[], None)
                };
                match r {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status)),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    let mut seen_pids: Vec<i32> = gw.worker_pids();
    for epoch in 1..=4u64 {
        std::thread::sleep(Duration::from_millis(400));
        gw.signal(Signal::SIGHUP);
        eventually(Duration::from_secs(10), "reload applied", || {
            gw.status()["master"]["epoch"] == epoch
        });
        seen_pids.extend(gw.worker_pids());
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "only {} requests",
        ok.load(Ordering::Relaxed)
    );
    // Old workers drain and exit; only the current set remains.
    let current = gw.worker_pids();
    assert_eq!(current.len(), 2);
    eventually(Duration::from_secs(15), "old workers exited", || {
        seen_pids
            .iter()
            .filter(|p| !current.contains(p))
            .all(|p| !alive(*p))
    });
}

#[test]
fn invalid_reload_is_refused_and_old_config_keeps_serving() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    proxied_route(&gw, &up);
    let pids = gw.worker_pids();
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), format!("{good}\nnginx_config_typo: 1\n")).unwrap();
    gw.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "refusal logged", || {
        gw.error_log().contains("reload refused")
    });
    let log = gw.error_log();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        line.contains("config.yaml:") && line.contains("nginx_config_typo"),
        "{line}"
    );
    assert_eq!(gw.status()["master"]["epoch"], 0);
    assert_eq!(gw.worker_pids(), pids);
    assert_eq!(http("GET", &gw.url("/still"), &[], None).status, 200);

    // A plugin removed from config.yaml while a route uses it: refused too, naming the route.
    std::fs::write(gw.config_path(), good.replace("wasm_log", "other_plugin")).unwrap();
    reload_refused(&gw.admin_url("/wasmgate/reload"), KEY, "route 1");
    assert_eq!(http("GET", &gw.url("/still"), &[], None).status, 200);

    // An error log the new workers could not open: refused, naming the key.
    std::fs::write(
        gw.config_path(),
        good.replace(
            "nginx_config:\n",
            "nginx_config:\n  error_log: conf/config.yaml/e.log\n",
        ),
    )
    .unwrap();
    reload_refused(
        &gw.admin_url("/wasmgate/reload"),
        KEY,
        "nginx_config.error_log",
    );

    // A plugin whose workers fail to start it: refused, with the workers' own reason.
    let refuser = r#"(module
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 0)))"#;
    add_refuser(&gw, &good, refuser);
    reload_refused(
        &gw.admin_url("/wasmgate/reload"),
        KEY,
        "the new workers failed to start: wasm plugin \"refuser\"",
    );
    assert_eq!(http("GET", &gw.url("/still"), &[], None).status, 200);

    // Fixed: the Admin API reload applies it; a pid file removed meanwhile is written again.
    let pid_file = gw.prefix().join("logs/wasmgate.pid");
    std::fs::remove_file(&pid_file).unwrap();
    std::fs::write(gw.config_path(), &good).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!((s, v["epoch"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        gw.master_pid().to_string()
    );

    // `deployment.admin` applies with the reload, all of it at once: turned off, the key is
    // no longer asked for.
    let url = gw.admin_url("/apisix/admin/routes/1");
    let (s, v) = common::client::admin(&url, "GET", None, None);
    assert_eq!(s, 401, "{v}");
    let open = good.replace("  admin:\n", "  admin:\n    admin_key_required: false\n");
    assert_ne!(open, good);
    std::fs::write(gw.config_path(), open).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!((s, v["epoch"].as_u64()), (200, Some(2)), "{v}");
    let (s, v) = common::client::admin(&url, "GET", None, None);
    assert_eq!(s, 200, "{v}");
}

/// A reload applies what config.yaml says of the master's own servers and files, as nginx
/// applies a new `pid` and APISIX a new admin address: the Admin API moves and takes its new
/// keys, the Prometheus export moves, the pid file moves, the master's own lines go to the new
/// error log. Only what lives in shared memory or names the store waits for a restart. Before
/// the reload, the command line finds the master by its data directory, which config.yaml's
/// new `pid_file` does not name; and a second master on that data directory is refused.
#[test]
fn a_reload_moves_the_admin_api_the_pid_file_and_the_error_log() {
    let up = TestUpstream::start("u");
    let mut gw = Gateway::start();
    proxied_route(&gw, &up);
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    // A move that cannot be made refuses the whole reload and leaves nothing behind.
    let taken = good.replace(
        &format!("port: {}}}", gw.admin_port),
        &format!("port: {}}}", up.port),
    ) + "wasmgate:\n  pid_file: run/refused.pid\n";
    std::fs::write(gw.config_path(), &taken).unwrap();
    reload_refused(
        &gw.admin_url("/wasmgate/reload"),
        KEY,
        "(deployment.admin.admin_listen)",
    );
    assert!(
        !gw.prefix().join("run").exists(),
        "the folder made for it stays"
    );

    // A client kept alive on the export's old address does not keep it after the move.
    let mut kept = KeepAlive::new(&format!("http://127.0.0.1:{}", gw.metrics_port));
    assert_eq!(kept.get("/apisix/prometheus/metrics").unwrap().status, 200);
    let (admin, metrics) = (common::free_port(), common::free_port());
    let new_key = "moved-key-0123456789abcdef";
    let moved =
        good.replace(
            &format!("port: {}}}", gw.admin_port),
            &format!("port: {admin}}}"),
        )
        .replace(
            &format!("port: {}}}", gw.metrics_port),
            &format!("port: {metrics}}}"),
        )
        .replace(KEY, new_key)
        .replace(
            "nginx_config:\n",
            "nginx_config:\n  error_log: logs/moved.log\n",
        ) + "wasmgate:\n  pid_file: run/gw.pid\n  shm_size: 32m\n";
    std::fs::write(gw.config_path(), &moved).unwrap();

    let (ok, out, err) = cli(&["reload"], gw.prefix());
    assert!(ok, "{out}{err}");
    assert!(
        err.contains(&format!("master {} holds", gw.master_pid())),
        "{err}"
    );
    let moved_log =
        || std::fs::read_to_string(gw.prefix().join("logs/moved.log")).unwrap_or_default();
    eventually(Duration::from_secs(20), "reload applied", || {
        moved_log().contains("reload applied: epoch 1")
    });
    let log = moved_log();
    assert!(log.contains("the Admin API moved"), "{log}");
    let old_log = gw.error_log();
    assert!(
        old_log.contains("changes to wasmgate.shm_size take effect at the next restart"),
        "{old_log}"
    );
    assert!(!gw.error_log().contains("reload applied"));

    let at = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    assert!(
        common::client::request("GET", &gw.admin_url("/apisix/admin/routes"), &[], None).is_err()
    );
    let url = at(admin, "/apisix/admin/routes/1");
    let (s, v) = common::client::admin(&url, "GET", Some(new_key), None);
    assert_eq!(s, 200, "{v}");
    let (s, _) = common::client::admin(&url, "GET", Some(KEY), None);
    assert_eq!(s, 401);
    let scrape =
        |port| common::client::request("GET", &at(port, "/apisix/prometheus/metrics"), &[], None);
    assert!(scrape(gw.metrics_port).is_err());
    assert!(kept.get("/apisix/prometheus/metrics").is_err());
    assert_eq!(scrape(metrics).unwrap().status, 200);
    assert_eq!(http("GET", &gw.url("/still"), &[], None).status, 200);

    let pid = gw.master_pid().to_string();
    let pid_file = |p: &str| std::fs::read_to_string(gw.prefix().join(p)).ok();
    assert_eq!(
        pid_file("run/gw.pid").as_deref().map(str::trim),
        Some(pid.as_str())
    );
    assert_eq!(pid_file("logs/wasmgate.pid"), None);
    let (ok, out, err) = cli(&["status"], gw.prefix());
    assert!(ok && out.contains(&pid), "{out}{err}");
    assert!(out.contains("store local  revision "), "{out}");
    // A row per worker, with what operations.md says it shows: connections, faults, RSS.
    let header = out
        .lines()
        .find(|l| l.starts_with("WORKER"))
        .unwrap_or_default();
    assert!(header.ends_with("REQUESTS  CONNS  FAULTS  RSS"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("WORKER"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r.trim_end().ends_with('M')), "{out}");

    // Another config naming the same data directory (and its own pid file and ports).
    let other = moved
        .replace("run/gw.pid", "run/other.pid")
        .replace(
            &format!("port: {admin}}}"),
            &format!("port: {}}}", common::free_port()),
        )
        .replace(
            &format!("port: {metrics}}}"),
            &format!("port: {}}}", common::free_port()),
        )
        .replace(
            &format!("port: {}}}", gw.proxy_port),
            &format!("port: {}}}", common::free_port()),
        );
    std::fs::write(gw.prefix().join("conf/other.yaml"), other).unwrap();
    let (ok, out, err) = cli(&["start", "-c", "conf/other.yaml"], gw.prefix());
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&format!("already running (pid {pid}, config")),
        "{err}"
    );
    // As nginx's [emerg] lines: in the error log too, for starts run by scripts.
    let moved_log = std::fs::read_to_string(gw.prefix().join("logs/moved.log")).unwrap();
    let emerg = common::log_lines(&moved_log, "[emerg]").join("\n");
    assert!(
        emerg.contains("#master: start refused: wasmgate is already running"),
        "{emerg}"
    );
    // Nor does a command run with that configuration act on this master.
    let (ok, out, err) = cli(&["stop", "-c", "conf/other.yaml"], gw.prefix());
    assert!(!ok && err.contains("was started with"), "{out}{err}");
    // The pid file cannot be the lock.
    std::fs::write(
        gw.config_path(),
        moved.replace("run/gw.pid", "data/master.lock"),
    )
    .unwrap();
    reload_refused(&at(admin, "/wasmgate/reload"), new_key, "lock file");
    std::fs::write(gw.config_path(), &moved).unwrap();

    // `stop` waits for the pid to go, and this test's child is not reaped until wait_exit.
    let stop = Command::new(bin())
        .args(["stop", "-p"])
        .arg(gw.prefix())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    let out = stop.wait_with_output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&pid));
    assert!(!gw.prefix().join("run/gw.pid").exists());
}

/// `wasmgate test` refuses what `start` would refuse, as `nginx -t`: a plugin the stored
/// routes use and config.yaml no longer declares, a plugin that cannot start under its
/// `memory_limit`, a log file that cannot be opened. A fresh prefix with the embedded default
/// configuration passes (its example plugin comes from the binary).
#[test]
fn the_test_command_refuses_what_start_would() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    proxied_route(&gw, &up);
    let test = |prefix: &std::path::Path| cli(&["test"], prefix);
    let (ok, out, err) = test(gw.prefix());
    assert!(ok && out.contains("is ok"), "{out}{err}");
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    // APISIX's keys that wasmgate has no use for pass, each named; a variable reference with
    // no value and no default does not.
    let apisix = good.replace(
        "nginx_config:\n",
        "plugins: [wasm, prometheus]\nnginx_config:\n  event:\n    worker_connections: 10620\n",
    );
    std::fs::write(gw.config_path(), &apisix).unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(
        ok && format!("{out}{err}").contains("nginx_config.event: ignored, an APISIX setting"),
        "{out}{err}"
    );
    let unset = good.replace(
        "nginx_config:\n",
        "wasmgate:\n  pid_file: ${{WASMGATE_TEST_NEVER_SET}}\nnginx_config:\n",
    );
    std::fs::write(gw.config_path(), &unset).unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(
        !ok && err.contains("WASMGATE_TEST_NEVER_SET is not set"),
        "{out}{err}"
    );
    std::fs::write(gw.config_path(), &good).unwrap();
    for (bad, says) in [
        (good.replace("wasm_log", "other_plugin"), "route 1"),
        (
            good.replace("{name: wasm_auth,", "{memory_limit: 10k, name: wasm_auth,"),
            "memory limit",
        ),
        (
            format!("{good}\n").replace(
                "nginx_config:\n",
                "nginx_config:\n  error_log: conf/config.yaml/e.log\n",
            ),
            "nginx_config.error_log",
        ),
        // A folder that says it is writable but takes no files (root may write to /proc).
        (
            good.replace(
                "  http:\n",
                "  http:\n    access_log: /proc/wasmgate-nope/access.log\n",
            ),
            "nginx_config.http.access_log",
        ),
    ] {
        assert_ne!(bad, good);
        std::fs::write(gw.config_path(), &bad).unwrap();
        let (ok, out, err) = test(gw.prefix());
        assert!(!ok && err.contains(says), "{says}: {out}{err}");
    }
    // Stored objects a smaller `shm_size` could not hold: the next start would fail, so
    // `test` (and a reload, below) refuse it.
    for i in 0..8 {
        let uris: Vec<String> = (0..5000)
            .map(|n| format!("/stored/{i}/a-path-of-some-length-{n:06}"))
            .collect();
        gw.route(&format!("big{i}"), json!({ "uris": uris }), Some(&up));
    }
    let small = good.replace(
        "nginx_config:\n",
        "wasmgate:\n  shm_size: 1m\nnginx_config:\n",
    );
    std::fs::write(gw.config_path(), &small).unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(
        !ok && err.contains("cannot hold the stored configuration"),
        "{out}{err}"
    );
    reload_refused(
        &gw.admin_url("/wasmgate/reload"),
        KEY,
        "cannot hold the stored configuration",
    );
    for i in 0..8 {
        let (s, v) = gw.admin("DELETE", &format!("/apisix/admin/routes/big{i}"), None);
        assert_eq!(s, 200, "{v}");
    }
    // A plugin that refuses to start says why on stderr, in its own words.
    let refuser = r#"(module
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "vm_config must name a region")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
        (drop (call $log (i32.const 4) (i32.const 16) (i32.const 28)))
        (i32.const 0)))"#;
    add_refuser(&gw, &good, refuser);
    let (ok, out, err) = test(gw.prefix());
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("refuser: vm_config must name a region")
            && err.contains("\"refuser\": start failed"),
        "{err}"
    );
    // One that never returns from its start, with no time limit of its own (`off`): `test`
    // starts it under one and reports it, rather than waiting for ever.
    let looping = r#"(module
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
        (loop $l (br $l))
        (i32.const 1)))"#;
    add_refuser(&gw, &good, looping);
    let unlimited = std::fs::read_to_string(gw.config_path()).unwrap().replace(
        "file: refuser.wasm}",
        "file: refuser.wasm, callback_timeout: off}",
    );
    std::fs::write(gw.config_path(), unlimited).unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(!ok && err.contains("exceeded its time limit"), "{out}{err}");
    std::fs::write(gw.config_path(), &good).unwrap();
    // What `start` would refuse in the data directory: a generated keys' file it cannot read,
    // a pid file that is the directory's lock.
    let keys = gw.prefix().join("data/admin_key");
    let kept = std::fs::read(&keys).ok();
    std::fs::write(&keys, b"not json").unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(
        !ok && err.contains("admin_key: not a JSON map"),
        "{out}{err}"
    );
    match kept {
        Some(k) => std::fs::write(&keys, k).unwrap(),
        None => std::fs::remove_file(&keys).unwrap(),
    }
    std::fs::write(
        gw.config_path(),
        format!("{good}wasmgate:\n  pid_file: data/master.lock\n"),
    )
    .unwrap();
    let (ok, out, err) = test(gw.prefix());
    assert!(
        !ok && err.contains("is the data directory's lock file"),
        "{out}{err}"
    );
    std::fs::write(gw.config_path(), &good).unwrap();
    assert!(test(gw.prefix()).0);
    let fresh = tempfile::tempdir().unwrap();
    let (ok, out, err) = test(fresh.path());
    assert!(ok && out.contains("embedded"), "{out}{err}");
    // It writes nothing: no log folder in the fresh prefix, and a write of the running
    // master's in progress (its temporary file) is left alone.
    assert!(!fresh.path().join("logs").exists());
    let in_progress = gw.prefix().join("data/routes/.tmp-in-progress.json");
    std::fs::write(&in_progress, b"{").unwrap();
    assert!(test(gw.prefix()).0);
    assert!(in_progress.exists());
}

#[test]
fn nothing_acknowledged_is_lost_when_the_master_is_killed() {
    let up = TestUpstream::start("persisted");
    let gw = Gateway::start();
    let (s, _) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/u1",
        Some(json!({"nodes": {up.addr(): 1}})),
    );
    assert_eq!(s, 201);
    assert_eq!(
        gw.admin(
            "PUT",
            "/apisix/admin/services/s1",
            Some(json!({"upstream_id": "u1"}))
        )
        .0,
        201
    );
    for i in 0..20 {
        let (s, _) = gw.admin(
            "PUT",
            &format!("/apisix/admin/routes/{i}"),
            Some(json!({"uri": format!("/r{i}"), "service_id": "s1"})),
        );
        assert_eq!(s, 201);
    }
    assert_eq!(gw.admin("DELETE", "/apisix/admin/routes/7", None).0, 200);
    let workers = gw.worker_pids();
    gw.signal(Signal::SIGKILL);
    // Workers never outlive their master.
    eventually(
        Duration::from_secs(5),
        "workers died with the master",
        || workers.iter().all(|p| !alive(*p)),
    );
    let gw = gw.restart();
    let (_, v) = gw.admin("GET", "/apisix/admin/routes", None);
    assert_eq!(v["total"], 19);
    assert_eq!(gw.admin("GET", "/apisix/admin/routes/7", None).0, 404);
    for i in [0, 8, 19] {
        let r = http("GET", &gw.url(&format!("/r{i}")), &[], None);
        assert_eq!((r.status, r.header("x-upstream")), (200, Some("persisted")));
    }
}

#[test]
fn graceful_stop_lets_in_flight_requests_finish() {
    let up = TestUpstream::start("slow");
    let mut gw = Gateway::start();
    proxied_route(&gw, &up);
    let url = gw.url("/delay/1500");
    let inflight = std::thread::spawn(move || http("GET", &url, &[], None));
    std::thread::sleep(Duration::from_millis(300));
    let pids = gw.worker_pids();
    gw.signal(Signal::SIGQUIT);
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    assert!(pids.iter().all(|p| !alive(*p)));
    assert!(!gw.prefix().join("logs/wasmgate.pid").exists());
}

/// A request still open when `worker_shutdown_timeout` runs out on a draining worker is cut
/// by the gateway: logged 444 (nginx's "closed without an answer") with a warning, not as its
/// client's doing (499).
#[test]
fn a_request_past_worker_shutdown_timeout_is_cut_and_logged() {
    let up = TestUpstream::start("slow");
    let gw = Gateway::start_with(common::Setup {
        shutdown_timeout: "1s".into(),
        ..Default::default()
    });
    proxied_route(&gw, &up);
    let url = gw.url("/delay/4000");
    let inflight = std::thread::spawn(move || common::client::request("GET", &url, &[], None));
    eventually(Duration::from_secs(3), "the request upstream", || {
        up.hits() > 0
    });
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    assert!(inflight.join().unwrap().is_err(), "cut without an answer");
    let access = gw.prefix().join("logs/access.log");
    eventually(Duration::from_secs(5), "the 444 line", || {
        std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("\"GET /delay/4000 HTTP/1.1\" 444 "))
    });
    let log = gw.error_log();
    assert!(
        log.contains("request cut: worker_shutdown_timeout ran out"),
        "{log}"
    );
    assert!(
        !log.contains("client prematurely closed connection"),
        "{log}"
    );
}

#[test]
fn fast_stop_on_term() {
    let mut gw = Gateway::start();
    let pids = gw.worker_pids();
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    eventually(Duration::from_secs(5), "workers gone", || {
        pids.iter().all(|p| !alive(*p))
    });
}

/// A prefix holding only a config.yaml made from `template` (`{proxy}`, `{admin}` replaced),
/// for tests that drive the CLI themselves. Returns the directory, the admin port and the
/// proxy's.
fn bare_prefix(template: &str) -> (tempfile::TempDir, u16, u16) {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (common::free_port(), common::free_port());
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    let yaml = template
        .replace("{proxy}", &proxy.to_string())
        .replace("{admin}", &admin.to_string())
        + &format!(
            "plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: {}}}\n",
            common::free_port()
        );
    std::fs::write(dir.path().join("conf/config.yaml"), yaml).unwrap();
    (dir, admin, proxy)
}

/// Stops a daemon started by a test even when the test fails midway.
struct StopOnDrop<'a>(&'a std::path::Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["stop", "-p"])
            .arg(self.0)
            .output();
    }
}

/// Runs `wasmgate ARGS -p PREFIX`: (success, stdout, stderr).
fn cli(args: &[&str], prefix: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("-p")
        .arg(prefix)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A gateway started on the embedded default configuration (a fresh prefix: the README's
/// first command) stays the operator's once `conf/config.yaml` is written there, as the start
/// told them to: `reload` reads the file, and `status` and `stop` find the master by it.
/// (The embedded default listens on 9080, 9180 and 9091.)
#[test]
fn a_gateway_on_the_embedded_default_takes_its_config_file_later() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path();
    let _guard = StopOnDrop(prefix);
    let (ok, _, err) = cli(&["start"], prefix);
    assert!(ok, "{err}");
    eventually(Duration::from_secs(10), "status answers", || {
        cli(&["status"], prefix).0
    });
    let default = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/config.yaml"))
        .unwrap()
        .replace("error_log_level: warn", "error_log_level: info");
    std::fs::create_dir_all(prefix.join("conf")).unwrap();
    std::fs::write(prefix.join("conf/config.yaml"), default).unwrap();
    let (ok, out, err) = cli(&["reload"], prefix);
    assert!(ok && out.contains("reload applied"), "{out}{err}");
    let (ok, out, err) = cli(&["status"], prefix);
    assert!(ok && out.contains("epoch 1"), "{out}{err}");
    let (ok, _, err) = cli(&["stop"], prefix);
    assert!(ok, "{err}");
}

/// The README's way: a daemon managed through the pid file. With a plugin: the daemon
/// compiles it again on reload, after it forked (a compile thread pool created before the fork
/// once hung that reload for ever).
#[test]
fn daemon_with_status_reload_and_stop_commands() {
    let up = TestUpstream::start("d");
    let template = format!(
        "apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {{proxy}}}}]\n\
         deployment:\n  admin:\n    admin_key: [{{name: admin, key: {KEY}}}]\n    admin_listen: {{ip: 127.0.0.1, port: {{admin}}}}\n\
         nginx_config:\n  worker_processes: 2\n\
         wasm:\n  plugins:\n    - {{name: rewrite, priority: 1, file: \"{}\"}}\n",
        common::fixture("header_rewrite")
    );
    let (dir, admin_port, proxy_port) = bare_prefix(&template);
    let prefix = dir.path();
    let _guard = StopOnDrop(prefix);
    let (ok, _, err) = cli(&["start"], prefix);
    assert!(ok, "{err}");
    let pid: i32 = std::fs::read_to_string(prefix.join("logs/wasmgate.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    let (ok, _, err) = cli(&["start"], prefix);
    assert!(!ok && err.contains("already running"), "{err}");
    let (s, v) = common::admin(
        &format!("http://127.0.0.1:{admin_port}/apisix/admin/routes/1"),
        "PUT",
        Some(KEY),
        Some(json!({"uri": "/d", "upstream": {"nodes": {up.addr(): 1}}})),
    );
    assert_eq!(s, 201, "{v}");
    eventually(
        Duration::from_secs(10),
        "status lists 2 running workers",
        || {
            let (ok, out, _) = cli(&["status"], prefix);
            ok && out.contains(&format!("master  pid {pid}")) && out.matches("running").count() == 2
        },
    );
    // `reload` reports the outcome, and its exit status says it (systemd's ExecReload), with
    // what the operator should know, as `test` prints it: an APISIX key set aside, a change
    // that waits for a restart.
    let conf = prefix.join("conf/config.yaml");
    let good = std::fs::read_to_string(&conf).unwrap()
        + "plugins:\n  - wasm\nwasmgate:\n  shm_size: 32m\n";
    std::fs::write(&conf, &good).unwrap();
    let (ok, out, err) = cli(&["reload"], prefix);
    assert!(
        ok && out.contains("reload applied") && out.contains("epoch 1"),
        "{out}{err}"
    );
    assert!(out.contains("wasmgate: note: plugins:"), "{out}");
    assert!(
        out.contains(
            "wasmgate: note: changes to wasmgate.shm_size take effect at the next restart"
        ),
        "{out}"
    );
    assert!(cli(&["status"], prefix).1.contains("epoch 1"));
    std::fs::write(prefix.join("bad.wasm"), b"not a module").unwrap();
    let bad_plugin = good.replace(&common::fixture("header_rewrite"), "bad.wasm");
    assert_ne!(bad_plugin, good);
    std::fs::write(&conf, bad_plugin).unwrap();
    let (ok, _, err) = cli(&["reload"], prefix);
    assert!(
        !ok && err.contains("reload refused") && err.contains("not a WebAssembly module"),
        "{err}"
    );
    assert!(err.contains("bad.wasm"), "{err}");
    // A reload that changes the Admin API's key cannot be asked with the new key before it
    // applies: `reload` signals, then reads the outcome the master records in the data
    // directory's lock and reports it the same way, exit status included.
    let rekeyed = good.replace(KEY, "another-admin-key-0123456789");
    assert_ne!(rekeyed, good);
    std::fs::write(&conf, &rekeyed).unwrap();
    let (ok, out, err) = cli(&["reload"], prefix);
    assert!(
        ok && out.contains("reload applied") && out.contains("epoch 2"),
        "{out}{err}"
    );
    assert!(err.contains("could not be asked"), "{err}");
    assert!(out.contains("wasmgate: note: plugins:"), "{out}");
    let refused = rekeyed
        .replace(
            "another-admin-key-0123456789",
            "a-third-admin-key-0123456789",
        )
        .replace(&common::fixture("header_rewrite"), "bad.wasm");
    std::fs::write(&conf, refused).unwrap();
    let (ok, _, err) = cli(&["reload"], prefix);
    assert!(
        !ok && err.contains("reload refused") && err.contains("not a WebAssembly module"),
        "{err}"
    );
    std::fs::write(&conf, &rekeyed).unwrap();
    // Signals meant for nginx's master or for the master alone harm nothing: SIGUSR2 (no
    // binary switch) is logged, SIGHUP to a worker ignored.
    let workers: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGUSR2).unwrap();
    for w in &workers {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*w), Signal::SIGHUP).unwrap();
    }
    let error_log = prefix.join("logs/error.log");
    eventually(Duration::from_secs(5), "SIGUSR2 logged", || {
        std::fs::read_to_string(&error_log)
            .unwrap()
            .contains("SIGUSR2 ignored")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid) && workers.iter().all(|w| alive(*w)));
    assert_eq!(
        http(
            "GET",
            &format!("http://127.0.0.1:{proxy_port}/d"),
            &[],
            None
        )
        .status,
        200
    );
    // A config.yaml broken on disk: status names the error and says the master still runs;
    // reload sends nothing; reopen (logrotate's hook) and stop still reach the master.
    std::fs::write(&conf, "nginx_config:\n  worker_processes: many\n").unwrap();
    let (ok, _, err) = cli(&["status"], prefix);
    assert!(!ok && err.contains("worker_processes"), "{err}");
    assert!(
        err.contains(&format!("master (pid {pid}) is running")),
        "{err}"
    );
    let (ok, _, err) = cli(&["reload"], prefix);
    assert!(!ok && err.contains("nothing sent"), "{err}");
    let (ok, out, err) = cli(&["reopen"], prefix);
    assert!(ok && out.contains(&format!("master {pid}")), "{out}{err}");
    assert!(
        err.contains("worker_processes") && err.contains("default pid file"),
        "{err}"
    );
    let (ok, out, err) = cli(&["stop"], prefix);
    assert!(ok, "{out}{err}");
    assert!(!alive(pid));
    assert!(!prefix.join("logs/wasmgate.pid").exists());
    std::fs::write(&conf, good).unwrap();
    let (ok, _, err) = cli(&["status"], prefix);
    assert!(!ok && err.contains("not running"), "{err}");
    assert!(prefix.join("logs/access.log").exists() && prefix.join("logs/error.log").exists());
    // A stale pid file naming a process that merely mentions wasmgate is not a master: stop
    // leaves that process alone.
    use std::os::unix::process::CommandExt;
    let mut other = Command::new("sleep")
        .arg0("tail -f /var/log/wasmgate/error.log")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(prefix.join("logs/wasmgate.pid"), other.id().to_string()).unwrap();
    let (ok, _, err) = cli(&["stop"], prefix);
    assert!(!ok && err.contains("not running"), "{err}");
    assert!(alive(other.id() as i32));
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn bad_config_exits_non_zero_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(
        dir.path().join("conf/config.yaml"),
        "nginx_config:\n  worker_processes: many\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&["start", "--foreground"], dir.path());
    assert!(!ok);
    assert!(
        err.contains("conf/config.yaml:2:") && err.contains("worker_processes"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("conf/config.yaml"),
        "wasm:\n  plugins:\n    - name: p\n      priority: 1\n      file: missing.wasm\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&["test"], dir.path());
    assert!(!ok);
    assert!(
        err.contains("wasm plugin \"p\"") && err.contains("missing.wasm"),
        "{err}"
    );
}

#[test]
fn an_empty_admin_key_is_generated_stored_and_printed_once() {
    let (dir, admin, _) = bare_prefix(
        "apisix:\n  node_listen: [{ip: 127.0.0.1, port: {proxy}}]\n\
         deployment:\n  admin:\n    admin_key:\n      - {name: admin, key: \"\", role: admin}\n    admin_listen: {ip: 127.0.0.1, port: {admin}}\n\
         nginx_config:\n  worker_processes: 1\n",
    );
    let _guard = StopOnDrop(dir.path());
    let start = || {
        let (ok, _, err) = cli(&["start"], dir.path());
        assert!(ok, "{err}");
        err
    };
    let stop = || assert!(cli(&["stop"], dir.path()).0);
    let err = start();
    let key = err
        .split("generated Admin API key for \"admin\": ")
        .nth(1)
        .unwrap_or_else(|| panic!("no key printed: {err}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(key.len(), 32);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("data/admin_key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let url = format!("http://127.0.0.1:{admin}/apisix/admin/routes");
    eventually(Duration::from_secs(10), "admin API answers", || {
        common::client::request("GET", &url, &[], None).is_ok()
    });
    assert_eq!(common::admin(&url, "GET", Some(&key), None).0, 200);
    assert_eq!(common::admin(&url, "GET", None, None).0, 401);
    // `wasmgate status` finds the generated key by itself.
    assert!(cli(&["status"], dir.path()).0);
    // Its output into a reader that went away (`wasmgate status | head -0`): no panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    common::run_ok(
        Command::new(bin())
            .args(["status", "-p"])
            .arg(dir.path())
            .stdout(writer),
    );
    stop();
    let err = start();
    assert!(!err.contains("generated"), "printed twice: {err}");
    eventually(Duration::from_secs(10), "admin API answers", || {
        common::client::request("GET", &url, &[], None).is_ok()
    });
    assert_eq!(common::admin(&url, "GET", Some(&key), None).0, 200);
    stop();
}

/// A worker that cannot start (its access log path became a directory) is retried with growing
/// delays instead of a tight loop, and comes back once the cause is gone.
#[test]
fn crash_looping_worker_backs_off_then_recovers() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    proxied_route(&gw, &up);
    let log = gw.prefix().join("logs/access.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let victim = gw.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let errors = gw.error_log();
    let respawns = errors.matches("respawning in").count();
    // 0, 100, 200, 400, 800 ms… : a handful in 1.5 s, not hundreds.
    assert!(
        (2..=8).contains(&respawns),
        "{respawns} respawns in 1.5 s:\n{errors}"
    );
    assert!(
        errors.contains("respawning in 200 ms") || errors.contains("respawning in 400 ms"),
        "{errors}"
    );
    // The other worker kept serving throughout.
    assert_eq!(http("GET", &gw.url("/x"), &[], None).status, 200);
    std::fs::remove_dir(&log).unwrap();
    eventually(Duration::from_secs(10), "worker back", || {
        gw.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "running")
            .count()
            == 2
    });
}
