//! The router: from (method, host, path, client address, variables) to a route.
//!
//! Matching order, as APISIX's default router (`radixtree_host_uri`): routes with `hosts` first,
//! those of the request's exact host, then those of wildcard hosts from the longest suffix;
//! then the routes without hosts. Within each, an exact `uri` first, then prefixes (`/api/*`)
//! from the longest; among routes on the same path, higher `priority` first, then the lower id
//! (stable). A route matches when its methods, hosts, client addresses and `vars` all match.
//! So a route bound to `api.example.com` on `/*` serves `api.example.com/login` even when a
//! route without hosts has the exact path `/login`: a host's own routes (its auth plugin, say)
//! cannot be passed by.

use crate::upstream::UpstreamRuntime;
use crate::FastMap;
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use wasmgate_shared::model::vars::{Cidr, VarsExpr};
use wasmgate_shared::model::{id_order, PluginConf};

/// A host pattern: exact (`api.example.com`) or wildcard (`*.example.com`).
#[derive(Debug, Clone)]
pub enum HostPattern {
    Exact(String),
    /// The suffix including the dot: `.example.com`.
    Suffix(String),
}

impl HostPattern {
    pub fn parse(p: &str) -> HostPattern {
        let p = p.to_ascii_lowercase();
        match p.strip_prefix('*') {
            Some(rest) => HostPattern::Suffix(rest.to_string()),
            None => HostPattern::Exact(p),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// A compiled route, ready to serve.
#[derive(Debug)]
pub struct RouteEntry {
    pub id: String,
    pub name: Option<String>,
    /// The store revision of the route (or of what it inherits, whichever is newest).
    pub revision: u64,
    pub priority: i64,
    /// The `uri`/`uris` it serves; a prefix ends with `*`.
    pub paths: Vec<String>,
    /// HTTP methods (empty = any).
    pub methods: Vec<http::Method>,
    pub hosts: Vec<HostPattern>,
    pub remote_addrs: Vec<Cidr>,
    pub vars: Option<VarsExpr>,
    /// Plugins with their configuration (service's merged under the route's).
    pub plugins: Vec<PluginConf>,
    /// `plugins` resolved against the worker's, on the route's first request.
    pub resolved: crate::plugins::Resolved,
    /// `route:<id>:<revision>`: what its PluginContexts are keyed by (made once, not per request).
    pub owner: Arc<str>,
    pub upstream: Option<Arc<UpstreamRuntime>>,
    /// `enable_websocket` (the route's, else its service's): an `Upgrade` request is passed
    /// to the upstream and, once it answers 101, the connection becomes a tunnel.
    pub websocket: bool,
    /// Why the route cannot serve — its plugin config is missing (deleted with `force=true`):
    /// its requests get 503, as in APISIX, rather than run without plugins it names.
    pub broken: Option<Box<str>>,
    /// This worker's statistics record for the route (`traffic::Traffic`), claimed on its
    /// first request; shared by the route's revisions, released after the last.
    pub traffic_record: crate::traffic::RecordCell,
}

/// What a request offers to be matched.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// Lower-cased host without port.
    pub host: &'a str,
    pub path: &'a str,
    pub remote: IpAddr,
    /// nginx-style variables for `vars` (`arg_x`, `http_x`, `cookie_x`, `uri`…).
    pub vars: &'a dyn Fn(&str) -> Option<Cow<'a, str>>,
}

impl RouteEntry {
    /// What a request no route matched is served as when global rules exist (APISIX runs
    /// them before its 404): no path, no plugins of its own, no upstream. Its id is empty,
    /// which no route's is.
    pub fn unmatched() -> Arc<RouteEntry> {
        static UNMATCHED: std::sync::OnceLock<Arc<RouteEntry>> = std::sync::OnceLock::new();
        UNMATCHED
            .get_or_init(|| {
                Arc::new(RouteEntry {
                    id: String::new(),
                    name: None,
                    revision: 0,
                    priority: 0,
                    paths: Vec::new(),
                    methods: Vec::new(),
                    hosts: Vec::new(),
                    remote_addrs: Vec::new(),
                    vars: None,
                    plugins: Vec::new(),
                    resolved: Default::default(),
                    owner: "unmatched".into(),
                    upstream: None,
                    websocket: false,
                    broken: None,
                    traffic_record: Default::default(),
                })
            })
            .clone()
    }

    /// Whether this is [`RouteEntry::unmatched`].
    pub fn is_unmatched(&self) -> bool {
        self.id.is_empty()
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(req.method))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(req.host)))
            && (self.remote_addrs.is_empty()
                || self.remote_addrs.iter().any(|c| c.contains(req.remote)))
            && self.vars.as_ref().is_none_or(|v| v.eval(req.vars))
    }
}

/// All enabled routes: those with hosts by host ([`HostPattern`]), each host's routes indexed
/// by path, and those without hosts indexed by path. A route with several hosts is in each
/// host's index. The indexes are shared (`Arc`): a change copies the maps of hosts and
/// patches the indexes it touches.
#[derive(Debug, Default, Clone)]
pub struct Router {
    exact_hosts: FastMap<Arc<str>, Arc<PathIndex>>,
    /// By suffix with its dot (`.example.com` for `*.example.com`).
    suffix_hosts: FastMap<Arc<str>, Arc<PathIndex>>,
    /// The distinct lengths of `suffix_hosts`' keys, longest first, with their counts.
    suffix_lengths: Vec<(usize, usize)>,
    no_host: PathIndex,
}

/// Where a route is indexed: under a host of its, or with the routes without hosts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Tier<'a> {
    Exact(&'a str),
    Suffix(&'a str),
    NoHost,
}

fn tiers(route: &RouteEntry) -> impl Iterator<Item = Tier<'_>> {
    let none = route.hosts.is_empty().then_some(Tier::NoHost);
    route
        .hosts
        .iter()
        .map(|h| match h {
            HostPattern::Exact(h) => Tier::Exact(h),
            HostPattern::Suffix(s) => Tier::Suffix(s),
        })
        .chain(none)
}

/// Routes indexed by path: the routes of one host, or the routes without hosts.
///
/// Prefixes are found by hashing the request path's leading bytes at each length some prefix
/// has, longest first: a lookup costs one hash probe per distinct prefix length (a handful),
/// not one comparison per route — with 10,000 prefix routes a scan took up to 28 µs.
///
/// Keys and lists are shared (`Arc`), so a configuration change that touches a few routes
/// copies the index cheaply and patches it ([`PathIndex::patch`]) instead of indexing every route
/// again.
#[derive(Debug, Default, Clone)]
struct PathIndex {
    exact: Index,
    /// Prefixes without the `*`.
    prefixes: Index,
    /// The distinct lengths of `prefixes`' keys, longest first, each with how many keys
    /// have it (so that a patch updates them without counting every key again).
    prefix_lengths: Vec<(usize, usize)>,
}

/// Path → the routes on it, in matching order.
type Index = FastMap<Arc<str>, Arc<[Arc<RouteEntry>]>>;

/// Routes in matching order: higher priority first, then the lower id.
fn order(list: &mut [Arc<RouteEntry>]) {
    list.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| id_order(&a.id, &b.id))
    })
}

/// Where a path is indexed: `(true, prefix without the '*')` or `(false, exact path)`.
fn index_key(path: &str) -> (bool, &str) {
    match path.strip_suffix('*') {
        Some(prefix) => (true, prefix),
        None => (false, path),
    }
}

impl Router {
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a Arc<RouteEntry>>) -> Router {
        let mut by_tier: FastMap<Tier<'_>, Vec<Arc<RouteEntry>>> = FastMap::default();
        for r in routes {
            for t in tiers(r) {
                by_tier.entry(t).or_default().push(r.clone());
            }
        }
        let mut router = Router::default();
        for (tier, list) in by_tier {
            router.set(tier, PathIndex::new(&list));
        }
        router
    }

    /// Puts `index` as `tier`'s (an empty one: takes the tier out).
    fn set(&mut self, tier: Tier<'_>, index: PathIndex) {
        let (map, key) = match tier {
            Tier::NoHost => {
                self.no_host = index;
                return;
            }
            Tier::Exact(h) => (&mut self.exact_hosts, h),
            Tier::Suffix(s) => (&mut self.suffix_hosts, s),
        };
        let suffix = matches!(tier, Tier::Suffix(_));
        if index.is_empty() {
            if map.remove(key).is_some() && suffix {
                count(&mut self.suffix_lengths, key.len(), false);
            }
        } else if map.insert(Arc::from(key), Arc::new(index)).is_none() && suffix {
            count(&mut self.suffix_lengths, key.len(), true);
        }
    }

    fn get(&self, tier: Tier<'_>) -> Option<&PathIndex> {
        match tier {
            Tier::NoHost => Some(&self.no_host),
            Tier::Exact(h) => self.exact_hosts.get(h).map(|i| &**i),
            Tier::Suffix(s) => self.suffix_hosts.get(s).map(|i| &**i),
        }
    }

    /// Every route indexed (a route on several paths or hosts comes once for each).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteEntry>> + '_ {
        self.exact_hosts
            .values()
            .chain(self.suffix_hosts.values())
            .flat_map(|i| i.routes())
            .chain(self.no_host.routes())
    }

    /// This router with `removed` routes taken out and `added` ones put in: what
    /// `Router::new` would build from the routes after the change. Only the indexes of the
    /// hosts the change touches are patched; the others are shared with `self`.
    pub fn patch(&self, removed: &[Arc<RouteEntry>], added: &[Arc<RouteEntry>]) -> Router {
        type Change = (Vec<Arc<RouteEntry>>, Vec<Arc<RouteEntry>>);
        let mut touched: FastMap<Tier<'_>, Change> = FastMap::default();
        for r in removed {
            for t in tiers(r) {
                touched.entry(t).or_default().0.push(r.clone());
            }
        }
        for r in added {
            for t in tiers(r) {
                touched.entry(t).or_default().1.push(r.clone());
            }
        }
        let mut next = self.clone();
        for (tier, (gone, new)) in touched {
            let index = match self.get(tier) {
                Some(i) => i.patch(&gone, &new),
                None => PathIndex::new(&new),
            };
            next.set(tier, index);
        }
        next
    }

    /// The route serving `req`, if any: see the module's documentation for the order.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Arc<RouteEntry>> {
        let host = req.host;
        if !self.exact_hosts.is_empty() {
            if let Some(r) = self.exact_hosts.get(host).and_then(|i| i.find(req)) {
                return Some(r);
            }
        }
        for &(len, _) in &self.suffix_lengths {
            // `*.example.com` needs at least one character before its dot.
            if len >= host.len() || !host.is_char_boundary(host.len() - len) {
                continue;
            }
            let suffix = &host[host.len() - len..];
            if let Some(r) = self.suffix_hosts.get(suffix).and_then(|i| i.find(req)) {
                return Some(r);
            }
        }
        self.no_host.find(req)
    }

    pub fn len(&self) -> usize {
        self.exact_hosts
            .values()
            .chain(self.suffix_hosts.values())
            .map(|i| i.len())
            .sum::<usize>()
            + self.no_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One key of length `len` more (`added`) or fewer in a list of lengths, longest first, with
/// how many keys have each.
fn count(lengths: &mut Vec<(usize, usize)>, len: usize, added: bool) {
    match lengths.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(i) if added => lengths[i].1 += 1,
        Ok(i) => {
            lengths[i].1 -= 1;
            if lengths[i].1 == 0 {
                lengths.remove(i);
            }
        }
        Err(i) if added => lengths.insert(i, (len, 1)),
        Err(_) => {}
    }
}

impl PathIndex {
    fn new(routes: &[Arc<RouteEntry>]) -> PathIndex {
        let mut lists: [FastMap<&str, Vec<Arc<RouteEntry>>>; 2] = Default::default();
        for r in routes {
            for p in &r.paths {
                let (prefix, key) = index_key(p);
                lists[usize::from(prefix)]
                    .entry(key)
                    .or_default()
                    .push(r.clone());
            }
        }
        let [exact, prefixes] = lists.map(|m| {
            m.into_iter()
                .map(|(k, mut v)| {
                    order(&mut v);
                    (Arc::from(k), Arc::from(v))
                })
                .collect::<Index>()
        });
        let mut index = PathIndex {
            exact,
            prefixes,
            prefix_lengths: Vec::new(),
        };
        for len in index.prefixes.keys().map(|k| k.len()).collect::<Vec<_>>() {
            count(&mut index.prefix_lengths, len, true);
        }
        index
    }

    /// Every route indexed (a route on several paths comes once per path).
    fn routes(&self) -> impl Iterator<Item = &Arc<RouteEntry>> + '_ {
        self.exact
            .values()
            .chain(self.prefixes.values())
            .flat_map(|list| list.iter())
    }

    /// This index with `removed` routes taken out and `added` ones put in: what
    /// `PathIndex::new` would build from the routes after the change. Each path the change
    /// touches gets its list made once; the rest is shared with `self`.
    fn patch(&self, removed: &[Arc<RouteEntry>], added: &[Arc<RouteEntry>]) -> PathIndex {
        let gone: foldhash::HashSet<*const RouteEntry> = removed.iter().map(Arc::as_ptr).collect();
        let mut touched: FastMap<(bool, &str), Vec<Arc<RouteEntry>>> = FastMap::default();
        for r in removed {
            for p in &r.paths {
                touched.entry(index_key(p)).or_default();
            }
        }
        for r in added {
            for p in &r.paths {
                touched.entry(index_key(p)).or_default().push(r.clone());
            }
        }
        let mut next = self.clone();
        for ((prefix, key), mut list) in touched {
            let old = next
                .index(prefix)
                .get_key_value(key)
                .map(|(k, l)| (k.clone(), l.clone()));
            if let Some((_, l)) = &old {
                list.extend(
                    l.iter()
                        .filter(|e| !gone.contains(&Arc::as_ptr(e)))
                        .cloned(),
                );
            }
            if list.is_empty() {
                if next.index(prefix).remove(key).is_some() && prefix {
                    count(&mut next.prefix_lengths, key.len(), false);
                }
                continue;
            }
            order(&mut list);
            let key = match old {
                Some((k, _)) => k,
                None => {
                    if prefix {
                        count(&mut next.prefix_lengths, key.len(), true);
                    }
                    Arc::from(key)
                }
            };
            next.index(prefix).insert(key, Arc::from(list));
        }
        next
    }

    fn index(&mut self, prefix: bool) -> &mut Index {
        if prefix {
            &mut self.prefixes
        } else {
            &mut self.exact
        }
    }

    /// The route of this index serving `req`, if any.
    fn find(&self, req: &RequestView<'_>) -> Option<&Arc<RouteEntry>> {
        if let Some(list) = self.exact.get(req.path) {
            if let Some(r) = list.iter().find(|r| r.matches(req)) {
                return Some(r);
            }
        }
        let path = req.path;
        self.prefix_lengths
            .iter()
            .map(|&(len, _)| len)
            .filter(|&len| len <= path.len() && path.is_char_boundary(len))
            .filter_map(|len| self.prefixes.get(&path[..len]))
            .find_map(|list| list.iter().find(|r| r.matches(req)))
    }

    fn len(&self) -> usize {
        self.exact.values().map(|l| l.len()).sum::<usize>()
            + self.prefixes.values().map(|l| l.len()).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, path: &str, priority: i64, methods: &[&str], hosts: &[&str]) -> RouteEntry {
        RouteEntry {
            id: id.into(),
            name: None,
            revision: 1,
            priority,
            paths: vec![path.to_string()],
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            hosts: hosts.iter().map(|h| HostPattern::parse(h)).collect(),
            remote_addrs: vec![],
            vars: None,
            plugins: vec![],
            resolved: Default::default(),
            owner: format!("route:{id}:1").into(),
            upstream: None,
            websocket: false,
            broken: None,
            traffic_record: Default::default(),
        }
    }

    fn find<'a>(r: &'a Router, method: &str, host: &str, path: &str) -> Option<&'a str> {
        let m: http::Method = method.parse().unwrap();
        let none = |_: &str| None;
        // Lower-cased, as the proxy gives it.
        let host = host.to_ascii_lowercase();
        let req = RequestView {
            method: &m,
            host: &host,
            path,
            remote: "127.0.0.1".parse().unwrap(),
            vars: &none,
        };
        r.find(&req).map(|e| e.id.as_str())
    }

    #[test]
    fn exact_then_longest_prefix_then_priority() {
        let routes = [
            route("1", "/a/*", 0, &[], &[]),
            route("2", "/a/b/*", 0, &[], &[]),
            route("3", "/a/b/c", 0, &[], &[]),
            route("4", "/a/b/c", 5, &["POST"], &[]),
            route("5", "/h", 0, &[], &["*.example.com"]),
            route("6", "/h", 0, &[], &["api.test"]),
        ]
        .map(Arc::new);
        let router = Router::new(&routes);
        assert_eq!(find(&router, "GET", "x", "/a/b/c"), Some("3"));
        assert_eq!(find(&router, "POST", "x", "/a/b/c"), Some("4"));
        assert_eq!(find(&router, "GET", "x", "/a/b/d"), Some("2"));
        assert_eq!(find(&router, "GET", "x", "/a/x"), Some("1"));
        assert_eq!(find(&router, "GET", "x", "/b"), None);
        assert_eq!(find(&router, "GET", "foo.example.com", "/h"), Some("5"));
        assert_eq!(find(&router, "GET", "example.com", "/h"), None);
        assert_eq!(find(&router, "GET", "API.test", "/h"), Some("6"));
        // A prefix is a byte prefix, not a segment: `/a/*` serves `/a/` and nothing shorter.
        assert_eq!(find(&router, "GET", "x", "/a/"), Some("1"));
        assert_eq!(find(&router, "GET", "x", "/a"), None);
        assert_eq!(find(&router, "GET", "x", "/a/bé"), Some("1"));
    }

    /// As APISIX's `radixtree_host_uri`: a host's routes before the routes without hosts,
    /// whatever their paths; the exact host before wildcards, the longer wildcard first; a
    /// host whose routes do not match the request falls back to the next.
    #[test]
    fn routes_with_hosts_come_first() {
        let routes = [
            route("host-any-path", "/*", 0, &[], &["api.test"]),
            route("exact-path", "/login", 0, &[], &[]),
            route("wild", "/*", 0, &[], &["*.test"]),
            route("wild-longer", "/w/*", 0, &[], &["*.b.test"]),
            route("host-post", "/p", 0, &["POST"], &["p.test"]),
            route("plain-p", "/p", 0, &[], &[]),
        ]
        .map(Arc::new);
        let router = Router::new(&routes);
        assert_eq!(
            find(&router, "GET", "api.test", "/login"),
            Some("host-any-path")
        );
        assert_eq!(
            find(&router, "GET", "other.org", "/login"),
            Some("exact-path")
        );
        assert_eq!(find(&router, "GET", "x.test", "/login"), Some("wild"));
        assert_eq!(
            find(&router, "GET", "a.b.test", "/w/1"),
            Some("wild-longer")
        );
        assert_eq!(find(&router, "GET", "a.b.test", "/v"), Some("wild"));
        // `*.test` wants something before its dot.
        assert_eq!(find(&router, "GET", "test", "/login"), Some("exact-path"));
        assert_eq!(find(&router, "POST", "p.test", "/p"), Some("host-post"));
        assert_eq!(find(&router, "GET", "p.test", "/p"), Some("wild"));
        // A patch that takes a host's last route out leaves the others as they were.
        let router = router.patch(&[routes[0].clone(), routes[2].clone()], &[]);
        assert_eq!(
            find(&router, "GET", "api.test", "/login"),
            Some("exact-path")
        );
        assert_eq!(find(&router, "GET", "p.test", "/p"), Some("plain-p"));
        assert_eq!(
            find(&router, "GET", "a.b.test", "/w/1"),
            Some("wild-longer")
        );
        assert_eq!(router.len(), 4);
    }

    /// With many prefixes of the same length, the one the path starts with serves, and a
    /// longer prefix whose only route does not match falls back to a shorter one.
    #[test]
    fn many_prefixes_and_fallback() {
        let mut routes: Vec<Arc<RouteEntry>> = (0..1000)
            .map(|i| {
                Arc::new(route(
                    &format!("p{i}"),
                    &format!("/api/r{i}/*"),
                    0,
                    &[],
                    &[],
                ))
            })
            .collect();
        routes.push(Arc::new(route(
            "post-only",
            "/api/r7/x/*",
            0,
            &["POST"],
            &[],
        )));
        let router = Router::new(&routes);
        assert_eq!(find(&router, "GET", "x", "/api/r999/q"), Some("p999"));
        assert_eq!(find(&router, "GET", "x", "/api/r7/x/y"), Some("p7"));
        assert_eq!(find(&router, "POST", "x", "/api/r7/x/y"), Some("post-only"));
        assert_eq!(find(&router, "GET", "x", "/api/r1000/q"), None);
    }

    /// Routes that tie on priority are ordered by id whatever order they come in, ids of
    /// equal number ("1", "01") included: every worker and every rebuild picks the same one.
    #[test]
    fn ties_are_ordered_by_id() {
        let make = |id: &str| Arc::new(route(id, "/x", 0, &[], &[]));
        let (a, b, c) = (make("01"), make("1"), make("a"));
        for routes in [[&a, &b, &c], [&c, &b, &a], [&b, &c, &a]] {
            let router = Router::new(routes);
            assert_eq!(find(&router, "GET", "h", "/x"), Some("01"));
        }
        let router = Router::new([&c]).patch(&[], &[b.clone(), a.clone()]);
        assert_eq!(find(&router, "GET", "h", "/x"), Some("01"));
    }

    /// Patching the index for a change finds what indexing the changed set afresh finds.
    #[test]
    fn patch_matches_a_rebuild() {
        // A small deterministic generator: the same cases on every run.
        let seed = std::cell::Cell::new(0x2545_f491_4f6c_dd1du64);
        let next = |n: u64| {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            x % n
        };
        let paths = [
            "/a", "/a/*", "/a/b/*", "/b", "/b/*", "/", "/*", "/c/d", "/c/*",
        ];
        let hosts: [&[&str]; 5] = [&[], &[], &["a.test"], &["*.test"], &["a.test", "*.x.test"]];
        let make = |id: usize| {
            let path = paths[next(paths.len() as u64) as usize];
            let methods: &[&str] = if next(3) == 0 { &["POST"] } else { &[] };
            let hosts = hosts[next(hosts.len() as u64) as usize];
            Arc::new(route(&id.to_string(), path, next(3) as i64, methods, hosts))
        };
        let mut live: Vec<Arc<RouteEntry>> = (0..40).map(make).collect();
        let mut router = Router::new(&live);
        let mut fresh_id = 40;
        for _ in 0..50 {
            // Up to three changes, each to a route the step has not touched yet, as one
            // configuration change brings them.
            let (mut removed, mut added) = (Vec::new(), Vec::new());
            let untouched = |live: &[Arc<RouteEntry>], added: &[Arc<RouteEntry>]| {
                let i = next(live.len().max(1) as u64) as usize;
                (i < live.len() && !added.iter().any(|a| Arc::ptr_eq(a, &live[i]))).then_some(i)
            };
            for _ in 0..3 {
                match next(3) {
                    0 => {
                        if let Some(i) = untouched(&live, &added) {
                            removed.push(live.remove(i));
                        }
                    }
                    1 => {
                        // An edit: the same id, a new entry.
                        if let Some(i) = untouched(&live, &added) {
                            let id: usize = live[i].id.parse().unwrap();
                            removed.push(std::mem::replace(&mut live[i], make(id)));
                            added.push(live[i].clone());
                        }
                    }
                    _ => {
                        fresh_id += 1;
                        live.push(make(fresh_id));
                        added.push(live.last().unwrap().clone());
                    }
                }
            }
            router = router.patch(&removed, &added);
            let rebuilt = Router::new(&live);
            assert_eq!(router.len(), rebuilt.len());
            assert_eq!(
                router.no_host.prefix_lengths,
                rebuilt.no_host.prefix_lengths
            );
            assert_eq!(router.suffix_lengths, rebuilt.suffix_lengths);
            for path in [
                "/a", "/a/", "/a/b/c", "/b", "/b/x", "/", "/x", "/c/d", "/c/e",
            ] {
                for (method, host) in [
                    ("GET", "h"),
                    ("POST", "h"),
                    ("GET", "a.test"),
                    ("POST", "b.test"),
                    ("GET", "q.x.test"),
                ] {
                    assert_eq!(
                        find(&router, method, host, path),
                        find(&rebuilt, method, host, path),
                        "{method} {host} {path}"
                    );
                }
            }
        }
    }
}
