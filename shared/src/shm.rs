//! The shared-memory segment between the master and its workers.
//!
//! Layout (all little-endian, 8-byte aligned):
//!
//! ```text
//! 0       header (4 KiB): magic, layout version, sizes, seqlock, generation, data length
//! 4096    worker status slots: SLOTS × 256 bytes, written by workers (and pid/restarts by the master)
//! …       statistics: SLOTS × (plugin instance memory table + CONTEXTS_PER_SLOT context records),
//!         each slot's part written only by the worker in that slot (see [`crate::stats`])
//! …       traffic: SLOTS × ROUTES_PER_SLOT route records (status codes, latency, bytes; see
//!         [`crate::traffic`]), written the same way
//! …       snapshot data area: `data_capacity` bytes, written only by the master
//! ```
//!
//! The segment is a `memfd` (no name in any filesystem, freed with the last process that maps
//! it), created by the master and inherited by workers as fd 3.
//!
//! **Publication** uses a seqlock: the master makes the sequence odd, writes the data, makes it
//! even again. A reader copies the data out and retries if the sequence was odd or changed, so a
//! torn snapshot can never be decoded. All accesses to shared bytes are atomic operations, so no
//! data race exists even in the language's model. Workers learn about a change with one atomic
//! load of `generation` per request.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const MAGIC: u64 = u64::from_le_bytes(*b"WGATESHM");
/// Bumped whenever the layout below changes; a mismatch fails loudly.
pub const LAYOUT_VERSION: u64 = 4;
const HEADER_SIZE: usize = 4096;
/// Number of worker status slots (live workers plus draining ones during a reload).
pub const SLOTS: usize = 256;
const SLOT_SIZE: usize = 256;
const STATS_OFFSET: usize = HEADER_SIZE + SLOTS * SLOT_SIZE;
const TRAFFIC_OFFSET: usize = STATS_OFFSET + SLOTS * crate::stats::SLOT_STATS_SIZE;
const DATA_OFFSET: usize = TRAFFIC_OFFSET + SLOTS * crate::traffic::SLOT_TRAFFIC_SIZE;

/// Errors opening or writing the segment.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory: {0}")]
    Io(#[from] std::io::Error),
    #[error("shared memory: not a wasmgate segment (bad magic)")]
    BadMagic,
    #[error("shared memory: layout version {found}, this binary speaks {expected}: the master and worker binaries differ")]
    LayoutMismatch { found: u64, expected: u64 },
    #[error("configuration snapshot of {size} bytes exceeds wasmgate.shm_size ({capacity} bytes)")]
    TooLarge { size: usize, capacity: usize },
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    layout_version: AtomicU64,
    data_capacity: AtomicU64,
    seq: AtomicU64,
    generation: AtomicU64,
    data_len: AtomicU64,
}

/// State of a worker status slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    Free = 0,
    Starting = 1,
    Ready = 2,
    Draining = 3,
}

impl SlotState {
    fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Starting,
            2 => SlotState::Ready,
            3 => SlotState::Draining,
            _ => SlotState::Free,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Free => "free",
            SlotState::Starting => "starting",
            SlotState::Ready => "running",
            SlotState::Draining => "draining",
        }
    }
}

/// One worker's status, shared between the worker (writer of its counters) and the master.
#[repr(C)]
pub struct WorkerSlot {
    state: AtomicU32,
    pub pid: AtomicU32,
    /// Logical worker number (0..worker_processes).
    pub worker_id: AtomicU32,
    /// How many times the master respawned this worker number in this epoch.
    pub restarts: AtomicU32,
    /// Reload epoch of the process in this slot.
    pub epoch: AtomicU64,
    /// Unix time in milliseconds when the process started.
    pub started_at_ms: AtomicU64,
    /// The configuration generation this worker applied last.
    pub generation_seen: AtomicU64,
    /// Requests handled.
    pub requests: AtomicU64,
    /// Client connections open now.
    pub active_connections: AtomicU64,
    /// Plugin faults (traps, time or memory limits) in this worker.
    pub plugin_faults: AtomicU64,
    /// Context statistics records in use in this slot's statistics area (claimed in order by
    /// the worker; readers look at no more than this many).
    pub contexts: AtomicU32,
    /// Route traffic records in use in this slot's traffic area (see [`crate::traffic`]).
    pub routes: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<WorkerSlot>() <= SLOT_SIZE);
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);

impl WorkerSlot {
    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: SlotState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// Clears every counter, for a new process taking the slot.
    pub fn reset(&self) {
        for a in [&self.pid, &self.worker_id, &self.restarts] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &self.epoch,
            &self.started_at_ms,
            &self.generation_seen,
            &self.requests,
            &self.active_connections,
            &self.plugin_faults,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        // A new process starts with no context records: nothing stale is reported as live.
        self.contexts.store(0, Ordering::Release);
        self.routes.store(0, Ordering::Release);
        self.set_state(SlotState::Free);
    }
}

/// A mapped segment.
pub struct Segment {
    file: File,
    map: memmap2::MmapRaw,
}

impl Segment {
    /// Creates a segment with room for `data_capacity` snapshot bytes (master side).
    pub fn create(data_capacity: u64) -> Result<Segment, ShmError> {
        let data_capacity = (data_capacity as usize).next_multiple_of(8);
        let fd =
            nix::sys::memfd::memfd_create(c"wasmgate-shm", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(std::io::Error::from)?;
        let file = File::from(fd);
        // Sparse: pages cost memory only once written.
        file.set_len((DATA_OFFSET + data_capacity) as u64)?;
        let seg = Segment::map(file)?;
        let h = seg.header();
        h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.data_capacity
            .store(data_capacity as u64, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Maps an inherited segment and checks its header (worker side).
    pub fn open(fd: OwnedFd) -> Result<Segment, ShmError> {
        let seg = Segment::map(File::from(fd))?;
        let h = seg.header();
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(ShmError::BadMagic);
        }
        let found = h.layout_version.load(Ordering::Relaxed);
        if found != LAYOUT_VERSION {
            return Err(ShmError::LayoutMismatch {
                found,
                expected: LAYOUT_VERSION,
            });
        }
        let cap = h.data_capacity.load(Ordering::Relaxed) as usize;
        if seg.map.len() < DATA_OFFSET + cap {
            return Err(ShmError::BadMagic);
        }
        Ok(seg)
    }

    fn map(file: File) -> Result<Segment, ShmError> {
        let map = memmap2::MmapRaw::map_raw(&file)?;
        if map.len() < DATA_OFFSET {
            return Err(ShmError::BadMagic);
        }
        Ok(Segment { file, map })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least DATA_OFFSET bytes long (checked in
        // `map`), Header is repr(C) of atomics (valid for any bit pattern), and the reference
        // cannot outlive `self`, which owns the mapping.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn data_words(&self) -> &[AtomicU64] {
        let cap = self.header().data_capacity.load(Ordering::Relaxed) as usize;
        // SAFETY: DATA_OFFSET is 8-aligned, the mapping holds DATA_OFFSET + cap bytes (checked in
        // `open`/`create`), AtomicU64 is valid for any bit pattern, and the slice borrows `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(DATA_OFFSET) as *const AtomicU64,
                cap / 8,
            )
        }
    }

    /// Status slot `i` (panics only for `i >= SLOTS`, a programming error).
    pub fn slot(&self, i: usize) -> &WorkerSlot {
        assert!(i < SLOTS, "slot index {i} out of range");
        // SAFETY: slots lie within the mapping (HEADER_SIZE + SLOTS*SLOT_SIZE = DATA_OFFSET),
        // each 256-byte aligned, WorkerSlot is repr(C) of atomics and fits SLOT_SIZE.
        unsafe { &*(self.map.as_ptr().add(HEADER_SIZE + i * SLOT_SIZE) as *const WorkerSlot) }
    }

    /// The statistics of slot `i` (panics only for `i >= SLOTS`, a programming error).
    pub fn stats(&self, i: usize) -> crate::stats::SlotStats<'_> {
        assert!(i < SLOTS, "slot index {i} out of range");
        let off = STATS_OFFSET + i * crate::stats::SLOT_STATS_SIZE;
        // SAFETY: the area lies within the mapping (STATS_OFFSET + SLOTS * SLOT_STATS_SIZE =
        // DATA_OFFSET, checked in `map`), is 8-byte aligned, and holds only atomics.
        unsafe { crate::stats::SlotStats::new(self.map.as_ptr().add(off), self.slot(i)) }
    }

    /// The route traffic of slot `i` (panics only for `i >= SLOTS`, a programming error).
    pub fn traffic(&self, i: usize) -> crate::traffic::SlotTraffic<'_> {
        assert!(i < SLOTS, "slot index {i} out of range");
        let off = TRAFFIC_OFFSET + i * crate::traffic::SLOT_TRAFFIC_SIZE;
        // SAFETY: the area lies within the mapping (TRAFFIC_OFFSET + SLOTS * SLOT_TRAFFIC_SIZE =
        // DATA_OFFSET, checked in `map`), is 8-byte aligned, and holds only atomics.
        unsafe { crate::traffic::SlotTraffic::new(self.map.as_ptr().add(off), self.slot(i)) }
    }

    /// The generation published last (one atomic load: the per-request check).
    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.header().data_capacity.load(Ordering::Relaxed) as usize
    }

    /// Publishes `bytes` as generation `generation`. Only the master calls this, from one task.
    pub fn publish(&self, generation: u64, bytes: &[u8]) -> Result<(), ShmError> {
        let words = self.data_words();
        if bytes.len() > words.len() * 8 {
            return Err(ShmError::TooLarge {
                size: bytes.len(),
                capacity: words.len() * 8,
            });
        }
        let h = self.header();
        let seq = h.seq.load(Ordering::Relaxed);
        h.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            words[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        h.data_len.store(bytes.len() as u64, Ordering::Relaxed);
        h.generation.store(generation, Ordering::Relaxed);
        h.seq.store(seq.wrapping_add(2), Ordering::Release);
        Ok(())
    }

    /// Copies out the current snapshot bytes and their generation, never torn.
    pub fn read(&self) -> (u64, Vec<u8>) {
        let h = self.header();
        let words = self.data_words();
        let mut out = Vec::new();
        let mut spins = 0u32;
        loop {
            let s1 = h.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let len = (h.data_len.load(Ordering::Relaxed) as usize).min(words.len() * 8);
                let generation = h.generation.load(Ordering::Relaxed);
                out.clear();
                out.reserve(len);
                for w in &words[..len.div_ceil(8)] {
                    out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                out.truncate(len);
                fence(Ordering::Acquire);
                if h.seq.load(Ordering::Relaxed) == s1 {
                    return (generation, out);
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Finds a free status slot and marks it starting (master side).
    pub fn claim_slot(&self) -> Option<usize> {
        (0..SLOTS).find(|&i| {
            let s = self.slot(i);
            s.state
                .compare_exchange(
                    SlotState::Free as u32,
                    SlotState::Starting as u32,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn reopen(seg: &Segment) -> Segment {
        let fd = nix::unistd::dup(seg.fd()).unwrap();
        let _ = fd.as_raw_fd();
        Segment::open(fd).unwrap()
    }

    #[test]
    fn publish_and_read_back() {
        let seg = Segment::create(1 << 20).unwrap();
        assert_eq!(seg.read(), (0, vec![]));
        seg.publish(3, b"hello world").unwrap();
        let other = reopen(&seg);
        assert_eq!(other.generation(), 3);
        assert_eq!(other.read(), (3, b"hello world".to_vec()));
    }

    #[test]
    fn too_large_is_refused() {
        let seg = Segment::create(1 << 20).unwrap();
        let big = vec![1u8; (1 << 20) + 1];
        assert!(matches!(
            seg.publish(1, &big),
            Err(ShmError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_magic_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let f = File::from(fd);
        f.set_len(2 << 20).unwrap();
        assert!(matches!(Segment::open(f.into()), Err(ShmError::BadMagic)));
    }

    /// A writer publishes snapshots whose every byte equals the generation's low byte while
    /// readers check each copy is uniform: a torn read would mix two generations.
    #[test]
    fn no_torn_reads_under_concurrent_publication() {
        let seg = std::sync::Arc::new(Segment::create(1 << 20).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let r = reopen(&seg);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut checked = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let (generation, bytes) = r.read();
                        if generation == 0 {
                            continue;
                        }
                        let expect = (generation & 0xff) as u8;
                        assert_eq!(bytes.len(), 4096 + (generation as usize % 5000));
                        assert!(
                            bytes.iter().all(|b| *b == expect),
                            "torn read at {generation}"
                        );
                        checked += 1;
                    }
                    checked
                })
            })
            .collect();
        for generation in 1..3000u64 {
            let data = vec![(generation & 0xff) as u8; 4096 + (generation as usize % 5000)];
            seg.publish(generation, &data).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn slots_claim_and_reset() {
        let seg = Segment::create(1 << 20).unwrap();
        let a = seg.claim_slot().unwrap();
        let b = seg.claim_slot().unwrap();
        assert_ne!(a, b);
        seg.slot(a).requests.store(5, Ordering::Relaxed);
        seg.slot(a).reset();
        assert_eq!(seg.slot(a).requests.load(Ordering::Relaxed), 0);
        assert_eq!(seg.claim_slot(), Some(a));
    }
}
