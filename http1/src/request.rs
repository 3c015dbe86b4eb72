//! Request heads as clients send them: parsed off the front of a connection's buffer, with
//! what the server needs to know to read the body and to answer.

use crate::codec::{field_spans, read_fields, Framing, CLIENT_NAMES, MAX_HEADERS};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri, Version};
use std::mem::MaybeUninit;

/// Why a head was refused: the status to answer with before closing.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// 431: over `client_max_header_size` or [`MAX_HEADERS`].
    TooLarge,
    /// 414: the request line alone is over `client_max_header_size` (nginx's answer when its
    /// line does not fit the large header buffers).
    UriTooLong,
    /// 400, and why.
    Bad(&'static str),
    /// 501: a transfer coding other than chunked (nginx's answer too).
    Unsupported(&'static str),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::Bad(_) => StatusCode::BAD_REQUEST,
            Refusal::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// A request head as parsed, before it becomes a [`Request`].
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// What the parser learned of the head besides its fields.
    pub seen: Seen,
    /// How the body is delimited.
    pub framing: Framing,
    /// `Expect: 100-continue` with a body to send: the client waits to be told to go on.
    pub expect_continue: bool,
    pub meta: Meta,
}

/// What the parser learned of a request's head besides its fields, for the proxy to use
/// without another look at them.
///
/// Kept small (16 bytes): a head is moved a few times per request, and past 256 bytes each
/// copy takes twice the instructions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Bytes of the head as received, up to its empty line (at most `u32::MAX`).
    pub size: u32,
    /// What the parser saw of the `Host` the request goes with (`None`: none, HTTP/1.0).
    pub host: Option<HostSeen>,
    /// `Connection` names fields to remove ([`codec::strip_nominated`]). Left in the map for
    /// the proxy, which first reads the head as the client sent it (the client's address
    /// from a trusted proxy's `X-Forwarded-For`, which naming it must not take away), then
    /// removes them before adding its own fields and running plugins.
    pub nominates: bool,
}

/// What answering a request needs to know of it.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// A HEAD request: the answer has no body, whatever its headers say.
    pub head: bool,
    pub version: Version,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
}

impl Meta {
    /// For an answer sent before any request was understood.
    pub fn refusal() -> Meta {
        Meta {
            head: false,
            version: Version::HTTP_11,
            keep_alive: false,
        }
    }
}

/// Bytes nginx takes in a request target as they are and the `http` crate's URI does not
/// (`"` `<` `>` in a query, `<` `>` `` ` `` in a path: JSON or markup in a query string, as
/// clients send it), percent-encoded so that the request is served rather than refused with
/// a 400. The upstream gets them encoded, which every server decodes to the same bytes.
const LENIENT: &[u8] = b"\"<>`";

/// An origin-form target with the [`LENIENT`] bytes percent-encoded, if that makes it a URI.
fn lenient_target(raw: &[u8]) -> Option<Uri> {
    if !raw.starts_with(b"/") || !raw.iter().any(|b| LENIENT.contains(b)) {
        return None;
    }
    let mut encoded = Vec::with_capacity(raw.len() + 16);
    for &b in raw {
        match LENIENT.contains(&b) {
            true => encoded.extend_from_slice(format!("%{b:02X}").as_bytes()),
            false => encoded.push(b),
        }
    }
    Uri::from_maybe_shared(Bytes::from(encoded)).ok()
}

/// The parser refuses a request line whose target is not UTF-8 (a Latin-1 `/caf\xe9` from an
/// old client), which nginx takes as it is: parses it again with its bytes above 0x7F
/// percent-encoded. Routes then match the decoded path, as nginx's locations do, and the
/// upstream gets the encoded target, which every server decodes to the same bytes. Only on
/// the parser's error path; a line all ASCII is refused as it was.
fn parse_escaped(rbuf: &mut BytesMut, max: usize) -> Result<Option<Head>, Refusal> {
    let malformed = Refusal::Bad("malformed request head");
    // The request line, past the empty lines a client may send before it (RFC 9112 §2.2).
    let start = rbuf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let end = (rbuf[start..].iter().position(|&b| b == b'\n')).map_or(rbuf.len(), |i| start + i);
    if rbuf[start..end].is_ascii() || end == rbuf.len() {
        return Err(malformed);
    }
    let mut escaped = BytesMut::with_capacity(rbuf.len() + 32);
    for &b in &rbuf[..end] {
        match b {
            0x80.. => escaped.extend_from_slice(format!("%{b:02X}").as_bytes()),
            _ => escaped.extend_from_slice(&[b]),
        }
    }
    escaped.extend_from_slice(&rbuf[end..]);
    // The line is ASCII now: a second refusal does not come back here.
    let grown = escaped.len() - rbuf.len();
    let mut head = parse_head(&mut escaped, max + grown)?;
    if let Some(head) = &mut head {
        *rbuf = escaped;
        head.seen.size = head.seen.size.saturating_sub(grown as u32);
    }
    Ok(head)
}

/// A head over `max` bytes: 414 when its request line alone is, else 431.
fn too_large(rbuf: &[u8], max: usize) -> Refusal {
    let line = rbuf.iter().position(|&b| b == b'\n').unwrap_or(rbuf.len());
    match line >= max {
        true => Refusal::UriTooLong,
        false => Refusal::TooLarge,
    }
}

/// Parses a request head at the start of `rbuf` (its room: `max` bytes); `None` while
/// incomplete. The head is taken off the buffer only once whole.
pub fn parse_head(rbuf: &mut BytesMut, max: usize) -> Result<Option<Head>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, rbuf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > max => return Err(too_large(rbuf, max)),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if rbuf.len() >= max => return Err(too_large(rbuf, max)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(_) => return parse_escaped(rbuf, max),
    };
    let method = req.method.unwrap_or_default();
    // nginx's rule: upper-case letters, `_` and `-` only. A lower-case `get` would otherwise
    // pass routes limited to `GET` and reach a catch-all route.
    if !method
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        return Err(Refusal::Bad("bad method"));
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Bad("bad method"))?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where the target and each field lie in the head, so that they can share its bytes.
    let base = rbuf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let path = req.path.unwrap_or_default().as_bytes();
    let target = (offset(path), path.len());
    let spans = field_spans(base, req.headers);
    let head = rbuf.split_to(len).freeze();
    let raw = head.slice(target.0..target.0 + target.1);
    let mut uri = match Uri::from_maybe_shared(raw.clone()) {
        Ok(uri) => uri,
        Err(_) => lenient_target(&raw).ok_or(Refusal::Bad("bad request target"))?,
    };
    // Room for what may be added to the map (the gateway's X-Request-Id, plugins' headers);
    // the forwarding fields are written with the upstream head, not stored.
    let mut headers = HeaderMap::with_capacity(spans.len() + 3);
    let mut expect_continue = false;
    let (mut hosts, mut hosts_valid, mut host) = (0usize, true, None);
    let delimiters = read_fields(&CLIENT_NAMES, &head, spans, &mut headers, |name, value| {
        if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
            host = host_seen(value.as_bytes());
            hosts_valid &= host.is_some();
        }
        true
    })
    .map_err(Refusal::Bad)?;
    check_host(version, hosts, hosts_valid)?;
    if method == Method::CONNECT {
        // A proxy's tunnel, which the gateway does not make: forwarded, a node's 2xx would
        // turn the connection into a tunnel the gateway frames as a plain answer.
        return Err(Refusal::Unsupported("CONNECT"));
    }
    if uri.scheme().is_none() && uri.authority().is_some() {
        // Authority form (`GET host:80`): CONNECT's, which the gateway does not tunnel.
        return Err(Refusal::Bad("an authority-form request target"));
    }
    if uri.path() == "*" && method != Method::OPTIONS {
        // Asterisk form is OPTIONS's alone (RFC 9112 §3.2.4).
        return Err(Refusal::Bad(
            "an asterisk-form request target other than OPTIONS",
        ));
    }
    if let Some(authority) = uri.authority() {
        // Absolute form (RFC 9112 §3.2.2): the target names the host, and the `Host` field
        // is replaced by it, so that routing, `pass_host` and `X-Forwarded-Host` all see the
        // host the target names, as nginx's `$host` does.
        let authority = authority.as_str();
        host = host_seen(authority.as_bytes()).filter(|_| !authority.contains('@'));
        if host.is_none() {
            return Err(Refusal::Bad("invalid host in the request target"));
        }
        let value = header::HeaderValue::from_str(authority)
            .map_err(|_| Refusal::Bad("invalid host in the request target"))?;
        headers.insert(header::HOST, value);
        // `http://host?q` has an empty path: the request goes on as `/?q`, as nginx sends it
        // (the origin form always starts with a slash).
        if !uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'))
        {
            uri = rooted(uri).ok_or(Refusal::Bad("bad request target"))?;
        }
    }
    let framing = match (delimiters.chunked, delimiters.length) {
        (Some(_), Some(_)) => {
            return Err(Refusal::Bad("both Content-Length and Transfer-Encoding"))
        }
        (Some(_), None) if version != Version::HTTP_11 => {
            return Err(Refusal::Bad("Transfer-Encoding in an HTTP/1.0 request"))
        }
        // Chunked alone: any other coding would reach the upstream undeclared, since
        // Transfer-Encoding stops at this hop.
        (Some(_), None) if !delimiters.other_coding => Framing::CHUNKED,
        (Some(_), None) => {
            return Err(Refusal::Unsupported("a transfer coding other than chunked"))
        }
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = match version {
        Version::HTTP_11 => !delimiters.close,
        _ => delimiters.keep_alive && !delimiters.close,
    };
    Ok(Some(Head {
        meta: Meta {
            head: method == Method::HEAD,
            version,
            keep_alive,
        },
        method,
        uri,
        version,
        headers,
        seen: Seen {
            size: u32::try_from(len).unwrap_or(u32::MAX),
            host,
            nominates: delimiters.nominates,
        },
        expect_continue: expect_continue
            && version == Version::HTTP_11
            && framing != Framing::Empty,
        framing,
    }))
}

/// RFC 9112 §3.2: one `Host` field, required in HTTP/1.1, and a value fit to route by
/// (nginx answers 400 to the same requests).
fn check_host(version: Version, hosts: usize, valid: bool) -> Result<(), Refusal> {
    match hosts {
        0 if version == Version::HTTP_11 => Err(Refusal::Bad("an HTTP/1.1 request without Host")),
        0 | 1 if valid => Ok(()),
        0 | 1 => Err(Refusal::Bad("invalid Host")),
        _ => Err(Refusal::Bad("more than one Host")),
    }
}

/// `uri` with a `/` before its (empty) path: `http://host?q` as `http://host/?q`.
fn rooted(uri: Uri) -> Option<Uri> {
    let mut parts = uri.into_parts();
    let query = parts.path_and_query.as_ref().map_or("", |p| p.as_str());
    parts.path_and_query = Some(format!("/{query}").try_into().ok()?);
    Uri::from_parts(parts).ok()
}

/// What the parser found of a `Host` it took: the length of its name ([`host_name`]) and
/// whether it has upper-case letters — what routing by it needs, without another pass over
/// its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSeen {
    /// At most `u32::MAX` (a longer `Host` is refused).
    pub name_len: u32,
    /// An upper-case letter anywhere in the value (the name is routed by lower-cased).
    pub upper: bool,
}

/// Whether `host` is a `host[:port]` to route by: not empty, only the bytes a URI's authority
/// holds (RFC 3986 §3.2.2: letters, digits, `-._~`, sub-delims, `%`, `:` and the brackets of
/// an IPv6 literal) and no `..` — no path, no spaces, no way to name a parent directory
/// (nginx's check of `Host` refuses those too; it takes some bytes this refuses, such as raw
/// UTF-8, which no URI carries) — and what routing needs of it; `None` for a `Host` to refuse.
pub fn host_seen(host: &[u8]) -> Option<HostSeen> {
    const ALLOWED: u8 = 1;
    const UPPER: u8 = 2;
    // One pass, a table look-up a byte and no branch: every request's `Host` goes through here.
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            let b = i as u8;
            t[i] = (b.is_ascii_alphanumeric() as u8) | ((b.is_ascii_uppercase() as u8) << 1);
            i += 1;
        }
        let extra = b"-._~!$&'()*+,;=:[]%";
        let mut j = 0;
        while j < extra.len() {
            t[extra[j] as usize] = ALLOWED;
            j += 1;
        }
        t
    };
    let (mut all, mut any, mut dots, mut prev) = (ALLOWED, 0u8, false, 0u8);
    for &b in host {
        let class = CLASS[b as usize];
        all &= class;
        any |= class;
        dots |= b == b'.' && prev == b'.';
        prev = b;
    }
    if all & ALLOWED == 0 || dots {
        return None;
    }
    // A name before the port: not `:80`, `.` (the root alone) or `[]`.
    let name = host_name(host);
    let name_len = u32::try_from(name.len()).ok()?;
    (!name.is_empty() && name != b"[]").then_some(HostSeen {
        name_len,
        upper: any & UPPER != 0,
    })
}

/// The name in `host[:port]`: up to an IPv6 literal's `]`, else up to the first `:`, less a
/// trailing root dot (`example.com.` is `example.com`, as nginx's `$host`). A prefix of
/// `host`.
pub fn host_name(host: &[u8]) -> &[u8] {
    let end = match host.first() {
        Some(b'[') => host.iter().position(|b| *b == b']').map(|i| i + 1),
        _ => host.iter().position(|b| *b == b':'),
    };
    let name = &host[..end.unwrap_or(host.len())];
    name.strip_suffix(b".").unwrap_or(name)
}

/// A request path as routes are matched against it (nginx's `$uri`): `%XX` escapes decoded,
/// runs of `/` merged, `.` and `..` segments resolved. A path that needs none of it (nearly
/// all) is returned as it is, without a copy. An escape that is not two hex digits, an
/// escaped NUL, or a `..` above the root is refused (nginx answers 400 too).
///
/// Routing on the raw path would let `/public/../admin/x`, `/%61dmin/x` or `//admin/x` reach
/// a node's `/admin/x` past the plugins of the `/admin/*` route.
pub fn normalized_path(path: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    resolve_path(path).map(|(p, _)| p)
}

/// A path resolved by [`resolve_path`].
type Resolved<'a> = (std::borrow::Cow<'a, str>, Option<String>);

/// [`normalized_path`] (bytes that are not UTF-8 shown as U+FFFD, for matching), and, when a
/// `.` or `..` segment was resolved, the resolved path escaped again to be sent on: a node
/// that reads the path as sent may not resolve them the same way (or at all). A path that was
/// only decoded or had slashes merged goes as written (an escaped slash in it stays escaped).
/// The path sent on keeps the request's own bytes (`%E9` stays `%E9`), as nginx's does.
pub fn resolve_path(path: &str) -> Result<Resolved<'_>, &'static str> {
    let b = path.as_bytes();
    if !needs_resolving(b) {
        return Ok((std::borrow::Cow::Borrowed(path), None));
    }
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i]);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("bad percent-escape in the path");
        };
        let c = (h * 16 + l) as u8;
        if c == 0 {
            return Err("NUL in the path");
        }
        decoded.push(c);
        i += 3;
    }
    // Segments between slashes; empty ones (a run of slashes) and `.` go, `..` takes the one
    // before it.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded.split(|c| *c == b'/').collect();
    let last = segments.len() - 1;
    let mut trailing = false;
    let mut dots = false;
    for (n, seg) in segments.iter().enumerate() {
        trailing = n == last && (seg.is_empty() || *seg == b"." || *seg == b"..");
        dots |= *seg == b"." || *seg == b"..";
        match *seg {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err("path goes above the root");
                }
            }
            seg => out.push(seg),
        }
    }
    let mut path = Vec::with_capacity(decoded.len());
    for seg in &out {
        path.push(b'/');
        path.extend_from_slice(seg);
    }
    if trailing || path.is_empty() {
        path.push(b'/');
    }
    let target = dots.then(|| escape_path(&path));
    let path = match String::from_utf8(path) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    Ok((std::borrow::Cow::Owned(path), target))
}

/// A resolved path ([`normalized_path`]) as a request target again: bytes a path may not hold
/// as they are (controls, space, `%`, `?`, `#`, non-ASCII, …) escaped, RFC 3986's `pchar`s and
/// `/` kept.
pub fn escape_path(path: &[u8]) -> String {
    use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'!')
        .remove(b'$')
        .remove(b'&')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*')
        .remove(b'+')
        .remove(b',')
        .remove(b';')
        .remove(b'=')
        .remove(b':')
        .remove(b'@');
    percent_encode(path, ESCAPED).to_string()
}

/// Whether a path holds an escape, `//` or a segment starting with `.`: one pass, as every
/// request's path is looked at.
fn needs_resolving(path: &[u8]) -> bool {
    let mut after_slash = false;
    for &c in path {
        if c == b'%' || (after_slash && (c == b'/' || c == b'.')) {
            return true;
        }
        after_slash = c == b'/';
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn targets_nginx_takes_are_served_with_those_bytes_encoded() {
        let head = |target: &str| {
            parse(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n"))
                .map(|h| h.map(|h| h.uri.to_string()))
        };
        for (raw, served) in [
            ("/x?q=\"a\"", "/x?q=%22a%22"),
            ("/x?q=<b>", "/x?q=%3Cb%3E"),
            ("/a<b>/`c`", "/a%3Cb%3E/%60c%60"),
            ("/x?q={a}|^", "/x?q={a}|^"),
        ] {
            assert_eq!(head(raw).ok().flatten().as_deref(), Some(served), "{raw}");
        }
        // Bytes no server takes stay refused.
        assert!(head("/x?q=\x7f").is_err());
        // UTF-8 sent unescaped (curl sends it so) goes on as it came; a target that is not
        // UTF-8 at all, with those bytes encoded, and what follows the head left as it was.
        let mut buf = BytesMut::from(&b"GET /caf\xe9?q=\xff HTTP/1.1\r\nHost: a\r\n\r\nnext"[..]);
        let uri = |h: Result<Option<Head>, Refusal>| h.ok().flatten().map(|h| h.uri.to_string());
        assert_eq!(
            uri(parse_head(&mut buf, 8192)).as_deref(),
            Some("/caf%E9?q=%FF")
        );
        assert_eq!(&buf[..], b"next");
        // After an empty line, as before any request line.
        let mut buf = BytesMut::from(&b"\r\nGET /caf\xe9 HTTP/1.1\r\nHost: a\r\n\r\n"[..]);
        assert_eq!(uri(parse_head(&mut buf, 8192)).as_deref(), Some("/caf%E9"));
        assert_eq!(
            head("/caf\u{e9}").ok().flatten().as_deref(),
            Some("/caf\u{e9}")
        );
        // Still refused: other bad bytes in such a line, and non-ASCII outside the target.
        assert!(head("/caf\u{e9}\x7f").is_err());
        assert!(parse_head(
            &mut BytesMut::from(&b"G\xc9T / HTTP/1.1\r\nHost: a\r\n\r\n"[..]),
            8192
        )
        .is_err());
    }

    #[test]
    fn paths_are_matched_as_nginx_normalizes_them() {
        let n = |p: &str| normalized_path(p).map(|c| c.into_owned());
        for (raw, want) in [
            ("/", "/"),
            ("/admin/x", "/admin/x"),
            ("/public/../admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/x/..%2Fadmin/x", "/admin/x"),
            ("/admin%2Fx", "/admin/x"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/", "/a/"),
            ("/..a/.b", "/..a/.b"),
            ("/caf%C3%A9", "/caf\u{e9}"),
        ] {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in ["/..", "/a/../..", "/%zz", "/%4", "/a%00b", "/%2e%2e/x"] {
            assert!(n(bad).is_err(), "{bad}");
        }
        for (resolved, target) in [
            ("/a b/%", "/a%20b/%25"),
            ("/caf\u{e9}?#", "/caf%C3%A9%3F%23"),
        ] {
            assert_eq!(escape_path(resolved.as_bytes()), target);
            assert_eq!(
                n(target).as_deref(),
                Ok(resolved),
                "escaping is undone by resolving"
            );
        }
        let sent = |p: &str| resolve_path(p).map(|(_, t)| t);
        assert_eq!(sent("/a/../b"), Ok(Some("/b".to_string())));
        assert_eq!(sent("/a/%2e/b"), Ok(Some("/a/b".to_string())));
        assert_eq!(sent("/a%2Fb//c"), Ok(None));
        // Bytes that are not UTF-8 are matched as U+FFFD but sent on as they came.
        assert_eq!(sent("/caf%e9/./x"), Ok(Some("/caf%E9/x".to_string())));
        assert_eq!(n("/caf%e9/./x").as_deref(), Ok("/caf\u{fffd}/x"));
        // Nothing to do: the path itself, not a copy.
        assert!(matches!(
            normalized_path("/a/b.c"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
    }

    fn parse(head: &str) -> Result<Option<Head>, Refusal> {
        parse_head(&mut BytesMut::from(head), 8192)
    }

    #[test]
    fn request_heads_say_how_their_body_ends_and_whether_the_connection_stays() {
        let h = parse("POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.method.as_str(), h.uri.to_string().as_str()),
            ("POST", "/a?b=1")
        );
        assert_eq!((h.framing, h.meta.keep_alive), (Framing::Length(5), true));
        assert_eq!(h.headers["host"], "x");

        let h = parse("PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n");
        let h = h.unwrap().unwrap();
        assert_eq!(h.framing, Framing::CHUNKED);
        assert!(!h.meta.keep_alive && h.expect_continue);

        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            (h.meta.version, h.meta.keep_alive),
            (Version::HTTP_10, false)
        );
        let h = parse("HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.meta.keep_alive && h.meta.head);
        // Expecting to send a body when there is none: nothing to continue.
        let h = parse("GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.expect_continue && h.framing == Framing::Empty);

        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(),
            "incomplete"
        );
    }

    #[test]
    fn heads_say_whether_connection_names_fields_and_those_go_when_stripped() {
        let h = "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret,,te\r\n\
                 X-Secret: 1\r\nX-Kept: 2\r\nConnection: x-other\r\nX-Other: 3\r\n\r\n";
        let mut h = parse(h).unwrap().unwrap();
        assert!(h.seen.nominates && h.meta.keep_alive);
        // As sent until the proxy strips them (having read the client's address first).
        assert_eq!(h.headers.len(), 6);
        codec::strip_nominated(&mut h.headers);
        let mut names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        // `Connection` itself goes later, with the fixed hop-by-hop names.
        assert_eq!(names, ["connection", "host", "x-kept"]);
        // Options that name nothing, `Host` or the body's length: nothing to strip.
        let h = "POST / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, upgrade\r\n\
                 Upgrade: websocket\r\n\r\n";
        assert!(!parse(h).unwrap().unwrap().seen.nominates);
        let h = "POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length, host\r\n\
                 Content-Length: 2\r\n\r\n";
        let mut h = parse(h).unwrap().unwrap();
        codec::strip_nominated(&mut h.headers);
        assert_eq!(h.headers.len(), 3);
        assert_eq!(h.framing, Framing::Length(2));
    }

    #[test]
    fn bad_and_large_heads_are_refused_by_name() {
        let refused = |head: &str| {
            parse(head)
                .err()
                .unwrap_or_else(|| panic!("{head:?} taken"))
        };
        for (head, why) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 request",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting Content-Length headers",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                "bad Content-Length",
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
                "malformed request head",
            ),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed request head"),
        ] {
            assert_eq!(refused(head), Refusal::Bad(why), "{head:?}");
        }
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                refused(head),
                Refusal::Unsupported("a transfer coding other than chunked"),
                "{head:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            Refusal::TooLarge
        );
        let long = "v".repeat(8192);
        // A request line over the limit is a 414, whole or still coming.
        for head in [
            format!("GET /{long} HTTP/1.1\r\nHost: x\r\n\r\n"),
            format!("GET /{long}"),
        ] {
            assert_eq!(refused(&head), Refusal::UriTooLong);
        }
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: x\r\nx: {long}")),
            Refusal::TooLarge
        );
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: x\r\nx: {long}\r\n\r\n")),
            Refusal::TooLarge
        );
    }

    #[test]
    fn pipelined_heads_come_off_one_at_a_time() {
        let mut buf = BytesMut::from(
            "GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3",
        );
        let first = parse_head(&mut buf, 8192).unwrap().unwrap();
        let second = parse_head(&mut buf, 8192).unwrap().unwrap();
        assert_eq!((first.uri.path(), second.uri.path()), ("/1", "/2"));
        assert!(parse_head(&mut buf, 8192).unwrap().is_none());
        assert_eq!(&buf[..], b"GET /3");
    }

    #[test]
    fn one_valid_host_or_the_targets() {
        for (head, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "an HTTP/1.1 request without Host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "more than one Host",
            ),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.0\r\nHost: ..\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost:\r\n\r\n", "invalid Host"),
            (
                "GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
                "invalid host in the request target",
            ),
            (
                "GET h.example:80 HTTP/1.1\r\nHost: h\r\n\r\n",
                "an authority-form request target",
            ),
            (
                "GET * HTTP/1.1\r\nHost: h\r\n\r\n",
                "an asterisk-form request target other than OPTIONS",
            ),
        ] {
            assert_eq!(parse(head).err(), Some(Refusal::Bad(why)), "{head:?}");
        }
        // CONNECT is not served, whatever its target: a 501 as for an unknown method.
        for head in [
            "CONNECT h.example:443 HTTP/1.1\r\nHost: h.example:443\r\n\r\n",
            "CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(
                parse(head).err(),
                Some(Refusal::Unsupported("CONNECT")),
                "{head:?}"
            );
        }
        let h = parse("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.uri.path(), "*");
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.headers.get("host").is_none());
        let h = parse("GET http://Target.example:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.headers["host"], "Target.example:81");
        assert_eq!(h.headers.get_all("host").iter().count(), 1);
        // No path: it goes on as `/`, the query kept.
        for (head, target) in [
            (
                "GET http://a.example?q=1 HTTP/1.1\r\nHost: a\r\n\r\n",
                "/?q=1",
            ),
            ("GET http://a.example HTTP/1.1\r\nHost: a\r\n\r\n", "/"),
        ] {
            let h = parse(head).unwrap().unwrap();
            assert_eq!(h.uri.path_and_query().unwrap().as_str(), target, "{head:?}");
            assert_eq!(h.headers["host"], "a.example");
        }
        for ok in [
            "a.example",
            "a-b_c.example:8080",
            "[::1]:80",
            "127.0.0.1",
            "xn--bcher-kva.example",
            "a.example.",
        ] {
            assert!(host_seen(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "", "a/b", "a\\b", "a..b", "a b", "a?b", "a#b", "a@b", ":80", ".", "[]", "[]:80",
        ] {
            assert!(host_seen(bad.as_bytes()).is_none(), "{bad:?}");
        }
        // What routing needs of it: the name's length, and whether it needs lower-casing.
        let seen = |h: &str| host_seen(h.as_bytes()).map(|s| (s.name_len, s.upper));
        assert_eq!(seen("a.example:8080"), Some((9, false)));
        assert_eq!(seen("A.Example."), Some((9, true)));
        assert_eq!(seen("[::1]:80"), Some((5, false)));
        let head = |raw: &str| parse(raw).unwrap().unwrap().seen;
        let h = head("GET / HTTP/1.1\r\nHost: Api.example:80\r\n\r\n").host;
        assert_eq!(h, host_seen(b"Api.example:80"));
        assert_eq!(h.map(|h| (h.name_len, h.upper)), Some((11, true)));
        // The target's host, in place of the field.
        let h = head("GET http://up.example/ HTTP/1.1\r\nHost: x\r\n\r\n").host;
        assert_eq!(h.map(|h| h.name_len), Some(10));
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").host, None);
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").size, 18);
    }
}
