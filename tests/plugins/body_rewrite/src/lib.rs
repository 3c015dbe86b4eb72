//! Rewrites request and response bodies. Configuration (JSON object, every key optional, a missing,
//! non-string or empty-string value counts as unset; an empty configuration means all unset; a
//! configuration that is not a JSON object is rejected — `on_configure` returns false):
//! `{"redact": "<word>", "request_append": "<text>", "response_prepend": "<text>"}`.
//!
//! - Request body: every `on_http_request_body` call is counted. Until `end_of_stream` it returns
//!   `Pause` (the host buffers). At `end_of_stream` it remembers `body_size`, and when
//!   `request_append` is set appends it with `set_http_request_body(body_size, 0, text)`; then
//!   `Continue`. Request headers are not touched (no content-length change by the plugin).
//! - Response headers: adds `x-body-rewrite: on` (`add_http_response_header`); nothing removed.
//! - Response body: every `on_http_response_body` call is counted. Until `end_of_stream` → `Pause`.
//!   At `end_of_stream` it remembers `body_size`; when `redact` is set it reads
//!   `get_http_response_body(0, body_size)`, replaces every non-overlapping occurrence of the word
//!   (bytes, case-sensitive, left to right) by as many `*` as the word has bytes, and writes the
//!   whole result back with `set_http_response_body(0, body_size, redacted)` (even when nothing
//!   matched); then, when `response_prepend` is set, prepends it with
//!   `set_http_response_body(0, 0, text)`; then `Continue`.
//! - `on_log` logs at info level exactly:
//!   `body_rewrite: request_body_calls=N request_body_size=S response_body_calls=M response_body_size=T`
//!   (sizes are the `body_size` of the `end_of_stream` call, 0 when there was none).

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Conf {
    redact: Option<String>,
    request_append: Option<String>,
    response_prepend: Option<String>,
}

#[derive(Default)]
struct Root {
    conf: Conf,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self.get_plugin_configuration().unwrap_or_default();
        if text.iter().all(u8::is_ascii_whitespace) {
            self.conf = Conf::default();
            return true;
        }
        let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(&text) else {
            log::error!("body_rewrite: configuration is not a JSON object");
            return false;
        };
        let field = |k: &str| m.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(String::from);
        self.conf = Conf {
            redact: field("redact"),
            request_append: field("request_append"),
            response_prepend: field("response_prepend"),
        };
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BodyRewrite { conf: self.conf.clone(), ..Default::default() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default)]
struct BodyRewrite {
    conf: Conf,
    request_body_calls: u32,
    request_body_size: usize,
    response_body_calls: u32,
    response_body_size: usize,
}

impl Context for BodyRewrite {}

/// `body` with every non-overlapping occurrence of `word` replaced by `*`s of the same length.
fn redact(body: &[u8], word: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(word) {
            out.extend(std::iter::repeat(b'*').take(word.len()));
            i += word.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

impl HttpContext for BodyRewrite {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_body_calls += 1;
        if !end_of_stream {
            return Action::Pause;
        }
        self.request_body_size = body_size;
        if let Some(text) = &self.conf.request_append {
            self.set_http_request_body(body_size, 0, text.as_bytes());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.add_http_response_header("x-body-rewrite", "on");
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.response_body_calls += 1;
        if !end_of_stream {
            return Action::Pause;
        }
        self.response_body_size = body_size;
        if let Some(word) = &self.conf.redact {
            let body = self.get_http_response_body(0, body_size).unwrap_or_default();
            self.set_http_response_body(0, body_size, &redact(&body, word.as_bytes()));
        }
        if let Some(text) = &self.conf.response_prepend {
            self.set_http_response_body(0, 0, text.as_bytes());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        log::info!(
            "body_rewrite: request_body_calls={} request_body_size={} response_body_calls={} response_body_size={}",
            self.request_body_calls,
            self.request_body_size,
            self.response_body_calls,
            self.response_body_size
        );
    }
}
