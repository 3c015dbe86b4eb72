//! What host functions see: the plugin, and — during an HTTP callback — the request's state.

use crate::map::Pairs;
use std::sync::Arc;
use wasmtime::StoreLimits;

/// Per-request facts a plugin may read as properties, supplied by the gateway.
pub trait Properties: Send + Sync {
    /// The value at `path` (segments as the plugin sent them), or None.
    fn get(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// A response the plugin asked to send instead of proxying (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub details: String,
}

/// The request (and, in the response phase, the response) a callback works on.
pub struct Stream {
    /// Request headers, pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) first.
    pub request: Pairs,
    /// Response headers with `:status` first, once the response phase started.
    pub response: Option<Pairs>,
    /// Trailers (empty for HTTP/1.1 requests without trailers).
    pub request_trailers: Pairs,
    pub response_trailers: Pairs,
    /// Read-only request facts (client address, route, nginx variables…).
    pub props: Arc<dyn Properties>,
    /// Properties the plugin set (`proxy_set_property`), visible to later reads.
    pub set_props: Vec<(String, Vec<u8>)>,
}

impl Stream {
    pub fn new(request: Pairs, props: Arc<dyn Properties>) -> Stream {
        Stream {
            request,
            response: None,
            request_trailers: Vec::new(),
            response_trailers: Vec::new(),
            props,
            set_props: Vec::new(),
        }
    }
}

/// The store data of one plugin VM.
pub struct HostState {
    pub plugin_name: Arc<str>,
    /// The error-log level as the plugin sees it (`proxy_get_log_level`).
    pub log_level: u32,
    pub limits: StoreLimits,
    /// `PluginConfiguration` buffer, set around `proxy_on_configure`.
    pub plugin_config: Vec<u8>,
    /// `VmConfiguration` buffer, set around `proxy_on_vm_start`.
    pub vm_config: Vec<u8>,
    /// Set only during an HTTP callback.
    pub stream: Option<Stream>,
    /// Set by `proxy_send_local_response` during a callback.
    pub local_reply: Option<LocalReply>,
    /// The context id the current callback runs for, or the one set with
    /// `proxy_set_effective_context`.
    pub effective_context: u32,
    /// The tick period the plugin asked for (ticks are delivered by the complete host).
    pub tick_period_ms: u32,
    /// Log lines left in the current second (a log flood is cut, not written).
    pub log_budget: u32,
    pub log_window: u64,
    pub wasi: wasmtime_wasi::p1::WasiP1Ctx,
}

/// Proxy-Wasm status codes returned by host functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}
