//! `proxy_get_property`: Envoy's attribute names, the plugin's own names, and — through the
//! gateway's [`Properties`](crate::state::Properties) — APISIX's nginx variables.

use crate::head::{Head, HeaderList};
use crate::state::{HostState, Stream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A property's value: borrowed from the host state where it lives there (the answer is then
/// copied once, straight into the plugin's memory), or made for the call.
pub enum Found<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Found<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Found::Borrowed(b) => b,
            Found::Owned(v) => v,
        }
    }
}

/// Whether `key` (a property a plugin set, dot-separated) is `path` joined with dots.
fn is_joined(key: &str, path: &[&str]) -> bool {
    let mut rest = key;
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            let Some(r) = rest.strip_prefix('.') else {
                return false;
            };
            rest = r;
        }
        let Some(r) = rest.strip_prefix(segment) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// `:path` up to the query.
fn url_path(p: &[u8]) -> &[u8] {
    p.split(|b| *b == b'?').next().unwrap_or(&[])
}

/// `:path` after the `?`; empty without one.
fn query(p: &[u8]) -> &[u8] {
    match p.iter().position(|b| *b == b'?') {
        Some(i) => &p[i + 1..],
        None => &[],
    }
}

/// Envoy's integers (and its timestamps and durations, in nanoseconds): 8 bytes,
/// little-endian.
fn int(n: i64) -> Option<Found<'static>> {
    Some(Found::Owned(n.to_le_bytes().to_vec()))
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Connection, timing and size attributes (Envoy's names); the sizes and the duration only
/// once the request is over, in `proxy_on_log`, as Envoy has them.
fn fact<'a>(stream: &'a Stream, path: &[&str]) -> Option<Found<'a>> {
    let from = &stream.downstream;
    let totals = stream.totals.as_ref();
    match path {
        ["source", "address"] => Some(Found::Owned(from.peer.to_string().into_bytes())),
        ["source", "port"] => int(from.peer.port().into()),
        ["destination", "address"] => Some(Found::Owned(from.local.to_string().into_bytes())),
        ["destination", "port"] => int(from.local.port().into()),
        // A uint64 in Envoy: the same 8 bytes.
        ["connection", "id"] => Some(Found::Owned(from.connection.to_le_bytes().to_vec())),
        // A bool is one byte; listeners speak plain HTTP.
        ["connection", "mtls"] => Some(Found::Borrowed(&[0])),
        ["request", "time"] => {
            let at = match stream.wall_start.get() {
                Some(at) => at,
                None => {
                    let at = SystemTime::now().checked_sub(from.started.elapsed())?;
                    stream.wall_start.set(Some(at));
                    at
                }
            };
            int(nanos(at.duration_since(UNIX_EPOCH).ok()?))
        }
        ["request", "duration"] => int(nanos(totals?.duration)),
        // Envoy's rule: the declared length, else the bytes received.
        ["request", "size"] => match stream.request.get("content-length") {
            Some(v) => int(std::str::from_utf8(v).ok()?.trim().parse().ok()?),
            None => int(totals?.request_body as i64),
        },
        ["request", "total_size"] => int(totals?.request_total as i64),
        ["response", "size"] => int(totals?.response_body as i64),
        ["response", "total_size"] => {
            let head = stream.response.as_ref().map_or(0, |r| r.byte_size());
            int(totals?.response_body as i64 + head as i64)
        }
        ["upstream", "address"] => Some(Found::Borrowed(stream.upstream.as_deref()?.as_bytes())),
        ["upstream", "port"] => {
            let (_, port) = stream.upstream.as_deref()?.rsplit_once(':')?;
            int(port.parse().ok()?)
        }
        _ => None,
    }
}

/// A header's value as Envoy's attribute gives it: every value of the name, joined with `,`
/// (`x-forwarded-for` sent twice reads whole). Borrowed when there is one.
fn header<'a>(head: &'a Head, name: &str) -> Option<Found<'a>> {
    let mut values = head.get_all(name);
    let first = match name.starts_with(':') {
        true => return head.get(name).map(Found::Borrowed),
        false => values.next()?,
    };
    let Some(second) = values.next() else {
        return Some(Found::Borrowed(first));
    };
    let mut joined = [first, second].join(&b","[..]);
    for v in values {
        joined.push(b',');
        joined.extend_from_slice(v);
    }
    Some(Found::Owned(joined))
}

/// The value of a property path, or None (NotFound).
pub fn lookup<'a>(s: &'a HostState, path: &[&str]) -> Option<Found<'a>> {
    match path {
        ["plugin_name"] | ["plugin_vm_id"] => {
            return Some(Found::Borrowed(s.plugin_name.as_bytes()))
        }
        ["plugin_root_id"] => return Some(Found::Borrowed(s.root_id.as_bytes())),
        _ => {}
    }
    let stream = s.stream.as_ref()?;
    let req: &Head = &stream.request;
    let value = match path {
        ["request", "path"] => req.get(":path"),
        ["request", "url_path"] => req.get(":path").map(url_path),
        ["request", "query"] => req.get(":path").map(query),
        ["request", "method"] => req.get(":method"),
        ["request", "id"] => req.get("x-request-id"),
        ["request", "host"] => req.get(":authority"),
        ["request", "scheme"] => req.get(":scheme"),
        ["request", "headers", name] => return header(req, name),
        ["request", "referer"] => req.get("referer"),
        ["request", "useragent"] => req.get("user-agent"),
        // Envoy's integers are 8 bytes, little-endian (what its SDK users decode).
        ["response", "code"] => {
            let status = stream.response.as_ref().and_then(|r| r.get(":status"))?;
            let code: i64 = std::str::from_utf8(status).ok()?.parse().ok()?;
            return Some(Found::Owned(code.to_le_bytes().to_vec()));
        }
        ["response", "headers", name] => return header(stream.response.as_ref()?, name),
        _ => None,
    };
    if let Some(v) = value {
        return Some(Found::Borrowed(v));
    }
    if let Some(v) = fact(stream, path) {
        return Some(v);
    }
    // The host's own names first: a plugin's `proxy_set_property` cannot forge them (Envoy
    // keeps set values apart, under `wasm.`).
    if let Some(v) = stream.props.get(path, req, &stream.downstream) {
        return Some(Found::Owned(v));
    }
    stream
        .set_props
        .iter()
        .find(|(k, _)| is_joined(k, path))
        .map(|(_, v)| Found::Borrowed(v.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_property_keys_match_their_path_joined_with_dots() {
        assert!(is_joined("a.b.c", &["a", "b", "c"]));
        assert!(is_joined("plain", &["plain"]));
        assert!(!is_joined("a.b", &["a", "b", "c"]));
        assert!(!is_joined("a.b.c", &["a", "b"]));
        assert!(!is_joined("ab.c", &["a", "b", "c"]));
        assert!(!is_joined("a.bc", &["a", "b"]));
        assert!(is_joined("", &[]));
    }

    #[test]
    fn path_and_query_split_at_the_first_question_mark() {
        assert_eq!(url_path(b"/a/b?x=1?y"), b"/a/b");
        assert_eq!(query(b"/a/b?x=1?y"), b"x=1?y");
        assert_eq!(url_path(b"/a"), b"/a");
        assert_eq!(query(b"/a"), b"");
    }
}
