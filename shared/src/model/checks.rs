//! `checks`: an upstream's health checks, with APISIX's fields and defaults (its schema, which
//! follows lua-resty-healthcheck's). Active checks probe each node from the master on an
//! interval; passive checks count the answers of the traffic itself. Both feed the same
//! counters of a node (`crate::health`).

use serde::{Deserialize, Serialize};

/// How a node is probed (`active.type`), or which failures the traffic counts
/// (`passive.type`: `tcp` counts only connection failures and timeouts).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProbeType {
    #[default]
    Http,
    Https,
    Tcp,
}

impl ProbeType {
    /// As written in `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeType::Http => "http",
            ProbeType::Https => "https",
            ProbeType::Tcp => "tcp",
        }
    }
}

/// `checks`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<Active>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<Passive>,
}

/// `checks.active`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Active {
    #[serde(rename = "type", default)]
    pub kind: ProbeType,
    /// Seconds a probe may take, connection included.
    #[serde(default = "one_second")]
    pub timeout: f64,
    /// Probes of one upstream in flight at once.
    #[serde(default = "ten")]
    pub concurrency: u32,
    /// The `Host` (and TLS name) of HTTP probes; default: the node's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port probed; default: the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default = "root")]
    pub http_path: String,
    #[serde(default = "yes")]
    pub https_verify_certificate: bool,
    #[serde(default)]
    pub healthy: ActiveHealthy,
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
    /// Further request headers, each `Name: value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req_headers: Option<Vec<String>>,
}

/// `checks.active.healthy`: how often healthy nodes are probed, and what brings an
/// unhealthy node back.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthy {
    #[serde(default = "one")]
    pub interval: u32,
    #[serde(default = "active_healthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "two")]
    pub successes: u32,
}

/// `checks.active.unhealthy`: how often unhealthy nodes are probed, and what takes a healthy
/// node out.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActiveUnhealthy {
    #[serde(default = "one")]
    pub interval: u32,
    #[serde(default = "active_unhealthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "five")]
    pub http_failures: u32,
    #[serde(default = "two")]
    pub tcp_failures: u32,
    #[serde(default = "three")]
    pub timeouts: u32,
}

/// `checks.passive`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    #[serde(rename = "type", default)]
    pub kind: ProbeType,
    #[serde(default)]
    pub healthy: PassiveHealthy,
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
}

/// `checks.passive.healthy`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthy {
    #[serde(default = "passive_healthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "five")]
    pub successes: u32,
}

/// `checks.passive.unhealthy`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveUnhealthy {
    #[serde(default = "passive_unhealthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "two")]
    pub tcp_failures: u32,
    #[serde(default = "seven")]
    pub timeouts: u32,
    #[serde(default = "five")]
    pub http_failures: u32,
}

fn one_second() -> f64 {
    1.0
}
fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn five() -> u32 {
    5
}
fn seven() -> u32 {
    7
}
fn ten() -> u32 {
    10
}
fn yes() -> bool {
    true
}
fn root() -> String {
    "/".into()
}
fn active_healthy_statuses() -> Vec<u16> {
    vec![200, 302]
}
fn active_unhealthy_statuses() -> Vec<u16> {
    vec![429, 404, 500, 501, 502, 503, 504, 505]
}
fn passive_healthy_statuses() -> Vec<u16> {
    vec![
        200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306, 307,
        308,
    ]
}
fn passive_unhealthy_statuses() -> Vec<u16> {
    vec![429, 500, 503]
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: one(),
            http_statuses: active_healthy_statuses(),
            successes: two(),
        }
    }
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: one(),
            http_statuses: active_unhealthy_statuses(),
            http_failures: five(),
            tcp_failures: two(),
            timeouts: three(),
        }
    }
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: passive_healthy_statuses(),
            successes: five(),
        }
    }
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: passive_unhealthy_statuses(),
            tcp_failures: two(),
            timeouts: seven(),
            http_failures: five(),
        }
    }
}

/// Longest probe interval and timeout taken (a day), so that no schedule overflows.
const MAX_SECONDS: f64 = 86_400.0;
/// Most `req_headers`, and the longest one.
const MAX_REQ_HEADERS: usize = 64;
const MAX_REQ_HEADER: usize = 4096;

impl Checks {
    /// Checks the values beyond their types, naming fields under `prefix` (`upstream.checks`
    /// in a route). The error is a whole `error_msg`.
    pub fn check(&self, prefix: &str) -> Result<(), String> {
        let bad =
            |f: &str, why: String| format!("property \"{prefix}.{f}\" validation failed: {why}");
        // APISIX's schema asks for `active`: passive checks alone would take nodes out and
        // never bring them back (an unhealthy node gets no traffic to count).
        let Some(active) = &self.active else {
            return Err(bad(
                "active",
                "required: passive checks only take nodes out, active ones bring them back".into(),
            ));
        };
        active
            .check()
            .map_err(|(f, why)| bad(&format!("active.{f}"), why))?;
        if let Some(p) = &self.passive {
            p.check()
                .map_err(|(f, why)| bad(&format!("passive.{f}"), why))?;
        }
        Ok(())
    }
}

type FieldError = (&'static str, String);

impl Active {
    fn check(&self) -> Result<(), FieldError> {
        if !(self.timeout > 0.0 && self.timeout <= MAX_SECONDS) {
            return Err((
                "timeout",
                format!("expected seconds in (0, 86400], got {}", self.timeout),
            ));
        }
        if !(1..=1000).contains(&self.concurrency) {
            return Err((
                "concurrency",
                format!("expected 1 to 1000, got {}", self.concurrency),
            ));
        }
        if let Some(p) = self.port {
            if !(1..=65_535).contains(&p) {
                return Err(("port", format!("expected 1 to 65535, got {p}")));
            }
        }
        if let Some(h) = &self.host {
            if h.starts_with('*') || !super::route::valid_host_pattern(h) {
                return Err(("host", format!("invalid host {h:?}")));
            }
        }
        let path = &self.http_path;
        if !path.starts_with('/')
            || path.len() > 4096
            || path.bytes().any(|b| b <= b' ' || b == 0x7f)
        {
            return Err((
                "http_path",
                format!(
                    "expected a path from / without spaces or control characters, got {path:?}"
                ),
            ));
        }
        for (f, s) in [
            ("healthy.interval", self.healthy.interval),
            ("unhealthy.interval", self.unhealthy.interval),
        ] {
            if !(1..=MAX_SECONDS as u32).contains(&s) {
                return Err((f, format!("expected seconds from 1 to 86400, got {s}")));
            }
        }
        counter("healthy.successes", self.healthy.successes)?;
        counter("unhealthy.http_failures", self.unhealthy.http_failures)?;
        counter("unhealthy.tcp_failures", self.unhealthy.tcp_failures)?;
        counter("unhealthy.timeouts", self.unhealthy.timeouts)?;
        statuses("healthy.http_statuses", &self.healthy.http_statuses)?;
        statuses("unhealthy.http_statuses", &self.unhealthy.http_statuses)?;
        if let Some(headers) = &self.req_headers {
            req_headers(headers)?;
        }
        Ok(())
    }
}

impl Passive {
    /// The counts that change a node's state under passive checks.
    pub fn thresholds(&self) -> crate::health::Thresholds {
        let u = &self.unhealthy;
        thresholds([
            self.healthy.successes,
            u.http_failures,
            u.tcp_failures,
            u.timeouts,
        ])
    }

    fn check(&self) -> Result<(), FieldError> {
        counter("healthy.successes", self.healthy.successes)?;
        counter("unhealthy.http_failures", self.unhealthy.http_failures)?;
        counter("unhealthy.tcp_failures", self.unhealthy.tcp_failures)?;
        counter("unhealthy.timeouts", self.unhealthy.timeouts)?;
        statuses("healthy.http_statuses", &self.healthy.http_statuses)?;
        statuses("unhealthy.http_statuses", &self.unhealthy.http_statuses)
    }
}

/// Successes, HTTP failures, TCP failures and timeouts, each checked to be 1 to 254 when
/// written: a byte each.
fn thresholds([successes, http, tcp, timeouts]: [u32; 4]) -> crate::health::Thresholds {
    let byte = |n: u32| n.clamp(1, 254) as u8;
    crate::health::Thresholds {
        successes: byte(successes),
        http_failures: byte(http),
        tcp_failures: byte(tcp),
        timeouts: byte(timeouts),
    }
}

/// A threshold: 1 to 254, as lua-resty-healthcheck counts in a byte.
fn counter(f: &'static str, n: u32) -> Result<(), FieldError> {
    match (1..=254).contains(&n) {
        true => Ok(()),
        false => Err((f, format!("expected 1 to 254, got {n}"))),
    }
}

fn statuses(f: &'static str, list: &[u16]) -> Result<(), FieldError> {
    if list.is_empty() {
        return Err((f, "expected at least one status".into()));
    }
    if let Some(s) = list.iter().find(|s| !(200..=599).contains(*s)) {
        return Err((f, format!("expected statuses from 200 to 599, got {s}")));
    }
    let mut seen = list.to_vec();
    seen.sort_unstable();
    match seen.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err((f, format!("status {} listed twice", w[0]))),
        None => Ok(()),
    }
}

/// Each `Name: value`, with a token for a name and no line breaks (they go onto the wire).
fn req_headers(list: &[String]) -> Result<(), FieldError> {
    const F: &str = "req_headers";
    if list.is_empty() || list.len() > MAX_REQ_HEADERS {
        return Err((
            F,
            format!(
                "expected 1 to {MAX_REQ_HEADERS} headers, got {}",
                list.len()
            ),
        ));
    }
    for h in list {
        let valid = h.len() <= MAX_REQ_HEADER
            && h.split_once(':').is_some_and(|(name, value)| {
                http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok()
                    && http::HeaderValue::from_str(value.trim()).is_ok()
            });
        if !valid {
            return Err((F, format!("expected \"Name: value\", got {h:?}")));
        }
    }
    Ok(())
}

impl Active {
    /// The counts that change a node's state under active checks (each checked to be 1 to
    /// 254 when written).
    pub fn thresholds(&self) -> crate::health::Thresholds {
        let u = &self.unhealthy;
        thresholds([
            self.healthy.successes,
            u.http_failures,
            u.tcp_failures,
            u.timeouts,
        ])
    }

    /// `req_headers` as name and value pairs (checked when written).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        (self.req_headers.iter().flatten())
            .filter_map(|h| h.split_once(':'))
            .map(|(n, v)| (n.trim(), v.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn checks(v: serde_json::Value) -> Result<Checks, String> {
        let c: Checks = serde_json::from_value(v).map_err(|e| e.to_string())?;
        c.check("checks").map(|()| c)
    }

    #[test]
    fn defaults_are_apisix_s() {
        let c = checks(json!({"active": {}, "passive": {}})).unwrap();
        let a = c.active.unwrap();
        assert_eq!(
            (a.kind, a.timeout, a.concurrency),
            (ProbeType::Http, 1.0, 10)
        );
        assert_eq!(a.http_path, "/");
        assert!(a.https_verify_certificate);
        assert_eq!(a.healthy.http_statuses, [200, 302]);
        assert_eq!((a.healthy.interval, a.healthy.successes), (1, 2));
        let u = a.unhealthy;
        assert_eq!((u.http_failures, u.tcp_failures, u.timeouts), (5, 2, 3));
        let p = c.passive.unwrap();
        assert_eq!(p.healthy.successes, 5);
        assert_eq!(p.unhealthy.http_statuses, [429, 500, 503]);
        assert_eq!((p.unhealthy.tcp_failures, p.unhealthy.timeouts), (2, 7));
    }

    #[test]
    fn bad_values_are_named() {
        let e = |v| checks(v).unwrap_err();
        assert!(e(json!({"passive": {}})).contains("\"checks.active\" validation failed: required"));
        assert!(e(json!({"active": {"timeout": 0}})).contains("checks.active.timeout"));
        assert!(e(json!({"active": {"healthy": {"successes": 255}}}))
            .contains("checks.active.healthy.successes\" validation failed: expected 1 to 254"));
        assert!(
            e(json!({"active": {"unhealthy": {"http_statuses": [100]}}}))
                .contains("checks.active.unhealthy.http_statuses")
        );
        assert!(
            e(json!({"active": {"healthy": {"http_statuses": [200, 200]}}}))
                .contains("status 200 listed twice")
        );
        assert!(e(json!({"active": {"http_path": "/a b"}})).contains("http_path"));
        assert!(e(json!({"active": {"http_path": "/a\r\nX: y"}})).contains("http_path"));
        assert!(e(json!({"active": {"req_headers": ["X-A: 1\r\nX-B: 2"]}})).contains("req_headers"));
        assert!(e(json!({"active": {"req_headers": ["no colon"]}})).contains("req_headers"));
        assert!(e(json!({"active": {"port": 70000}})).contains("checks.active.port"));
        assert!(e(json!({"active": {"host": "a b"}})).contains("checks.active.host"));
        assert!(e(json!({"active": {"type": "udp"}})).contains("unknown variant"));
        assert!(e(json!({"active": {"interval": 1}})).contains("unknown field"));
        assert!(
            e(json!({"active": {}, "passive": {"unhealthy": {"timeouts": 0}}}))
                .contains("checks.passive.unhealthy.timeouts")
        );
    }

    #[test]
    fn request_headers_split_at_the_first_colon() {
        let c = checks(json!({"active": {"req_headers": ["User-Agent: probe/1", "X-T:a:b"]}}));
        let a = c.unwrap().active.unwrap();
        let h: Vec<_> = a.headers().collect();
        assert_eq!(h, [("User-Agent", "probe/1"), ("X-T", "a:b")]);
    }
}
