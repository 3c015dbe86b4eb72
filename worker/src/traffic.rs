//! Each finished request's status, latencies and bytes, added to this worker's route records in
//! shared memory (`wasmgate_shared::traffic`); the master sums every worker's records when the
//! Prometheus endpoint is scraped.
//!
//! A route's record is claimed on its first request and held by a [`RecordCell`] that every
//! compiled revision of the route shares (`live.rs` hands it from one revision to the next).
//! When the route is deleted, the last revision is dropped with the last request that used
//! it, and with it the claim: the record is released, no longer exported, and free for the
//! next new route. A worker that lives through thousands of routes created and deleted keeps
//! a record for each route that exists, not for each that ever did.

use crate::lock;
use crate::router::RouteEntry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::traffic::{Observation, NO_ROUTE};

/// The record of one route, shared by its compiled revisions; claimed on first use.
pub type RecordCell = Arc<OnceLock<Claim>>;

pub struct Traffic {
    records: Arc<Records>,
    /// The record of requests no route matched.
    unrouted: OnceLock<Claim>,
}

/// This worker's slot of route records, and those released for another route to take.
struct Records {
    segment: Arc<Segment>,
    slot: usize,
    released: Mutex<Vec<usize>>,
    /// Set when the worker drains: its routes are dropped as it exits, not deleted, and
    /// their counts stay in the slot for the master to keep (`retired.rs`).
    draining: AtomicBool,
}

/// A route's hold on its record: released when dropped, unless it is the record that routes
/// beyond the table's capacity share.
pub struct Claim {
    index: usize,
    shared: bool,
    records: Arc<Records>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {}", self.index)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.shared && !self.records.draining.load(Ordering::Relaxed) {
            self.records
                .segment
                .traffic(self.records.slot)
                .release(self.index);
            lock(&self.records.released).push(self.index);
        }
    }
}

impl Traffic {
    pub fn new(segment: Arc<Segment>, slot: usize) -> Traffic {
        Traffic {
            records: Arc::new(Records {
                segment,
                slot,
                released: Mutex::new(Vec::new()),
                draining: AtomicBool::new(false),
            }),
            unrouted: OnceLock::new(),
        }
    }

    /// From now on no record is released: the worker is draining.
    pub fn draining(&self) {
        self.records.draining.store(true, Ordering::Relaxed);
    }

    /// Adds one request of `route` (None when no route matched).
    pub fn record(&self, route: Option<&RouteEntry>, o: &Observation) {
        let i = match route {
            Some(r) => r.traffic_record.get_or_init(|| self.claim(&r.id)).index,
            None => self.unrouted.get_or_init(|| self.claim(NO_ROUTE)).index,
        };
        let records = &self.records;
        records.segment.traffic(records.slot).observe(i, o);
    }

    /// A record for `route`: one released by a deleted route if there is one, else the next.
    fn claim(&self, route: &str) -> Claim {
        let records = &self.records;
        let table = records.segment.traffic(records.slot);
        let (index, shared) = match lock(&records.released).pop() {
            Some(i) => {
                table.reclaim(i, route);
                (i, false)
            }
            None => table.claim(route),
        };
        Claim {
            index,
            shared,
            records: records.clone(),
        }
    }
}
