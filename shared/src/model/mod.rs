//! Admin API objects — routes, services, upstreams, plugin configs, global rules, SSL
//! certificates — with APISIX 3.x shapes.
//!
//! [`validate`] turns a request body into a typed [`Object`] or an APISIX-style error message
//! (`invalid configuration: property "upstream.nodes" validation failed: …`). The master stores
//! the JSON text of validated objects; workers parse the same text back into these types, so both
//! sides read one definition.

pub mod checks;
mod common;
mod plugins;
mod route;
mod ssl;
mod upstream;
pub mod vars;

pub use common::{id_order, shown_id, valid_id, Id, Labels, Timeout};
pub use plugins::{check_plugins, PluginCatalog, PluginConf, Plugins};
pub use route::{GlobalRule, PluginConfig, Route, Service};
pub use ssl::{tls_version, valid_sni, MtlsSkip, Ssl, SslClient};
pub use upstream::{HashOn, LbType, Node, NodeAddr, Nodes, PassHost, Upstream, UpstreamTls};

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;

/// The kinds of object the Admin API manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Routes,
    Services,
    Upstreams,
    GlobalRules,
    Ssls,
    PluginConfigs,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Routes,
        Kind::Services,
        Kind::Upstreams,
        Kind::GlobalRules,
        Kind::Ssls,
        Kind::PluginConfigs,
    ];

    /// The path segment (`routes`, `global_rules`…), also the key segment in `/apisix/<kind>/<id>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Services => "services",
            Kind::Upstreams => "upstreams",
            Kind::GlobalRules => "global_rules",
            Kind::Ssls => "ssls",
            Kind::PluginConfigs => "plugin_configs",
        }
    }

    pub fn parse(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == segment)
    }

    /// The kind and id of a plugin context's object (`route:<id>`, `global_rule:<id>`), the
    /// key both the workers' statistics and the master's sums use.
    pub fn of_object(object: &str) -> Option<(Kind, &str)> {
        match object.split_once(':')? {
            ("route", id) => Some((Kind::Routes, id)),
            ("global_rule", id) => Some((Kind::GlobalRules, id)),
            _ => None,
        }
    }

    /// The singular noun used in messages (`route`, `global rule`).
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Routes => "route",
            Kind::Services => "service",
            Kind::Upstreams => "upstream",
            Kind::GlobalRules => "global rule",
            Kind::Ssls => "ssl",
            Kind::PluginConfigs => "plugin config",
        }
    }

    /// Whether the Admin API creates this kind with a generated id (`POST`). APISIX refuses
    /// it for plugin configs, whose id is required.
    pub fn takes_post(self) -> bool {
        self != Kind::PluginConfigs
    }
}

/// A validated object of any kind (short-lived: validation result, so its size is no concern).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    Route(Route),
    Service(Service),
    Upstream(Upstream),
    GlobalRule(GlobalRule),
    Ssl(Ssl),
    PluginConfig(PluginConfig),
}

impl Object {
    /// Other objects this one refers to (`upstream_id`, `service_id`, `plugin_config_id`),
    /// which must exist.
    pub fn references(&self) -> Vec<(Kind, String)> {
        let (up, svc, pc) = match self {
            Object::Route(r) => (
                r.upstream_id.as_ref(),
                r.service_id.as_ref(),
                r.plugin_config_id.as_ref(),
            ),
            Object::Service(s) => (s.upstream_id.as_ref(), None, None),
            _ => (None, None, None),
        };
        [
            (Kind::Upstreams, up),
            (Kind::Services, svc),
            (Kind::PluginConfigs, pc),
        ]
        .into_iter()
        .filter_map(|(kind, id)| Some((kind, id?.0.clone())))
        .collect()
    }
}

/// Validates a JSON body as an object of `kind`. `catalog` lists the plugins declared in
/// config.yaml. The error is the complete `error_msg` text.
pub fn validate(kind: Kind, body: &Value, catalog: &PluginCatalog) -> Result<Object, String> {
    if !body.is_object() {
        return Err("invalid configuration: the body must be a JSON object".into());
    }
    // Checked first, without recursion: deeper objects would overflow the stack of the
    // (recursive) checks below, and the store and the workers read objects back with
    // serde_json, which stops at 128 levels — an object it cannot read back must not be stored.
    if nesting_exceeds(body, MAX_NESTING) {
        return Err(format!(
            "invalid configuration: nested deeper than {MAX_NESTING} levels"
        ));
    }
    match kind {
        Kind::Routes => {
            let r: Route = typed(body)?;
            r.check(catalog)?;
            Ok(Object::Route(r))
        }
        Kind::Services => {
            let s: Service = typed(body)?;
            s.check(catalog)?;
            Ok(Object::Service(s))
        }
        Kind::Upstreams => {
            let u: Upstream = typed(body)?;
            u.check()
                .map_err(|e| format!("invalid configuration: {e}"))?;
            Ok(Object::Upstream(u))
        }
        Kind::GlobalRules => {
            let g: GlobalRule = typed(body)?;
            g.check(catalog)?;
            Ok(Object::GlobalRule(g))
        }
        Kind::Ssls => {
            let s: Ssl = typed(body).map_err(|e| unquoted(&e))?;
            s.check()?;
            Ok(Object::Ssl(s))
        }
        Kind::PluginConfigs => {
            let p: PluginConfig = typed(body)?;
            p.check(catalog)?;
            Ok(Object::PluginConfig(p))
        }
    }
}

/// `msg` without the value serde quotes in it (`invalid type: string "…", expected …`): in an
/// SSL object the value may be a private key, and refusals of objects read from etcd go to the
/// error log.
fn unquoted(msg: &str) -> String {
    match (msg.find("string \""), msg.rfind("\", expected")) {
        (Some(a), Some(b)) if b > a => format!("{}string{}", &msg[..a], &msg[b + 1..]),
        _ => msg.to_string(),
    }
}

/// Deepest nesting of objects and arrays accepted in an Admin API object (the store file adds one
/// level; serde_json, which reads it back, allows 128).
pub const MAX_NESTING: usize = 100;

/// Whether `v` nests objects/arrays more than `max` deep (iterative: any depth is safe).
fn nesting_exceeds(v: &Value, max: usize) -> bool {
    let mut stack = vec![(v, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(m) => Box::new(m.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if depth > max {
            return true;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    false
}

/// Deserializes with the failing field's path in the message.
fn typed<T: DeserializeOwned>(body: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let segments: Vec<Segment> = e.path().iter().cloned().collect();
        let path = shown_path(&segments);
        let inner = e.into_inner().to_string();
        if let Some(field) = unknown_field(&inner) {
            if let Some(why) = unsupported_apisix_field(field) {
                // APISIX has it: say that wasmgate does not, rather than what reads as a typo.
                return format!(
                    "invalid configuration: property \"{}\" is not supported by wasmgate ({why})",
                    match path.is_empty() {
                        true => field.to_string(),
                        false => path,
                    }
                );
            }
            // The path ends with the unknown field itself; name its parent like APISIX does.
            return match segments.split_last() {
                Some((_, parent)) if !parent.is_empty() => format!(
                    "invalid configuration: property \"{}\" validation failed: additional properties forbidden, found {field}",
                    shown_path(parent)
                ),
                _ => format!("invalid configuration: additional properties forbidden, found {field}"),
            };
        }
        if path.is_empty() {
            format!("invalid configuration: {inner}")
        } else {
            format!("invalid configuration: property \"{path}\" validation failed: {inner}")
        }
    })
}

/// Why wasmgate has no field APISIX has in its routes, services and upstreams.
fn unsupported_apisix_field(field: &str) -> Option<&'static str> {
    Some(match field {
        "filter_func" | "script" | "script_id" => "Lua: match with `vars`, act with wasm plugins",
        "discovery_type" | "service_name" | "discovery_args" => {
            "service discovery: list the nodes in `nodes`"
        }
        "service_protocol" => "gRPC and Dubbo upstreams",
        _ => return None,
    })
}

/// A field's path as `upstream.nodes`, `plugins[0]`, or `labels["a.b"]` for a key that is not
/// a plain name (a dot in a label's key would otherwise read as one more level).
fn shown_path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                let plain = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                match (plain, out.is_empty()) {
                    (true, true) => out.push_str(key),
                    (true, false) => out.push_str(&format!(".{key}")),
                    (false, _) => out.push_str(&format!("[{key:?}]")),
                }
            }
            Segment::Unknown => out.push_str("[?]"),
        }
    }
    out
}

/// Extracts `foo` from serde's "unknown field `foo`, expected …".
fn unknown_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> PluginCatalog {
        PluginCatalog::new(["wasm_log".to_string()])
    }

    #[test]
    fn a_refused_ssl_object_does_not_quote_its_values() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAsecret\n-----END PRIVATE KEY-----\n";
        let body = json!({"cert": "c", "key": "k", "snis": ["a.test"], "keys": key});
        let e = validate(Kind::Ssls, &body, &catalog()).unwrap_err();
        assert!(!e.contains("secret") && e.contains("\"keys\""), "{e}");
        assert!(e.contains("invalid type: string, expected"), "{e}");
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |levels: usize| {
            let mut conf = json!(1);
            for _ in 0..levels {
                conf = json!({ "a": conf });
            }
            // route object → plugins → wasm_log → conf: 3 levels above `conf`.
            json!({"uri": "/", "upstream_id": "1", "plugins": {"wasm_log": {"conf": conf}}})
        };
        assert!(validate(Kind::Routes, &nested(MAX_NESTING - 3), &catalog()).is_ok());
        let e = validate(Kind::Routes, &nested(MAX_NESTING - 2), &catalog()).unwrap_err();
        assert_eq!(e, "invalid configuration: nested deeper than 100 levels");
        // Far deeper than any recursive check could survive.
        let mut deep = json!(1);
        for _ in 0..200_000 {
            deep = Value::Array(vec![deep]);
        }
        assert!(nesting_exceeds(&deep, MAX_NESTING));
        std::mem::forget(deep); // dropping it recursively is not what this test is about
    }

    #[test]
    fn seed_route_is_valid() {
        let body = json!({
            "uri": "/index.html",
            "plugins": {"wasm_log": {"conf": "blahblah"}},
            "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1980": 1}}
        });
        assert!(validate(Kind::Routes, &body, &catalog()).is_ok());
    }

    /// APISIX's fields that wasmgate lacks are named as such, not as typos.
    #[test]
    fn apisix_fields_wasmgate_lacks_say_so() {
        let e = |body| validate(Kind::Routes, &body, &catalog()).unwrap_err();
        let msg = e(json!({"uri": "/", "upstream": {"nodes": {"a:1": 1}, "service_name": "a"}}));
        assert!(
            msg.starts_with(
                "invalid configuration: property \"upstream.service_name\" is not supported by wasmgate (service discovery"
            ),
            "{msg}"
        );
        // Health checks are taken, and checked.
        let msg = e(json!({"uri": "/", "upstream": {"nodes": {"a:1": 1}, "checks": {}}}));
        assert!(
            msg.contains("property \"upstream.checks.active\" validation failed: required"),
            "{msg}"
        );
        let msg = e(json!({"uri": "/", "upstream_id": "1", "colour": "red"}));
        assert!(
            msg.contains("additional properties forbidden, found colour"),
            "{msg}"
        );
    }

    #[test]
    fn errors_name_keys_with_dots_as_one_key() {
        let e = |body| validate(Kind::Routes, &body, &catalog()).unwrap_err();
        assert_eq!(
            e(json!({"uri": "/", "upstream_id": "1", "labels": {"a.b": 5}})),
            "invalid configuration: property \"labels[\"a.b\"]\" validation failed: invalid type: integer `5`, expected a string"
        );
        let e = e(json!({"uri": "/", "upstream_id": "1", "hosts": ["a", 5]}));
        assert!(
            e.starts_with("invalid configuration: property \"hosts[1]\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_top_level_field() {
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "upstream_id": "1", "foo": 1}),
            &catalog(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "invalid configuration: additional properties forbidden, found foo"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "upstream_id": "1", "methods": "GET"}),
            &catalog(),
        )
        .unwrap_err();
        assert!(e.contains("property \"methods\" validation failed"), "{e}");
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "upstream": {"nodes": {"127.0.0.1:80": "x"}}}),
            &catalog(),
        )
        .unwrap_err();
        assert!(e.contains("upstream.nodes"), "{e}");
    }

    #[test]
    fn nested_unknown_field() {
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "upstream": {"nodes": {"127.0.0.1:80": 1}, "bogus": 1}}),
            &catalog(),
        )
        .unwrap_err();
        assert!(
            e.contains("\"upstream\"") && e.contains("found bogus"),
            "{e}"
        );
    }

    #[test]
    fn unknown_plugin_and_conf_rules() {
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "plugins": {"nope": {"conf": "x"}}}),
            &catalog(),
        )
        .unwrap_err();
        assert_eq!(e, "unknown plugin [nope]");
        let e = validate(
            Kind::Routes,
            &json!({"uri": "/", "plugins": {"wasm_log": {}}}),
            &catalog(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "failed to check the configuration of plugin wasm_log err: property \"conf\" is required"
        );
        for bad in [json!(""), json!({}), json!(1), json!([])] {
            let e = validate(
                Kind::Routes,
                &json!({"uri": "/", "plugins": {"wasm_log": {"conf": bad}}}),
                &catalog(),
            )
            .unwrap_err();
            assert!(e.contains("property \"conf\" validation failed"), "{e}");
        }
        assert!(validate(
            Kind::Routes,
            &json!({"uri": "/", "plugins": {"wasm_log": {"conf": {"a": 1}}}}),
            &catalog()
        )
        .is_ok());
    }

    #[test]
    fn global_rule_needs_plugins() {
        assert!(validate(Kind::GlobalRules, &json!({}), &catalog()).is_err());
        assert!(validate(
            Kind::GlobalRules,
            &json!({"plugins": {"wasm_log": {"conf": "x"}}}),
            &catalog()
        )
        .is_ok());
    }
}
