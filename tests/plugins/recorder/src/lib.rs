//! Records the order of callbacks: appends its configuration (a label) to the request header
//! `x-order` and the response header `x-order-response`, and logs every callback.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { label: String::new() }) });
}}

struct Root {
    label: String,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        log::info!("recorder {}: plugin context on_done", self.label);
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.label = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        log::info!("recorder {}: on_configure", self.label);
        true
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Recorder { id, label: self.label.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Recorder {
    id: u32,
    label: String,
}

impl Context for Recorder {
    fn on_done(&mut self) -> bool {
        log::info!("recorder {}: on_done {}", self.label, self.id);
        true
    }
}

fn append(prev: Option<String>, label: &str) -> String {
    match prev {
        Some(p) if !p.is_empty() => format!("{p},{label}"),
        _ => label.to_string(),
    }
}

impl HttpContext for Recorder {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        log::info!("recorder {}: on_request_headers {}", self.label, self.id);
        let v = append(self.get_http_request_header("x-order"), &self.label);
        self.set_http_request_header("x-order", Some(&v));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        log::info!("recorder {}: on_response_headers {}", self.label, self.id);
        let status = self.get_http_response_header(":status").unwrap_or_default();
        let v = append(self.get_http_response_header("x-order-response"), &self.label);
        self.set_http_response_header("x-order-response", Some(&v));
        self.set_http_response_header(&format!("x-status-seen-by-{}", self.label), Some(&status));
        Action::Continue
    }

    fn on_log(&mut self) {
        log::info!("recorder {}: on_log {}", self.label, self.id);
    }
}
