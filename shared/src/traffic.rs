//! Per-worker HTTP traffic statistics in the shared-memory segment, one record per route: status
//! codes, request / upstream / gateway latency histograms and bytes in and out — what the
//! Prometheus endpoint exports as `apisix_http_status`, `apisix_http_latency` and
//! `apisix_bandwidth`, summed over workers at scrape time.
//!
//! Each worker slot owns [`SLOT_TRAFFIC_SIZE`] bytes: [`ROUTES_PER_SLOT`] records of
//! [`RECORD_SIZE`] bytes. As with [`crate::stats`], only the worker in the slot writes them,
//! with relaxed atomic adds; the count of records in use is `WorkerSlot::routes`, which goes
//! back to 0 when the slot is reset for a new process.
//!
//! Record keys: a route id, [`NO_ROUTE`] for requests no route matched, and [`OVERFLOW`] for
//! routes beyond the table's capacity (ids are `[a-zA-Z0-9._-]`, so neither can collide).
//!
//! A deleted route's record is released once its last request is logged, and taken again by
//! the next route that needs one: route ids come and go through the Admin API for as long as
//! a worker lives, and the table holds the routes that exist, not every route that ever did.
//! Releasing and taking again change a record's key and zero its counters under its sequence
//! number (`crate::seqlock`), so that the master reading the slot skips a record caught
//! changing rather than export one route's counts under another's name.

use crate::seqlock;
use crate::shm::WorkerSlot;
use std::sync::atomic::{AtomicU64, Ordering};

/// Route records per worker; later routes share the [`OVERFLOW`] record.
pub const ROUTES_PER_SLOT: usize = 4096;
const RECORD_SIZE: usize = 768;
/// Bytes of traffic statistics per worker slot.
pub const SLOT_TRAFFIC_SIZE: usize = ROUTES_PER_SLOT * RECORD_SIZE;
/// The key of requests no route matched (APISIX exports them with `route=""`).
pub const NO_ROUTE: &str = "";
/// The key shared by routes beyond [`ROUTES_PER_SLOT`].
pub const OVERFLOW: &str = "*";
/// Distinct status codes counted per route; others are summed as code 0 ("other").
const CODES: usize = 16;
const KEY_WORDS: usize = 8;
/// Upper bounds of the latency buckets in milliseconds (APISIX's default buckets).
pub const LATENCY_BOUNDS_MS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

/// Which latency: the whole request, the upstream's part, or the gateway's own (request minus
/// upstream) — APISIX's `type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    Request = 0,
    Upstream = 1,
    Gateway = 2,
}

impl Latency {
    pub const ALL: [Latency; 3] = [Latency::Request, Latency::Upstream, Latency::Gateway];

    /// The `type` label APISIX uses.
    pub fn label(self) -> &'static str {
        match self {
            Latency::Request => "request",
            Latency::Upstream => "upstream",
            Latency::Gateway => "apisix",
        }
    }
}

#[repr(C)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last holds everything above the bounds.
    buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    /// Sum of the observations in microseconds.
    sum_us: AtomicU64,
}

/// One route's traffic in one worker.
#[repr(C)]
struct RouteRecord {
    /// Odd while the worker changes the key (release, taking again); see the module's notes.
    seq: AtomicU64,
    /// The key's length, or [`seqlock::RELEASED`].
    key_len: AtomicU64,
    key: [AtomicU64; KEY_WORDS],
    /// Status code of each counter below (0: unused).
    codes: [AtomicU64; CODES],
    counts: [AtomicU64; CODES],
    /// Requests whose code found no free counter.
    other: AtomicU64,
    latency: [Histogram; 3],
    ingress: AtomicU64,
    egress: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RouteRecord>() <= RECORD_SIZE);
const _: () = assert!(RECORD_SIZE.is_multiple_of(8));

/// One finished request, as the log phase saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observation {
    pub status: u16,
    pub request_us: u64,
    /// Time from sending to the upstream until its response head, when there was one.
    pub upstream_us: Option<u64>,
    /// Bytes received from the client (head and body).
    pub ingress: u64,
    /// Bytes sent to the client (body).
    pub egress: u64,
}

/// A plain copy of one latency histogram, for export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket, not cumulative; one more than [`LATENCY_BOUNDS_MS`].
    pub buckets: Vec<u64>,
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds another worker's histogram.
    pub fn merge(&mut self, o: &HistogramSnapshot) {
        if self.buckets.len() < o.buckets.len() {
            self.buckets.resize(o.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_us += o.sum_us;
    }
}

/// A plain copy of one route record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSnapshot {
    pub route: String,
    /// `(status code, requests)`; code 0 sums the codes that found no counter.
    pub codes: Vec<(u16, u64)>,
    /// By [`Latency`] index.
    pub latency: [HistogramSnapshot; 3],
    pub ingress: u64,
    pub egress: u64,
}

impl RouteSnapshot {
    /// Adds another worker's record of the same route.
    pub fn merge(&mut self, o: &RouteSnapshot) {
        for &(code, n) in &o.codes {
            match self.codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, m)) => *m += n,
                None => self.codes.push((code, n)),
            }
        }
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            a.merge(b);
        }
        self.ingress += o.ingress;
        self.egress += o.egress;
    }
}

fn bucket_of(us: u64) -> usize {
    let ms = us as f64 / 1000.0;
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

impl Histogram {
    fn observe(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl RouteRecord {
    fn init(&self, route: &str) {
        let zero = |a: &AtomicU64| a.store(0, Ordering::Relaxed);
        self.codes.iter().chain(&self.counts).for_each(zero);
        for h in &self.latency {
            h.buckets.iter().for_each(zero);
            zero(&h.sum_us);
        }
        for a in [&self.other, &self.ingress, &self.egress] {
            zero(a);
        }
        let len = crate::stats::pack_key(&self.key, route);
        self.key_len.store(len as u64, Ordering::Release);
    }

    fn observe(&self, o: &Observation) {
        let code = o.status as u64;
        // Single writer: a code is looked up, or takes the first free counter.
        let counter = self
            .codes
            .iter()
            .position(|c| {
                let c = c.load(Ordering::Relaxed);
                c == code || c == 0
            })
            .map(|i| {
                self.codes[i].store(code, Ordering::Relaxed);
                &self.counts[i]
            })
            .unwrap_or(&self.other);
        counter.fetch_add(1, Ordering::Relaxed);
        self.latency[Latency::Request as usize].observe(o.request_us);
        if let Some(up) = o.upstream_us {
            self.latency[Latency::Upstream as usize].observe(up);
            self.latency[Latency::Gateway as usize].observe(o.request_us.saturating_sub(up));
        } else {
            self.latency[Latency::Gateway as usize].observe(o.request_us);
        }
        self.ingress.fetch_add(o.ingress, Ordering::Relaxed);
        self.egress.fetch_add(o.egress, Ordering::Relaxed);
    }

    /// `init` over a record in use: readers skip it until done.
    fn reinit(&self, route: &str) {
        self.changing(|| self.init(route));
    }

    fn release(&self) {
        self.changing(|| self.key_len.store(seqlock::RELEASED, Ordering::Relaxed));
    }

    fn changing(&self, f: impl FnOnce()) {
        seqlock::changing(&self.seq, f);
    }

    /// A copy, unless the record is released or was changing while read.
    fn snapshot(&self) -> Option<RouteSnapshot> {
        seqlock::consistent(&self.seq, &self.key_len, |len| self.read(len))
    }

    fn read(&self, len: usize) -> RouteSnapshot {
        let mut codes: Vec<(u16, u64)> = self
            .codes
            .iter()
            .zip(&self.counts)
            .map(|(c, n)| (c.load(Ordering::Relaxed), n.load(Ordering::Relaxed)))
            .filter(|&(c, n)| c != 0 && n != 0)
            .map(|(c, n)| (c as u16, n))
            .collect();
        let other = self.other.load(Ordering::Relaxed);
        if other > 0 {
            codes.push((0, other));
        }
        RouteSnapshot {
            route: crate::stats::unpack_key(&self.key, len),
            codes,
            latency: [0, 1, 2].map(|i| self.latency[i].snapshot()),
            ingress: self.ingress.load(Ordering::Relaxed),
            egress: self.egress.load(Ordering::Relaxed),
        }
    }
}

/// One worker slot's traffic area.
pub struct SlotTraffic<'a> {
    base: *const u8,
    slot: &'a WorkerSlot,
}

impl<'a> SlotTraffic<'a> {
    /// # Safety
    /// `base` must point to [`SLOT_TRAFFIC_SIZE`] mapped, 8-byte aligned bytes that live as
    /// long as `'a` and are only accessed through atomics.
    pub(crate) unsafe fn new(base: *const u8, slot: &'a WorkerSlot) -> SlotTraffic<'a> {
        SlotTraffic { base, slot }
    }

    fn record(&self, i: usize) -> &'a RouteRecord {
        debug_assert!(i < ROUTES_PER_SLOT);
        // SAFETY: record `i` lies within the area (i < ROUTES_PER_SLOT), 8-aligned, and
        // RouteRecord is repr(C) of atomics, valid for any bit pattern.
        unsafe { &*(self.base.add(i * RECORD_SIZE) as *const RouteRecord) }
    }

    /// Records in use.
    pub fn len(&self) -> usize {
        (self.slot.routes.load(Ordering::Acquire) as usize).min(ROUTES_PER_SLOT)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Claims a zeroed record for `route` past those in use (worker side, single writer); the
    /// last one is kept for [`OVERFLOW`], which routes beyond it share. Returns its index
    /// and whether it is [`OVERFLOW`]'s (shared: never to be released).
    pub fn claim(&self, route: &str) -> (usize, bool) {
        let n = self.len();
        let overflow = n >= ROUTES_PER_SLOT - 1;
        if overflow {
            if let Some(i) = (0..n).find(|&i| self.key_is(i, OVERFLOW)) {
                return (i, true);
            }
        }
        self.record(n).init(if overflow { OVERFLOW } else { route });
        self.slot.routes.store(n as u32 + 1, Ordering::Release);
        (n, overflow)
    }

    fn key_is(&self, i: usize, key: &str) -> bool {
        let r = self.record(i);
        let len = r.key_len.load(Ordering::Relaxed);
        len == key.len() as u64 && crate::stats::unpack_key(&r.key, len as usize) == key
    }

    /// Takes released record `i` (from [`release`](Self::release)) for `route`, zeroed.
    pub fn reclaim(&self, i: usize, route: &str) {
        if i < self.len() {
            self.record(i).reinit(route);
        }
    }

    /// Releases record `i`: its route was deleted and its last request counted. It is no
    /// longer exported, and [`reclaim`](Self::reclaim) may give it to another route.
    pub fn release(&self, i: usize) {
        if i < self.len() {
            self.record(i).release();
        }
    }

    /// Adds one request to record `i` (from [`claim`](Self::claim)).
    pub fn observe(&self, i: usize, o: &Observation) {
        if i < self.len() {
            self.record(i).observe(o);
        }
    }

    /// Copies of the records in use (not those released, nor one caught changing).
    pub fn snapshot(&self) -> Vec<RouteSnapshot> {
        (0..self.len())
            .filter_map(|i| self.record(i).snapshot())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Segment;

    fn obs(status: u16, request_ms: u64, upstream_ms: Option<u64>) -> Observation {
        Observation {
            status,
            request_us: request_ms * 1000,
            upstream_us: upstream_ms.map(|m| m * 1000),
            ingress: 100,
            egress: 10,
        }
    }

    #[test]
    fn records_count_codes_latency_and_bytes() {
        let seg = Segment::create(1 << 20).unwrap();
        let s = seg.claim_slot().unwrap();
        let t = seg.traffic(s);
        let (r, _) = t.claim("orders");
        t.observe(r, &obs(200, 3, Some(2)));
        t.observe(r, &obs(200, 40, Some(30)));
        t.observe(r, &obs(503, 70_000, None));
        let snap = &t.snapshot()[0];
        assert_eq!(snap.route, "orders");
        assert_eq!(snap.codes, vec![(200, 2), (503, 1)]);
        let req = &snap.latency[Latency::Request as usize];
        assert_eq!(req.count(), 3);
        // 3 ms ≤ 5, 40 ms ≤ 50, 70 s above every bound.
        assert_eq!((req.buckets[2], req.buckets[5], req.buckets[15]), (1, 1, 1));
        assert_eq!(snap.latency[Latency::Upstream as usize].count(), 2);
        assert_eq!(
            snap.latency[Latency::Gateway as usize].sum_us,
            11_000 + 70_000_000
        );
        assert_eq!((snap.ingress, snap.egress), (300, 30));
        seg.slot(s).reset();
        assert!(seg.traffic(s).is_empty());
    }

    #[test]
    fn many_codes_and_many_routes_are_bounded() {
        let seg = Segment::create(1 << 20).unwrap();
        let s = seg.claim_slot().unwrap();
        let t = seg.traffic(s);
        let (r, _) = t.claim("r");
        for code in 200..240 {
            t.observe(r, &obs(code, 1, None));
        }
        let snap = &t.snapshot()[0];
        assert_eq!(snap.codes.len(), CODES + 1);
        assert_eq!(snap.codes.last(), Some(&(0, 40 - CODES as u64)));
        for i in 1..ROUTES_PER_SLOT + 10 {
            t.claim(&format!("route-{i}"));
        }
        assert_eq!(t.len(), ROUTES_PER_SLOT);
        let routes = t.snapshot();
        assert_eq!(routes.iter().filter(|r| r.route == OVERFLOW).count(), 1);
        assert_eq!(t.claim("more"), (ROUTES_PER_SLOT - 1, true));
    }

    #[test]
    fn released_records_are_not_exported_and_are_taken_again_zeroed() {
        let seg = Segment::create(1 << 20).unwrap();
        let s = seg.claim_slot().unwrap();
        let t = seg.traffic(s);
        let (a, _) = t.claim("a");
        let (b, _) = t.claim("b");
        t.observe(a, &obs(200, 1, None));
        t.observe(b, &obs(404, 1, None));
        t.release(a);
        let routes: Vec<String> = t.snapshot().into_iter().map(|r| r.route).collect();
        assert_eq!(routes, ["b"]);
        t.reclaim(a, "c");
        let snap = t.snapshot();
        assert_eq!(snap[0].route, "c");
        assert!(snap[0].codes.is_empty(), "{:?}", snap[0].codes);
        assert_eq!(snap[0].latency[0].count(), 0);
        assert_eq!(snap[1].codes, vec![(404, 1)]);
        // A record caught changing is skipped, not shown half made.
        let r = t.record(a);
        r.seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.snapshot().len(), 1);
        r.seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.snapshot().len(), 2);
    }

    #[test]
    fn merging_adds_up() {
        let mut a = RouteSnapshot {
            route: "r".into(),
            codes: vec![(200, 2)],
            ..Default::default()
        };
        let b = RouteSnapshot {
            route: "r".into(),
            codes: vec![(200, 1), (404, 5)],
            ingress: 7,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(a.codes, vec![(200, 3), (404, 5)]);
        assert_eq!(a.ingress, 7);
    }
}
