//! WASI preview1 functions of the host's own, in place of wasmtime-wasi's where those would
//! block: wasmtime-wasi's synchronous functions for files, streams and polling run their
//! asynchronous implementation with tokio's `block_on`, which panics inside the worker's
//! runtime. Toolchains call them on their own — Go's runtime checks stdin, stdout and stderr
//! with `fd_fdstat_get` as it starts, and prints a panic with `fd_write`; TinyGo, Rust's
//! `println!` and C's `printf` write there too — so a plugin built with them must find them
//! working.
//!
//! What a plugin gets is what proxy-wasm-cpp-host gives it: stdout and stderr go to the error
//! log (stdout at `info`, stderr at `error`, a line per line, under the plugin's log rate
//! limit; one write takes at most 64 KiB, in time linear in its bytes), stdin is empty, there
//! are no files or sockets (every other descriptor is `EBADF`), and `poll_oneoff` sleeps for
//! the shortest clock it is given, a little at a time, so that the callback's time limit still
//! ends a plugin that sleeps too long. The other WASI functions
//! (clocks, random numbers, arguments, environment, `proc_exit`) are wasmtime-wasi's.

use crate::abi::{memory, stub, write};
use crate::state::HostState;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wasmtime::{Caller, Linker, Val, ValType};

type C<'a> = Caller<'a, HostState>;

/// WASI errno values.
const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const FAULT: i32 = 21;
const INVAL: i32 = 28;
const NOTSOCK: i32 = 57;
const NOTSUP: i32 = 58;
const SPIPE: i32 = 70;

/// WASI `filetype.character_device`: what stdin, stdout and stderr are.
const CHARACTER_DEVICE: u8 = 2;
/// Rights of the standard descriptors: `fd_read` or `fd_write`, `fd_fdstat_set_flags`,
/// `poll_fd_readwrite`.
const RIGHT_READ: u64 = 1 << 1;
const RIGHT_SET_FLAGS: u64 = 1 << 3;
const RIGHT_WRITE: u64 = 1 << 6;
const RIGHT_POLL: u64 = 1 << 27;

/// Longest line kept from stdout or stderr before it is logged as it is.
pub const MAX_LINE: usize = 4096;
/// Most buffers one `fd_write` may gather (POSIX's `IOV_MAX`).
const MAX_IOVS: usize = 1024;
/// Most bytes one `fd_write` takes: a larger write is taken in part (the count written says
/// how much, as POSIX allows), and the guest writes the rest with further calls, between
/// which the callback's time limit is checked.
const MAX_WRITE: usize = 64 * 1024;
/// Most subscriptions one `poll_oneoff` may pass.
const MAX_SUBSCRIPTIONS: usize = 64;
/// Longest sleep of one `poll_oneoff`: a longer one wakes early (the guest's runtime sleeps
/// again), so that the callback's time limit is checked between sleeps.
const MAX_SLEEP: Duration = Duration::from_millis(10);

/// The monotonic clock WASI gives the plugin, nanoseconds since the instance began: the
/// host's own, so that `poll_oneoff` can tell how far an absolute time on it is.
#[derive(Clone, Copy)]
pub struct Monotonic(pub Instant);

impl wasmtime_wasi::HostMonotonicClock for Monotonic {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What a plugin wrote to stdout or stderr and has not ended with a newline yet.
#[derive(Default)]
pub struct Stdio {
    out: Vec<u8>,
    err: Vec<u8>,
}

impl Stdio {
    /// Appends `bytes` written to `fd` (1 or 2) and logs every line they complete. Linear in
    /// the bytes: the lines are found in what was written, and only an unfinished tail (under
    /// [`MAX_LINE`]) is kept.
    fn write(&mut self, fd: i32, bytes: &[u8], log: &impl Fn(i32, &[u8])) {
        let (buf, level) = match fd {
            1 => (&mut self.out, LEVEL_OUT),
            _ => (&mut self.err, LEVEL_ERR),
        };
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            let (line, after) = (&rest[..end], &rest[end + 1..]);
            if buf.is_empty() {
                log_cut(level, line, log);
            } else {
                buf.extend_from_slice(line);
                log_cut(level, buf, log);
                buf.clear();
            }
            rest = after;
        }
        buf.extend_from_slice(rest);
        if buf.len() >= MAX_LINE {
            let whole = buf.len() - buf.len() % MAX_LINE;
            log_cut(level, &buf[..whole], log);
            buf.drain(..whole);
        }
    }

    /// Whether a line is waiting for its end.
    pub fn pending(&self) -> bool {
        !self.out.is_empty() || !self.err.is_empty()
    }

    /// Logs what is waiting: a callback's output does not wait for the next one's newline.
    pub fn flush(&mut self, log: &impl Fn(i32, &[u8])) {
        for (buf, level) in [(&mut self.out, LEVEL_OUT), (&mut self.err, LEVEL_ERR)] {
            if !buf.is_empty() {
                log_cut(level, buf, log);
                buf.clear();
            }
        }
    }
}

/// Logs `line`, in pieces of at most [`MAX_LINE`] bytes.
fn log_cut(level: i32, line: &[u8], log: &impl Fn(i32, &[u8])) {
    if line.is_empty() {
        return log(level, line);
    }
    for piece in line.chunks(MAX_LINE) {
        log(level, piece);
    }
}

/// Proxy-Wasm log levels of the two streams (as proxy-wasm-cpp-host logs them).
const LEVEL_OUT: i32 = 2;
const LEVEL_ERR: i32 = 4;

/// Registers the host's own functions under `wasi_snapshot_preview1`, over wasmtime-wasi's.
pub fn shadow(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const M: &str = "wasi_snapshot_preview1";
    l.allow_shadowing(true);
    l.func_wrap(M, "fd_write", fd_write)?;
    l.func_wrap(
        M,
        "fd_read",
        |mut c: C<'_>, fd: i32, _iovs: i32, _n: i32, nread: i32| {
            // stdin is empty: end of file at once.
            match fd {
                0 => store_u32(&mut c, nread, 0),
                _ => BADF,
            }
        },
    )?;
    l.func_wrap(M, "fd_fdstat_get", |mut c: C<'_>, fd: i32, out: i32| {
        let rights = match fd {
            0 => RIGHT_READ,
            1 | 2 => RIGHT_WRITE,
            _ => return BADF,
        } | RIGHT_SET_FLAGS
            | RIGHT_POLL;
        let mut stat = [0u8; 24];
        stat[0] = CHARACTER_DEVICE;
        stat[8..16].copy_from_slice(&rights.to_le_bytes());
        store(&mut c, out, &stat)
    })?;
    l.func_wrap(M, "fd_filestat_get", |mut c: C<'_>, fd: i32, out: i32| {
        filestat(&mut c, fd, out, 64)
    })?;
    l.func_wrap(M, "fd_close", |_c: C<'_>, fd: i32| stdio_only(fd))?;
    // Taken and ignored for the standard descriptors (Go sets them non-blocking).
    l.func_wrap(
        M,
        "fd_fdstat_set_flags",
        |_c: C<'_>, fd: i32, _flags: i32| stdio_only(fd),
    )?;
    l.func_wrap(M, "poll_oneoff", poll_oneoff)?;
    refuse_the_rest(l, M)?;
    l.allow_shadowing(false);
    Ok(())
}

/// Under `wasi_unstable`, after the preview1 functions were aliased there: the two whose
/// structures preview0 lays out otherwise (its `filestat` is 56 bytes, its clock subscription
/// has an identifier first).
pub fn shadow_unstable(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const M: &str = "wasi_unstable";
    l.allow_shadowing(true);
    l.func_wrap(M, "fd_filestat_get", |mut c: C<'_>, fd: i32, out: i32| {
        filestat(&mut c, fd, out, 56)
    })?;
    l.func_wrap(
        M,
        "poll_oneoff",
        |c: C<'_>, s: i32, e: i32, n: i32, ne: i32| poll(c, &PREVIEW0, (s, e, n, ne)),
    )?;
    l.allow_shadowing(false);
    Ok(())
}

/// A standard descriptor's `filestat` (`size` bytes: 64 in preview1, 56 in preview0; the file
/// type at 16 in both): a character device, nothing else known.
fn filestat(c: &mut C<'_>, fd: i32, out: i32, size: usize) -> i32 {
    if !is_stdio(fd) {
        return BADF;
    }
    let mut stat = [0u8; 64];
    stat[16] = CHARACTER_DEVICE;
    store(c, out, &stat[..size])
}

fn is_stdio(fd: i32) -> bool {
    (0..=2).contains(&fd)
}

/// SUCCESS for a standard descriptor (the call is taken, nothing to do), EBADF for another.
fn stdio_only(fd: i32) -> i32 {
    match is_stdio(fd) {
        true => SUCCESS,
        false => BADF,
    }
}

/// Writes `bytes` at `ptr` in guest memory: SUCCESS, or FAULT outside it.
fn store(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> i32 {
    match write(c, ptr, bytes) {
        Ok(()) => SUCCESS,
        Err(_) => FAULT,
    }
}

fn store_u32(c: &mut C<'_>, ptr: i32, v: u32) -> i32 {
    store(c, ptr, &v.to_le_bytes())
}

/// Reads a little-endian integer of `N` bytes at `at` of `mem`.
fn le<const N: usize>(mem: &[u8], at: usize) -> Option<[u8; N]> {
    mem.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// stdout and stderr to the error log; anything else has no file behind it.
fn fd_write(mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32) -> i32 {
    if fd != 1 && fd != 2 {
        return BADF;
    }
    let Some(m) = memory(&mut c) else {
        return FAULT;
    };
    let n = n as u32 as usize;
    if n > MAX_IOVS {
        return INVAL;
    }
    // The count's place first: nothing is logged for a write that will answer EFAULT (a
    // guest retrying it would log it twice).
    if store_u32(&mut c, written, 0) != SUCCESS {
        return FAULT;
    }
    let (mem, state) = m.data_and_store_mut(&mut c);
    // Checked whole before any of it is taken.
    let mut parts = Vec::with_capacity(n.min(16));
    for i in 0..n {
        let at = iovs as u32 as usize + i * 8;
        let (Some(buf), Some(len)) = (le::<4>(mem, at), le::<4>(mem, at + 4)) else {
            return FAULT;
        };
        let (buf, len) = (
            u32::from_le_bytes(buf) as usize,
            u32::from_le_bytes(len) as usize,
        );
        match buf.checked_add(len) {
            Some(end) if end <= mem.len() => parts.push((buf, len)),
            _ => return FAULT,
        }
    }
    let mut total = 0usize;
    for (buf, len) in parts {
        let take = len.min(MAX_WRITE - total);
        let (stdio, log) = state.stdio_and_log();
        stdio.write(fd, &mem[buf..buf + take], &log);
        total += take;
        if total == MAX_WRITE {
            break;
        }
    }
    store_u32(&mut c, written, total as u32)
}

/// Where a clock subscription's fields lie: preview1 (`wasi_snapshot_preview1`) and the older
/// `wasi_unstable` differ (the latter has an identifier before the clock id). Events are laid
/// out alike in both.
struct Layout {
    size: usize,
    clock_id: usize,
    timeout: usize,
    flags: usize,
}

const PREVIEW1: Layout = Layout {
    size: 48,
    clock_id: 16,
    timeout: 24,
    flags: 40,
};
const PREVIEW0: Layout = Layout {
    size: 56,
    clock_id: 24,
    timeout: 32,
    flags: 48,
};
const EVENT: usize = 32;
const TAG_CLOCK: u8 = 0;
const TAG_FD_WRITE: u8 = 2;
const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;
const SUBSCRIPTION_CLOCK_ABSTIME: u16 = 1;
const EVENT_FD_READWRITE_HANGUP: u16 = 1;

/// Descriptors are ready at once (stdin at its end, stdout and stderr writable, others
/// `EBADF`); with clocks alone, sleeps until the first of them (at most [`MAX_SLEEP`]) and
/// reports it.
fn poll_oneoff(c: C<'_>, subs: i32, events: i32, n: i32, nevents: i32) -> i32 {
    poll(c, &PREVIEW1, (subs, events, n, nevents))
}

/// [`poll_oneoff`] with the subscriptions laid out as `layout` says.
fn poll(mut c: C<'_>, layout: &Layout, (subs, events, n, nevents): (i32, i32, i32, i32)) -> i32 {
    let n = n as u32 as usize;
    if n == 0 || n > MAX_SUBSCRIPTIONS {
        return INVAL;
    }
    let Some(m) = memory(&mut c) else {
        return FAULT;
    };
    let origin = c.data().monotonic.0;
    let mem = m.data(&c);
    let mut out: Vec<[u8; EVENT]> = Vec::new();
    let mut first_clock: Option<(Duration, u64)> = None;
    for i in 0..n {
        let at = subs as u32 as usize + i * layout.size;
        let Some(sub) = mem.get(at..at + layout.size) else {
            return FAULT;
        };
        // Within the subscription read: every field is there.
        let field = |at: usize| le::<8>(sub, at).map_or(0, u64::from_le_bytes);
        let userdata = field(0);
        let tag = sub[8];
        if tag > TAG_FD_WRITE {
            return INVAL;
        }
        if tag == TAG_CLOCK {
            let id = field(layout.clock_id) as u32;
            let timeout = field(layout.timeout);
            let flags = field(layout.flags) as u16;
            let Some(wait) = clock_wait(id, timeout, flags, origin) else {
                return INVAL;
            };
            match first_clock {
                Some((first, _)) if first <= wait => {}
                _ => first_clock = Some((wait, userdata)),
            }
            continue;
        }
        let fd = field(16) as u32 as i32;
        let mut event = [0u8; EVENT];
        event[0..8].copy_from_slice(&userdata.to_le_bytes());
        event[10] = tag;
        let error = match (fd, tag) {
            // stdin read: at its end.
            (0, 1) => {
                event[24..26].copy_from_slice(&EVENT_FD_READWRITE_HANGUP.to_le_bytes());
                0
            }
            (1 | 2, 2) => 0,
            _ => BADF as u16,
        };
        event[8..10].copy_from_slice(&error.to_le_bytes());
        out.push(event);
    }
    if out.is_empty() {
        let Some((wait, userdata)) = first_clock else {
            return INVAL;
        };
        std::thread::sleep(wait.min(MAX_SLEEP));
        let mut event = [0u8; EVENT];
        event[0..8].copy_from_slice(&userdata.to_le_bytes());
        event[10] = TAG_CLOCK;
        out.push(event);
    }
    let bytes: Vec<u8> = out.concat();
    match store(&mut c, events, &bytes) {
        SUCCESS => store_u32(&mut c, nevents, out.len() as u32),
        e => e,
    }
}

/// How long until a clock subscription's time: relative, or absolute on the realtime clock or
/// on the monotonic one (which began at `origin`); None for another clock (the process and
/// thread CPU clocks, which WASI does not give), as wasmtime-wasi answers.
fn clock_wait(id: u32, timeout: u64, flags: u16, origin: Instant) -> Option<Duration> {
    if id != CLOCK_REALTIME && id != CLOCK_MONOTONIC {
        return None;
    }
    let at = Duration::from_nanos(timeout);
    if flags & SUBSCRIPTION_CLOCK_ABSTIME == 0 {
        return Some(at);
    }
    let now = match id {
        CLOCK_REALTIME => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
        _ => origin.elapsed(),
    };
    Some(at.saturating_sub(now))
}

/// The other functions wasmtime-wasi would run through tokio (and its sockets, which log at
/// every call): there are no files, so `EBADF` for any descriptor (no directory is
/// preopened: every `path_*` call names one that does not exist), and for stdin, stdout and
/// stderr what a terminal answers (`ESPIPE` to a seek, `ENOTSOCK` to a socket call,
/// `ENOTSUP` to the rest).
fn refuse_the_rest(l: &mut Linker<HostState>, module: &str) -> wasmtime::Result<()> {
    use ValType::{I32 as I, I64 as L};
    let fd_calls: [(&str, &[ValType], i32); 14] = [
        ("fd_seek", &[I, L, I, I], SPIPE),
        ("fd_pread", &[I, I, I, L, I], SPIPE),
        ("fd_pwrite", &[I, I, I, L, I], SPIPE),
        ("fd_advise", &[I, L, L, I], NOTSUP),
        ("fd_datasync", &[I], NOTSUP),
        ("fd_sync", &[I], NOTSUP),
        ("fd_filestat_set_size", &[I, L], NOTSUP),
        ("fd_filestat_set_times", &[I, L, L, I], NOTSUP),
        ("fd_readdir", &[I, I, I, L, I], NOTSUP),
        ("fd_renumber", &[I, I], NOTSUP),
        // wasmtime-wasi's log a warning at each call, past the plugin's log budget.
        ("sock_accept", &[I, I, I], NOTSOCK),
        ("sock_recv", &[I, I, I, I, I, I], NOTSOCK),
        ("sock_send", &[I, I, I, I, I], NOTSOCK),
        ("sock_shutdown", &[I, I], NOTSOCK),
    ];
    for (name, params, stdio) in fd_calls {
        stub(l, module, name, params, move |args| {
            match args.first().and_then(Val::i32).is_some_and(is_stdio) {
                true => stdio,
                false => BADF,
            }
        })?;
    }
    let path_calls: [(&str, &[ValType]); 10] = [
        ("path_create_directory", &[I, I, I]),
        ("path_filestat_get", &[I, I, I, I, I]),
        ("path_filestat_set_times", &[I, I, I, I, L, L, I]),
        ("path_link", &[I, I, I, I, I, I, I]),
        ("path_open", &[I, I, I, I, I, L, L, I, I]),
        ("path_readlink", &[I, I, I, I, I, I]),
        ("path_remove_directory", &[I, I, I]),
        ("path_rename", &[I, I, I, I, I, I]),
        ("path_symlink", &[I, I, I, I, I]),
        ("path_unlink_file", &[I, I, I]),
    ];
    for (name, params) in path_calls {
        stub(l, module, name, params, |_| BADF)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn output_is_logged_a_line_at_a_time() {
        let lines = RefCell::new(Vec::new());
        let log = |level: i32, text: &[u8]| {
            lines
                .borrow_mut()
                .push((level, String::from_utf8_lossy(text).into_owned()))
        };
        let mut s = Stdio::default();
        s.write(1, b"hello, ", &log);
        s.write(2, b"panic: boom\n\ngoroutine 1", &log);
        s.write(1, b"world\nnext", &log);
        assert!(s.pending());
        s.flush(&log);
        assert!(!s.pending());
        assert_eq!(
            lines.into_inner(),
            [
                (LEVEL_ERR, "panic: boom".to_string()),
                (LEVEL_ERR, String::new()),
                (LEVEL_OUT, "hello, world".to_string()),
                (LEVEL_OUT, "next".to_string()),
                (LEVEL_ERR, "goroutine 1".to_string()),
            ]
        );
    }

    #[test]
    fn a_line_without_end_is_cut_at_its_limit() {
        let count = RefCell::new(0);
        let log = |_: i32, text: &[u8]| {
            assert!(text.len() <= MAX_LINE);
            *count.borrow_mut() += 1;
        };
        let mut s = Stdio::default();
        for _ in 0..3 {
            s.write(1, &[b'x'; MAX_LINE / 2 + 1], &log);
        }
        assert_eq!(*count.borrow(), 1);
        assert!(s.pending());
    }

    #[test]
    fn clock_waits_are_relative_or_absolute_on_either_clock() {
        let origin = Instant::now() - Duration::from_secs(1);
        let abs = SUBSCRIPTION_CLOCK_ABSTIME;
        assert_eq!(
            clock_wait(1, 5_000_000, 0, origin),
            Some(Duration::from_millis(5))
        );
        // Monotonic, 1 s after the origin: passed already; 61 s after it: about 60 s away.
        assert_eq!(
            clock_wait(1, 500_000_000, abs, origin),
            Some(Duration::ZERO)
        );
        let wait = clock_wait(1, 61_000_000_000, abs, origin).unwrap();
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60));
        let soon = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(60);
        let wait = clock_wait(0, soon.as_nanos() as u64, abs, origin).unwrap();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert_eq!(clock_wait(2, 1, 0, origin), None);
    }
}
