//! The worker's view of the configuration: the snapshot in shared memory, compiled into a
//! router, refreshed lazily when the published generation moves.
//!
//! The per-request cost when nothing changed is one atomic load and one `Arc` clone. When the
//! generation moved, the request that notices rebuilds the router from the new snapshot; the
//! upstreams whose revision did not change are carried over with their balancer state.

use crate::router::{HostPattern, RouteEntry, Router};
use crate::upstream::UpstreamRuntime;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmgate_shared::model::vars::{Cidr, VarsExpr};
use wasmgate_shared::model::{
    GlobalRule, Kind, PluginConf, Plugins, Route, Service, Timeout, Upstream,
};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::snapshot::Snapshot;

/// A global rule compiled for serving.
#[derive(Debug)]
pub struct GlobalRuleEntry {
    pub id: String,
    pub revision: u64,
    pub plugins: Vec<PluginConf>,
    /// `global_rule:<id>:<revision>`: the key of its PluginContexts.
    pub owner: Arc<str>,
}

/// Everything a request needs from one generation of the configuration.
#[derive(Debug, Default)]
pub struct Compiled {
    pub generation: u64,
    pub router: Router,
    pub global_rules: Vec<GlobalRuleEntry>,
    upstreams: HashMap<String, Arc<UpstreamRuntime>>,
    /// Every upstream object by id (plugins' `proxy_http_call` names them).
    by_upstream_id: HashMap<String, Arc<UpstreamRuntime>>,
}

impl Compiled {
    /// The upstream object `id`, if the configuration has one.
    pub fn upstream(&self, id: &str) -> Option<&Arc<UpstreamRuntime>> {
        self.by_upstream_id.get(id)
    }
}

/// The shared-memory snapshot and its compiled form.
pub struct Live {
    segment: Arc<Segment>,
    slot: usize,
    current: Mutex<Arc<Compiled>>,
    /// A generation that failed to decode, so it is not retried on every request.
    failed: AtomicU64,
}

impl Live {
    pub fn new(segment: Arc<Segment>, slot: usize) -> Live {
        let live = Live {
            segment,
            slot,
            // No generation is u64::MAX, so the first call always loads the snapshot.
            current: Mutex::new(Arc::new(Compiled {
                generation: u64::MAX,
                ..Compiled::default()
            })),
            failed: AtomicU64::new(u64::MAX),
        };
        live.current();
        live
    }

    /// The configuration to serve this request with, rebuilt first if a newer one was published.
    pub fn current(&self) -> Arc<Compiled> {
        let published = self.segment.generation();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.generation == published || self.failed.load(Ordering::Relaxed) == published {
            return cur.clone();
        }
        let (generation, bytes) = self.segment.read();
        match Snapshot::decode(&bytes) {
            Ok(snap) => {
                let started = std::time::Instant::now();
                *cur = Arc::new(compile(snap, &cur));
                tracing::debug!(
                    "generation {generation} applied in {:?} ({} routes)",
                    started.elapsed(),
                    cur.router.len()
                );
                self.segment
                    .slot(self.slot)
                    .generation_seen
                    .store(generation, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(
                    "generation {generation}: {e}; still serving generation {}",
                    cur.generation
                );
                self.failed.store(generation, Ordering::Relaxed);
            }
        }
        cur.clone()
    }
}

fn parse<T: DeserializeOwned>(kind: &str, id: &str, json: &str) -> Option<T> {
    serde_json::from_str(json)
        .map_err(|e| tracing::error!("{kind} {id}: unreadable in snapshot: {e}"))
        .ok()
}

struct Objects {
    routes: Vec<(String, u64, Route)>,
    services: HashMap<String, (u64, Service)>,
    upstreams: HashMap<String, (u64, Upstream)>,
    globals: Vec<(String, u64, GlobalRule)>,
}

fn split(snap: Snapshot) -> Objects {
    let mut o = Objects {
        routes: Vec::new(),
        services: HashMap::new(),
        upstreams: HashMap::new(),
        globals: Vec::new(),
    };
    for obj in snap.objects {
        let (id, rev, json) = (obj.id, obj.revision, obj.json);
        match Kind::from(obj.kind) {
            Kind::Routes => o
                .routes
                .extend(parse("route", &id, &json).map(|r| (id, rev, r))),
            Kind::Services => {
                if let Some(s) = parse("service", &id, &json) {
                    o.services.insert(id, (rev, s));
                }
            }
            Kind::Upstreams => {
                if let Some(u) = parse("upstream", &id, &json) {
                    o.upstreams.insert(id, (rev, u));
                }
            }
            Kind::GlobalRules => o
                .globals
                .extend(parse("global rule", &id, &json).map(|g| (id, rev, g))),
        }
    }
    o
}

/// Builds the router for a snapshot, reusing `prev`'s unchanged upstreams.
fn compile(snap: Snapshot, prev: &Compiled) -> Compiled {
    let generation = snap.generation;
    let objects = split(snap);
    let mut upstreams = HashMap::new();
    let mut entries = Vec::new();
    let mut paths = HashMap::new();
    for (id, rev, route) in &objects.routes {
        if !route.enabled() {
            continue;
        }
        match compile_route(id, *rev, route, &objects, prev, &mut upstreams) {
            Some(entry) => {
                paths.insert(
                    id.clone(),
                    route
                        .paths()
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                );
                entries.push(Arc::new(entry));
            }
            None => continue,
        }
    }
    let router = Router::new(entries, |r| paths.get(&r.id).cloned().unwrap_or_default());
    let mut global_rules: Vec<GlobalRuleEntry> = objects
        .globals
        .iter()
        .map(|(id, rev, g)| GlobalRuleEntry {
            owner: format!("global_rule:{id}:{rev}").into(),
            id: id.clone(),
            revision: *rev,
            plugins: plugin_list(Some(&g.plugins), None),
        })
        .collect();
    global_rules.sort_by(|a, b| a.id.cmp(&b.id));
    let by_upstream_id = objects
        .upstreams
        .iter()
        .map(|(uid, (urev, u))| {
            let key = format!("upstream:{uid}:{urev}");
            (
                uid.clone(),
                get_upstream(key, u, None, prev, &mut upstreams),
            )
        })
        .collect();
    Compiled {
        generation,
        router,
        global_rules,
        upstreams,
        by_upstream_id,
    }
}

fn compile_route(
    id: &str,
    rev: u64,
    route: &Route,
    objects: &Objects,
    prev: &Compiled,
    upstreams: &mut HashMap<String, Arc<UpstreamRuntime>>,
) -> Option<RouteEntry> {
    let service = match &route.service_id {
        Some(sid) => match objects.services.get(&sid.0) {
            Some(s) => Some((sid.0.as_str(), s)),
            None => {
                tracing::error!("route {id}: service {} not found; route skipped", sid.0);
                return None;
            }
        },
        None => None,
    };
    let mut revision = rev.max(service.map(|(_, (r, _))| *r).unwrap_or(0));
    let upstream = resolve_upstream(
        id,
        rev,
        route,
        service,
        objects,
        prev,
        upstreams,
        &mut revision,
    );
    let hosts: Vec<HostPattern> = if route.host.is_some() || route.hosts.is_some() {
        route
            .host_patterns()
            .into_iter()
            .map(HostPattern::parse)
            .collect()
    } else {
        service
            .and_then(|(_, (_, s))| s.hosts.as_ref())
            .map(|h| h.iter().map(|h| HostPattern::parse(h)).collect())
            .unwrap_or_default()
    };
    Some(RouteEntry {
        owner: format!("route:{id}:{revision}").into(),
        id: id.to_string(),
        name: route.name.clone(),
        revision,
        priority: route.priority.unwrap_or(0),
        methods: route
            .methods
            .iter()
            .flatten()
            .filter_map(|m| m.parse().ok())
            .collect(),
        hosts,
        remote_addrs: route
            .remote_patterns()
            .into_iter()
            .filter_map(Cidr::parse)
            .collect(),
        vars: route.vars.as_ref().and_then(|v| VarsExpr::compile(v).ok()),
        plugins: plugin_list(
            route.plugins.as_ref(),
            service.and_then(|(_, (_, s))| s.plugins.as_ref()),
        ),
        upstream,
        traffic_record: Default::default(),
    })
}

/// Where a route's requests go: its `upstream_id`, its inline `upstream`, else its service's.
#[allow(clippy::too_many_arguments)]
fn resolve_upstream(
    id: &str,
    rev: u64,
    route: &Route,
    service: Option<(&str, &(u64, Service))>,
    objects: &Objects,
    prev: &Compiled,
    upstreams: &mut HashMap<String, Arc<UpstreamRuntime>>,
    revision: &mut u64,
) -> Option<Arc<UpstreamRuntime>> {
    let timeout = route.timeout.as_ref();
    // A route's own timeout makes its upstream runtime its own.
    let owner = |k: String| match timeout {
        Some(_) => format!("{k}|route:{id}:{rev}"),
        None => k,
    };
    let by_id = |uid: &str, revision: &mut u64| {
        let (urev, u) = objects.upstreams.get(uid)?;
        *revision = (*revision).max(*urev);
        Some((owner(format!("upstream:{uid}:{urev}")), u))
    };
    let (key, u): (String, &Upstream) = if let Some(uid) = &route.upstream_id {
        by_id(&uid.0, revision)?
    } else if let Some(u) = &route.upstream {
        (format!("route:{id}:{rev}"), u)
    } else if let Some((sid, (srev, s))) = service {
        if let Some(uid) = &s.upstream_id {
            by_id(&uid.0, revision)?
        } else {
            (owner(format!("service:{sid}:{srev}")), s.upstream.as_ref()?)
        }
    } else {
        return None;
    };
    Some(get_upstream(key, u, timeout, prev, upstreams))
}

fn get_upstream(
    key: String,
    u: &Upstream,
    timeout: Option<&Timeout>,
    prev: &Compiled,
    upstreams: &mut HashMap<String, Arc<UpstreamRuntime>>,
) -> Arc<UpstreamRuntime> {
    if let Some(rt) = upstreams.get(&key) {
        return rt.clone();
    }
    let rt = prev
        .upstreams
        .get(&key)
        .cloned()
        .unwrap_or_else(|| Arc::new(UpstreamRuntime::new(u, timeout)));
    upstreams.insert(key, rt.clone());
    rt
}

/// The plugins of a route over those of its service (the route's configuration wins), sorted
/// by name; the wasm host orders them by phase and priority.
fn plugin_list(own: Option<&Plugins>, inherited: Option<&Plugins>) -> Vec<PluginConf> {
    let mut merged: Plugins = inherited.cloned().unwrap_or_default();
    if let Some(own) = own {
        merged.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    merged
        .iter()
        .map(|(name, attrs)| PluginConf::from_attrs(name, attrs))
        .collect()
}
