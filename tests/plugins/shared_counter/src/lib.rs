//! A request counter in shared data (key `counter`, ASCII decimal), shared by every VM that sees
//! the same shared-data store. No configuration. By request `:path`:
//!
//! - starts with `/counter/read` → answers locally 200, no extra headers, body = the current
//!   `counter` value in decimal (`0` when the key is absent); does not increment.
//! - starts with `/counter/big` → sets key `big` (unconditionally, cas 0) to `N` bytes of `x`,
//!   `N` from the query parameter `size` (`?size=N`; absent or not a number → 0) and answers
//!   locally 200 body `ok` when the host said Ok, else 507 body = the status name, e.g.
//!   `InternalFailure` (the Debug of the SDK's `Status`; codes the SDK lacks print as the ABI's
//!   names, e.g. `Unimplemented`, or `Status(<n>)`). Does not increment. Calls
//!   `proxy_set_shared_data` through its own import, because the SDK traps on any status but Ok
//!   and CasMismatch.
//! - anything else → increments `counter` by compare-and-swap (`get_shared_data`; absent or
//!   unparsable → 0; `set_shared_data("counter", Some(n+1), cas)`; on CasMismatch it starts over,
//!   at most 1000 tries), returns `Continue`, and adds the response header `x-counter: <new value>`
//!   in `on_http_response_headers`. When all 1000 tries mismatch, it logs a warning
//!   `shared_counter: gave up after 1000 CAS mismatches` and adds no `x-counter`.
//!
//! SDK note: when the key is absent `get_shared_data` reports no cas, so the first increment is an
//! unconditional set (cas 0): concurrent first increments can lose counts. Counting tests should
//! send one request before going concurrent.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Counter { value: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Counter {
    value: Option<u64>,
}

impl Context for Counter {}

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

fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[link(wasm_import_module = "env")]
extern "C" {
    /// The ABI function itself, so that any status comes back (the SDK's wrapper traps).
    fn proxy_set_shared_data(key: *const u8, key_len: usize, value: *const u8, value_len: usize, cas: u32) -> u32;
}

fn status_name(code: u32) -> String {
    let known = match code {
        0 => Status::Ok,
        1 => Status::NotFound,
        2 => Status::BadArgument,
        3 => Status::SerializationFailure,
        4 => Status::ParseFailure,
        7 => Status::Empty,
        8 => Status::CasMismatch,
        10 => Status::InternalFailure,
        5 => return "BadExpression".into(),
        6 => return "InvalidMemoryAccess".into(),
        9 => return "ResultMismatch".into(),
        11 => return "BrokenConnection".into(),
        12 => return "Unimplemented".into(),
        n => return format!("Status({n})"),
    };
    format!("{known:?}")
}

impl HttpContext for Counter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with("/counter/read") {
            let (value, _) = self.get_shared_data("counter");
            let body = parse(value.as_deref()).to_string();
            self.send_http_response(200, vec![], Some(body.as_bytes()));
            return Action::Pause;
        }
        if path.starts_with("/counter/big") {
            let size = query_param(&path, "size").and_then(|s| s.parse().ok()).unwrap_or(0);
            let value = vec![b'x'; size];
            let key = "big";
            let code = unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) };
            if code == 0 {
                self.send_http_response(200, vec![], Some(b"ok"));
            } else {
                self.send_http_response(507, vec![], Some(status_name(code).as_bytes()));
            }
            return Action::Pause;
        }
        self.value = increment("counter");
        if self.value.is_none() {
            log::warn!("shared_counter: gave up after 1000 CAS mismatches");
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Some(v) = self.value {
            self.add_http_response_header("x-counter", &v.to_string());
        }
        Action::Continue
    }
}
