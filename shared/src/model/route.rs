//! Routes, services, plugin configs and global rules.

use super::common::{Id, Labels, Timeout};
use super::plugins::{check_plugins, PluginCatalog, Plugins};
use super::upstream::Upstream;
use super::vars::{parse_cidr, VarsExpr};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The HTTP methods a route may list (APISIX's enum).
pub const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

/// A route: what requests it matches, which plugins run, where they go.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Exact path, or a prefix when it ends with `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uris: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// A host name, or `*.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addrs: Option<Vec<String>>,
    /// lua-resty-expr style conditions, e.g. `[["arg_name", "==", "json"]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vars: Option<Value>,
    /// Among routes matching the same path, higher first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Plugins>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<Id>,
    /// A plugin config whose plugins the route runs, under its own (a plugin the route names
    /// itself keeps the route's configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config_id: Option<Id>,
    /// 1 enabled (default), 0 disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> String {
    format!("invalid configuration: property \"{field}\" validation failed: {why}")
}

impl Route {
    /// Semantic checks beyond the types; the error is the complete `error_msg`.
    pub fn check(&self, catalog: &PluginCatalog) -> Result<(), String> {
        match (&self.uri, &self.uris) {
            (Some(_), Some(_)) => return Err("only one of uri or uris is allowed".into()),
            (None, None) => {
                return Err(
                    "invalid configuration: property \"uri\" is required (or \"uris\")".into(),
                )
            }
            (Some(u), None) => check_uri("uri", u)?,
            (None, Some(list)) => {
                if list.is_empty() {
                    return Err(invalid("uris", "expect array to have at least 1 items"));
                }
                for (i, u) in list.iter().enumerate() {
                    check_uri(&format!("uris[{i}]"), u)?;
                }
            }
        }
        if let Some(methods) = &self.methods {
            for (i, m) in methods.iter().enumerate() {
                if !METHODS.contains(&m.as_str()) {
                    return Err(invalid(
                        &format!("methods[{i}]"),
                        format!("{m:?} is not one of {}", METHODS.join(", ")),
                    ));
                }
            }
        }
        check_hosts(&self.host, &self.hosts)?;
        check_remote_addrs(&self.remote_addr, &self.remote_addrs)?;
        if let Some(vars) = &self.vars {
            VarsExpr::compile(vars).map_err(|e| format!("invalid configuration: {e}"))?;
        }
        if let Some(s) = self.status {
            if s > 1 {
                return Err(invalid("status", "must be 0 (disabled) or 1 (enabled)"));
            }
        }
        check_text("name", &self.name)?;
        check_text("desc", &self.desc)?;
        if let Some(t) = &self.timeout {
            t.check("timeout")
                .map_err(|e| format!("invalid configuration: {e}"))?;
        }
        if let Some(u) = &self.upstream {
            u.check_as("upstream")
                .map_err(|e| format!("invalid configuration: {e}"))?;
        }
        if let Some(p) = &self.plugins {
            check_plugins(p, catalog)?;
        }
        if self.upstream.is_none()
            && self.upstream_id.is_none()
            && self.service_id.is_none()
            && self.plugin_config_id.is_none()
            && self.plugins.as_ref().is_none_or(|p| p.is_empty())
        {
            return Err("invalid configuration: a route needs one of \"upstream\", \"upstream_id\", \"service_id\", \"plugin_config_id\" or \"plugins\"".into());
        }
        Ok(())
    }

    /// The paths this route matches.
    pub fn paths(&self) -> Vec<&str> {
        match (&self.uri, &self.uris) {
            (Some(u), _) => vec![u.as_str()],
            (None, Some(list)) => list.iter().map(String::as_str).collect(),
            (None, None) => Vec::new(),
        }
    }

    /// The host patterns this route matches (empty = any host).
    pub fn host_patterns(&self) -> Vec<&str> {
        match (&self.host, &self.hosts) {
            (Some(h), _) => vec![h.as_str()],
            (None, Some(list)) => list.iter().map(String::as_str).collect(),
            (None, None) => Vec::new(),
        }
    }

    /// The client address patterns (empty = any client).
    pub fn remote_patterns(&self) -> Vec<&str> {
        match (&self.remote_addr, &self.remote_addrs) {
            (Some(h), _) => vec![h.as_str()],
            (None, Some(list)) => list.iter().map(String::as_str).collect(),
            (None, None) => Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.status != Some(0)
    }
}

fn check_text(field: &str, v: &Option<String>) -> Result<(), String> {
    match v {
        Some(s) if s.len() > 256 => Err(invalid(field, "string too long (at most 256 bytes)")),
        _ => Ok(()),
    }
}

fn check_uri(field: &str, uri: &str) -> Result<(), String> {
    if !uri.starts_with('/') {
        return Err(invalid(field, format!("{uri:?} must start with '/'")));
    }
    if uri.len() > 4096 {
        return Err(invalid(field, "longer than 4096 bytes"));
    }
    if uri.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(
            field,
            "must not contain spaces or control characters",
        ));
    }
    if let Some(pos) = uri.find('*') {
        if pos != uri.len() - 1 {
            return Err(invalid(
                field,
                format!("{uri:?}: '*' is only allowed at the end (prefix match)"),
            ));
        }
    }
    Ok(())
}

/// APISIX's host pattern: an optional leading `*` then `[0-9a-zA-Z-._\[\]:]+`.
pub fn valid_host_pattern(h: &str) -> bool {
    let rest = h.strip_prefix('*').unwrap_or(h);
    !rest.is_empty()
        && h.len() <= 253
        && rest.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
}

fn check_hosts(host: &Option<String>, hosts: &Option<Vec<String>>) -> Result<(), String> {
    if host.is_some() && hosts.is_some() {
        return Err("only one of host or hosts is allowed".into());
    }
    if let Some(h) = host {
        if !valid_host_pattern(h) {
            return Err(invalid("host", format!("invalid host pattern {h:?}")));
        }
    }
    if let Some(list) = hosts {
        if list.is_empty() {
            return Err(invalid("hosts", "expect array to have at least 1 items"));
        }
        for (i, h) in list.iter().enumerate() {
            if !valid_host_pattern(h) {
                return Err(invalid(
                    &format!("hosts[{i}]"),
                    format!("invalid host pattern {h:?}"),
                ));
            }
        }
    }
    Ok(())
}

fn check_remote_addrs(one: &Option<String>, many: &Option<Vec<String>>) -> Result<(), String> {
    if one.is_some() && many.is_some() {
        return Err("only one of remote_addr or remote_addrs is allowed".into());
    }
    if let Some(a) = one {
        if parse_cidr(a).is_none() {
            return Err(invalid("remote_addr", format!("invalid IP or CIDR {a:?}")));
        }
    }
    for (i, a) in many.iter().flatten().enumerate() {
        if parse_cidr(a).is_none() {
            return Err(invalid(
                &format!("remote_addrs[{i}]"),
                format!("invalid IP or CIDR {a:?}"),
            ));
        }
    }
    Ok(())
}

/// A service: plugins and an upstream that routes inherit through `service_id`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Plugins>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

impl Service {
    pub fn check(&self, catalog: &PluginCatalog) -> Result<(), String> {
        check_text("name", &self.name)?;
        check_text("desc", &self.desc)?;
        check_hosts(&None, &self.hosts)?;
        if let Some(u) = &self.upstream {
            u.check_as("upstream")
                .map_err(|e| format!("invalid configuration: {e}"))?;
        }
        if let Some(p) = &self.plugins {
            check_plugins(p, catalog)?;
        }
        Ok(())
    }
}

/// A plugin config: a set of plugins that routes take by `plugin_config_id` (APISIX's
/// `/apisix/admin/plugin_configs`). Its id is required: it is written with `PUT`, not `POST`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Required, as in APISIX's schema; may be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Plugins>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

impl PluginConfig {
    pub fn check(&self, catalog: &PluginCatalog) -> Result<(), String> {
        check_text("name", &self.name)?;
        check_text("desc", &self.desc)?;
        match &self.plugins {
            None => Err("invalid configuration: property \"plugins\" is required".into()),
            Some(p) => check_plugins(p, catalog),
        }
    }
}

/// A global rule: plugins that run for every request, before the route's.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default)]
    pub plugins: Plugins,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

impl GlobalRule {
    pub fn check(&self, catalog: &PluginCatalog) -> Result<(), String> {
        if self.plugins.is_empty() {
            return Err(
                "invalid configuration: property \"plugins\" is required and must not be empty"
                    .into(),
            );
        }
        check_plugins(&self.plugins, catalog)
    }
}
