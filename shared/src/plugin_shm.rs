//! Gateway-wide state for Proxy-Wasm plugins, shared by every worker process: shared data
//! (`proxy_get_shared_data` / `proxy_set_shared_data`), shared queues
//! (`proxy_register_shared_queue`, `proxy_enqueue_shared_queue`, …) and metrics
//! (`proxy_define_metric`, `proxy_increment_metric`, …).
//!
//! # Why one shared segment
//!
//! Envoy keeps this state in one process, behind one mutex. wasmgate runs plugins in several
//! worker processes, so the state lives in one `memfd` segment that the master creates
//! ([`PluginShm::create`]) and the workers inherit and map ([`PluginShm::open`]). The segment
//! has a fixed size chosen at creation: nothing ever grows, and when a part is full the caller
//! gets [`Error::Full`].
//!
//! # Layout
//!
//! ```text
//! offset 0      header page (4 KiB)
//!               0..    magic, layout version, the layout below (written once by create),
//!                      then the mutable counters (arena tops, live bytes, CAS counter, …)
//!               2048   the pthread mutex (process-shared, robust, error-checking)
//! 4096          shared data (≈60% of the rest)
//!                 key table: power-of-two array of u64 slots (open addressing, linear probing)
//!                 arena: append-only records [hdr 24 B | key | value], 8-byte aligned
//! …             shared queues (≈30%)
//!                 queue table: fixed array of 320-byte descriptors (names, head, tail, count, seq)
//!                 arena: append-only records [hdr 24 B | payload], linked per queue (FIFO)
//! …             metrics (≈10%)
//!                 metric table: fixed array of 520-byte slots (name, kind, atomic values,
//!                 histogram buckets)
//! ```
//!
//! All integers are little-endian. Offsets stored in the segment are relative to their arena.
//!
//! # Concurrency
//!
//! * One `pthread_mutex_t` in the header page, initialised `PTHREAD_PROCESS_SHARED` and
//!   `PTHREAD_MUTEX_ROBUST`, guards the shared-data and queue structures and metric definition.
//!   Hold times are short: a lookup, a copy, a few stores. The rare compaction (below) is the
//!   only O(arena) work done under it.
//! * Metric values are plain atomics, updated without the lock: `increment`/`record` are the hot
//!   path of plugins. A metric slot is published by storing its `state` last (release), and its
//!   name and kind never change afterwards, so a reader that sees `state == USED` (acquire) sees
//!   the whole definition.
//! * A queue's `seq` counter is an atomic bumped on every enqueue, so workers can poll it without
//!   the lock to know when to call `proxy_on_queue_ready`.
//!
//! # Surviving a process killed while holding the lock
//!
//! A worker can die at any instruction (SIGKILL, OOM killer). The robust mutex then hands the
//! next locker `EOWNERDEAD`; we call `pthread_mutex_consistent` and check every structure
//! before using it. Writes are ordered so that a death mid-update almost always leaves
//! consistent structures:
//!
//! * a shared-data write copies the whole record to unused space above the arena top, then
//!   bumps the top, then publishes the record with **one** store of its key slot (old record →
//!   new record). A death before that store loses the write; a death after it loses nothing.
//!   Each record names its key slot and its key hashes to the slot's tag, which the check
//!   verifies.
//! * a queue item is written fully above the top before it is linked; a dequeue is a store of
//!   `head`. After a death the check walks each queue's chain from `head` and recomputes `tail`
//!   and `count` (the chain is the truth), so half-done links are repaired, not discarded.
//! * compaction (sliding live records down to reclaim overwritten/dequeued ones) cannot be made
//!   atomic cheaply, so it raises a `compacting` flag first; a death while it is raised resets
//!   that part (shared data or queue contents) to empty, with a `tracing::error!`.
//!
//! Anything that fails the check (an offset out of bounds, a bad record magic, a chain that goes
//! backwards, …) resets that part to empty and logs an error: corrupted data is never handed
//! out. Every offset and length read from the segment is treated as untrusted and bounds-checked
//! before use, in the check and in normal operations alike.
//!
//! # Arenas and compaction
//!
//! Both arenas are bump allocators: a new record goes at `top`. Overwritten values and dequeued
//! items become garbage. When a write does not fit above `top`, and the live bytes plus the new
//! record fit the arena, the arena is compacted under the lock (live records slide down, in
//! order, and their key slot / queue links are updated), then the write proceeds; otherwise the
//! answer is [`Error::Full`]. Compaction needs no allocation: shared-data records name their key
//! slot, and queue records are marked by walking each queue's chain.
//!
//! # Limits
//!
//! * segment: [`MIN_SEGMENT_SIZE`] (64 KiB) to [`MAX_SEGMENT_SIZE`] (1 TiB); a few MiB suits
//!   most deployments (64 KiB gives a 32 KiB shared-data arena, 384 keys, 9 queues and a
//!   15 KiB queue arena, 11 metrics);
//! * shared data: key ≤ [`MAX_KEY_LEN`] (4 KiB), value ≤ [`MAX_VALUE_LEN`] (1 MiB) and the
//!   record must fit the arena; at most 75% of the key slots are used (one slot per 64 bytes of
//!   the shared-data region, a power of two, up to 2²⁴). Updating a key needs room for the new
//!   copy while the old one is still live;
//! * queues: one descriptor per 2 KiB of the queue region (8 to 4096 queues), `vm_id` + name ≤
//!   [`MAX_QUEUE_NAME_LEN`] (256 bytes), ≤ [`MAX_QUEUE_ITEMS`] (10 000) items per queue, item ≤
//!   [`MAX_QUEUE_ITEM_LEN`] (1 MiB) and the arena. A queue at its item limit, or whose own
//!   items keep a new one out of the arena, drops its oldest to take the new one (Envoy's
//!   queues have no limit, and the SDKs trap on a refused enqueue: a consumer that stopped
//!   must not fail every request of the producer);
//! * metrics: one 520-byte slot per 520 bytes of the metric region (up to 65 536), name ≤
//!   [`MAX_METRIC_NAME_LEN`] (256 bytes); histograms use the fixed [`HISTOGRAM_BOUNDS`].
//!
//! # Semantics (as Envoy / proxy-wasm-cpp-host)
//!
//! * `set(key, value, cas)`: `cas == 0` writes unconditionally; otherwise the key's current CAS
//!   must equal `cas`, else [`Error::CasMismatch`]. As in proxy-wasm-cpp-host, a missing key is
//!   created whatever `cas` says. CAS values come from one segment-wide counter (never 0, wraps
//!   skipping 0), so a key that is reset and written again never reuses a recent CAS. Keys are not
//!   namespaced here: to isolate VMs as Envoy does, callers prefix the key with the vm_id.
//! * Queue tokens are `index + 1` in the queue table: registering the same (vm_id, name) from
//!   any process returns the same token. Queues are never deleted.
//! * Metric ids are `index + 1` in the metric table: defining the same name and kind from any
//!   process returns the same id; the same name with another kind is [`Error::BadArgument`].

use std::fs::File;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"WGPLUGSH");
/// Bumped whenever the layout changes; a mismatch fails [`PluginShm::open`] loudly.
pub const LAYOUT_VERSION: u64 = 1;
const HEADER_SIZE: usize = 4096;
/// Where the mutex lives in the header page (64-byte aligned, after the header fields).
const LOCK_OFFSET: usize = 2048;

/// Smallest segment [`PluginShm::create`] accepts.
pub const MIN_SEGMENT_SIZE: usize = 64 << 10;
/// Largest segment [`PluginShm::create`] accepts (arena offsets must fit 40 bits of 8-byte units).
pub const MAX_SEGMENT_SIZE: usize = 1 << 40;
/// Longest shared-data key.
pub const MAX_KEY_LEN: usize = 4 << 10;
/// Longest shared-data value (also bounded by the arena: see [`Error::TooLarge`]).
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Most items one queue holds.
pub const MAX_QUEUE_ITEMS: u64 = 10_000;
/// Longest queue item (also bounded by the queue arena).
pub const MAX_QUEUE_ITEM_LEN: usize = 1 << 20;
/// Longest `vm_id` + queue name, together (stored inline in the queue descriptor).
pub const MAX_QUEUE_NAME_LEN: usize = NAME_WORDS * 8;
/// Longest metric name (stored inline in the metric slot).
pub const MAX_METRIC_NAME_LEN: usize = NAME_WORDS * 8;
/// Histogram bucket upper bounds (`le`), 1-2-5 per decade from 1 to 10⁹; `+Inf` comes after.
pub const HISTOGRAM_BOUNDS: [u64; 28] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];
const NBUCKETS: usize = HISTOGRAM_BOUNDS.len() + 1;

const MAX_KV_SLOTS: usize = 1 << 24;
const MAX_QUEUES: usize = 4096;
const MAX_METRICS: usize = 65_536;
const NAME_WORDS: usize = 32;

/// "No record" in queue links.
const NIL: u64 = u64::MAX;
/// Size of the record header in both arenas.
const REC_HEADER: usize = 24;
const KV_MAGIC: u32 = u32::from_le_bytes(*b"KVR1");
const Q_MAGIC: u32 = u32::from_le_bytes(*b"QIT1");
const SLOT_FREE: u32 = 0;
const SLOT_USED: u32 = 1;
/// A key slot packs `tag << 40 | (offset / 8 + 1)`; 0 is an empty slot.
const OFF_BITS: u32 = 40;
const OFF_MASK: u64 = (1 << OFF_BITS) - 1;

/// Errors from the plugin shared-memory segment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shared data: compare-and-swap mismatch (the value changed since it was read)")]
    CasMismatch,
    #[error("not found")]
    NotFound,
    #[error("{what} is full (capacity {capacity} {unit})")]
    Full {
        what: &'static str,
        capacity: u64,
        unit: &'static str,
    },
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("bad argument: {0}")]
    BadArgument(&'static str),
    #[error("plugin shared memory: {0}")]
    Io(#[from] std::io::Error),
    #[error("plugin shared memory: {0}")]
    BadSegment(String),
}

/// The kind of a metric, as `proxy_define_metric` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    // Stored as 1..=3 so that a zeroed slot never looks like a valid kind.
    fn to_u32(self) -> u32 {
        match self {
            MetricKind::Counter => 1,
            MetricKind::Gauge => 2,
            MetricKind::Histogram => 3,
        }
    }

    fn from_u32(v: u32) -> Option<MetricKind> {
        match v {
            1 => Some(MetricKind::Counter),
            2 => Some(MetricKind::Gauge),
            3 => Some(MetricKind::Histogram),
            _ => None,
        }
    }

    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// A histogram's state at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound, cumulative count of observations ≤ bound)` for each of
    /// [`HISTOGRAM_BOUNDS`]; the `+Inf` bucket is [`count`](Self::count).
    pub buckets: Vec<(u64, u64)>,
    /// Sum of the observed values (wrapping).
    pub sum: u64,
    /// Number of observations (the `+Inf` bucket).
    pub count: u64,
}

/// One metric's state at one instant, enough to render Prometheus text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSnapshot {
    pub id: u32,
    pub name: String,
    pub kind: MetricKind,
    /// Counter or gauge value; for a histogram, its count.
    pub value: i64,
    /// Present for histograms.
    pub histogram: Option<HistogramSnapshot>,
}

/// The header page's fields. Layout fields are written once by `create`, before the magic;
/// state fields change only under the lock.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU64,
    total_len: AtomicU64,
    kv_slots: AtomicU64,
    kv_arena_off: AtomicU64,
    kv_arena_len: AtomicU64,
    q_table_off: AtomicU64,
    q_slots: AtomicU64,
    q_arena_off: AtomicU64,
    q_arena_len: AtomicU64,
    m_table_off: AtomicU64,
    m_slots: AtomicU64,
    /// Last CAS value handed out (u32 in a u64).
    cas: AtomicU64,
    kv_top: AtomicU64,
    /// Bytes of live shared-data records (a hint, recomputed after a crash).
    kv_live: AtomicU64,
    /// Occupied key slots (a hint, recomputed after a crash).
    kv_used: AtomicU64,
    kv_compacting: AtomicU64,
    q_top: AtomicU64,
    q_live: AtomicU64,
    q_compacting: AtomicU64,
    /// Mark value of the last queue compaction.
    q_epoch: AtomicU64,
    /// How many times a process found the lock owner dead.
    recoveries: AtomicU64,
}

/// A queue descriptor. `names` holds `vm_id` then `name`, packed little-endian.
#[repr(C)]
struct QueueSlot {
    state: AtomicU32,
    vm_len: AtomicU32,
    name_len: AtomicU32,
    _reserved: AtomicU32,
    /// Bumped on every enqueue; read without the lock.
    seq: AtomicU64,
    /// Arena offset of the oldest item, or NIL.
    head: AtomicU64,
    /// Arena offset of the newest item, or NIL.
    tail: AtomicU64,
    count: AtomicU64,
    /// Scratch for compaction: the last record of this queue moved so far.
    compact_prev: AtomicU64,
    _reserved2: AtomicU64,
    names: [AtomicU64; NAME_WORDS],
}

/// A metric slot. Everything is atomic: values are updated without the lock.
#[repr(C)]
struct MetricSlot {
    state: AtomicU32,
    kind: AtomicU32,
    name_len: AtomicU32,
    _reserved: AtomicU32,
    /// Counter or gauge value.
    value: AtomicI64,
    /// Histogram sum.
    sum: AtomicU64,
    /// Histogram buckets, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; NBUCKETS],
    name: [AtomicU64; NAME_WORDS],
}

const _: () = assert!(size_of::<Header>() <= LOCK_OFFSET);
const _: () = assert!(LOCK_OFFSET + size_of::<libc::pthread_mutex_t>() <= HEADER_SIZE);
const _: () = assert!(LOCK_OFFSET & (std::mem::align_of::<libc::pthread_mutex_t>() - 1) == 0);
const _: () = assert!(size_of::<QueueSlot>() == 320);
const _: () = assert!(size_of::<MetricSlot>() == 520);
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PluginShm>();
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    off: usize,
    len: usize,
}

impl Region {
    fn end(self) -> Option<usize> {
        self.off.checked_add(self.len)
    }
}

/// Where each part lives; computed by `create`, read back and validated by `open`, then trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    total: usize,
    kv_slots: usize,
    kv_arena: Region,
    q_table: usize,
    q_slots: usize,
    q_arena: Region,
    m_table: usize,
    m_slots: usize,
}

impl Layout {
    /// Splits `total` bytes (≥ MIN_SEGMENT_SIZE, a multiple of 4096): 60% shared data, 30%
    /// queues, 10% metrics, each region 64-byte aligned.
    fn for_size(total: usize) -> Layout {
        let rest = total - HEADER_SIZE;
        let m_region = (rest / 10) & !63;
        let q_region = (rest / 10 * 3) & !63;
        let kv_region = (rest - m_region - q_region) & !63;

        // One key slot per 64 bytes of region: 1/8 of it for the table.
        let kv_slots = prev_power_of_two(kv_region / 64).clamp(64, MAX_KV_SLOTS);
        let kv_arena_off = HEADER_SIZE + kv_slots * 8;
        let kv_arena = Region {
            off: kv_arena_off,
            len: (HEADER_SIZE + kv_region - kv_arena_off) & !7,
        };

        let q_table = HEADER_SIZE + kv_region;
        let q_slots = (q_region / 2048).clamp(8, MAX_QUEUES);
        let q_arena_off = q_table + q_slots * size_of::<QueueSlot>();
        let q_arena = Region {
            off: q_arena_off,
            len: (q_table + q_region - q_arena_off) & !7,
        };

        let m_table = q_table + q_region;
        let m_slots = (m_region / size_of::<MetricSlot>()).clamp(1, MAX_METRICS);
        Layout {
            total,
            kv_slots,
            kv_arena,
            q_table,
            q_slots,
            q_arena,
            m_table,
            m_slots,
        }
    }

    fn read(h: &Header) -> Result<Layout, Error> {
        let get = |a: &AtomicU64| {
            usize::try_from(a.load(Ordering::Relaxed))
                .map_err(|_| Error::BadSegment("layout field does not fit usize".into()))
        };
        Ok(Layout {
            total: get(&h.total_len)?,
            kv_slots: get(&h.kv_slots)?,
            kv_arena: Region {
                off: get(&h.kv_arena_off)?,
                len: get(&h.kv_arena_len)?,
            },
            q_table: get(&h.q_table_off)?,
            q_slots: get(&h.q_slots)?,
            q_arena: Region {
                off: get(&h.q_arena_off)?,
                len: get(&h.q_arena_len)?,
            },
            m_table: get(&h.m_table_off)?,
            m_slots: get(&h.m_slots)?,
        })
    }

    fn write(&self, h: &Header) {
        let set = |a: &AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        set(&h.total_len, self.total);
        set(&h.kv_slots, self.kv_slots);
        set(&h.kv_arena_off, self.kv_arena.off);
        set(&h.kv_arena_len, self.kv_arena.len);
        set(&h.q_table_off, self.q_table);
        set(&h.q_slots, self.q_slots);
        set(&h.q_arena_off, self.q_arena.off);
        set(&h.q_arena_len, self.q_arena.len);
        set(&h.m_table_off, self.m_table);
        set(&h.m_slots, self.m_slots);
    }

    /// Checks that every part lies inside `map_len` bytes, in order, aligned, without overlap.
    /// After this, accessors trust the layout (it is a private copy, not re-read).
    fn validate(&self, map_len: usize) -> Result<(), &'static str> {
        fn table_end(off: usize, n: usize, size: usize) -> Option<usize> {
            n.checked_mul(size)?.checked_add(off)
        }
        fn arena(r: Region, after: usize) -> Result<usize, &'static str> {
            if r.off < after || r.off & 7 != 0 || r.len & 7 != 0 {
                return Err("arena misplaced");
            }
            if r.len < 64 || r.len > MAX_SEGMENT_SIZE {
                return Err("arena size out of range");
            }
            r.end().ok_or("arena end overflows")
        }
        if self.total < MIN_SEGMENT_SIZE || self.total > MAX_SEGMENT_SIZE || self.total > map_len {
            return Err("total size does not match the mapping");
        }
        if !self.kv_slots.is_power_of_two() || self.kv_slots > MAX_KV_SLOTS {
            return Err("key table size is not a power of two in range");
        }
        let kv_table_end = table_end(HEADER_SIZE, self.kv_slots, 8).ok_or("key table overflows")?;
        let kv_end = arena(self.kv_arena, kv_table_end)?;
        if self.q_table < kv_end || self.q_table & 63 != 0 {
            return Err("queue table misplaced");
        }
        if self.q_slots == 0 || self.q_slots > MAX_QUEUES {
            return Err("queue table size out of range");
        }
        let q_table_end = table_end(self.q_table, self.q_slots, size_of::<QueueSlot>())
            .ok_or("queue table overflows")?;
        let q_end = arena(self.q_arena, q_table_end)?;
        if self.m_table < q_end || self.m_table & 63 != 0 {
            return Err("metric table misplaced");
        }
        if self.m_slots == 0 || self.m_slots > MAX_METRICS {
            return Err("metric table size out of range");
        }
        let m_end = table_end(self.m_table, self.m_slots, size_of::<MetricSlot>())
            .ok_or("metric table overflows")?;
        if m_end > self.total {
            return Err("metric table past the end of the segment");
        }
        Ok(())
    }
}

fn prev_power_of_two(n: usize) -> usize {
    if n == 0 {
        1
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// Size of an arena record with `payload` bytes after its header, rounded to 8.
fn record_size(payload: usize) -> u64 {
    ((REC_HEADER + payload + 7) & !7) as u64
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

// FNV-1a: deterministic in every process (std's hasher is not promised stable across builds).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

// MurmurHash3's finaliser, so that both the low bits (table index) and the high bits (tag) mix.
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn hash_key(key: &[u8]) -> u64 {
    fmix(fnv(FNV_OFFSET, key))
}

fn tag_of(hash: u64) -> u64 {
    hash >> OFF_BITS
}

fn pack(tag: u64, off: u64) -> u64 {
    (tag << OFF_BITS) | ((off / 8 + 1) & OFF_MASK)
}

/// `(tag, offset)` of a non-empty key slot; None for a malformed one.
fn unpack(v: u64) -> Option<(u64, u64)> {
    let o = v & OFF_MASK;
    if o == 0 {
        return None;
    }
    Some((v >> OFF_BITS, (o - 1) * 8))
}

fn le32(b: &[u8; REC_HEADER], at: usize) -> u32 {
    let mut w = [0u8; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(w)
}

fn le64(b: &[u8; REC_HEADER], at: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

fn put32(b: &mut [u8; REC_HEADER], at: usize, v: u32) {
    for (i, x) in v.to_le_bytes().into_iter().enumerate() {
        if let Some(d) = b.get_mut(at + i) {
            *d = x;
        }
    }
}

fn put64(b: &mut [u8; REC_HEADER], at: usize, v: u64) {
    for (i, x) in v.to_le_bytes().into_iter().enumerate() {
        if let Some(d) = b.get_mut(at + i) {
            *d = x;
        }
    }
}

/// Stores `bytes` (≤ NAME_WORDS * 8) zero-padded into `words`.
fn store_name(words: &[AtomicU64; NAME_WORDS], bytes: &[u8]) {
    for (i, w) in words.iter().enumerate() {
        let mut b = [0u8; 8];
        for (j, x) in b.iter_mut().enumerate() {
            *x = bytes.get(i * 8 + j).copied().unwrap_or(0);
        }
        w.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
}

/// The first `len` (clamped) bytes held in `words`.
fn load_name(words: &[AtomicU64; NAME_WORDS], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(NAME_WORDS * 8);
    for w in words {
        out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether the bytes held in `words` start with `a` then `b` (`a.len() + b.len()` ≤ the
/// capacity, else false). Compares word by word, without allocating: it runs under the lock
/// for every slot of a table.
fn name_eq(words: &[AtomicU64; NAME_WORDS], a: &[u8], b: &[u8]) -> bool {
    if a.len() + b.len() > NAME_WORDS * 8 {
        return false;
    }
    let mut bytes = a.iter().chain(b).copied();
    for w in words.iter().take((a.len() + b.len()).div_ceil(8)) {
        let mut want = [0u8; 8];
        for x in want.iter_mut() {
            *x = bytes.next().unwrap_or(0);
        }
        // Padding past the name is stored as zeros, so whole words compare.
        if w.load(Ordering::Relaxed).to_le_bytes() != want {
            return false;
        }
    }
    true
}

/// A shared-data record header: `magic, key_len, val_len, cas, slot, reserved` (u32 each).
#[derive(Debug, Clone, Copy)]
struct KvRec {
    key_len: usize,
    val_len: usize,
    cas: u32,
    slot: usize,
    size: u64,
}

/// A queue record header: `magic, len, queue index, mark` (u32 each) then `next` (u64).
#[derive(Debug, Clone, Copy)]
struct QRec {
    len: usize,
    queue: usize,
    mark: u32,
    next: u64,
    size: u64,
}

enum Probe {
    Found { slot: usize, rec: KvRec, off: u64 },
    Vacant { slot: usize },
    NoRoom,
}

/// What went wrong inside a locked operation: an answer for the caller, or a corruption found
/// in one part, which the caller resets before answering.
enum Fail {
    Api(Error),
    Kv(&'static str),
    Queues(&'static str),
    Queue(usize, &'static str),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Api(e)
    }
}

/// Result of walking one queue's chain.
struct Walk {
    count: u64,
    last: u64,
    bytes: u64,
}

/// The plugin shared-memory segment, mapped in this process.
pub struct PluginShm {
    file: File,
    map: memmap2::MmapRaw,
    layout: Layout,
}

impl std::fmt::Debug for PluginShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginShm")
            .field("bytes", &self.layout.total)
            .field("layout", &self.layout)
            .finish()
    }
}

fn pthread_check(rc: libc::c_int) -> Result<(), Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Io(std::io::Error::from_raw_os_error(rc)))
    }
}

impl PluginShm {
    /// Creates a segment of `bytes` (rounded up to 4 KiB; between [`MIN_SEGMENT_SIZE`] and
    /// [`MAX_SEGMENT_SIZE`]) in the master. Pages cost memory only once written.
    pub fn create(bytes: usize) -> Result<PluginShm, Error> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&bytes) {
            return Err(Error::BadArgument(
                "plugin shared memory size must be between 64 KiB and 1 TiB",
            ));
        }
        let total = bytes.next_multiple_of(4096);
        let layout = Layout::for_size(total);
        layout
            .validate(total)
            .map_err(|e| Error::BadSegment(format!("computed layout is invalid: {e}")))?;
        // The zero pages are the empty state of every table (slot 0 = free/empty).
        let file = crate::shm::sparse_memfd(c"wasmgate-plugin-shm", total as u64)?;
        let map = memmap2::MmapRaw::map_raw(&file)?;
        if map.len() < total {
            return Err(Error::BadSegment("mapping shorter than the segment".into()));
        }
        let shm = PluginShm { file, map, layout };
        let h = shm.header();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        layout.write(h);
        shm.init_mutex()?;
        // Published last: `open` trusts nothing before it sees the magic.
        h.magic.store(MAGIC, Ordering::Release);
        Ok(shm)
    }

    /// Maps an inherited segment (worker side) after checking its magic, layout version and
    /// layout.
    pub fn open(fd: OwnedFd) -> Result<PluginShm, Error> {
        let file = File::from(fd);
        let len = file.metadata()?.len();
        if len < HEADER_SIZE as u64 {
            return Err(Error::BadSegment(format!(
                "segment of {len} bytes is smaller than its {HEADER_SIZE}-byte header"
            )));
        }
        let map = memmap2::MmapRaw::map_raw(&file)?;
        if map.len() < HEADER_SIZE {
            return Err(Error::BadSegment("mapping smaller than the header".into()));
        }
        // SAFETY: the mapping is page-aligned and at least HEADER_SIZE bytes long (checked just
        // above); Header is repr(C) of atomics, valid for any bit pattern; the reference does not
        // outlive `map`.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(Error::BadSegment(format!(
                "not a wasmgate plugin shared-memory segment (magic {magic:#018x})"
            )));
        }
        let found = h.version.load(Ordering::Relaxed);
        if found != LAYOUT_VERSION {
            return Err(Error::BadSegment(format!(
                "layout version {found}, this binary speaks {LAYOUT_VERSION}: the master and worker binaries differ"
            )));
        }
        let layout = Layout::read(h)?;
        layout
            .validate(map.len())
            .map_err(|e| Error::BadSegment(format!("inconsistent layout: {e}")))?;
        Ok(PluginShm { file, map, layout })
    }

    /// The memfd, for passing to workers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Size of the segment in bytes.
    pub fn size(&self) -> usize {
        self.layout.total
    }

    /// How many times a process found the lock's owner dead and checked the structures.
    pub fn recoveries(&self) -> u64 {
        self.header().recoveries.load(Ordering::Relaxed)
    }

    fn init_mutex(&self) -> Result<(), Error> {
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is a local initialised by pthread_mutexattr_init before any other use
        // and destroyed once; `self.mutex()` points to LOCK_OFFSET in the mapping, aligned and
        // large enough for a pthread_mutex_t (const asserts), and no other process can use it
        // yet because the magic is not published.
        unsafe {
            pthread_check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let r = (|| {
                pthread_check(libc::pthread_mutexattr_setpshared(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_PROCESS_SHARED,
                ))?;
                pthread_check(libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ROBUST,
                ))?;
                // Error-checking: a nested lock from a bug returns EDEADLK instead of hanging.
                pthread_check(libc::pthread_mutexattr_settype(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ERRORCHECK,
                ))?;
                pthread_check(libc::pthread_mutex_init(self.mutex(), attr.as_ptr()))
            })();
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            r
        }
    }

    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        self.base().wrapping_add(LOCK_OFFSET) as *mut libc::pthread_mutex_t
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and holds at least `layout.total` ≥ HEADER_SIZE
        // bytes (validated); Header is repr(C) of atomics, valid for any bit pattern and meant
        // for shared mutation; the reference borrows `self`, which owns the mapping.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn kv_table(&self) -> &[AtomicU64] {
        // SAFETY: HEADER_SIZE + kv_slots * 8 lies inside the mapping (Layout::validate), the
        // start is 8-aligned in a page-aligned mapping, AtomicU64 is valid for any bit pattern,
        // and the slice borrows `self`, which owns the mapping.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(HEADER_SIZE) as *const AtomicU64,
                self.layout.kv_slots,
            )
        }
    }

    fn queue_table(&self) -> &[QueueSlot] {
        // SAFETY: q_table + q_slots * size_of::<QueueSlot>() lies inside the mapping and q_table
        // is 64-aligned (Layout::validate); QueueSlot is repr(C) of atomics, valid for any bit
        // pattern; the slice borrows `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(self.layout.q_table) as *const QueueSlot,
                self.layout.q_slots,
            )
        }
    }

    fn metric_table(&self) -> &[MetricSlot] {
        // SAFETY: m_table + m_slots * size_of::<MetricSlot>() lies inside the mapping and m_table
        // is 64-aligned (Layout::validate); MetricSlot is repr(C) of atomics, valid for any bit
        // pattern; the slice borrows `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(self.layout.m_table) as *const MetricSlot,
                self.layout.m_slots,
            )
        }
    }

    fn max_keys(&self) -> u64 {
        // 75% load keeps linear-probing chains short and guarantees an empty slot ends a probe.
        (self.layout.kv_slots as u64) * 3 / 4
    }

    /// Takes the cross-process lock; on `EOWNERDEAD` makes it consistent and checks (and if
    /// need be resets) every structure before returning.
    fn lock(&self) -> Result<Locked<'_>, Error> {
        // SAFETY: `mutex()` points to the pthread_mutex_t initialised by `create` in the shared
        // header page, which stays mapped while `self` lives.
        let rc = unsafe { libc::pthread_mutex_lock(self.mutex()) };
        match rc {
            0 => Ok(Locked::new(self)),
            libc::EOWNERDEAD => {
                // We own the mutex now; the guard unlocks it whatever happens below.
                let g = Locked::new(self);
                // SAFETY: same mutex, held by us in the owner-died state, as required.
                pthread_check(unsafe { libc::pthread_mutex_consistent(self.mutex()) })?;
                self.header().recoveries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "a process died holding the plugin shared-memory lock; checking shared data, queues and metrics"
                );
                g.recover();
                Ok(g)
            }
            libc::ENOTRECOVERABLE => Err(Error::BadSegment(
                "the lock is not recoverable (a process died while repairing it): restart the gateway"
                    .into(),
            )),
            e => Err(Error::Io(std::io::Error::from_raw_os_error(e))),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Shared data

    /// The value of `key` and its CAS, or None.
    pub fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, Error> {
        let mut value = Vec::new();
        Ok(self.get_into(key, &mut value)?.map(|cas| (value, cas)))
    }

    /// The value of `key` copied into `out` (replacing what it held: a buffer the caller keeps
    /// spares an allocation per read) and its CAS, or None.
    pub fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<Option<u32>, Error> {
        if key.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        let hash = hash_key(key);
        let g = self.lock()?;
        let r = g.kv_get(key, hash, out);
        g.settle(r)
    }

    /// Sets `key` to `value`. `cas == 0`: unconditional; otherwise the key's current CAS must
    /// equal `cas` (a missing key is created whatever `cas` is, as in Envoy).
    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), Error> {
        if key.len() > MAX_KEY_LEN {
            return Err(Error::TooLarge {
                what: "shared data key",
                size: key.len(),
                limit: MAX_KEY_LEN,
            });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::TooLarge {
                what: "shared data value",
                size: value.len(),
                limit: MAX_VALUE_LEN,
            });
        }
        let need = record_size(key.len() + value.len());
        let cap = self.layout.kv_arena.len;
        if need > cap as u64 {
            return Err(Error::TooLarge {
                what: "shared data entry (24-byte header + key + value)",
                size: need as usize,
                limit: cap,
            });
        }
        let hash = hash_key(key);
        let g = self.lock()?;
        let r = g.kv_set(key, value, cas, hash, need);
        g.settle(r)
    }

    // ---------------------------------------------------------------------------------------
    // Queues

    /// The token of queue (`vm_id`, `name`), registering it if needed (idempotent).
    pub fn register_queue(&self, vm_id: &str, name: &str) -> Result<u32, Error> {
        let total = vm_id.len() + name.len();
        if total > MAX_QUEUE_NAME_LEN {
            return Err(Error::TooLarge {
                what: "queue vm_id + name",
                size: total,
                limit: MAX_QUEUE_NAME_LEN,
            });
        }
        let mut names = Vec::with_capacity(total);
        names.extend_from_slice(vm_id.as_bytes());
        names.extend_from_slice(name.as_bytes());
        let _g = self.lock()?;
        let mut free = None;
        for (i, q) in self.queue_table().iter().enumerate() {
            if q.state.load(Ordering::Acquire) == SLOT_USED {
                if queue_matches(q, vm_id, name) {
                    return Ok(i as u32 + 1);
                }
            } else if free.is_none() {
                free = Some(i);
            }
        }
        let (i, q) = free
            .and_then(|i| self.queue_table().get(i).map(|q| (i, q)))
            .ok_or(Error::Full {
                what: "shared queue table",
                capacity: self.layout.q_slots as u64,
                unit: "queues",
            })?;
        q.vm_len.store(vm_id.len() as u32, Ordering::Relaxed);
        q.name_len.store(name.len() as u32, Ordering::Relaxed);
        store_name(&q.names, &names);
        q.head.store(NIL, Ordering::Relaxed);
        q.tail.store(NIL, Ordering::Relaxed);
        q.count.store(0, Ordering::Relaxed);
        q.compact_prev.store(NIL, Ordering::Relaxed);
        // Published last: lock-free readers (resolve, queues, queue_seq) check `state` first.
        q.state.store(SLOT_USED, Ordering::Release);
        Ok(i as u32 + 1)
    }

    /// The token of queue (`vm_id`, `name`) if registered. Lock-free.
    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.queue_table()
            .iter()
            .position(|q| {
                q.state.load(Ordering::Acquire) == SLOT_USED
                    && queue_matches(q, vm_id, name)
                    && q.state.load(Ordering::Acquire) == SLOT_USED
            })
            .map(|i| i as u32 + 1)
    }

    /// Every registered queue: `(token, vm_id, name)`. Lock-free.
    pub fn queues(&self) -> Vec<(u32, String, String)> {
        let mut out = Vec::new();
        for (i, q) in self.queue_table().iter().enumerate() {
            if q.state.load(Ordering::Acquire) != SLOT_USED {
                continue;
            }
            let vm_len = q.vm_len.load(Ordering::Relaxed) as usize;
            let name_len = q.name_len.load(Ordering::Relaxed) as usize;
            let Some(total) = vm_len
                .checked_add(name_len)
                .filter(|t| *t <= MAX_QUEUE_NAME_LEN)
            else {
                continue;
            };
            let bytes = load_name(&q.names, total);
            let (vm, name) = bytes.split_at(vm_len.min(bytes.len()));
            if q.state.load(Ordering::Acquire) == SLOT_USED {
                out.push((
                    i as u32 + 1,
                    String::from_utf8_lossy(vm).into_owned(),
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
        }
        out
    }

    /// A counter bumped on every enqueue to queue `token` (None: unknown token). Lock-free: a
    /// worker polls it to know when to call `proxy_on_queue_ready`.
    pub fn queue_seq(&self, token: u32) -> Option<u64> {
        let q = self.queue_slot(token).ok()?;
        Some(q.1.seq.load(Ordering::Acquire))
    }

    /// The bytes every queue's items share (each item takes its length and a 24-byte header,
    /// rounded up to 8).
    pub fn queue_arena_capacity(&self) -> u64 {
        self.layout.q_arena.len as u64
    }

    /// Items in queue `token` now (None: unknown token). Lock-free, approximate under races.
    pub fn queue_len(&self, token: u32) -> Option<u64> {
        let q = self.queue_slot(token).ok()?;
        Some(q.1.count.load(Ordering::Relaxed))
    }

    fn queue_slot(&self, token: u32) -> Result<(usize, &QueueSlot), Error> {
        let i = token.checked_sub(1).ok_or(Error::NotFound)? as usize;
        let q = self.queue_table().get(i).ok_or(Error::NotFound)?;
        if q.state.load(Ordering::Acquire) != SLOT_USED {
            return Err(Error::NotFound);
        }
        Ok((i, q))
    }

    /// Appends `data` to queue `token`, dropping the queue's oldest items when they keep it
    /// out (at [`MAX_QUEUE_ITEMS`], or an arena full of them); returns how many were dropped.
    pub fn enqueue(&self, token: u32, data: &[u8]) -> Result<u64, Error> {
        if data.len() > MAX_QUEUE_ITEM_LEN {
            return Err(Error::TooLarge {
                what: "queue item",
                size: data.len(),
                limit: MAX_QUEUE_ITEM_LEN,
            });
        }
        let need = record_size(data.len());
        let cap = self.layout.q_arena.len;
        if need > cap as u64 {
            return Err(Error::TooLarge {
                what: "queue item (with its 24-byte header)",
                size: need as usize,
                limit: cap,
            });
        }
        self.queue_slot(token)?;
        let g = self.lock()?;
        let r = g.q_enqueue(token, data, need);
        g.settle(r)
    }

    /// Removes and returns the oldest item of queue `token` (None: empty).
    pub fn dequeue(&self, token: u32) -> Result<Option<Vec<u8>>, Error> {
        self.queue_slot(token)?;
        let g = self.lock()?;
        let r = g.q_dequeue(token);
        g.settle(r)
    }

    // ---------------------------------------------------------------------------------------
    // Metrics

    /// The id of metric `name`, defining it if needed. The same name and kind give the same id
    /// in every process; the same name with another kind is [`Error::BadArgument`].
    pub fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, Error> {
        if name.is_empty() {
            return Err(Error::BadArgument("empty metric name"));
        }
        if name.len() > MAX_METRIC_NAME_LEN {
            return Err(Error::TooLarge {
                what: "metric name",
                size: name.len(),
                limit: MAX_METRIC_NAME_LEN,
            });
        }
        let _g = self.lock()?;
        let mut free = None;
        for (i, m) in self.metric_table().iter().enumerate() {
            if m.state.load(Ordering::Acquire) == SLOT_USED {
                let len = m.name_len.load(Ordering::Relaxed) as usize;
                if len == name.len() && name_eq(&m.name, name.as_bytes(), b"") {
                    return if MetricKind::from_u32(m.kind.load(Ordering::Relaxed)) == Some(kind) {
                        Ok(i as u32 + 1)
                    } else {
                        Err(Error::BadArgument(
                            "metric already defined with another kind",
                        ))
                    };
                }
            } else if free.is_none() {
                free = Some(i);
            }
        }
        let (i, m) = free
            .and_then(|i| self.metric_table().get(i).map(|m| (i, m)))
            .ok_or(Error::Full {
                what: "metric table",
                capacity: self.layout.m_slots as u64,
                unit: "metrics",
            })?;
        m.value.store(0, Ordering::Relaxed);
        m.sum.store(0, Ordering::Relaxed);
        for b in &m.buckets {
            b.store(0, Ordering::Relaxed);
        }
        m.kind.store(kind.to_u32(), Ordering::Relaxed);
        m.name_len.store(name.len() as u32, Ordering::Relaxed);
        store_name(&m.name, name.as_bytes());
        // Published last (release): lock-free users see a complete definition.
        m.state.store(SLOT_USED, Ordering::Release);
        Ok(i as u32 + 1)
    }

    fn metric(&self, id: u32) -> Result<(&MetricSlot, MetricKind), Error> {
        let i = id.checked_sub(1).ok_or(Error::NotFound)? as usize;
        let m = self.metric_table().get(i).ok_or(Error::NotFound)?;
        if m.state.load(Ordering::Acquire) != SLOT_USED {
            return Err(Error::NotFound);
        }
        let kind = MetricKind::from_u32(m.kind.load(Ordering::Relaxed)).ok_or(Error::NotFound)?;
        Ok((m, kind))
    }

    /// Adds `delta` to a counter (`delta` ≥ 0) or gauge. Lock-free.
    pub fn increment(&self, id: u32, delta: i64) -> Result<(), Error> {
        let (m, kind) = self.metric(id)?;
        match kind {
            MetricKind::Counter if delta < 0 => {
                Err(Error::BadArgument("a counter cannot be decremented"))
            }
            MetricKind::Counter | MetricKind::Gauge => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
            MetricKind::Histogram => Err(Error::BadArgument(
                "a histogram cannot be incremented (record a value instead)",
            )),
        }
    }

    /// Gauge: sets it to `value` (saturating at i64::MAX); histogram: observes `value`;
    /// counter: adds `value` (as Envoy does). Lock-free.
    pub fn record(&self, id: u32, value: u64) -> Result<(), Error> {
        let (m, kind) = self.metric(id)?;
        let v = i64::try_from(value).unwrap_or(i64::MAX);
        match kind {
            MetricKind::Counter => {
                m.value.fetch_add(v, Ordering::Relaxed);
            }
            MetricKind::Gauge => m.value.store(v, Ordering::Relaxed),
            MetricKind::Histogram => {
                let i = HISTOGRAM_BOUNDS.partition_point(|b| *b < value);
                if let Some(b) = m.buckets.get(i) {
                    b.fetch_add(1, Ordering::Relaxed);
                }
                m.sum.fetch_add(value, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// A counter's or gauge's value; for a histogram, its count of observations. Lock-free.
    pub fn get_metric(&self, id: u32) -> Result<i64, Error> {
        let (m, kind) = self.metric(id)?;
        Ok(match kind {
            MetricKind::Histogram => {
                let count = m
                    .buckets
                    .iter()
                    .fold(0u64, |a, b| a.wrapping_add(b.load(Ordering::Relaxed)));
                i64::try_from(count).unwrap_or(i64::MAX)
            }
            _ => m.value.load(Ordering::Relaxed),
        })
    }

    /// Every defined metric, in definition order. Lock-free: values are read atomically one by
    /// one (a histogram's count is the sum of its buckets, so `+Inf` always equals `_count`).
    pub fn metrics(&self) -> Vec<MetricSnapshot> {
        let mut out = Vec::new();
        for (i, m) in self.metric_table().iter().enumerate() {
            if m.state.load(Ordering::Acquire) != SLOT_USED {
                continue;
            }
            let Some(kind) = MetricKind::from_u32(m.kind.load(Ordering::Relaxed)) else {
                continue;
            };
            let len = m.name_len.load(Ordering::Relaxed) as usize;
            if len > MAX_METRIC_NAME_LEN {
                continue;
            }
            let name = String::from_utf8_lossy(&load_name(&m.name, len)).into_owned();
            let (value, histogram) = if kind == MetricKind::Histogram {
                let mut buckets = Vec::with_capacity(HISTOGRAM_BOUNDS.len());
                let mut acc = 0u64;
                for (bound, b) in HISTOGRAM_BOUNDS.iter().zip(&m.buckets) {
                    acc = acc.wrapping_add(b.load(Ordering::Relaxed));
                    buckets.push((*bound, acc));
                }
                let inf = m
                    .buckets
                    .get(HISTOGRAM_BOUNDS.len())
                    .map_or(0, |b| b.load(Ordering::Relaxed));
                let count = acc.wrapping_add(inf);
                let sum = m.sum.load(Ordering::Relaxed);
                (
                    i64::try_from(count).unwrap_or(i64::MAX),
                    Some(HistogramSnapshot {
                        buckets,
                        sum,
                        count,
                    }),
                )
            } else {
                (m.value.load(Ordering::Relaxed), None)
            };
            // A slot reset by a recovery meanwhile is skipped rather than shown half-read.
            if m.state.load(Ordering::Acquire) == SLOT_USED {
                out.push(MetricSnapshot {
                    id: i as u32 + 1,
                    name,
                    kind,
                    value,
                    histogram,
                });
            }
        }
        out
    }
}

/// `name` with every character outside `[a-zA-Z0-9_:]` replaced by `_` (and a leading `_` if it
/// would start with a digit or be empty), as Prometheus metric names require.
pub fn prometheus_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn queue_matches(q: &QueueSlot, vm_id: &str, name: &str) -> bool {
    let vm_len = q.vm_len.load(Ordering::Relaxed) as usize;
    let name_len = q.name_len.load(Ordering::Relaxed) as usize;
    if vm_len != vm_id.len() || name_len != name.len() {
        return false;
    }
    name_eq(&q.names, vm_id.as_bytes(), name.as_bytes())
}

/// Proof that the lock is held; unlocks on drop. Every arena access goes through it.
struct Locked<'a> {
    shm: &'a PluginShm,
    /// Not Send: the thread that locked the (error-checking) mutex must be the one to unlock it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard exists only while this thread holds the mutex (see `lock`).
        let rc = unsafe { libc::pthread_mutex_unlock(self.shm.mutex()) };
        if rc != 0 {
            tracing::error!(rc, "unlocking the plugin shared-memory lock failed");
        }
    }
}

impl<'a> Locked<'a> {
    fn new(shm: &'a PluginShm) -> Locked<'a> {
        Locked {
            shm,
            _not_send: std::marker::PhantomData,
        }
    }

    /// Turns an internal failure into the caller's answer, resetting a corrupted part first.
    fn settle<T>(&self, r: Result<T, Fail>) -> Result<T, Error> {
        match r {
            Ok(v) => Ok(v),
            Err(Fail::Api(e)) => Err(e),
            Err(Fail::Kv(why)) => {
                self.kv_reset(why);
                Err(Error::BadSegment(format!(
                    "shared data was inconsistent ({why}); it has been reset to empty"
                )))
            }
            Err(Fail::Queues(why)) => {
                self.q_reset_all(why);
                Err(Error::BadSegment(format!(
                    "the shared queues were inconsistent ({why}); they have been emptied"
                )))
            }
            Err(Fail::Queue(i, why)) => {
                self.q_clear(i, why);
                self.q_recount();
                Err(Error::BadSegment(format!(
                    "shared queue {} was inconsistent ({why}); it has been emptied",
                    i + 1
                )))
            }
        }
    }

    // --- raw arena access (bounds-checked; the lock makes us the only writer) ---

    fn span(&self, r: Region, off: u64, len: usize) -> Option<*mut u8> {
        let off = usize::try_from(off).ok()?;
        if off.checked_add(len)? > r.len {
            return None;
        }
        // r lies inside the mapping (Layout::validate), so r.off + off + len does too.
        Some(self.shm.base().wrapping_add(r.off + off))
    }

    fn read(&self, r: Region, off: u64, buf: &mut [u8]) -> Option<()> {
        let p = self.span(r, off, buf.len())?;
        // SAFETY: p..p+len lies inside the mapping (span); we hold the lock, so no process writes
        // the arena meanwhile; `buf` is private memory, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p as *const u8, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    fn write(&self, r: Region, off: u64, data: &[u8]) -> Option<()> {
        let p = self.span(r, off, data.len())?;
        // SAFETY: as in `read`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Some(())
    }

    fn move_within(&self, r: Region, src: u64, dst: u64, len: usize) -> Option<()> {
        let s = self.span(r, src, len)?;
        let d = self.span(r, dst, len)?;
        // SAFETY: both ranges lie inside the mapping (span); `ptr::copy` allows overlap; we hold
        // the lock.
        unsafe { std::ptr::copy(s as *const u8, d, len) };
        Some(())
    }

    /// Whether arena bytes at `off` equal `data` (chunked, no allocation).
    fn arena_eq(&self, r: Region, off: u64, data: &[u8]) -> Option<bool> {
        let mut buf = [0u8; 256];
        for (i, chunk) in data.chunks(buf.len()).enumerate() {
            let b = buf.get_mut(..chunk.len())?;
            self.read(r, off + (i * 256) as u64, b)?;
            if b != chunk {
                return Some(false);
            }
        }
        Some(true)
    }

    fn arena_hash(&self, r: Region, off: u64, len: usize) -> Option<u64> {
        let mut buf = [0u8; 256];
        let mut h = FNV_OFFSET;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            let b = buf.get_mut(..n)?;
            self.read(r, off + done as u64, b)?;
            h = fnv(h, b);
            done += n;
        }
        Some(fmix(h))
    }

    // --- shared data ---

    fn kv_top(&self) -> Result<u64, Fail> {
        let h = self.shm.header();
        let top = h.kv_top.load(Ordering::Relaxed);
        if top > self.shm.layout.kv_arena.len as u64 || top & 7 != 0 {
            return Err(Fail::Kv("arena top out of bounds"));
        }
        if h.kv_compacting.load(Ordering::Relaxed) != 0 {
            return Err(Fail::Kv("interrupted compaction"));
        }
        Ok(top)
    }

    /// The record at `off`, if it is well-formed and ends at or below `top`.
    fn kv_rec(&self, off: u64, top: u64) -> Option<KvRec> {
        if off & 7 != 0 || off >= top {
            return None;
        }
        let mut b = [0u8; REC_HEADER];
        self.read(self.shm.layout.kv_arena, off, &mut b)?;
        if le32(&b, 0) != KV_MAGIC {
            return None;
        }
        let key_len = le32(&b, 4) as usize;
        let val_len = le32(&b, 8) as usize;
        if key_len > MAX_KEY_LEN || val_len > MAX_VALUE_LEN {
            return None;
        }
        let size = record_size(key_len + val_len);
        if off.checked_add(size)? > top {
            return None;
        }
        Some(KvRec {
            key_len,
            val_len,
            cas: le32(&b, 12),
            slot: le32(&b, 16) as usize,
            size,
        })
    }

    fn kv_find(&self, key: &[u8], hash: u64, top: u64) -> Result<Probe, Fail> {
        let table = self.shm.kv_table();
        let mask = table.len().saturating_sub(1);
        let tag = tag_of(hash);
        let arena = self.shm.layout.kv_arena;
        let mut i = (hash as usize) & mask;
        for _ in 0..table.len() {
            let v = table.get(i).ok_or(Fail::Kv("probe out of the table"))?;
            let v = v.load(Ordering::Relaxed);
            if v == 0 {
                return Ok(Probe::Vacant { slot: i });
            }
            let (t, off) = unpack(v).ok_or(Fail::Kv("malformed key slot"))?;
            if t == tag {
                let rec = self
                    .kv_rec(off, top)
                    .ok_or(Fail::Kv("key slot points to a bad record"))?;
                if rec.slot != i {
                    return Err(Fail::Kv("record does not name its key slot"));
                }
                if rec.key_len == key.len()
                    && self
                        .arena_eq(arena, off + REC_HEADER as u64, key)
                        .ok_or(Fail::Kv("record out of bounds"))?
                {
                    return Ok(Probe::Found { slot: i, rec, off });
                }
            }
            i = (i + 1) & mask;
        }
        Ok(Probe::NoRoom)
    }

    fn kv_get(&self, key: &[u8], hash: u64, out: &mut Vec<u8>) -> Result<Option<u32>, Fail> {
        let top = self.kv_top()?;
        match self.kv_find(key, hash, top)? {
            Probe::Found { rec, off, .. } => {
                out.clear();
                out.resize(rec.val_len, 0);
                let at = off + (REC_HEADER + rec.key_len) as u64;
                self.read(self.shm.layout.kv_arena, at, out)
                    .ok_or(Fail::Kv("value out of bounds"))?;
                Ok(Some(rec.cas))
            }
            _ => Ok(None),
        }
    }

    fn kv_set(&self, key: &[u8], value: &[u8], cas: u32, hash: u64, need: u64) -> Result<(), Fail> {
        let h = self.shm.header();
        let arena = self.shm.layout.kv_arena;
        let cap = arena.len as u64;
        let keys_full = || Error::Full {
            what: "shared data key table",
            capacity: self.shm.max_keys(),
            unit: "keys",
        };
        let arena_full = || Error::Full {
            what: "shared data arena",
            capacity: cap,
            unit: "bytes",
        };
        let mut top = self.kv_top()?;
        let (slot, old_size) = match self.kv_find(key, hash, top)? {
            Probe::Found { slot, rec, .. } => {
                if cas != 0 && cas != rec.cas {
                    return Err(Error::CasMismatch.into());
                }
                (slot, Some(rec.size))
            }
            Probe::Vacant { slot } => {
                if h.kv_used.load(Ordering::Relaxed) >= self.shm.max_keys() {
                    return Err(keys_full().into());
                }
                (slot, None)
            }
            Probe::NoRoom => return Err(keys_full().into()),
        };
        if top.saturating_add(need) > cap {
            // The old record stays live until the new one is published, so it counts.
            if h.kv_live.load(Ordering::Relaxed).saturating_add(need) > cap {
                return Err(arena_full().into());
            }
            self.kv_compact()?;
            top = self.kv_top()?;
            if top.saturating_add(need) > cap {
                return Err(arena_full().into());
            }
        }
        let new_cas = self.next_cas();
        let mut hdr = [0u8; REC_HEADER];
        put32(&mut hdr, 0, KV_MAGIC);
        put32(&mut hdr, 4, key.len() as u32);
        put32(&mut hdr, 8, value.len() as u32);
        put32(&mut hdr, 12, new_cas);
        put32(&mut hdr, 16, slot as u32);
        // 1. the whole record, above the top (unused space: a death here loses nothing)
        self.write(arena, top, &hdr)
            .ok_or(Fail::Kv("record out of bounds"))?;
        self.write(arena, top + REC_HEADER as u64, key)
            .ok_or(Fail::Kv("record out of bounds"))?;
        self.write(arena, top + (REC_HEADER + key.len()) as u64, value)
            .ok_or(Fail::Kv("record out of bounds"))?;
        // 2. the top (a death here leaks a record until the next compaction)
        h.kv_top.store(top + need, Ordering::Relaxed);
        // 3. one store publishes it
        let s = self
            .shm
            .kv_table()
            .get(slot)
            .ok_or(Fail::Kv("probe out of the table"))?;
        s.store(pack(tag_of(hash), top), Ordering::Relaxed);
        let live = h.kv_live.load(Ordering::Relaxed).saturating_add(need);
        match old_size {
            Some(old) => h.kv_live.store(live.saturating_sub(old), Ordering::Relaxed),
            None => {
                h.kv_live.store(live, Ordering::Relaxed);
                h.kv_used.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn next_cas(&self) -> u32 {
        let h = self.shm.header();
        let next = match (h.cas.load(Ordering::Relaxed) as u32).wrapping_add(1) {
            0 => 1,
            n => n,
        };
        h.cas.store(u64::from(next), Ordering::Relaxed);
        next
    }

    /// Slides live records down to the start of the arena, in order, updating their key slots.
    /// A record is live when the slot it names points back at it.
    fn kv_compact(&self) -> Result<(), Fail> {
        let h = self.shm.header();
        let arena = self.shm.layout.kv_arena;
        let table = self.shm.kv_table();
        let top = self.kv_top()?;
        h.kv_compacting.store(1, Ordering::Relaxed);
        let (mut pos, mut dst) = (0u64, 0u64);
        while pos < top {
            let rec = self
                .kv_rec(pos, top)
                .ok_or(Fail::Kv("unreadable record while compacting"))?;
            if let Some(s) = table.get(rec.slot) {
                let v = s.load(Ordering::Relaxed);
                if let Some((tag, off)) = unpack(v) {
                    if off == pos {
                        if dst != pos {
                            self.move_within(arena, pos, dst, rec.size as usize)
                                .ok_or(Fail::Kv("record out of bounds"))?;
                            s.store(pack(tag, dst), Ordering::Relaxed);
                        }
                        dst += rec.size;
                    }
                }
            }
            pos += rec.size;
        }
        h.kv_top.store(dst, Ordering::Relaxed);
        h.kv_live.store(dst, Ordering::Relaxed);
        h.kv_compacting.store(0, Ordering::Relaxed);
        Ok(())
    }

    fn kv_reset(&self, why: &str) {
        tracing::error!(
            reason = why,
            "plugin shared data was inconsistent; resetting it to empty (every key is lost)"
        );
        for s in self.shm.kv_table() {
            s.store(0, Ordering::Relaxed);
        }
        let h = self.shm.header();
        h.kv_top.store(0, Ordering::Relaxed);
        h.kv_live.store(0, Ordering::Relaxed);
        h.kv_used.store(0, Ordering::Relaxed);
        h.kv_compacting.store(0, Ordering::Relaxed);
    }

    /// Full check of the shared data after a crash; recomputes the hints.
    fn kv_verify(&self) -> Result<(), &'static str> {
        let h = self.shm.header();
        let arena = self.shm.layout.kv_arena;
        let table = self.shm.kv_table();
        let mask = table.len().saturating_sub(1);
        let top = self
            .kv_top()
            .map_err(|_| "interrupted compaction or bad top")?;
        let mut pos = 0;
        while pos < top {
            pos += self.kv_rec(pos, top).ok_or("unreadable record")?.size;
        }
        let (mut used, mut live) = (0u64, 0u64);
        for (i, s) in table.iter().enumerate() {
            let v = s.load(Ordering::Relaxed);
            if v == 0 {
                continue;
            }
            let (tag, off) = unpack(v).ok_or("malformed key slot")?;
            let rec = self
                .kv_rec(off, top)
                .ok_or("key slot points to a bad record")?;
            if rec.slot != i {
                return Err("record does not name its key slot");
            }
            let hash = self
                .arena_hash(arena, off + REC_HEADER as u64, rec.key_len)
                .ok_or("key out of bounds")?;
            if tag_of(hash) != tag {
                return Err("key does not match its slot's tag");
            }
            // Linear probing without deletion: every slot from the home slot to this one is
            // occupied, or lookups could not reach it.
            let mut j = (hash as usize) & mask;
            while j != i {
                if table.get(j).map_or(0, |s| s.load(Ordering::Relaxed)) == 0 {
                    return Err("key slot unreachable from its home slot");
                }
                j = (j + 1) & mask;
            }
            used += 1;
            live += rec.size;
        }
        h.kv_used.store(used, Ordering::Relaxed);
        h.kv_live.store(live, Ordering::Relaxed);
        Ok(())
    }

    // --- queues ---

    fn q_top(&self) -> Result<u64, Fail> {
        let h = self.shm.header();
        let top = h.q_top.load(Ordering::Relaxed);
        if top > self.shm.layout.q_arena.len as u64 || top & 7 != 0 {
            return Err(Fail::Queues("arena top out of bounds"));
        }
        if h.q_compacting.load(Ordering::Relaxed) != 0 {
            return Err(Fail::Queues("interrupted compaction"));
        }
        Ok(top)
    }

    fn q_rec(&self, off: u64, top: u64) -> Option<QRec> {
        if off & 7 != 0 || off >= top {
            return None;
        }
        let mut b = [0u8; REC_HEADER];
        self.read(self.shm.layout.q_arena, off, &mut b)?;
        if le32(&b, 0) != Q_MAGIC {
            return None;
        }
        let len = le32(&b, 4) as usize;
        if len > MAX_QUEUE_ITEM_LEN {
            return None;
        }
        let size = record_size(len);
        if off.checked_add(size)? > top {
            return None;
        }
        Some(QRec {
            len,
            queue: le32(&b, 8) as usize,
            mark: le32(&b, 12),
            next: le64(&b, 16),
            size,
        })
    }

    fn q_set_next(&self, off: u64, next: u64) -> Option<()> {
        self.write(self.shm.layout.q_arena, off + 16, &next.to_le_bytes())
    }

    fn q_enqueue(&self, token: u32, data: &[u8], need: u64) -> Result<u64, Fail> {
        let h = self.shm.header();
        let arena = self.shm.layout.q_arena;
        let cap = arena.len as u64;
        let (i, q) = self.shm.queue_slot(token)?;
        let arena_full = || Error::Full {
            what: "shared queue arena",
            capacity: cap,
            unit: "bytes",
        };
        let mut top = self.q_top()?;
        let live = h.q_live.load(Ordering::Relaxed);
        // Full even after a compaction: the queue's own oldest items make room for its newest,
        // other queues' are theirs. Decided before anything goes: when even all of its own
        // would not make room, nothing is dropped and the item is refused.
        let mut slack = 0;
        if top.saturating_add(need) > cap && live.saturating_add(need) > cap {
            let own = self
                .q_walk(i, top, None)
                .map_err(|why| Fail::Queue(i, why))?;
            if (live - own.bytes.min(live)).saturating_add(need) > cap {
                return Err(arena_full().into());
            }
            // A sixteenth of its items more than the new one needs: a queue whose consumer
            // stopped then compacts the arena once every so many items, not on each.
            slack = own.bytes / 16;
        }
        let mut dropped = 0;
        while q.count.load(Ordering::Relaxed) >= MAX_QUEUE_ITEMS {
            if self.q_unlink_head(i, q)?.is_none() {
                return Err(Fail::Queue(i, "counted items it does not have"));
            }
            dropped += 1;
        }
        if top.saturating_add(need) > cap {
            // (`slack` is 0 unless the arena is full, and the loop then ends at once.)
            while h
                .q_live
                .load(Ordering::Relaxed)
                .saturating_add(need + slack)
                > cap
            {
                if self.q_unlink_head(i, q)?.is_none() {
                    break;
                }
                dropped += 1;
            }
            self.q_compact()?;
            top = self.q_top()?;
            if top.saturating_add(need) > cap {
                return Err(arena_full().into());
            }
        }
        let mut hdr = [0u8; REC_HEADER];
        put32(&mut hdr, 0, Q_MAGIC);
        put32(&mut hdr, 4, data.len() as u32);
        put32(&mut hdr, 8, i as u32);
        put64(&mut hdr, 16, NIL);
        // The whole record above the top first, then the top, then the links.
        self.write(arena, top, &hdr)
            .ok_or(Fail::Queues("record out of bounds"))?;
        self.write(arena, top + REC_HEADER as u64, data)
            .ok_or(Fail::Queues("record out of bounds"))?;
        h.q_top.store(top + need, Ordering::Relaxed);
        let new_top = top + need;
        if q.head.load(Ordering::Relaxed) == NIL {
            q.head.store(top, Ordering::Relaxed);
        } else {
            let tail = q.tail.load(Ordering::Relaxed);
            match self.q_rec(tail, new_top) {
                Some(r) if r.queue == i && r.next == NIL && tail < top => {}
                _ => return Err(Fail::Queue(i, "tail is not the last item")),
            }
            self.q_set_next(tail, top)
                .ok_or(Fail::Queue(i, "tail out of bounds"))?;
        }
        q.tail.store(top, Ordering::Relaxed);
        // Re-read: a compaction above may have recounted the chain.
        let count = q.count.load(Ordering::Relaxed);
        q.count.store(count.saturating_add(1), Ordering::Relaxed);
        h.q_live.fetch_add(need, Ordering::Relaxed);
        q.seq.fetch_add(1, Ordering::Release);
        Ok(dropped)
    }

    fn q_dequeue(&self, token: u32) -> Result<Option<Vec<u8>>, Fail> {
        let (i, q) = self.shm.queue_slot(token)?;
        let Some((head, rec)) = self.q_unlink_head(i, q)? else {
            return Ok(None);
        };
        // Still in the arena: only a compaction, under this same lock, moves records.
        let mut v = vec![0u8; rec.len];
        self.read(self.shm.layout.q_arena, head + REC_HEADER as u64, &mut v)
            .ok_or(Fail::Queue(i, "item out of bounds"))?;
        Ok(Some(v))
    }

    /// Takes queue `i`'s oldest item out of its chain: where it is and its record (None: the
    /// queue is empty).
    fn q_unlink_head(&self, i: usize, q: &QueueSlot) -> Result<Option<(u64, QRec)>, Fail> {
        let h = self.shm.header();
        let head = q.head.load(Ordering::Relaxed);
        if head == NIL {
            return Ok(None);
        }
        let top = self.q_top()?;
        let rec = match self.q_rec(head, top) {
            Some(r) if r.queue == i && (r.next == NIL || (r.next > head && r.next < top)) => r,
            _ => return Err(Fail::Queue(i, "head is not a valid item")),
        };
        // The store of `head` is the dequeue; tail and count follow (repaired after a crash).
        q.head.store(rec.next, Ordering::Relaxed);
        if rec.next == NIL {
            q.tail.store(NIL, Ordering::Relaxed);
        }
        q.count.store(
            q.count.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        h.q_live.store(
            h.q_live.load(Ordering::Relaxed).saturating_sub(rec.size),
            Ordering::Relaxed,
        );
        Ok(Some((head, rec)))
    }

    /// Walks queue `i`'s chain from `head`, checking every link (in bounds, strictly increasing,
    /// well-formed, owned by `i`, at most MAX_QUEUE_ITEMS), and stamps `mark` on each record.
    fn q_walk(&self, i: usize, top: u64, mark: Option<u32>) -> Result<Walk, &'static str> {
        let q = self.shm.queue_table().get(i).ok_or("no such queue")?;
        let mut off = q.head.load(Ordering::Relaxed);
        let mut w = Walk {
            count: 0,
            last: NIL,
            bytes: 0,
        };
        while off != NIL {
            if w.count >= MAX_QUEUE_ITEMS {
                return Err("chain longer than the queue's capacity");
            }
            if w.last != NIL && off <= w.last {
                return Err("chain goes backwards");
            }
            let rec = self.q_rec(off, top).ok_or("chain points to a bad record")?;
            if rec.queue != i {
                return Err("chain reaches another queue's item");
            }
            if let Some(m) = mark {
                self.write(self.shm.layout.q_arena, off + 12, &m.to_le_bytes())
                    .ok_or("record out of bounds")?;
            }
            w.count += 1;
            w.bytes += rec.size;
            w.last = off;
            off = rec.next;
        }
        Ok(w)
    }

    /// Marks every item reachable from a queue head, then slides marked records down in order,
    /// relinking each queue as its records move (a queue's chain is in arena order).
    fn q_compact(&self) -> Result<(), Fail> {
        let h = self.shm.header();
        let arena = self.shm.layout.q_arena;
        let queues = self.shm.queue_table();
        let top = self.q_top()?;
        let epoch = match (h.q_epoch.load(Ordering::Relaxed) as u32).wrapping_add(1) {
            0 => 1,
            e => e,
        };
        h.q_epoch.store(u64::from(epoch), Ordering::Relaxed);
        h.q_compacting.store(1, Ordering::Relaxed);
        for (i, q) in queues.iter().enumerate() {
            if q.state.load(Ordering::Relaxed) != SLOT_USED {
                continue;
            }
            q.compact_prev.store(NIL, Ordering::Relaxed);
            // Check the whole chain before marking any of it, so that a bad queue is dropped
            // entirely rather than half-kept.
            match self.q_walk(i, top, None) {
                Ok(w) => {
                    self.q_walk(i, top, Some(epoch)).map_err(Fail::Queues)?;
                    q.count.store(w.count, Ordering::Relaxed);
                }
                Err(why) => self.q_clear(i, why),
            }
        }
        let (mut pos, mut dst) = (0u64, 0u64);
        while pos < top {
            let rec = self
                .q_rec(pos, top)
                .ok_or(Fail::Queues("unreadable record while compacting"))?;
            let owner = queues
                .get(rec.queue)
                .filter(|q| q.state.load(Ordering::Relaxed) == SLOT_USED);
            if let (true, Some(q)) = (rec.mark == epoch, owner) {
                if dst != pos {
                    self.move_within(arena, pos, dst, rec.size as usize)
                        .ok_or(Fail::Queues("record out of bounds"))?;
                }
                let prev = q.compact_prev.load(Ordering::Relaxed);
                if prev == NIL {
                    q.head.store(dst, Ordering::Relaxed);
                } else {
                    self.q_set_next(prev, dst)
                        .ok_or(Fail::Queues("record out of bounds"))?;
                }
                q.compact_prev.store(dst, Ordering::Relaxed);
                dst += rec.size;
            }
            pos += rec.size;
        }
        for q in queues {
            if q.state.load(Ordering::Relaxed) != SLOT_USED {
                continue;
            }
            let last = q.compact_prev.load(Ordering::Relaxed);
            if last == NIL {
                q.head.store(NIL, Ordering::Relaxed);
                q.count.store(0, Ordering::Relaxed);
            } else {
                self.q_set_next(last, NIL)
                    .ok_or(Fail::Queues("record out of bounds"))?;
            }
            q.tail.store(last, Ordering::Relaxed);
            q.compact_prev.store(NIL, Ordering::Relaxed);
        }
        h.q_top.store(dst, Ordering::Relaxed);
        h.q_live.store(dst, Ordering::Relaxed);
        h.q_compacting.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Empties queue `i` (keeping its registration and seq).
    fn q_clear(&self, i: usize, why: &str) {
        tracing::error!(
            queue = i + 1,
            reason = why,
            "plugin shared queue was inconsistent; emptying it"
        );
        if let Some(q) = self.shm.queue_table().get(i) {
            q.head.store(NIL, Ordering::Relaxed);
            q.tail.store(NIL, Ordering::Relaxed);
            q.count.store(0, Ordering::Relaxed);
            q.compact_prev.store(NIL, Ordering::Relaxed);
        }
    }

    /// Recomputes the live-bytes hint from the chains, emptying any queue whose chain is bad.
    fn q_recount(&self) {
        let h = self.shm.header();
        let Ok(top) = self.q_top() else {
            self.q_reset_all("arena top out of bounds");
            return;
        };
        let mut live = 0;
        for (i, q) in self.shm.queue_table().iter().enumerate() {
            if q.state.load(Ordering::Relaxed) != SLOT_USED {
                continue;
            }
            match self.q_walk(i, top, None) {
                Ok(w) => {
                    if w.count != q.count.load(Ordering::Relaxed)
                        || w.last != q.tail.load(Ordering::Relaxed)
                    {
                        tracing::warn!(queue = i + 1, "repaired a shared queue's tail and count");
                    }
                    q.count.store(w.count, Ordering::Relaxed);
                    q.tail.store(w.last, Ordering::Relaxed);
                    live += w.bytes;
                }
                Err(why) => self.q_clear(i, why),
            }
        }
        h.q_live.store(live, Ordering::Relaxed);
    }

    /// Empties every queue (registrations stay).
    fn q_reset_all(&self, why: &str) {
        tracing::error!(
            reason = why,
            "plugin shared queues were inconsistent; emptying all of them"
        );
        for q in self.shm.queue_table() {
            q.head.store(NIL, Ordering::Relaxed);
            q.tail.store(NIL, Ordering::Relaxed);
            q.count.store(0, Ordering::Relaxed);
            q.compact_prev.store(NIL, Ordering::Relaxed);
        }
        let h = self.shm.header();
        h.q_top.store(0, Ordering::Relaxed);
        h.q_live.store(0, Ordering::Relaxed);
        h.q_compacting.store(0, Ordering::Relaxed);
    }

    fn q_verify(&self) {
        let top = match self.q_top() {
            Ok(t) => t,
            Err(_) => {
                self.q_reset_all("interrupted compaction or bad top");
                return;
            }
        };
        let mut pos = 0;
        while pos < top {
            match self.q_rec(pos, top) {
                Some(r) => pos += r.size,
                None => {
                    self.q_reset_all("unreadable record");
                    return;
                }
            }
        }
        for (i, q) in self.shm.queue_table().iter().enumerate() {
            let state = q.state.load(Ordering::Relaxed);
            let names = (q.vm_len.load(Ordering::Relaxed) as usize)
                .saturating_add(q.name_len.load(Ordering::Relaxed) as usize);
            if state == SLOT_USED && names > MAX_QUEUE_NAME_LEN {
                tracing::error!(queue = i + 1, "shared queue descriptor corrupt; freeing it");
                q.state.store(SLOT_FREE, Ordering::Release);
            } else if state != SLOT_USED && state != SLOT_FREE {
                q.state.store(SLOT_FREE, Ordering::Release);
            }
        }
        self.q_recount();
    }

    // --- metrics ---

    fn m_verify(&self) {
        for (i, m) in self.shm.metric_table().iter().enumerate() {
            let state = m.state.load(Ordering::Relaxed);
            if state == SLOT_FREE {
                continue;
            }
            let ok = state == SLOT_USED
                && MetricKind::from_u32(m.kind.load(Ordering::Relaxed)).is_some()
                && m.name_len.load(Ordering::Relaxed) as usize <= MAX_METRIC_NAME_LEN;
            if !ok {
                tracing::error!(metric = i + 1, "metric slot corrupt; freeing it");
                m.state.store(SLOT_FREE, Ordering::Release);
            }
        }
    }

    /// After `EOWNERDEAD`: check every part, resetting what is inconsistent.
    fn recover(&self) {
        if let Err(why) = self.kv_verify() {
            self.kv_reset(why);
        }
        self.q_verify();
        self.m_verify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult, Pid};
    use std::io::{Read, Write};
    use std::panic::AssertUnwindSafe;

    fn reopen(shm: &PluginShm) -> PluginShm {
        PluginShm::open(nix::unistd::dup(shm.fd()).unwrap()).unwrap()
    }

    /// Runs `f` in a forked child that leaves with `_exit` (0 when `f` returns true).
    fn spawn(f: impl FnOnce() -> bool) -> Pid {
        // SAFETY: the child only runs `f` (which touches the shared mapping and the allocator,
        // which glibc keeps usable after fork) and leaves with `_exit`, running no destructor or
        // atexit handler of the parent's state.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let ok = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(false);
                // SAFETY: _exit is async-signal-safe and ends the child immediately.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            ForkResult::Parent { child } => child,
        }
    }

    fn wait_ok(pid: Pid) {
        assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 0));
    }

    /// A child that takes the lock, lets `before_sleep` scribble, signals the parent and sleeps
    /// until killed with SIGKILL; returns once it is dead.
    fn die_holding_lock(shm: &PluginShm, before_sleep: impl FnOnce(&Locked<'_>)) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let pid = spawn(|| {
            let g = shm.lock().unwrap();
            before_sleep(&g);
            let _ = File::from(w).write_all(b"x");
            loop {
                // SAFETY: pause just sleeps until a signal arrives.
                unsafe { libc::pause() };
            }
        });
        let mut r = File::from(r);
        let mut b = [0u8; 1];
        r.read_exact(&mut b).unwrap();
        kill(pid, Signal::SIGKILL).unwrap();
        assert!(matches!(
            waitpid(pid, None).unwrap(),
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
    }

    #[test]
    fn layout_split() {
        let l = PluginShm::create(MIN_SEGMENT_SIZE).unwrap().layout;
        assert_eq!(
            (
                l.kv_slots,
                l.kv_arena.len,
                l.q_slots,
                l.q_arena.len,
                l.m_slots
            ),
            (512, 32 << 10, 9, 15_552, 11)
        );
        for size in [MIN_SEGMENT_SIZE, 1 << 20, 64 << 20, (3 << 30) + 12_345] {
            let l = Layout::for_size(size.next_multiple_of(4096));
            assert_eq!(l.validate(size.next_multiple_of(4096)), Ok(()), "{size}");
        }
        let big = Layout::for_size(MAX_SEGMENT_SIZE);
        assert_eq!(big.validate(MAX_SEGMENT_SIZE), Ok(()));
        assert_eq!(
            (big.kv_slots, big.q_slots, big.m_slots),
            (MAX_KV_SLOTS, MAX_QUEUES, MAX_METRICS)
        );
    }

    #[test]
    fn set_get_and_cas() {
        let shm = PluginShm::create(1 << 20).unwrap();
        assert!(shm.get(b"a").unwrap().is_none());
        shm.set(b"a", b"one", 0).unwrap();
        let (v, cas) = shm.get(b"a").unwrap().unwrap();
        assert_eq!(v, b"one");
        assert_ne!(cas, 0);
        assert!(matches!(
            shm.set(b"a", b"x", cas.wrapping_add(1)),
            Err(Error::CasMismatch)
        ));
        shm.set(b"a", b"two", cas).unwrap();
        let (v, cas2) = shm.get(b"a").unwrap().unwrap();
        assert_eq!(v, b"two");
        assert_ne!(cas2, cas);
        // The old CAS is stale now.
        assert!(matches!(shm.set(b"a", b"x", cas), Err(Error::CasMismatch)));
        // Unconditional write.
        shm.set(b"a", b"three", 0).unwrap();
        assert_eq!(shm.get(b"a").unwrap().unwrap().0, b"three");
        // A missing key is created whatever the CAS (as in proxy-wasm-cpp-host).
        shm.set(b"new", b"v", 12345).unwrap();
        assert_eq!(shm.get(b"new").unwrap().unwrap().0, b"v");
        // Empty key and empty value are fine.
        shm.set(b"", b"", 0).unwrap();
        assert_eq!(shm.get(b"").unwrap().unwrap().0, b"");
        // Another mapping (as a worker) sees the same data.
        let other = reopen(&shm);
        assert_eq!(other.get(b"a").unwrap().unwrap().0, b"three");
        other.set(b"b", b"from other", 0).unwrap();
        assert_eq!(shm.get(b"b").unwrap().unwrap().0, b"from other");
    }

    #[test]
    fn cas_wraps_skipping_zero() {
        let shm = PluginShm::create(1 << 20).unwrap();
        shm.header()
            .cas
            .store(u64::from(u32::MAX - 1), Ordering::Relaxed);
        shm.set(b"k", b"1", 0).unwrap();
        assert_eq!(shm.get(b"k").unwrap().unwrap().1, u32::MAX);
        shm.set(b"k", b"2", u32::MAX).unwrap();
        assert_eq!(shm.get(b"k").unwrap().unwrap().1, 1);
    }

    #[test]
    fn limits_are_enforced() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let big_key = vec![b'k'; MAX_KEY_LEN + 1];
        assert!(matches!(
            shm.set(&big_key, b"v", 0),
            Err(Error::TooLarge { .. })
        ));
        assert!(shm.get(&big_key).unwrap().is_none());
        let big = vec![0u8; MAX_VALUE_LEN + 1];
        assert!(matches!(
            shm.set(b"k", &big, 0),
            Err(Error::TooLarge { .. })
        ));
        // Within the fixed limit but larger than this small arena.
        let v = vec![0u8; 100_000];
        assert!(matches!(shm.set(b"k", &v, 0), Err(Error::TooLarge { .. })));
        assert!(matches!(
            PluginShm::create(1024),
            Err(Error::BadArgument(_))
        ));
    }

    #[test]
    fn full_store_stays_readable() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let mut n = 0;
        let err = loop {
            let v = vec![n as u8; 1000];
            match shm.set(format!("key{n}").as_bytes(), &v, 0) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(n > 10, "only {n} entries fit");
        assert!(
            matches!(
                err,
                Error::Full {
                    what: "shared data arena",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("shared data arena is full (capacity"));
        for i in 0..n {
            let (v, _) = shm.get(format!("key{i}").as_bytes()).unwrap().unwrap();
            assert_eq!(v, vec![i as u8; 1000]);
        }
        // Small writes to new keys still fail or succeed cleanly, never corrupt.
        let _ = shm.set(b"tiny", b"t", 0);
        for i in 0..n {
            assert_eq!(
                shm.get(format!("key{i}").as_bytes()).unwrap().unwrap().0,
                vec![i as u8; 1000]
            );
        }
    }

    #[test]
    fn key_table_full() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let max = shm.max_keys();
        for i in 0..max {
            shm.set(&i.to_le_bytes(), b"", 0).unwrap();
        }
        let err = shm.set(b"one more", b"", 0).unwrap_err();
        assert!(
            matches!(err, Error::Full { what: "shared data key table", capacity, .. } if capacity == max),
            "{err}"
        );
        // Updating existing keys still works.
        shm.set(&0u64.to_le_bytes(), b"x", 0).unwrap();
        assert_eq!(shm.get(&0u64.to_le_bytes()).unwrap().unwrap().0, b"x");
    }

    #[test]
    fn compaction_after_many_overwrites() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let cap = shm.layout.kv_arena.len as u64;
        for round in 0..2000u32 {
            let k = round % 7;
            let v = vec![(round % 251) as u8; 500 + (round as usize % 300)];
            shm.set(format!("k{k}").as_bytes(), &v, 0).unwrap();
        }
        for k in 0..7u32 {
            let last = (0..2000u32).rev().find(|r| r % 7 == k).unwrap();
            let (v, _) = shm.get(format!("k{k}").as_bytes()).unwrap().unwrap();
            assert_eq!(v, vec![(last % 251) as u8; 500 + (last as usize % 300)]);
        }
        let h = shm.header();
        assert!(h.kv_top.load(Ordering::Relaxed) <= cap);
        assert!(h.kv_live.load(Ordering::Relaxed) < 7 * 900);
        // The hints match a full recount.
        let (top, live, used) = (
            h.kv_top.load(Ordering::Relaxed),
            h.kv_live.load(Ordering::Relaxed),
            h.kv_used.load(Ordering::Relaxed),
        );
        shm.lock().unwrap().kv_verify().unwrap();
        assert_eq!(h.kv_live.load(Ordering::Relaxed), live);
        assert_eq!(h.kv_used.load(Ordering::Relaxed), used);
        assert!(top >= live);
    }

    #[test]
    fn queue_fifo_register_resolve() {
        let shm = PluginShm::create(1 << 20).unwrap();
        assert_eq!(shm.resolve_queue("vm", "q"), None);
        let t = shm.register_queue("vm", "q").unwrap();
        assert_ne!(t, 0);
        assert_eq!(shm.register_queue("vm", "q").unwrap(), t);
        let other = reopen(&shm);
        assert_eq!(other.register_queue("vm", "q").unwrap(), t);
        assert_eq!(other.resolve_queue("vm", "q"), Some(t));
        let t2 = shm.register_queue("vm2", "q").unwrap();
        assert_ne!(t2, t);
        // vm_id and name boundaries matter.
        let t3 = shm.register_queue("vm2q", "").unwrap();
        assert_ne!(t3, t2);
        assert_eq!(
            shm.queues(),
            vec![
                (t, "vm".into(), "q".into()),
                (t2, "vm2".into(), "q".into()),
                (t3, "vm2q".into(), "".into())
            ]
        );

        assert_eq!(shm.queue_seq(t), Some(0));
        assert_eq!(shm.dequeue(t).unwrap(), None);
        for i in 0..100u32 {
            shm.enqueue(t, &i.to_le_bytes()).unwrap();
        }
        other.enqueue(t2, b"other queue").unwrap();
        assert_eq!(shm.queue_seq(t), Some(100));
        assert_eq!(shm.queue_len(t), Some(100));
        for i in 0..100u32 {
            assert_eq!(other.dequeue(t).unwrap().unwrap(), i.to_le_bytes());
        }
        assert_eq!(shm.dequeue(t).unwrap(), None);
        assert_eq!(shm.dequeue(t2).unwrap().unwrap(), b"other queue");
        assert_eq!(shm.queue_seq(t), Some(100));

        assert!(matches!(shm.enqueue(999, b"x"), Err(Error::NotFound)));
        assert!(matches!(shm.enqueue(0, b"x"), Err(Error::NotFound)));
        assert!(matches!(shm.dequeue(999), Err(Error::NotFound)));
        assert_eq!(shm.queue_seq(999), None);
        let long = "n".repeat(MAX_QUEUE_NAME_LEN);
        assert!(matches!(
            shm.register_queue("vm", &long),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn queue_item_cap() {
        let shm = PluginShm::create(4 << 20).unwrap();
        let t = shm.register_queue("vm", "q").unwrap();
        for i in 0..MAX_QUEUE_ITEMS {
            assert_eq!(shm.enqueue(t, &i.to_le_bytes()).unwrap(), 0);
        }
        // Full: the oldest goes to make room for the newest.
        assert_eq!(shm.enqueue(t, b"x").unwrap(), 1);
        assert_eq!(shm.queue_len(t), Some(MAX_QUEUE_ITEMS));
        for i in 1..MAX_QUEUE_ITEMS {
            assert_eq!(shm.dequeue(t).unwrap().unwrap(), i.to_le_bytes());
        }
        assert_eq!(shm.dequeue(t).unwrap().unwrap(), b"x");
        assert_eq!(shm.dequeue(t).unwrap(), None);
    }

    #[test]
    fn queue_arena_full_then_compacts() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let qs = [
            shm.register_queue("vm", "a").unwrap(),
            shm.register_queue("vm", "b").unwrap(),
        ];
        let mut model = [
            std::collections::VecDeque::new(),
            std::collections::VecDeque::new(),
        ];
        let mut n = 0u32;
        // Until the arena is full: the next item of a queue takes its oldest's room.
        loop {
            let q = (n % 2) as usize;
            let dropped = shm.enqueue(qs[q], &[n as u8; 1000]).unwrap();
            for _ in 0..dropped {
                model[q].pop_front();
            }
            model[q].push_back(n);
            n += 1;
            if dropped > 0 {
                // Its oldest, and a sixteenth of its items' room more (here one at most).
                assert!(dropped <= 2, "{dropped} dropped");
                break;
            }
        }
        assert!(n > 4, "only {n} items fit");
        // A queue with nothing of its own to give up is refused.
        let empty = shm.register_queue("vm", "c").unwrap();
        let half = vec![0; shm.queue_arena_capacity() as usize / 2];
        let err = shm.enqueue(empty, &half).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Full {
                    what: "shared queue arena",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("shared queue arena is full (capacity "));
        // Churn: each round frees one item of one queue and adds one to the other, so the
        // arena stays nearly full and every enqueue has to compact first. FIFO must hold.
        for round in 0..300u32 {
            let (from, to) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
            let want = model[from].pop_front().unwrap();
            assert_eq!(
                shm.dequeue(qs[from]).unwrap().unwrap(),
                vec![want as u8; 1000],
                "round {round}"
            );
            assert_eq!(shm.enqueue(qs[to], &[n as u8; 1000]).unwrap(), 0);
            model[to].push_back(n);
            n += 1;
        }
        for q in 0..2 {
            while let Some(v) = model[q].pop_front() {
                assert_eq!(shm.dequeue(qs[q]).unwrap().unwrap(), vec![v as u8; 1000]);
            }
            assert_eq!(shm.dequeue(qs[q]).unwrap(), None);
        }
    }

    #[test]
    fn queue_churn_with_compaction() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let qs: Vec<u32> = (0..3)
            .map(|i| shm.register_queue("vm", &format!("q{i}")).unwrap())
            .collect();
        let mut model: Vec<std::collections::VecDeque<Vec<u8>>> = vec![Default::default(); 3];
        let mut x = 12345u64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let q = (x % 3) as usize;
            if x % 5 < 3 {
                let item = vec![step as u8; 100 + (x % 700) as usize];
                match shm.enqueue(qs[q], &item) {
                    Ok(dropped) => {
                        for _ in 0..dropped {
                            model[q].pop_front();
                        }
                        model[q].push_back(item)
                    }
                    Err(Error::Full { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            } else {
                assert_eq!(shm.dequeue(qs[q]).unwrap(), model[q].pop_front());
            }
        }
        for q in 0..3 {
            assert_eq!(shm.queue_len(qs[q]), Some(model[q].len() as u64));
            while let Some(item) = model[q].pop_front() {
                assert_eq!(shm.dequeue(qs[q]).unwrap().unwrap(), item);
            }
        }
    }

    #[test]
    fn metrics_define_increment_record() {
        let shm = PluginShm::create(1 << 20).unwrap();
        let c = shm.define_metric(MetricKind::Counter, "requests").unwrap();
        assert_eq!(
            shm.define_metric(MetricKind::Counter, "requests").unwrap(),
            c
        );
        let other = reopen(&shm);
        assert_eq!(
            other
                .define_metric(MetricKind::Counter, "requests")
                .unwrap(),
            c
        );
        assert!(matches!(
            shm.define_metric(MetricKind::Gauge, "requests"),
            Err(Error::BadArgument(_))
        ));
        let g = shm.define_metric(MetricKind::Gauge, "inflight").unwrap();
        let h = shm.define_metric(MetricKind::Histogram, "latency").unwrap();
        assert!(c != g && g != h);

        shm.increment(c, 5).unwrap();
        other.increment(c, 2).unwrap();
        assert!(matches!(shm.increment(c, -1), Err(Error::BadArgument(_))));
        shm.record(c, 3).unwrap();
        assert_eq!(shm.get_metric(c).unwrap(), 10);

        shm.increment(g, 5).unwrap();
        shm.increment(g, -7).unwrap();
        assert_eq!(shm.get_metric(g).unwrap(), -2);
        shm.record(g, 42).unwrap();
        assert_eq!(other.get_metric(g).unwrap(), 42);

        assert!(matches!(shm.increment(h, 1), Err(Error::BadArgument(_))));
        for v in [0, 1, 3, 700, 5_000_000_000] {
            shm.record(h, v).unwrap();
        }
        assert_eq!(shm.get_metric(h).unwrap(), 5);
        let snap = shm.metrics();
        assert_eq!(snap.len(), 3);
        let hs = snap[2].histogram.as_ref().unwrap();
        assert_eq!(hs.count, 5);
        assert_eq!(hs.sum, 5_000_000_704);
        assert_eq!(hs.buckets[0], (1, 2));
        assert_eq!(hs.buckets[2], (5, 3));
        assert_eq!(hs.buckets[9], (1000, 4));
        assert_eq!(hs.buckets[27], (1_000_000_000, 4));

        assert!(matches!(shm.increment(0, 1), Err(Error::NotFound)));
        assert!(matches!(shm.get_metric(9999), Err(Error::NotFound)));
        assert!(matches!(
            shm.define_metric(MetricKind::Counter, ""),
            Err(Error::BadArgument(_))
        ));
    }

    #[test]
    fn metric_table_full() {
        let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
        let n = shm.layout.m_slots;
        for i in 0..n {
            shm.define_metric(MetricKind::Counter, &format!("m{i}"))
                .unwrap();
        }
        let err = shm.define_metric(MetricKind::Counter, "extra").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("metric table is full (capacity {n} metrics)")
        );
    }

    #[test]
    fn open_checks_the_segment() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let f = File::from(fd);
        f.set_len(1 << 20).unwrap();
        let err = PluginShm::open(f.into()).unwrap_err();
        assert!(err.to_string().contains("bad magic") || err.to_string().contains("magic"));

        let shm = PluginShm::create(1 << 20).unwrap();
        shm.header().version.store(99, Ordering::Relaxed);
        let err = PluginShm::open(nix::unistd::dup(shm.fd()).unwrap()).unwrap_err();
        assert!(err.to_string().contains("layout version 99"), "{err}");
        shm.header()
            .version
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        shm.header().q_slots.store(1 << 40, Ordering::Relaxed);
        let err = PluginShm::open(nix::unistd::dup(shm.fd()).unwrap()).unwrap_err();
        assert!(err.to_string().contains("inconsistent layout"), "{err}");
    }

    #[test]
    fn corrupt_slot_is_reset_not_served() {
        let shm = PluginShm::create(1 << 20).unwrap();
        shm.set(b"a", b"1", 0).unwrap();
        shm.set(b"b", b"2", 0).unwrap();
        // Point every occupied slot far past the top.
        for s in shm.kv_table() {
            let v = s.load(Ordering::Relaxed);
            if v != 0 {
                s.store(pack(v >> OFF_BITS, 1 << 30), Ordering::Relaxed);
            }
        }
        assert!(matches!(shm.get(b"a"), Err(Error::BadSegment(_))));
        assert_eq!(shm.get(b"a").unwrap(), None);
        shm.set(b"a", b"again", 0).unwrap();
        assert_eq!(shm.get(b"a").unwrap().unwrap().0, b"again");
    }

    /// Random scribbles over every table, arena and header counter (as a buggy or dying process
    /// might leave them) must never make an operation panic or read out of bounds; after a
    /// recovery pass the structures check clean.
    #[test]
    fn scribbled_segment_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..60 {
            let shm = PluginShm::create(MIN_SEGMENT_SIZE).unwrap();
            let l = shm.layout;
            for i in 0..20u32 {
                let _ = shm.set(format!("k{i}").as_bytes(), &[i as u8; 300], 0);
            }
            let t = shm.register_queue("vm", "q").unwrap();
            for i in 0..10u8 {
                let _ = shm.enqueue(t, &[i; 200]);
            }
            let m = shm.define_metric(MetricKind::Histogram, "h").unwrap();
            let regions = [
                Region {
                    off: 96,
                    len: LOCK_OFFSET - 96,
                },
                Region {
                    off: HEADER_SIZE,
                    len: l.kv_slots * 8,
                },
                l.kv_arena,
                Region {
                    off: l.q_table,
                    len: l.q_slots * size_of::<QueueSlot>(),
                },
                l.q_arena,
                Region {
                    off: l.m_table,
                    len: l.m_slots * size_of::<MetricSlot>(),
                },
            ];
            {
                let g = shm.lock().unwrap();
                for _ in 0..(1 + round % 8) {
                    let r = regions[(rnd() % regions.len() as u64) as usize];
                    let len = 1 + (rnd() % 16) as usize;
                    let off = rnd() % (r.len - len) as u64;
                    let mut junk = [0u8; 16];
                    for b in junk.iter_mut() {
                        // Mostly small numbers: they look like plausible offsets and lengths.
                        *b = if rnd() % 2 == 0 {
                            rnd() as u8
                        } else {
                            (rnd() % 4) as u8
                        };
                    }
                    g.write(r, off, &junk[..len]).unwrap();
                }
            }
            let exercise = |shm: &PluginShm| {
                for i in 0..25u32 {
                    let _ = shm.get(format!("k{i}").as_bytes());
                    let _ = shm.set(format!("k{i}").as_bytes(), &[1; 700], 0);
                }
                for tok in 0..=(l.q_slots as u32 + 1) {
                    let _ = shm.enqueue(tok, &[7; 900]);
                    let _ = shm.dequeue(tok);
                    let _ = shm.queue_seq(tok);
                }
                for id in 0..=(l.m_slots as u32 + 1) {
                    let _ = shm.increment(id, 1);
                    let _ = shm.record(id, 5);
                    let _ = shm.get_metric(id);
                }
                let _ = shm.queues();
                let _ = shm.resolve_queue("vm", "q");
                let _ = shm.metrics();
                let _ = shm.register_queue("vm", "q2");
                let _ = shm.define_metric(MetricKind::Gauge, "g");
            };
            exercise(&shm);
            {
                let g = shm.lock().unwrap();
                g.recover();
                assert_eq!(g.kv_verify(), Ok(()), "round {round}");
            }
            exercise(&shm);
            let _ = m;
        }
    }

    /// N processes each do 500 CAS increments of one key and 500 metric increments.
    #[test]
    fn cross_process_cas_counter() {
        let shm = PluginShm::create(4 << 20).unwrap();
        shm.set(b"counter", b"0", 0).unwrap();
        let m = shm.define_metric(MetricKind::Counter, "hits").unwrap();
        let children: Vec<Pid> = (0..4)
            .map(|_| {
                spawn(|| {
                    for _ in 0..500 {
                        loop {
                            let Ok(Some((v, cas))) = shm.get(b"counter") else {
                                return false;
                            };
                            let Some(n) = std::str::from_utf8(&v)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                            else {
                                return false;
                            };
                            match shm.set(b"counter", (n + 1).to_string().as_bytes(), cas) {
                                Ok(()) => break,
                                Err(Error::CasMismatch) => continue,
                                Err(_) => return false,
                            }
                        }
                        if shm.increment(m, 1).is_err() {
                            return false;
                        }
                    }
                    true
                })
            })
            .collect();
        for c in children {
            wait_ok(c);
        }
        assert_eq!(shm.get(b"counter").unwrap().unwrap().0, b"2000");
        assert_eq!(shm.get_metric(m).unwrap(), 2000);
        assert_eq!(shm.recoveries(), 0);
    }

    #[test]
    fn cross_process_queue() {
        let shm = PluginShm::create(4 << 20).unwrap();
        let t = shm.register_queue("vm", "jobs").unwrap();
        let children: Vec<Pid> = (0..4u32)
            .map(|c| {
                let shm = &shm;
                spawn(move || {
                    let t2 = shm.register_queue("vm", "jobs").ok() == Some(t);
                    t2 && (0..500u32).all(|i| shm.enqueue(t, &(c * 1000 + i).to_le_bytes()).is_ok())
                })
            })
            .collect();
        for c in children {
            wait_ok(c);
        }
        assert_eq!(shm.queue_seq(t), Some(2000));
        let mut last = [None::<u32>; 4];
        let mut n = 0;
        while let Some(v) = shm.dequeue(t).unwrap() {
            let v = u32::from_le_bytes(v.try_into().unwrap());
            let c = (v / 1000) as usize;
            // Per producer, FIFO order holds.
            assert!(last[c] < Some(v));
            last[c] = Some(v);
            n += 1;
        }
        assert_eq!(n, 2000);
    }

    #[test]
    fn killed_lock_holder_does_not_deadlock() {
        let shm = PluginShm::create(1 << 20).unwrap();
        shm.set(b"k", b"v", 0).unwrap();
        let t = shm.register_queue("vm", "q").unwrap();
        shm.enqueue(t, b"item").unwrap();
        let m = shm.define_metric(MetricKind::Counter, "c").unwrap();
        die_holding_lock(&shm, |_| {});
        // The next operation takes the lock (EOWNERDEAD), finds everything consistent, keeps it.
        shm.set(b"k2", b"v2", 0).unwrap();
        assert_eq!(shm.recoveries(), 1);
        assert_eq!(shm.get(b"k").unwrap().unwrap().0, b"v");
        assert_eq!(shm.dequeue(t).unwrap().unwrap(), b"item");
        shm.increment(m, 1).unwrap();
        assert_eq!(shm.get_metric(m).unwrap(), 1);
        // And the lock still works normally afterwards.
        die_holding_lock(&shm, |_| {});
        assert_eq!(shm.get(b"k2").unwrap().unwrap().0, b"v2");
        assert_eq!(shm.recoveries(), 2);
    }

    #[test]
    fn death_mid_compaction_resets_shared_data_only() {
        let shm = PluginShm::create(1 << 20).unwrap();
        shm.set(b"k", b"v", 0).unwrap();
        let t = shm.register_queue("vm", "q").unwrap();
        shm.enqueue(t, b"item").unwrap();
        die_holding_lock(&shm, |g| {
            g.shm.header().kv_compacting.store(1, Ordering::Relaxed);
        });
        assert_eq!(shm.get(b"k").unwrap(), None);
        assert_eq!(shm.dequeue(t).unwrap().unwrap(), b"item");
        shm.set(b"k", b"again", 0).unwrap();
        assert_eq!(shm.get(b"k").unwrap().unwrap().0, b"again");
    }

    #[test]
    fn death_mid_enqueue_is_repaired_or_emptied() {
        let shm = PluginShm::create(1 << 20).unwrap();
        let a = shm.register_queue("vm", "a").unwrap();
        let b = shm.register_queue("vm", "b").unwrap();
        for i in 0..3u8 {
            shm.enqueue(a, &[i]).unwrap();
            shm.enqueue(b, &[i]).unwrap();
        }
        // a: linked the new tail but died before updating `tail` and `count`: repaired.
        // b: a garbage head: emptied.
        die_holding_lock(&shm, |g| {
            let top = g.q_top().ok().unwrap_or(0);
            let need = record_size(1);
            let (ia, qa) = g.shm.queue_slot(a).unwrap();
            let mut hdr = [0u8; REC_HEADER];
            put32(&mut hdr, 0, Q_MAGIC);
            put32(&mut hdr, 4, 1);
            put32(&mut hdr, 8, ia as u32);
            put64(&mut hdr, 16, NIL);
            let arena = g.shm.layout.q_arena;
            g.write(arena, top, &hdr);
            g.write(arena, top + REC_HEADER as u64, &[3]);
            g.shm.header().q_top.store(top + need, Ordering::Relaxed);
            g.q_set_next(qa.tail.load(Ordering::Relaxed), top);
            let (_, qb) = g.shm.queue_slot(b).unwrap();
            qb.head.store(1 << 40, Ordering::Relaxed);
        });
        for i in 0..4u8 {
            assert_eq!(shm.dequeue(a).unwrap().unwrap(), [i]);
        }
        assert_eq!(shm.dequeue(a).unwrap(), None);
        assert_eq!(shm.dequeue(b).unwrap(), None);
        shm.enqueue(b, b"fresh").unwrap();
        shm.enqueue(a, b"fresh").unwrap();
        assert_eq!(shm.dequeue(b).unwrap().unwrap(), b"fresh");
        assert_eq!(shm.dequeue(a).unwrap().unwrap(), b"fresh");
    }
}
