//! `wasmgate_abi::map::decode`: the Proxy-Wasm serialized header map a plugin hands to
//! `proxy_set_header_map_pairs` / `proxy_send_local_response`.
//!
//! Arbitrary bytes must decode or be refused, never panic or read out of bounds; a map that
//! decodes must re-encode to exactly the bytes it was read from (decode reads one map from the
//! front of the buffer), and the re-encoding must decode to the same pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate_abi::map::{decode, encode, MAX_PAIRS};

fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = decode(data) else {
        return;
    };
    assert!(pairs.len() <= MAX_PAIRS, "{} pairs accepted", pairs.len());
    if data.is_empty() {
        assert!(pairs.is_empty());
        return;
    }
    let enc = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    assert!(
        enc.len() <= data.len(),
        "re-encoding ({} bytes) is longer than the input ({} bytes)",
        enc.len(),
        data.len()
    );
    assert_eq!(
        &data[..enc.len()],
        &enc[..],
        "re-encoding differs from the input"
    );
    assert_eq!(
        decode(&enc).as_ref(),
        Ok(&pairs),
        "round trip changed the pairs"
    );
});
