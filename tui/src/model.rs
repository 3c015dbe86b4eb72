//! What the Admin API answers, parsed leniently: every field the console shows is optional, so a
//! gateway that does not report something yet (an older version, an endpoint being added) shows
//! "-" instead of failing.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A route from `GET /apisix/admin/routes`: its id and its JSON as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub id: String,
    pub value: Value,
    /// The store's `modifiedIndex` of the route: a save over a route changed since it was
    /// opened asks first.
    pub revision: Option<u64>,
}

/// Strings of a field that is either a string or an array of strings (`uri`/`uris`, …).
fn strings(v: &Value, one: &str, many: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = v.get(one).and_then(Value::as_str) {
        out.push(s.to_string());
    }
    if let Some(a) = v.get(many).and_then(Value::as_array) {
        out.extend(a.iter().map(scalar));
    }
    out
}

/// A JSON scalar as text (strings without quotes).
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Route {
    /// `uri` or `uris`.
    pub fn uris(&self) -> Vec<String> {
        strings(&self.value, "uri", "uris")
    }

    /// `host` or `hosts`.
    pub fn hosts(&self) -> Vec<String> {
        strings(&self.value, "host", "hosts")
    }

    pub fn methods(&self) -> Vec<String> {
        strings(&self.value, "", "methods")
    }

    /// Names of the route's plugins, sorted.
    pub fn plugins(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .value
            .get("plugins")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Where requests go: the inline upstream's nodes, `upstream_id`, or the service.
    pub fn upstream(&self) -> String {
        if let Some(id) = self.value.get("upstream_id") {
            return format!("upstream {}", scalar(id));
        }
        if let Some(u) = self.value.get("upstream") {
            let nodes = nodes(u);
            if !nodes.is_empty() {
                return nodes.join(",");
            }
        }
        if let Some(id) = self.value.get("service_id") {
            return format!("service {}", scalar(id));
        }
        "-".to_string()
    }

    /// The key its upstream's health is kept under (`/apisix/upstreams/1`, its own
    /// `/apisix/routes/ID`, or its service's), given its service.
    pub fn upstream_key(&self, service: Option<&Route>) -> Option<String> {
        (self.own_upstream_key("routes")).or_else(|| service?.own_upstream_key("services"))
    }

    /// The key of the upstream this object (a route, or a service: `kind`) names itself: its
    /// `upstream_id`'s, or its own for one written inside it.
    pub fn own_upstream_key(&self, kind: &str) -> Option<String> {
        if let Some(id) = self.id_field("upstream_id") {
            return Some(format!("/apisix/upstreams/{id}"));
        }
        (self.value.get("upstream")).map(|_| format!("/apisix/{kind}/{}", self.id))
    }

    /// `plugin_config_id`: the plugin config whose plugins the route takes.
    pub fn plugin_config_id(&self) -> Option<String> {
        self.id_field("plugin_config_id")
    }

    /// An id field's value; None when absent or `null` (stored as written, meaning none).
    fn id_field(&self, field: &str) -> Option<String> {
        self.value.get(field).filter(|v| !v.is_null()).map(scalar)
    }

    /// `service_id`: the service whose hosts, plugins and upstream the route takes.
    pub fn service_id(&self) -> Option<String> {
        self.id_field("service_id")
    }

    /// `status` 1 (the default) or 0.
    pub fn enabled(&self) -> bool {
        self.value.get("status").and_then(Value::as_i64) != Some(0)
    }

    pub fn name(&self) -> Option<&str> {
        self.value.get("name").and_then(Value::as_str)
    }

    /// Whether the route's id, name, description, uris, hosts, plugins or upstream contain
    /// `needle` (lower case), ignoring case: what the Routes filter (`/`) looks at.
    pub fn matches(&self, needle: &str) -> bool {
        let has = |s: &str| s.to_lowercase().contains(needle);
        let desc = self.value.get("desc").and_then(Value::as_str);
        has(&self.id)
            || self.name().is_some_and(has)
            || desc.is_some_and(has)
            || self.uris().iter().any(|u| has(u))
            || self.hosts().iter().any(|h| has(h))
            || self.plugins().iter().any(|p| has(p))
            || has(&self.upstream())
    }

    /// The JSON to edit: the stored value without the fields the gateway manages (`id`, which
    /// the editor shows apart, and the timestamps), pretty-printed.
    pub fn editable_json(&self) -> String {
        let mut v = self.value.clone();
        if let Some(m) = v.as_object_mut() {
            for k in ["id", "create_time", "update_time"] {
                m.remove(k);
            }
        }
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
    }
}

/// An upstream's nodes as `host:port`, in either form (`{"host:port": w}` or `[{host, port}]`).
pub fn nodes(u: &Value) -> Vec<String> {
    weighted_nodes(u).into_iter().map(|(n, _)| n).collect()
}

/// An upstream's nodes as `host:port` with their weights.
pub fn weighted_nodes(u: &Value) -> Vec<(String, String)> {
    let weight = |w: Option<&Value>| w.map(scalar).unwrap_or_else(|| "-".into());
    match u.get("nodes") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, w)| (k.clone(), weight(Some(w))))
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|n| {
                let host = n.get("host").map(scalar).unwrap_or_default();
                let addr = match n.get("port") {
                    Some(p) => format!("{host}:{}", scalar(p)),
                    None => host,
                };
                (addr, weight(n.get("weight")))
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub use wasmgate_shared::model::id_order;

/// Parses `{"total":N,"list":[{"key","value",…}]}` (an empty `list` may be `{}`, as APISIX
/// writes it).
pub fn parse_routes(v: &Value) -> Result<Vec<Route>, String> {
    let list = match v.get("list") {
        Some(Value::Array(a)) => a.as_slice(),
        Some(Value::Object(o)) if o.is_empty() => &[],
        _ => return Err("no \"list\" in the answer".into()),
    };
    let mut routes: Vec<Route> = list
        .iter()
        .filter_map(|item| {
            let value = item.get("value")?.clone();
            let id = value.get("id").map(scalar).or_else(|| {
                item.get("key")
                    .and_then(Value::as_str)
                    .and_then(|k| k.rsplit('/').next())
                    .map(str::to_string)
            })?;
            let revision = item.get("modifiedIndex").and_then(Value::as_u64);
            Some(Route {
                id,
                value,
                revision,
            })
        })
        .collect();
    routes.sort_by(|a, b| id_order(&a.id, &b.id));
    Ok(routes)
}

/// Accepts a string or a number (ids are either).
fn de_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?.and_then(|v| match v {
        Value::Null => None,
        other => Some(scalar(&other)),
    }))
}

/// Accepts null or a missing field as an empty list.
fn de_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// One entry of `GET /wasmgate/plugins`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PluginInfo {
    pub name: String,
    pub priority: Option<i64>,
    pub phase: Option<String>,
    pub file: Option<String>,
    pub fail_open: Option<bool>,
    #[serde(deserialize_with = "de_list")]
    pub instances: Vec<PluginInstance>,
}

impl PluginInfo {
    /// Memory of all its instances, when every instance reports it.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.instances.iter().map(|i| i.memory_bytes).sum()
    }
}

/// A plugin's VM in one worker.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PluginInstance {
    pub worker_id: Option<u64>,
    pub slot: Option<u64>,
    pub memory_bytes: Option<u64>,
}

/// `GET /wasmgate/plugins`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Plugins {
    #[serde(deserialize_with = "de_list")]
    pub plugins: Vec<PluginInfo>,
}

/// `GET /wasmgate/healthcheck`: the upstreams with health checks, by key
/// (`/apisix/upstreams/1`), with each node's state.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "Vec<CheckedUpstream>")]
pub struct Health {
    by_key: std::collections::BTreeMap<String, Checked>,
}

/// One checked upstream: its probe type and its nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checked {
    pub kind: String,
    pub nodes: Vec<NodeHealth>,
}

/// One node of a checked upstream.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NodeHealth {
    pub ip: String,
    pub port: u64,
    pub status: String,
    pub counter: NodeCounter,
}

/// The counts toward a change of state, as lua-resty-healthcheck keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NodeCounter {
    pub success: u64,
    pub http_failure: u64,
    pub tcp_failure: u64,
    pub timeout_failure: u64,
}

impl NodeHealth {
    pub fn healthy(&self) -> bool {
        self.status == "healthy"
    }

    /// `host:port`, as an upstream's `nodes` name it (`[::1]:80` for an IPv6 address).
    pub fn addr(&self) -> String {
        match self.ip.contains(':') && !self.ip.starts_with('[') {
            true => format!("[{}]:{}", self.ip, self.port),
            false => format!("{}:{}", self.ip, self.port),
        }
    }
}

/// One entry of [`Health`] as answered.
#[derive(Deserialize, Default)]
#[serde(default)]
struct CheckedUpstream {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(deserialize_with = "de_list")]
    nodes: Vec<NodeHealth>,
}

impl From<Vec<CheckedUpstream>> for Health {
    fn from(list: Vec<CheckedUpstream>) -> Health {
        let by_key = (list.into_iter())
            .map(|u| {
                let checked = Checked {
                    kind: u.kind,
                    nodes: u.nodes,
                };
                (u.name, checked)
            })
            .collect();
        Health { by_key }
    }
}

impl Health {
    /// Healthy nodes and all nodes of the upstream `key`, when it is checked.
    pub fn of(&self, key: &str) -> Option<(usize, usize)> {
        let c = self.by_key.get(key)?;
        let healthy = c.nodes.iter().filter(|n| n.healthy()).count();
        Some((healthy, c.nodes.len()))
    }

    /// The upstream `key`'s probe type and nodes, when it is checked.
    pub fn checked(&self, key: &str) -> Option<&Checked> {
        self.by_key.get(key)
    }

    /// Every checked upstream, by key.
    pub fn all(&self) -> impl Iterator<Item = (&str, &Checked)> {
        self.by_key.iter().map(|(k, c)| (k.as_str(), c))
    }

    /// Whether no upstream has health checks.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// `GET /wasmgate/traffic`: each route's requests by status class.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "TrafficAnswer")]
pub struct Traffic {
    pub routes: Vec<RouteTraffic>,
    /// Where each route is in `routes`: looked up for every row, of thousands.
    by_route: std::collections::HashMap<String, usize>,
}

/// [`Traffic`] as answered.
#[derive(Deserialize, Default)]
#[serde(default)]
struct TrafficAnswer {
    #[serde(deserialize_with = "de_list")]
    routes: Vec<RouteTraffic>,
}

impl From<TrafficAnswer> for Traffic {
    fn from(a: TrafficAnswer) -> Traffic {
        let by_route = a
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.route.clone()?, i)))
            .collect();
        Traffic {
            routes: a.routes,
            by_route,
        }
    }
}

/// One route's traffic, summed over the workers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RouteTraffic {
    #[serde(deserialize_with = "de_opt_string")]
    pub route: Option<String>,
    pub requests: Option<u64>,
    #[serde(rename = "4xx")]
    pub client_errors: Option<u64>,
    #[serde(rename = "5xx")]
    pub server_errors: Option<u64>,
}

impl Traffic {
    /// The traffic of route `id`.
    pub fn of(&self, id: &str) -> Option<&RouteTraffic> {
        self.routes.get(*self.by_route.get(id)?)
    }
}

/// `GET /wasmgate/stats`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub generation: Option<u64>,
    #[serde(deserialize_with = "de_list")]
    pub contexts: Vec<StatContext>,
}

/// Counters of one plugin on one route, service or global rule, summed over workers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StatContext {
    pub plugin: String,
    #[serde(deserialize_with = "de_opt_string")]
    pub owner_kind: Option<String>,
    #[serde(deserialize_with = "de_opt_string")]
    pub owner_id: Option<String>,
    pub requests: Option<u64>,
    pub local_replies: Option<u64>,
    pub errors: Option<u64>,
    pub traps: Option<u64>,
    pub timeouts: Option<u64>,
    pub memory_hits: Option<u64>,
    pub configures: Option<u64>,
    pub time_us: Option<u64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    #[serde(deserialize_with = "de_list")]
    pub workers: Vec<WorkerRequests>,
}

/// Which context a row of the stats table is: plugin, owner kind, owner id.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContextKey {
    pub plugin: String,
    pub owner_kind: String,
    pub owner_id: String,
}

impl StatContext {
    pub fn key(&self) -> ContextKey {
        ContextKey {
            plugin: self.plugin.clone(),
            owner_kind: self.owner_kind.clone().unwrap_or_default(),
            owner_id: self.owner_id.clone().unwrap_or_default(),
        }
    }
}

impl ContextKey {
    /// `route 1`, `global_rule g1`, `service s`.
    pub fn owner(&self) -> String {
        match (self.owner_kind.as_str(), self.owner_id.as_str()) {
            ("", "") => "-".into(),
            ("", id) => id.into(),
            (kind, "") => kind.into(),
            (kind, id) => format!("{kind} {id}"),
        }
    }
}

/// A context's requests in one worker.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct WorkerRequests {
    pub worker_id: Option<u64>,
    pub requests: Option<u64>,
}

/// `GET /wasmgate/status`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GatewayStatus {
    pub master: MasterInfo,
    #[serde(deserialize_with = "de_list")]
    pub workers: Vec<WorkerInfo>,
    /// Where the objects live (absent from gateways that do not report it).
    pub store: Option<StoreInfo>,
}

/// `store` of `GET /wasmgate/status`: the data directory, or etcd.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StoreInfo {
    /// `local` or `etcd`.
    pub kind: Option<String>,
    pub revision: Option<u64>,
    pub prefix: Option<String>,
    #[serde(deserialize_with = "de_list")]
    pub endpoints: Vec<String>,
    pub reachable: Option<bool>,
    /// Why etcd is not serving the node, while it is not.
    pub error: Option<String>,
}

impl StoreInfo {
    /// Whether the gateway serves without its etcd.
    pub fn etcd_away(&self) -> bool {
        self.kind.as_deref() == Some("etcd") && self.reachable == Some(false)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MasterInfo {
    pub pid: Option<u64>,
    pub version: Option<String>,
    pub uptime_s: Option<u64>,
    pub epoch: Option<u64>,
    pub generation: Option<u64>,
    pub config: Option<String>,
    /// Requests since the master started, workers replaced by reloads included.
    pub requests: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct WorkerInfo {
    pub worker_id: Option<u64>,
    pub slot: Option<u64>,
    pub pid: Option<u64>,
    pub state: Option<String>,
    pub epoch: Option<u64>,
    pub uptime_s: Option<u64>,
    pub restarts: Option<u64>,
    pub generation_seen: Option<u64>,
    pub requests: Option<u64>,
    pub active_connections: Option<u64>,
    pub plugin_faults: Option<u64>,
    pub rss_bytes: Option<u64>,
}

/// `GET /wasmgate/log?lines=N`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LogTail {
    pub path: Option<String>,
    #[serde(deserialize_with = "de_list")]
    pub lines: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_are_parsed_and_sorted_by_id() {
        let v = json!({"total": 3, "list": [
            {"key": "/apisix/routes/10", "value": {"id": "10", "uri": "/b", "status": 0,
              "upstream_id": "u1"}},
            {"key": "/apisix/routes/web", "value": {"uris": ["/x", "/y*"], "hosts": ["a.com"],
              "methods": ["GET", "POST"], "service_id": 7}},
            {"key": "/apisix/routes/2", "value": {"id": 2, "uri": "/a",
              "plugins": {"b": {"conf": "x"}, "a": {"conf": "y"}},
              "upstream": {"nodes": [{"host": "10.0.0.1", "port": 80, "weight": 1}]}}},
        ]});
        let r = parse_routes(&v).unwrap();
        let ids: Vec<_> = r.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["2", "10", "web"]);
        assert_eq!(r[0].plugins(), ["a", "b"]);
        assert_eq!(r[0].upstream(), "10.0.0.1:80");
        assert!(r[0].enabled());
        assert!(!r[1].enabled());
        assert_eq!(r[1].upstream(), "upstream u1");
        assert_eq!(r[2].uris(), ["/x", "/y*"]);
        assert_eq!(r[2].methods(), ["GET", "POST"]);
        assert_eq!(r[2].upstream(), "service 7");
        assert_eq!(
            parse_routes(&json!({"total": 0, "list": {}})).unwrap(),
            vec![]
        );
        assert!(parse_routes(&json!({"error_msg": "x"})).is_err());
    }

    #[test]
    fn editable_json_leaves_out_managed_fields() {
        let r = Route {
            id: "1".into(),
            value: json!({"id": "1", "uri": "/", "create_time": 1, "update_time": 2}),
            revision: None,
        };
        assert_eq!(r.editable_json(), "{\n  \"uri\": \"/\"\n}");
    }

    #[test]
    fn missing_and_odd_fields_are_tolerated() {
        let s: Stats = serde_json::from_value(json!({"contexts": [
            {"plugin": "echo", "owner_kind": "route", "owner_id": 1, "requests": 5, "p50_us": 12},
            {"plugin": "x", "workers": null},
        ]}))
        .unwrap();
        assert_eq!(s.contexts[0].owner_id.as_deref(), Some("1"));
        assert_eq!(s.contexts[0].p50_us, Some(12.0));
        assert_eq!(s.contexts[1].requests, None);
        assert_eq!(s.contexts[1].key().owner(), "-");
        let st: GatewayStatus = serde_json::from_value(json!({"workers": [{"pid": 3}]})).unwrap();
        assert_eq!(st.workers[0].rss_bytes, None);
        assert_eq!(st.master.epoch, None);
    }
}
