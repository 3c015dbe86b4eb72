//! Upstreams: the nodes a route's requests go to and how they are chosen.

use super::common::{Id, Labels, Timeout};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Load-balancing algorithm (`type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbType {
    #[default]
    Roundrobin,
    Chash,
    LeastConn,
}

/// What `chash` hashes (`hash_on`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    #[default]
    Vars,
    Header,
    Cookie,
    Consumer,
    VarsCombinations,
}

/// How the upstream request's `Host` is set (`pass_host`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PassHost {
    /// The client's Host header.
    #[default]
    Pass,
    /// The chosen node's `host[:port]`.
    Node,
    /// `upstream_host`.
    Rewrite,
}

/// One node in list form.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub host: String,
    /// None: the scheme's port (443 for `https`, 80 otherwise), as APISIX fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

fn default_weight() -> u32 {
    1
}

/// `nodes`: `{"host:port": weight}` or `[{host, port, weight}]`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Nodes {
    Map(BTreeMap<String, u32>),
    List(Vec<Node>),
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::List(Vec::new())
    }
}

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Decide on the JSON shape first so the error says what was wrong inside it
        // (serde's untagged enums only say "did not match any variant").
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::Object(_) => {
                serde_json::from_value(v).map(Nodes::Map).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "nodes as a map of \"host:port\" to weight: {e}"
                    ))
                })
            }
            serde_json::Value::Array(_) => {
                serde_json::from_value(v).map(Nodes::List).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "nodes as a list of {{host, port, weight}}: {e}"
                    ))
                })
            }
            _ => Err(serde::de::Error::custom(
                "nodes must be a map of \"host:port\" to weight or a list of {host, port, weight}",
            )),
        }
    }
}

/// `keepalive_pool`: upstream connection reuse for this upstream.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeepalivePool {
    pub size: Option<u32>,
    pub idle_timeout: Option<f64>,
    pub requests: Option<u32>,
}

/// `tls`: the TLS side of an `https` upstream, as APISIX's upstream `tls` object.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Check the node's certificate: it must chain to a trusted CA
    /// (`apisix.ssl.ssl_trusted_certificate`) and name the host the request is sent for.
    /// Off by default, as in APISIX (nginx's `proxy_ssl_verify off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// A certificate (PEM, with its chain) the gateway shows nodes that ask for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// The private key of `client_cert` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// APISIX's reference to an SSL object: wasmgate has none (refused with what to do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_id: Option<serde_json::Value>,
}

/// The private key stays out of logs and panics.
impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("verify", &self.verify)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key.as_ref().map(|_| "(hidden)"))
            .field("client_cert_id", &self.client_cert_id)
            .finish()
    }
}

impl UpstreamTls {
    /// Whether the node's certificate is checked.
    pub fn verifies(&self) -> bool {
        self.verify == Some(true)
    }

    /// The client certificate's chain and key, parsed; `None` when there is none.
    pub fn client_identity(&self) -> Result<Option<crate::tls::Identity>, (&'static str, String)> {
        let (cert, key) = match (&self.client_cert, &self.client_key) {
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(("client_key", "required with client_cert".into())),
            (None, Some(_)) => return Err(("client_cert", "required with client_key".into())),
            (Some(c), Some(k)) => (c, k),
        };
        crate::tls::identity(cert, key)
            .map(Some)
            .map_err(|(half, why)| match half {
                crate::tls::Half::Cert => ("client_cert", why),
                crate::tls::Half::Key => {
                    ("client_key", why.replace("its certificate", "client_cert"))
                }
            })
    }
}

/// An upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(rename = "type", default)]
    pub lb: LbType,
    #[serde(default)]
    pub nodes: Nodes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Further nodes tried after a connect failure (default: number of nodes - 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Total time allowed for retries, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    #[serde(default)]
    pub pass_host: PassHost,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// How the nodes of an `https` upstream are spoken to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_pool: Option<KeepalivePool>,
    /// Health checks: nodes found unhealthy are left out while a healthy one remains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<super::checks::Checks>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// A node in normalized form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    /// APISIX's node `priority` (default 0): nodes of a lower priority serve only once every
    /// node of a higher one has been tried.
    pub priority: i64,
}

impl NodeAddr {
    /// `host:port`, with IPv6 hosts bracketed.
    pub fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Upstream {
    /// Whether its nodes are spoken to over TLS (`scheme: https`).
    pub fn is_https(&self) -> bool {
        self.scheme.as_deref() == Some("https")
    }

    /// Checks a standalone upstream object.
    pub fn check(&self) -> Result<(), String> {
        self.check_as("")
    }

    /// Checks, naming fields under `prefix` (`upstream` when embedded in a route).
    pub fn check_as(&self, prefix: &str) -> Result<(), String> {
        let field = |f: &str| {
            if prefix.is_empty() {
                f.to_string()
            } else {
                format!("{prefix}.{f}")
            }
        };
        let bad =
            |f: &str, why: String| format!("property \"{}\" validation failed: {why}", field(f));
        self.normalized_nodes().map_err(|e| bad("nodes", e))?;
        if let Some(t) = &self.timeout {
            t.check(&field("timeout"))?;
        }
        if let Some(s) = &self.scheme {
            let why = match s.as_str() {
                "http" | "https" => None,
                "grpc" | "grpcs" => Some("gRPC upstreams are not supported"),
                "tcp" | "tls" | "udp" => Some("wasmgate proxies HTTP, not TCP or UDP streams"),
                "kafka" => Some("Kafka upstreams are not supported"),
                _ => Some("unknown scheme"),
            };
            if let Some(why) = why {
                return Err(bad(
                    "scheme",
                    format!("{s:?}: {why} (expected \"http\" or \"https\")"),
                ));
            }
        }
        if let Some(checks) = &self.checks {
            checks.check(&field("checks"))?;
        }
        if let Some(tls) = &self.tls {
            if tls.client_cert_id.is_some() {
                return Err(bad(
                    "tls.client_cert_id",
                    "not supported: SSL objects of type client are not supported; put the certificate and its \
                     key in tls.client_cert and tls.client_key"
                        .into(),
                ));
            }
            tls.client_identity()
                .map_err(|(f, why)| bad(&format!("tls.{f}"), why))?;
        }
        if self.pass_host == PassHost::Rewrite
            && self.upstream_host.as_deref().is_none_or(str::is_empty)
        {
            return Err(bad(
                "upstream_host",
                "required when pass_host is \"rewrite\"".into(),
            ));
        }
        if let Some(h) = &self.upstream_host {
            if h.bytes()
                .any(|b| b.is_ascii_control() || b == b' ' || b == b'/')
                || h.len() > 253
            {
                return Err(bad("upstream_host", format!("invalid host {h:?}")));
            }
        }
        if self.lb == LbType::Chash {
            let on = self.hash_on.unwrap_or_default();
            match (&self.key, on) {
                (_, HashOn::Consumer) => {}
                (None, _) => return Err(bad("key", "required when type is \"chash\"".into())),
                (Some(k), _) if k.is_empty() => return Err(bad("key", "must not be empty".into())),
                _ => {}
            }
        }
        if let Some(r) = self.retry_timeout {
            if !(0.0..=86_400.0).contains(&r) {
                return Err(bad(
                    "retry_timeout",
                    format!("expected seconds in [0, 86400], got {r}"),
                ));
            }
        }
        Ok(())
    }

    /// The port of a node written without one: the scheme's, as APISIX's `fill_node_info`.
    pub fn default_port(&self) -> u16 {
        match self.scheme.as_deref() {
            Some("https" | "grpcs") => 443,
            _ => 80,
        }
    }

    /// Nodes as a list of `host`, `port`, `weight`, in a stable order.
    pub fn normalized_nodes(&self) -> Result<Vec<NodeAddr>, String> {
        let mut out = Vec::new();
        let default_port = self.default_port();
        match &self.nodes {
            Nodes::Map(map) => {
                for (k, w) in map {
                    let (host, port) = split_host_port(k, default_port).ok_or_else(|| {
                        format!("invalid node address {k:?} (expected host:port)")
                    })?;
                    out.push(NodeAddr {
                        host,
                        port,
                        weight: *w,
                        priority: 0,
                    });
                }
            }
            Nodes::List(list) => {
                for n in list {
                    let host = list_node_host(&n.host)
                        .ok_or_else(|| format!("invalid node host {:?}", n.host))?;
                    if n.port == Some(0) {
                        return Err(format!("invalid port 0 for node {:?}", n.host));
                    }
                    out.push(NodeAddr {
                        host: host.to_string(),
                        port: n.port.unwrap_or(default_port),
                        weight: n.weight,
                        priority: n.priority.unwrap_or(0),
                    });
                }
            }
        }
        if out.len() > 4096 {
            return Err("at most 4096 nodes".into());
        }
        Ok(out)
    }
}

/// A host name or an IPv4 address: 1 to 253 bytes of `a-z A-Z 0-9 - . _`.
fn valid_node_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The `host` of a list-form node: a name, an IPv4 address, or an IPv6 address with or without
/// brackets. Returns it without brackets; anything else (a ':' or a bracket outside an IPv6
/// address, which no connection could use) is None.
fn list_node_host(h: &str) -> Option<&str> {
    let bracketed = h.starts_with('[');
    let inner = if bracketed {
        h.strip_prefix('[')?.strip_suffix(']')?
    } else {
        h
    };
    if bracketed || inner.contains(':') {
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(inner);
    }
    valid_node_name(inner).then_some(inner)
}

/// Splits `host:port`, `[v6]:port` or a bare host (`default_port`, the scheme's).
fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok().filter(|p| *p != 0)?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok().filter(|p| *p != 0)?),
        Some(_) => return None, // a bare IPv6 address must be bracketed when it has a port
        None => (s, default_port),
    };
    if !valid_node_name(host) {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn up(v: serde_json::Value) -> Upstream {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn node_forms_normalize() {
        let a = up(json!({"nodes": {"127.0.0.1:1980": 2, "[::1]:81": 1, "example.com": 1}}));
        let n = a.normalized_nodes().unwrap();
        assert!(n.contains(&NodeAddr {
            host: "127.0.0.1".into(),
            port: 1980,
            weight: 2,
            priority: 0
        }));
        assert!(n.contains(&NodeAddr {
            host: "::1".into(),
            port: 81,
            weight: 1,
            priority: 0
        }));
        assert!(n.contains(&NodeAddr {
            host: "example.com".into(),
            port: 80,
            weight: 1,
            priority: 0
        }));
        let b = up(json!({"nodes": [{"host": "10.0.0.1", "port": 8080, "weight": 5}]}));
        assert_eq!(
            b.normalized_nodes().unwrap()[0].authority(),
            "10.0.0.1:8080"
        );
    }

    /// A node written without a port gets its scheme's, in both forms, and a list node read
    /// back is as it was written (no port filled in).
    #[test]
    fn a_node_without_a_port_gets_its_schemes() {
        let tls = up(json!({"scheme": "https", "nodes": {"api.example.com": 1, "[::1]": 1}}));
        let ports: Vec<u16> = tls
            .normalized_nodes()
            .unwrap()
            .iter()
            .map(|n| n.port)
            .collect();
        assert_eq!(ports, [443, 443]);
        let list = json!({"scheme": "https", "nodes": [{"host": "api.example.com", "weight": 1}]});
        let tls = up(list.clone());
        assert_eq!(
            tls.normalized_nodes().unwrap()[0].authority(),
            "api.example.com:443"
        );
        assert_eq!(serde_json::to_value(&tls).unwrap()["nodes"], list["nodes"]);
        let plain = up(json!({"nodes": [{"host": "api.example.com", "weight": 1}]}));
        assert_eq!(
            plain.normalized_nodes().unwrap()[0].authority(),
            "api.example.com:80"
        );
    }

    #[test]
    fn bad_nodes_are_refused() {
        for bad in ["127.0.0.1:0", "127.0.0.1:99999", "a b:80", "::1:80", ""] {
            let u = up(json!({"nodes": {bad: 1}}));
            assert!(u.check().is_err(), "{bad} accepted");
        }
        assert!(serde_json::from_value::<Upstream>(json!({"nodes": "x"})).is_err());
    }

    /// Found by the admin_objects fuzz target: list-form hosts such as "12[.0.0.1" or "a:b"
    /// were accepted, and the map form took "a[b:80"; no connection can use them.
    #[test]
    fn node_hosts_are_names_or_ip_addresses() {
        for bad in [
            "12[.0.0.1",
            "a:b",
            "[a]",
            "[::1",
            "::1]",
            "[1.2.3.4]",
            "a]",
            "[]",
            ":",
        ] {
            let u = up(json!({"nodes": [{"host": bad, "port": 80}]}));
            assert!(u.check().is_err(), "list form accepted {bad:?}");
        }
        for bad in ["a[b:80", "a]:80", "[a]:80", "[]:80"] {
            let u = up(json!({"nodes": {bad: 1}}));
            assert!(u.check().is_err(), "map form accepted {bad:?}");
        }
        for (host, want) in [
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("2001:db8::7", "2001:db8::7"),
            ("10.0.0.1", "10.0.0.1"),
            ("backend_1.internal", "backend_1.internal"),
        ] {
            let u = up(json!({"nodes": [{"host": host, "port": 81}]}));
            let n = u.normalized_nodes().unwrap();
            assert_eq!(n[0].host, want, "{host}");
        }
    }

    #[test]
    fn chash_needs_key_and_rewrite_needs_host() {
        assert!(up(json!({"type": "chash", "nodes": {"a:1": 1}}))
            .check()
            .is_err());
        assert!(
            up(json!({"type": "chash", "key": "remote_addr", "nodes": {"a:1": 1}}))
                .check()
                .is_ok()
        );
        assert!(up(json!({"pass_host": "rewrite", "nodes": {"a:1": 1}}))
            .check()
            .is_err());
    }
}
