//! wasmgate's Proxy-Wasm host: unmodified SDK plugins (Rust, Go, AssemblyScript, C++) on
//! wasmtime.
//!
//! - [`module`]: the engine, compiling and checking plugin modules (imports, ABI marker);
//! - [`vm`]: one instance, its contexts (VMContext → PluginContext → HttpContext) and the calls
//!   into it, each under a time and memory limit;
//! - [`abi`]: the host functions, grouped by family (logging, buffers, header maps, properties,
//!   stream control, shared data), plus WASI preview1; [`wasi`]: the WASI functions of the
//!   host's own (stdout and stderr to the log, no files, sleeping) where wasmtime-wasi's
//!   would block;
//! - [`head`]: request and response heads as plugins see them (the gateway's header map,
//!   lent without a copy); [`map`]: the serialized header-map format; [`props`]: property names; [`state`]: what the
//!   host functions see during a call.

pub mod abi;
pub mod head;
pub mod module;
pub mod props;
pub mod rate;
pub mod shared;
pub mod state;
pub mod vm;
pub mod wasi;

pub use head::{Head, HeaderList};
pub use module::{PluginModule, Settings};
pub use state::{
    flags, AnswerDetails, BodyBuf, CallResponse, CallTargets, Downstream, Foreign, HttpCall,
    LocalReply, Properties, Stream, Targets, TlsInfo, Totals,
};
pub use vm::{Action, Fault, HttpCtx, Outcome, PluginVm, VM_ROOT};
/// The serialized map format (see `wasmgate-abi`).
pub use wasmgate_abi::map;
