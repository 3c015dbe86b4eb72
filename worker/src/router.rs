//! The router: from (method, host, path, client address, variables) to a route.
//!
//! Matching order, as APISIX's radixtree router: an exact `uri` first, then prefixes (`/api/*`)
//! from the longest; among routes on the same path, higher `priority` first, then the lower id
//! (stable). A route matches when its methods, hosts, client addresses and `vars` all match.

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
    /// `route:<id>:<revision>`: what its PluginContexts are keyed by (made once, not per request).
    pub owner: Arc<str>,
    pub upstream: Option<Arc<UpstreamRuntime>>,
    /// `enable_websocket` (the route's, else its service's): an `Upgrade` request is passed
    /// to the upstream and, once it answers 101, the connection becomes a tunnel.
    pub websocket: bool,
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
                    owner: "unmatched".into(),
                    upstream: None,
                    websocket: false,
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

/// All enabled routes, indexed by path.
///
/// Prefixes are found by hashing the request path's leading bytes at each length some prefix
/// has, longest first: a lookup costs one hash probe per distinct prefix length (a handful),
/// not one comparison per route — with 10,000 prefix routes a scan took up to 28 µs.
///
/// Keys and lists are shared (`Arc`), so a configuration change that touches a few routes
/// copies the index cheaply and patches it ([`Router::patch`]) instead of indexing every route
/// again.
#[derive(Debug, Default, Clone)]
pub struct Router {
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
        let mut router = Router {
            exact,
            prefixes,
            prefix_lengths: Vec::new(),
        };
        for len in router.prefixes.keys().map(|k| k.len()).collect::<Vec<_>>() {
            router.count_length(len, true);
        }
        router
    }

    /// Every route indexed (a route on several paths comes once per path).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteEntry>> + '_ {
        self.exact
            .values()
            .chain(self.prefixes.values())
            .flat_map(|list| list.iter())
    }

    /// This index with `removed` routes taken out and `added` ones put in: what
    /// `Router::new` would build from the routes after the change. Each path the change
    /// touches gets its list made once; the rest is shared with `self`.
    pub fn patch(&self, removed: &[Arc<RouteEntry>], added: &[Arc<RouteEntry>]) -> Router {
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
                    next.count_length(key.len(), false);
                }
                continue;
            }
            order(&mut list);
            let key = match old {
                Some((k, _)) => k,
                None => {
                    if prefix {
                        next.count_length(key.len(), true);
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

    /// One prefix key of length `len` more (`added`) or fewer.
    fn count_length(&mut self, len: usize, added: bool) {
        let lengths = &mut self.prefix_lengths;
        // Longest first: the position of `len` in a descending list.
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

    /// The route serving `req`, if any.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Arc<RouteEntry>> {
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

    pub fn len(&self) -> usize {
        self.exact.values().map(|l| l.len()).sum::<usize>()
            + self.prefixes.values().map(|l| l.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            owner: format!("route:{id}:1").into(),
            upstream: None,
            websocket: false,
            traffic_record: Default::default(),
        }
    }

    fn find<'a>(r: &'a Router, method: &str, host: &str, path: &str) -> Option<&'a str> {
        let m: http::Method = method.parse().unwrap();
        let none = |_: &str| None;
        let req = RequestView {
            method: &m,
            host,
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
        let make = |id: usize| {
            let path = paths[next(paths.len() as u64) as usize];
            let methods: &[&str] = if next(3) == 0 { &["POST"] } else { &[] };
            Arc::new(route(&id.to_string(), path, next(3) as i64, methods, &[]))
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
            assert_eq!(router.prefix_lengths, rebuilt.prefix_lengths);
            for path in [
                "/a", "/a/", "/a/b/c", "/b", "/b/x", "/", "/x", "/c/d", "/c/e",
            ] {
                for method in ["GET", "POST"] {
                    assert_eq!(
                        find(&router, method, "h", path),
                        find(&rebuilt, method, "h", path),
                        "{method} {path}"
                    );
                }
            }
        }
    }
}
