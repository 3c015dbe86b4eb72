//! Asks an auth service (an HTTP call-out from the HTTP context) whether to let each request
//! through. Configuration (JSON object): `{"upstream": "<cluster>", "timeout_ms": 1000}`;
//! `upstream` is required (a configuration without a string `upstream`, or not JSON, is rejected:
//! `on_configure` returns false); `timeout_ms` defaults to 1000.
//!
//! - `on_http_request_headers` calls `dispatch_http_call(upstream, headers, None, vec![],
//!   timeout_ms)` with headers, in this order: `:method: GET`, `:path: /auth`,
//!   `:authority: auth.local`, `x-original-path: <request :path>`,
//!   `authorization: <request authorization header, or "">`; no body, no trailers. It returns
//!   `Pause` either way. A request header `x-auth-bad-call: 1` leaves `:path` out of the call's
//!   headers (the host must answer BadArgument).
//! - When the dispatch fails (the host returns BadArgument or InternalFailure), it logs a warning
//!   `http_auth: dispatch failed: <Status Debug>` and answers locally 500, header
//!   `x-auth-error: dispatch`, body `auth dispatch failed`.
//! - `on_http_call_response(token, num_headers, body_size, _)`:
//!   - `num_headers == 0` (the call was reset after its answer began) → local 503, header
//!     `x-auth-error: unavailable`, body `auth service unavailable`.
//!   - otherwise reads the call's `:status` header and its body
//!     (`get_http_call_response_body(0, body_size)`). Status `200` → sets request header
//!     `x-auth-user` to the call response's `x-user` value (the request's `x-auth-user` is removed
//!     when the response has no `x-user`), adds request header `x-auth-body` = the response body
//!     (lossy UTF-8, whitespace-trimmed; added even when empty), then `resume_http_request()`.
//!     Any other status → local 403, header `x-auth-status: <status>`, body `denied by auth`.
//!
//! SDK note: proxy-wasm 0.2.5 ignores the context id of `proxy_on_http_call_response`; it finds
//! the HTTP context by token (the context that was current at `dispatch_http_call`) and calls
//! `proxy_set_effective_context(<that id>)` first, trapping unless the host answers Ok. An unknown
//! token traps ("invalid token_id"); a response for a context already deleted is dropped silently.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Conf {
    upstream: String,
    timeout_ms: u64,
}

#[derive(Default)]
struct Root {
    conf: Conf,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self.get_plugin_configuration().unwrap_or_default();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            log::error!("http_auth: configuration is not JSON");
            return false;
        };
        let Some(upstream) = v.get("upstream").and_then(|u| u.as_str()) else {
            log::error!("http_auth: configuration has no \"upstream\"");
            return false;
        };
        self.conf = Conf {
            upstream: upstream.to_string(),
            timeout_ms: v.get("timeout_ms").and_then(|t| t.as_u64()).unwrap_or(1000),
        };
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HttpAuth { conf: self.conf.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HttpAuth {
    conf: Conf,
}

impl Context for HttpAuth {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if num_headers == 0 {
            self.send_http_response(
                503,
                vec![("x-auth-error", "unavailable")],
                Some(b"auth service unavailable"),
            );
            return;
        }
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        if status == "200" {
            let user = self.get_http_call_response_header("x-user");
            self.set_http_request_header("x-auth-user", user.as_deref());
            self.add_http_request_header("x-auth-body", String::from_utf8_lossy(&body).trim());
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![("x-auth-status", &status)], Some(b"denied by auth"));
        }
    }
}

impl HttpContext for HttpAuth {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let authorization = self.get_http_request_header("authorization").unwrap_or_default();
        let bad_call = self.get_http_request_header("x-auth-bad-call").as_deref() == Some("1");

        let mut headers = vec![(":method", "GET")];
        if !bad_call {
            headers.push((":path", "/auth"));
        }
        headers.extend([
            (":authority", "auth.local"),
            ("x-original-path", path.as_str()),
            ("authorization", authorization.as_str()),
        ]);

        let timeout = Duration::from_millis(self.conf.timeout_ms);
        if let Err(status) = self.dispatch_http_call(&self.conf.upstream, headers, None, vec![], timeout) {
            log::warn!("http_auth: dispatch failed: {status:?}");
            self.send_http_response(500, vec![("x-auth-error", "dispatch")], Some(b"auth dispatch failed"));
        }
        Action::Pause
    }
}
