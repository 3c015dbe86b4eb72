//! Each finished request's status, latencies and bytes, added to this worker's route records in
//! shared memory (`wasmgate_shared::traffic`); the master sums every worker's records when the
//! Prometheus endpoint is scraped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wasmgate_shared::shm::Segment;
use wasmgate_shared::traffic::{Observation, NO_ROUTE};

pub struct Traffic {
    segment: Arc<Segment>,
    slot: usize,
    /// Route id → record index in the slot (claimed on a route's first request). Route ids
    /// come from the configuration, never from clients, so this stays as small as the config.
    index: Mutex<HashMap<Box<str>, usize>>,
}

impl Traffic {
    pub fn new(segment: Arc<Segment>, slot: usize) -> Traffic {
        Traffic {
            segment,
            slot,
            index: Mutex::new(HashMap::new()),
        }
    }

    /// Adds one request of `route` (empty when no route matched).
    pub fn record(&self, route: &str, o: &Observation) {
        let table = self.segment.traffic(self.slot);
        let i = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            match index.get(route) {
                Some(&i) => i,
                None => {
                    let i = table.claim(if route.is_empty() { NO_ROUTE } else { route });
                    index.insert(route.into(), i);
                    i
                }
            }
        };
        table.observe(i, o);
    }
}
