//! Per-context statistics and the operator endpoints under `/wasmgate/`, read from a running
//! gateway with two workers: counts that add up over the workers, faults by kind, latency
//! quantiles, instance memory, RSS, the error-log tail; nothing of a dead worker reported live.

mod common;

use common::{eventually, http, Gateway, TestUpstream};
use serde_json::{json, Value};
use std::time::Duration;

fn context<'a>(stats: &'a Value, plugin: &str, owner_id: &str) -> &'a Value {
    stats["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["plugin"] == plugin && c["owner_id"] == owner_id)
        .unwrap_or_else(|| panic!("no context {plugin} × {owner_id} in {stats}"))
}

/// Sends `n` requests each on its own connection (so both workers take some).
fn spread(gw: &Gateway, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| http("GET", &gw.url(path), headers, None).status)
        .collect()
}

#[test]
fn context_statistics_add_up_over_workers() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route(
        "pub",
        json!({"uri": "/pub", "plugins": {"rewrite": {"conf": {"set": {"x-a": "1"}}}}}),
        Some(&up),
    );
    gw.route(
        "private",
        json!({"uri": "/private", "plugins": {"wasm_auth": {"conf": "s3cret"}}}),
        Some(&up),
    );
    gw.route(
        "trap",
        json!({"uri": "/trap", "plugins": {"faulty": {"conf": "trap"}}}),
        Some(&up),
    );
    gw.route(
        "loop",
        json!({"uri": "/loop", "plugins": {"faulty": {"conf": "loop"}}}),
        Some(&up),
    );
    assert!(spread(&gw, "/pub", &[], 40).iter().all(|s| *s == 200));
    assert!(spread(&gw, "/private", &[], 6).iter().all(|s| *s == 401));
    let ok = [("Authorization", "Bearer s3cret")];
    assert!(spread(&gw, "/private", &ok, 4).iter().all(|s| *s == 200));
    assert_eq!(http("GET", &gw.url("/trap"), &[], None).status, 503);
    assert_eq!(http("GET", &gw.url("/loop"), &[], None).status, 503);

    let (s, stats) = gw.admin("GET", "/wasmgate/stats", None);
    assert_eq!(s, 200, "{stats}");
    let c = context(&stats, "rewrite", "pub");
    assert_eq!(c["owner_kind"], "route");
    assert_eq!(c["requests"], 40);
    assert_eq!(c["errors"], 0);
    let per_worker: Vec<u64> = c["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 40);
    assert_eq!(per_worker.len(), 2, "both workers served /pub: {c}");
    // One PluginContext per worker that served the route.
    assert_eq!(c["configures"], 2);
    let (p50, p99) = (c["p50_us"].as_f64().unwrap(), c["p99_us"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{c}");
    assert!(c["time_us"].as_u64().unwrap() > 0);

    let auth = context(&stats, "wasm_auth", "private");
    assert_eq!(
        (auth["requests"].as_u64(), auth["local_replies"].as_u64()),
        (Some(10), Some(6))
    );
    let trap = context(&stats, "faulty", "trap");
    assert_eq!(
        (trap["traps"].as_u64(), trap["errors"].as_u64()),
        (Some(1), Some(1))
    );
    let looped = context(&stats, "faulty", "loop");
    assert_eq!(looped["timeouts"], 1);
    // The callback ended by its time limit (200 ms) counts in the time statistics. Its time
    // is recorded as the request ends, which may be a moment after the client has the 503
    // (the fault is counted before it): waited for, not raced.
    let mut looped = looped.clone();
    eventually(
        Duration::from_secs(5),
        "the timed-out callback's time",
        || {
            let (_, stats) = gw.admin("GET", "/wasmgate/stats", None);
            looped = context(&stats, "faulty", "loop").clone();
            !looped["p99_us"].is_null()
        },
    );
    let slowest = looped["p99_us"].as_f64().unwrap_or(0.0);
    assert!(slowest >= 100_000.0, "{looped}");

    // Instance memory of the plugins that ran, per worker; RSS per worker.
    let (_, plugins) = gw.admin("GET", "/wasmgate/plugins", None);
    let rewrite = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "rewrite")
        .unwrap();
    assert_eq!(rewrite["phase"], "access");
    let instances = rewrite["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    assert!(instances
        .iter()
        .all(|i| i["memory_bytes"].as_u64().unwrap() >= 65536));
    let status = gw.status();
    for w in status["workers"].as_array().unwrap() {
        assert!(w["rss_bytes"].as_u64().unwrap() > 1 << 20, "{w}");
    }

    // The error-log tail.
    let (s, log) = gw.admin("GET", "/wasmgate/log?lines=5000", None);
    assert_eq!(s, 200);
    let lines = log["lines"].as_array().unwrap();
    assert!(lines.len() <= 2000);
    assert!(lines.iter().any(|l| l
        .as_str()
        .unwrap()
        .contains("callback exceeded its time limit")));
}

/// A worker killed and respawned starts with no context records: the dead process's counts are
/// not reported as the new one's share, and the master keeps them in the sums (counters only
/// grow while it runs).
#[test]
fn a_respawned_worker_reports_nothing_stale() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route(
        "pub",
        json!({"uri": "/pub", "plugins": {"rewrite": {"conf": {"set": {"x-a": "1"}}}}}),
        Some(&up),
    );
    assert!(spread(&gw, "/pub", &[], 30).iter().all(|s| *s == 200));
    let (_, stats) = gw.admin("GET", "/wasmgate/stats", None);
    let before = context(&stats, "rewrite", "pub").clone();
    assert_eq!(before["requests"], 30);
    let victim = &before["workers"][0];
    let slot = victim["slot"].as_u64().unwrap();
    let lost = victim["requests"].as_u64().unwrap();
    let pid = gw.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"].as_u64() == Some(slot))
        .unwrap()["pid"]
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the worker respawned", || {
        gw.status()["workers"].as_array().unwrap().iter().any(|w| {
            w["slot"].as_u64() == Some(slot)
                && w["pid"].as_i64() != Some(pid)
                && w["state"] == "running"
        })
    });
    let (_, stats) = gw.admin("GET", "/wasmgate/stats", None);
    let after = context(&stats, "rewrite", "pub");
    assert_eq!(after["requests"].as_u64().unwrap(), 30, "{after}");
    assert!(lost > 0, "{before}");
    let shares: u64 = after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(shares, 30 - lost, "the live workers' shares: {after}");
    assert!(
        after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["slot"].as_u64() != Some(slot) || w["requests"] == 0),
        "the respawned worker has nothing of its predecessor's: {after}"
    );
    let restarts: u64 = gw.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 1);
}
