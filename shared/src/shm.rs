//! The shared-memory segment between the master and its workers.
//!
//! Layout (all little-endian, 8-byte aligned):
//!
//! ```text
//! 0       header (4 KiB): magic, layout version, sizes, seqlock, generation, data length, journal
//! 4096    worker status slots: SLOTS × 256 bytes, written by workers (and pid/restarts by the master)
//! …       statistics: SLOTS × (plugin instance memory table + CONTEXTS_PER_SLOT context records),
//!         each slot's part written only by the worker in that slot (see [`crate::stats`])
//! …       traffic: SLOTS × ROUTES_PER_SLOT route records (status codes, latency, bytes; see
//!         [`crate::traffic`]), written the same way
//! …       configuration journal: `data_capacity` bytes, written only by the master
//! ```
//!
//! The segment is a `memfd` (no name in any filesystem, freed with the last process that maps
//! it), created by the master and inherited by workers as fd 3.
//!
//! The **journal** is a list of records, each a length word and the bytes padded to whole
//! words: first a whole configuration snapshot, then the changes made since, appended one
//! record per generation. A worker remembers how far it read ([`Position`]) and next time copies
//! only the records after it, so one edit among 10,000 routes costs it one small record, not the
//! whole snapshot. When the area is full (or the changes outweigh the snapshot: see the
//! master's publisher) the master starts a new journal with a whole snapshot, and a reader whose
//! position points into the old one reads everything.
//!
//! **Publication** uses a seqlock: the master makes the sequence odd, writes the data, makes it
//! even again. A reader copies the data out and retries if the sequence was odd or changed, so a
//! torn snapshot can never be decoded. Appending only writes past the end a reader may be
//! copying up to, but takes the seqlock all the same. All accesses to shared bytes are atomic
//! operations, so no data race exists even in the language's model. Workers learn about a
//! change with one atomic load of `generation` per request.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

const MAGIC: u64 = u64::from_le_bytes(*b"WGATESHM");
/// Bumped whenever the layout below changes; a mismatch fails loudly.
pub const LAYOUT_VERSION: u64 = 8;
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
    #[error("shared memory: a journal record runs past the end of the data written")]
    Corrupt,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    layout_version: AtomicU64,
    data_capacity: AtomicU64,
    seq: AtomicU64,
    generation: AtomicU64,
    data_len: AtomicU64,
    /// Which journal the data area holds: bumped each time a whole snapshot starts it again.
    journal: AtomicU64,
}

/// A point in the journal: what a reader has already read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub journal: u64,
    /// Bytes from the start of the data area (a record boundary).
    pub offset: usize,
}

/// Records copied out of the journal by [`Segment::read_since`].
#[derive(Debug)]
pub struct Journal {
    /// The generation of the last record.
    pub generation: u64,
    /// Where the next read continues from.
    pub position: Position,
    /// Whether these are all the journal's records (the first being a whole snapshot) rather
    /// than those after the position asked for.
    pub whole: bool,
    bytes: Vec<u8>,
}

impl Journal {
    /// The records, in order; a length running past the end reads as an error.
    pub fn records(&self) -> impl Iterator<Item = Result<&[u8], ShmError>> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<8>()?;
            let len = u64::from_le_bytes(*len) as usize;
            let padded = len.checked_next_multiple_of(8).filter(|p| *p <= tail.len());
            let Some(padded) = padded else {
                rest = &[];
                return Some(Err(ShmError::Corrupt));
            };
            rest = &tail[padded..];
            Some(Ok(&tail[..len]))
        })
    }
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
    /// Client connections accepted since the process started (nginx's `accepts`).
    pub accepted: AtomicU64,
    /// Connections reading a request head that has begun to arrive (nginx's `Reading`).
    pub reading: AtomicU32,
    /// Requests being handled, from their whole head to their answer's end (nginx's
    /// `Writing`). The rest of the open connections wait for a request (`Waiting`).
    pub writing: AtomicU32,
    /// Plugin faults (traps, time or memory limits) in this worker.
    pub plugin_faults: AtomicU64,
    /// Context statistics records in use in this slot's statistics area (claimed in order by
    /// the worker; readers look at no more than this many).
    pub contexts: AtomicU32,
    /// Route traffic records in use in this slot's traffic area (see [`crate::traffic`]).
    pub routes: AtomicU32,
    /// Bytes of `fatal` written (after them).
    fatal_len: AtomicU32,
    /// Why the process stopped on an error (its first bytes): the master names it where the
    /// worker's own error log may not be (one it could not open).
    fatal: [AtomicU8; FATAL_BYTES],
}

/// Room for a worker's reason to stop in its slot.
const FATAL_BYTES: usize = 160;

const _: () = assert!(std::mem::size_of::<WorkerSlot>() <= SLOT_SIZE);
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);

impl WorkerSlot {
    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: SlotState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// Records why the process stops (its first [`FATAL_BYTES`] bytes, cut at a character).
    pub fn set_fatal(&self, why: &str) {
        let mut end = why.len().min(FATAL_BYTES);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        for (cell, b) in self.fatal.iter().zip(&why.as_bytes()[..end]) {
            cell.store(*b, Ordering::Relaxed);
        }
        self.fatal_len.store(end as u32, Ordering::Release);
    }

    /// What [`WorkerSlot::set_fatal`] recorded, if anything.
    pub fn fatal(&self) -> Option<String> {
        let len = (self.fatal_len.load(Ordering::Acquire) as usize).min(FATAL_BYTES);
        let bytes: Vec<u8> = self.fatal[..len]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (len > 0).then(|| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Clears every counter, for a new process taking the slot.
    pub fn reset(&self) {
        self.fatal_len.store(0, Ordering::Relaxed);
        for a in [&self.pid, &self.worker_id, &self.restarts] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [&self.epoch, &self.started_at_ms] {
            a.store(0, Ordering::Relaxed);
        }
        self.zero_counters();
        // A new process starts with no context records: nothing stale is reported as live.
        self.contexts.store(0, Ordering::Release);
        self.routes.store(0, Ordering::Release);
        self.set_state(SlotState::Free);
    }

    /// Zeroes what a process counts in its slot (requests, connections and their states,
    /// faults, the generation it applied): for the process about to take the slot.
    pub fn zero_counters(&self) {
        for a in [
            &self.generation_seen,
            &self.requests,
            &self.active_connections,
            &self.accepted,
            &self.plugin_faults,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.reading.store(0, Ordering::Relaxed);
        self.writing.store(0, Ordering::Relaxed);
    }
}

/// A mapped segment.
pub struct Segment {
    file: File,
    map: memmap2::MmapRaw,
}

impl Segment {
    /// The journal's room in a segment created for `requested` bytes (`wasmgate.shm_size`).
    pub fn data_capacity(requested: u64) -> usize {
        (requested as usize).next_multiple_of(8)
    }

    /// Creates a segment with room for `data_capacity` snapshot bytes (master side).
    pub fn create(data_capacity: u64) -> Result<Segment, ShmError> {
        let data_capacity = Segment::data_capacity(data_capacity);
        let file = sparse_memfd(c"wasmgate-shm", (DATA_OFFSET + data_capacity) as u64)?;
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

    /// Bytes of the journal written so far.
    pub fn journal_len(&self) -> usize {
        self.header().data_len.load(Ordering::Relaxed) as usize
    }

    pub fn capacity(&self) -> usize {
        self.header().data_capacity.load(Ordering::Relaxed) as usize
    }

    /// Publishes `bytes` (a whole snapshot) as generation `generation`: the journal starts
    /// again with it as its one record. Only the master calls this, from one task.
    pub fn publish(&self, generation: u64, bytes: &[u8]) -> Result<(), ShmError> {
        self.write_record(generation, bytes, true)
    }

    /// Appends `bytes` (a change since the previous record) to the journal as generation
    /// `generation`; [`ShmError::TooLarge`] when the area has no room left for it (the master
    /// then publishes a whole snapshot instead).
    pub fn append(&self, generation: u64, bytes: &[u8]) -> Result<(), ShmError> {
        self.write_record(generation, bytes, false)
    }

    /// Writes one record (a length word, then the bytes padded to whole words) under the
    /// seqlock, at the start of the area (`restart`, a new journal) or after the last one.
    fn write_record(&self, generation: u64, bytes: &[u8], restart: bool) -> Result<(), ShmError> {
        let words = self.data_words();
        let h = self.header();
        let start = if restart {
            0
        } else {
            h.data_len.load(Ordering::Relaxed) as usize / 8
        };
        let needed = 1 + bytes.len().div_ceil(8);
        if start + needed > words.len() {
            return Err(ShmError::TooLarge {
                size: bytes.len(),
                // What is left past the record's length word.
                capacity: words.len().saturating_sub(start + 1) * 8,
            });
        }
        let seq = h.seq.load(Ordering::Relaxed);
        h.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        if restart {
            h.journal.fetch_add(1, Ordering::Relaxed);
        }
        words[start].store(bytes.len() as u64, Ordering::Relaxed);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            words[start + 1 + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        h.data_len
            .store(((start + needed) * 8) as u64, Ordering::Relaxed);
        h.generation.store(generation, Ordering::Relaxed);
        h.seq.store(seq.wrapping_add(2), Ordering::Release);
        Ok(())
    }

    /// Copies out the journal, never torn: only the records after `since` when the journal
    /// is still the one `since` points into, else all of them (the first a whole snapshot).
    pub fn read_since(&self, since: Option<Position>) -> Journal {
        let h = self.header();
        let words = self.data_words();
        let mut bytes = Vec::new();
        let mut spins = 0u32;
        loop {
            let s1 = h.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let end = (h.data_len.load(Ordering::Relaxed) as usize).min(words.len() * 8);
                let journal = h.journal.load(Ordering::Relaxed);
                let generation = h.generation.load(Ordering::Relaxed);
                let from = since
                    .filter(|p| p.journal == journal && p.offset <= end)
                    .map_or(0, |p| p.offset);
                bytes.clear();
                bytes.reserve(end - from);
                for w in &words[from / 8..end / 8] {
                    bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                fence(Ordering::Acquire);
                if h.seq.load(Ordering::Relaxed) == s1 {
                    return Journal {
                        generation,
                        position: Position {
                            journal,
                            offset: end,
                        },
                        whole: from == 0,
                        bytes,
                    };
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

/// A new memfd of `len` zero bytes, for a segment workers inherit (close-on-exec: the master
/// places it at the fd number workers expect). Sparse: pages cost memory only once written,
/// and zero pages are every segment's empty state.
pub fn sparse_memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<File> {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let file = File::from(fd);
    file.set_len(len)?;
    Ok(file)
}

/// A fixed-size memfd segment mapped in this process, whose first three words are a magic
/// number, a layout version and a slot count: what the TLS session cache and the nodes'
/// health segment share (the master creates and stamps it, workers map it and check it).
pub struct Mapped {
    file: File,
    map: memmap2::MmapRaw,
}

/// Why a [`Mapped`] segment cannot be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MappedError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a {0} segment of this binary: {1}")]
    BadSegment(&'static str, String),
}

/// The words every [`Mapped`] segment starts with.
#[repr(C)]
struct Stamp {
    magic: AtomicU64,
    version: AtomicU64,
    slots: AtomicU64,
}

/// What a [`Mapped`] segment is: its name, magic, layout version, slot count and length.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub name: &'static std::ffi::CStr,
    /// How errors name it (`TLS session`, `health`).
    pub what: &'static str,
    pub magic: u64,
    pub version: u64,
    pub slots: u64,
    pub len: usize,
}

impl Mapped {
    /// Creates the segment (master), zero-filled, with its stamp but for the magic: the
    /// caller initialises what it needs, then calls [`Mapped::publish`].
    pub fn create(layout: &Layout) -> Result<Mapped, MappedError> {
        let file = sparse_memfd(layout.name, layout.len as u64)?;
        let m = Mapped::map(file, layout)?;
        let s = m.stamp();
        s.version.store(layout.version, Ordering::Relaxed);
        s.slots.store(layout.slots, Ordering::Relaxed);
        Ok(m)
    }

    /// Publishes the magic: `open` trusts nothing before it sees it.
    pub fn publish(&self, layout: &Layout) {
        self.stamp().magic.store(layout.magic, Ordering::Release);
    }

    /// Maps an inherited segment (worker) after checking that it is one of `layout`.
    pub fn open(fd: OwnedFd, layout: &Layout) -> Result<Mapped, MappedError> {
        let file = File::from(fd);
        let len = file.metadata()?.len();
        let bad = |why: String| MappedError::BadSegment(layout.what, why);
        if len != layout.len as u64 {
            return Err(bad(format!("{len} bytes, not {}", layout.len)));
        }
        let m = Mapped::map(file, layout)?;
        let s = m.stamp();
        let (magic, version) = (
            s.magic.load(Ordering::Acquire),
            s.version.load(Ordering::Relaxed),
        );
        if magic != layout.magic
            || version != layout.version
            || s.slots.load(Ordering::Relaxed) != layout.slots
        {
            return Err(bad(format!(
                "magic {magic:#018x}, layout version {version} (this binary: {})",
                layout.version
            )));
        }
        Ok(m)
    }

    fn map(file: File, layout: &Layout) -> Result<Mapped, MappedError> {
        let map = memmap2::MmapRaw::map_raw(&file)?;
        if map.len() < layout.len || layout.len < std::mem::size_of::<Stamp>() {
            let why = "mapping shorter than the segment".into();
            return Err(MappedError::BadSegment(layout.what, why));
        }
        Ok(Mapped { file, map })
    }

    /// The memfd, for passing to workers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The start of the mapping: page-aligned, and as long as the layout says (checked when
    /// mapped); it lives as long as `self`.
    pub fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn stamp(&self) -> &Stamp {
        // SAFETY: the mapping is page-aligned and longer than Stamp (checked by `map`); Stamp
        // is repr(C) of atomics, valid for any bit pattern, and lives as long as `map`.
        unsafe { &*(self.map.as_ptr() as *const Stamp) }
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

    fn records(j: &Journal) -> Vec<Vec<u8>> {
        j.records().map(|r| r.unwrap().to_vec()).collect()
    }

    #[test]
    fn publish_and_read_back() {
        let seg = Segment::create(1 << 20).unwrap();
        let empty = seg.read_since(None);
        assert_eq!((empty.generation, records(&empty)), (0, vec![]));
        seg.publish(3, b"hello world").unwrap();
        let other = reopen(&seg);
        assert_eq!(other.generation(), 3);
        let j = other.read_since(None);
        assert_eq!((j.generation, j.whole), (3, true));
        assert_eq!(records(&j), [b"hello world".to_vec()]);
    }

    /// A reader that read up to a point gets only the records appended since; one whose
    /// point lies in an older journal gets the new one whole.
    #[test]
    fn appended_records_are_read_from_where_the_reader_stopped() {
        let seg = Segment::create(1 << 20).unwrap();
        seg.publish(1, b"snapshot").unwrap();
        let first = seg.read_since(None);
        seg.append(2, b"change 2").unwrap();
        seg.append(3, b"the third change").unwrap();
        let tail = seg.read_since(Some(first.position));
        assert_eq!((tail.generation, tail.whole), (3, false));
        assert_eq!(
            records(&tail),
            [b"change 2".to_vec(), b"the third change".to_vec()]
        );
        // Nothing new: no records.
        assert!(records(&seg.read_since(Some(tail.position))).is_empty());
        let all = seg.read_since(None);
        assert_eq!(records(&all).len(), 3);
        // A new journal: a reader of the old one reads it from its start.
        seg.publish(4, b"new snapshot").unwrap();
        let again = seg.read_since(Some(tail.position));
        assert_eq!((again.generation, again.whole), (4, true));
        assert_eq!(records(&again), [b"new snapshot".to_vec()]);
    }

    /// A record that does not fit what is left is refused, and the journal is unchanged.
    #[test]
    fn append_past_the_end_is_refused() {
        let seg = Segment::create(64).unwrap();
        seg.publish(1, &[7u8; 40]).unwrap();
        assert!(matches!(
            seg.append(2, &[1u8; 20]),
            Err(ShmError::TooLarge { .. })
        ));
        assert_eq!(seg.generation(), 1);
        seg.append(2, &[1u8; 8]).unwrap();
        assert_eq!(records(&seg.read_since(None)).len(), 2);
    }

    #[test]
    fn a_length_past_the_end_reads_as_corrupt() {
        let j = Journal {
            generation: 1,
            position: Position {
                journal: 1,
                offset: 16,
            },
            whole: true,
            bytes: [100u64.to_le_bytes(), [0; 8]].concat(),
        };
        assert!(matches!(
            j.records().collect::<Vec<_>>()[..],
            [Err(ShmError::Corrupt)]
        ));
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

    /// A writer publishes snapshots and appends records whose every byte equals their
    /// generation's low byte, while readers, each following the journal from where it stopped,
    /// check every record is uniform and generations follow one another: a torn read would mix
    /// two generations, and a missed or repeated record would break the sequence.
    #[test]
    fn no_torn_reads_under_concurrent_publication() {
        let seg = std::sync::Arc::new(Segment::create(1 << 20).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let r = reopen(&seg);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut checked, mut at, mut last) = (0u64, None, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let j = r.read_since(at);
                        at = Some(j.position);
                        let mut records = j.records().map(Result::unwrap).collect::<Vec<_>>();
                        if j.whole {
                            // Only the journal's last record says its generation here.
                            records.drain(..records.len().saturating_sub(1));
                        } else {
                            // Every record after the reader's position, one per generation.
                            let first = j.generation + 1 - records.len() as u64;
                            assert!(
                                records.is_empty() || first == last + 1,
                                "{first} after {last}"
                            );
                        }
                        for bytes in &records {
                            let expect = bytes[0];
                            assert!(bytes.iter().all(|b| *b == expect), "torn read");
                            checked += 1;
                        }
                        if let Some(b) = records.last() {
                            assert_eq!(b[0], (j.generation & 0xff) as u8);
                        }
                        last = j.generation;
                    }
                    checked
                })
            })
            .collect();
        // At least 3,000 generations, and for long enough that the readers ran meanwhile.
        let started = std::time::Instant::now();
        for generation in 1u64.. {
            if generation > 3000 && started.elapsed() > Duration::from_millis(200) {
                break;
            }
            let data = vec![(generation & 0xff) as u8; 64 + (generation as usize % 5000)];
            if generation % 16 == 1 || seg.append(generation, &data).is_err() {
                seg.publish(generation, &data).unwrap();
            }
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
