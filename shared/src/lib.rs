//! Everything the master and the workers must agree on, with no I/O policy and no wasm:
//!
//! - [`alloc`]: the process-wide allocator (mimalloc, without its aligned slow path);
//! - [`config`]: the `config.yaml` model, parsed and validated once, with `file:line` errors;
//! - [`keyring`]: APISIX's `data_encryption.keyring`, which private keys are stored encrypted with;
//! - [`model`]: the Admin API objects (routes, services, upstreams, global rules), their
//!   APISIX-compatible schemas and the messages that name the offending field;
//! - [`snapshot`]: the immutable set of objects the master publishes to workers;
//! - [`plugin_shm`]: the gateway-wide Proxy-Wasm state (shared data, queues, metrics) in a
//!   shared-memory segment every worker maps;
//! - [`shm`]: the shared-memory segment that carries snapshots (seqlock + generation counter)
//!   and the per-worker status slots;
//! - [`tls`]: the crypto provider and PEM certificates with their keys, for TLS both ways;
//! - [`tls_sessions`]: the TLS sessions and ticket keys every worker shares;
//! - [`units`]: durations and sizes written the nginx way (`60s`, `1m`).

/// Set in a worker's environment by the master that starts it (`wasmgate: worker process`,
/// no arguments, as nginx's workers show in `ps`).
pub const WORKER_ENV: &str = "WASMGATE_WORKER";

pub mod alloc;
pub mod apisix_keys;
pub mod clock;
pub mod config;
pub mod health;
pub mod keyring;
pub mod logformat;
pub mod logging;
pub mod model;
pub mod plugin_shm;
mod seqlock;
pub mod shm;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod tls_sessions;
pub mod traffic;
pub mod units;
pub mod yaml_env;
pub mod yaml_lines;

/// The version string the gateway reports (`Server` header, `wasmgate version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The value of cookie `name` among `Cookie` header values (`a=1; b=2`), as the Admin API
/// (`x_api_key`) and nginx's `cookie_<name>` variable read it.
pub fn cookie<'a>(header_values: impl Iterator<Item = &'a str>, name: &str) -> Option<String> {
    header_values
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}
