//! Lets a request through only with `Authorization: Bearer <conf>`; otherwise answers 401 itself.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { token: String::new() }) });
}}

struct Root {
    token: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.token = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        !self.token.is_empty()
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Auth { token: self.token.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Auth {
    token: String,
}

impl Context for Auth {}

impl HttpContext for Auth {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let expected = format!("Bearer {}", self.token);
        match self.get_http_request_header("authorization") {
            Some(v) if v == expected => {
                self.set_http_request_header("authorization", None);
                self.set_http_request_header("x-authenticated", Some("yes"));
                Action::Continue
            }
            _ => {
                log::warn!("auth: request refused");
                self.send_http_response(
                    401,
                    vec![("www-authenticate", "Bearer realm=\"wasmgate\""), ("content-type", "text/plain")],
                    Some(b"unauthorized\n"),
                );
                Action::Pause
            }
        }
    }
}
