//! Metrics. No configuration.
//!
//! - The VM root context's `on_vm_start` defines, in this order, `wasm_requests_total` (Counter),
//!   `wasm_last_path_len` (Gauge) and `wasm_path_len` (Histogram) with `define_metric` (names
//!   passed as they are; the SDK traps unless the host answers Ok) and keeps their ids for the
//!   whole VM (plugin contexts and HTTP contexts use them).
//! - HTTP contexts, `on_http_request_headers`, every request: with `len` = the byte length of the
//!   request `:path` (query included): `increment_metric(counter, 1)`,
//!   `record_metric(gauge, len)`, `record_metric(histogram, len)`, in that order. The first that
//!   fails ends the request: local 500, header `x-metrics-error: <increment|gauge|histogram>`,
//!   body = the error's Debug (e.g. `NotFound`). Ids missing (no `on_vm_start` ran) → local 500,
//!   header `x-metrics-error: undefined`, body `metrics not defined`.
//!   Then, path starting with `/metrics/read` → local 200, body `requests=<get_metric(counter)>`
//!   (this request already counted); a failing `get_metric` → 500, header
//!   `x-metrics-error: get`, body = the error's Debug. Any other path → `Continue`, and
//!   `on_http_response_headers` adds `x-metrics: ok` (only then: never on this plugin's own local
//!   responses, even when the host runs response callbacks for them).
//!
//! SDK notes: `define_metric` traps on any status but Ok; `increment_metric` and `get_metric`
//! return NotFound and BadArgument as errors, `record_metric` only NotFound (other statuses trap).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::cell::Cell;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

#[derive(Clone, Copy)]
struct Ids {
    requests: u32,
    last_path_len: u32,
    path_len: u32,
}

thread_local! {
    static IDS: Cell<Option<Ids>> = const { Cell::new(None) };
}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let ids = Ids {
            requests: hostcalls::define_metric(MetricType::Counter, "wasm_requests_total").unwrap(),
            last_path_len: hostcalls::define_metric(MetricType::Gauge, "wasm_last_path_len").unwrap(),
            path_len: hostcalls::define_metric(MetricType::Histogram, "wasm_path_len").unwrap(),
        };
        IDS.with(|c| c.set(Some(ids)));
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Metrics { passed: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Metrics {
    /// The request went on upstream (no local response from this plugin).
    passed: bool,
}

impl Context for Metrics {}

impl Metrics {
    fn fail(&self, op: &str, body: &str) -> Action {
        self.send_http_response(500, vec![("x-metrics-error", op)], Some(body.as_bytes()));
        Action::Pause
    }
}

impl HttpContext for Metrics {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(ids) = IDS.with(Cell::get) else {
            return self.fail("undefined", "metrics not defined");
        };
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let len = path.len() as u64;
        if let Err(e) = hostcalls::increment_metric(ids.requests, 1) {
            return self.fail("increment", &format!("{e:?}"));
        }
        if let Err(e) = hostcalls::record_metric(ids.last_path_len, len) {
            return self.fail("gauge", &format!("{e:?}"));
        }
        if let Err(e) = hostcalls::record_metric(ids.path_len, len) {
            return self.fail("histogram", &format!("{e:?}"));
        }
        if path.starts_with("/metrics/read") {
            return match hostcalls::get_metric(ids.requests) {
                Ok(n) => {
                    self.send_http_response(200, vec![], Some(format!("requests={n}").as_bytes()));
                    Action::Pause
                }
                Err(e) => self.fail("get", &format!("{e:?}")),
            };
        }
        self.passed = true;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.passed {
            self.add_http_response_header("x-metrics", "ok");
        }
        Action::Continue
    }
}
