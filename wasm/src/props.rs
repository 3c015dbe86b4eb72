//! `proxy_get_property`: Envoy's attribute names, the plugin's own names, and — through the
//! gateway's [`Properties`](crate::state::Properties) — APISIX's nginx variables.

use crate::head::Head;
use crate::state::HostState;

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

/// The value of a property path, or None (NotFound).
pub fn lookup<'a>(s: &'a HostState, path: &[&str]) -> Option<Found<'a>> {
    if let ["plugin_name"] | ["plugin_root_id"] | ["plugin_vm_id"] = path {
        return Some(Found::Borrowed(s.plugin_name.as_bytes()));
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
        ["request", "headers", name] => req.get(name),
        // Envoy's integers are 8 bytes, little-endian (what its SDK users decode).
        ["response", "code"] => {
            let status = stream.response.as_ref().and_then(|r| r.get(":status"))?;
            let code: i64 = std::str::from_utf8(status).ok()?.parse().ok()?;
            return Some(Found::Owned(code.to_le_bytes().to_vec()));
        }
        ["response", "headers", name] => stream.response.as_ref().and_then(|r| r.get(name)),
        _ => None,
    };
    if let Some(v) = value {
        return Some(Found::Borrowed(v));
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
