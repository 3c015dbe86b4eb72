//! The Proxy-Wasm serialized map format (header maps, `proxy_send_local_response` headers,
//! `proxy_set_header_map_pairs`):
//!
//! ```text
//! u32 count | count × (u32 key_len, u32 value_len) | count × (key bytes, 0, value bytes, 0)
//! ```
//!
//! all integers little-endian. Decoding never trusts a length: every size is checked against the
//! buffer, so malformed input is an error, never a panic or an out-of-bounds read.

/// A header list in order, with names as given (lower-case for HTTP/1.1 by convention).
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Most pairs accepted in one map (a plugin asking for more is answered BadArgument).
pub const MAX_PAIRS: usize = 10_000;

/// Size of [`encode`]'s output for `pairs`.
pub fn encoded_len<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    4 + pairs.map(|(k, v)| 8 + k.len() + v.len() + 2).sum::<usize>()
}

/// Serializes pairs.
pub fn encode<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone) -> Vec<u8> {
    let mut out = vec![0; encoded_len(pairs.clone())];
    encode_into(&mut out, || pairs.clone());
    out
}

/// Serializes into `out` (which should be [`encoded_len`] bytes; `pairs()` is called three
/// times) and returns the bytes written — straight into a plugin's memory, without a buffer of
/// the host's. Never writes past `out`: what does not fit is left out, so the written count
/// tells a short buffer.
pub fn encode_into<'a, I: Iterator<Item = (&'a str, &'a [u8])>>(
    out: &mut [u8],
    pairs: impl Fn() -> I,
) -> usize {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        if let Some(dst) = out.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
            at += bytes.len();
        }
    };
    put(&(pairs().count() as u32).to_le_bytes());
    for (k, v) in pairs() {
        put(&(k.len() as u32).to_le_bytes());
        put(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs() {
        put(k.as_bytes());
        put(&[0]);
        put(v);
        put(&[0]);
    }
    at
}

/// Why a serialized map was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedMap(pub &'static str);

fn u32_at(buf: &[u8], at: usize) -> Result<usize, MalformedMap> {
    let b = buf.get(at..at + 4).ok_or(MalformedMap("truncated"))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Deserializes pairs; keys must be UTF-8.
pub fn decode(buf: &[u8]) -> Result<Pairs, MalformedMap> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let count = u32_at(buf, 0)?;
    if count > MAX_PAIRS {
        return Err(MalformedMap("too many pairs"));
    }
    let sizes_end = 4usize
        .checked_add(count.checked_mul(8).ok_or(MalformedMap("overflow"))?)
        .ok_or(MalformedMap("overflow"))?;
    if sizes_end > buf.len() {
        return Err(MalformedMap("truncated size table"));
    }
    let mut pos = sizes_end;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let klen = u32_at(buf, 4 + i * 8)?;
        let vlen = u32_at(buf, 8 + i * 8)?;
        let key = take(buf, &mut pos, klen)?;
        let value = take(buf, &mut pos, vlen)?;
        let key = std::str::from_utf8(key).map_err(|_| MalformedMap("key is not UTF-8"))?;
        out.push((key.to_string(), value.to_vec()));
    }
    Ok(out)
}

/// Takes `len` bytes then a NUL terminator.
fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], MalformedMap> {
    let end = pos.checked_add(len).ok_or(MalformedMap("overflow"))?;
    let bytes = buf.get(*pos..end).ok_or(MalformedMap("truncated data"))?;
    if buf.get(end) != Some(&0) {
        return Err(MalformedMap("missing NUL terminator"));
    }
    *pos = end + 1;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let pairs = vec![
            (":method".to_string(), b"GET".to_vec()),
            ("x".to_string(), Vec::new()),
        ];
        let enc = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        assert_eq!(decode(&enc).unwrap(), pairs);
        assert_eq!(decode(&[]).unwrap(), Vec::new());
        let it = || pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        assert_eq!(encoded_len(it()), enc.len());
        let mut exact = vec![0; enc.len()];
        assert_eq!(encode_into(&mut exact, it), enc.len());
        assert_eq!(exact, enc);
    }

    #[test]
    fn encoding_into_a_short_buffer_stops_at_its_end() {
        let pairs = [("key".to_string(), b"value".to_vec())];
        let it = || pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        for len in 0..encoded_len(it()) {
            let mut short = vec![0; len];
            assert!(encode_into(&mut short, it) <= len);
        }
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let pairs = [("key".to_string(), b"value".to_vec())];
        let enc = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        for cut in 1..enc.len() {
            assert!(decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] = b'x';
        assert!(decode(&bad).is_err());
        // Sizes claiming 4 GiB.
        let mut huge = vec![1, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }

    /// Every prefix and every single-byte corruption of a valid map decodes or errors cleanly.
    #[test]
    fn exhaustive_corruption_never_panics() {
        let pairs: Vec<_> = (0..5).map(|i| (format!("k{i}"), vec![b'v'; i])).collect();
        let enc = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        for i in 0..enc.len() {
            for b in [0u8, 1, 0x7f, 0xff] {
                let mut c = enc.clone();
                c[i] = b;
                let _ = decode(&c);
            }
        }
    }
}
