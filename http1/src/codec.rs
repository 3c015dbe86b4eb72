//! HTTP/1 message pieces both sides of the proxy share: how a body is delimited and read out of
//! a buffer ([`Framing`], [`decode`]), how one is written ([`send_body`]), header fields as
//! lines, trailer sections, and the table of header names recently received ([`Names`]).
//!
//! The worker's server reads requests and writes responses with them; its client to
//! upstreams writes requests and reads responses.

use crate::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Body;
use http_body_util::BodyExt;
use std::io;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Most header fields a head (or a trailer section) may carry; hyper's limit too.
pub const MAX_HEADERS: usize = 100;
/// Largest trailer section taken.
const MAX_TRAILER_BYTES: usize = 64 * 1024;
/// Body data up to this size is copied next to its framing and written in one call.
pub const COALESCE: usize = 8 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Nothing (more) to read.
    Empty,
    /// So many bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Until the peer closes the connection (answers only).
    Close,
}

/// A chunked body's reader: where it stands, and what it has seen of the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    at: Chunk,
    /// Framing bytes beyond what the chunks' data warrants (see [`MAX_EXCESS`]).
    excess: u32,
    /// Bytes of the size line or trailer section at the buffer's front already looked at
    /// without finding its end: the next read is searched from there, not from the start.
    scanned: u32,
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a size line.
    Size,
    /// Inside a chunk, so many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailers, or the final CRLF.
    Trailers,
}

/// What [`decode`] found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is over.
    End,
    /// More bytes are needed.
    More,
}

impl Framing {
    /// A chunked body, before its first size line.
    pub const CHUNKED: Framing = Framing::Chunked(Chunked {
        at: Chunk::Size,
        excess: 0,
        scanned: 0,
    });

    /// How much the next read should ask for.
    pub fn wants(&self) -> usize {
        match self {
            Framing::Length(n) => usize::try_from(*n).unwrap_or(usize::MAX),
            _ => usize::MAX,
        }
    }
}

/// Takes the body's next frame out of `buf`, moving `framing` on; [`Decoded::More`] when the
/// buffer holds too little. Data frames share the buffer's bytes. A chunked body's framing is
/// taken out of the way; its data comes as it arrives, not a whole chunk at a time.
pub fn decode(buf: &mut BytesMut, framing: &mut Framing) -> Result<Decoded, &'static str> {
    loop {
        let mut c = match *framing {
            Framing::Empty => return Ok(Decoded::End),
            Framing::Close if buf.is_empty() => return Ok(Decoded::More),
            Framing::Close => return Ok(Decoded::Data(buf.split().freeze())),
            Framing::Length(_) if buf.is_empty() => return Ok(Decoded::More),
            Framing::Length(left) => {
                let data = take(buf, left);
                *framing = match left - data.len() as u64 {
                    0 => Framing::Empty,
                    n => Framing::Length(n),
                };
                return Ok(Decoded::Data(data));
            }
            Framing::Chunked(c) => c,
        };
        c.at = match c.at {
            Chunk::Size if !ended(buf, &mut c.scanned, &[b"\n"], MAX_SIZE_LINE + 2) => {
                *framing = Framing::Chunked(c);
                return Ok(Decoded::More);
            }
            Chunk::Size => match parse_chunk_size(buf)? {
                Some((used, size)) => {
                    buf.advance(used);
                    c.scanned = 0;
                    c.excess = excess(c.excess, used, size)?;
                    match size {
                        0 => Chunk::Trailers,
                        n => Chunk::Data(n),
                    }
                }
                None => {
                    *framing = Framing::Chunked(c);
                    return Ok(Decoded::More);
                }
            },
            Chunk::Data(_) if buf.is_empty() => return Ok(Decoded::More),
            Chunk::Data(left) => {
                let data = take(buf, left);
                c.at = match left - data.len() as u64 {
                    0 => Chunk::DataEnd,
                    n => Chunk::Data(n),
                };
                *framing = Framing::Chunked(c);
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd if buf.len() < 2 => return Ok(Decoded::More),
            Chunk::DataEnd if buf.starts_with(b"\r\n") => {
                buf.advance(2);
                Chunk::Size
            }
            Chunk::DataEnd => return Err("chunk data not followed by CRLF"),
            // No trailers (CRLF at once), or a section whose empty line has come.
            Chunk::Trailers
                if !buf.starts_with(b"\r\n")
                    && !ended(
                        buf,
                        &mut c.scanned,
                        &[b"\n\r\n", b"\n\n"],
                        MAX_TRAILER_BYTES,
                    ) =>
            {
                *framing = Framing::Chunked(c);
                return Ok(Decoded::More);
            }
            Chunk::Trailers => {
                return match parse_trailers(buf)? {
                    None => {
                        c.scanned = buf.len() as u32;
                        *framing = Framing::Chunked(c);
                        Ok(Decoded::More)
                    }
                    Some(trailers) => {
                        *framing = Framing::Empty;
                        Ok(trailers.map_or(Decoded::End, Decoded::Trailers))
                    }
                }
            }
        };
        *framing = Framing::Chunked(c);
    }
}

/// Whether one of `ends` may be in `buf` — searched from where the last look stopped
/// (`scanned`, moved on), so that a line or a section arriving a byte at a time is searched
/// once, not once per byte; or whether `buf` holds `max` bytes, enough for the parser to
/// refuse.
fn ended(buf: &[u8], scanned: &mut u32, ends: &[&[u8]], max: usize) -> bool {
    let longest = ends.iter().map(|e| e.len()).max().unwrap_or(1);
    let from = (*scanned as usize)
        .saturating_sub(longest - 1)
        .min(buf.len());
    let rest = &buf[from..];
    let found = buf.len() >= max || (ends.iter()).any(|e| rest.windows(e.len()).any(|w| w == *e));
    if !found {
        *scanned = buf.len() as u32;
    }
    found
}

/// Framing a chunked body may carry beyond what its data warrants, as Go's reader allows
/// (CVE-2023-39326): each chunk brings up to 16 bytes of framing plus twice its size at no
/// cost; past that, 16 KiB in all. Without a bound, a client sends 4 KiB size lines with one
/// byte of data each — gigabytes through a body limit of a megabyte, each byte a write
/// upstream and a plugin callback.
const MAX_EXCESS: u64 = 16 * 1024;

/// The excess after a chunk whose size line took `line` bytes (its data's CRLF counted too).
fn excess(before: u32, line: usize, size: u64) -> Result<u32, &'static str> {
    let allowance = size.saturating_mul(2).saturating_add(16);
    let excess = (before as u64 + line as u64 + 2).saturating_sub(allowance);
    match excess > MAX_EXCESS {
        true => Err("chunk framing out of proportion to its data"),
        false => Ok(excess as u32),
    }
}

/// Longest chunk size line taken, extensions included.
const MAX_SIZE_LINE: usize = 4096;

/// A chunk's size line (`1f;name=value CRLF`): its length and the size, `None` while
/// incomplete. Stricter than `httparse::parse_chunk_size`, which takes any byte in an
/// extension, a bare LF included: two parsers that end a line in different places are how
/// requests are smuggled past a proxy, so only CRLF ends the line, and control characters,
/// a size over nginx's largest (2^63 − 1; leading zeros taken, as nginx takes them) or a line
/// over [`MAX_SIZE_LINE`] are refused.
fn parse_chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let mut size = 0u64;
    for b in &buf[..digits] {
        if size > i64::MAX as u64 >> 4 {
            return Err("chunk size too large");
        }
        size = size << 4 | (*b as char).to_digit(16).unwrap_or(0) as u64;
    }
    if digits >= MAX_SIZE_LINE {
        return Err("chunk size line too long");
    }
    if digits == buf.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err("bad chunk size line");
    }
    // After the digits only whitespace, then extensions (`;`…), up to the CRLF (RFC 9112
    // §7.1): `5 zz` or `0x5` is refused, not read as a size the next hop may read otherwise.
    let mut extension = false;
    for (i, &b) in buf.iter().enumerate().skip(digits) {
        if i >= MAX_SIZE_LINE {
            return Err("chunk size line too long");
        }
        match b {
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((i + 2, size))),
                    Some(_) => Err("bad chunk size line"),
                }
            }
            b';' => extension = true,
            b'\t' | b' ' => {}
            b'!'..=b'~' | 0x80..=0xff if extension => {}
            _ => return Err("bad chunk size line"),
        }
    }
    Ok(None)
}

/// Up to `max` bytes off the front of `buf`.
fn take(buf: &mut BytesMut, max: u64) -> Bytes {
    let n = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
    buf.split_to(n).freeze()
}

/// Fields a trailer section may not carry (RFC 9110 §6.5.1: framing, routing, request
/// modifiers, authentication, how to process the content), and the forwarding fields the
/// gateway sets: left out of the trailers passed on, so that a peer merging trailers into the
/// head cannot be handed them this way.
fn barred_in_trailers(name: &HeaderName) -> bool {
    use http::header::*;
    const BARRED: [HeaderName; 19] = [
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        HOST,
        CONNECTION,
        TE,
        TRAILER,
        UPGRADE,
        EXPECT,
        MAX_FORWARDS,
        RANGE,
        AUTHORIZATION,
        PROXY_AUTHORIZATION,
        COOKIE,
        SET_COOKIE,
        CONTENT_ENCODING,
        CONTENT_TYPE,
        CONTENT_RANGE,
        CACHE_CONTROL,
        PROXY_AUTHENTICATE,
    ];
    const FORWARDING: [&str; 5] = [
        "keep-alive",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    ];
    let s = name.as_str();
    BARRED.contains(name) || FORWARDING.contains(&s) || s.starts_with("if-")
}

/// The trailer section after a chunked body's last chunk: `Some(None)` for none,
/// `Some(Some(map))`, or `None` while incomplete.
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, &'static str> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(None));
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((len, fields))) => {
            // httparse also ends a line at a bare LF; only CRLF is taken (see parse_chunk_size).
            if buf[..len]
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
            {
                return Err("trailer line not ended by CRLF");
            }
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name =
                    HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| "bad trailer name")?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| "bad trailer value")?;
                if !barred_in_trailers(&name) {
                    map.append(name, value);
                }
            }
            buf.advance(len);
            Ok(Some(Some(map)))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_TRAILER_BYTES => Ok(None),
        Ok(httparse::Status::Partial) => Err("trailers too large"),
        Err(_) => Err("malformed trailers"),
    }
}

/// What a head's fields say about its body's end and its connection, noted as the head is
/// read (three lookups in the finished map cost more than the comparisons of names).
#[derive(Default)]
pub struct Delimiters {
    pub length: Option<u64>,
    /// Some when `Transfer-Encoding` was sent: whether its last coding is chunked.
    pub chunked: Option<bool>,
    /// A transfer coding other than chunked alone was sent (`gzip, chunked`, two fields): a
    /// coding the other side of the proxy would receive undeclared, since the field stops at
    /// this hop. Refused both ways, as nginx does.
    pub other_coding: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (what an HTTP/1.0 peer asks to keep its connection).
    pub keep_alive: bool,
    /// `Connection` lists a field to remove ([`strip_nominated`]): an option other than
    /// `close`, `keep-alive` or a name that goes anyway. Nearly no message does, and those
    /// that do not need no lookup in their map.
    pub nominates: bool,
}

impl Delimiters {
    /// Notes one field; refuses a bad or a second, different `Content-Length`.
    pub fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), &'static str> {
        if *name == header::CONTENT_LENGTH {
            let n = content_length(value).ok_or("bad Content-Length")?;
            if self.length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers");
            }
            self.length = Some(n);
        } else if *name == header::TRANSFER_ENCODING {
            // Chunked must be the last coding.
            let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
            self.other_coding |=
                self.chunked.is_some() || !value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if *name == header::CONNECTION {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let close = token.eq_ignore_ascii_case(b"close");
                let keep_alive = !close && token.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                // The usual options end here; the list is gone through only for others.
                self.nominates |= !(close || keep_alive) && names_a_field(token);
            }
        }
        Ok(())
    }
}

/// A `Content-Length` value: digits only (blanks around them allowed), at most `u64::MAX`.
/// One pass: every message with a body has one, most have two on their way through.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy; nor does `Expect`, which the
/// gateway answers itself (its `100 Continue` goes when the body is first read), as nginx.
pub fn is_hop_by_hop(n: &HeaderName) -> bool {
    // Standard names compare as enum tags, not strings.
    *n == header::CONNECTION
        || *n == header::EXPECT
        || *n == header::TE
        || *n == header::TRAILER
        || *n == header::TRANSFER_ENCODING
        || *n == header::UPGRADE
        || *n == header::PROXY_AUTHENTICATE
        || *n == KEEP_ALIVE
        || *n == PROXY_CONNECTION
}

/// `Connection` options that name nothing to look up: `close`, `keep-alive`, or names that
/// go anyway ([`is_hop_by_hop`]).
const NOT_LISTED: [&str; 9] = [
    "close",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "transfer-encoding",
    "connection",
    "proxy-connection",
    "proxy-authenticate",
];

/// Whether a `Connection` option (trimmed) names a field to look up and remove.
fn names_a_field(token: &[u8]) -> bool {
    !token.is_empty()
        && !NOT_LISTED
            .iter()
            .any(|f| token.eq_ignore_ascii_case(f.as_bytes()))
}

/// Removes the fields the `Connection` header names (RFC 9110 §7.6.1) from a message as it
/// was received — called when [`Delimiters::nominates`] says there are any: by the proxy for
/// a request, once it has read the client's address from it; by the parser of a node's
/// answer — so that naming a field takes away only what the sender sent: not a field a plugin sets
/// later (an identity an auth plugin adds, a CORS or HSTS header) nor the gateway's own. Left
/// for the proxy: the fixed hop-by-hop names ([`is_hop_by_hop`]; `Connection` and `Upgrade`
/// tell a WebSocket request first), and what [`kept_when_named`] keeps.
pub fn strip_nominated(h: &mut HeaderMap) {
    let listed: smallvec::SmallVec<[HeaderName; 4]> = (h.get_all(header::CONNECTION).iter())
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| names_a_field(t))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| !kept_when_named(n))
        .collect();
    for name in &listed {
        h.remove(name);
    }
}

/// Fields a `Connection` header's naming does not remove: the fixed hop-by-hop names (removed
/// anyway, later), `Host` (the upstream's is the gateway's to write) and `Content-Length`
/// (the body is framed by it: a map without it would describe another message than the one
/// read, and the length the message goes on with is the gateway's to write too).
pub fn kept_when_named(n: &HeaderName) -> bool {
    *n == header::HOST || *n == header::CONTENT_LENGTH || is_hop_by_hop(n)
}

/// Header fields as HTTP/1 writes them: `name: value` lines.
pub fn put_fields(buf: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        put_field(buf, name, value);
    }
}

/// One `name: value` line.
#[inline]
pub fn put_field(buf: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    buf.extend_from_slice(name.as_str().as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// A field a proxy sets on a message it sends on, in place of those of the same name in the
/// message it received: a value, or `None` for a name left out altogether.
pub type SetField<'a> = (&'a HeaderName, Option<&'a HeaderValue>);
/// Fields set as [`SetField`] says.
pub type SetFields<'a> = [SetField<'a>];

/// [`put_fields`] with `set` applied on the way: `set`'s values first, in its order (a
/// `Host` it holds goes first, as RFC 9112 §3.2 asks of a client), then the map's fields less
/// those `set` names. The map stays as received, and no field is inserted into it (a map
/// insert of a name outside the standard ones hashes it and probes, about 230 instructions;
/// comparing names costs a few). Each field about to be written goes through `each` first,
/// which notes what its caller needs of it (framing, a `Date`) and may leave it out (false).
pub fn put_fields_setting<'a>(
    buf: &mut Vec<u8>,
    fields: &'a HeaderMap,
    set: &SetFields<'a>,
    mut each: impl FnMut(&'a HeaderName, &'a HeaderValue) -> bool,
) {
    let set_values = set.iter().filter_map(|(n, v)| Some((*n, (*v)?)));
    let kept = fields
        .iter()
        .filter(|(n, _)| !set.iter().any(|(s, _)| s == n));
    for (name, value) in set_values.chain(kept) {
        if each(name, value) {
            put_field(buf, name, value);
        }
    }
}

/// How a body goes out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyOut {
    Length(u64),
    Chunked,
    /// As it comes; the connection's close ends it (answers to HTTP/1.0 clients).
    Close,
}

/// Why sending a body stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The body itself failed.
    #[error("{0}")]
    Body(BoxError),
    /// The body did not match the `Content-Length` it was sent with.
    #[error("body length differs from its Content-Length {0}")]
    Length(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes `body` framed as `out` says (`buf` is scratch room for the framing). Returns the
/// bytes of data written.
pub async fn send_body<W, B>(
    wr: &mut W,
    buf: &mut Vec<u8>,
    mut body: B,
    out: BodyOut,
) -> Result<u64, SendError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(SendError::Body)?;
        buf.clear();
        let data = match frame.into_data() {
            Ok(data) if data.is_empty() => continue,
            Ok(data) => data,
            Err(frame) => {
                // Trailers go only where the framing has room for them.
                if let (BodyOut::Chunked, Ok(trailers)) = (out, frame.into_trailers()) {
                    buf.extend_from_slice(b"0\r\n");
                    put_fields(buf, &trailers);
                    buf.extend_from_slice(b"\r\n");
                    wr.write_all(buf).await?;
                    wr.flush().await?;
                    return Ok(sent);
                }
                continue;
            }
        };
        sent += data.len() as u64;
        match out {
            BodyOut::Length(n) if sent > n => return Err(SendError::Length(n)),
            BodyOut::Length(_) | BodyOut::Close => wr.write_all(&data).await?,
            BodyOut::Chunked => {
                if data.len() <= COALESCE {
                    put_chunk(buf, &data);
                    wr.write_all(buf).await?;
                } else {
                    put_chunk_size(buf, data.len());
                    wr.write_all(buf).await?;
                    wr.write_all(&data).await?;
                    wr.write_all(b"\r\n").await?;
                }
            }
        }
        // A stream that buffers (TLS to a node) sends what it holds before the next frame
        // is waited for; a socket's flush does nothing.
        wr.flush().await?;
    }
    match out {
        BodyOut::Length(n) if sent != n => Err(SendError::Length(n)),
        BodyOut::Chunked => {
            wr.write_all(b"0\r\n\r\n").await?;
            wr.flush().await?;
            Ok(sent)
        }
        _ => Ok(sent),
    }
}

/// A chunk's size line.
pub fn put_chunk_size(buf: &mut Vec<u8>, len: usize) {
    buf.extend_from_slice(format!("{len:x}\r\n").as_bytes());
}

/// A `content-length` field line.
pub fn put_length(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(b"content-length: ");
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// A whole chunk: size line, data, CRLF (`data` not empty: an empty chunk ends the body).
pub fn put_chunk(buf: &mut Vec<u8>, data: &[u8]) {
    put_chunk_size(buf, data.len());
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\r\n");
}

/// Whether an answer has no body whatever its headers say (RFC 9112 §6.3): one to HEAD, a
/// 1xx, 204 or 304.
pub fn bodiless(status: http::StatusCode, head_request: bool) -> bool {
    head_request
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

thread_local! {
    /// The header names this worker's upstreams answered with lately (a worker serves from
    /// one thread).
    pub static UPSTREAM_NAMES: std::cell::RefCell<Names> = std::cell::RefCell::new(Names::default());
    /// The header names this worker's clients sent lately.
    pub static CLIENT_NAMES: std::cell::RefCell<Names> = std::cell::RefCell::new(Names::default());
}

/// Header names as received and as parsed. A peer sends the same few names in every message,
/// spelled the same way, and comparing the bytes costs less than parsing the name again
/// (`HeaderName::from_bytes` lower-cases it and looks it up among the standard names). A
/// small table indexed by the name's length and a few of its bytes: a name is compared with
/// one remembered name at most, and one that collides replaces it.
#[derive(Default)]
pub struct Names {
    slots: Vec<Option<(Box<[u8]>, HeaderName)>>,
}

impl Names {
    pub const SLOTS: usize = 64;

    fn slot(raw: &[u8]) -> usize {
        let (first, mid, last) = (raw[0], raw[raw.len() / 2], raw[raw.len() - 1]);
        let h = raw.len() ^ (first as usize) << 1 ^ (mid as usize) << 2 ^ (last as usize) << 3;
        h % Self::SLOTS
    }

    /// `raw` as a header name; None when it is not one.
    pub fn parse(&mut self, raw: &[u8]) -> Option<HeaderName> {
        if raw.is_empty() {
            return None;
        }
        if self.slots.is_empty() {
            self.slots.resize(Self::SLOTS, None);
        }
        let slot = &mut self.slots[Self::slot(raw)];
        if let Some((r, name)) = slot {
            if **r == *raw {
                return Some(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        *slot = Some((Box::from(raw), name.clone()));
        Some(name)
    }
}

/// Where each field of a parsed head lies in the buffer that starts at `base`: the name's and
/// the value's offset and length. Taken while the parser's borrow lasts, so that the fields can
/// share the head's bytes once it is split off the buffer ([`read_fields`]).
pub type FieldSpans = smallvec::SmallVec<[(usize, usize, usize, usize); 16]>;

#[inline]
pub fn field_spans(base: usize, fields: &[httparse::Header<'_>]) -> FieldSpans {
    fields
        .iter()
        .map(|h| {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            (n, h.name.len(), v, h.value.len())
        })
        .collect()
}

/// The fields at `spans` of `head` into `headers` — spans of a head httparse parsed with its
/// default configuration (see the value's SAFETY note): names through `names` (remembered as
/// received), values sharing `head`'s bytes, every field noted in the returned
/// [`Delimiters`]; a field `keep` refuses is noted but left out of the map. (The map is the
/// caller's, not returned: moving it out through the thread-local's closure cost copies.)
#[inline]
pub fn read_fields(
    names: &'static std::thread::LocalKey<std::cell::RefCell<Names>>,
    head: &Bytes,
    spans: FieldSpans,
    headers: &mut HeaderMap,
    mut keep: impl FnMut(&HeaderName, &HeaderValue) -> bool,
) -> Result<Delimiters, &'static str> {
    let mut delimiters = Delimiters::default();
    names.with_borrow_mut(|names| {
        for (n, nl, v, vl) in spans {
            let name = names.parse(&head[n..n + nl]).ok_or("bad header name")?;
            // SAFETY (validity, not memory): the spans are of values httparse took, with its
            // default configuration (no obsolete line folding), and the bytes it takes in a
            // value (HTAB, SP to `~`, 0x80–0xFF) are exactly those `HeaderValue` allows: the
            // check `from_maybe_shared` would make again, a few instructions a byte, cannot
            // fail. (Debug builds still make it.)
            let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(v..v + vl)) };
            delimiters.note(&name, value.as_bytes())?;
            if keep(&name, &value) {
                headers.append(name, value);
            }
        }
        Ok::<_, &'static str>(())
    })?;
    Ok(delimiters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_are_digits_alone() {
        for ok in ["0", "12", " 7 ", "007", "18446744073709551615"] {
            let expected = ok.trim().parse::<u64>().ok();
            assert_eq!(content_length(ok.as_bytes()), expected, "{ok:?}");
            assert!(expected.is_some());
        }
        for bad in [
            "",
            " ",
            "+1",
            "-1",
            "1 2",
            "0x1",
            "1.0",
            "18446744073709551616",
            "١",
        ] {
            assert_eq!(content_length(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_limited_by_value_as_nginx_limits_them() {
        let size = |line: &str| parse_chunk_size(line.as_bytes()).map(|s| s.map(|(_, n)| n));
        assert_eq!(size("00000000000000000005\r\n"), Ok(Some(5)));
        assert_eq!(size("7fffffffffffffff\r\n"), Ok(Some(i64::MAX as u64)));
        assert_eq!(size("8000000000000000\r\n"), Err("chunk size too large"));
        assert_eq!(size("10000000000000000\r\n"), Err("chunk size too large"));
        assert_eq!(size("000000"), Ok(None));
        let zeros = "0".repeat(MAX_SIZE_LINE);
        assert_eq!(size(&zeros), Err("chunk size line too long"));
    }

    /// `read_fields` builds values unchecked because httparse takes exactly the bytes
    /// `HeaderValue` allows: every byte, at offsets that reach httparse's byte-at-a-time
    /// check and its 8-, 16- and 32-byte ones (SWAR, SSE4.2, AVX2) in a 70-byte value.
    #[test]
    fn httparse_takes_exactly_the_value_bytes_header_value_allows() {
        for at in [1, 7, 12, 20, 40, 68] {
            for b in 0..=255u8 {
                let mut value = [b'a'; 70];
                value[at] = b;
                let wire = [&b"X: "[..], &value, b"\r\n\r\n"].concat();
                let mut slots = [httparse::EMPTY_HEADER; 4];
                let taken = matches!(
                    httparse::parse_headers(&wire, &mut slots),
                    Ok(httparse::Status::Complete((_, [f]))) if f.value == value
                );
                let valid = HeaderValue::from_bytes(&value).is_ok();
                assert_eq!(taken, valid, "byte {b:#04x} at {at}");
            }
        }
    }

    #[test]
    fn remembered_names_parse_as_before() {
        let mut names = Names::default();
        // More distinct names than there are slots, twice: each parses to itself every time,
        // in any spelling, whether it was remembered or pushed out.
        for round in 0..2 {
            for i in 0..Names::SLOTS * 2 {
                let raw = format!("X-Name-{i}");
                let name = names.parse(raw.as_bytes()).unwrap();
                assert_eq!(name.as_str(), raw.to_ascii_lowercase(), "round {round}");
            }
            assert_eq!(names.parse(b"Content-Type"), Some(header::CONTENT_TYPE));
            assert_eq!(names.parse(b"content-type"), Some(header::CONTENT_TYPE));
            assert_eq!(names.parse(b"bad name"), None);
            assert_eq!(names.parse(b""), None);
        }
    }

    /// A chunked body read a byte at a time gives the same data and trailers as one read
    /// whole; a bad size line or a missing CRLF is refused.
    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 9\r\n\r\nNEXT";
        for step in [1, 3, wire.len()] {
            let mut buf = BytesMut::new();
            let mut framing = Framing::CHUNKED;
            let (mut data, mut trailers, mut fed) = (Vec::new(), None, 0);
            loop {
                match decode(&mut buf, &mut framing).unwrap() {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::Trailers(t) => trailers = Some(t),
                    Decoded::End => break,
                    Decoded::More => {
                        let end = (fed + step).min(wire.len());
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
                if framing == Framing::Empty {
                    break;
                }
            }
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "9", "step {step}");
            assert!(wire[..fed].ends_with(b"\r\n\r\n") || buf.starts_with(b"NEXT"));
        }
        for bad in [
            &b"zz\r\n"[..],
            b"2\r\nabXY",
            b"2;\nab\r\n",
            b"2\n",
            b"11111111111111111\r\n",
            b"0\r\nX: a\n\n",
            b"2\r\nab\r\n0\r\nX: a\r\n\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let mut framing = Framing::CHUNKED;
            let r = std::iter::from_fn(|| Some(decode(&mut buf, &mut framing)))
                .find(|r| !matches!(r, Ok(Decoded::Data(_))))
                .unwrap();
            assert!(r.is_err(), "{bad:?}: {r:?}");
        }
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        let mut framing = Framing::Length(4);
        assert!(matches!(decode(&mut buf, &mut framing), Ok(Decoded::Data(d)) if d == "abcd"));
        assert_eq!((framing, &buf[..]), (Framing::Empty, &b"ef"[..]));
    }

    /// Framing out of proportion to its data is refused, as Go bounds it: a long extension,
    /// or a size padded with zeros, on one-byte chunks; one-byte chunks without them are taken
    /// however many come, and so are a few long extensions.
    #[test]
    fn chunk_framing_is_bounded_by_its_data() {
        let decode_all = |wire: Vec<u8>| -> Result<usize, &'static str> {
            let mut buf = BytesMut::from(&wire[..]);
            let mut framing = Framing::CHUNKED;
            let mut data = 0;
            loop {
                match decode(&mut buf, &mut framing)? {
                    Decoded::Data(d) => data += d.len(),
                    Decoded::End | Decoded::Trailers(_) => return Ok(data),
                    Decoded::More => return Err("incomplete"),
                }
            }
        };
        let repeated = |chunk: &str, n: usize| [chunk.repeat(n).as_bytes(), b"0\r\n\r\n"].concat();
        assert_eq!(decode_all(repeated("1\r\nA\r\n", 100_000)), Ok(100_000));
        let long = format!("1;{}\r\nA\r\n", "e".repeat(4000));
        assert_eq!(decode_all(repeated(&long, 3)), Ok(3));
        let padded = format!("{}1\r\nA\r\n", "0".repeat(4000));
        for chunk in [long, padded] {
            assert_eq!(
                decode_all(repeated(&chunk, 10)),
                Err("chunk framing out of proportion to its data")
            );
        }
    }
}
