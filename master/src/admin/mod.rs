//! The Admin API: APISIX 3.x compatible `/apisix/admin/…` plus wasmgate's `/wasmgate/…`.
//!
//! - [`http`]: the HTTP server, authentication, body limits and path dispatch;
//! - [`objects`]: the object operations over the store (validation, persistence, publication);
//! - [`status`]: worker and gateway status for `/wasmgate/…` and `wasmgate status`.

pub mod http;
pub mod objects;
pub mod status;
