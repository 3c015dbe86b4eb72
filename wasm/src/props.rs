//! `proxy_get_property`: Envoy's attribute names, the plugin's own names, and — through the
//! gateway's [`Properties`](crate::state::Properties) — APISIX's nginx variables.

use crate::head::Head;
use crate::state::HostState;

fn header(head: &Head, name: &str) -> Option<Vec<u8>> {
    head.get(name).map(<[u8]>::to_vec)
}

/// The value of a property path, or None (NotFound).
pub fn lookup(s: &HostState, path: &[&str]) -> Option<Vec<u8>> {
    match path {
        ["plugin_name"] | ["plugin_root_id"] | ["plugin_vm_id"] => {
            return Some(s.plugin_name.as_bytes().to_vec())
        }
        _ => {}
    }
    let stream = s.stream.as_ref()?;
    let joined = path.join(".");
    if let Some((_, v)) = stream.set_props.iter().find(|(k, _)| *k == joined) {
        return Some(v.clone());
    }
    let req = &stream.request;
    let value = match path {
        ["request", "path"] => header(req, ":path"),
        ["request", "url_path"] => {
            header(req, ":path").map(|p| p.split(|b| *b == b'?').next().unwrap_or(&[]).to_vec())
        }
        ["request", "query"] => {
            header(req, ":path").map(|p| match p.iter().position(|b| *b == b'?') {
                Some(i) => p[i + 1..].to_vec(),
                None => Vec::new(),
            })
        }
        ["request", "method"] => header(req, ":method"),
        ["request", "id"] => header(req, "x-request-id"),
        ["request", "host"] => header(req, ":authority"),
        ["request", "scheme"] => header(req, ":scheme"),
        ["request", "headers", name] => header(req, name),
        ["response", "code"] => stream.response.as_ref().and_then(|r| header(r, ":status")),
        ["response", "headers", name] => stream.response.as_ref().and_then(|r| header(r, name)),
        _ => None,
    };
    value.or_else(|| stream.props.get(path, &stream.request))
}
