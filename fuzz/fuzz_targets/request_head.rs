//! `wasmgate_http1`: request heads as a client sends them (`request::parse_head`), then each
//! request's body read out of the same buffer with the framing the head gave (`codec::decode`),
//! then the next pipelined head, as the worker's server does.
//!
//! The first byte picks the head size limit. Besides "no panic":
//! - a head is taken off the buffer only whole: every shorter prefix of it parses as
//!   incomplete (or too large, past the limit), never as another head;
//! - an accepted head was at most the limit, says its size as received, says whether its
//!   `Connection` header names fields (none is left once those are stripped), has one way to delimit its body (never both
//!   `Content-Length` and `Transfer-Encoding`), and its `Content-Length` says what the framing
//!   says;
//! - a body's data is never more than its `Content-Length`; the buffer only shrinks;
//! - an accepted head has one `Host` (none only in HTTP/1.0), the target's when the target
//!   names one, and says what a look at it finds (`request::host_seen`);
//! - its path as routes match it (`request::normalized_path`) starts with `/` and has no
//!   empty, `.` or `..` segment left, and normalizing it again changes nothing.
#![no_main]

use bytes::BytesMut;
use http::header;
use libfuzzer_sys::fuzz_target;
use wasmgate_http1::codec::{decode, kept_when_named, strip_nominated, Decoded, Framing};
use wasmgate_http1::request::{host_seen, normalized_path, parse_head, Refusal};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, wire)) = data.split_first() else {
        return;
    };
    let max = 64 + limit as usize * 32;
    let mut buf = BytesMut::from(wire);
    for _ in 0..16 {
        let before = buf.clone();
        let head = match parse_head(&mut buf, max) {
            Ok(Some(head)) => head,
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete head is left in place");
                return;
            }
            Err(Refusal::UriTooLong) => {
                // Only a request line that alone is over the limit.
                let line = before.iter().position(|&b| b == b'\n');
                assert!(line.unwrap_or(before.len()) >= max, "414 for a short line");
                return;
            }
            Err(Refusal::TooLarge | Refusal::Bad(_) | Refusal::Unsupported(_)) => return,
        };
        let used = before.len() - buf.len();
        assert!(used > 0 && used <= max, "head of {used} bytes, limit {max}");
        for cut in [used - 1, used / 2, 1] {
            let mut prefix = BytesMut::from(&before[..cut]);
            match parse_head(&mut prefix, max) {
                Ok(Some(_)) => panic!("a prefix of {cut} of {used} bytes parsed as a head"),
                Ok(None) | Err(_) => {}
            }
        }
        assert_eq!(
            head.seen.size as usize, used,
            "the head's size is its bytes as received"
        );
        // Once the fields its `Connection` header names are stripped, as the proxy strips
        // them when the head says so, none is left but those the proxy keeps or handles
        // itself (`close` is an option, not a field's name).
        let mut stripped = head.headers.clone();
        if head.seen.nominates {
            strip_nominated(&mut stripped);
        }
        for v in stripped.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if let Ok(n) = header::HeaderName::from_bytes(t) {
                    assert!(
                        n == "close" || kept_when_named(&n) || !stripped.contains_key(&n),
                        "{n} named by Connection and kept"
                    );
                }
            }
        }
        // What the parser says of the `Host` is what a look at the map's finds.
        let host = head.headers.get(header::HOST);
        assert_eq!(head.seen.host, host.and_then(|v| host_seen(v.as_bytes())));
        assert_eq!(head.seen.host.is_some(), host.is_some());
        if let Some(authority) = head.uri.authority() {
            assert_eq!(
                head.headers[header::HOST],
                authority.as_str(),
                "Host is the target's"
            );
        }
        // `*` (OPTIONS) is no path to resolve.
        let resolved = match head.uri.path().starts_with('/') {
            true => normalized_path(head.uri.path()).ok(),
            false => None,
        };
        if let Some(path) = resolved {
            assert!(path.starts_with('/'), "{path:?}");
            let segments: Vec<&str> = path[1..].split('/').collect();
            let last = segments.len() - 1;
            for (i, s) in segments.iter().enumerate() {
                assert!(*s != "." && *s != "..", "{path:?}");
                assert!(!s.is_empty() || i == last, "{path:?}");
            }
            if !path.contains('%') {
                assert_eq!(normalized_path(&path).as_deref(), Ok(&*path), "idempotent");
            }
        }
        let length = head.headers.get(header::CONTENT_LENGTH);
        assert!(
            length.is_none() || !head.headers.contains_key(header::TRANSFER_ENCODING),
            "both delimiters accepted"
        );
        let declared = length.map(|v| v.to_str().unwrap().trim().parse::<u64>().unwrap());
        match head.framing {
            Framing::Length(n) => assert_eq!(declared, Some(n)),
            Framing::Empty => assert!(declared.unwrap_or(0) == 0),
            Framing::Chunked(_) => assert_eq!(declared, None),
            Framing::Close => panic!("a request read to the close"),
        }
        let mut framing = head.framing;
        let mut body = 0u64;
        loop {
            let len = buf.len();
            match decode(&mut buf, &mut framing) {
                Ok(Decoded::Data(d)) => body += d.len() as u64,
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::End) => break,
                Ok(Decoded::More) | Err(_) => return,
            }
            assert!(buf.len() <= len);
            if let Some(n) = declared {
                assert!(body <= n, "{body} bytes of a body of {n}");
            }
        }
    }
});
