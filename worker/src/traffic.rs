//! Each finished request's status, latencies and bytes, added to this worker's route records in
//! shared memory (`wasmgate_shared::traffic`); the master sums every worker's records when the
//! Prometheus endpoint is scraped.

use crate::router::RouteEntry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::traffic::{Observation, NO_ROUTE};

pub struct Traffic {
    segment: Arc<Segment>,
    slot: usize,
    /// Route id → record index in the slot (claimed on a route's first request). Route ids
    /// come from the configuration, never from clients, so this stays as small as the config.
    /// Consulted once per route entry: the index is then kept on the entry.
    index: Mutex<HashMap<Box<str>, usize>>,
    /// The record of requests no route matched.
    unrouted: OnceLock<usize>,
}

impl Traffic {
    pub fn new(segment: Arc<Segment>, slot: usize) -> Traffic {
        Traffic {
            segment,
            slot,
            index: Mutex::new(HashMap::new()),
            unrouted: OnceLock::new(),
        }
    }

    /// Adds one request of `route` (None when no route matched).
    pub fn record(&self, route: Option<&RouteEntry>, o: &Observation) {
        let i = match route {
            Some(r) => *r.traffic_record.get_or_init(|| self.record_of(&r.id)),
            None => *self.unrouted.get_or_init(|| self.record_of("")),
        };
        self.segment.traffic(self.slot).observe(i, o);
    }

    /// The record index of a route id, claimed on first use. A changed route keeps its
    /// record: the id, not the entry, owns it.
    fn record_of(&self, route: &str) -> usize {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = index.get(route) {
            return i;
        }
        let table = self.segment.traffic(self.slot);
        let i = table.claim(if route.is_empty() { NO_ROUTE } else { route });
        index.insert(route.into(), i);
        i
    }
}
