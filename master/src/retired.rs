//! Counters of workers that are gone, kept by the master so that the exported totals only
//! grow. A reload replaces every worker and frees their shared-memory slots; a crashed
//! worker's replacement starts its request and plugin counters afresh. APISIX's Prometheus
//! counters live in nginx's shared dictionaries, which outlive a reload: here the master
//! folds a leaving worker's counters into these sums, which every export adds to the live
//! workers' — `apisix_http_*` and `wasm_plugin_*` on the metrics page, `/wasmgate/stats`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use wasmgate_shared::model::Kind;
use wasmgate_shared::shm::Segment;
use wasmgate_shared::stats::ContextSnapshot;
use wasmgate_shared::traffic::{RouteSnapshot, NO_ROUTE, OVERFLOW};

/// What the workers that left had counted.
#[derive(Debug, Default)]
pub struct Retired {
    /// Requests they served (`apisix_http_requests_total`).
    pub requests: u64,
    /// Connections they accepted (`apisix_nginx_http_current_connections{state="accepted"}`).
    pub accepted: u64,
    /// Their route traffic, by route id.
    pub routes: BTreeMap<String, RouteSnapshot>,
    /// Their plugin contexts' counters, by (plugin, owner).
    pub contexts: BTreeMap<(String, String), ContextSnapshot>,
}

impl Retired {
    /// Folds slot `i`'s counters in (the caller then clears them in the slot).
    pub fn fold(&mut self, seg: &Segment, i: usize) {
        self.requests += seg.slot(i).requests.load(Ordering::Relaxed);
        self.accepted += seg.slot(i).accepted.load(Ordering::Relaxed);
        for r in seg.traffic(i).snapshot() {
            add_route(&mut self.routes, r);
        }
        let stats = seg.stats(i);
        for c in (0..stats.len()).filter_map(|j| stats.get(j)) {
            if let Some(c) = c.snapshot() {
                add_context(&mut self.contexts, c);
            }
        }
    }
}

impl Retired {
    /// Drops the counts of routes (and of plugin contexts of routes and global rules) that
    /// were deleted since their workers left: a deleted route's series end (its live records
    /// are released in the workers once its last request is counted), rather than go on as
    /// a remnant of workers long gone. `exists(kind, id)` asks the store.
    pub fn forget_deleted(&mut self, exists: impl Fn(Kind, &str) -> bool) {
        self.routes
            .retain(|id, _| id == NO_ROUTE || id == OVERFLOW || exists(Kind::Routes, id));
        self.contexts
            .retain(|(_, owner), _| Kind::of_object(owner).is_none_or(|(k, id)| exists(k, id)));
    }
}

/// Adds a route's counters to a sum by route.
pub fn add_route(sum: &mut BTreeMap<String, RouteSnapshot>, r: RouteSnapshot) {
    match sum.get_mut(&r.route) {
        Some(s) => s.merge(&r),
        None => {
            sum.insert(r.route.clone(), r);
        }
    }
}

/// Adds a plugin context's counters to a sum by (plugin, owner).
pub fn add_context(sum: &mut BTreeMap<(String, String), ContextSnapshot>, c: ContextSnapshot) {
    let key = (c.plugin.clone(), c.owner.clone());
    match sum.get_mut(&key) {
        Some(s) => s.merge(&c),
        None => {
            sum.insert(key, c);
        }
    }
}
