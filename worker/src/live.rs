//! The worker's view of the configuration: the journal in shared memory, compiled into a
//! router, brought up to date lazily when the published generation moves.
//!
//! The per-request cost when nothing changed is one atomic load and one `Arc` clone. When the
//! generation moved, the first to notice (a request, or the master's nudge) reads the journal
//! from where it stopped last: usually one delta naming the objects that changed. Only those
//! routes, and the routes whose service or upstream changed, are compiled again; the router's
//! index is patched; upstream runtimes whose key did not change keep their balancer state and
//! idle connections. A whole snapshot (at start, or when the master starts a new journal) is
//! compared with what was compiled and applied the same way, as the changes it amounts to.

use crate::router::{HostPattern, RouteEntry, Router};
use crate::server::tls::{Certs, Site};
use crate::traffic::RecordCell;
use crate::upstream::UpstreamRuntime;
use crate::FastMap;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmgate_shared::model::vars::{Cidr, VarsExpr};
use wasmgate_shared::model::{
    GlobalRule, Kind, PluginConf, PluginConfig, Plugins, Route, Service, Ssl, Timeout, Upstream,
};
use wasmgate_shared::shm::{Journal, Position, Segment};
use wasmgate_shared::snapshot::{Change, Delta, KindTag, SnapshotRef};

/// A global rule compiled for serving.
#[derive(Debug)]
pub struct GlobalRuleEntry {
    pub id: String,
    pub revision: u64,
    pub plugins: Vec<PluginConf>,
    /// `plugins` resolved against the worker's, on the rule's first request.
    pub resolved: crate::plugins::Resolved,
    /// `global_rule:<id>:<revision>`: the key of its PluginContexts.
    pub owner: Arc<str>,
}

/// Everything a request needs from one generation of the configuration.
#[derive(Debug, Default)]
pub struct Compiled {
    pub generation: u64,
    pub router: Arc<Router>,
    pub global_rules: Arc<[GlobalRuleEntry]>,
    /// Every upstream object by id (plugins' `proxy_http_call` names them).
    by_upstream_id: Arc<FastMap<String, Arc<UpstreamRuntime>>>,
    /// The TLS listener's certificates by name (the SSL objects).
    pub certs: Arc<Certs>,
}

impl Compiled {
    /// The upstream object `id`, if the configuration has one.
    pub fn upstream(&self, id: &str) -> Option<&Arc<UpstreamRuntime>> {
        self.by_upstream_id.get(id)
    }
}

/// The shared-memory journal and its compiled form.
pub struct Live {
    segment: Arc<Segment>,
    slot: usize,
    state: Mutex<State>,
    /// A generation that failed to decode, so it is not retried on every request.
    failed: AtomicU64,
}

/// What the worker serves, and what it keeps to apply the next change.
struct State {
    current: Arc<Compiled>,
    table: Table,
    /// How far the journal was read and applied; None: read it whole next time.
    read: Option<Position>,
}

impl Live {
    pub fn new(segment: Arc<Segment>, slot: usize) -> Live {
        let live = Live {
            segment,
            slot,
            state: Mutex::new(State {
                // No generation is u64::MAX, so the first call always reads the journal.
                current: Arc::new(Compiled {
                    generation: u64::MAX,
                    ..Compiled::default()
                }),
                table: Table::default(),
                read: None,
            }),
            failed: AtomicU64::new(u64::MAX),
        };
        live.current();
        live
    }

    /// The configuration to serve this request with, brought up to date first if a newer one
    /// was published.
    pub fn current(&self) -> Arc<Compiled> {
        let published = self.segment.generation();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.current.generation == published || self.failed.load(Ordering::Relaxed) == published {
            return st.current.clone();
        }
        let journal = self.segment.read_since(st.read);
        let started = std::time::Instant::now();
        match st.apply(&journal) {
            Ok(stats) => {
                tracing::debug!(
                    "generation {} applied in {:?} ({} routes, {stats})",
                    journal.generation,
                    started.elapsed(),
                    st.current.router.len()
                );
                self.segment
                    .slot(self.slot)
                    .generation_seen
                    .store(journal.generation, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(
                    "generation {}: {e}; still serving generation {}",
                    journal.generation,
                    st.current.generation
                );
                self.failed.store(journal.generation, Ordering::Relaxed);
                // Whatever comes next is read whole, not after a record that failed.
                st.read = None;
            }
        }
        st.current.clone()
    }

    /// Whether the configuration holds `object` (`route:<id>`, `global_rule:<id>`), a disabled
    /// route included: its plugin contexts' statistics are kept while it does.
    pub fn has_object(&self, object: &str) -> bool {
        let st = crate::lock(&self.state);
        match Kind::of_object(object) {
            Some((Kind::Routes, id)) => st.table.routes.contains_key(id),
            Some((Kind::GlobalRules, id)) => st.table.objects.globals.contains_key(id),
            _ => false,
        }
    }
}

impl State {
    /// Applies the records of `journal`; on error nothing changed.
    fn apply(&mut self, journal: &Journal) -> Result<Applied, String> {
        let mut records = journal.records().map(|r| r.map_err(|e| e.to_string()));
        // A whole journal starts with a snapshot: what it changes is its difference with
        // what was compiled (everything, at start).
        let snapshot = match journal.whole {
            true => Some(match records.next().transpose()? {
                Some(bytes) => SnapshotRef::decode(bytes)?,
                None => SnapshotRef {
                    generation: journal.generation,
                    objects: Vec::new(),
                },
            }),
            false => None,
        };
        let deltas = records
            .map(|r| r.and_then(Delta::decode))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut changes, gone) = match snapshot {
            Some(snap) => self.table.difference(snap),
            None => Default::default(),
        };
        changes.extend(gone.iter().map(|(kind, id)| Change {
            kind: *kind,
            id,
            revision: 0,
            json: None,
        }));
        changes.extend(deltas.into_iter().flat_map(|d| d.changes));
        let applied = self.table.apply(changes);
        self.current = Arc::new(self.table.compiled(journal.generation));
        self.read = Some(journal.position);
        Ok(applied)
    }
}

fn parse<T: DeserializeOwned>(kind: &str, id: &str, json: &str) -> Option<T> {
    serde_json::from_str(json)
        .map_err(|e| tracing::error!("{kind} {id}: unreadable in snapshot: {e}"))
        .ok()
}

/// The services, upstreams, plugin configs and global rules of the configuration, parsed,
/// with their revisions.
#[derive(Default)]
struct Objects {
    services: HashMap<String, (u64, Service)>,
    upstreams: HashMap<String, (u64, Upstream)>,
    plugin_configs: HashMap<String, (u64, PluginConfig)>,
    globals: BTreeMap<String, (u64, GlobalRule)>,
    ssls: BTreeMap<String, SslEntry>,
}

/// An SSL object: its revision, the names it serves, and its compiled settings (None:
/// disabled, or unusable — said in the error log).
type SslEntry = (u64, Vec<String>, Option<Arc<Site>>);

/// A route as compiled, kept for the next generation: a route whose own revision and whose
/// service's and upstream's revisions did not change is served by the same entry, its JSON
/// not parsed again. With 10,000 routes, compiling every route again cost a worker about
/// 100 ms per configuration change, paid by the request that noticed it.
#[derive(Debug)]
struct CompiledRoute {
    revision: u64,
    /// The route's JSON text, to compile it again when its service or upstream changes.
    json: Box<str>,
    deps: Deps,
    /// None for a route that is disabled, unreadable or skipped (its service is missing).
    entry: Option<Arc<RouteEntry>>,
    /// The key its upstream runtime is kept under in [`Table::upstreams`].
    upstream_key: Option<Arc<str>>,
    /// Its traffic record, kept from revision to revision, a disabled one's included (so that
    /// disabling and enabling a route does not start its counters again).
    record: RecordCell,
}

/// The service, upstream and plugin config objects a route was compiled from, by id, with
/// the revision each had (None: it did not exist).
#[derive(Debug, Default)]
struct Deps {
    service: Option<(String, Option<u64>)>,
    upstream: Option<(String, Option<u64>)>,
    plugin_config: Option<(String, Option<u64>)>,
}

impl Deps {
    fn unchanged(&self, o: &Objects) -> bool {
        fn same<T>(dep: &Option<(String, Option<u64>)>, now: &HashMap<String, (u64, T)>) -> bool {
            dep.as_ref()
                .is_none_or(|(id, rev)| now.get(id).map(|(r, _)| *r) == *rev)
        }
        same(&self.service, &o.services)
            && same(&self.upstream, &o.upstreams)
            && same(&self.plugin_config, &o.plugin_configs)
    }
}

/// Everything compiled so far, changed in place by each generation. Requests never see it:
/// they see the [`Compiled`] made from it.
#[derive(Default)]
struct Table {
    routes: FastMap<Arc<str>, CompiledRoute>,
    objects: Objects,
    /// Upstream runtimes by key, with how many users (routes, upstream objects) each has: one
    /// is dropped with its last user, and kept (balancer state, idle connections) as long as
    /// one remains.
    upstreams: FastMap<Arc<str>, (Arc<UpstreamRuntime>, usize)>,
    router: Arc<Router>,
    global_rules: Arc<[GlobalRuleEntry]>,
    /// The runtime of each upstream object, by id, as requests see it.
    serving_upstreams: Arc<FastMap<String, Arc<UpstreamRuntime>>>,
    certs: Arc<Certs>,
}

/// What one generation changed, for the compiled configuration and the debug log.
#[derive(Default)]
struct Applied {
    compiled: usize,
    removed: Vec<Arc<RouteEntry>>,
    added: Vec<Arc<RouteEntry>>,
    /// A global rule changed.
    globals: bool,
    /// A service, upstream or plugin config changed.
    deps: bool,
    /// An SSL object changed.
    ssls: bool,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} compiled, {} index changes",
            self.compiled,
            self.removed.len() + self.added.len()
        )
    }
}

impl Table {
    /// The changes that turn what is compiled into `snap`: the objects it holds at another
    /// revision, and (apart) the ids of those it no longer holds.
    fn difference<'s>(&self, snap: SnapshotRef<'s>) -> (Vec<Change<'s>>, Vec<(KindTag, String)>) {
        let mut held: foldhash::HashSet<(KindTag, &str)> = Default::default();
        let mut changes = Vec::new();
        for o in snap.objects {
            held.insert((o.kind, o.id));
            if self.revision(o.kind.into(), o.id) != Some(o.revision) {
                changes.push(Change {
                    kind: o.kind,
                    id: o.id,
                    revision: o.revision,
                    json: Some(o.json),
                });
            }
        }
        let o = &self.objects;
        let compiled = (self.routes.keys().map(|id| (KindTag::Route, &**id)))
            .chain(o.services.keys().map(|id| (KindTag::Service, id.as_str())))
            .chain(
                o.upstreams
                    .keys()
                    .map(|id| (KindTag::Upstream, id.as_str())),
            )
            .chain(
                o.globals
                    .keys()
                    .map(|id| (KindTag::GlobalRule, id.as_str())),
            )
            .chain((o.plugin_configs.keys()).map(|id| (KindTag::PluginConfig, id.as_str())))
            .chain(o.ssls.keys().map(|id| (KindTag::Ssl, id.as_str())));
        let gone = compiled
            .filter(|key| !held.contains(key))
            .map(|(kind, id)| (kind, id.to_string()))
            .collect();
        (changes, gone)
    }

    /// The revision compiled for object `(kind, id)`.
    fn revision(&self, kind: Kind, id: &str) -> Option<u64> {
        match kind {
            Kind::Routes => self.routes.get(id).map(|c| c.revision),
            Kind::Services => self.objects.services.get(id).map(|s| s.0),
            Kind::Upstreams => self.objects.upstreams.get(id).map(|u| u.0),
            Kind::GlobalRules => self.objects.globals.get(id).map(|g| g.0),
            Kind::Ssls => self.objects.ssls.get(id).map(|s| s.0),
            Kind::PluginConfigs => self.objects.plugin_configs.get(id).map(|p| p.0),
        }
    }

    /// Applies `changes` (in order: a later change of an object wins): objects are parsed or
    /// removed, the routes they touch compiled again, the index patched.
    fn apply(&mut self, changes: Vec<Change<'_>>) -> Applied {
        let mut last: FastMap<(Kind, &str), Change<'_>> = FastMap::default();
        for c in changes {
            last.insert((c.kind.into(), c.id), c);
        }
        let mut a = Applied::default();
        let mut routes = Vec::new();
        for ((kind, id), c) in last {
            let json = c.json;
            match kind {
                Kind::Routes => routes.push(c),
                Kind::Services => {
                    let s = json.and_then(|j| parse::<Service>("service", id, j));
                    put(&mut self.objects.services, id, s.map(|s| (c.revision, s)));
                    a.deps = true;
                }
                Kind::Upstreams => {
                    let u = json.and_then(|j| parse::<Upstream>("upstream", id, j));
                    self.upstream_object(id, u.map(|u| (c.revision, u)));
                    a.deps = true;
                }
                Kind::PluginConfigs => {
                    let p = json.and_then(|j| parse::<PluginConfig>("plugin config", id, j));
                    put(
                        &mut self.objects.plugin_configs,
                        id,
                        p.map(|p| (c.revision, p)),
                    );
                    a.deps = true;
                }
                Kind::GlobalRules => {
                    let g = json.and_then(|j| parse::<GlobalRule>("global rule", id, j));
                    match g {
                        Some(g) => self.objects.globals.insert(id.to_string(), (c.revision, g)),
                        None => self.objects.globals.remove(id),
                    };
                    a.globals = true;
                }
                Kind::Ssls => {
                    let ssl = json.and_then(|j| parse::<Ssl>("ssl", id, j));
                    match ssl {
                        Some(ssl) => {
                            let site = compile_ssl(id, &ssl);
                            let entry = (c.revision, ssl.names(), site);
                            self.objects.ssls.insert(id.to_string(), entry)
                        }
                        None => self.objects.ssls.remove(id),
                    };
                    a.ssls = true;
                }
            }
        }
        for c in routes {
            let old = self.routes.remove_entry(c.id);
            let (key, old) = match old {
                // The previous key, shared with the index rather than copied.
                Some((k, old)) => (k, Some(old)),
                None => (Arc::from(c.id), None),
            };
            let new = c.json.map(|json| (c.revision, Box::from(json)));
            self.replace_route(key, old, new, &mut a);
        }
        if a.deps {
            // Routes compiled against a service, upstream or plugin config that changed since.
            let stale: Vec<Arc<str>> = self
                .routes
                .iter()
                .filter(|(_, c)| !c.deps.unchanged(&self.objects))
                .map(|(k, _)| k.clone())
                .collect();
            for key in stale {
                if let Some(mut old) = self.routes.remove(&key) {
                    let new = (old.revision, std::mem::take(&mut old.json));
                    self.replace_route(key, Some(old), Some(new), &mut a);
                }
            }
        }
        self.index(&a);
        a
    }

    /// Puts route `key` compiled from `new` (None: deleted) in place of `old`.
    fn replace_route(
        &mut self,
        key: Arc<str>,
        old: Option<CompiledRoute>,
        new: Option<(u64, Box<str>)>,
        a: &mut Applied,
    ) {
        // The new one first: an upstream runtime both use is kept, not dropped and made again.
        if let Some((revision, json)) = new {
            // The route's traffic record goes on from revision to revision; a deleted route's
            // is released when its last revision is dropped (`traffic.rs`).
            let record = old.as_ref().map(|o| o.record.clone()).unwrap_or_default();
            let c = self.build().route(&key, revision, json, record);
            a.compiled += 1;
            a.added.extend(c.entry.clone());
            self.routes.insert(key, c);
        }
        if let Some(old) = old {
            a.removed.extend(old.entry);
            release(&mut self.upstreams, old.upstream_key);
        }
    }

    /// Puts upstream object `id` (None: deleted). An upstream object is one user of its
    /// runtime, under [`upstream_key`]: a new revision takes a new one, the old is released.
    fn upstream_object(&mut self, id: &str, new: Option<(u64, Upstream)>) {
        let old = (self.objects.upstreams.get(id)).map(|(rev, _)| upstream_key(id, *rev).into());
        if let Some((revision, u)) = &new {
            let key = upstream_key(id, *revision).into();
            self.build()
                .upstream(key, u, None, &format!("upstreams/{id}"));
        }
        release(&mut self.upstreams, old);
        put(&mut self.objects.upstreams, id, new);
    }

    /// Compiling against the current objects, taking runtimes from (and adding them to) the
    /// table's.
    fn build(&mut self) -> Build<'_> {
        Build {
            objects: &self.objects,
            upstreams: &mut self.upstreams,
        }
    }

    /// Patches or rebuilds the index, and remakes what requests see of the objects that changed.
    fn index(&mut self, a: &Applied) {
        let changes = a.removed.len() + a.added.len();
        if changes > self.routes.len() / 8 {
            let entries = self.routes.values().filter_map(|c| c.entry.as_ref());
            self.router = Arc::new(Router::new(entries));
        } else if changes > 0 {
            self.router = Arc::new(self.router.patch(&a.removed, &a.added));
        }
        if a.globals {
            self.global_rules = self
                .objects
                .globals
                .iter()
                .map(|(id, (rev, g))| GlobalRuleEntry {
                    owner: format!("global_rule:{id}:{rev}").into(),
                    id: id.clone(),
                    revision: *rev,
                    plugins: plugin_list(&[Some(&g.plugins)]),
                    resolved: Default::default(),
                })
                .collect();
        }
        if a.deps {
            let runtime = |id: &str, rev: u64| {
                let key = upstream_key(id, rev);
                Some((id.to_string(), self.upstreams.get(key.as_str())?.0.clone()))
            };
            self.serving_upstreams = Arc::new(
                (self.objects.upstreams.iter())
                    .filter_map(|(id, (rev, _))| runtime(id, *rev))
                    .collect(),
            );
        }
        if a.ssls {
            let mut sites: Vec<_> = (self.objects.ssls.iter())
                .filter_map(|(id, (_, names, site))| Some((id, &names[..], site.as_ref()?)))
                .collect();
            sites.sort_by(|a, b| wasmgate_shared::model::id_order(a.0, b.0));
            self.certs = Arc::new(Certs::new(sites.into_iter().map(|(_, n, s)| (n, s))));
        }
    }

    /// What requests are served with, as generation `generation`.
    fn compiled(&self, generation: u64) -> Compiled {
        Compiled {
            generation,
            router: self.router.clone(),
            global_rules: self.global_rules.clone(),
            by_upstream_id: self.serving_upstreams.clone(),
            certs: self.certs.clone(),
        }
    }
}

/// SSL object `id` made ready to serve; None when it is disabled or cannot serve (logged:
/// its names then get no certificate from it).
fn compile_ssl(id: &str, ssl: &Ssl) -> Option<Arc<Site>> {
    if !ssl.enabled() {
        return None;
    }
    Site::compile(id, ssl)
        .map_err(|e| tracing::error!("ssl {id}: cannot serve: {e}"))
        .ok()
        .map(Arc::new)
}

/// The key of upstream object `id`'s runtime at revision `rev`.
fn upstream_key(id: &str, rev: u64) -> String {
    format!("upstream:{id}:{rev}")
}

/// Sets `id` in `map` to `value`, or removes it.
fn put<T>(map: &mut HashMap<String, (u64, T)>, id: &str, value: Option<(u64, T)>) {
    match value {
        Some(v) => map.insert(id.to_string(), v),
        None => map.remove(id),
    };
}

/// One user fewer for the upstream runtime `key`, dropped with its last.
fn release(
    upstreams: &mut FastMap<Arc<str>, (Arc<UpstreamRuntime>, usize)>,
    key: Option<Arc<str>>,
) {
    let Some(key) = key else { return };
    if let Some(held) = upstreams.get_mut(&key) {
        held.1 -= 1;
        if held.1 == 0 {
            upstreams.remove(&key);
        }
    }
}

/// What compiling a route reads and fills.
struct Build<'a> {
    objects: &'a Objects,
    upstreams: &'a mut FastMap<Arc<str>, (Arc<UpstreamRuntime>, usize)>,
}

impl<'a> Build<'a> {
    /// Compiles route `id` from its JSON, noting what it read.
    fn route(&mut self, id: &str, rev: u64, json: Box<str>, record: RecordCell) -> CompiledRoute {
        let mut c = CompiledRoute {
            revision: rev,
            json,
            deps: Deps::default(),
            entry: None,
            upstream_key: None,
            record,
        };
        if let Some(route) = parse::<Route>("route", id, &c.json).filter(Route::enabled) {
            let record = c.record.clone();
            c.entry = (self.route_entry(id, rev, &route, &mut c)).map(|e| {
                Arc::new(RouteEntry {
                    traffic_record: record,
                    ..e
                })
            });
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
        // The plugin config first: a route whose plugin config is gone answers 503 (APISIX
        // checks it before the service), whatever else is missing.
        let (plugin_config, broken) = self.plugin_config(id, route, c);
        let mut revision = rev.max(plugin_config.map_or(0, |(r, _)| *r));
        let plugin_config = plugin_config.and_then(|(_, p)| p.plugins.as_ref());
        let service = match &route.service_id {
            Some(sid) => {
                let found = self.objects.services.get(&sid.0);
                c.deps.service = Some((sid.0.clone(), found.map(|s| s.0)));
                match found {
                    Some(s) => Some((sid.0.as_str(), s)),
                    // Served broken (503) when its plugin config is gone too.
                    None if broken.is_some() => None,
                    None => {
                        tracing::error!("route {id}: service {} not found; route skipped", sid.0);
                        return None;
                    }
                }
            }
            None => None,
        };
        revision = revision.max(service.map_or(0, |(_, (r, _))| *r));
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
            plugins: plugin_list(&[
                service.and_then(|(_, (_, s))| s.plugins.as_ref()),
                plugin_config,
                route.plugins.as_ref(),
            ]),
            resolved: Default::default(),
            upstream,
            websocket: route
                .enable_websocket
                .or_else(|| service.and_then(|(_, (_, s))| s.enable_websocket))
                .unwrap_or(false),
            broken,
            traffic_record: Default::default(),
        })
    }

    /// The plugin config route `id` names, with its revision, noted among what the route
    /// read; or, when it names one that is missing, why the route answers 503.
    fn plugin_config(
        &self,
        id: &str,
        route: &Route,
        c: &mut CompiledRoute,
    ) -> (Option<&'a (u64, PluginConfig)>, Option<Box<str>>) {
        let Some(pid) = &route.plugin_config_id else {
            return (None, None);
        };
        let found = self.objects.plugin_configs.get(&pid.0);
        c.deps.plugin_config = Some((pid.0.clone(), found.map(|p| p.0)));
        if found.is_some() {
            return (found, None);
        }
        let why = format!("failed to fetch plugin config by id: {}", pid.0);
        tracing::error!("route {id}: {why}; its requests get 503");
        (None, Some(why.into()))
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
            Some((
                owner(upstream_key(uid, *urev)),
                u,
                format!("upstreams/{uid}"),
            ))
        };
        let (key, u, holder): (String, &Upstream, String) = if let Some(uid) = &route.upstream_id {
            by_id(&uid.0)?
        } else if let Some(u) = &route.upstream {
            (format!("route:{id}:{rev}"), u, format!("routes/{id}"))
        } else if let Some((sid, (srev, s))) = service {
            if let Some(uid) = &s.upstream_id {
                by_id(&uid.0)?
            } else {
                let u = s.upstream.as_ref()?;
                (
                    owner(format!("service:{sid}:{srev}")),
                    u,
                    format!("services/{sid}"),
                )
            }
        } else {
            return None;
        };
        let key: Arc<str> = key.into();
        let rt = self.upstream(key.clone(), u, timeout, &holder);
        Some((key, rt))
    }

    /// The runtime for upstream `key`, with one user more: the one in use, else a new one.
    fn upstream(
        &mut self,
        key: Arc<str>,
        u: &Upstream,
        timeout: Option<&Timeout>,
        holder: &str,
    ) -> Arc<UpstreamRuntime> {
        let held = self
            .upstreams
            .entry(key)
            .or_insert_with(|| (Arc::new(UpstreamRuntime::new(u, timeout, holder)), 0));
        held.1 += 1;
        held.0.clone()
    }
}

/// The plugins of `layers` merged, a later layer's entry winning over an earlier one's (a
/// route's over its plugin config's, over its service's, as APISIX merges them), sorted by
/// name; the wasm host orders them by phase and priority.
fn plugin_list(layers: &[Option<&Plugins>]) -> Vec<PluginConf> {
    let mut merged = Plugins::default();
    for layer in layers.iter().flatten() {
        merged.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    merged
        .iter()
        // APISIX's `_meta.disable`: kept in the object, not run (the route's own entry wins
        // over its service's, so a route can turn off what its service runs).
        .filter(|(_, attrs)| {
            attrs.pointer("/_meta/disable") != Some(&serde_json::Value::Bool(true))
        })
        .map(|(name, attrs)| PluginConf::from_attrs(name, attrs))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_shared::snapshot::{Snapshot, SnapshotObject};

    fn obj(kind: KindTag, id: &str, revision: u64, json: &str) -> SnapshotObject {
        SnapshotObject::new(kind, id, revision, json)
    }

    /// What a worker serves at one generation, with the route entries and upstream runtimes
    /// it keeps for the next.
    struct Served {
        c: Arc<Compiled>,
        entries: HashMap<String, Arc<RouteEntry>>,
        runtimes: BTreeMap<String, Arc<UpstreamRuntime>>,
    }

    impl std::ops::Deref for Served {
        type Target = Compiled;
        fn deref(&self) -> &Compiled {
            &self.c
        }
    }

    fn served(live: &Live, generation: u64) -> Served {
        let c = live.current();
        assert_eq!(c.generation, generation);
        let st = live.state.lock().unwrap();
        let t = &st.table;
        Served {
            c,
            entries: (t.routes.iter())
                .filter_map(|(id, c)| Some((id.to_string(), c.entry.clone()?)))
                .collect(),
            runtimes: (t.upstreams.iter())
                .map(|(k, (rt, _))| (k.to_string(), rt.clone()))
                .collect(),
        }
    }

    /// Publishes `objects` as generation `generation` and returns what the worker serves.
    fn serve(seg: &Segment, live: &Live, generation: u64, objects: &[SnapshotObject]) -> Served {
        let snap = Snapshot {
            generation,
            objects: objects.to_vec(),
        };
        seg.publish(generation, &snap.encode()).unwrap();
        served(live, generation)
    }

    fn entry<'a>(c: &'a Served, id: &str) -> &'a Arc<RouteEntry> {
        c.entries.get(id).expect("route is served")
    }

    /// The route serving `GET http://x<path>`.
    fn find<'c>(c: &'c Compiled, path: &str) -> Option<&'c Arc<RouteEntry>> {
        let none = |_: &str| None;
        let req = crate::router::RequestView {
            method: &http::Method::GET,
            host: "x",
            path,
            remote: "127.0.0.1".parse().unwrap(),
            vars: &none,
        };
        c.router.find(&req)
    }

    const NODES: &str = r#"{"nodes":{"127.0.0.1:1980":1},"type":"roundrobin"}"#;

    /// A route takes its plugin config's plugins under its own and over its service's, as
    /// APISIX merges them; an edit of the plugin config compiles its routes again (a new
    /// owner key: new PluginContexts, configured with the new settings); a missing one leaves
    /// the route serving 503 rather than without the plugins.
    #[test]
    fn plugin_configs_merge_between_route_and_service() {
        let seg = Arc::new(Segment::create(1 << 20).unwrap());
        let live = Live::new(seg.clone(), 0);
        let confs = |e: &RouteEntry| -> Vec<(String, String)> {
            let mut v: Vec<_> = (e.plugins.iter())
                .map(|p| (p.name.to_string(), p.conf.to_string()))
                .collect();
            v.sort();
            v
        };
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let mut objects = vec![
            obj(
                KindTag::Service,
                "s",
                1,
                r#"{"plugins":{"a":{"conf":"svc"},"b":{"conf":"svc"},"c":{"conf":"svc"}}}"#,
            ),
            obj(
                KindTag::PluginConfig,
                "pc",
                2,
                r#"{"plugins":{"b":{"conf":"pc"},"c":{"conf":"pc"},"d":{"conf":"pc"}}}"#,
            ),
            obj(
                KindTag::Route,
                "r",
                3,
                r#"{"uri":"/r","service_id":"s","plugin_config_id":"pc","plugins":{"c":{"conf":"own"}}}"#,
            ),
            obj(
                KindTag::Route,
                "other",
                4,
                r#"{"uri":"/o","plugins":{"a":{"conf":"x"}}}"#,
            ),
            obj(
                KindTag::Route,
                "both",
                4,
                r#"{"uri":"/both","service_id":"gone","plugin_config_id":"pc"}"#,
            ),
        ];
        let g1 = serve(&seg, &live, 1, &objects);
        assert!(
            find(&g1, "/both").is_none(),
            "its service is missing: not served"
        );
        let r = entry(&g1, "r");
        assert_eq!(
            confs(r),
            [
                pair("a", "svc"),
                pair("b", "pc"),
                pair("c", "own"),
                pair("d", "pc")
            ]
        );
        assert_eq!((&*r.owner, r.broken.is_none()), ("route:r:3", true));

        // The plugin config is edited: its route is compiled again, the other is not.
        objects[1] = obj(
            KindTag::PluginConfig,
            "pc",
            5,
            r#"{"plugins":{"b":{"conf":"pc2"}}}"#,
        );
        let g2 = serve(&seg, &live, 2, &objects);
        let r = entry(&g2, "r");
        assert_eq!(
            confs(r),
            [pair("a", "svc"), pair("b", "pc2"), pair("c", "own")]
        );
        assert_eq!(&*r.owner, "route:r:5");
        assert!(Arc::ptr_eq(entry(&g1, "other"), entry(&g2, "other")));

        // Deleted (the Admin API allows it with force=true): the route stays, broken.
        objects.remove(1);
        let g3 = serve(&seg, &live, 3, &objects);
        let r = find(&g3, "/r").expect("the route still matches");
        // Its plugin config is checked first, as APISIX does: 503 rather than 404.
        let both = find(&g3, "/both").expect("served, broken");
        assert!(both.broken.is_some());
        assert_eq!(
            r.broken.as_deref(),
            Some("failed to fetch plugin config by id: pc")
        );
        // Back: served again.
        objects.push(obj(KindTag::PluginConfig, "pc", 6, r#"{"plugins":{}}"#));
        let g4 = serve(&seg, &live, 4, &objects);
        let r = entry(&g4, "r");
        assert!(r.broken.is_none());
        assert_eq!(
            confs(r),
            [pair("a", "svc"), pair("b", "svc"), pair("c", "own")]
        );
    }

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
            &g2.runtimes["route:a:1"],
            entry(&g3, "a").upstream.as_ref().unwrap()
        ));
        assert_eq!(entry(&g3, "b").revision, 8);
        assert_eq!(entry(&g3, "c").revision, 8);
        assert_eq!(&*entry(&g3, "d").owner, "route:d:9");
        assert!(Arc::ptr_eq(
            entry(&g3, "b").upstream.as_ref().unwrap(),
            g3.upstream("u1").unwrap()
        ));
        let get = |c: &Compiled, path: &str| find(c, path).map(|r| r.id.clone());
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

    /// The configuration kept by the test below, and how it is published.
    struct Config {
        objects: BTreeMap<(KindTag, String), (u64, String)>,
        generation: u64,
    }

    impl Config {
        /// Puts (Some) or deletes (None) objects as the next generation, and publishes it
        /// whole on `whole` and as a delta on `delta`.
        fn change(
            &mut self,
            whole: &Segment,
            delta: &Segment,
            edits: &[(KindTag, &str, Option<&str>)],
        ) {
            self.generation += 1;
            let generation = self.generation;
            let mut changes = Vec::new();
            for &(kind, id, json) in edits {
                match json {
                    Some(j) => self
                        .objects
                        .insert((kind, id.into()), (generation, j.into())),
                    None => self.objects.remove(&(kind, id.into())),
                };
                changes.push(Change {
                    kind,
                    id,
                    revision: generation,
                    json,
                });
            }
            let objects = (self.objects.iter())
                .map(|((k, id), (rev, json))| obj(*k, id, *rev, json))
                .collect();
            let snap = Snapshot {
                generation,
                objects,
            }
            .encode();
            whole.publish(generation, &snap).unwrap();
            let d = Delta {
                generation,
                changes,
            }
            .encode();
            delta.append(generation, &d).unwrap();
        }
    }

    /// What a request sees: for each path, the route serving it, its owner key and its
    /// upstream's nodes; the global rules; the upstream objects.
    fn seen(s: &Served) -> String {
        let mut out = String::new();
        for path in [
            "/a", "/b/x", "/c", "/d", "/e", "/other/3", "/other/4", "/new",
        ] {
            let r = find(s, path);
            let nodes = r
                .and_then(|r| r.upstream.as_ref())
                .map(|u| format!("{:?}", u.nodes));
            out += &format!("{path} -> {:?} {nodes:?}\n", r.map(|r| &r.owner));
        }
        for g in s.global_rules.iter() {
            out += &format!("global {}\n", g.owner);
        }
        let mut ids: Vec<_> = s.by_upstream_id.keys().collect();
        ids.sort();
        out + &format!(
            "upstreams {ids:?} runtimes {:?}",
            s.runtimes.keys().collect::<Vec<_>>()
        )
    }

    /// A worker following the journal's deltas serves what a worker reading whole snapshots
    /// serves, at every step of a series of edits touching routes through their services and
    /// upstreams; and once everything is deleted, no upstream runtime is left behind.
    #[test]
    fn deltas_serve_what_snapshots_serve() {
        use KindTag::*;
        let inline = format!(r#"{{"uri":"/a","upstream":{NODES}}}"#);
        let nodes2 = r#"{"nodes":{"127.0.0.2:1980":1},"type":"roundrobin"}"#;
        let svc_inline = format!(r#"{{"upstream":{nodes2}}}"#);
        let others: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"uri":"/other/{i}","upstream_id":"u1"}}"#))
            .collect();
        let mut first: Vec<(KindTag, &str, Option<&str>)> = vec![
            (Route, "a", Some(&inline)),
            (Route, "b", Some(r#"{"uri":"/b/*","upstream_id":"u1"}"#)),
            (Route, "c", Some(r#"{"uri":"/c","service_id":"s1"}"#)),
            (Route, "d", Some(r#"{"uri":"/d","service_id":"s2"}"#)),
            (
                Route,
                "e",
                Some(
                    r#"{"uri":"/e","upstream_id":"u1","timeout":{"connect":1,"send":1,"read":1}}"#,
                ),
            ),
            (Upstream, "u1", Some(NODES)),
            (Service, "s1", Some(r#"{"upstream_id":"u1"}"#)),
            (GlobalRule, "g", Some(r#"{"plugins":{}}"#)),
        ];
        let ids: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
        first.extend(
            ids.iter()
                .zip(&others)
                .map(|(id, j)| (Route, id.as_str(), Some(j.as_str()))),
        );
        let steps: Vec<Vec<(KindTag, &str, Option<&str>)>> = vec![
            first,
            // The upstream changes (b, c, e and the others follow), s2 appears (d with it).
            vec![
                (Upstream, "u1", Some(nodes2)),
                (Service, "s2", Some(&svc_inline)),
            ],
            // A route is edited, another deleted, one added on s1; a global rule added.
            vec![
                (Route, "a", Some(r#"{"uri":"/new","upstream_id":"u1"}"#)),
                (Route, "o4", None),
                (Route, "n", Some(r#"{"uri":"/a","service_id":"s1"}"#)),
                (GlobalRule, "h", Some(r#"{"plugins":{}}"#)),
            ],
            // s1 gets its own upstream; the same route edited twice in one generation.
            vec![
                (Service, "s1", Some(&svc_inline)),
                (Route, "o3", Some(r#"{"uri":"/x","upstream_id":"u1"}"#)),
                (
                    Route,
                    "o3",
                    Some(r#"{"uri":"/other/3","status":0,"upstream_id":"u1"}"#),
                ),
                (GlobalRule, "g", None),
            ],
            // s2 goes: d waits again.
            vec![(Service, "s2", None)],
        ];
        // Both workers follow from an empty start, step by step.
        let segment = || Arc::new(Segment::create(1 << 20).unwrap());
        let (whole, delta) = (segment(), segment());
        whole.publish(0, &Snapshot::default().encode()).unwrap();
        delta.publish(0, &Snapshot::default().encode()).unwrap();
        let (a, b) = (Live::new(whole.clone(), 0), Live::new(delta.clone(), 1));
        let mut cfg = Config {
            objects: BTreeMap::new(),
            generation: 0,
        };
        for step in &steps {
            cfg.change(&whole, &delta, step);
            let g = cfg.generation;
            let (sa, sb) = (served(&a, g), served(&b, g));
            assert_eq!(seen(&sa), seen(&sb), "generation {g}");
            // A worker starting now reads the journal whole: snapshot, then every delta.
            let late = Live::new(delta.clone(), 2);
            assert_eq!(seen(&served(&late, g)), seen(&sb), "late start at {g}");
        }
        let last = served(&b, cfg.generation);
        assert!(
            seen(&last).contains("/c -> Some(\"route:c:"),
            "{}",
            seen(&last)
        );
        assert!(seen(&last).contains("/d -> None"), "{}", seen(&last));
        // Everything deleted: nothing served, no runtime kept.
        let all: Vec<(KindTag, String)> = cfg.objects.keys().cloned().collect();
        let edits: Vec<_> = all.iter().map(|(k, id)| (*k, id.as_str(), None)).collect();
        cfg.change(&whole, &delta, &edits);
        let (sa, sb) = (served(&a, cfg.generation), served(&b, cfg.generation));
        assert_eq!(seen(&sa), seen(&sb));
        assert!(
            sb.entries.is_empty() && sb.runtimes.is_empty(),
            "{}",
            seen(&sb)
        );
        assert!(sa.runtimes.is_empty(), "{}", seen(&sa));
    }
}
