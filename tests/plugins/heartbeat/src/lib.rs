//! Timers (`on_tick`) and an HTTP call-out from a root context. Root contexts play one of two
//! roles, told apart by the callback they get:
//!
//! - The VM root context (the one that gets `on_vm_start`): sets a 20 ms tick period. Each
//!   `on_tick` counts its own ticks and adds 1 to the shared-data key `heartbeat.ticks` (ASCII
//!   decimal, compare-and-swap; absent or unparsable → 0; up to 1000 tries on CasMismatch). On its
//!   5th tick it sets the tick period to 0 (stop): each VM adds exactly 5 when ticks are delivered
//!   as asked.
//! - A plugin context (gets `on_configure` with a non-empty configuration, a JSON object
//!   `{"upstream": "<cluster>"}`): sets a 50 ms tick period. On its first tick it sets the period
//!   to 0 and dispatches one HTTP call to `upstream`: headers `:method: GET`, `:path: /heartbeat`,
//!   `:authority: hb.local`, no body, no trailers, timeout 1 s. `on_http_call_response` stores the
//!   call's `:status` (`failed` when `num_headers == 0`) into shared-data key `heartbeat.call`
//!   (unconditional set). When the dispatch itself fails it stores
//!   `dispatch-failed:<Status Debug>` (e.g. `dispatch-failed:InternalFailure`) instead.
//!   An empty configuration is accepted (no timer, no call); a non-empty one that is not a JSON
//!   object with a string `upstream` is rejected (`on_configure` returns false).
//!
//! A root context that got both callbacks does both jobs (the period last set wins) and stops its
//! timer once both are done. Any tick after that (or to a root context with neither role) sets the
//! period to 0 again.
//!
//! HTTP contexts (every request) answer locally 200, body
//! `ticks=<heartbeat.ticks, or 0 when absent> call=<heartbeat.call, or none when absent>
//! local=<ticks this VM's root context counted>` (the last one is per worker, free of the
//! create race the ABI's shared data has on a key's first write).
//!
//! SDK notes: `proxy_on_tick` must name a root context id (any other id traps: "invalid
//! context_id"); ticks are per root context, so the host must remember which root context called
//! `proxy_set_tick_period_milliseconds`. The call-out's response is routed by token to the root
//! context that dispatched it (the SDK calls `proxy_set_effective_context(<root id>)` first).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Ticks counted by this VM (this worker), read by HTTP contexts.
static LOCAL_TICKS: AtomicU32 = AtomicU32::new(0);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

const VM_TICKS: u32 = 5;

#[derive(Default)]
struct Root {
    /// Got `on_vm_start`: the 20 ms / 5 ticks job.
    vm: bool,
    ticks: u32,
    /// Got a configuration: the one-call job.
    upstream: Option<String>,
    dispatched: bool,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, _body_size: usize, _num_trailers: usize) {
        let result = if num_headers == 0 {
            "failed".to_string()
        } else {
            self.get_http_call_response_header(":status").unwrap_or_default()
        };
        store_call(&result);
    }
}

fn store_call(result: &str) {
    if let Err(e) = hostcalls::set_shared_data("heartbeat.call", Some(result.as_bytes()), None) {
        log::warn!("heartbeat: storing heartbeat.call failed: {e:?}");
    }
}

fn parse(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Adds 1 to the decimal value under `key` with compare-and-swap; `None` after 1000 mismatches.
fn increment(key: &str) -> Option<u64> {
    for _ in 0..1000 {
        let (value, cas) = hostcalls::get_shared_data(key).unwrap();
        let next = parse(value.as_deref()) + 1;
        match hostcalls::set_shared_data(key, Some(next.to_string().as_bytes()), cas) {
            Ok(()) => return Some(next),
            Err(_) => continue, // CasMismatch; the SDK traps on any other failure
        }
    }
    None
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm = true;
        self.set_tick_period(Duration::from_millis(20));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self.get_plugin_configuration().unwrap_or_default();
        if text.iter().all(u8::is_ascii_whitespace) {
            return true;
        }
        let upstream = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("upstream").and_then(|u| u.as_str()).map(String::from));
        let Some(upstream) = upstream else {
            log::error!("heartbeat: configuration is not {{\"upstream\": \"<cluster>\"}}");
            return false;
        };
        self.upstream = Some(upstream);
        self.set_tick_period(Duration::from_millis(50));
        true
    }

    fn on_tick(&mut self) {
        if self.vm && self.ticks < VM_TICKS {
            self.ticks += 1;
            LOCAL_TICKS.store(self.ticks, Ordering::Relaxed);
            if increment("heartbeat.ticks").is_none() {
                log::warn!("heartbeat: gave up after 1000 CAS mismatches");
            }
        }
        if let (Some(upstream), false) = (&self.upstream, self.dispatched) {
            self.dispatched = true;
            let headers = vec![(":method", "GET"), (":path", "/heartbeat"), (":authority", "hb.local")];
            if let Err(e) = self.dispatch_http_call(upstream, headers, None, vec![], Duration::from_secs(1)) {
                store_call(&format!("dispatch-failed:{e:?}"));
            }
        }
        let vm_done = !self.vm || self.ticks >= VM_TICKS;
        let call_done = self.upstream.is_none() || self.dispatched;
        if vm_done && call_done {
            self.set_tick_period(Duration::from_millis(0));
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Report))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Report;

impl Context for Report {}

impl HttpContext for Report {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (ticks, _) = self.get_shared_data("heartbeat.ticks");
        let (call, _) = self.get_shared_data("heartbeat.call");
        let body = format!(
            "ticks={} call={} local={}",
            parse(ticks.as_deref()),
            call.map(|c| String::from_utf8_lossy(&c).into_owned()).unwrap_or_else(|| "none".into()),
            LOCAL_TICKS.load(Ordering::Relaxed)
        );
        self.send_http_response(200, vec![], Some(body.as_bytes()));
        Action::Pause
    }
}
