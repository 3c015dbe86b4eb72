//! Gateway-wide plugin state: shared data (`proxy_get/set_shared_data` with compare-and-swap),
//! shared queues and metrics, all in one shared-memory segment
//! ([`PluginShm`](wasmgate_shared::plugin_shm::PluginShm)) that the master creates and every
//! worker maps, so a key written in one worker is read in all of them.
//!
//! All plugins share one namespace (Envoy separates by `vm_id`; wasmgate's plugins have one VM
//! id space, and queues are registered and resolved under the empty vm_id).

use crate::state::Status;
use std::sync::{Arc, OnceLock};
use wasmgate_shared::plugin_shm::{Error, PluginShm};

static SHM: OnceLock<Arc<PluginShm>> = OnceLock::new();

/// Size of the process-private store used when no segment was installed (tools and tests
/// that run plugins outside a worker).
const PRIVATE_SIZE: usize = 4 << 20;

/// Installs the gateway's segment (once, at worker start, before any plugin runs).
pub fn install(shm: Arc<PluginShm>) {
    let _ = SHM.set(shm);
}

/// The segment: the gateway's, or a private one outside a worker.
pub fn shm() -> Option<&'static PluginShm> {
    if SHM.get().is_none() {
        match PluginShm::create(PRIVATE_SIZE) {
            Ok(s) => {
                let _ = SHM.set(Arc::new(s));
            }
            Err(e) => tracing::error!("plugin shared memory unavailable: {e}"),
        }
    }
    SHM.get().map(|s| &**s)
}

/// Runs `f` on the segment: no segment answers InternalFailure, a store error its status.
pub fn with<T>(f: impl FnOnce(&PluginShm) -> Result<T, Error>) -> Result<T, Status> {
    f(shm().ok_or(Status::InternalFailure)?).map_err(status)
}

/// The Proxy-Wasm status for a store error, logging what is worth an operator's attention.
pub fn status(e: Error) -> Status {
    match e {
        Error::CasMismatch => Status::CasMismatch,
        Error::NotFound => Status::NotFound,
        Error::BadArgument(_) => Status::BadArgument,
        e @ (Error::Full { .. } | Error::TooLarge { .. }) => {
            tracing::error!("plugin shared memory: {e}; write refused");
            Status::InternalFailure
        }
        e => {
            tracing::error!("plugin shared memory: {e}");
            Status::InternalFailure
        }
    }
}

/// Items dropped from full queues since the last warning about them, and the gate that lets
/// one warning a second through: a producer whose consumer stopped drops on every request.
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DROP_NOTICE: crate::rate::LogGate = crate::rate::LogGate::new();

/// Notes `n` items dropped from a full `queue` (token) to take new ones, and says so in the
/// error log at most once a second, with the count since the last time.
pub fn dropped_from_queue(token: u32, n: u64) {
    use std::sync::atomic::Ordering;
    if n == 0 {
        return;
    }
    DROPPED.fetch_add(n, Ordering::Relaxed);
    if DROP_NOTICE.pass(1) != crate::rate::Pass::No {
        let total = DROPPED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            "full shared queues dropped {total} oldest item(s) to take new ones since the last \
             warning, the latest from queue {token} (is its consumer running?)"
        );
    }
}
