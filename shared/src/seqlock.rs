//! Records in shared memory that a worker releases and gives to another key while the master
//! may be reading them (`crate::traffic`'s route records, `crate::stats`' context records).
//!
//! The worker is each record's only writer. Releasing it, or taking it again for another key,
//! happens with the record's sequence number odd; a reader takes the number before and after
//! its copy and keeps the copy only when the number was even and did not move, so that it
//! never reports one key's counts under another's name. Counting itself (atomic adds while
//! the record keeps its key) does not touch the number: a copy taken meanwhile is as good as
//! any copy of live counters.

use std::sync::atomic::{fence, AtomicU64, Ordering};

/// The key length of a released record: nothing to report.
pub(crate) const RELEASED: u64 = u64::MAX;

/// Runs the worker's change `f` (a release, a new key) with `seq` odd.
pub(crate) fn changing(seq: &AtomicU64, f: impl FnOnce()) {
    let before = seq.load(Ordering::Relaxed);
    seq.store(before | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    f();
    seq.store((before | 1) + 1, Ordering::Release);
}

/// `read(key length)`'s copy of a record, unless it is released or changed while read.
pub(crate) fn consistent<T>(
    seq: &AtomicU64,
    key_len: &AtomicU64,
    read: impl FnOnce(usize) -> T,
) -> Option<T> {
    let before = seq.load(Ordering::Acquire);
    let len = key_len.load(Ordering::Acquire);
    if before & 1 == 1 || len == RELEASED {
        return None;
    }
    let copy = read(len as usize);
    fence(Ordering::Acquire);
    (seq.load(Ordering::Relaxed) == before).then_some(copy)
}
