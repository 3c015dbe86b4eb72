//! Test plugin: a gate that lets one request of its PluginContext through at a time, and a
//! last flush when the context goes — the two Envoy behaviours a plugin reaches beyond its own
//! callback with.
//!
//! - Each PluginContext (configuration: a JSON object, optional string `flush`, a call-out
//!   target) keeps a gate. A request that finds the gate free takes it; one that finds it taken
//!   gets the request header `x-held: yes`, is queued, and pauses (`Action::Pause`, nothing in
//!   flight). When the request holding the gate logs (`on_log`), the gate passes to the oldest
//!   queued request: `proxy_set_effective_context(<its id>)`, its `x-held` header set to
//!   `released`, then `resume_http_request`, all from another request's callback. With nobody
//!   queued the gate is free again.
//! - `on_done` of a PluginContext whose configuration names `flush`: logs `gatekeeper:
//!   flushing`, dispatches `GET /flush` (`:authority: flush`, timeout 5 s) to that target and
//!   returns false (not finished). Its `on_http_call_response` logs `gatekeeper: flushed
//!   <status>` and calls `done()` (`proxy_done`); `on_delete` is not overridden by the SDK, so
//!   the flush is the whole proof: the host must keep the context, answer its call, and accept
//!   its `proxy_done`. Without `flush` (or on a dispatch error) `on_done` returns true.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Gate {
    taken: bool,
    queued: VecDeque<u32>,
}

#[derive(Default)]
struct Root {
    gate: Rc<RefCell<Gate>>,
    flush: Option<String>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        let Some(target) = self.flush.clone() else {
            return true;
        };
        log::info!("gatekeeper: flushing");
        let headers = vec![(":method", "GET"), (":path", "/flush"), (":authority", "flush")];
        self.dispatch_http_call(&target, headers, None, vec![], Duration::from_secs(5))
            .is_err()
    }

    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".into());
        log::info!("gatekeeper: flushed {status}");
        self.done();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let conf = self.get_plugin_configuration().unwrap_or_default();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&conf) else {
            return false;
        };
        self.flush = v.get("flush").and_then(|f| f.as_str()).map(str::to_string);
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id: context_id,
            gate: self.gate.clone(),
            holds: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    id: u32,
    gate: Rc<RefCell<Gate>>,
    holds: bool,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut gate = self.gate.borrow_mut();
        if !gate.taken {
            gate.taken = true;
            self.holds = true;
            return Action::Continue;
        }
        self.set_http_request_header("x-held", Some("yes"));
        gate.queued.push_back(self.id);
        // It holds the gate from the moment it is let go.
        self.holds = true;
        Action::Pause
    }

    fn on_log(&mut self) {
        if !self.holds {
            return;
        }
        let mut gate = self.gate.borrow_mut();
        // Ended while still queued (its client left): it never held the gate.
        if let Some(at) = gate.queued.iter().position(|id| *id == self.id) {
            gate.queued.remove(at);
            return;
        }
        // A queued request deleted meanwhile is refused by the host: the next one, then.
        while let Some(next) = gate.queued.pop_front() {
            if hostcalls::set_effective_context(next).is_ok() {
                // The held request's headers, changed from this one's callback (the SDK
                // panics on any answer but Ok).
                self.set_http_request_header("x-held", Some("released"));
                self.resume_http_request();
                return;
            }
        }
        gate.taken = false;
    }
}
