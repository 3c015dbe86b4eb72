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

/// `:path` after the `?`, up to a fragment (as Envoy's attribute); empty without one.
fn query(p: &[u8]) -> &[u8] {
    let Some(i) = p.iter().position(|b| *b == b'?') else {
        return &[];
    };
    let q = &p[i + 1..];
    q.split(|b| *b == b'#').next().unwrap_or(q)
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
        // A bool is one byte: whether the client showed a certificate its SSL object's CAs
        // issued.
        ["connection", "mtls"] => Some(Found::Borrowed(if from.peer().is_some() {
            &[1]
        } else {
            &[0]
        })),
        ["connection", "sha256_peer_certificate_digest"] => {
            Some(Found::Borrowed(from.peer()?.sha256.as_bytes()))
        }
        // RFC 2253's form, and the first DNS and URI names, as Envoy's.
        ["connection", "subject_peer_certificate"] => Some(Found::Borrowed(
            from.peer()?.holder.as_ref()?.subject.as_bytes(),
        )),
        ["connection", "dns_san_peer_certificate"] => {
            let holder = from.peer()?.holder.as_ref()?;
            Some(Found::Borrowed(holder.dns_san.as_deref()?.as_bytes()))
        }
        ["connection", "uri_san_peer_certificate"] => {
            let holder = from.peer()?.holder.as_ref()?;
            Some(Found::Borrowed(holder.uri_san.as_deref()?.as_bytes()))
        }
        // Envoy's empty string when no name came with TLS (plain HTTP, or no SNI).
        ["connection", "requested_server_name"] => {
            Some(match from.tls.as_ref().and_then(|t| t.sni.as_ref()) {
                Some(name) => Found::Owned(name.as_bytes().to_vec()),
                None => Found::Borrowed(&[]),
            })
        }
        // Envoy's `TLSv1.3`; absent over plain HTTP, as there.
        ["connection", "tls_version"] => {
            Some(Found::Borrowed(from.tls.as_ref()?.protocol.as_bytes()))
        }
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
    if name.starts_with(':') {
        return head.get(name).map(Found::Borrowed);
    }
    joined(head.get_all(name))
}

/// Values joined with `,`; borrowed when there is one, None when there is none.
fn joined<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<Found<'a>> {
    let first = values.next()?;
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

/// A whole header map as Envoy's attribute gives it (`request.headers`, `response.headers`,
/// `response.trailers`): each name once, where it first appears, with every value of it
/// joined with `,`, serialized as Proxy-Wasm pairs (what the SDKs' map decoders read).
fn whole_map<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])>) -> Found<'static> {
    let mut names: Vec<(&str, Vec<u8>)> = Vec::new();
    // Most heads are short: a scan finds a name sooner than a table would be made.
    let mut index: Option<foldhash::HashMap<&str, usize>> = None;
    for (name, value) in pairs {
        let at = match &index {
            Some(index) => index.get(name).copied(),
            None => names.iter().position(|(n, _)| *n == name),
        };
        match at {
            Some(at) => {
                let joined = &mut names[at].1;
                joined.push(b',');
                joined.extend_from_slice(value);
            }
            None => {
                if let Some(index) = &mut index {
                    index.insert(name, names.len());
                }
                names.push((name, value.to_vec()));
                if index.is_none() && names.len() > 32 {
                    index = Some(
                        names
                            .iter()
                            .enumerate()
                            .map(|(i, (n, _))| (*n, i))
                            .collect(),
                    );
                }
            }
        }
    }
    let pairs = names.iter().map(|(n, v)| (*n, v.as_slice()));
    Found::Owned(wasmgate_abi::map::encode(pairs))
}

/// A trailer's value, its values joined with `,` as a header's.
fn trailer<'a>(trailers: &'a [(String, Vec<u8>)], name: &str) -> Option<Found<'a>> {
    let values = trailers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice());
    joined(values)
}

/// `response.grpc_status` as Envoy works it out: the `grpc-status` trailer, else the header
/// (a trailers-only answer), else the gRPC status the HTTP status maps to.
fn grpc_status(stream: &Stream) -> Option<Found<'static>> {
    let response = stream.response.as_ref()?;
    let sent = trailer(&stream.response_trailers, "grpc-status")
        .map(|f| f.as_bytes().to_vec())
        .or_else(|| response.get("grpc-status").map(<[u8]>::to_vec));
    if let Some(sent) = sent {
        return int(std::str::from_utf8(&sent).ok()?.trim().parse().ok()?);
    }
    let status: u16 = std::str::from_utf8(response.get(":status")?)
        .ok()?
        .parse()
        .ok()?;
    int(match status {
        400 => 13,                   // Internal
        401 => 16,                   // Unauthenticated
        403 => 7,                    // PermissionDenied
        404 => 12,                   // Unimplemented
        429 | 502 | 503 | 504 => 14, // Unavailable
        _ => 2,                      // Unknown
    })
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
        ["request", "headers"] => return Some(whole_map(req.iter())),
        ["request", "headers", name] => return header(req, name),
        ["request", "referer"] => req.get("referer"),
        ["request", "useragent"] => req.get("user-agent"),
        // Envoy's integers are 8 bytes, little-endian (what its SDK users decode).
        ["response", "code"] => {
            let status = stream.response.as_ref().and_then(|r| r.get(":status"))?;
            let code: i64 = std::str::from_utf8(status).ok()?.parse().ok()?;
            return Some(Found::Owned(code.to_le_bytes().to_vec()));
        }
        ["response", "headers"] => return Some(whole_map(stream.response.as_ref()?.iter())),
        ["response", "headers", name] => return header(stream.response.as_ref()?, name),
        ["response", "trailers"] => {
            let trailers = stream.response_trailers.iter();
            return Some(whole_map(trailers.map(|(k, v)| (k.as_str(), v.as_slice()))));
        }
        ["response", "trailers", name] => return trailer(&stream.response_trailers, name),
        ["response", "grpc_status"] => return grpc_status(stream),
        ["response", "code_details"] => {
            let details = stream.details.as_ref()?;
            return Some(Found::Borrowed(details.details.as_bytes()));
        }
        // Envoy's flags are always there: none set is 0.
        ["response", "flags"] => return int(stream.details.as_ref().map_or(0, |d| d.flags as i64)),
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
        assert_eq!(query(b"/a?x=1#frag"), b"x=1");
    }

    fn decoded(found: Found) -> Vec<(String, Vec<u8>)> {
        wasmgate_abi::map::decode(found.as_bytes()).unwrap()
    }

    #[test]
    fn a_whole_map_names_each_header_once_with_its_values_joined() {
        let pairs = [("a", &b"1"[..]), ("b", b"2"), ("a", b"3"), ("c", b"")];
        let map = decoded(whole_map(pairs.into_iter()));
        let want = [("a", "1,3"), ("b", "2"), ("c", "")];
        let want: Vec<(String, Vec<u8>)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(map, want);
        // Past the scan's reach, the index finds repeated names the same way.
        let names: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let many = names
            .iter()
            .chain(names.iter())
            .map(|n| (n.as_str(), &b"v"[..]));
        let map = decoded(whole_map(many));
        assert_eq!(map.len(), 40);
        assert!(map.iter().all(|(_, v)| v == b"v,v"));
        assert!(decoded(whole_map(std::iter::empty())).is_empty());
    }
}
