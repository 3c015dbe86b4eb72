//! What host functions see: the plugin, and — during an HTTP callback — the request's state.

use crate::head::Head;
use crate::map::Pairs;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::StoreLimits;

/// Facts a plugin may read as properties, supplied by the gateway (for a route: shared by its
/// requests, so a request costs no allocation for them).
pub trait Properties: Send + Sync {
    /// The value at `path` (segments as the plugin sent them), or None. `request` is the
    /// request as plugins left it so far, `from` the client it came from.
    fn get(&self, path: &[&str], request: &Head, from: &Downstream) -> Option<Vec<u8>>;
}

/// What the TLS listener knows of a client connection.
#[derive(Debug)]
pub struct TlsInfo {
    /// The name it asked for in the handshake (`$ssl_server_name`); None: it sent none.
    pub sni: Option<Arc<str>>,
    /// `$ssl_protocol`: `TLSv1.2` or `TLSv1.3`.
    pub protocol: &'static str,
    /// `$ssl_cipher`, as OpenSSL names it (nginx's log lines read the same).
    pub cipher: &'static str,
    /// `$ssl_session_reused`: the handshake resumed an earlier session.
    pub reused: bool,
    /// The name its certificate was chosen for: the SNI, else `fallback_sni`.
    pub name: Arc<str>,
    /// Which content of which SSL object the handshake was made with (the worker's `Site`
    /// salt): requests are checked against the object as it is now.
    pub site: u64,
    /// Its SSL object asks for client certificates (`client`).
    pub mtls: bool,
    /// The certificate the client showed, checked against the object's CAs
    /// (`$ssl_client_verify` `SUCCESS`, Envoy's `connection.mtls`). None: it showed none.
    pub peer: Option<Box<PeerCert>>,
    /// The only paths this client may ask for: its SSL object lets clients without a
    /// certificate in for these (`client.skip_mtls_uri_regex`), and it showed none.
    pub mtls_skip: Option<Arc<wasmgate_shared::model::MtlsSkip>>,
}

impl TlsInfo {
    /// nginx's `$ssl_session_reused`: `r` for a resumed session, else `.`.
    pub fn reused_text(&self) -> &'static str {
        if self.reused {
            "r"
        } else {
            "."
        }
    }

    /// nginx's `$ssl_client_verify`: `SUCCESS` for a certificate the SSL object's CAs
    /// issued, `NONE` without one (a certificate that fails the check fails the handshake).
    pub fn client_verify(&self) -> &'static str {
        match self.peer {
            Some(_) => "SUCCESS",
            None => "NONE",
        }
    }
}

/// The certificate a client showed, as variables and attributes show it.
#[derive(Debug)]
pub struct PeerCert {
    /// The SHA-256 of its DER, lower-case hex (Envoy's
    /// `connection.sha256_peer_certificate_digest`).
    pub sha256: String,
    /// The SHA-1 of its DER, lower-case hex (nginx's `$ssl_client_fingerprint`).
    pub sha1: String,
    /// Whom it names (None: X.509 cannot read it, though webpki took it).
    pub holder: Option<wasmgate_shared::tls::Holder>,
}

/// The client side of a request.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub peer: SocketAddr,
    /// The gateway's address the client connected to (`destination.*`).
    pub local: SocketAddr,
    /// The client connection's id, unique on the host (`connection.id`).
    pub connection: u64,
    pub version: http::Version,
    /// The client came over the TLS listener: its SNI (`connection.requested_server_name`),
    /// protocol (`connection.tls_version`) and the rest of `$ssl_*`.
    pub tls: Option<Arc<TlsInfo>>,
    /// When the request's head was read (`request.time`; its wall-clock time is worked out
    /// only when a plugin asks, so requests pay no clock reading for it, and kept).
    pub started: wasmgate_shared::clock::Tick,
}

impl Downstream {
    /// The certificate its client showed (over TLS, to an SSL object that asked for one).
    pub fn peer(&self) -> Option<&PeerCert> {
        self.tls.as_ref()?.peer.as_deref()
    }
}

/// What the log phase knows of a finished request: Envoy's `request.duration`,
/// `request.total_size`, `response.size` (and the request body's size when it had no
/// `Content-Length`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// From the head's arrival to the answer's last byte (`$request_time`).
    pub duration: Duration,
    /// Request body bytes received.
    pub request_body: u64,
    /// The request as it came: head and body.
    pub request_total: u64,
    /// Response body bytes sent.
    pub response_body: u64,
}

/// What a callback did to another request's stream — one it named with
/// `proxy_set_effective_context`, not the one lent to it: the gateway hands it to that request
/// if it is paused (a plugin that holds requests and lets them go on a tick, as in Envoy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// `proxy_continue_stream` and the like: bit 0 the request, bit 1 the response.
    Resume(u8),
    /// `proxy_send_local_response` (or `proxy_close_stream`: a reset).
    Reply(LocalReply),
}

/// A response the plugin asked to send instead of proxying (`proxy_send_local_response`), or
/// no response at all: the stream reset (`proxy_close_stream`, status 0, see
/// [`LocalReply::reset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub details: String,
}

impl LocalReply {
    /// What `proxy_close_stream` of the request or the response leaves: Envoy resets the
    /// stream, so the client gets no answer (or no more of it) and the upstream no more of
    /// the request. It ends the request wherever a local reply would.
    pub fn reset() -> LocalReply {
        LocalReply {
            status: 0,
            headers: Pairs::new(),
            body: Vec::new(),
            details: "wasm_close_stream".into(),
        }
    }

    /// Whether this is a reset, not an answer ([`LocalReply::reset`]).
    pub fn is_reset(&self) -> bool {
        self.status == 0
    }
}

/// Fields written with an answer's head ([`Stream::give_back_response`]); the names are the
/// proxy's constants.
pub type Written = smallvec::SmallVec<[(&'static http::HeaderName, Option<http::HeaderValue>); 3]>;

/// The request (and, in the response phase, the response) a callback works on.
pub struct Stream {
    /// Request headers, pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) first.
    pub request: Head,
    /// Response headers with `:status` first, once the response phase started. Read it
    /// through [`Stream::response_mut`] once the head was sent: the map lacks the fields the
    /// proxy wrote with it until then.
    pub response: Option<Head>,
    /// Fields the proxy wrote with the answer's head that the map given back
    /// ([`Stream::give_back_response`]) does not hold yet: put in at the first read.
    written: Written,
    /// Trailers (empty for HTTP/1.1 requests without trailers).
    pub request_trailers: Pairs,
    pub response_trailers: Pairs,
    /// Read-only request facts (route, nginx variables…).
    pub props: Arc<dyn Properties>,
    pub downstream: Downstream,
    /// Properties the plugin set (`proxy_set_property`), visible to later reads.
    pub set_props: Vec<(String, Vec<u8>)>,
    /// The body bytes a body callback works on (`HttpRequestBody` / `HttpResponseBody`
    /// buffers): what the plugin buffered so far, lent by the body filter for the call.
    pub request_body: BodyBuf,
    pub response_body: BodyBuf,
    /// The node the request went to, once it answered (`upstream.address`).
    pub upstream: Option<Arc<str>>,
    /// Set for the log phase.
    pub totals: Option<Totals>,
    /// `request.time`, worked out at its first read and the same at every later one.
    pub wall_start: std::cell::Cell<Option<std::time::SystemTime>>,
    /// Why the answer is what it is (`response.code_details`, `response.flags`), from the
    /// response phase on; None while unknown.
    pub details: Option<AnswerDetails>,
}

/// Why an answer is what it is, as Envoy tells it to plugins: `response.code_details`
/// (`via_upstream` for the upstream's answer; otherwise what made the gateway answer itself,
/// or the details a plugin gave its local reply) and `response.flags`, Envoy's legacy response
/// flag bits. The gateway's own answers carry it as a response extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerDetails {
    pub details: std::borrow::Cow<'static, str>,
    pub flags: u64,
}

impl AnswerDetails {
    pub const VIA_UPSTREAM: AnswerDetails = AnswerDetails::of("via_upstream", 0);

    pub const fn of(details: &'static str, flags: u64) -> AnswerDetails {
        AnswerDetails {
            details: std::borrow::Cow::Borrowed(details),
            flags,
        }
    }
}

/// Envoy's legacy response flags (`response.flags`) that the gateway's answers can carry.
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    pub const NO_ROUTE_FOUND: u64 = 0x100;
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 0x8000;
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x1_0000;
    pub const DOWNSTREAM_PROTOCOL_ERROR: u64 = 0x4_0000;
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000;
    pub const NO_CLUSTER_FOUND: u64 = 0x100_0000;
}

/// A body buffer lent to plugins. A chunk as received stays shared with the connection's
/// buffer, not copied, until a plugin changes it or more bytes are held back with it: most
/// plugins with body callbacks only look, or let the chunk pass.
#[derive(Debug, Default)]
pub struct BodyBuf {
    /// The bytes while nothing changed them; empty once `owned` holds them.
    shared: Bytes,
    owned: Option<Vec<u8>>,
}

impl BodyBuf {
    pub fn as_slice(&self) -> &[u8] {
        match &self.owned {
            Some(v) => v,
            None => &self.shared,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The bytes to change: a shared chunk becomes the buffer's own first (taken without a
    /// copy when nothing else holds it).
    pub fn to_mut(&mut self) -> &mut Vec<u8> {
        let shared = &mut self.shared;
        self.owned
            .get_or_insert_with(|| Vec::from(std::mem::take(shared)))
    }

    /// `more` after these bytes (moved in whole when this buffer is empty).
    pub fn append(&mut self, more: BodyBuf) {
        if self.is_empty() {
            *self = more;
        } else {
            self.to_mut().extend_from_slice(more.as_slice());
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self.owned {
            Some(v) => Bytes::from(v),
            None => self.shared,
        }
    }
}

impl From<Bytes> for BodyBuf {
    fn from(shared: Bytes) -> BodyBuf {
        BodyBuf {
            shared,
            owned: None,
        }
    }
}

impl Stream {
    pub fn new(request: Head, props: Arc<dyn Properties>, downstream: Downstream) -> Stream {
        Stream {
            request,
            downstream,
            response: None,
            request_trailers: Vec::new(),
            response_trailers: Vec::new(),
            props,
            set_props: Vec::new(),
            request_body: BodyBuf::default(),
            response_body: BodyBuf::default(),
            upstream: None,
            totals: None,
            wall_start: Default::default(),
            details: None,
            written: Written::new(),
        }
    }

    /// Gives the response head back the headers it lent to the answer, once the proxy sent
    /// them with `written` in front (a value, or `None` for a name left out: `Server`, the
    /// request id…). Those go into the map only when a plugin reads it
    /// ([`Stream::response_mut`]): most requests' later callbacks never do, and two map
    /// inserts cost some 400 instructions.
    pub fn give_back_response(&mut self, headers: http::HeaderMap, written: Written) {
        if let Some(head) = self.response.as_mut().filter(|h| h.lent()) {
            head.put_headers(headers);
            self.written = written;
        }
    }

    /// The response head as the client got it, for a plugin to read or change.
    #[inline]
    pub fn response_mut(&mut self) -> Option<&mut Head> {
        if !self.written.is_empty() {
            self.put_written();
        }
        self.response.as_mut()
    }

    #[cold]
    fn put_written(&mut self) {
        let Some(head) = self.response.as_mut() else {
            return;
        };
        // Into the map as the proxy wrote them: not a plugin's change.
        let mut map = head.take_headers();
        for (name, value) in self.written.drain(..) {
            match value {
                Some(v) => {
                    map.insert(name, v);
                }
                None => {
                    map.remove(name);
                }
            }
        }
        head.put_headers(map);
    }
}

/// What one plugin's call-outs in flight may hold in a worker, shared by its instances (an
/// instance made after a fault does not get a fresh budget while the old one's calls are
/// still out): 1,024 calls at once, Envoy's default circuit breaker for a cluster, and no more
/// bytes of requests than the plugin's `memory_limit`. Without it one request could set off a
/// storm of call-outs (each answer dispatching more) that ate the worker's file descriptors
/// and memory, and with them every other route's requests.
#[derive(Debug)]
pub struct CallBudget {
    calls: AtomicUsize,
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Refusals, and when the last report was: one log line per [`REFUSALS_REPORTED_EVERY`]
    /// at most (a storm of call-outs is refused thousands of times a second, each answer
    /// letting one more out).
    refusals: std::sync::Mutex<Refusals>,
}

/// How often refused call-outs are reported, at most.
const REFUSALS_REPORTED_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Refusals {
    since_report: u64,
    reported: Option<Instant>,
}

/// Most call-outs of one plugin in flight in a worker.
pub const MAX_CALLS_IN_FLIGHT: usize = 1024;

impl CallBudget {
    pub fn new(max_bytes: usize) -> CallBudget {
        CallBudget {
            calls: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_bytes,
            refusals: Default::default(),
        }
    }

    /// Room for one more call of `bytes`, held until the [`CallSlot`] drops. Over either
    /// limit: `Err(Some(n))` when the refusals are to be reported now (`n` of them since the
    /// last report, this one included), `Err(None)` otherwise.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Result<CallSlot, Option<u64>> {
        let calls = self.calls.load(Ordering::Relaxed);
        let held = self.bytes.load(Ordering::Relaxed);
        if calls >= MAX_CALLS_IN_FLIGHT || held.saturating_add(bytes) > self.max_bytes {
            return Err(self.refused());
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(CallSlot {
            budget: self.clone(),
            bytes,
        })
    }

    /// Counts a refusal; the count to report, when one is due.
    fn refused(&self) -> Option<u64> {
        let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        r.since_report += 1;
        let now = Instant::now();
        if r.reported
            .is_some_and(|at| now.duration_since(at) < REFUSALS_REPORTED_EVERY)
        {
            return None;
        }
        r.reported = Some(now);
        Some(std::mem::take(&mut r.since_report))
    }

    /// Calls in flight, and the bytes of their requests.
    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.calls.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// One call-out's room in its plugin's [`CallBudget`], given back when it drops (the answer
/// came, or the call failed or was dropped).
#[derive(Debug)]
pub struct CallSlot {
    budget: Arc<CallBudget>,
    bytes: usize,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.budget.calls.fetch_sub(1, Ordering::Relaxed);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// An HTTP call-out a plugin dispatched (`proxy_http_call`), for the gateway to perform.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    /// The context that dispatched it (whose request may wait on it).
    pub context: u32,
    /// Its root context, which gets `proxy_on_http_call_response`.
    pub root: u32,
    /// An upstream id, or a literal `host:port`.
    pub target: String,
    /// With `:method`, `:path` and `:authority`.
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    /// None: no limit of its own (`timeout_milliseconds` 0).
    pub timeout: Option<Duration>,
    /// Its room in the plugin's [`CallBudget`], held while it is out.
    pub slot: Arc<CallSlot>,
}

/// Whether a `proxy_http_call` target names something the gateway can call. Asked when the
/// plugin dispatches: Envoy answers BadArgument at once for a cluster it does not know, and
/// the SDKs hand that status to the plugin, where a failed call would only show later.
pub trait CallTargets: Send + Sync {
    fn knows(&self, target: &str) -> bool;
}

/// The gateway's [`CallTargets`], shared by every instance of its plugins. Filled in once the
/// gateway can answer: VMs start (and may dispatch from `proxy_on_vm_start`) before its
/// call-out client exists, and until then every non-empty target is taken.
#[derive(Clone, Default)]
pub struct Targets(Arc<std::sync::OnceLock<Arc<dyn CallTargets>>>);

impl Targets {
    pub fn set(&self, t: Arc<dyn CallTargets>) {
        let _ = self.0.set(t);
    }

    pub fn knows(&self, target: &str) -> bool {
        !target.is_empty()
            && match self.0.get() {
                Some(t) => t.knows(target),
                None => true,
            }
    }
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Targets(set)"
        } else {
            "Targets(any)"
        })
    }
}

/// The answer to an [`HttpCall`], readable during `proxy_on_http_call_response`.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    /// `:status` first. Empty when the call broke after its answer began (or its answer was
    /// too long): Envoy's "reset", the only failure plugins see without headers.
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

impl CallResponse {
    /// The answer a call gets when it fails before its node answers, as Envoy's async client
    /// makes it from its router's local reply: 503 when the node cannot be reached or drops
    /// the call, 504 when the call's timeout ends first, with a text body saying why. Plugins
    /// read `:status` of every call's answer; in Envoy only a reset has none.
    pub fn local(status: u16, body: &str) -> CallResponse {
        CallResponse {
            headers: vec![
                (":status".into(), status.to_string().into_bytes()),
                ("content-length".into(), body.len().to_string().into_bytes()),
                ("content-type".into(), b"text/plain".to_vec()),
            ],
            body: body.as_bytes().to_vec(),
            trailers: Vec::new(),
        }
    }

    /// The answer to a call whose timeout ended before its node answered.
    pub fn timed_out() -> CallResponse {
        CallResponse::local(504, "upstream request timeout")
    }
}

/// The store data of one plugin VM.
pub struct HostState {
    /// The instance's `memory` and allocator exports, looked up once at instantiation.
    pub memory: Option<wasmtime::Memory>,
    pub alloc: Option<wasmtime::TypedFunc<i32, i32>>,
    pub plugin_name: Arc<str>,
    /// What `plugin_root_id` answers (`wasm.plugins[].root_id`, default the name).
    pub root_id: Arc<str>,
    /// Header names this instance passed lately, parsed (see [`crate::head::NameMemo`]).
    pub names: crate::head::NameMemo,
    /// Short header values this instance set lately, checked (see [`crate::head::Memo`]).
    pub values: crate::head::ValueMemo,
    /// The buffer `proxy_get_shared_data` copies a value into before handing it over, kept
    /// from call to call (up to 64 KiB).
    pub shared_value: Vec<u8>,
    /// The error-log level as the plugin sees it (`proxy_get_log_level`).
    pub log_level: u32,
    pub limits: StoreLimits,
    /// `PluginConfiguration` buffer, set around `proxy_on_configure`.
    pub plugin_config: Vec<u8>,
    /// `VmConfiguration` buffer, set around `proxy_on_vm_start`.
    pub vm_config: Vec<u8>,
    /// Set only during an HTTP callback.
    pub stream: Option<Box<Stream>>,
    /// Set by `proxy_send_local_response` during a callback.
    pub local_reply: Option<LocalReply>,
    /// The context id the current callback runs for, or the one set with
    /// `proxy_set_effective_context`.
    pub effective_context: u32,
    /// The contexts this instance created and has not deleted: `proxy_set_effective_context`
    /// with any other id is a BadArgument, as in proxy-wasm-cpp-host.
    pub live_contexts: foldhash::HashSet<u32>,
    /// The context the current callback was called for (before any
    /// `proxy_set_effective_context`).
    pub invoked: u32,
    /// The HttpContext whose stream is lent to the current callback (0 when none is).
    pub stream_owner: u32,
    /// The stream lent to the current callback while the plugin made another request's
    /// context effective (see `proxy_set_effective_context`).
    pub hidden_stream: Option<Box<Stream>>,
    /// The streams of paused requests, by HttpContext id, left with the VM while they wait
    /// ([`PluginVm::park`](crate::PluginVm::park)): a callback that makes one's context
    /// effective reads and changes that request, as Envoy lets it.
    pub parked: foldhash::HashMap<u32, Box<Stream>>,
    /// The context whose parked stream is in `stream` now (0: none).
    pub lent: u32,
    /// What callbacks did to other requests' streams, since the gateway last collected it.
    pub foreign: Vec<(u32, Foreign)>,
    /// Root contexts whose `proxy_on_done` returned false: alive until they call `proxy_done`.
    pub pending_done: foldhash::HashSet<u32>,
    /// Those of them that called `proxy_done`, not yet deleted (the gateway deletes them after
    /// the callback, as proxy-wasm-cpp-host does).
    pub done_now: Vec<u32>,
    /// The root context of the context the current callback runs on: call-outs answer to it,
    /// and its ticks and queue registrations are its own (Envoy's `root_context()`).
    pub root_context: u32,
    /// Tick periods the root contexts asked for (`proxy_set_tick_period_milliseconds`), by
    /// context id; 0 stops ticks.
    pub tick_periods: HashMap<u32, u32>,
    /// Set when a tick period changed, so the gateway reschedules its tick timer.
    pub ticks_changed: bool,
    /// The root contexts that set their period since the gateway last asked: each set starts
    /// the period again from then, the same period included (as Envoy makes a new timer).
    pub ticks_restarted: Vec<u32>,
    /// Call-outs dispatched since the gateway last collected them.
    pub calls: Vec<HttpCall>,
    pub next_token: u32,
    /// Set during `proxy_on_http_call_response`.
    pub call_response: Option<CallResponse>,
    /// What `proxy_http_call` may target (the plugin's [`Settings`](crate::Settings)).
    pub targets: Targets,
    /// What its call-outs in flight may hold (the plugin's [`Settings`](crate::Settings)).
    pub call_budget: Arc<CallBudget>,
    /// Shared queues this VM registered: (token, registering root context).
    pub queue_regs: Vec<(u32, u32)>,
    /// Set when `queue_regs` grew.
    pub queues_changed: bool,
    /// Set by `proxy_continue_stream` (or the older `proxy_continue_request/response`)
    /// during a callback.
    pub resumed: u8,
    /// Log lines left in the current second (a log flood is cut, not written).
    pub log_gate: Arc<crate::rate::LogGate>,
    /// What the plugin wrote to stdout and stderr short of a newline.
    pub stdio: crate::wasi::Stdio,
    /// The monotonic clock WASI gives the plugin.
    pub monotonic: crate::wasi::Monotonic,
    pub wasi: wasmtime_wasi::p1::WasiP1Ctx,
}

impl HostState {
    /// Puts a parked stream lent to the current callback back with the others. Asked after
    /// every callback, and nearly never true: the work is out of line.
    #[inline]
    pub(crate) fn give_back_lent(&mut self) {
        if self.lent != 0 {
            self.give_back_lent_now();
        }
    }

    #[cold]
    #[inline(never)]
    fn give_back_lent_now(&mut self) {
        if let Some(s) = self.stream.take() {
            self.parked.insert(self.lent, s);
        }
        self.lent = 0;
    }

    /// The context a resume or a local reply is for when it is not the current callback's
    /// own stream: the effective context, when the plugin set it to another one.
    pub(crate) fn foreign_target(&self) -> Option<u32> {
        let t = self.effective_context;
        (t != self.invoked && t != self.stream_owner && t != self.root_context).then_some(t)
    }

    /// The plugin's unfinished stdout and stderr lines, and where finished ones go.
    pub fn stdio_and_log(&mut self) -> (&mut crate::wasi::Stdio, impl Fn(i32, &[u8]) + '_) {
        let (name, gate) = (&self.plugin_name, &self.log_gate);
        let log = move |level: i32, text: &[u8]| crate::abi::log_line(name, gate, level, text);
        (&mut self.stdio, log)
    }
}

/// Proxy-Wasm status codes returned by host functions.
pub use wasmgate_abi::Status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_chunk_is_lent_as_received_until_changed() {
        let chunk = Bytes::from_static(b"hello");
        let mut buf = BodyBuf::from(chunk.clone());
        assert_eq!(buf.as_slice().as_ptr(), chunk.as_ptr(), "not copied");
        // Held back with more: now the buffer's own.
        buf.append(BodyBuf::from(Bytes::from_static(b" world")));
        assert_eq!(buf.as_slice(), b"hello world");
        buf.to_mut().truncate(5);
        assert_eq!(buf.len(), 5);
        assert_eq!(&buf.into_bytes()[..], b"hello");
        // Into an empty buffer a chunk moves whole, and leaves as it came.
        let mut empty = BodyBuf::default();
        assert!(empty.is_empty());
        empty.append(BodyBuf::from(chunk.clone()));
        assert_eq!(empty.into_bytes().as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn call_outs_hold_their_room_until_they_end() {
        let budget = Arc::new(CallBudget::new(100));
        let a = budget.take(60).unwrap();
        assert_eq!(
            budget.take(60).err(),
            Some(Some(1)),
            "over the bytes: reported"
        );
        assert_eq!(budget.take(60).err(), Some(None), "not again so soon");
        drop(a);
        assert_eq!(budget.in_flight(), (0, 0));
        let held: Vec<_> = (0..MAX_CALLS_IN_FLIGHT)
            .map(|_| budget.take(0).unwrap())
            .collect();
        assert_eq!(
            budget.take(0).err(),
            Some(None),
            "over the count, within the window"
        );
        drop(held);
        assert!(budget.take(100).is_ok());
        // A window later, the refusals since the last report are reported with their count.
        budget.refusals.lock().unwrap().reported = Some(Instant::now() - REFUSALS_REPORTED_EVERY);
        let _full = budget.take(100).unwrap();
        assert_eq!(budget.take(1).err(), Some(Some(3)));
    }
}
