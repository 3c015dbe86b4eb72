//! The Proxy-Wasm ABI's data formats, independent of any wasm engine: the status codes host
//! functions return, the serialized map (header maps, local-reply headers), and the buffer edit
//! behind `proxy_set_buffer_bytes`. Kept apart from the host (`wasmgate-wasm`) so that fuzz
//! targets and micro-benchmarks of this code build without wasmtime.

pub mod map;

/// Largest buffer a plugin can read or build in one call (a header set, a body, a local
/// reply): 64 MiB.
pub const MAX_BUFFER: usize = 64 << 20;

/// Proxy-Wasm status codes returned by host functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

/// Envoy's `copyFrom`: at start 0, replaces the first `size` bytes (clamped to the buffer)
/// with `data` — (0, 0) prepends, (0, len) replaces — and at a start at or past the end,
/// appends. A start inside the buffer is a BadArgument, as in Envoy (where the Rust SDK
/// panics on it: a plugin that relied on it here would fail there), and so is a result over
/// [`MAX_BUFFER`].
pub fn splice(buf: &mut Vec<u8>, start: usize, size: usize, data: &[u8]) -> Status {
    let (start, end) = match start {
        0 => (0, size.min(buf.len())),
        s if s >= buf.len() => (buf.len(), buf.len()),
        _ => return Status::BadArgument,
    };
    if buf.len() - (end - start) + data.len() > MAX_BUFFER {
        return Status::BadArgument;
    }
    buf.splice(start..end, data.iter().copied());
    Status::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_prepends_replaces_appends_and_refuses_the_middle() {
        let mut b = b"body".to_vec();
        assert_eq!(splice(&mut b, 0, 0, b">"), Status::Ok);
        assert_eq!(b, b">body");
        let len = b.len();
        assert_eq!(splice(&mut b, len, 0, b"<"), Status::Ok);
        assert_eq!(b, b">body<");
        assert_eq!(splice(&mut b, 0, usize::MAX, b"new"), Status::Ok);
        assert_eq!(b, b"new");
        assert_eq!(splice(&mut b, 40, 0, b"x"), Status::Ok);
        assert_eq!(b, b"newx");
        // Inside the buffer: refused, as Envoy refuses it.
        assert_eq!(splice(&mut b, 1, 1, b"y"), Status::BadArgument);
        assert_eq!(b, b"newx");
    }

    /// Arbitrary (start, size, data) never panics, and the result is the clamped splice.
    #[test]
    fn splice_with_arbitrary_arguments() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut buf: Vec<u8> = (0..next() % 40).map(|i| i as u8).collect();
            let start = match next() % 4 {
                0 => usize::MAX - (next() % 3) as usize,
                _ => (next() % 50) as usize,
            };
            let size = match next() % 4 {
                0 => usize::MAX,
                _ => (next() % 50) as usize,
            };
            let data: Vec<u8> = (0..next() % 8).map(|_| 0xAA).collect();
            let before = buf.clone();
            let status = splice(&mut buf, start, size, &data);
            if start > 0 && start < before.len() {
                assert_eq!((status, &buf), (Status::BadArgument, &before));
                continue;
            }
            let start = start.min(before.len());
            let end = start.saturating_add(size).min(before.len());
            let mut expect = before[..start].to_vec();
            expect.extend_from_slice(&data);
            expect.extend_from_slice(&before[end..]);
            assert_eq!((status, buf), (Status::Ok, expect));
        }
    }
}
