//! Upstream nodes' health, shared by every process: the master's active checks and the
//! workers' passive ones count into the same record of a node, and every worker leaves out
//! the nodes it finds unhealthy (as lua-resty-healthcheck shares its targets' state between
//! nginx's workers through a shared dict).
//!
//! # Layout
//!
//! One `memfd` segment the master creates ([`HealthShm::create`]) and the workers inherit
//! ([`HealthShm::open`]): a header page, then [`SLOTS`] records of four words, found by
//! open addressing (linear probing) on a node's [`tag`] — the hash of the object that owns the
//! upstream (`upstreams/1`, `routes/7`) and the node's `host:port`.
//!
//! # Who writes what
//!
//! Only the master places and removes records (`insert`, `remove`), when the configuration
//! names other checked nodes; a removed record becomes a tombstone, which lookups step over
//! and inserts reuse. Any process counts into a record's `state` word with a
//! compare-and-swap ([`HealthShm::report`]), so counts from the master and the workers never
//! overwrite each other.
//!
//! # Counting, as lua-resty-healthcheck counts
//!
//! A record keeps a node's consecutive successes and its consecutive failures of each kind
//! (HTTP statuses, TCP failures, timeouts). A success clears the failures; a failure clears
//! the successes. A healthy node whose failures of one kind reach that kind's threshold turns
//! unhealthy; an unhealthy one whose successes reach theirs turns healthy; a change of state
//! clears every count. A node starts healthy.

use crate::shm::{Layout, Mapped};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

const HEADER_SIZE: usize = 4096;
/// Checked nodes the segment holds (a node of two upstreams counts twice). 128 KiB.
pub const SLOTS: usize = 4096;
const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
/// The farthest from its home slot a record is placed, and so the most slots a lookup reads:
/// a full segment costs a lookup 64 loads, not 4,096.
const MAX_PROBE: usize = 64;

const UNHEALTHY: u64 = 1 << 32;
/// The state word's top bits repeat part of its node's tag, so that a count computed for a
/// record that was removed and replaced meanwhile fails its compare-and-swap.
const CHECK_SHIFT: u32 = 40;
const COUNTS: u64 = (1 << 32) - 1;

fn check_bits(tag: u64) -> u64 {
    (tag >> CHECK_SHIFT) << CHECK_SHIFT
}

#[repr(C)]
struct Slot {
    /// EMPTY, TOMBSTONE or the node's tag.
    key: AtomicU64,
    /// Successes, HTTP failures, TCP failures and timeouts (a byte each, from the lowest),
    /// `UNHEALTHY`, and the tag's top bits from bit `CHECK_SHIFT`.
    state: AtomicU64,
    /// Unix seconds of the last change of state (0: never changed).
    since: AtomicU64,
    _spare: AtomicU64,
}

const SLOT_SIZE: usize = std::mem::size_of::<Slot>();
const _: () = assert!(SLOT_SIZE == 32);

const LAYOUT: Layout = Layout {
    name: c"wasmgate-health",
    what: "health",
    magic: u64::from_le_bytes(*b"WGHEALTH"),
    // Bumped whenever the layout changes; a mismatch fails [`HealthShm::open`].
    version: 1,
    slots: SLOTS as u64,
    len: HEADER_SIZE + SLOTS * SLOT_SIZE,
};

/// Why a segment cannot be made or mapped.
pub type Error = crate::shm::MappedError;

/// What one check or one proxied request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A status among the `healthy.http_statuses` (or a TCP probe that connected).
    Success,
    /// A status among the `unhealthy.http_statuses`.
    HttpFailure,
    /// The connection failed (refused, reset, not HTTP).
    TcpFailure,
    Timeout,
}

impl Outcome {
    /// Its counter's place in the state word.
    fn shift(self) -> u32 {
        match self {
            Outcome::Success => 0,
            Outcome::HttpFailure => 8,
            Outcome::TcpFailure => 16,
            Outcome::Timeout => 24,
        }
    }

    /// As the error log names it (lua-resty-healthcheck's words).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "healthy SUCCESS",
            Outcome::HttpFailure => "unhealthy HTTP",
            Outcome::TcpFailure => "unhealthy TCP",
            Outcome::Timeout => "unhealthy TIMEOUT",
        }
    }
}

/// Thresholds of one kind of check (active or passive), each 1 to 254.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub successes: u8,
    pub http_failures: u8,
    pub tcp_failures: u8,
    pub timeouts: u8,
}

impl Thresholds {
    fn of(&self, o: Outcome) -> u8 {
        match o {
            Outcome::Success => self.successes,
            Outcome::HttpFailure => self.http_failures,
            Outcome::TcpFailure => self.tcp_failures,
            Outcome::Timeout => self.timeouts,
        }
    }
}

/// A node's record as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    pub healthy: bool,
    /// Consecutive outcomes of each kind since the last change of state, counted only where
    /// they lead to a change: a healthy node counts failures, an unhealthy one successes.
    pub successes: u8,
    pub http_failures: u8,
    pub tcp_failures: u8,
    pub timeouts: u8,
    /// Unix seconds of the last change (0: healthy since it was first checked).
    pub since: u64,
}

/// A change of state that a report made: the node is now `healthy` (or not), after `count`
/// outcomes of `by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub healthy: bool,
    pub by: Outcome,
    pub count: u8,
}

impl Change {
    /// Writes it to the error log, as an operator needs to read it: node `node` of `owner`'s
    /// upstream, found by `by` (`active` or `passive`) after seeing `seen`. Taken out is an
    /// error, back a warning.
    pub fn log(&self, node: &str, owner: &str, by: &str, seen: &str) {
        let line = self.describe(node, owner, by, seen);
        match self.healthy {
            true => tracing::warn!("{line}"),
            false => tracing::error!("{line}"),
        }
    }

    fn describe(&self, node: &str, owner: &str, by: &str, seen: &str) -> String {
        match self.healthy {
            true => format!(
                "upstream node {node} of {owner} is healthy again: {} success{} in a row ({by} \
                 check: {seen})",
                self.count,
                if self.count == 1 { "" } else { "es" }
            ),
            false => format!(
                "upstream node {node} of {owner} is unhealthy: {} × {} in a row ({by} check: \
                 {seen}); left out while another node is healthy",
                self.count,
                self.by.as_str()
            ),
        }
    }
}

/// The tag of node `node` (`host:port`) of the upstream `owner` names: the same in every
/// process, never EMPTY or TOMBSTONE.
pub fn tag(owner: &str, node: &str) -> u64 {
    let h = crate::tls_sessions::salt([owner.as_bytes(), node.as_bytes()]);
    h.max(TOMBSTONE + 1)
}

/// The segment, mapped in this process.
pub struct HealthShm {
    mapped: Mapped,
}

impl std::fmt::Debug for HealthShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthShm").field("slots", &SLOTS).finish()
    }
}

impl HealthShm {
    /// Creates an empty segment (master).
    pub fn create() -> Result<HealthShm, Error> {
        let mapped = Mapped::create(&LAYOUT)?;
        mapped.publish(&LAYOUT);
        Ok(HealthShm { mapped })
    }

    /// Maps an inherited segment (worker) after checking that it is one of this layout.
    pub fn open(fd: OwnedFd) -> Result<HealthShm, Error> {
        Ok(HealthShm {
            mapped: Mapped::open(fd, &LAYOUT)?,
        })
    }

    /// The memfd, for passing to workers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mapped.fd()
    }

    fn slot(&self, i: usize) -> &Slot {
        let i = i % SLOTS;
        // SAFETY: slot i < SLOTS lies inside the mapping (HEADER_SIZE + SLOTS slots = its
        // checked length), 8-byte aligned (a page + multiples of 32); Slot is repr(C) of
        // atomics, valid for any bit pattern, and lives as long as the mapping.
        unsafe { &*(self.mapped.ptr().add(HEADER_SIZE + i * SLOT_SIZE) as *const Slot) }
    }

    /// The slots `tag` may be in, in probing order.
    fn probe(tag: u64) -> impl Iterator<Item = usize> {
        let start = (tag % SLOTS as u64) as usize;
        (0..MAX_PROBE).map(move |k| (start + k) % SLOTS)
    }

    /// Where node `tag`'s record is, if the master placed one.
    pub fn find(&self, tag: u64) -> Option<usize> {
        for i in Self::probe(tag) {
            match self.slot(i).key.load(Ordering::Acquire) {
                k if k == tag => return Some(i),
                EMPTY => return None,
                _ => {}
            }
        }
        None
    }

    /// Places a record for `tag` (master only), healthy; the one there if any. None when
    /// every slot is taken.
    pub fn insert(&self, tag: u64) -> Option<usize> {
        if let Some(i) = self.find(tag) {
            return Some(i);
        }
        let i =
            Self::probe(tag).find(|&i| self.slot(i).key.load(Ordering::Acquire) <= TOMBSTONE)?;
        let s = self.slot(i);
        s.state.store(check_bits(tag), Ordering::Release);
        s.since.store(0, Ordering::Relaxed);
        // Published last: a reader that finds the key finds a fresh record.
        s.key.store(tag, Ordering::Release);
        Some(i)
    }

    /// Removes the record at `i` (master only), if it is still `tag`'s. Where no lookup can
    /// need to step over it (the next slot is empty), the slot becomes empty, and so do the
    /// tombstones just before it: nodes that come and go do not fill the segment with them.
    pub fn remove(&self, i: usize, tag: u64) {
        let s = self.slot(i);
        if s.key.load(Ordering::Acquire) != tag {
            return;
        }
        s.state.store(0, Ordering::Release);
        if self.slot(i + 1).key.load(Ordering::Acquire) != EMPTY {
            s.key.store(TOMBSTONE, Ordering::Release);
            return;
        }
        s.key.store(EMPTY, Ordering::Release);
        let mut j = i;
        for _ in 1..SLOTS {
            j = (j + SLOTS - 1) % SLOTS;
            let before = self.slot(j);
            if before.key.load(Ordering::Acquire) != TOMBSTONE {
                break;
            }
            before.key.store(EMPTY, Ordering::Release);
        }
    }

    /// Node `tag`'s state at slot `i`; None when the slot holds another node's (moved, or
    /// not placed yet).
    pub fn state(&self, i: usize, tag: u64) -> Option<NodeState> {
        let s = self.slot(i);
        if s.key.load(Ordering::Acquire) != tag {
            return None;
        }
        let word = s.state.load(Ordering::Acquire);
        if word & !COUNTS & !UNHEALTHY != check_bits(tag) {
            return None;
        }
        let count = |o: Outcome| (word >> o.shift()) as u8;
        Some(NodeState {
            healthy: word & UNHEALTHY == 0,
            successes: count(Outcome::Success),
            http_failures: count(Outcome::HttpFailure),
            tcp_failures: count(Outcome::TcpFailure),
            timeouts: count(Outcome::Timeout),
            since: s.since.load(Ordering::Relaxed),
        })
    }

    /// Whether node `tag` (at slot `i`) may be picked: unknown nodes are.
    pub fn healthy(&self, i: usize, tag: u64) -> bool {
        self.state(i, tag).is_none_or(|s| s.healthy)
    }

    /// Counts `outcome` for node `tag` at slot `i` against `limits`; the change of state it
    /// made, if any. A slot that holds another node's record is left alone.
    pub fn report(
        &self,
        i: usize,
        tag: u64,
        outcome: Outcome,
        limits: &Thresholds,
    ) -> Option<Change> {
        let s = self.slot(i);
        let mut word = s.state.load(Ordering::Acquire);
        let change = loop {
            // Another node's record now (or being replaced): not this count's to change.
            if s.key.load(Ordering::Acquire) != tag
                || word & !COUNTS & !UNHEALTHY != check_bits(tag)
            {
                return None;
            }
            let (next, made) = count(word, outcome, limits);
            if next == word {
                // Nothing to write (a success of a healthy node): no shared cache line taken.
                return None;
            }
            match s
                .state
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break made,
                Err(now) => word = now,
            }
        };
        if change.is_some() {
            s.since.store(unix_now(), Ordering::Relaxed);
        }
        change
    }
}

/// The state word after `outcome`, and the change it made.
fn count(word: u64, outcome: Outcome, limits: &Thresholds) -> (u64, Option<Change>) {
    let healthy = word & UNHEALTHY == 0;
    let check = word & !COUNTS & !UNHEALTHY;
    match (healthy, outcome) {
        // Successes lead nowhere for a healthy node, failures nowhere for an unhealthy one:
        // what they clear is cleared, nothing is counted.
        (true, Outcome::Success) => return (check, None),
        (false, o) if o != Outcome::Success => return (check | UNHEALTHY, None),
        _ => {}
    }
    let shift = outcome.shift();
    let n = ((word >> shift) as u8).saturating_add(1);
    // A success clears the failures, a failure the successes (the other failures stay: each
    // kind has its own threshold).
    let kept = match outcome {
        Outcome::Success => 0,
        _ => word & 0xff_ff_ff_00 & !(0xff << shift),
    };
    let flag = word & UNHEALTHY;
    let turns = match outcome {
        Outcome::Success => !healthy,
        _ => healthy,
    };
    if turns && n >= limits.of(outcome) {
        let change = Change {
            healthy: !healthy,
            by: outcome,
            count: n,
        };
        return (check | (flag ^ UNHEALTHY), Some(change));
    }
    (check | flag | kept | (u64::from(n) << shift), None)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Thresholds = Thresholds {
        successes: 2,
        http_failures: 3,
        tcp_failures: 2,
        timeouts: 2,
    };

    fn pair() -> (HealthShm, HealthShm) {
        let a = HealthShm::create().unwrap();
        let b = HealthShm::open(a.fd().try_clone_to_owned().unwrap()).unwrap();
        (a, b)
    }

    #[test]
    fn failures_of_one_kind_take_a_node_out_and_successes_bring_it_back() {
        let (master, worker) = pair();
        let t = tag("upstreams/1", "127.0.0.1:80");
        let i = master.insert(t).unwrap();
        assert_eq!(worker.find(t), Some(i));
        assert!(worker.healthy(i, t));
        // One TCP failure, then an HTTP failure: neither reaches its threshold.
        assert_eq!(worker.report(i, t, Outcome::TcpFailure, &LIMITS), None);
        assert_eq!(worker.report(i, t, Outcome::HttpFailure, &LIMITS), None);
        let s = master.state(i, t).unwrap();
        assert_eq!((s.tcp_failures, s.http_failures), (1, 1));
        // A second TCP failure does, whoever counts it.
        let c = master.report(i, t, Outcome::TcpFailure, &LIMITS).unwrap();
        assert_eq!((c.healthy, c.by, c.count), (false, Outcome::TcpFailure, 2));
        assert!(!worker.healthy(i, t));
        let s = worker.state(i, t).unwrap();
        assert_eq!((s.successes, s.tcp_failures, s.http_failures), (0, 0, 0));
        assert!(s.since > 0);
        // Successes bring it back, a failure between them starts them again.
        assert_eq!(worker.report(i, t, Outcome::Success, &LIMITS), None);
        assert_eq!(worker.report(i, t, Outcome::Timeout, &LIMITS), None);
        // The failure cleared the success and was not counted itself.
        let s = worker.state(i, t).unwrap();
        assert_eq!((s.successes, s.timeouts, s.healthy), (0, 0, false));
        assert_eq!(worker.report(i, t, Outcome::Success, &LIMITS), None);
        assert!(!worker.healthy(i, t));
        let c = worker.report(i, t, Outcome::Success, &LIMITS).unwrap();
        assert!(c.healthy);
        assert!(master.healthy(i, t));
    }

    #[test]
    fn a_success_clears_the_failures() {
        let (master, _) = pair();
        let t = tag("routes/1", "a:1");
        let i = master.insert(t).unwrap();
        for _ in 0..10 {
            assert_eq!(
                master.report(i, t, Outcome::TcpFailure, &LIMITS.with_tcp(3)),
                None
            );
            assert_eq!(
                master.report(i, t, Outcome::TcpFailure, &LIMITS.with_tcp(3)),
                None
            );
            assert_eq!(master.report(i, t, Outcome::Success, &LIMITS), None);
        }
        assert!(master.healthy(i, t));
    }

    impl Thresholds {
        fn with_tcp(mut self, n: u8) -> Thresholds {
            self.tcp_failures = n;
            self
        }
    }

    #[test]
    fn removed_and_moved_records_are_left_alone() {
        let (master, worker) = pair();
        let t = tag("upstreams/1", "a:1");
        let i = master.insert(t).unwrap();
        master.report(i, t, Outcome::TcpFailure, &LIMITS);
        master.report(i, t, Outcome::TcpFailure, &LIMITS);
        master.remove(i, t);
        assert_eq!(worker.find(t), None);
        // Unknown: may be picked, counts nothing.
        assert!(worker.healthy(i, t));
        assert_eq!(worker.report(i, t, Outcome::Success, &LIMITS), None);
        // Placed again: a fresh, healthy record in the tombstone's place.
        let other = tag("upstreams/2", "a:1");
        let j = master.insert(other).unwrap();
        assert!(worker.healthy(j, other));
        assert_eq!(master.insert(t).map(|k| worker.healthy(k, t)), Some(true));
    }

    #[test]
    fn colliding_tags_probe_on_a_bounded_way_and_tombstones_go() {
        let (master, worker) = pair();
        // Tags that all start at slot 5: the first MAX_PROBE fit, the next does not.
        let tags: Vec<u64> = (0..=MAX_PROBE as u64)
            .map(|k| 5 + k * SLOTS as u64)
            .collect();
        for (k, t) in tags[..MAX_PROBE].iter().enumerate() {
            assert_eq!(master.insert(*t), Some(5 + k));
        }
        assert_eq!(master.insert(tags[MAX_PROBE]), None);
        assert_eq!(worker.find(tags[MAX_PROBE]), None);
        assert_eq!(worker.find(tags[MAX_PROBE - 1]), Some(4 + MAX_PROBE));
        // A removed record in the middle is a tombstone: found past, and reused.
        master.remove(6, tags[1]);
        assert_eq!(worker.find(tags[2]), Some(7));
        assert_eq!(master.insert(tags[MAX_PROBE]), Some(6));
        // Removed from the end, the run's tombstones go with it.
        master.remove(6, tags[MAX_PROBE]);
        for (k, t) in tags[2..MAX_PROBE].iter().enumerate().rev() {
            master.remove(7 + k, *t);
        }
        master.remove(5, tags[0]);
        assert!((0..SLOTS).all(|i| master.slot(i).key.load(Ordering::Relaxed) == EMPTY));
    }

    #[test]
    fn a_count_meant_for_a_replaced_record_is_not_taken() {
        let (master, worker) = pair();
        // Two tags with the same home slot and different top bits.
        let (old, new) = (7 + (1 << 50), 7 + (2 << 50));
        let i = master.insert(old).unwrap();
        let word = master.slot(i).state.load(Ordering::Relaxed);
        master.remove(i, old);
        assert_eq!(master.insert(new), Some(i));
        // A report for `old` computed on its word cannot land on `new`'s record.
        let s = master.slot(i);
        let (next, _) = count(word, Outcome::TcpFailure, &LIMITS);
        assert!(s
            .state
            .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err());
        assert_eq!(worker.report(i, old, Outcome::TcpFailure, &LIMITS), None);
        assert_eq!(worker.state(i, new).unwrap().tcp_failures, 0);
        assert_eq!(worker.state(i, old), None);
    }

    #[test]
    fn a_healthy_node_counts_no_successes() {
        let (master, _) = pair();
        let t = tag("upstreams/1", "a:1");
        let i = master.insert(t).unwrap();
        master.report(i, t, Outcome::HttpFailure, &LIMITS);
        master.report(i, t, Outcome::Success, &LIMITS);
        let s = master.state(i, t).unwrap();
        assert_eq!((s.successes, s.http_failures, s.healthy), (0, 0, true));
    }

    #[test]
    fn tags_differ_by_owner_and_node_and_are_never_reserved() {
        assert_ne!(tag("upstreams/1", "a:1"), tag("upstreams/1", "a:2"));
        assert_ne!(tag("upstreams/1", "a:1"), tag("routes/1", "a:1"));
        assert_ne!(tag("upstreams/1a", ":1"), tag("upstreams/1", "a:1"));
        assert!(tag("", "") > TOMBSTONE);
    }
}
