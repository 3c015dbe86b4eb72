//! Misbehaves on purpose, as its configuration says: `trap` (panics), `loop` (never returns),
//! `oom` (allocates without bound), `trap-once` (panics on the first request of each VM only).
//! Any other configuration behaves: it adds `x-faulty: ok`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::atomic::{AtomicBool, Ordering};

static TRAPPED: AtomicBool = AtomicBool::new(false);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { mode: String::new() }) });
}}

struct Root {
    mode: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.mode = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Faulty { mode: self.mode.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Faulty {
    mode: String,
}

impl Context for Faulty {}

impl HttpContext for Faulty {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        match self.mode.as_str() {
            "trap" => panic!("faulty: trap as configured"),
            "trap-once" if !TRAPPED.swap(true, Ordering::Relaxed) => panic!("faulty: first request traps"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {
                self.set_http_request_header("x-faulty", Some("ok"));
                Action::Continue
            }
        }
    }
}
