//! HTTP/1.1 toward clients: request heads parsed off the connection, request bodies read as
//! the proxy asks for them, responses written.
//!
//! hyper's server did this before (docs/BENCHMARKS.md §6): it keeps the connection in a task
//! of its own and hands each request body over through a channel; its share of a request
//! without plugins was about a third of the worker's instructions. Here the connection's task
//! runs the request itself, the request body reads straight from the connection when the
//! proxy polls it, and the response head is written from a buffer the connection keeps,
//! together with the first piece of a small body.
//!
//! What it keeps from hyper and nginx: pipelined requests answered in order, keep-alive by the
//! version's default and `Connection`, `Expect: 100-continue` answered when the body is first
//! read (not when a plugin or the router refuses first), `Content-Length` and chunked request
//! bodies, a request with both or with an unknown coding refused (400: the way requests are
//! smuggled), at most 100 headers in a head of `client_max_header_size` (431),
//! `Date` on every answer, and a connection whose client left abandoned with its request.

use crate::body::{BoxError, ProxyBody};
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use wasmgate_http1::codec::{self, put_fields, BodyOut, Decoded, Delimiters, Framing};
pub use wasmgate_http1::request::{parse_head, Head, Meta, Refusal};

/// What one read asks of the socket for a head.
const READ_CHUNK: usize = 4 * 1024;
/// Largest read for a request body.
const MAX_BODY_READ: usize = 64 * 1024;
/// How long a connection closed with input left unread keeps reading (and dropping) it, so
/// that the client gets the answer instead of a reset (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);
/// What an interim answer to `Expect: 100-continue` says.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A client connection, shared by its task and the body of the request being served.
#[derive(Clone)]
pub struct Conn(Arc<Mutex<Inbound>>);

struct Inbound {
    io: TcpStream,
    /// Bytes read and not yet taken: the rest of a head, body bytes, pipelined requests.
    /// Heads and body chunks are split off it and shared by the values and frames made of them.
    rbuf: BytesMut,
    /// How much of the current request's body is left to read.
    framing: Framing,
    /// The request being served; a body kept past its request reads nothing more.
    seq: u64,
    /// Bytes of `100 Continue` still to send when the body is first read.
    continue_left: usize,
    /// The answer has started: too late for `100 Continue`.
    responding: bool,
    /// The request body failed (bad framing, the client's close): the connection ends.
    broken: bool,
}

/// Why waiting for a request head ended without one.
pub enum NoHead {
    /// The client closed, or the connection failed.
    Closed,
    Refused(Refusal),
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn(Arc::new(Mutex::new(Inbound {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            framing: Framing::Empty,
            seq: 0,
            continue_left: 0,
            responding: false,
            broken: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inbound> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no byte of a next request has arrived.
    pub fn nothing_buffered(&self) -> bool {
        self.lock().rbuf.is_empty()
    }

    /// Polls for the next request head, `max` bytes at most.
    pub fn poll_head(&self, cx: &mut Context<'_>, max: usize) -> Poll<Result<Head, NoHead>> {
        let mut g = self.lock();
        let g = &mut *g;
        loop {
            if !g.rbuf.is_empty() {
                match parse_head(&mut g.rbuf, max) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(r) => return Poll::Ready(Err(NoHead::Refused(r))),
                }
            }
            match ready!(poll_read(&mut g.io, &mut g.rbuf, cx, READ_CHUNK)) {
                Ok(0) | Err(_) => return Poll::Ready(Err(NoHead::Closed)),
                Ok(_) => {}
            }
        }
    }

    /// The request `head` describes, its body read from this connection.
    pub fn request(&self, head: Head) -> Request<ClientBody> {
        let seq = {
            let mut g = self.lock();
            g.seq += 1;
            g.framing = head.framing;
            g.continue_left = if head.expect_continue {
                CONTINUE.len()
            } else {
                0
            };
            g.responding = false;
            g.broken = false;
            g.seq
        };
        let body = ClientBody {
            conn: self.clone(),
            seq,
            hint: head.framing,
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        req
    }

    /// Polls whether the client is gone while its request is served: once its body has been
    /// read, the connection is read on (pipelined requests are kept for later) until it closes.
    /// A client that closes before its answer abandons the request, as with hyper and nginx.
    pub fn poll_gone(&self, cx: &mut Context<'_>, max: usize) -> Poll<()> {
        let mut g = self.lock();
        let g = &mut *g;
        if g.framing != Framing::Empty || g.rbuf.len() >= max {
            return Poll::Pending;
        }
        match ready!(poll_read(&mut g.io, &mut g.rbuf, cx, READ_CHUNK)) {
            Ok(0) | Err(_) => Poll::Ready(()),
            // A pipelined request: kept, and the next poll reads on.
            Ok(_) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// Writes `resp` for the request `meta` describes (`wbuf`: the connection's scratch room).
    /// Returns whether the connection may carry another request.
    pub async fn respond(
        &self,
        wbuf: &mut Vec<u8>,
        resp: Response<ProxyBody>,
        meta: &Meta,
    ) -> Result<bool, codec::SendError> {
        self.lock().responding = true;
        let (parts, mut body) = resp.into_parts();
        let (out, keep_alive) = encode_head(wbuf, &parts, &body, meta);
        let Some(out) = out else {
            drop(body);
            self.writer().write_all(wbuf).await?;
            return Ok(keep_alive);
        };
        // A first piece of body that is there already goes out with the head.
        let mut first = None;
        let once = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx)));
        if let Poll::Ready(frame) = once.await {
            match frame {
                Some(Ok(f)) => first = Some(f),
                Some(Err(e)) => return Err(codec::SendError::Body(e)),
                None => {}
            }
        }
        let mut sent = 0u64;
        if let Some(data) = first.as_mut().and_then(|f| f.data_mut()) {
            if data.len() <= codec::COALESCE {
                let data = std::mem::take(data);
                sent = data.len() as u64;
                if out == BodyOut::Chunked && !data.is_empty() {
                    codec::put_chunk_size(wbuf, data.len());
                    wbuf.extend_from_slice(&data);
                    wbuf.extend_from_slice(b"\r\n");
                } else {
                    wbuf.extend_from_slice(&data);
                }
                first = None;
            }
        }
        let mut w = self.writer();
        w.write_all(wbuf).await?;
        let out = match out {
            BodyOut::Length(n) => {
                BodyOut::Length(n.checked_sub(sent).ok_or(codec::SendError::Length(n))?)
            }
            out => out,
        };
        let rest = Prepend { first, body };
        codec::send_body(&mut w, wbuf, rest, out).await?;
        Ok(keep_alive)
    }

    /// After the answer: whether the connection can carry the next request. A body the proxy
    /// did not read (a request refused early) is skipped when it is all here; otherwise the
    /// connection cannot find the next request and ends.
    pub fn finish_request(&self) -> bool {
        let mut g = self.lock();
        let g = &mut *g;
        g.seq += 1;
        g.responding = false;
        g.continue_left = 0;
        loop {
            match codec::decode(&mut g.rbuf, &mut g.framing) {
                Ok(Decoded::Data(_)) | Ok(Decoded::Trailers(_)) => continue,
                Ok(Decoded::End) => return !g.broken,
                Ok(Decoded::More) | Err(_) => return false,
            }
        }
    }

    /// Closes after reading (and dropping) what the client still sends, for at most
    /// [`LINGER`]: closing on unread input makes the kernel answer with a reset, and a reset
    /// can destroy the answer before the client read it.
    pub async fn linger_close(&self) {
        let _ = self.writer().shutdown().await;
        let mut scratch = BytesMut::new();
        let drain = std::future::poll_fn(|cx| loop {
            scratch.clear();
            let mut g = self.lock();
            match ready!(poll_read(&mut g.io, &mut scratch, cx, READ_CHUNK)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => continue,
            }
        });
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    fn writer(&self) -> Writer<'_> {
        Writer(self)
    }
}

/// Reads into `buf`, making room for `want` (within reason) first.
fn poll_read(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(want.clamp(READ_CHUNK, MAX_BODY_READ));
    }
    let dst = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(dst);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Puts the status line and headers of an answer into `wbuf`, with the framing of its body.
/// Returns how the body goes out (None: it has none) and whether the connection stays.
fn encode_head(
    wbuf: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &ProxyBody,
    meta: &Meta,
) -> (Option<BodyOut>, bool) {
    let status = parts.status;
    wbuf.clear();
    wbuf.extend_from_slice(match meta.version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    wbuf.extend_from_slice(status.as_str().as_bytes());
    wbuf.push(b' ');
    wbuf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    put_fields(wbuf, &parts.headers);
    let mut keep_alive = meta.keep_alive;
    let mut delimiters = Delimiters::default();
    for (name, value) in parts.headers.iter().filter(|(n, _)| is_delimiter(n)) {
        // A length the proxy itself could not read is left to the body's own size.
        let _ = delimiters.note(name, value.as_bytes());
    }
    keep_alive &= !delimiters.close;
    if !parts.headers.contains_key(header::DATE) {
        put_date(wbuf);
    }
    let bodiless = meta.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let out = match (bodiless, delimiters.length, body.size_hint().exact()) {
        (true, _, _) => None,
        (false, Some(n), _) => Some(BodyOut::Length(n)),
        (false, None, Some(n)) => {
            wbuf.extend_from_slice(b"content-length: ");
            codec::put_decimal(wbuf, n);
            wbuf.extend_from_slice(b"\r\n");
            Some(BodyOut::Length(n))
        }
        (false, None, None) if meta.version == Version::HTTP_11 => {
            wbuf.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Some(BodyOut::Chunked)
        }
        (false, None, None) => {
            keep_alive = false;
            Some(BodyOut::Close)
        }
    };
    match (keep_alive, meta.version) {
        (false, _) if !delimiters.close => wbuf.extend_from_slice(b"connection: close\r\n"),
        (true, Version::HTTP_10) => wbuf.extend_from_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    wbuf.extend_from_slice(b"\r\n");
    (out, keep_alive)
}

/// Whether a response header bears on the framing or the connection.
fn is_delimiter(name: &header::HeaderName) -> bool {
    *name == header::CONTENT_LENGTH || *name == header::CONNECTION
}

thread_local! {
    /// The `Date` header of the current second (a worker serves from one thread).
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

/// A `date:` line for now, formatted once a second.
fn put_date(wbuf: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == text.len() {
                text.copy_from_slice(s.as_bytes());
                *at = secs;
            }
        }
        wbuf.extend_from_slice(b"date: ");
        wbuf.extend_from_slice(text);
        wbuf.extend_from_slice(b"\r\n");
    });
}

/// The connection as something to write to.
struct Writer<'a>(&'a Conn);

impl AsyncWrite for Writer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0.lock().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_shutdown(cx)
    }
}

/// A body with a frame already taken off put back in front.
struct Prepend {
    first: Option<Frame<Bytes>>,
    body: ProxyBody,
}

impl Body for Prepend {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        self.body.as_mut().poll_frame(cx)
    }
}

/// A client's request body, read from its connection as the proxy polls it.
pub struct ClientBody {
    conn: Conn,
    seq: u64,
    /// The framing the request came with, for its size.
    hint: Framing,
}

/// The client's body broke HTTP/1 framing or stopped short: the client's fault (400).
#[derive(Debug)]
pub struct BadClientBody(pub &'static str);

impl std::fmt::Display for BadClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body: {}", self.0)
    }
}

impl std::error::Error for BadClientBody {}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut g = self.conn.lock();
        let g = &mut *g;
        if g.seq != self.seq {
            return Poll::Ready(None);
        }
        while g.continue_left > 0 && !g.responding {
            let from = CONTINUE.len() - g.continue_left;
            match ready!(Pin::new(&mut g.io).poll_write(cx, &CONTINUE[from..])) {
                Ok(n) if n > 0 => g.continue_left -= n,
                _ => {
                    g.broken = true;
                    return Poll::Ready(Some(Err(Box::new(BadClientBody("connection lost")))));
                }
            }
        }
        loop {
            let failed = match codec::decode(&mut g.rbuf, &mut g.framing) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {
                    match ready!(poll_read(&mut g.io, &mut g.rbuf, cx, g.framing.wants())) {
                        Ok(0) | Err(_) => "the client closed the connection inside it",
                        Ok(_) => continue,
                    }
                }
                Err(e) => e,
            };
            g.broken = true;
            g.framing = Framing::Empty;
            return Poll::Ready(Some(Err(Box::new(BadClientBody(failed)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        let g = self.conn.lock();
        g.seq != self.seq || g.framing == Framing::Empty
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_framed_for_their_request() {
        let meta = Meta {
            head: false,
            version: Version::HTTP_11,
            keep_alive: true,
        };
        let head = |resp: Response<ProxyBody>, meta: &Meta| {
            let mut wbuf = Vec::new();
            let (parts, body) = resp.into_parts();
            let (out, keep) = encode_head(&mut wbuf, &parts, &body, meta);
            (String::from_utf8(wbuf).unwrap(), out, keep)
        };
        let (text, out, keep) = head(Response::new(crate::body::full("abc")), &meta);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("content-length: 3\r\n") && text.contains("date: "),
            "{text}"
        );
        assert_eq!((out, keep), (Some(BodyOut::Length(3)), true));

        let streamed = || {
            Response::new(crate::body::boxed(http_body_util::StreamBody::new(
                futures_util::stream::empty::<Result<Frame<Bytes>, BoxError>>(),
            )))
        };
        let (text, out, _) = head(streamed(), &meta);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert_eq!(out, Some(BodyOut::Chunked));
        let old = Meta {
            version: Version::HTTP_10,
            ..meta
        };
        let (text, out, keep) = head(streamed(), &old);
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert_eq!((out, keep), (Some(BodyOut::Close), false));

        let mut r = Response::new(crate::body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        let (text, out, keep) = head(r, &meta);
        assert_eq!((out, keep), (None, false));
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        assert!(!text.contains("content-length"), "{text}");

        let closing = Meta {
            keep_alive: false,
            ..meta
        };
        let (text, _, keep) = head(Response::new(crate::body::empty()), &closing);
        assert!(text.contains("connection: close\r\n") && !keep, "{text}");
    }
}
