//! The master's shared state: the store, the current configuration, the shared-memory segment.

use crate::admin::objects::Reply;
use crate::publish::Publisher;
use crate::store::Store;
use serde_json::json;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use wasmgate_shared::config::{GatewayConfig, Role};
use wasmgate_shared::model::{Kind, PluginCatalog};
use wasmgate_shared::shm::Segment;

/// A configuration as loaded from config.yaml (or the embedded default).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: GatewayConfig,
    /// The YAML text, handed to workers so they parse exactly what the master validated.
    pub yaml: String,
    /// The file name used in messages (`conf/config.yaml` or `<embedded>`).
    pub origin: String,
}

impl LoadedConfig {
    pub fn catalog(&self) -> PluginCatalog {
        PluginCatalog::new(self.config.plugin_names().map(str::to_string))
    }
}

/// An Admin API key with its role (resolved: generated keys filled in).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub key: String,
    pub role: Role,
}

/// A reload that applied: the new epoch, and what the operator should know (keys set aside,
/// changes that wait for a restart), for `wasmgate reload` to print.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub epoch: u64,
    pub notes: Vec<String>,
}

/// Requests the Admin API hands to the master's main loop.
#[derive(Debug)]
pub enum Control {
    /// Reload config.yaml; the reply says whether it was applied.
    Reload(tokio::sync::oneshot::Sender<Result<Reloaded, String>>),
    /// A new configuration generation was published: tell the workers.
    Published,
}

/// State shared by the Admin API and the master's main loop.
pub struct Master {
    store: Mutex<Store>,
    /// What the workers were told; locked after the store.
    publisher: Mutex<Publisher>,
    /// The configuration and the Admin API keys resolved from it, swapped together by a
    /// reload: a request is checked against one or the other, never half of each.
    config: RwLock<(Arc<LoadedConfig>, Arc<[ApiKey]>)>,
    catalog: RwLock<Arc<PluginCatalog>>,
    pub segment: Arc<Segment>,
    /// Plugins' shared data, queues and metrics; kept across reloads.
    pub plugin_shm: Arc<wasmgate_shared::plugin_shm::PluginShm>,
    /// The prefix directory (logs, data and conf are relative to it).
    pub prefix: std::path::PathBuf,
    pub control: tokio::sync::mpsc::UnboundedSender<Control>,
    pub started_at_ms: u64,
    /// The reload epoch of the current worker set (0 at start, +1 per applied reload).
    pub epoch: std::sync::atomic::AtomicU64,
    /// Cluster mode: the etcd the objects live in (the store is then its local copy).
    pub etcd: Option<Arc<crate::etcd::Etcd>>,
    /// The counters of workers that left; every export adds them to the live workers'.
    retired: Mutex<crate::retired::Retired>,
    /// Upstream nodes' health: the segment the workers share and what the master probes.
    pub health: crate::health::Checker,
}

impl Master {
    // One argument per part of the master's state, each built elsewhere at start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        config: LoadedConfig,
        segment: Arc<Segment>,
        plugin_shm: Arc<wasmgate_shared::plugin_shm::PluginShm>,
        prefix: std::path::PathBuf,
        keys: Vec<ApiKey>,
        control: tokio::sync::mpsc::UnboundedSender<Control>,
        etcd: Option<Arc<crate::etcd::Etcd>>,
        health: crate::health::Checker,
    ) -> Master {
        let catalog = Arc::new(config.catalog());
        Master {
            store: Mutex::new(store),
            publisher: Mutex::new(Publisher::new(segment.clone())),
            config: RwLock::new((Arc::new(config), keys.into())),
            catalog: RwLock::new(catalog),
            segment,
            plugin_shm,
            prefix,
            control,
            started_at_ms: crate::now_ms(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            etcd,
            retired: Mutex::default(),
            health,
        }
    }

    /// The counters of workers that left, locked: held while the live slots are read, so that
    /// a worker's counters are counted once, in its slot or here, never both or neither.
    pub fn retired(&self) -> MutexGuard<'_, crate::retired::Retired> {
        self.retired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters of workers that left, locked, with those of routes and global rules
    /// since deleted dropped: for the exports, which should not name an object that no
    /// longer exists.
    pub fn retired_of_live_objects(&self) -> MutexGuard<'_, crate::retired::Retired> {
        let store = self.store();
        let mut retired = self.retired();
        retired.forget_deleted(|kind, id| store.get(kind, id).is_some());
        retired
    }

    /// Frees slot `i` of a worker that exited (drained, or never started), its counters kept.
    pub fn free_slot(&self, i: usize) {
        let mut retired = self.retired();
        retired.fold(&self.segment, i);
        self.segment.slot(i).reset();
    }

    /// Keeps the counters of a crashed worker, whose replacement takes slot `i` and counts
    /// afresh: requests, plugin contexts and route traffic (a new process claims new route
    /// records; the old ones left in place would fill the table crash after crash).
    pub fn keep_crashed_counters(&self, i: usize) {
        let mut retired = self.retired();
        retired.fold(&self.segment, i);
        let slot = self.segment.slot(i);
        slot.requests.store(0, std::sync::atomic::Ordering::Relaxed);
        slot.accepted.store(0, std::sync::atomic::Ordering::Relaxed);
        slot.contexts.store(0, std::sync::atomic::Ordering::Release);
        slot.routes.store(0, std::sync::atomic::Ordering::Release);
    }

    /// The store, locked. Writers hold it from validation to publication so that changes are
    /// applied, persisted and published in one order.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-applied (it persists
        // first, then mutates one map entry), so a poisoned lock is safe to reuse.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> Arc<LoadedConfig> {
        self.config_and_keys().0
    }

    /// The configuration with the Admin API keys that go with it.
    pub fn config_and_keys(&self) -> (Arc<LoadedConfig>, Arc<[ApiKey]>) {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn catalog(&self) -> Arc<PluginCatalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Switches to a reloaded configuration and its Admin API keys (the caller validated it
    /// against the store).
    pub fn set_config(&self, config: LoadedConfig, keys: Vec<ApiKey>) {
        if let (Some(etcd), Some(section)) = (&self.etcd, &config.config.deployment.etcd) {
            // Checked when the configuration was read.
            etcd.set_credentials(section.credentials().unwrap_or_default());
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config.catalog());
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(config), keys.into());
        // Objects in etcd were checked against the plugins that existed: one refused for a
        // plugin this configuration adds is served now.
        if let Some(etcd) = &self.etcd {
            etcd.resync_soon();
        }
    }

    /// The next publication tells the workers everything anew (see `Publisher::rebase`).
    pub fn rebase_publication(&self) {
        self.publisher().rebase();
    }

    /// The Admin API's 507 when a whole snapshot of `store` with object `(kind, id)` put as
    /// `json` (None: deleted) would not fit the shared-memory area. Checked before the change
    /// is persisted, so that what is stored can always be published.
    pub fn check_fits(&self, kind: Kind, id: &str, json: Option<&str>) -> Result<(), Reply> {
        self.publisher()
            .check_fits(kind, id, json)
            .map_err(|msg| (507, json!({ "error_msg": msg })))
    }

    /// Publishes objects `changed` of `store` (just written or deleted) to the workers.
    pub fn publish(&self, store: &Store, changed: &[(Kind, &str)]) {
        if let Err(e) = self.publisher().publish(store, changed) {
            // check_fits ran before the change was persisted, so this is unreachable in
            // practice; log loudly.
            tracing::error!("publish of generation {} failed: {e}", store.revision());
            return;
        }
        self.nudge();
    }

    /// Without the nudge a worker would notice on its next request (which would pay for
    /// applying the change) or its next housekeeping tick; with it every worker applies the
    /// change at once, in parallel.
    fn nudge(&self) {
        let _ = self.control.send(Control::Published);
    }

    /// Publishes whatever the store holds that the workers were not told yet (everything at
    /// start; an etcd resynchronisation's changes).
    pub fn publish_current(&self) -> Result<u64, String> {
        let store = self.store();
        let published = self
            .publisher()
            .publish_store(&store)
            .map_err(|e| e.to_string())?;
        if published {
            self.nudge();
        }
        Ok(store.revision())
    }

    /// The configuration's share of the shared-memory area (see [`Publisher::usage`]).
    pub fn shm_usage(&self) -> (usize, usize, usize) {
        self.publisher().usage()
    }

    fn publisher(&self) -> MutexGuard<'_, Publisher> {
        // Each publication leaves the publisher consistent before it returns or fails.
        self.publisher.lock().unwrap_or_else(|p| p.into_inner())
    }
}
