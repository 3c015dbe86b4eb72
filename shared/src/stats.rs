//! Per-worker plugin statistics in the shared-memory segment: one record per PluginContext
//! (route or global rule × plugin) and the memory of each plugin instance.
//!
//! Each worker slot owns an area of [`SLOT_STATS_SIZE`] bytes:
//!
//! ```text
//! 0      instance memory: MAX_PLUGINS × u64 (bytes of linear memory of each plugin's instance)
//! 512    context records: CONTEXTS_PER_SLOT × 640 bytes
//! ```
//!
//! Only the worker in the slot writes its area, with relaxed atomic adds — nothing on the
//! request path takes a lock. A record is claimed once per (plugin, route or global rule) and
//! kept for the worker's life, so statistics add up across route revisions and instance
//! restarts. The master reads `WorkerSlot::contexts` records and, when a slot is reset for a new
//! process, that count goes back to 0: a previous process's records are never shown as live.
//!
//! Latencies go into a histogram with √2-wide buckets (bucket `i` holds times below
//! 2^(i/2) µs; the last bucket everything longer), enough for p50/p99 within ±20 %.

use crate::seqlock;
use crate::shm::WorkerSlot;
use std::sync::atomic::{AtomicU64, Ordering};

/// Plugins whose instance memory is reported (more are served, not reported).
pub const MAX_PLUGINS: usize = 64;
/// Context records per worker; beyond, new contexts are served without statistics.
pub const CONTEXTS_PER_SLOT: usize = 4096;
const RECORD_SIZE: usize = 640;
const MEMORY_TABLE: usize = MAX_PLUGINS * 8;
/// Bytes of statistics per worker slot.
pub const SLOT_STATS_SIZE: usize = MEMORY_TABLE + CONTEXTS_PER_SLOT * RECORD_SIZE;
/// Latency histogram buckets.
pub const LATENCY_BUCKETS: usize = 40;
/// Longest key kept: `<plugin>|route:<id>` or `<plugin>|global_rule:<id>` (plugin names and ids
/// are at most 64 characters each).
const KEY_WORDS: usize = 20;

/// The statistics of one PluginContext in one worker.
#[repr(C)]
pub struct ContextStats {
    /// Odd while the worker releases the record or takes it again for another context
    /// (`crate::seqlock`).
    seq: AtomicU64,
    /// The key's length, or [`seqlock::RELEASED`].
    key_len: AtomicU64,
    /// `<plugin>|<owner>`, UTF-8.
    key: [AtomicU64; KEY_WORDS],
    /// Requests that ran through the context (HttpContexts created).
    pub requests: AtomicU64,
    /// Requests the plugin answered itself (`proxy_send_local_response`).
    pub local_replies: AtomicU64,
    /// Requests failed because of the plugin (configuration refused, or a fault without
    /// `fail_open`): answered 503.
    pub errors: AtomicU64,
    pub traps: AtomicU64,
    /// Callbacks stopped at `callback_timeout`.
    pub timeouts: AtomicU64,
    /// Instances stopped at `memory_limit`.
    pub memory_hits: AtomicU64,
    /// `proxy_on_configure` calls (a new PluginContext: first request, route update, new
    /// instance).
    pub configures: AtomicU64,
    /// Time spent in the plugin's callbacks for these requests, in nanoseconds.
    pub time_ns: AtomicU64,
    /// The configuration generation the context was last configured for.
    pub generation: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

const _: () = assert!(std::mem::size_of::<ContextStats>() <= RECORD_SIZE);

/// A plain copy of a record, for reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContextSnapshot {
    /// The plugin's name.
    pub plugin: String,
    /// `route:<id>` or `global_rule:<id>`.
    pub owner: String,
    pub requests: u64,
    pub local_replies: u64,
    pub errors: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_hits: u64,
    pub configures: u64,
    pub time_ns: u64,
    pub generation: u64,
    pub latency: Vec<u64>,
}

impl ContextSnapshot {
    /// Adds another worker's record of the same context.
    pub fn merge(&mut self, r: &ContextSnapshot) {
        self.requests += r.requests;
        self.local_replies += r.local_replies;
        self.errors += r.errors;
        self.traps += r.traps;
        self.timeouts += r.timeouts;
        self.memory_hits += r.memory_hits;
        self.configures += r.configures;
        self.time_ns += r.time_ns;
        self.generation = self.generation.max(r.generation);
        if self.latency.len() < r.latency.len() {
            self.latency.resize(r.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&r.latency) {
            *a += b;
        }
    }
}

/// The bucket of a latency in microseconds: the smallest `i` with `us < 2^(i/2)`, that is
/// with `us² < 2^i`: the bit length of `us²`. Integer arithmetic, exact at every bound (it
/// runs for every plugin call; the floating-point form cost a `log2` and two `powf`).
pub fn bucket(us: u64) -> usize {
    let square = u128::from(us) * u128::from(us);
    ((128 - square.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

fn sqrt2_pow(i: usize) -> f64 {
    2f64.powf(i as f64 / 2.0)
}

/// The upper bound of bucket `i` in microseconds.
pub fn bucket_bound(i: usize) -> f64 {
    sqrt2_pow(i)
}

/// The `q` quantile (0..1) of a histogram, as its bucket's upper bound in µs; None when empty.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_bound(i));
        }
    }
    Some(bucket_bound(counts.len() - 1))
}

impl ContextStats {
    /// Records one request's time in the plugin.
    pub fn record_time(&self, ns: u64) {
        self.time_ns.fetch_add(ns, Ordering::Relaxed);
        self.latency[bucket(ns / 1000)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy, unless the record is released or was changing while read.
    pub fn snapshot(&self) -> Option<ContextSnapshot> {
        seqlock::consistent(&self.seq, &self.key_len, |len| {
            self.read(unpack_key(&self.key, len))
        })
    }

    fn read(&self, key: String) -> ContextSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (plugin, owner) = key.split_once('|').unwrap_or(("", &key));
        ContextSnapshot {
            plugin: plugin.to_string(),
            owner: owner.to_string(),
            requests: l(&self.requests),
            local_replies: l(&self.local_replies),
            errors: l(&self.errors),
            traps: l(&self.traps),
            timeouts: l(&self.timeouts),
            memory_hits: l(&self.memory_hits),
            configures: l(&self.configures),
            time_ns: l(&self.time_ns),
            generation: l(&self.generation),
            latency: self.latency.iter().map(l).collect(),
        }
    }

    fn init(&self, plugin: &str, owner: &str) {
        for a in [
            &self.requests,
            &self.local_replies,
            &self.errors,
            &self.traps,
            &self.timeouts,
            &self.memory_hits,
            &self.configures,
            &self.time_ns,
            &self.generation,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        for a in &self.latency {
            a.store(0, Ordering::Relaxed);
        }
        let len = pack_key(&self.key, &format!("{plugin}|{owner}"));
        self.key_len.store(len as u64, Ordering::Release);
    }
}

/// Stores `key` (truncated to the words' capacity) in `words`; returns the length stored.
pub(crate) fn pack_key(words: &[AtomicU64], key: &str) -> usize {
    let bytes = key.as_bytes();
    let len = bytes.len().min(words.len() * 8);
    for (i, w) in words.iter().enumerate() {
        let mut word = [0u8; 8];
        let start = (i * 8).min(len);
        let end = (start + 8).min(len);
        word[..end - start].copy_from_slice(&bytes[start..end]);
        w.store(u64::from_le_bytes(word), Ordering::Relaxed);
    }
    len
}

/// The key [`pack_key`] stored (`len` as it returned; bounded by the words' capacity).
pub(crate) fn unpack_key(words: &[AtomicU64], len: usize) -> String {
    let len = len.min(words.len() * 8);
    let mut bytes = Vec::with_capacity(words.len() * 8);
    for w in words {
        bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    bytes.truncate(len);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One worker slot's statistics area.
pub struct SlotStats<'a> {
    base: *const u8,
    slot: &'a WorkerSlot,
}

impl<'a> SlotStats<'a> {
    /// # Safety
    /// `base` must point to [`SLOT_STATS_SIZE`] mapped, 8-byte aligned bytes that live as long
    /// as `'a` and are only accessed through atomics.
    pub(crate) unsafe fn new(base: *const u8, slot: &'a WorkerSlot) -> SlotStats<'a> {
        SlotStats { base, slot }
    }

    /// The instance-memory cell of plugin `i` (None beyond [`MAX_PLUGINS`]).
    pub fn plugin_memory(&self, i: usize) -> Option<&'a AtomicU64> {
        if i >= MAX_PLUGINS {
            return None;
        }
        // SAFETY: within the memory table at the start of the area (see `new`).
        Some(unsafe { &*(self.base.add(i * 8) as *const AtomicU64) })
    }

    fn record(&self, i: usize) -> &'a ContextStats {
        debug_assert!(i < CONTEXTS_PER_SLOT);
        // SAFETY: record `i` lies within the area (i < CONTEXTS_PER_SLOT), 8-aligned, and
        // ContextStats is repr(C) of atomics, valid for any bit pattern.
        unsafe { &*(self.base.add(MEMORY_TABLE + i * RECORD_SIZE) as *const ContextStats) }
    }

    /// Claims the next record for (plugin, owner), zeroed (worker side, single writer).
    pub fn claim(&self, plugin: &str, owner: &str) -> Option<usize> {
        let n = self.slot.contexts.load(Ordering::Relaxed) as usize;
        if n >= CONTEXTS_PER_SLOT {
            return None;
        }
        self.record(n).init(plugin, owner);
        self.slot.contexts.store(n as u32 + 1, Ordering::Release);
        Some(n)
    }

    /// Takes released record `i` (from [`release`](Self::release)) for (plugin, owner), zeroed.
    pub fn reclaim(&self, i: usize, plugin: &str, owner: &str) {
        if let Some(r) = self.get(i) {
            seqlock::changing(&r.seq, || r.init(plugin, owner));
        }
    }

    /// Releases record `i`: its route or global rule is gone and no context of it is left.
    /// It is no longer reported, and [`reclaim`](Self::reclaim) may give it to another.
    pub fn release(&self, i: usize) {
        if let Some(r) = self.get(i) {
            seqlock::changing(&r.seq, || {
                r.key_len.store(seqlock::RELEASED, Ordering::Relaxed)
            });
        }
    }

    /// Record `i`, if claimed.
    pub fn get(&self, i: usize) -> Option<&'a ContextStats> {
        (i < self.len()).then(|| self.record(i))
    }

    /// Records claimed in this slot.
    pub fn len(&self) -> usize {
        (self.slot.contexts.load(Ordering::Acquire) as usize).min(CONTEXTS_PER_SLOT)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Segment;

    #[test]
    fn buckets_are_monotonic_and_sqrt2_wide() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = bucket(us);
            assert!(b >= last);
            last = b;
            if b + 1 < LATENCY_BUCKETS {
                assert!((us as f64) < bucket_bound(b), "{us} µs in bucket {b}");
            }
            if b > 0 {
                assert!(us as f64 >= bucket_bound(b - 1), "{us} µs in bucket {b}");
            }
        }
        assert_eq!(bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_from_counts() {
        let mut counts = vec![0; LATENCY_BUCKETS];
        for us in (1..=100).map(|i| i * 10) {
            counts[bucket(us)] += 1;
        }
        let p50 = quantile(&counts, 0.5).unwrap();
        let p99 = quantile(&counts, 0.99).unwrap();
        assert!((500.0..=500.0 * 1.42).contains(&p50), "{p50}");
        assert!((990.0..=990.0 * 1.42).contains(&p99), "{p99}");
        assert_eq!(quantile(&[0; 4], 0.5), None);
    }

    #[test]
    fn records_claimed_read_and_reset_with_the_slot() {
        let seg = Segment::create(1 << 20).unwrap();
        let i = seg.claim_slot().unwrap();
        let st = seg.stats(i);
        let r = st.claim("auth", "route:orders-api").unwrap();
        let rec = st.get(r).unwrap();
        ContextStats::add(&rec.requests);
        rec.record_time(12_000);
        let snap = st.get(r).unwrap().snapshot().unwrap();
        assert_eq!(
            (snap.plugin.as_str(), snap.owner.as_str(), snap.requests),
            ("auth", "route:orders-api", 1)
        );
        assert_eq!(snap.latency[bucket(12)], 1);
        seg.slot(i).reset();
        assert!(seg.stats(i).is_empty());
        // A reclaimed record starts from zero.
        let r = seg.stats(i).claim("auth", "route:x").unwrap();
        assert_eq!(seg.stats(i).get(r).unwrap().snapshot().unwrap().requests, 0);
        // Released: not reported; taken again by another context, from zero.
        let st = seg.stats(i);
        ContextStats::add(&st.get(r).unwrap().requests);
        st.release(r);
        assert!(st.get(r).unwrap().snapshot().is_none());
        st.reclaim(r, "auth", "route:y");
        let snap = st.get(r).unwrap().snapshot().unwrap();
        assert_eq!((snap.owner.as_str(), snap.requests), ("route:y", 0));
    }
}
