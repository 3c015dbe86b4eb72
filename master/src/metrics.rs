//! The Prometheus endpoint: `plugin_attr.prometheus.export_addr` + `export_uri` (APISIX's
//! 127.0.0.1:9091 `/apisix/prometheus/metrics` by default), and the Admin API's
//! `/wasmgate/metrics`, both in Prometheus text format 0.0.4.
//!
//! Nothing is counted here: workers count in their shared-memory slots (route traffic in
//! `wasmgate_shared::traffic`, plugin contexts in `wasmgate_shared::stats`, plugin-defined
//! metrics in the plugin segment). A scrape reads every live slot, sums the workers, and
//! writes the page with [`crate::prom_text`].
//!
//! Names follow APISIX's with the configured prefix (`apisix_` by default), so APISIX's
//! dashboards and alerts work unchanged: `apisix_http_status` and `apisix_bandwidth` are
//! counters without `_total`, as APISIX's exporter names them; the families of wasmgate's own
//! end their counters in `_total`, as the Prometheus conventions ask.

use crate::prom_text::{Labels, Page};
use crate::state::Master;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wasmgate_shared::model::Kind;
use wasmgate_shared::plugin_shm::{prometheus_name, MetricKind, MetricSnapshot};
use wasmgate_shared::shm::{SlotState, SLOTS};
use wasmgate_shared::stats::{bucket_bound, ContextSnapshot};
use wasmgate_shared::traffic::{HistogramSnapshot, Latency, RouteSnapshot, LATENCY_BOUNDS_MS};

pub use crate::prom_text::CONTENT_TYPE;

/// The gateway's metric families, after the prefix. A plugin-defined metric with one of these
/// names (prefix included) is not exported: the gateway's own family wins.
pub const FAMILIES: [&str; 19] = [
    "etcd_reachable",
    "etcd_modify_indexes",
    "http_status",
    "http_latency",
    "bandwidth",
    "nginx_http_current_connections",
    "http_requests",
    "node_info",
    "config_generation",
    "worker_requests",
    "worker_connections",
    "worker_plugin_faults",
    "worker_restarts",
    "wasm_plugin_requests",
    "wasm_plugin_local_replies",
    "wasm_plugin_errors",
    "wasm_plugin_traps",
    "wasm_plugin_timeouts",
    "wasm_plugin_memory_hits",
];
/// Also a gateway family (a histogram, listed apart to keep [`FAMILIES`] the counters'
/// and gauges' names).
const PLUGIN_TIME: &str = "wasm_plugin_time_seconds";

/// Says once per name, in the error log, that a plugin's metric is not exported: its name
/// is one of the gateway's families, or another plugin metric's once sanitised.
fn warn_skipped(defined: &str, exported: &str, gateway_family: bool) {
    static WARNED: std::sync::Mutex<Option<HashSet<String>>> = std::sync::Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned
        .get_or_insert_with(HashSet::new)
        .insert(exported.to_string())
    {
        return;
    }
    let why = match gateway_family {
        true => "the gateway exports a metric of that name",
        false => "another plugin metric has that name once made a Prometheus name",
    };
    tracing::warn!(
        "plugin metric {defined:?} is not exported as {exported}: {why}; rename it in the \
         plugin (or change plugin_attr.prometheus.metric_prefix)"
    );
}

/// One worker's own counters.
#[derive(Debug)]
struct WorkerRow {
    worker_id: u32,
    pid: u32,
    requests: u64,
    connections: u64,
    accepted: u64,
    reading: u64,
    writing: u64,
    faults: u64,
    restarts: u32,
}

/// Everything one scrape exports, copied out of shared memory.
#[derive(Debug)]
struct Scrape {
    prefix: String,
    hostname: String,
    generation: u64,
    workers: Vec<WorkerRow>,
    /// Requests served by workers that left (a reload, a crash): the total goes on from there.
    retired_requests: u64,
    /// Connections accepted by workers that left.
    retired_accepted: u64,
    /// Summed over workers, by route id.
    routes: BTreeMap<String, RouteSnapshot>,
    /// Summed over workers, by (plugin, owner).
    contexts: BTreeMap<(String, String), ContextSnapshot>,
    plugin_metrics: Vec<MetricSnapshot>,
    /// Cluster mode: whether etcd answers.
    etcd_reachable: Option<bool>,
    /// Route id → its `service_id`, for APISIX's `service` label.
    services: BTreeMap<String, String>,
    /// APISIX's `etcd_modify_indexes`: by key, the last change of each kind of object, their
    /// maximum and the store's revision (etcd's in cluster mode).
    modify_indexes: Vec<(String, u64)>,
}

/// Every route's traffic summed over the workers, those that left included (by route id;
/// `""`: requests no route matched).
pub fn route_traffic(m: &Master) -> BTreeMap<String, RouteSnapshot> {
    let retired = m.retired_of_live_objects();
    let mut routes = retired.routes.clone();
    for i in 0..SLOTS {
        if m.segment.slot(i).state() == SlotState::Free {
            continue;
        }
        for r in m.segment.traffic(i).snapshot() {
            crate::retired::add_route(&mut routes, r);
        }
    }
    routes
}

/// The metrics page.
pub fn render(m: &Master) -> String {
    let mut scrape = Scrape::read(m);
    // After the read, whose lock on the counters of workers that left is not held with the
    // store's.
    let store = m.store();
    scrape.services = scrape
        .routes
        .keys()
        .filter_map(|id| {
            let service = store.get(Kind::Routes, id)?.value.get("service_id")?;
            let service = match service {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((id.clone(), service))
        })
        .collect();
    scrape.modify_indexes = modify_indexes(&store);
    drop(store);
    scrape.page()
}

/// The last change of each kind of object (the largest `modifiedIndex` among those stored),
/// their maximum and the store's revision, under APISIX's keys.
fn modify_indexes(store: &crate::store::Store) -> Vec<(String, u64)> {
    let mut last: BTreeMap<&'static str, u64> = Kind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    for (kind, _, stored) in store.iter() {
        let m = last.entry(kind.as_str()).or_default();
        *m = (*m).max(stored.modified_index);
    }
    let max = last.values().copied().max().unwrap_or(0);
    let mut out: Vec<(String, u64)> = last.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    out.push(("max_modify_index".into(), max));
    out.push(("x_etcd_index".into(), store.revision()));
    out
}

impl Scrape {
    fn read(m: &Master) -> Scrape {
        let seg = &m.segment;
        // Held while the slots are read: a leaving worker is counted in its slot or here.
        let retired = m.retired_of_live_objects();
        let mut scrape = Scrape {
            prefix: m
                .config()
                .config
                .plugin_attr
                .prometheus
                .metric_prefix
                .clone(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            generation: seg.generation(),
            workers: Vec::new(),
            retired_requests: retired.requests,
            retired_accepted: retired.accepted,
            routes: retired.routes.clone(),
            contexts: retired.contexts.clone(),
            plugin_metrics: m.plugin_shm.metrics(),
            etcd_reachable: m.etcd.as_ref().map(|e| e.reachable.load(Ordering::Relaxed)),
            services: BTreeMap::new(),
            modify_indexes: Vec::new(),
        };
        for i in 0..SLOTS {
            let s = seg.slot(i);
            if s.state() == SlotState::Free {
                continue;
            }
            scrape.workers.push(WorkerRow {
                worker_id: s.worker_id.load(Ordering::Relaxed),
                pid: s.pid.load(Ordering::Relaxed),
                requests: s.requests.load(Ordering::Relaxed),
                connections: s.active_connections.load(Ordering::Relaxed),
                accepted: s.accepted.load(Ordering::Relaxed),
                reading: s.reading.load(Ordering::Relaxed).into(),
                writing: s.writing.load(Ordering::Relaxed).into(),
                faults: s.plugin_faults.load(Ordering::Relaxed),
                restarts: s.restarts.load(Ordering::Relaxed),
            });
            for r in seg.traffic(i).snapshot() {
                crate::retired::add_route(&mut scrape.routes, r);
            }
            let stats = seg.stats(i);
            for c in (0..stats.len()).filter_map(|j| stats.get(j)) {
                if let Some(c) = c.snapshot() {
                    crate::retired::add_context(&mut scrape.contexts, c);
                }
            }
        }
        scrape.workers.sort_by_key(|w| (w.worker_id, w.pid));
        scrape
    }
}

/// A per-context counter family: name (after `wasm_plugin_`, before `_total`), help, value.
type ContextCounter = (&'static str, &'static str, fn(&ContextSnapshot) -> u64);

/// A route latency histogram in milliseconds, APISIX's unit.
fn latency_buckets(h: &HistogramSnapshot) -> (f64, Vec<(f64, u64)>) {
    let bounds = LATENCY_BOUNDS_MS.iter().copied().chain([f64::INFINITY]);
    let buckets = bounds
        .zip(h.buckets.iter().copied().chain(std::iter::repeat(0)))
        .collect();
    (h.sum_us as f64 / 1000.0, buckets)
}

impl Scrape {
    fn page(&self) -> String {
        let mut page = Page::default();
        let enc = &mut page;
        let p = &self.prefix;
        // APISIX's labels that wasmgate has: the route and its service ("" without one).
        let route = |id: &str, mut labels: Labels| {
            let service = self.services.get(id).cloned().unwrap_or_default();
            labels.extend([("route", id.to_string()), ("service", service)]);
            labels
        };
        enc.counter(
            &format!("{p}http_status"),
            "HTTP responses by status code and route (route \"\": no route matched; \"*\": routes beyond a worker's table).",
            self.routes.values().flat_map(|r| {
                r.codes.iter().map(|&(code, n)| {
                    let code = if code == 0 { "other".into() } else { code.to_string() };
                    (route(&r.route, vec![("code", code)]), n)
                })
            }),
        );
        enc.histogram(
            &format!("{p}http_latency"),
            "Request latency in milliseconds: type request (whole), upstream (the upstream's time, until its answer ends), apisix (the gateway's share).",
            self.routes.values().flat_map(|r| {
                Latency::ALL.into_iter().filter_map(|t| {
                    let h = &r.latency[t as usize];
                    (h.count() > 0).then(|| {
                        (route(&r.route, vec![("type", t.label().to_string())]), latency_buckets(h))
                    })
                })
            }),
        );
        enc.counter(
            &format!("{p}bandwidth"),
            "Bytes received from clients (ingress) and sent to them (egress), by route.",
            self.routes.values().flat_map(|r| {
                [("ingress", r.ingress), ("egress", r.egress)]
                    .map(|(t, n)| (route(&r.route, vec![("type", t.to_string())]), n))
            }),
        );
        enc.gauge(
            &format!("{p}nginx_http_current_connections"),
            "Client connections as nginx's stub_status counts them, all workers: accepted and handled since start; active now, of which reading a request head, writing (a request being handled) and waiting for a request.",
            self.connection_states()
                .map(|(state, n)| (vec![("state", state.to_string())], n as i64)),
        );
        enc.counter(
            &format!("{p}http_requests_total"),
            "Requests handled, all workers (those replaced by a reload or a crash included).",
            [(
                Vec::new(),
                self.retired_requests + self.workers.iter().map(|w| w.requests).sum::<u64>(),
            )],
        );
        enc.gauge(
            &format!("{p}node_info"),
            "This node: host name and version.",
            [(
                vec![
                    ("hostname", self.hostname.clone()),
                    ("version", wasmgate_shared::VERSION.to_string()),
                ],
                1,
            )],
        );
        enc.gauge(
            &format!("{p}config_generation"),
            "Configuration generation published to the workers.",
            [(Vec::new(), self.generation as i64)],
        );
        enc.gauge(
            &format!("{p}etcd_modify_indexes"),
            "The last change of each kind of object (its modifiedIndex), the largest of them, and the store's revision (etcd's in cluster mode).",
            self.modify_indexes
                .iter()
                .map(|(k, v)| (vec![("key", k.clone())], *v as i64)),
        );
        enc.gauge(
            &format!("{p}etcd_reachable"),
            "Cluster mode: 1 while etcd answers, 0 while the last configuration is served without it.",
            self.etcd_reachable.map(|r| (Vec::new(), r as i64)),
        );
        self.encode_workers(enc);
        self.encode_contexts(enc);
        self.encode_plugin_metrics(enc);
        page.into_text()
    }

    /// nginx's stub_status figures summed over the workers. Every accepted connection is
    /// handled (none is dropped for want of resources). A connection is counted as reading
    /// or writing by its worker; the rest of the active ones are waiting.
    fn connection_states(&self) -> [(&'static str, u64); 6] {
        let sum = |f: fn(&WorkerRow) -> u64| self.workers.iter().map(f).sum::<u64>();
        let accepted = self.retired_accepted + sum(|w| w.accepted);
        let (active, reading, writing) = (
            sum(|w| w.connections),
            sum(|w| w.reading),
            sum(|w| w.writing),
        );
        [
            ("accepted", accepted),
            ("handled", accepted),
            ("active", active),
            ("reading", reading),
            ("writing", writing),
            ("waiting", active.saturating_sub(reading + writing)),
        ]
    }

    fn encode_workers(&self, enc: &mut Page) {
        let p = &self.prefix;
        let labels = |w: &WorkerRow| {
            vec![
                ("worker", w.worker_id.to_string()),
                ("pid", w.pid.to_string()),
            ]
        };
        enc.counter(
            &format!("{p}worker_requests_total"),
            "Requests handled by each worker process.",
            self.workers.iter().map(|w| (labels(w), w.requests)),
        );
        enc.gauge(
            &format!("{p}worker_connections"),
            "Client connections open now in each worker process.",
            self.workers
                .iter()
                .map(|w| (labels(w), w.connections as i64)),
        );
        enc.counter(
            &format!("{p}worker_plugin_faults_total"),
            "Plugin traps and time or memory limit hits in each worker process.",
            self.workers.iter().map(|w| (labels(w), w.faults)),
        );
        enc.gauge(
            &format!("{p}worker_restarts"),
            "Times the master respawned this worker number.",
            self.workers.iter().map(|w| (labels(w), w.restarts as i64)),
        )
    }

    fn encode_contexts(&self, enc: &mut Page) {
        let p = &self.prefix;
        let labels = |c: &ContextSnapshot| {
            let (kind, id) = c.owner.split_once(':').unwrap_or(("", &c.owner));
            vec![
                ("plugin", c.plugin.clone()),
                ("owner_kind", kind.to_string()),
                ("owner_id", id.to_string()),
            ]
        };
        let per_context: [ContextCounter; 6] = [
            ("requests", "Requests through the plugin context.", |c| {
                c.requests
            }),
            (
                "local_replies",
                "Requests the plugin answered itself.",
                |c| c.local_replies,
            ),
            (
                "errors",
                "Requests failed because of the plugin (503).",
                |c| c.errors,
            ),
            ("traps", "Traps in the plugin's callbacks.", |c| c.traps),
            ("timeouts", "Callbacks stopped at callback_timeout.", |c| {
                c.timeouts
            }),
            ("memory_hits", "Instances stopped at memory_limit.", |c| {
                c.memory_hits
            }),
        ];
        for (name, help, value) in per_context {
            enc.counter(
                &format!("{p}wasm_plugin_{name}_total"),
                help,
                self.contexts.values().map(|c| (labels(c), value(c))),
            );
        }
        enc.histogram(
            &format!("{p}{PLUGIN_TIME}"),
            "Time spent in the plugin's callbacks per request, in seconds.",
            self.contexts.values().filter(|c| c.requests > 0).map(|c| {
                let buckets = c
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let last = i + 1 == c.latency.len();
                        (
                            if last {
                                f64::INFINITY
                            } else {
                                bucket_bound(i) / 1e6
                            },
                            n,
                        )
                    })
                    .collect();
                (labels(c), (c.time_ns as f64 / 1e9, buckets))
            }),
        )
    }

    /// Metrics plugins defined (`proxy_define_metric`), under their own sanitised names; one
    /// that collides with a gateway family or, once sanitised, with another is skipped.
    fn encode_plugin_metrics(&self, enc: &mut Page) {
        let mut seen = HashSet::new();
        for m in &self.plugin_metrics {
            let mut name = prometheus_name(&m.name);
            if m.kind == MetricKind::Counter {
                // A counter is exported with `_total` (added below): compared without it.
                if let Some(stem) = name.strip_suffix("_total") {
                    name = stem.to_string();
                }
            }
            let gateway_family = name
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|f| FAMILIES.contains(&f) || f == PLUGIN_TIME);
            if gateway_family || !seen.insert(name.clone()) {
                warn_skipped(&m.name, &name, gateway_family);
                continue;
            }
            let help = "Defined by a Proxy-Wasm plugin (proxy_define_metric).";
            match (&m.kind, &m.histogram) {
                (MetricKind::Counter, _) => enc.counter(
                    &format!("{name}_total"),
                    help,
                    [(Vec::new(), m.value.max(0) as u64)],
                ),
                (MetricKind::Gauge, _) => enc.gauge(&name, help, [(Vec::new(), m.value)]),
                (MetricKind::Histogram, Some(h)) => {
                    // The plugin segment keeps cumulative counts; the encoder wants per bucket.
                    let mut below = 0;
                    let mut buckets: Vec<(f64, u64)> = h
                        .buckets
                        .iter()
                        .map(|&(bound, cumulative)| {
                            let n = cumulative.saturating_sub(below);
                            below = cumulative;
                            (bound as f64, n)
                        })
                        .collect();
                    buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
                    enc.histogram(&name, help, [(Vec::new(), (h.sum as f64, buckets))])
                }
                (MetricKind::Histogram, None) => {}
            }
        }
    }
}

/// Serves the metrics page on the export listener until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    master: Arc<Master>,
    stop: crate::listeners::Stop,
) {
    crate::listeners::serve_http(listener, "prometheus", stop, move |req, _| {
        let answer = answer(&master, &req);
        async move { answer }
    })
    .await
}

fn answer<B>(m: &Master, req: &Request<B>) -> Response<Full<Bytes>> {
    let uri = m.config().config.plugin_attr.prometheus.export_uri.clone();
    let (status, body) = if req.uri().path() != uri {
        (
            StatusCode::NOT_FOUND,
            format!("not found: the metrics are at {uri}\n"),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string())
    } else {
        (StatusCode::OK, render(m))
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let ct = if status == StatusCode::OK {
        CONTENT_TYPE
    } else {
        "text/plain"
    };
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_shared::plugin_shm::PluginShm;

    fn page(plugin_metrics: Vec<MetricSnapshot>) -> String {
        let scrape = Scrape {
            prefix: "apisix_".into(),
            hostname: "h".into(),
            generation: 3,
            workers: Vec::new(),
            retired_requests: 0,
            retired_accepted: 0,
            routes: BTreeMap::new(),
            contexts: BTreeMap::new(),
            plugin_metrics,
            etcd_reachable: None,
            services: BTreeMap::new(),
            modify_indexes: Vec::new(),
        };
        scrape.page()
    }

    /// Plugin metrics keep their (sanitised) names; histograms turn from the plugin segment's
    /// cumulative counts into a valid Prometheus histogram; a name that collides once
    /// sanitised, or with a gateway family, is skipped.
    #[test]
    fn plugin_metrics_are_exported_under_their_names() {
        let shm = PluginShm::create(1 << 20).unwrap();
        let c = shm
            .define_metric(MetricKind::Counter, "requests total")
            .unwrap();
        let g = shm.define_metric(MetricKind::Gauge, "1temp").unwrap();
        let h = shm
            .define_metric(MetricKind::Histogram, "lat.ms:x")
            .unwrap();
        shm.define_metric(MetricKind::Counter, "requests.total")
            .unwrap();
        let clash = shm
            .define_metric(MetricKind::Gauge, "apisix_http_requests")
            .unwrap();
        shm.increment(c, 3).unwrap();
        shm.increment(g, -4).unwrap();
        shm.increment(clash, 99).unwrap();
        shm.record(h, 3).unwrap();
        shm.record(h, 700).unwrap();
        shm.record(h, 2_000_000_000).unwrap();
        let text = page(shm.metrics());
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("# HELP")).collect();
        assert!(lines.contains(&"# TYPE requests_total counter"), "{text}");
        assert!(lines.contains(&"requests_total 3"), "{text}");
        assert_eq!(text.matches("# TYPE requests_total").count(), 1, "{text}");
        assert!(lines.contains(&"_1temp -4"), "{text}");
        assert!(lines.contains(&"# TYPE lat_ms:x histogram"), "{text}");
        assert!(lines.contains(&"lat_ms:x_bucket{le=\"1\"} 0"), "{text}");
        assert!(lines.contains(&"lat_ms:x_bucket{le=\"5\"} 1"), "{text}");
        assert!(lines.contains(&"lat_ms:x_bucket{le=\"1000\"} 2"), "{text}");
        assert!(lines.contains(&"lat_ms:x_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(lines.contains(&"lat_ms:x_count 3"), "{text}");
        assert!(!text.contains(" 99"), "{text}");
    }
}
