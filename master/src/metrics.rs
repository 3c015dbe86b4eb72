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

use crate::prom_text::{Kind as Family, Labels, Page};
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

/// The plugins' time histogram, after the prefix.
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
    /// Each served SSL object's certificate expiry (notAfter, Unix seconds), by id.
    certificates: Vec<(String, i64)>,
    /// Each checked node: its upstream's key, address, port and 1 when healthy.
    upstream_status: Vec<(String, String, u16, bool)>,
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
            let service = match store.get(Kind::Routes, id)?.value.get("service_id")? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((id.clone(), service))
        })
        .collect();
    scrape.modify_indexes = modify_indexes(&store);
    let ssls = ssl_revisions(&store);
    drop(store);
    scrape.certificates = certificates(ssls);
    scrape.upstream_status = (m.health.nodes().into_iter())
        .map(|(l, state)| {
            (
                format!("/apisix/{}", l.owner),
                l.host,
                l.port,
                state.healthy,
            )
        })
        .collect();
    scrape.page()
}

/// The served SSL objects: id, revision, and their certificates (PEM) when the revision is not
/// one [`certificates`] has read already (copied under the store's lock, parsed after it).
type SslRevision = (String, u64, Option<Vec<String>>);

fn ssl_revisions(store: &crate::store::Store) -> Vec<SslRevision> {
    let known = EXPIRY.lock().unwrap_or_else(|p| p.into_inner());
    let served = store.list(Kind::Ssls).into_iter();
    served
        .filter(|(_, s)| s.value.get("status").and_then(|v| v.as_u64()) != Some(0))
        .map(|(id, s)| {
            let fresh = known
                .get(id)
                .is_some_and(|(rev, _)| *rev == s.modified_index);
            let certs = (!fresh).then(|| {
                let more = s.value.get("certs").and_then(serde_json::Value::as_array);
                let all = std::iter::once(s.value.get("cert"))
                    .chain(more.into_iter().flatten().map(Some));
                all.flatten()
                    .filter_map(serde_json::Value::as_str)
                    .map(str::to_string)
                    .collect()
            });
            (id.to_string(), s.modified_index, certs)
        })
        .collect()
}

/// Each served SSL object's expiry by id, with the revision it was read at: read again only
/// when the object changed.
static EXPIRY: std::sync::Mutex<BTreeMap<String, (u64, Option<i64>)>> =
    std::sync::Mutex::new(BTreeMap::new());

/// When each served SSL object's certificates expire: the earliest notAfter of `cert` and
/// `certs` (a client may be shown any of them), read from the certificates themselves, so
/// that an object APISIX wrote into a shared etcd, or one whose dates were written by hand,
/// counts as what clients are shown.
fn certificates(ssls: Vec<SslRevision>) -> Vec<(String, i64)> {
    let mut known = EXPIRY.lock().unwrap_or_else(|p| p.into_inner());
    let mut now = BTreeMap::new();
    for (id, rev, certs) in ssls {
        let end = match certs {
            None => known.get(&id).and_then(|(_, end)| *end),
            Some(pems) => (pems.iter())
                .filter_map(|p| wasmgate_shared::tls::validity(p).ok())
                .map(|(_, end)| end)
                .min(),
        };
        now.insert(id, (rev, end));
    }
    *known = now;
    (known.iter())
        .filter_map(|(id, (_, end))| Some((id.clone(), (*end)?)))
        .collect()
}

/// The last change of each kind of object (the largest `modifiedIndex` among those stored),
/// their maximum and the store's revision, under APISIX's keys (which have no plugin configs).
fn modify_indexes(store: &crate::store::Store) -> Vec<(String, u64)> {
    let listed = |k: &Kind| *k != Kind::PluginConfigs;
    let mut last: BTreeMap<&'static str, u64> = (Kind::ALL.iter())
        .filter(|k| listed(k))
        .map(|k| (k.as_str(), 0))
        .collect();
    for (kind, _, stored) in store.iter().filter(|(k, _, _)| listed(k)) {
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
            certificates: Vec::new(),
            upstream_status: Vec::new(),
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
        enc.gauge(
            &format!("{p}ssl_certificate_not_after_seconds"),
            "When each served SSL object's certificates expire (the earliest notAfter of cert and certs), Unix seconds: alert on it minus time().",
            (self.certificates.iter()).map(|(id, end)| (vec![("id", id.clone())], *end)),
        );
        enc.gauge(
            &format!("{p}upstream_status"),
            "Health of each node of the upstreams with health checks: 1 healthy, 0 unhealthy.",
            (self.upstream_status.iter()).map(|(name, ip, port, healthy)| {
                let labels = vec![
                    ("name", name.clone()),
                    ("ip", ip.clone()),
                    ("port", port.to_string()),
                ];
                (labels, i64::from(*healthy))
            }),
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
        // By worker number alone: a restart brings a new pid, and the count must stay one
        // series for an alert on its increase. During a reload a number has two processes,
        // the draining one and its successor: the larger count is said.
        let mut restarts: BTreeMap<u32, u32> = BTreeMap::new();
        for w in &self.workers {
            let n = restarts.entry(w.worker_id).or_default();
            *n = (*n).max(w.restarts);
        }
        enc.gauge(
            &format!("{p}worker_restarts"),
            "Times the master respawned this worker number in the current reload epoch.",
            restarts
                .into_iter()
                .map(|(id, n)| (vec![("worker", id.to_string())], i64::from(n))),
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

    /// Metrics plugins defined (`proxy_define_metric`), under their own sanitised names (a
    /// counter's ends in `_total`); one whose names a gateway family or another plugin metric
    /// already claims (`prom_text::claims`: a histogram's `_bucket`, a counter's name without
    /// `_total`, …) is skipped, with a warning.
    fn encode_plugin_metrics(&self, enc: &mut Page) {
        // Written after every gateway family: what is taken now is the gateway's.
        let gateway = enc.claims_only();
        for m in &self.plugin_metrics {
            let mut name = prometheus_name(&m.name);
            let kind = match m.kind {
                MetricKind::Counter => {
                    name = format!("{}_total", name.strip_suffix("_total").unwrap_or(&name));
                    Family::Counter
                }
                MetricKind::Gauge => Family::Gauge,
                MetricKind::Histogram => Family::Histogram,
            };
            if !enc.is_free(&name, kind) {
                warn_skipped(&m.name, &name, !gateway.is_free(&name, kind));
                continue;
            }
            let help = "Defined by a Proxy-Wasm plugin (proxy_define_metric).";
            match (&m.kind, &m.histogram) {
                (MetricKind::Counter, _) => {
                    enc.counter(&name, help, [(Vec::new(), m.value.max(0) as u64)])
                }
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
        let master = master.clone();
        async move { answer(master, &req).await }
    })
    .await
}

async fn answer<B>(m: Arc<Master>, req: &Request<B>) -> Response<Full<Bytes>> {
    let uri = m.config().config.plugin_attr.prometheus.export_uri.clone();
    let (status, body) = if req.uri().path() != uri {
        (
            StatusCode::NOT_FOUND,
            format!("not found: the metrics are at {uri}\n"),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string())
    } else {
        // Off the master's thread: a page of thousands of routes takes tens of milliseconds,
        // which the Admin API and the supervision would otherwise wait out.
        match tokio::task::spawn_blocking(move || render(&m)).await {
            Ok(page) => (StatusCode::OK, page),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the metrics page failed: {e}\n"),
            ),
        }
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
            certificates: Vec::new(),
            upstream_status: Vec::new(),
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

    /// Names that would make a second family out of a sample name — a gateway counter's name
    /// with `_total`, a histogram's `_bucket` or `_count`, a counter's name beside a gauge —
    /// are skipped whoever wrote the first: one family per name, as scrapers require.
    #[test]
    fn plugin_metrics_never_share_a_name_with_another_family() {
        let shm = PluginShm::create(1 << 20).unwrap();
        for (kind, name) in [
            (MetricKind::Gauge, "apisix_http_requests_total"),
            (MetricKind::Gauge, "apisix_worker_requests_total"),
            (MetricKind::Gauge, "apisix_http_latency_bucket"),
            (MetricKind::Gauge, "apisix_http_status_total"),
            (MetricKind::Gauge, "apisix_etcd_reachable"),
            (MetricKind::Counter, "foo"),
            (MetricKind::Gauge, "foo_total"),
            (MetricKind::Histogram, "bar"),
            (MetricKind::Gauge, "bar_count"),
        ] {
            let id = shm.define_metric(kind, name).unwrap();
            if kind != MetricKind::Histogram {
                shm.increment(id, 7).unwrap();
            }
        }
        let text = page(shm.metrics());
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        for skipped in [
            "apisix_http_requests_total gauge",
            "apisix_worker_requests_total gauge",
            "apisix_http_latency_bucket gauge",
            "apisix_http_status_total gauge",
            "apisix_etcd_reachable gauge",
            "foo_total gauge",
            "bar_count gauge",
        ] {
            assert!(!families.contains(&skipped), "{skipped}: {text}");
        }
        assert!(families.contains(&"foo_total counter"), "{text}");
        assert!(families.contains(&"bar histogram"), "{text}");
        let mut names: Vec<&str> = families
            .iter()
            .map(|f| f.split(' ').next().unwrap())
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "{text}");
    }
}
