//! Answers every request itself with what the host told it: its configuration, how many times
//! `on_configure` ran in this VM, its context ids, properties and the request headers.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::atomic::{AtomicU32, Ordering};

static CONFIGURES: AtomicU32 = AtomicU32::new(0);
static VM_STARTS: AtomicU32 = AtomicU32::new(0);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, conf: String::new() }) });
}}

struct Root {
    id: u32,
    conf: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        VM_STARTS.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        CONFIGURES.fetch_add(1, Ordering::Relaxed);
        self.conf = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        log::info!("echo: configured root context {} with {}", self.id, self.conf);
        self.conf != "refuse"
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Echo { id, root: self.id, conf: self.conf.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Echo {
    id: u32,
    root: u32,
    conf: String,
}

impl Context for Echo {}

fn esc(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

impl Echo {
    fn prop(&self, path: &[&str]) -> String {
        self.get_property(path.to_vec())
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_else(|| "<none>".into())
    }
}

impl HttpContext for Echo {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let headers: Vec<String> = self
            .get_http_request_headers()
            .iter()
            .map(|(k, v)| format!("[\"{}\",\"{}\"]", esc(k), esc(v)))
            .collect();
        let body = format!(
            "{{\"conf\":\"{}\",\"configures\":{},\"vm_starts\":{},\"context_id\":{},\"root_id\":{},\"plugin_name\":\"{}\",\"plugin_root_id\":\"{}\",\"route_name\":\"{}\",\"xds_route_name\":\"{}\",\"protocol\":\"{}\",\"route_id\":\"{}\",\"path\":\"{}\",\"method\":\"{}\",\"host\":\"{}\",\"source\":\"{}\",\"arg_a\":\"{}\",\"scheme\":\"{}\",\"sni\":\"{}\",\"tls_version\":\"{}\",\"ssl_protocol\":\"{}\",\"ssl_server_name\":\"{}\",\"server_port\":\"{}\",\"mtls\":\"{}\",\"peer_digest\":\"{}\",\"client_verify\":\"{}\",\"subject\":\"{}\",\"dns_san\":\"{}\",\"client_dn\":\"{}\",\"headers\":[{}]}}",
            esc(&self.conf),
            CONFIGURES.load(Ordering::Relaxed),
            VM_STARTS.load(Ordering::Relaxed),
            self.id,
            self.root,
            esc(&self.prop(&["plugin_name"])),
            esc(&self.prop(&["plugin_root_id"])),
            esc(&self.prop(&["route_name"])),
            esc(&self.prop(&["xds", "route_name"])),
            esc(&self.prop(&["request", "protocol"])),
            esc(&self.prop(&["route", "id"])),
            esc(&self.prop(&["request", "path"])),
            esc(&self.prop(&["request", "method"])),
            esc(&self.prop(&["request", "host"])),
            esc(&self.prop(&["source", "address"])),
            esc(&self.prop(&["arg_a"])),
            esc(&self.prop(&["request", "scheme"])),
            esc(&self.prop(&["connection", "requested_server_name"])),
            esc(&self.prop(&["connection", "tls_version"])),
            esc(&self.prop(&["ssl_protocol"])),
            esc(&self.prop(&["ssl_server_name"])),
            esc(&self.prop(&["server_port"])),
            // A bool, one byte.
            match self.get_property(vec!["connection", "mtls"]).as_deref() {
                Some([1]) => "true",
                Some([0]) => "false",
                _ => "<none>",
            },
            esc(&self.prop(&["connection", "sha256_peer_certificate_digest"])),
            esc(&self.prop(&["ssl_client_verify"])),
            esc(&self.prop(&["connection", "subject_peer_certificate"])),
            esc(&self.prop(&["connection", "dns_san_peer_certificate"])),
            esc(&self.prop(&["ssl_client_s_dn"])),
            headers.join(",")
        );
        self.send_http_response(200, vec![("content-type", "application/json"), ("x-echo", "1")], Some(body.as_bytes()));
        Action::Pause
    }
}
