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
    // Requests since the master started: the workers that left (a reload, a crash) and the
    // live ones.
    let retired = m.retired();
    let mut requests = retired.requests;
    for i in 0..SLOTS {
        let s = seg.slot(i);
        let state = s.state();
        if state == SlotState::Free {
            continue;
        }
        let started = s.started_at_ms.load(Ordering::Relaxed);
        requests += s.requests.load(Ordering::Relaxed);
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
            "rss_bytes": rss_bytes(s.pid.load(Ordering::Relaxed)),
        }));
    }
    drop(retired);
    workers.sort_by_key(|w| (w["epoch"].as_u64(), w["worker_id"].as_u64()));
    let store = match &m.etcd {
        None => json!({"kind": "local", "revision": m.store().revision()}),
        Some(e) => json!({
            "kind": "etcd",
            "endpoints": e.endpoints(),
            "prefix": e.prefix,
            "reachable": e.reachable.load(Ordering::Relaxed),
            "revision": e.revision.load(Ordering::Relaxed),
            // Why it is not serving this node (refused user, no answer, …), while it is not.
            "error": e.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }),
    };
    json!({
        "store": store,
        "master": {
            "pid": std::process::id(),
            "version": wasmgate_shared::VERSION,
            "uptime_s": now.saturating_sub(m.started_at_ms) / 1000,
            "epoch": m.epoch.load(Ordering::Relaxed),
            "generation": seg.generation(),
            "config": m.config().origin,
            "shm": shm_usage(m),
            "requests": requests,
            "health": health_summary(m),
        },
        "workers": workers,
    })
}

/// How many upstream nodes health checks watch, and which of them are unhealthy (the rest
/// is `GET /wasmgate/healthcheck`).
fn health_summary(m: &Master) -> Value {
    let nodes = m.health.nodes();
    let unhealthy: Vec<Value> = (nodes.iter())
        .filter(|(_, state)| !state.healthy)
        .map(|(l, state)| {
            json!({
                "upstream": format!("/apisix/{}", l.owner),
                "node": l.node,
                "since": state.since,
            })
        })
        .collect();
    json!({"checked": nodes.len(), "unhealthy": unhealthy})
}

/// The configuration's share of `wasmgate.shm_size`: a whole snapshot of every object must fit
/// it (else the Admin API answers 507), and the journal of changes after the snapshot fills it
/// before the master starts it again.
fn shm_usage(m: &Master) -> serde_json::Value {
    let (snapshot, journal, capacity) = m.shm_usage();
    json!({
        "snapshot_bytes": snapshot,
        "journal_bytes": journal,
        "capacity_bytes": capacity,
    })
}

/// Resident memory of a process (`/proc/<pid>/statm`), None when it cannot be read.
fn rss_bytes(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// Slots of live workers (starting, running or draining), with their worker number.
fn live_slots(m: &Master) -> Vec<(usize, u32)> {
    (0..SLOTS)
        .filter(|&i| {
            matches!(
                m.segment.slot(i).state(),
                SlotState::Ready | SlotState::Draining
            )
        })
        .map(|i| (i, m.segment.slot(i).worker_id.load(Ordering::Relaxed)))
        .collect()
}

/// `GET /wasmgate/traffic`: each route's requests by status class and code, and its request
/// latency, summed over the workers (those a reload or a crash replaced included), as the
/// metrics page counts them.
pub fn traffic(m: &Master) -> Value {
    use wasmgate_shared::traffic::{Latency, LATENCY_BOUNDS_MS};
    let routes: Vec<Value> = crate::metrics::route_traffic(m)
        .into_values()
        .map(|r| {
            let class = |c: u16| {
                r.codes
                    .iter()
                    .filter(|(code, _)| *code / 100 == c)
                    .map(|(_, n)| n)
                    .sum::<u64>()
            };
            let codes: serde_json::Map<String, Value> = r
                .codes
                .iter()
                .map(|(code, n)| {
                    let key = if *code == 0 {
                        "other".to_string()
                    } else {
                        code.to_string()
                    };
                    (key, json!(n))
                })
                .collect();
            let latency = &r.latency[Latency::Request as usize];
            // The bound of the bucket that holds the quantile, in ms (None above the last).
            let quantile = |q: f64| {
                let total = latency.count();
                if total == 0 {
                    return None;
                }
                let rank = (q * total as f64).ceil().max(1.0) as u64;
                let mut seen = 0;
                latency.buckets.iter().enumerate().find_map(|(i, n)| {
                    seen += n;
                    (seen >= rank).then(|| LATENCY_BOUNDS_MS.get(i).copied())
                })?
            };
            json!({
                "route": r.route,
                "requests": r.codes.iter().map(|(_, n)| n).sum::<u64>(),
                "2xx": class(2),
                "3xx": class(3),
                "4xx": class(4),
                "5xx": class(5),
                "codes": codes,
                "p50_ms": quantile(0.5),
                "p99_ms": quantile(0.99),
                "ingress_bytes": r.ingress,
                "egress_bytes": r.egress,
            })
        })
        .collect();
    json!({ "routes": routes })
}

/// `GET /wasmgate/stats`: every PluginContext's statistics (route or global rule × plugin),
/// summed over the workers, with each worker's share.
pub fn stats(m: &Master) -> Value {
    use std::collections::BTreeMap;
    use wasmgate_shared::stats::{quantile, ContextSnapshot, LATENCY_BUCKETS};
    let mut merged: BTreeMap<(String, String), (ContextSnapshot, Vec<Value>)> = BTreeMap::new();
    // What workers that left had counted (before a reload, a crash) goes on in the sums; the
    // workers' shares are the live ones'. Held while the slots are read.
    let retired = m.retired_of_live_objects();
    for (key, c) in &retired.contexts {
        merged.insert(key.clone(), (c.clone(), Vec::new()));
    }
    for (slot, worker_id) in live_slots(m) {
        let st = m.segment.stats(slot);
        for i in 0..st.len() {
            let Some(rec) = st.get(i) else { continue };
            let Some(r) = rec.snapshot() else { continue };
            let (sum, per_worker) = merged
                .entry((r.plugin.clone(), r.owner.clone()))
                .or_insert_with(|| {
                    let empty = ContextSnapshot {
                        plugin: r.plugin.clone(),
                        owner: r.owner.clone(),
                        latency: vec![0; LATENCY_BUCKETS],
                        ..Default::default()
                    };
                    (empty, Vec::new())
                });
            per_worker.push(json!({
                "worker_id": worker_id,
                "slot": slot,
                "requests": r.requests,
                "errors": r.errors,
                "traps": r.traps,
                "generation": r.generation,
            }));
            sum.merge(&r);
        }
    }
    let contexts: Vec<Value> = merged
        .into_values()
        .map(|(c, workers)| {
            let (kind, id) = c.owner.split_once(':').unwrap_or(("", &c.owner));
            json!({
                "plugin": c.plugin,
                "owner_kind": kind,
                "owner_id": id,
                "requests": c.requests,
                "local_replies": c.local_replies,
                "errors": c.errors,
                "traps": c.traps,
                "timeouts": c.timeouts,
                "memory_hits": c.memory_hits,
                "configures": c.configures,
                "time_us": c.time_ns / 1000,
                "p50_us": quantile(&c.latency, 0.5),
                "p99_us": quantile(&c.latency, 0.99),
                "generation": c.generation,
                "workers": workers,
            })
        })
        .collect();
    json!({ "generation": m.segment.generation(), "contexts": contexts })
}

/// `GET /wasmgate/plugins`: the plugins of config.yaml and each worker's instance memory.
pub fn plugins(m: &Master) -> Value {
    let cfg = m.config();
    let slots = live_slots(m);
    let list: Vec<Value> = cfg
        .config
        .wasm
        .plugins
        .iter()
        .enumerate()
        .map(|(n, p)| {
            let instances: Vec<Value> = slots
                .iter()
                .map(|(slot, worker_id)| {
                    let mem = m
                        .segment
                        .stats(*slot)
                        .plugin_memory(n)
                        .map(|c| c.load(Ordering::Relaxed));
                    json!({"worker_id": worker_id, "slot": slot, "memory_bytes": mem})
                })
                .collect();
            json!({
                "name": p.name,
                "priority": p.priority,
                "phase": p.http_request_phase.as_str(),
                "file": p.file,
                "fail_open": p.fail_open,
                "callback_timeout_ms": p.callback_timeout.map(|t| t.as_millis() as u64),
                "pause_timeout_ms": p.pause_timeout.as_millis() as u64,
                "memory_limit": p.memory_limit,
                "body_buffer_limit": p.body_buffer_limit,
                "instances": instances,
            })
        })
        .collect();
    json!({ "plugins": list })
}

/// `GET /wasmgate/healthcheck`: the upstreams with health checks and each node's state, in
/// the shape of APISIX's control API `GET /v1/healthcheck`.
pub fn healthcheck(m: &Master) -> Value {
    let mut upstreams: Vec<Value> = Vec::new();
    let mut last: Option<String> = None;
    for (l, state) in m.health.nodes() {
        let name = format!("/apisix/{}", l.owner);
        if last.as_ref() != Some(&name) {
            upstreams.push(json!({"name": name, "type": l.kind, "nodes": []}));
            last = Some(name);
        }
        let node = json!({
            "ip": l.host,
            "port": l.port,
            "status": if state.healthy { "healthy" } else { "unhealthy" },
            "since": (state.since > 0).then_some(state.since),
            "counter": {
                "success": state.successes,
                "http_failure": state.http_failures,
                "tcp_failure": state.tcp_failures,
                "timeout_failure": state.timeouts,
            },
        });
        if let Some(Value::Array(nodes)) = upstreams.last_mut().and_then(|u| u.get_mut("nodes")) {
            nodes.push(node);
        }
    }
    Value::Array(upstreams)
}

/// Most error-log lines `GET /wasmgate/log` returns.
pub const MAX_LOG_LINES: usize = 2000;
/// Bytes read from the end of the error log at most.
const LOG_TAIL_BYTES: u64 = 1 << 20;

/// `GET /wasmgate/log?lines=N`: the last lines of the error log.
pub fn log(m: &Master, lines: usize) -> Result<Value, String> {
    use std::io::{Read, Seek, SeekFrom};
    let cfg = m.config();
    let path = m.prefix.join(&cfg.config.nginx_config.error_log);
    let mut f = std::fs::File::open(&path)
        .map_err(|e| format!("cannot open the error log {}: {e}", path.display()))?;
    let len = f.metadata().map(|md| md.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(LOG_TAIL_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line was cut by the window.
        all.remove(0);
    }
    let n = lines.min(MAX_LOG_LINES);
    let tail = &all[all.len().saturating_sub(n)..];
    Ok(json!({ "path": path, "lines": tail }))
}
