//! Records the order of callbacks: appends its configuration (a label) to the request header
//! `x-order` and the response header `x-order-response`, and logs every callback. It also logs
//! Envoy's connection, timing and size attributes as it reads them: in the request phase
//! (`recorder <label>: early …`, where the sizes and the duration are not known yet) and in
//! `on_log` (`recorder <label>: attributes …`), integers decoded from 8 little-endian bytes,
//! `<none>` for a property the host does not have.

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

impl Recorder {
    fn int(&self, path: &[&str]) -> String {
        match self.get_property(path.to_vec()) {
            Some(b) if b.len() == 8 => {
                i64::from_le_bytes(b.as_slice().try_into().unwrap()).to_string()
            }
            Some(b) => format!("<{} bytes>", b.len()),
            None => "<none>".into(),
        }
    }

    /// A whole map (`request.headers`…) in the pairs encoding: its names joined with `,`,
    /// and the value of `name` in it.
    fn map(&self, path: &[&str], name: &str) -> (String, String) {
        let Some(b) = self.get_property(path.to_vec()) else {
            return ("<none>".into(), "<none>".into());
        };
        let u32_at = |at: usize| -> usize {
            b.get(at..at + 4)
                .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap()) as usize)
        };
        let count = u32_at(0);
        let mut at = 4 + count * 8;
        let (mut names, mut value) = (Vec::new(), "<absent>".to_string());
        for i in 0..count {
            let (kl, vl) = (u32_at(4 + i * 8), u32_at(8 + i * 8));
            let (Some(k), Some(v)) = (b.get(at..at + kl), b.get(at + kl + 1..at + kl + 1 + vl)) else {
                return ("<malformed>".into(), "<malformed>".into());
            };
            let k = String::from_utf8_lossy(k).to_string();
            if k == name {
                value = String::from_utf8_lossy(v).to_string();
            }
            names.push(k);
            at += kl + vl + 2;
        }
        (names.join(","), value)
    }

    fn text(&self, path: &[&str]) -> String {
        self.get_property(path.to_vec())
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_else(|| "<none>".into())
    }
}

impl HttpContext for Recorder {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        log::info!("recorder {}: on_request_headers {}", self.label, self.id);
        log::info!(
            "recorder {}: early duration={} response.size={} upstream={} request.time={}",
            self.label,
            self.int(&["request", "duration"]),
            self.int(&["response", "size"]),
            self.text(&["upstream", "address"]),
            self.int(&["request", "time"]),
        );
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
        let ints = [
            "request.time",
            "request.duration",
            "request.size",
            "request.total_size",
            "response.size",
            "response.total_size",
            "source.port",
            "destination.port",
            "connection.id",
            "upstream.port",
            "response.code",
            "response.flags",
            "response.grpc_status",
        ]
        .map(|name| {
            let path: Vec<&str> = name.split('.').collect();
            format!("{name}={}", self.int(&path))
        });
        let texts = [
            "source.address",
            "destination.address",
            "upstream.address",
            "request.useragent",
            "response.headers.content-type",
            "response.code_details",
        ]
            .map(|name| {
                let path: Vec<&str> = name.split('.').collect();
                format!("{name}={}", self.text(&path))
            });
        let (request_names, agent) = self.map(&["request", "headers"], "user-agent");
        let (response_names, _) = self.map(&["response", "headers"], "");
        let maps = format!(
            "request.headers={request_names} request.headers[user-agent]={agent} response.headers={response_names}"
        );
        log::info!("recorder {}: attributes {} {} {maps}", self.label, ints.join(" "), texts.join(" "));
    }
}
