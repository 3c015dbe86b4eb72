//! Gateway status: the master and every worker slot in use.

use crate::state::Master;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use wasmgate_shared::shm::{SlotState, SLOTS};

/// `GET /wasmgate/status`: the master, its generation and its workers.
pub fn gateway(m: &Master) -> Value {
    let now = crate::now_ms();
    let seg = &m.segment;
    let mut workers = Vec::new();
    for i in 0..SLOTS {
        let s = seg.slot(i);
        let state = s.state();
        if state == SlotState::Free {
            continue;
        }
        let started = s.started_at_ms.load(Ordering::Relaxed);
        workers.push(json!({
            "worker_id": s.worker_id.load(Ordering::Relaxed),
            "slot": i,
            "pid": s.pid.load(Ordering::Relaxed),
            "state": state.as_str(),
            "epoch": s.epoch.load(Ordering::Relaxed),
            "uptime_s": now.saturating_sub(started) / 1000,
            "restarts": s.restarts.load(Ordering::Relaxed),
            "generation_seen": s.generation_seen.load(Ordering::Relaxed),
            "requests": s.requests.load(Ordering::Relaxed),
            "active_connections": s.active_connections.load(Ordering::Relaxed),
            "plugin_faults": s.plugin_faults.load(Ordering::Relaxed),
        }));
    }
    workers.sort_by_key(|w| (w["epoch"].as_u64(), w["worker_id"].as_u64()));
    json!({
        "master": {
            "pid": std::process::id(),
            "version": wasmgate_shared::VERSION,
            "uptime_s": now.saturating_sub(m.started_at_ms) / 1000,
            "epoch": m.epoch.load(Ordering::Relaxed),
            "generation": seg.generation(),
            "config": m.config().origin,
        },
        "workers": workers,
    })
}

/// A gateway metric family read from the worker slots: name, type, help, value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&wasmgate_shared::shm::WorkerSlot) -> u64,
);

/// `GET /wasmgate/metrics`: Prometheus text — the gateway's own counters per worker, then the
/// metrics plugins defined (`proxy_define_metric`), aggregated across workers by construction
/// (they live in shared memory).
pub fn prometheus(m: &Master) -> String {
    use std::fmt::Write;
    let seg = &m.segment;
    let mut out = String::new();
    let families: [Family; 4] = [
        (
            "wasmgate_http_requests_total",
            "counter",
            "Requests handled by the worker.",
            |s| s.requests.load(Ordering::Relaxed),
        ),
        (
            "wasmgate_active_connections",
            "gauge",
            "Client connections open now.",
            |s| s.active_connections.load(Ordering::Relaxed),
        ),
        (
            "wasmgate_plugin_faults_total",
            "counter",
            "Plugin traps, time and memory limit hits.",
            |s| s.plugin_faults.load(Ordering::Relaxed),
        ),
        (
            "wasmgate_worker_restarts",
            "gauge",
            "Times the master respawned this worker number.",
            |s| s.restarts.load(Ordering::Relaxed) as u64,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for i in 0..SLOTS {
            let s = seg.slot(i);
            if s.state() == SlotState::Free {
                continue;
            }
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",pid=\"{}\"}} {}",
                s.worker_id.load(Ordering::Relaxed),
                s.pid.load(Ordering::Relaxed),
                value(s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP wasmgate_config_generation Configuration generation published.\n# TYPE wasmgate_config_generation gauge\nwasmgate_config_generation {}",
        seg.generation()
    );
    out.push_str(&m.plugin_shm.render_prometheus());
    out
}
