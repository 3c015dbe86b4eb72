//! TLS sessions every worker can resume, and the ticket keys they all share: what nginx's
//! `ssl_session_cache shared:SSL:…` and its per-master ticket keys give (APISIX configures
//! both), so that a client reconnecting to another worker still resumes its session instead of
//! paying a full handshake.
//!
//! # Layout
//!
//! One `memfd` segment that the master creates ([`SessionShm::create`]) and the workers
//! inherit and map ([`SessionShm::open`]); pages cost memory only once written.
//!
//! ```text
//! offset 0     header page (4 KiB): magic, layout version, slot count; the ticket keys
//!              (a sequence number, the key epoch, the current and the previous key)
//! 4096         SLOTS slots of 512 bytes, in sets of WAYS (set-associative: a key lives in
//!              the set its hash names, in any of the set's slots)
//! ```
//!
//! Every field is an `AtomicU64`, keys and values included (copied a word at a time): a
//! process reading a slot while another writes it sees stale words, never undefined
//! behaviour.
//!
//! # Concurrency
//!
//! A slot is used under its `owner` word: 0 when free, else the thread id of the thread using
//! it, taken with one compare-and-swap and given back with one store. Nothing waits: a slot
//! busy for longer than a short spin is skipped (a lookup misses, a store is not made, and the
//! client does a full handshake). A worker that dies holding a slot (SIGKILL between the two
//! stores) leaves its thread id there; the next process that wants the slot finds the thread
//! gone (`kill(tid, 0)`) and takes it over. A thread never holds a slot across calls, so a slot
//! that names the caller's own thread id (a reused id) is stale too.
//!
//! The ticket keys have one writer, the master ([`SessionShm::rotate_ticket_keys`]); workers
//! read them under a sequence number (odd while the master writes) and retry a torn read.
//!
//! # Semantics
//!
//! Sessions are stored under a key of the caller's (the session id rustls chose) and a `salt`
//! (one per SSL object and its content: a session made with one certificate never resumes
//! under another). A session expires [`SESSION_TIMEOUT`] after it was stored (APISIX's
//! `ssl_session_timeout 10m`); a full set gives its oldest slot to a new session. `take`
//! removes what it finds (TLS 1.3 tickets are single-use).

use crate::shm::{Layout, Mapped};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Duration;

const HEADER_SIZE: usize = 4096;

/// Sessions the segment holds (16,384 × 512 bytes: 8 MiB, APISIX's 20 MB cache holds about
/// 80,000 nginx sessions of larger size; each full TLS 1.3 handshake stores two).
pub const SLOTS: usize = 16_384;
/// Slots a key may use (its set).
const WAYS: usize = 8;
const SLOT_WORDS: usize = 64;
const KEY_WORDS: usize = 6;
/// owner, tag, stamp, lengths, salt.
const FIXED_WORDS: usize = 5;
const VALUE_WORDS: usize = SLOT_WORDS - FIXED_WORDS - KEY_WORDS;
/// Longest session key stored (rustls makes 32-byte ids).
pub const MAX_KEY: usize = KEY_WORDS * 8;
/// Longest session value stored (rustls's encoded sessions without client certificates take
/// about 150 bytes).
pub const MAX_VALUE: usize = VALUE_WORDS * 8;
/// How long a stored session can be resumed (APISIX's `ssl_session_timeout`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a ticket key encrypts new tickets; tickets it made are accepted for as long
/// again, while it is the previous key. Then it is erased.
pub const TICKET_KEY_LIFETIME: Duration = Duration::from_secs(3600);
/// Spins before a busy slot is skipped.
const SPINS: u32 = 64;

#[repr(C)]
struct Header {
    /// Magic, layout version and slot count: `shm::Mapped`'s stamp.
    _stamp: [AtomicU64; 3],
    /// Odd while the master writes the keys.
    key_seq: AtomicU64,
    /// 0: no key yet; counts rotations from 1.
    key_epoch: AtomicU64,
    /// The current key's four words, then the previous key's.
    keys: [AtomicU64; 8],
}

#[repr(C)]
struct Slot {
    /// 0 free; else the thread id of the thread using the slot.
    owner: AtomicU64,
    /// The hash of what the slot holds (0: empty), read without the slot to pick candidates.
    tag: AtomicU64,
    /// Unix seconds when the session was stored; 0: empty.
    stamp: AtomicU64,
    /// Key length | value length << 8.
    lens: AtomicU64,
    salt: AtomicU64,
    key: [AtomicU64; KEY_WORDS],
    value: [AtomicU64; VALUE_WORDS],
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_WORDS * 8);
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
const _: () = assert!(SLOTS.is_multiple_of(WAYS));

/// Why a segment cannot be made or mapped.
pub type Error = crate::shm::MappedError;

/// The ticket keys as the master last published them.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKeys {
    /// Which rotation made `current` (from 1); `previous` is `epoch - 1`'s.
    pub epoch: u64,
    pub current: [u8; 32],
    pub previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for TicketKeys {
    // Never the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The segment, mapped in this process.
pub struct SessionShm {
    mapped: Mapped,
}

impl std::fmt::Debug for SessionShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionShm").field("slots", &SLOTS).finish()
    }
}

const TOTAL: usize = HEADER_SIZE + SLOTS * SLOT_WORDS * 8;

const LAYOUT: Layout = Layout {
    name: c"wasmgate-tls-sessions",
    what: "TLS session",
    magic: u64::from_le_bytes(*b"WGTLSSES"),
    // Bumped whenever the layout changes; a mismatch fails [`SessionShm::open`].
    version: 1,
    slots: SLOTS as u64,
    len: TOTAL,
};

impl SessionShm {
    /// Creates the segment (master), with its first ticket key.
    pub fn create() -> Result<SessionShm, Error> {
        // Zero pages are free slots.
        let shm = SessionShm {
            mapped: Mapped::create(&LAYOUT)?,
        };
        shm.rotate_ticket_keys()?;
        shm.mapped.publish(&LAYOUT);
        Ok(shm)
    }

    /// Maps an inherited segment (worker) after checking that it is one of this layout.
    pub fn open(fd: OwnedFd) -> Result<SessionShm, Error> {
        Ok(SessionShm {
            mapped: Mapped::open(fd, &LAYOUT)?,
        })
    }

    /// The memfd, for passing to workers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mapped.fd()
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and TOTAL bytes (checked when mapped); Header
        // is repr(C) of atomics (its first three words the stamp `Mapped` checks), valid for
        // any bit pattern, and lives as long as the mapping.
        unsafe { &*(self.mapped.ptr() as *const Header) }
    }

    fn slot(&self, i: usize) -> &Slot {
        debug_assert!(i < SLOTS);
        // SAFETY: slot i lies inside the mapping (HEADER_SIZE + SLOTS slots ≤ TOTAL ≤ its
        // length), 8-byte aligned (page + multiples of 512); Slot is repr(C) of atomics.
        unsafe { &*(self.mapped.ptr().add(HEADER_SIZE + i * SLOT_WORDS * 8) as *const Slot) }
    }

    /// The slots of the set `tag` names.
    fn set(&self, tag: u64) -> impl Iterator<Item = &Slot> {
        let first = (tag as usize % (SLOTS / WAYS)) * WAYS;
        (first..first + WAYS).map(|i| self.slot(i))
    }

    /// Stores `value` under (`salt`, `key`); false when it is too large or its set is busy.
    pub fn put(&self, salt: u64, key: &[u8], value: &[u8]) -> bool {
        if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return false;
        }
        let tag = tag(salt, key);
        let now = now_secs();
        // The slot to use: the key's own, else an empty or expired one, else the oldest.
        let rank = |s: &Slot| {
            let stamp = s.stamp.load(Ordering::Relaxed);
            match s.tag.load(Ordering::Relaxed) {
                t if t == tag => 0,
                0 => 1,
                _ if expired(stamp, now) => 1,
                _ => 2 + stamp,
            }
        };
        let Some(slot) = self.set(tag).min_by_key(|s| rank(s)) else {
            return false;
        };
        let Some(held) = Held::take(slot) else {
            return false;
        };
        held.write(tag, now, salt, key, value);
        true
    }

    /// The session stored under (`salt`, `key`), if it has not expired.
    pub fn get(&self, salt: u64, key: &[u8]) -> Option<Vec<u8>> {
        self.find(salt, key, false)
    }

    /// As [`SessionShm::get`], removing the session.
    pub fn take(&self, salt: u64, key: &[u8]) -> Option<Vec<u8>> {
        self.find(salt, key, true)
    }

    fn find(&self, salt: u64, key: &[u8], remove: bool) -> Option<Vec<u8>> {
        if key.is_empty() || key.len() > MAX_KEY {
            return None;
        }
        let tag = tag(salt, key);
        let now = now_secs();
        for slot in self.set(tag) {
            if slot.tag.load(Ordering::Relaxed) != tag {
                continue;
            }
            let Some(held) = Held::take(slot) else {
                continue;
            };
            if !held.holds(tag, salt, key) {
                continue;
            }
            if expired(slot.stamp.load(Ordering::Relaxed), now) {
                held.clear();
                return None;
            }
            let value = held.value();
            if remove {
                held.clear();
            }
            return Some(value);
        }
        None
    }

    /// The ticket keys, or None before the first (or while the master keeps writing them).
    pub fn ticket_keys(&self) -> Option<TicketKeys> {
        let h = self.header();
        for _ in 0..SPINS {
            let before = h.key_seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let epoch = h.key_epoch.load(Ordering::Relaxed);
            let mut words = [0u64; 8];
            for (w, a) in words.iter_mut().zip(&h.keys) {
                *w = a.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if h.key_seq.load(Ordering::Relaxed) != before {
                continue;
            }
            if epoch == 0 {
                return None;
            }
            let key = |ws: &[u64]| -> [u8; 32] {
                let mut k = [0u8; 32];
                for (chunk, w) in k.chunks_exact_mut(8).zip(ws) {
                    chunk.copy_from_slice(&w.to_le_bytes());
                }
                k
            };
            return Some(TicketKeys {
                epoch,
                current: key(&words[..4]),
                previous: (epoch > 1).then(|| key(&words[4..])),
            });
        }
        None
    }

    /// A new current ticket key (master only): the current one becomes the previous, the
    /// previous is erased.
    pub fn rotate_ticket_keys(&self) -> Result<(), Error> {
        let mut fresh = [0u8; 32];
        crate::tls::provider()
            .secure_random
            .fill(&mut fresh)
            .map_err(|_| std::io::Error::other("no random numbers for a ticket key"))?;
        let h = self.header();
        let seq = h.key_seq.load(Ordering::Relaxed);
        h.key_seq.store(seq | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for i in 0..4 {
            let current = h.keys[i].load(Ordering::Relaxed);
            h.keys[4 + i].store(current, Ordering::Relaxed);
            let word = u64::from_le_bytes(fresh[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            h.keys[i].store(word, Ordering::Relaxed);
        }
        h.key_epoch.fetch_add(1, Ordering::Relaxed);
        h.key_seq.store((seq | 1) + 1, Ordering::Release);
        fresh.fill(0);
        Ok(())
    }
}

/// A slot this thread uses, and the owner word it holds it with; given back when dropped.
struct Held<'a>(&'a Slot, u64);

impl<'a> Held<'a> {
    fn take(slot: &'a Slot) -> Option<Held<'a>> {
        let tid = thread_id();
        let now = now_secs();
        let me = owner_word(tid, now);
        for spin in 0..SPINS {
            match slot
                .owner
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Some(Held(slot, me)),
                // Held by a thread that is gone, by this very thread's id in an earlier life,
                // or for longer than any use takes (a hold lasts microseconds; the thread id
                // of one killed may have gone to another process since): nobody will give
                // it back.
                Err(holder) if stale(holder, tid, now) || (spin == SPINS / 2 && !alive(holder)) => {
                    if slot
                        .owner
                        .compare_exchange(holder, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Some(Held(slot, me));
                    }
                }
                Err(_) => std::hint::spin_loop(),
            }
        }
        None
    }

    fn holds(&self, tag: u64, salt: u64, key: &[u8]) -> bool {
        let s = self.0;
        let lens = s.lens.load(Ordering::Relaxed);
        s.tag.load(Ordering::Relaxed) == tag
            && s.salt.load(Ordering::Relaxed) == salt
            && (lens & 0xff) as usize == key.len()
            && words_equal(&s.key, key)
    }

    fn value(&self) -> Vec<u8> {
        let len = ((self.0.lens.load(Ordering::Relaxed) >> 8) as usize).min(MAX_VALUE);
        let mut out = Vec::with_capacity(len.next_multiple_of(8));
        for w in &self.0.value[..len.div_ceil(8)] {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn write(&self, tag: u64, now: u64, salt: u64, key: &[u8], value: &[u8]) {
        let s = self.0;
        // Empty while written: a writer killed halfway leaves no torn session behind.
        s.tag.store(0, Ordering::Relaxed);
        s.salt.store(salt, Ordering::Relaxed);
        store_words(&s.key, key);
        store_words(&s.value, value);
        s.lens.store(
            key.len() as u64 | (value.len() as u64) << 8,
            Ordering::Relaxed,
        );
        s.stamp.store(now, Ordering::Relaxed);
        s.tag.store(tag, Ordering::Relaxed);
    }

    /// Empties the slot, its secrets included: a used or expired session does not stay
    /// readable in memory every worker maps.
    fn clear(&self) {
        let s = self.0;
        s.tag.store(0, Ordering::Relaxed);
        s.stamp.store(0, Ordering::Relaxed);
        s.salt.store(0, Ordering::Relaxed);
        s.lens.store(0, Ordering::Relaxed);
        for w in s.key.iter().chain(&s.value) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Only this hold: one that stalled past its lease (a stopped process) and lost the
        // slot to another must not free that other's hold when it wakes.
        let _ = (self.0.owner).compare_exchange(self.1, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// `bytes` into `words`, the words after them zeroed (nothing of a longer earlier value
/// stays).
fn store_words(words: &[AtomicU64], bytes: &[u8]) {
    let mut chunks = bytes.chunks(8);
    for w in words {
        let mut b = [0u8; 8];
        if let Some(chunk) = chunks.next() {
            b[..chunk.len()].copy_from_slice(chunk);
        }
        w.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
}

fn words_equal(words: &[AtomicU64], bytes: &[u8]) -> bool {
    words.iter().zip(bytes.chunks(8)).all(|(w, chunk)| {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        w.load(Ordering::Relaxed) == u64::from_le_bytes(b)
    })
}

/// FNV-1a over the salt and the key; never 0 (an empty slot's tag). The keys stored are
/// random (rustls makes them), so a plain hash spreads them.
fn tag(salt: u64, key: &[u8]) -> u64 {
    fnv(fnv(FNV_OFFSET, &salt.to_le_bytes()), key).max(1)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The salt of sessions made with `parts` (an SSL object's id, certificates, keys and
/// protocols): the same in every worker, another when any part changes. Not a secret (the
/// slots are only reachable through the segment), only a name.
pub fn salt<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    parts.into_iter().fold(FNV_OFFSET, |h, part| {
        fnv(fnv(h, &(part.len() as u64).to_le_bytes()), part)
    })
}

fn expired(stamp: u64, now: u64) -> bool {
    stamp == 0 || now.saturating_sub(stamp) >= SESSION_TIMEOUT.as_secs()
}

/// Seconds on the machine's monotonic clock (the same in every process, and not moved by
/// changes of the wall clock, which would expire sessions or leases at once), an hour ahead
/// so that a stamp is never 0 (an empty slot) and "an hour ago" never underflows.
fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 + 3600
}

fn thread_id() -> u32 {
    // SAFETY: gettid has no preconditions.
    (unsafe { libc::gettid() }) as u32
}

/// What a slot's `owner` holds while used: the thread's id, and when it took the slot (the
/// low 32 bits of Unix seconds).
fn owner_word(tid: u32, now: u64) -> u64 {
    (now << 32) | u64::from(tid)
}

/// Longest a slot may stay held before another process takes it over, whoever holds it.
const LEASE_SECS: u32 = 2;

/// Whether `holder` can no longer be using the slot: it is this thread (which never holds
/// one across calls), or it took the slot [`LEASE_SECS`] or more ago.
fn stale(holder: u64, tid: u32, now: u64) -> bool {
    let (holder_tid, since) = (holder as u32, (holder >> 32) as u32);
    holder_tid == tid || (now as u32).wrapping_sub(since) >= LEASE_SECS
}

/// Whether the thread that holds a slot (`holder`, an owner word) still exists (a signal 0
/// can be sent to it: the kernel finds threads by their id too).
fn alive(holder: u64) -> bool {
    let Ok(tid) = libc::pid_t::try_from(holder as u32) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the target exists.
    let rc = unsafe { libc::kill(tid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionShm, SessionShm) {
        let a = SessionShm::create().unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = SessionShm::open(fd).unwrap();
        (a, b)
    }

    #[test]
    fn a_session_stored_by_one_process_is_found_by_another() {
        let (a, b) = pair();
        let key = [7u8; 32];
        assert!(a.put(1, &key, b"session one"));
        assert_eq!(b.get(1, &key).as_deref(), Some(&b"session one"[..]));
        // Another salt (another SSL object) or key does not find it.
        assert_eq!(b.get(2, &key), None);
        assert_eq!(b.get(1, &[8u8; 32]), None);
        // `take` finds it once.
        assert_eq!(b.take(1, &key).as_deref(), Some(&b"session one"[..]));
        assert_eq!(a.get(1, &key), None);
    }

    #[test]
    fn values_of_every_length_round_trip_and_limits_are_kept() {
        let (a, _) = pair();
        for len in [0, 1, 7, 8, 9, 150, MAX_VALUE] {
            let key = [len as u8; 32];
            let value: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert!(a.put(3, &key, &value), "{len}");
            assert_eq!(a.get(3, &key), Some(value), "{len}");
        }
        assert!(!a.put(3, &[1; 32], &vec![0; MAX_VALUE + 1]));
        assert!(!a.put(3, &[1; MAX_KEY + 1], b"x"));
        assert!(!a.put(3, &[], b"x"));
        assert_eq!(a.get(3, &[1; MAX_KEY + 1]), None);
        // A key that differs only past the eighth byte is another key.
        let mut k2 = [0u8; 32];
        k2[31] = 1;
        assert!(a.put(4, &[0; 32], b"zero"));
        assert_eq!(a.get(4, &k2), None);
    }

    #[test]
    fn a_full_set_gives_its_oldest_slot_and_rewrites_keep_one_copy() {
        let (a, _) = pair();
        // Many more sessions than slots: the cache keeps working and keeps the newest.
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        let n = (SLOTS * 2) as u32;
        for i in 0..n {
            assert!(a.put(9, &key(i), &i.to_le_bytes()));
        }
        assert_eq!(a.get(9, &key(n - 1)), Some((n - 1).to_le_bytes().to_vec()));
        let found = (0..n).filter(|i| a.get(9, &key(*i)).is_some()).count();
        assert!(found <= SLOTS && found > SLOTS / 2, "{found}");
        // The same key written twice takes one slot, with the last value.
        assert!(a.put(10, &key(1), b"first"));
        assert!(a.put(10, &key(1), b"second"));
        assert_eq!(a.take(10, &key(1)).as_deref(), Some(&b"second"[..]));
        assert_eq!(a.get(10, &key(1)), None);
    }

    #[test]
    fn expired_sessions_are_not_resumed() {
        let (a, _) = pair();
        assert!(a.put(5, &[5; 32], b"old"));
        // Age the slot as if stored 10 minutes ago.
        let tag = tag(5, &[5; 32]);
        let slot = a
            .set(tag)
            .find(|s| s.tag.load(Ordering::Relaxed) == tag)
            .unwrap();
        slot.stamp
            .store(now_secs() - SESSION_TIMEOUT.as_secs(), Ordering::Relaxed);
        assert_eq!(a.get(5, &[5; 32]), None);
    }

    #[test]
    fn a_slot_left_held_by_a_dead_thread_is_taken_over() {
        let (a, _) = pair();
        let tag = tag(6, &[6; 32]);
        // Taken just now by a thread id no live thread has (pid_max is at most 2^22).
        for s in a.set(tag) {
            s.owner
                .store(owner_word((1 << 22) + 5, now_secs()), Ordering::Relaxed);
        }
        assert!(a.put(6, &[6; 32], b"taken over"));
        assert_eq!(a.get(6, &[6; 32]).as_deref(), Some(&b"taken over"[..]));
        // A slot held just now by a live thread (init's) is skipped, not stolen…
        for s in a.set(tag) {
            s.owner.store(owner_word(1, now_secs()), Ordering::Relaxed);
        }
        assert_eq!(a.get(6, &[6; 32]), None);
        assert!(!a.put(6, &[6; 32], b"x"));
        // …until its lease is over: a thread id given to another process since, a worker
        // that cannot be signalled.
        for s in a.set(tag) {
            let since = now_secs() - u64::from(LEASE_SECS);
            s.owner.store(owner_word(1, since), Ordering::Relaxed);
        }
        assert_eq!(a.get(6, &[6; 32]).as_deref(), Some(&b"taken over"[..]));
        // The slot taken over is given back after use.
        let free = a.set(tag).filter(|s| s.owner.load(Ordering::Relaxed) == 0);
        assert_eq!(free.count(), 1);
        // A hold that lost its slot to a takeover does not free the new holder's.
        let slot = a.set(tag).next().unwrap();
        let stalled = Held::take(slot).unwrap();
        let other = owner_word((1 << 22) + 6, now_secs());
        slot.owner.store(other, Ordering::Relaxed);
        drop(stalled);
        assert_eq!(slot.owner.load(Ordering::Relaxed), other);
        slot.owner.store(0, Ordering::Relaxed);
    }

    #[test]
    fn used_and_replaced_sessions_leave_nothing_of_their_secrets() {
        let shm = SessionShm::create().unwrap();
        let segment = || {
            // SAFETY: the mapping is TOTAL bytes long and lives as long as `shm`; the words
            // are read while no other thread writes them.
            unsafe { std::slice::from_raw_parts(shm.mapped.ptr(), TOTAL) }.to_vec()
        };
        let secret = [0xA5u8; 48];
        assert!(shm.put(1, &[3; 32], &secret));
        assert!(shm.take(1, &[3; 32]).is_some());
        assert!(!segment().windows(48).any(|w| w == secret), "taken");
        // A shorter value over a longer one leaves none of the longer one's tail.
        assert!(shm.put(2, &[4; 32], &secret));
        assert!(shm.put(2, &[4; 32], b"short"));
        assert!(
            !segment().windows(16).any(|w| w == &secret[..16]),
            "overwritten"
        );
        assert_eq!(shm.get(2, &[4; 32]).as_deref(), Some(&b"short"[..]));
    }

    #[test]
    fn ticket_keys_rotate_and_the_previous_is_kept_once() {
        let (a, b) = pair();
        let first = b.ticket_keys().unwrap();
        assert_eq!((first.epoch, first.previous), (1, None));
        a.rotate_ticket_keys().unwrap();
        let second = b.ticket_keys().unwrap();
        assert_eq!(second.epoch, 2);
        assert_eq!(second.previous, Some(first.current));
        assert_ne!(second.current, first.current);
        a.rotate_ticket_keys().unwrap();
        let third = b.ticket_keys().unwrap();
        assert_eq!(third.previous, Some(second.current));
        assert!(![third.current, third.previous.unwrap()].contains(&first.current));
        // Debug output never shows a key.
        assert_eq!(format!("{third:?}"), "TicketKeys { epoch: 3, .. }");
    }

    #[test]
    fn open_refuses_other_files() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(TOTAL as u64).unwrap();
        let err = SessionShm::open(OwnedFd::from(f)).unwrap_err();
        assert!(
            err.to_string().contains("not a TLS session segment"),
            "{err}"
        );
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        assert!(SessionShm::open(OwnedFd::from(f)).is_err());
    }
}
