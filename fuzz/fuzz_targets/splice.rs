//! `wasmgate_abi::splice`, the buffer edit behind `proxy_set_buffer_bytes`, against a
//! reference written independently with 128-bit arithmetic (no clamping shortcuts).
//!
//! `start` and `size` come from the plugin as u32 (the host casts them); the fuzzer also tries
//! full-width values. Buffers around the 64 MiB result cap are checked once per process over an
//! enumeration of edge cases (too slow to fuzz).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wasmgate_abi::{splice, Status, MAX_BUFFER as MAX_READ};

#[derive(Arbitrary, Debug)]
enum Pos {
    /// An offset from the start of the buffer, likely to land inside it.
    Small(u16),
    /// The buffer length plus a small signed offset.
    FromEnd(i8),
    /// What a plugin can pass: any u32.
    Wasm(u32),
    /// Any usize (the host never passes more than u32::MAX, but splice must not care).
    Any(u64),
}

impl Pos {
    fn resolve(&self, len: usize) -> usize {
        match *self {
            Pos::Small(n) => n as usize,
            Pos::FromEnd(d) => (len as i64 + d as i64).max(0) as usize,
            Pos::Wasm(n) => n as usize,
            Pos::Any(n) => n as usize,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    buf: Vec<u8>,
    start: Pos,
    size: Pos,
    data: Vec<u8>,
}

/// What the reference says `splice(buf, start, size, data)` must do to a buffer of `len` bytes:
/// `None` (BadArgument, buffer unchanged) or `Some((start, end, new_len))` for the result
/// `buf[..start] ++ data ++ buf[end..]`, a start past the end appending, a start inside the
/// buffer refused (Envoy's `copyFrom`). 128-bit arithmetic, so nothing can overflow.
fn reference(
    len: usize,
    start: usize,
    size: usize,
    data_len: usize,
) -> Option<(usize, usize, usize)> {
    if start > 0 && start < len {
        return None;
    }
    let len_w = len as u128;
    let start_w = (start as u128).min(len_w);
    let end = (start_w + size as u128).min(len_w);
    let new_len = len_w - (end - start_w) + data_len as u128;
    if new_len > MAX_READ as u128 {
        return None;
    }
    Some((start_w as usize, end as usize, new_len as usize))
}

/// Indices of `0..len` to compare: all of them for small buffers, otherwise windows around the
/// edges of the edit (a padded buffer is 64 MiB; comparing it all would make runs slow).
fn indices(len: usize, marks: &[usize]) -> Vec<usize> {
    if len <= 1 << 16 {
        return (0..len).collect();
    }
    let mut out: Vec<usize> = [0, len]
        .iter()
        .chain(marks)
        .flat_map(|&m| m.saturating_sub(300)..(m + 300).min(len))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Splices a buffer of `len` bytes (`prefix` then zeros) and checks the outcome.
fn check(prefix: &[u8], len: usize, start: usize, size: usize, data: &[u8]) {
    // calloc'd: the untouched pages of a 64 MiB buffer cost nothing.
    let mut buf = vec![0u8; len];
    buf[..prefix.len()].copy_from_slice(prefix);
    let orig = |i: usize| prefix.get(i).copied().unwrap_or(0);
    let status = splice(&mut buf, start, size, data);
    match reference(len, start, size, data.len()) {
        Some((start, end, new_len)) => {
            assert_eq!(status, Status::Ok, "len {len} start {start} size {size}");
            assert_eq!(buf.len(), new_len, "len {len} start {start} size {size}");
            let removed = end - start;
            for i in indices(new_len, &[start, start + data.len()]) {
                let want = if i < start {
                    orig(i)
                } else if i < start + data.len() {
                    data[i - start]
                } else {
                    orig(i - data.len() + removed)
                };
                assert!(
                    buf[i] == want,
                    "byte {i} differs (len {len} start {start} size {size})"
                );
            }
        }
        None => {
            assert_eq!(
                status,
                Status::BadArgument,
                "len {len} start {start} size {size}"
            );
            assert_eq!(buf.len(), len, "a refused splice changed the buffer");
            for i in indices(len, &[start.min(len)]) {
                assert!(buf[i] == orig(i), "a refused splice changed byte {i}");
            }
        }
    }
}

/// The cap, once per process: buffers around 64 MiB are too slow to fuzz (each run allocates
/// and moves 64 MiB under AddressSanitizer), so their edges are enumerated instead.
fn check_cap_edges() {
    for len in [MAX_READ - 1, MAX_READ, MAX_READ + 1] {
        for start in [0, len - 1, len, len + 1] {
            for size in [0, 1, usize::MAX] {
                for data_len in [0, 1, 2] {
                    check(b"head", len, start, size, &vec![0x5a; data_len]);
                }
            }
        }
    }
}

static CAP_EDGES: std::sync::Once = std::sync::Once::new();

fuzz_target!(|input: Input| {
    CAP_EDGES.call_once(check_cap_edges);
    let start = input.start.resolve(input.buf.len());
    let size = input.size.resolve(input.buf.len());
    check(&input.buf, input.buf.len(), start, size, &input.data);
});
