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
