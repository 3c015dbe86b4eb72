//! Shared queues. No configuration.
//!
//! - The VM root context's `on_vm_start` registers the queue `jobs` (`register_shared_queue`; the
//!   SDK traps unless the host answers Ok) and keeps its id.
//! - `on_queue_ready(queue_id)` (on that root context) dequeues from `queue_id` until the host says
//!   Empty; for each item it adds 1 to shared-data key `queue.consumed` (ASCII decimal,
//!   compare-and-swap, absent → 0, up to 1000 tries) and sets `queue.last` to the item
//!   (unconditional). A NotFound from dequeue is logged (`queue: dequeue failed: NotFound`) and
//!   ends the loop. A `queue_id` other than the registered one still gets drained, after a
//!   warning `queue: on_queue_ready for queue <id>, registered <Some(id)|None>`.
//! - HTTP contexts, by request `:path`:
//!   - starts with `/queue/push` → item = the raw (not percent-decoded) value of query parameter
//!     `item` (empty when absent); `resolve_shared_queue("", "jobs")` (empty vm_id), then
//!     `enqueue_shared_queue(id, Some(item))`; answers locally 200 `queued`, or 500 with body
//!     `NotFound` when resolve found no queue, or 500 with the enqueue error's Debug (`NotFound`).
//!   - starts with `/queue/stats` → answers locally 200
//!     `consumed=<queue.consumed, 0 when absent> last=<queue.last, none when absent>`.
//!   - anything else → `Continue`, untouched.
//!
//! SDK notes: `resolve_shared_queue` passes the vm_id verbatim (here an empty string: pointer
//! non-null but dangling, length 0) and maps NotFound to `None`; `dequeue_shared_queue` maps Empty
//! to `Ok(None)`; `proxy_on_queue_ready` must name a root context id (other ids trap), so the host
//! must deliver it to the root context that registered the queue.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { queue: None }) });
}}

struct Root {
    queue: Option<u32>,
}

impl Context for Root {}

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

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.queue = Some(self.register_shared_queue("jobs"));
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.queue != Some(queue_id) {
            log::warn!("queue: on_queue_ready for queue {queue_id}, registered {:?}", self.queue);
        }
        loop {
            match self.dequeue_shared_queue(queue_id) {
                Ok(Some(item)) => {
                    if increment("queue.consumed").is_none() {
                        log::warn!("queue: gave up after 1000 CAS mismatches");
                    }
                    if let Err(e) = self.set_shared_data("queue.last", Some(&item), None) {
                        log::warn!("queue: storing queue.last failed: {e:?}");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("queue: dequeue failed: {e:?}");
                    break;
                }
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Jobs))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Jobs;

impl Context for Jobs {}

impl HttpContext for Jobs {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with("/queue/push") {
            let item = query_param(&path, "item").unwrap_or("");
            let result = match self.resolve_shared_queue("", "jobs") {
                Some(id) => self.enqueue_shared_queue(id, Some(item.as_bytes())),
                None => Err(Status::NotFound),
            };
            match result {
                Ok(()) => self.send_http_response(200, vec![], Some(b"queued")),
                Err(e) => self.send_http_response(500, vec![], Some(format!("{e:?}").as_bytes())),
            }
            return Action::Pause;
        }
        if path.starts_with("/queue/stats") {
            let (consumed, _) = self.get_shared_data("queue.consumed");
            let (last, _) = self.get_shared_data("queue.last");
            let body = format!(
                "consumed={} last={}",
                parse(consumed.as_deref()),
                last.map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_else(|| "none".into())
            );
            self.send_http_response(200, vec![], Some(body.as_bytes()));
            return Action::Pause;
        }
        Action::Continue
    }
}
