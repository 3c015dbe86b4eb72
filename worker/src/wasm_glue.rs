//! Between HTTP types and the Proxy-Wasm host: header lists with pseudo-headers, local replies,
//! and the request properties plugins may read.

use crate::body::{self, ProxyBody};
use crate::proxy::error_page;
use crate::router::RouteEntry;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use wasmgate_wasm::{AnswerDetails, Downstream, Head, LocalReply};

/// The request as plugins see it: `:method`, `:path`, `:authority`, `:scheme`, then headers.
/// The headers move into the head; [`apply_request`] gives them back.
/// `scheme`: `https` over the TLS listener.
pub fn request_head(parts: &mut http::request::Parts, scheme: &'static str) -> Head {
    Head::request(parts, scheme)
}

/// Gives `parts` the request as the plugins left it (method, path, Host, headers). Only the
/// pseudo-headers a plugin set are applied: a `Host` header a plugin set stays as it is unless
/// it also set `:authority`.
///
/// `copy`: the head keeps a copy of the headers, for body callbacks that run while the request
/// goes upstream. Otherwise the headers move out of the head, and [`restore_request`] gives
/// them back (as sent upstream) once the request is sent, for the response and log phases.
pub fn apply_request(
    head: &mut Head,
    parts: &mut http::request::Parts,
    copy: bool,
) -> Result<(), String> {
    let out = |head: &mut Head| match copy {
        true => head.headers_out(),
        false => head.take_headers(),
    };
    if !head.changed() {
        parts.headers = out(head);
        return Ok(());
    }
    if let Some(e) = head.error() {
        return Err(e);
    }
    let mut headers = out(head);
    if let Some(m) = head.pseudo_set(":method") {
        parts.method = http::Method::from_bytes(m).map_err(|_| "invalid :method".to_string())?;
    }
    if let Some(p) = head.pseudo_set(":path") {
        parts.uri = http::Uri::try_from(p).map_err(|_| "invalid :path".to_string())?;
    }
    if let Some(a) = head.pseudo_set(":authority").filter(|a| !a.is_empty()) {
        headers.insert(
            http::header::HOST,
            HeaderValue::from_bytes(a).map_err(|_| "invalid :authority".to_string())?,
        );
    }
    parts.headers = headers;
    if copy {
        // Body callbacks may change the head again before the upstream is contacted.
        head.settle();
    }
    Ok(())
}

/// Gives the plugins' request head back the headers [`apply_request`] moved out, as the
/// proxy left them: hop-by-hop headers gone, the forwarding fields and `Host` per `pass_host`
/// not in them (those are written with the upstream head only, as APISIX's
/// `proxy_set_header` leaves `ngx.req`). A head that kept its headers (a copy, or none given
/// out) keeps them.
pub fn restore_request(head: &mut Head, parts: &mut http::request::Parts) {
    if head.lent() {
        head.put_headers(std::mem::take(&mut parts.headers));
    }
}

/// The response as plugins see it: `:status`, then headers (moved out of `resp`;
/// [`apply_response`] gives them back).
pub fn response_head(resp: &mut Response<ProxyBody>) -> Head {
    Head::response(resp.status(), std::mem::take(resp.headers_mut()))
}

/// Gives `resp` the response headers as the plugins left them; headers the map could not
/// take are left out, with an error-log line. They are lent, not copied: the server gives
/// them back to the head once it has written them (`proxy::HeadersBack`), for the body
/// callbacks that follow and `proxy_on_log`.
pub fn apply_response(head: &mut Head, resp: &mut Response<ProxyBody>) {
    if !head.changed() {
        *resp.headers_mut() = head.take_headers();
        return;
    }
    if let Some(e) = head.error() {
        tracing::error!("plugins left invalid response headers, not sent: {e}");
    }
    *resp.headers_mut() = head.take_headers();
    if let Some(set) = head.pseudo_set(":status") {
        match final_status(set) {
            Some(code) => *resp.status_mut() = code,
            // Set again as it was (a 101 that switches): nothing changes.
            None if set == resp.status().as_str().as_bytes() => {}
            None => tracing::error!(
                "plugins set the answer's :status to {:?}, not sent: a final status is 200-599",
                String::from_utf8_lossy(set)
            ),
        }
    }
}

/// A `:status` a plugin may give an answer: a final one. An informational status (1xx)
/// would leave the client waiting for the answer that follows it, and a 101 that switches
/// nothing would make a proxy in front take the connection for a tunnel.
fn final_status(set: &[u8]) -> Option<StatusCode> {
    let code = std::str::from_utf8(set).ok()?.parse::<u16>().ok()?;
    (200..=599)
        .contains(&code)
        .then(|| StatusCode::from_u16(code).ok())
        .flatten()
}

/// A plugin's `proxy_send_local_response` as an HTTP response; an empty body gets the default
/// page for the status, as nginx does. A reset (`proxy_close_stream`) is the answer that
/// stands for none ([`crate::proxy::reset_answer`]).
pub fn local_reply(r: LocalReply) -> Response<ProxyBody> {
    if r.is_reset() {
        return crate::proxy::reset_answer();
    }
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // nginx's error page stands in for an empty error answer, unless the plugin said what
    // its answer is (a `Content-Type` of its own): the page would go out under the plugin's
    // type, next to its own.
    let typed = r
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let mut resp = if r.body.is_empty() && status.as_u16() >= 400 && !typed {
        error_page(status)
    } else {
        // A body with no type of the plugin's own is text, as Envoy's local replies say.
        let untyped_text = !typed && !r.body.is_empty();
        let mut resp = Response::new(body::full(r.body));
        *resp.status_mut() = status;
        if untyped_text {
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
        }
        resp
    };
    if !append_pairs(resp.headers_mut(), &r.headers, "a plugin's local reply") {
        tracing::error!(
            "local reply with {} headers: keeping the first ones only",
            r.headers.len()
        );
    }
    // `response.code_details`: the details the plugin gave, blanks made `_` as Envoy does.
    let details: String = r
        .details
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    resp.extensions_mut().insert(AnswerDetails {
        details: details.into(),
        flags: 0,
    });
    // Its length in its head, the gateway's (a plugin's own `Content-Length` could disagree
    // with the body): the reply goes through the response phase, where a body plugin that
    // leaves it as it is hides the body's size, and it must not become chunked (or, for an
    // HTTP/1.0 client, close-delimited). None where the status allows no body.
    let bodiless = wasmgate_http1::codec::bodiless(status, false);
    if let (false, Some(len)) = (bodiless, resp.body().size_hint().exact()) {
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

/// A header map as the ABI's pairs (names lower-case, values as bytes).
pub fn header_pairs(h: &HeaderMap) -> wasmgate_wasm::map::Pairs {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// Appends a plugin's `pairs` to `h`, leaving out those HTTP cannot carry (a name or value
/// that is not valid), each with an error-log line naming it and `what` the pairs are.
/// Returns false when the map was full (32,768 entries: `append` would panic), with the pairs
/// after that point left out.
pub fn append_pairs(h: &mut HeaderMap, pairs: &[(String, Vec<u8>)], what: &str) -> bool {
    // The name as the log shows it: its first 64 characters.
    let shown = |k: &str| k.chars().take(64).collect::<String>();
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.as_bytes());
        match (name, HeaderValue::from_bytes(v)) {
            (Ok(n), Ok(v)) => {
                if h.try_append(n, v).is_err() {
                    return false;
                }
            }
            (Err(_), _) => {
                tracing::error!("{what}: field {:?} left out: not a valid name", shown(k))
            }
            (_, Err(_)) => tracing::error!(
                "{what}: field {:?} left out: its value ({} bytes) holds a byte HTTP cannot \
                 carry (CR, LF, NUL or another control)",
                shown(k),
                v.len()
            ),
        }
    }
    true
}

/// What `proxy_get_property` answers beyond the host's own names: route, client address, and
/// APISIX's nginx variables (`remote_addr`, `arg_x`, `http_x`, `uri`…), read from the request as
/// plugins left it (as nginx's variables follow rewrites). The route answers them itself: its
/// requests share it.
impl wasmgate_wasm::Properties for RouteEntry {
    fn get(&self, path: &[&str], request: &Head, from: &Downstream) -> Option<Vec<u8>> {
        let text = match path {
            // `xds.route_name`: the name Envoy gives it since its attributes moved under xds.
            ["route_name"] | ["route", "name"] | ["xds", "route_name"] => {
                self.name.clone().unwrap_or_else(|| self.id.clone())
            }
            ["route_id"] | ["route", "id"] => self.id.clone(),
            ["request", "protocol"] => format!("{:?}", from.version),
            [name] => var(request, from, name)?,
            _ => return None,
        };
        Some(text.into_bytes())
    }
}

fn text<'a>(head: &'a Head, name: &str) -> &'a str {
    head.get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

/// An nginx variable of the request in `head`, from the client `from`.
fn var(head: &Head, from: &Downstream, name: &str) -> Option<String> {
    let peer = from.peer;
    let path = text(head, ":path");
    let (uri, query) = path.split_once('?').unwrap_or((path, ""));
    if let Some(arg) = name.strip_prefix("arg_") {
        return form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == arg)
            .map(|(_, v)| v.into_owned());
    }
    if let Some(h) = name.strip_prefix("http_") {
        let h = h.replace('_', "-");
        return head.get(&h).map(|_| text(head, &h).to_string());
    }
    if let Some(c) = name.strip_prefix("cookie_") {
        let cookies = head
            .get_all("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok());
        return wasmgate_shared::cookie(cookies, c);
    }
    Some(match name {
        "uri" => uri.to_string(),
        "request_uri" => path.to_string(),
        "args" | "query_string" => query.to_string(),
        "host" => {
            let raw = text(head, ":authority");
            let host = if raw.starts_with('[') {
                raw.split_inclusive(']').next().unwrap_or(raw)
            } else {
                raw.split(':').next().unwrap_or(raw)
            };
            host.to_ascii_lowercase()
        }
        "request_method" => text(head, ":method").to_string(),
        "remote_addr" => peer.ip().to_string(),
        "remote_port" => peer.port().to_string(),
        "scheme" => text(head, ":scheme").to_string(),
        "server_addr" => from.local.ip().to_string(),
        "server_port" => from.local.port().to_string(),
        // The connection's (`vars::CONNECTION_VARIABLES`), as route `vars` and the access
        // log read them.
        _ => crate::proxy::connection_var(from.tls.as_deref(), name)?.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_wasm::HeaderList;

    fn parts() -> http::request::Parts {
        let req = http::Request::builder()
            .uri("/a?b=1")
            .header("host", "example.com")
            .body(())
            .unwrap();
        req.into_parts().0
    }

    #[test]
    fn only_what_plugins_set_is_applied_to_the_request() {
        // A Host header set by a plugin stays: :authority was not touched.
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        head.replace("host", b"plugin.example");
        head.replace("x-added", b"1");
        apply_request(&mut head, &mut p, true).unwrap();
        assert_eq!(p.headers["host"], "plugin.example");
        assert_eq!(p.headers["x-added"], "1");
        assert_eq!(head.headers()["x-added"], "1");
        assert_eq!(p.uri, "/a?b=1");
        // :path and :authority set by a plugin rewrite the URI and the Host.
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        head.replace(":path", b"/new?x=2");
        head.replace(":authority", b"other.example:8080");
        apply_request(&mut head, &mut p, true).unwrap();
        assert_eq!(p.uri, "/new?x=2");
        assert_eq!(p.headers["host"], "other.example:8080");
        // An untouched head gives the headers back as they were.
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        assert!(p.headers.is_empty());
        apply_request(&mut head, &mut p, true).unwrap();
        assert_eq!(p.headers["host"], "example.com");
        // The head keeps its own copy for later callbacks.
        assert_eq!(head.headers()["host"], "example.com");
        // A path that is no URI fails the request with a reason.
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        head.replace(":path", b"no spaces allowed");
        assert_eq!(
            apply_request(&mut head, &mut p, true).unwrap_err(),
            "invalid :path"
        );
    }

    #[test]
    fn request_headers_lent_upstream_come_back_as_sent() {
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        head.replace("x-added", b"1");
        apply_request(&mut head, &mut p, false).unwrap();
        // Moved, not copied: the head holds none while the request goes upstream.
        assert_eq!(p.headers["x-added"], "1");
        assert!(head.headers().is_empty());
        // What the proxy changed in the map (hop-by-hop headers removed, say) is what later
        // callbacks read.
        p.headers
            .insert("x-by-proxy", HeaderValue::from_static("10.0.0.1"));
        restore_request(&mut head, &mut p);
        assert_eq!(head.get("x-added"), Some(&b"1"[..]));
        assert_eq!(head.get("x-by-proxy"), Some(&b"10.0.0.1"[..]));
        assert_eq!(head.get(":path"), Some(&b"/a?b=1"[..]));
        // A head that kept a copy keeps it: what the proxy did to its own is not given back.
        let mut p = parts();
        let mut head = request_head(&mut p, "http");
        apply_request(&mut head, &mut p, true).unwrap();
        p.headers.clear();
        restore_request(&mut head, &mut p);
        assert_eq!(head.get("host"), Some(&b"example.com"[..]));
    }
}
