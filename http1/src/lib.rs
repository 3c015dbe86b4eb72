//! The HTTP/1.1 wire format as both sides of the gateway speak it, without the sockets:
//!
//! - [`codec`]: how a body is delimited and read out of a buffer, how one is written, header
//!   lines, trailer sections, and the table of header names recently received;
//! - [`request`]: request heads as clients send them (what the worker's server reads).
//!
//! Kept apart from the worker so that the parsers can be fuzzed without building the wasm
//! engine (fuzz/fuzz_targets/request_head.rs).

pub mod codec;
pub mod request;

/// The error of a body in the proxy: anything that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
