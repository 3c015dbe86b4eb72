//! A blocking client for the Admin API: the reads the console polls and the writes its keys
//! make. It never runs on the UI thread (see [`crate::transport`]).

use crate::model::{self, GatewayStatus, Health, LogTail, Plugins, Route, Stats, Traffic};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// How long a call may take (a reload gets [`RELOAD_TIMEOUT`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reload may take: the master waits up to 30 s for the new workers.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(40);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The gateway could not be reached or did not answer (refused, timed out, cut off).
    Unreachable(String),
    /// The Admin API answered with an error status; `message` is its `error_msg`.
    Status { status: u16, message: String },
    /// A successful answer that is not what was expected.
    Invalid(String),
}

impl ApiError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Unreachable(_))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable(e) => write!(f, "gateway unreachable: {e}"),
            ApiError::Status { status, message } => write!(f, "{status}: {message}"),
            ApiError::Invalid(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// The message of an error answer: `error_msg` (with `description`, as 401s have), `message`
/// (404 "Key not found"), or the text itself.
pub fn error_message(status: u16, body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(m) = text("error_msg").or_else(|| text("message")) {
            return match text("description") {
                Some(d) => format!("{m}: {d}"),
                None => m,
            };
        }
    }
    let body = body.trim();
    if body.is_empty() {
        format!("HTTP {status}")
    } else if body.starts_with('<') {
        // A web page, not an Admin API's answer: its markup would fill the screen.
        format!("HTTP {status} with a web page, not an Admin API's answer")
    } else {
        body.chars().take(500).collect()
    }
}

/// Escapes what may not appear raw in a path segment, so a mistyped id reaches the Admin API
/// (which names what is wrong with it) instead of another path.
pub fn segment(id: &str) -> String {
    let mut out = String::new();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An Admin API endpoint and its key.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// `admin` is `host:port` (or a `http://…` URL); `key` goes in `X-API-KEY`.
    pub fn new(admin: &str, key: Option<String>) -> Client {
        let base = if admin.starts_with("http://") || admin.starts_with("https://") {
            admin.trim_end_matches('/').to_string()
        } else {
            format!("http://{admin}")
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(1)))
            .timeout_global(Some(CALL_TIMEOUT))
            .user_agent(concat!("wasmgate-tui/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            base,
            key: key.filter(|k| !k.is_empty()),
            agent,
        }
    }

    /// `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One call: the JSON body of a 2xx answer, an [`ApiError`] otherwise.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value, ApiError> {
        self.call_within(method, path, body, CALL_TIMEOUT)
    }

    /// [`Client::call`] with its own time limit.
    pub fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| ApiError::Unreachable(e.to_string());
        let key = self.key.as_deref();
        macro_rules! with_key {
            ($req:expr) => {{
                let r = $req.config().timeout_global(Some(timeout)).build();
                match key {
                    Some(k) => r.header("X-API-KEY", k),
                    None => r,
                }
            }};
        }
        macro_rules! send {
            ($req:expr) => {{
                let r = with_key!($req).header("Content-Type", "application/json");
                match body {
                    Some(b) => r.send(b),
                    None => r.send_empty(),
                }
            }};
        }
        let resp = match method {
            "GET" => with_key!(self.agent.get(&url)).call(),
            "DELETE" => with_key!(self.agent.delete(&url)).call(),
            "PUT" => send!(self.agent.put(&url)),
            "PATCH" => send!(self.agent.patch(&url)),
            "POST" => send!(self.agent.post(&url)),
            other => return Err(ApiError::Invalid(format!("method {other} not supported"))),
        };
        let mut resp = resp.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(ApiError::Status {
                status,
                message: error_message(status, &text),
            });
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ApiError::Invalid(format!("{path}: {e}")))
    }

    fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let v = self.call("GET", path, None)?;
        serde_json::from_value(v).map_err(|e| ApiError::Invalid(format!("{path}: {e}")))
    }

    /// `GET /apisix/admin/routes`, sorted by id.
    pub fn routes(&self) -> Result<Vec<Route>, ApiError> {
        let v = self.call("GET", "/apisix/admin/routes", None)?;
        model::parse_routes(&v).map_err(ApiError::Invalid)
    }

    /// `GET /apisix/admin/services`, sorted by id (parsed as routes are: an id and a JSON).
    pub fn services(&self) -> Result<Vec<Route>, ApiError> {
        let v = self.call("GET", "/apisix/admin/services", None)?;
        model::parse_routes(&v).map_err(ApiError::Invalid)
    }

    /// `GET /apisix/admin/plugin_configs`, sorted by id (an id and a JSON each, as routes).
    pub fn plugin_configs(&self) -> Result<Vec<Route>, ApiError> {
        let v = self.call("GET", "/apisix/admin/plugin_configs", None)?;
        model::parse_routes(&v).map_err(ApiError::Invalid)
    }

    /// `GET /apisix/admin/upstreams`, sorted by id (an id and a JSON each, as routes).
    pub fn upstreams(&self) -> Result<Vec<Route>, ApiError> {
        let v = self.call("GET", "/apisix/admin/upstreams", None)?;
        model::parse_routes(&v).map_err(ApiError::Invalid)
    }

    /// `GET /apisix/admin/ssls`, sorted by id (an id and a JSON each, as routes).
    pub fn ssls(&self) -> Result<Vec<Route>, ApiError> {
        let v = self.call("GET", "/apisix/admin/ssls", None)?;
        model::parse_routes(&v).map_err(ApiError::Invalid)
    }

    /// `GET /wasmgate/status`.
    pub fn status(&self) -> Result<GatewayStatus, ApiError> {
        self.get_as("/wasmgate/status")
    }

    /// `GET /wasmgate/plugins`.
    pub fn plugins(&self) -> Result<Plugins, ApiError> {
        self.get_as("/wasmgate/plugins")
    }

    /// `GET /wasmgate/healthcheck`.
    pub fn health(&self) -> Result<Health, ApiError> {
        self.get_as("/wasmgate/healthcheck")
    }

    /// `GET /wasmgate/traffic`.
    pub fn traffic(&self) -> Result<Traffic, ApiError> {
        self.get_as("/wasmgate/traffic")
    }

    /// `GET /wasmgate/stats`.
    pub fn stats(&self) -> Result<Stats, ApiError> {
        self.get_as("/wasmgate/stats")
    }

    /// `GET /wasmgate/log?lines=N`.
    pub fn log(&self, lines: usize) -> Result<LogTail, ApiError> {
        self.get_as(&format!("/wasmgate/log?lines={lines}"))
    }

    /// `PUT /apisix/admin/routes/{id}` with `body` sent as typed (so the Admin API's own parser
    /// reports JSON mistakes, with line and column). Returns the stored route.
    pub fn put_route(&self, id: &str, body: &str) -> Result<Value, ApiError> {
        self.call(
            "PUT",
            &format!("/apisix/admin/routes/{}", segment(id)),
            Some(body),
        )
    }

    /// `PATCH /apisix/admin/routes/{id}` with `{"status": 1|0}`.
    pub fn set_route_status(&self, id: &str, enabled: bool) -> Result<Value, ApiError> {
        let body = serde_json::json!({ "status": u8::from(enabled) }).to_string();
        self.call(
            "PATCH",
            &format!("/apisix/admin/routes/{}", segment(id)),
            Some(&body),
        )
    }

    /// `DELETE /apisix/admin/routes/{id}`.
    pub fn delete_route(&self, id: &str) -> Result<Value, ApiError> {
        self.call(
            "DELETE",
            &format!("/apisix/admin/routes/{}", segment(id)),
            None,
        )
    }

    /// `POST /wasmgate/reload`: `{"reloaded":true,"epoch":N}` once the new workers serve.
    pub fn reload(&self) -> Result<Value, ApiError> {
        self.call_within("POST", "/wasmgate/reload", None, RELOAD_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(400, r#"{"error_msg":"wrong route id"}"#),
            "wrong route id"
        );
        assert_eq!(
            error_message(
                401,
                r#"{"error_msg":"failed to check token","description":"wrong apikey"}"#
            ),
            "failed to check token: wrong apikey"
        );
        assert_eq!(
            error_message(404, r#"{"message":"Key not found"}"#),
            "Key not found"
        );
        assert_eq!(error_message(502, ""), "HTTP 502");
        assert_eq!(error_message(500, "oops\n"), "oops");
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(segment("a-b_c.9"), "a-b_c.9");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn a_closed_port_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("127.0.0.1:{port}"), Some("k".into()));
        assert!(c.routes().unwrap_err().is_unreachable());
    }
}
