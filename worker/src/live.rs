//! The worker's view of the configuration: the snapshot in shared memory, compiled into a
//! router, refreshed lazily when the published generation moves.
//!
//! The per-request cost when nothing changed is one atomic load and one `Arc` clone. When the
//! generation moved, the first to notice (a request, or the master's nudge) applies the new
//! snapshot: only routes whose revisions moved are compiled again, the router's index is kept
//! or patched, and upstreams whose revision did not change are carried over with their
//! balancer state.

use crate::router::{HostPattern, RouteEntry, Router};
use crate::upstream::UpstreamRuntime;
use crate::FastMap;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmgate_shared::model::vars::{Cidr, VarsExpr};
use wasmgate_shared::model::{
    GlobalRule, Kind, PluginConf, Plugins, Route, Service, Timeout, Upstream,
};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::snapshot::SnapshotRef;

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
    pub router: Arc<Router>,
    pub global_rules: Vec<GlobalRuleEntry>,
    upstreams: FastMap<Arc<str>, Arc<UpstreamRuntime>>,
    /// Every upstream object by id (plugins' `proxy_http_call` names them).
    by_upstream_id: FastMap<String, Arc<UpstreamRuntime>>,
    /// Every route object by id, as compiled, for the next generation to reuse.
    routes: FastMap<Arc<str>, Arc<CompiledRoute>>,
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
        match SnapshotRef::decode(&bytes) {
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

/// A snapshot's services, upstreams and global rules, parsed.
struct Objects {
    services: HashMap<String, (u64, Service)>,
    upstreams: HashMap<String, (u64, Upstream)>,
    globals: Vec<(String, u64, GlobalRule)>,
}

/// A route object as the snapshot holds it: id, revision, JSON text.
type RouteText<'a> = (&'a str, u64, &'a str);

/// The snapshot's objects: routes stay JSON text until they need compiling (most of a
/// change's routes were compiled by the previous generation already); the rest is parsed.
fn split(snap: SnapshotRef<'_>) -> (Vec<RouteText<'_>>, Objects) {
    let mut routes = Vec::new();
    let mut o = Objects {
        services: HashMap::new(),
        upstreams: HashMap::new(),
        globals: Vec::new(),
    };
    for obj in snap.objects {
        let (id, rev, json) = (obj.id, obj.revision, obj.json);
        match Kind::from(obj.kind) {
            Kind::Routes => routes.push((id, rev, json)),
            Kind::Services => {
                if let Some(s) = parse("service", id, json) {
                    o.services.insert(id.to_string(), (rev, s));
                }
            }
            Kind::Upstreams => {
                if let Some(u) = parse("upstream", id, json) {
                    o.upstreams.insert(id.to_string(), (rev, u));
                }
            }
            Kind::GlobalRules => o
                .globals
                .extend(parse("global rule", id, json).map(|g| (id.to_string(), rev, g))),
        }
    }
    (routes, o)
}

/// A route as one generation compiled it, kept for the next: a route whose own revision and
/// whose service's and upstream's revisions did not change is served by the same entry, its
/// JSON not parsed again. With 10,000 routes, compiling every route again cost a worker about
/// 100 ms per configuration change, paid by the request that noticed it.
#[derive(Debug)]
struct CompiledRoute {
    revision: u64,
    deps: Deps,
    /// None for a route that is disabled, unreadable or skipped (its service is missing).
    entry: Option<Arc<RouteEntry>>,
    /// The key its upstream runtime is kept under, so later generations carry it over.
    upstream_key: Option<Arc<str>>,
}

/// The service and upstream objects a route was compiled from, by id, with the revision each
/// had (None: it did not exist).
#[derive(Debug, Default)]
struct Deps {
    service: Option<(String, Option<u64>)>,
    upstream: Option<(String, Option<u64>)>,
}

impl Deps {
    fn unchanged(&self, o: &Objects) -> bool {
        fn same<T>(dep: &Option<(String, Option<u64>)>, now: &HashMap<String, (u64, T)>) -> bool {
            dep.as_ref()
                .is_none_or(|(id, rev)| now.get(id).map(|(r, _)| *r) == *rev)
        }
        same(&self.service, &o.services) && same(&self.upstream, &o.upstreams)
    }
}

/// Builds the router for a snapshot, reusing `prev`'s unchanged routes and upstreams.
fn compile(snap: SnapshotRef<'_>, prev: &Compiled) -> Compiled {
    let generation = snap.generation;
    let (route_objects, objects) = split(snap);
    let mut build = Build {
        objects: &objects,
        prev,
        upstreams: FastMap::default(),
    };
    let mut routes = FastMap::with_capacity_and_hasher(route_objects.len(), Default::default());
    // Entries that leave the index and entries that enter it.
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let (mut known, mut compiled) = (0, 0);
    for (id, rev, json) in route_objects {
        let (key, old) = match prev.routes.get_key_value(id) {
            // The previous generation's key, shared rather than copied.
            Some((k, c)) => (k.clone(), Some(c)),
            None => (Arc::from(id), None),
        };
        known += usize::from(old.is_some());
        let route = match old {
            Some(c) if c.revision == rev && c.deps.unchanged(&objects) => {
                build.carry_upstream(c);
                c.clone()
            }
            _ => {
                removed.extend(old.and_then(|c| c.entry.clone()));
                compiled += 1;
                let c = Arc::new(build.route(id, rev, json));
                added.extend(c.entry.clone());
                c
            }
        };
        routes.insert(key, route);
    }
    if known < prev.routes.len() {
        let gone = prev
            .routes
            .iter()
            .filter(|(id, _)| !routes.contains_key(*id));
        removed.extend(gone.filter_map(|(_, c)| c.entry.clone()));
    }
    let changes = removed.len() + added.len();
    let router = if changes == 0 {
        prev.router.clone()
    } else if changes <= routes.len() / 8 {
        // A few routes changed: patch a copy of the previous index.
        Arc::new(prev.router.patch(&removed, &added))
    } else {
        Arc::new(Router::new(
            routes.values().filter_map(|c| c.entry.as_ref()),
        ))
    };
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
            let key = format!("upstream:{uid}:{urev}").into();
            (uid.clone(), build.upstream(key, u, None))
        })
        .collect();
    tracing::debug!(
        "generation {generation}: {compiled} of {} routes compiled, {changes} index changes",
        routes.len(),
    );
    Compiled {
        generation,
        router,
        global_rules,
        upstreams: build.upstreams,
        by_upstream_id,
        routes,
    }
}

/// What compiling one generation reads and fills.
struct Build<'a> {
    objects: &'a Objects,
    prev: &'a Compiled,
    /// The upstream runtimes of the new generation by key.
    upstreams: FastMap<Arc<str>, Arc<UpstreamRuntime>>,
}

impl Build<'_> {
    /// Compiles route `id` from its JSON, noting what it read.
    fn route(&mut self, id: &str, rev: u64, json: &str) -> CompiledRoute {
        let mut c = CompiledRoute {
            revision: rev,
            deps: Deps::default(),
            entry: None,
            upstream_key: None,
        };
        if let Some(route) = parse::<Route>("route", id, json).filter(Route::enabled) {
            c.entry = self.route_entry(id, rev, &route, &mut c).map(Arc::new);
        }
        c
    }

    fn route_entry(
        &mut self,
        id: &str,
        rev: u64,
        route: &Route,
        c: &mut CompiledRoute,
    ) -> Option<RouteEntry> {
        let service = match &route.service_id {
            Some(sid) => {
                let found = self.objects.services.get(&sid.0);
                c.deps.service = Some((sid.0.clone(), found.map(|s| s.0)));
                match found {
                    Some(s) => Some((sid.0.as_str(), s)),
                    None => {
                        tracing::error!("route {id}: service {} not found; route skipped", sid.0);
                        return None;
                    }
                }
            }
            None => None,
        };
        let mut revision = rev.max(service.map(|(_, (r, _))| *r).unwrap_or(0));
        let upstream = self
            .resolve_upstream(id, rev, route, service, &mut revision, c)
            .map(|(key, rt)| {
                c.upstream_key = Some(key);
                rt
            });
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
            paths: route.paths().iter().map(|p| p.to_string()).collect(),
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

    /// Where a route's requests go: its `upstream_id`, its inline `upstream`, else its
    /// service's. Returns the runtime's key with it.
    fn resolve_upstream(
        &mut self,
        id: &str,
        rev: u64,
        route: &Route,
        service: Option<(&str, &(u64, Service))>,
        revision: &mut u64,
        c: &mut CompiledRoute,
    ) -> Option<(Arc<str>, Arc<UpstreamRuntime>)> {
        let timeout = route.timeout.as_ref();
        // A route's own timeout makes its upstream runtime its own.
        let owner = |k: String| match timeout {
            Some(_) => format!("{k}|route:{id}:{rev}"),
            None => k,
        };
        let objects = self.objects;
        let mut by_id = |uid: &str| {
            let found = objects.upstreams.get(uid);
            c.deps.upstream = Some((uid.to_string(), found.map(|u| u.0)));
            let (urev, u) = found?;
            *revision = (*revision).max(*urev);
            Some((owner(format!("upstream:{uid}:{urev}")), u))
        };
        let (key, u): (String, &Upstream) = if let Some(uid) = &route.upstream_id {
            by_id(&uid.0)?
        } else if let Some(u) = &route.upstream {
            (format!("route:{id}:{rev}"), u)
        } else if let Some((sid, (srev, s))) = service {
            if let Some(uid) = &s.upstream_id {
                by_id(&uid.0)?
            } else {
                (owner(format!("service:{sid}:{srev}")), s.upstream.as_ref()?)
            }
        } else {
            return None;
        };
        let key: Arc<str> = key.into();
        let rt = self.upstream(key.clone(), u, timeout);
        Some((key, rt))
    }

    /// The runtime for upstream `key`: this generation's, else the previous one's (keeping its
    /// balancer state and idle connections), else a new one.
    fn upstream(
        &mut self,
        key: Arc<str>,
        u: &Upstream,
        timeout: Option<&Timeout>,
    ) -> Arc<UpstreamRuntime> {
        if let Some(rt) = self.upstreams.get(&key) {
            return rt.clone();
        }
        let rt = self
            .prev
            .upstreams
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Arc::new(UpstreamRuntime::new(u, timeout)));
        self.upstreams.insert(key, rt.clone());
        rt
    }

    /// Keeps the runtime of a route carried over from the previous generation.
    fn carry_upstream(&mut self, c: &CompiledRoute) {
        let upstream = c.entry.as_ref().and_then(|e| e.upstream.as_ref());
        if let (Some(key), Some(rt)) = (&c.upstream_key, upstream) {
            self.upstreams
                .entry(key.clone())
                .or_insert_with(|| rt.clone());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_shared::snapshot::{KindTag, Snapshot, SnapshotObject};

    fn obj(kind: KindTag, id: &str, revision: u64, json: &str) -> SnapshotObject {
        SnapshotObject::new(kind, id, revision, json)
    }

    /// Publishes `objects` as generation `generation` and returns what the worker serves.
    fn serve(
        seg: &Segment,
        live: &Live,
        generation: u64,
        objects: &[SnapshotObject],
    ) -> Arc<Compiled> {
        let snap = Snapshot {
            generation,
            objects: objects.to_vec(),
        };
        seg.publish(generation, &snap.encode()).unwrap();
        let cur = live.current();
        assert_eq!(cur.generation, generation);
        cur
    }

    fn entry<'a>(c: &'a Compiled, id: &str) -> &'a Arc<RouteEntry> {
        c.routes[id].entry.as_ref().expect("route is served")
    }

    const NODES: &str = r#"{"nodes":{"127.0.0.1:1980":1},"type":"roundrobin"}"#;

    /// Only the routes whose object, service or upstream changed are compiled again; the
    /// others keep their entry (and so their statistics record and PluginContexts' key).
    #[test]
    fn unchanged_routes_are_reused() {
        let seg = Arc::new(Segment::create(1 << 20).unwrap());
        let live = Live::new(seg.clone(), 0);
        let inline = format!(r#"{{"uri":"/a","upstream":{NODES}}}"#);
        let mut objects = vec![
            obj(KindTag::Route, "a", 1, &inline),
            obj(
                KindTag::Route,
                "b",
                2,
                r#"{"uri":"/b/*","upstream_id":"u1"}"#,
            ),
            obj(KindTag::Route, "c", 3, r#"{"uri":"/c","service_id":"s1"}"#),
            obj(KindTag::Route, "d", 4, r#"{"uri":"/d","service_id":"s2"}"#),
            obj(KindTag::Upstream, "u1", 5, NODES),
            obj(KindTag::Service, "s1", 6, r#"{"upstream_id":"u1"}"#),
        ];
        // Enough other routes that a change of one or two patches the index (the last step)
        // and a larger one rebuilds it (the third).
        for i in 0..30 {
            let json = format!(r#"{{"uri":"/other/{i}","upstream_id":"u0"}}"#);
            objects.push(obj(KindTag::Route, &format!("o{i}"), 1, &json));
        }
        objects.push(obj(KindTag::Upstream, "u0", 1, NODES));
        let g1 = serve(&seg, &live, 1, &objects);
        assert_eq!(g1.router.len(), 33, "d waits for its service");
        assert_eq!(entry(&g1, "c").revision, 6);

        // An unrelated object changes: every route and the index itself are reused.
        objects.push(obj(KindTag::GlobalRule, "g", 7, r#"{"plugins":{}}"#));
        let g2 = serve(&seg, &live, 2, &objects);
        assert!(Arc::ptr_eq(&g1.router, &g2.router));
        for id in ["a", "b", "c"] {
            assert!(Arc::ptr_eq(entry(&g1, id), entry(&g2, id)), "{id}");
        }

        // The upstream changes: b and c (through s1) are compiled again, a is not; d appears
        // with its service.
        objects[4] = obj(KindTag::Upstream, "u1", 8, NODES);
        objects.push(obj(
            KindTag::Service,
            "s2",
            9,
            &format!(r#"{{"upstream":{NODES}}}"#),
        ));
        let g3 = serve(&seg, &live, 3, &objects);
        assert!(Arc::ptr_eq(entry(&g2, "a"), entry(&g3, "a")));
        assert!(Arc::ptr_eq(
            g2.upstreams.get("route:a:1").unwrap(),
            entry(&g3, "a").upstream.as_ref().unwrap()
        ));
        assert_eq!(entry(&g3, "b").revision, 8);
        assert_eq!(entry(&g3, "c").revision, 8);
        assert_eq!(&*entry(&g3, "d").owner, "route:d:9");
        assert!(Arc::ptr_eq(
            entry(&g3, "b").upstream.as_ref().unwrap(),
            g3.upstream("u1").unwrap()
        ));
        let get = |c: &Compiled, path: &str| {
            let none = |_: &str| None;
            let req = crate::router::RequestView {
                method: &http::Method::GET,
                host: "x",
                path,
                remote: "127.0.0.1".parse().unwrap(),
                vars: &none,
            };
            c.router.find(&req).map(|r| r.id.clone())
        };
        assert_eq!(get(&g3, "/b/x").as_deref(), Some("b"));
        assert_eq!(get(&g3, "/d").as_deref(), Some("d"));

        // A route is edited and another deleted: the index follows.
        objects[0] = obj(KindTag::Route, "a", 10, &inline.replace("/a", "/a2"));
        objects.remove(1);
        let g4 = serve(&seg, &live, 4, &objects);
        assert_eq!(get(&g4, "/a"), None);
        assert_eq!(get(&g4, "/a2").as_deref(), Some("a"));
        assert_eq!(get(&g4, "/b/x"), None);
        assert_eq!(get(&g4, "/other/7").as_deref(), Some("o7"));
        assert_eq!(g4.router.len(), 33);
        assert!(Arc::ptr_eq(entry(&g3, "c"), entry(&g4, "c")));
    }
}
