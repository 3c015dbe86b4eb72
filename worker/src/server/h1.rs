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
//! bodies, a request with both lengths refused (400) and one with a coding other than chunked
//! alone (501: the ways requests are smuggled), at most 100 headers in a head of `client_max_header_size` (431),
//! `Date` on every answer, and a connection whose client left abandoned with its request.

use super::io::ClientIo;
use crate::body::{BoxError, ProxyBody};
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use wasmgate_http1::codec::{self, BodyOut, Decoded, Delimiters, Framing, SetFields};
pub use wasmgate_http1::request::{parse_head, Head, Meta, Refusal, Seen};

/// What one read asks of the socket for a head.
const READ_CHUNK: usize = 4 * 1024;
/// Body bytes read ahead of a body not yet polled, to see its client leave.
const READ_AHEAD: usize = 64 * 1024;
/// Largest read for a request body.
const MAX_BODY_READ: usize = 64 * 1024;
/// How long a connection closed with input left unread keeps reading (and dropping) it, so
/// that the client gets the answer instead of a reset (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);
/// What an interim answer to `Expect: 100-continue` says.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A client connection, shared by its task and the body of the request being served.
#[derive(Clone)]
pub struct Conn(Arc<Shared>);

/// A connection's state, and whether it speaks TLS: kept outside the lock, so that a plain
/// connection's flushes take none (and in the same allocation, so that a `Conn`, moved with
/// every request and its body, stays one pointer).
struct Shared {
    tls: bool,
    inbound: Mutex<Inbound>,
}

struct Inbound {
    io: ClientIo,
    /// Bytes read and not yet taken: the rest of a head, body bytes, pipelined requests.
    /// Heads and body chunks are split off it and shared by the values and frames made of them.
    rbuf: BytesMut,
    /// How much of the current request's body is left to read.
    framing: Framing,
    /// The request being served; a body kept past its request reads nothing more (an error).
    seq: u64,
    /// Bytes of `100 Continue` still to send when the body is first read.
    continue_left: usize,
    /// The answer has started: too late for `100 Continue`.
    responding: bool,
    /// The request body failed (bad framing, the client's close): the connection ends.
    broken: bool,
    /// The request's body was polled: until then (its headers held by a plugin), the
    /// connection's task reads ahead to see the client leave ([`Conn::poll_gone`]).
    body_polled: bool,
    /// How much of `rbuf` was looked at for the end of a head.
    scanned: usize,
    /// `send_timeout`: how long a write may wait for the client to take more.
    send_timeout: Duration,
    /// The `send_timeout` clock, made the first time a write waits (most connections never
    /// wait); it runs while `stalled`, from the first write that waited since the last one
    /// that went through.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
}

impl Inbound {
    /// Writes to the client under `send_timeout`: a write that waits for the client longer
    /// than that fails with `TimedOut`. The clock restarts with each write that goes through.
    fn poll_send(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if r.is_pending() {
            return self.poll_stall(cx);
        }
        self.stalled = false;
        r
    }

    /// Pushes out what TLS held back (nothing for a socket), under `send_timeout` as writes.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if Pin::new(&mut self.io).poll_flush(cx).is_pending() {
            return self.poll_stall(cx);
        }
        self.stalled = false;
        Poll::Ready(Ok(()))
    }

    /// Ends the writing side (TLS's `close_notify` first), under `send_timeout` as writes.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Pending => self.poll_stall(cx),
            Poll::Ready(r) => {
                self.stalled = false;
                Poll::Ready(r)
            }
        }
    }

    /// Called while a write waits: Pending until `send_timeout` has passed since the wait
    /// began, then the error.
    fn poll_stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.send_timeout;
        if !self.stalled {
            // A new wait: the clock starts now.
            self.stalled = true;
            let deadline = tokio::time::Instant::now() + timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(stall) = &mut self.stall {
            ready!(stall.as_mut().poll(cx));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took nothing for {timeout:?} (send_timeout)"),
        )))
    }
}

/// Why waiting for a request head ended without one.
pub enum NoHead {
    /// The client closed, or the connection failed, or it stayed idle past its timeout.
    Closed,
    /// `client_header_timeout` ran out with part of a head read (nginx's 408).
    TimedOut,
    Refused(Refusal),
}

impl Conn {
    /// A connection whose answers fail when the client takes nothing for `send_timeout`.
    pub fn new(io: ClientIo, send_timeout: Duration) -> Conn {
        let tls = matches!(io, ClientIo::Tls(_));
        let inbound = Mutex::new(Inbound {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            framing: Framing::Empty,
            seq: 0,
            continue_left: 0,
            responding: false,
            broken: false,
            body_polled: false,
            scanned: 0,
            send_timeout,
            stall: None,
            stalled: false,
        });
        Conn(Arc::new(Shared { tls, inbound }))
    }

    /// The socket and what was read past the last request's head, for a tunnel
    /// ([`crate::tunnel`]); None while the request's body is still held elsewhere.
    pub fn into_io(self) -> Option<(ClientIo, BytesMut)> {
        let shared = Arc::try_unwrap(self.0).ok()?;
        let inbound = (shared.inbound.into_inner()).unwrap_or_else(|p| p.into_inner());
        Some((inbound.io, inbound.rbuf))
    }

    fn lock(&self) -> MutexGuard<'_, Inbound> {
        self.0.inbound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no byte of a next request has arrived (empty lines before a request do not
    /// count: clients may send a CRLF after a body).
    pub fn nothing_buffered(&self) -> bool {
        self.lock().rbuf.iter().all(|b| *b == b'\r' || *b == b'\n')
    }

    /// Polls for the next request head, `max` bytes at most. The buffer is parsed only once
    /// the end of a head may be in it: a client sending a byte at a time would otherwise have
    /// the whole head parsed again for every byte.
    pub fn poll_head(&self, cx: &mut Context<'_>, max: usize) -> Poll<Result<Head, NoHead>> {
        let mut g = self.lock();
        let g = &mut *g;
        loop {
            if head_may_end(&g.rbuf, g.scanned) || g.rbuf.len() >= max {
                g.scanned = 0;
                match parse_head(&mut g.rbuf, max) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(r) => return Poll::Ready(Err(NoHead::Refused(r))),
                }
            }
            g.scanned = g.rbuf.len();
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
            g.body_polled = false;
            g.seq
        };
        let body = ClientBody {
            conn: self.clone(),
            seq,
            hint: head.framing,
            seen: head.seen,
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        req
    }

    /// Polls whether the client is gone while its request is served or its answer streams:
    /// once its body has been read, the connection is read on until it closes or the next
    /// request begins. A client that closes before its answer ends abandons the request, as
    /// with hyper and nginx.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.lock();
        let g = &mut *g;
        if g.framing != Framing::Empty && !g.body_polled {
            // A body nothing reads yet (a plugin holds its request's headers, as Envoy holds
            // the whole message): read ahead, up to READ_AHEAD, so that a client that leaves
            // meanwhile is seen; the bytes wait in the buffer for the body.
            if g.rbuf.len() >= READ_AHEAD {
                return Poll::Pending;
            }
        } else if g.framing != Framing::Empty || !g.rbuf.is_empty() {
            // The body is being read (by the request's task: one reader at a time); or a
            // pipelined request is here, and a close that follows it is a half-close after the
            // last request, not a client gone: no more reading until its turn (hyper too).
            return Poll::Pending;
        }
        match ready!(poll_read(&mut g.io, &mut g.rbuf, cx, READ_CHUNK)) {
            Ok(0) | Err(_) => Poll::Ready(()),
            Ok(_) => Poll::Pending,
        }
    }

    /// Writes `resp` for the request `meta` describes (`wbuf`: the connection's scratch room),
    /// with the fields `set` names set on the way (`proxy::answer_fields`); its headers go to
    /// `written` once encoded, before any of the body is read. Returns
    /// whether the connection may carry another request.
    pub async fn respond(
        &self,
        wbuf: &mut Vec<u8>,
        resp: Response<ProxyBody>,
        meta: &Meta,
        set: &SetFields<'_>,
        written: impl FnOnce(http::HeaderMap),
    ) -> Result<bool, codec::SendError> {
        let (mut parts, mut body) = resp.into_parts();
        // A `100 Continue` cut short by a full socket is finished first: the answer's head
        // must not land in the middle of it. A request body left unread that is not all here
        // yet (an early answer) ends the connection: the head says so, for a client that
        // would pipeline the next request.
        let (interim, settled): (&[u8], bool) = {
            let mut g = self.lock();
            g.responding = true;
            let interim = match std::mem::take(&mut g.continue_left) {
                // Begun: its rest. Not begun: too late for it.
                left if left < CONTINUE.len() => &CONTINUE[CONTINUE.len() - left..],
                _ => &[],
            };
            (interim, skip_unread_body(&mut g))
        };
        let meta = &Meta {
            keep_alive: meta.keep_alive && settled,
            ..*meta
        };
        let (out, keep_alive) = encode_head(wbuf, &parts, &body, meta, set);
        // The head is in the buffer: its headers are not needed any more (the plugins that
        // lent them read them in their later callbacks).
        written(std::mem::take(&mut parts.headers));
        let mut w = self.writer();
        w.write_all(interim).await?;
        let Some(out) = out else {
            drop(body);
            w.write_all(wbuf).await?;
            if self.0.tls {
                w.flush().await?;
            }
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
        let mut out = out;
        if let Some(data) = first.as_mut().and_then(|f| f.data_mut()) {
            if data.len() <= codec::COALESCE {
                let data = std::mem::take(data);
                match out {
                    // Never more than the length announced: what follows would read as
                    // another answer.
                    BodyOut::Length(n) if data.len() as u64 > n => {
                        return Err(codec::SendError::Length(n))
                    }
                    BodyOut::Length(n) => {
                        out = BodyOut::Length(n - data.len() as u64);
                        wbuf.extend_from_slice(&data);
                    }
                    BodyOut::Chunked if data.is_empty() => {}
                    BodyOut::Chunked => codec::put_chunk(wbuf, &data),
                    BodyOut::Close => wbuf.extend_from_slice(&data),
                }
                first = None;
            }
        }
        w.write_all(wbuf).await?;
        // TLS holds back what the socket did not take (a socket sends it all).
        if self.0.tls {
            w.flush().await?;
        }
        let rest = Prepend { first, body };
        // A client that leaves while a long answer streams ends it (and its upstream).
        let send = std::pin::pin!(codec::send_body(&mut w, wbuf, rest, out));
        match self.unless_gone(send).await {
            Some(sent) => sent.map(|_| keep_alive),
            None => Err(io::Error::from(io::ErrorKind::ConnectionAborted).into()),
        }
    }

    /// Runs `fut` to its end; None when the client closes the connection first ([`poll_gone`]:
    /// a request it abandoned, an answer it no longer waits for). Pinned where it lies, not
    /// moved: the futures run here are large.
    ///
    /// [`poll_gone`]: Conn::poll_gone
    pub fn unless_gone<'a, F: Future>(
        &'a self,
        mut fut: Pin<&'a mut F>,
    ) -> impl Future<Output = Option<F::Output>> + 'a {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            self.poll_gone(cx).map(|()| None)
        })
    }

    /// After the answer: whether the connection can carry the next request. A body the proxy
    /// did not read (a request refused early) is skipped when it is all here; otherwise the
    /// connection cannot find the next request and ends.
    pub fn finish_request(&self) -> bool {
        let mut g = self.lock();
        g.seq += 1;
        g.responding = false;
        g.continue_left = 0;
        skip_unread_body(&mut g)
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

    /// Closes the connection with a reset instead of a FIN: for a client that takes nothing,
    /// so the kernel drops the answer it still holds for it at once instead of probing a
    /// closed window for minutes (nginx's `reset_timedout_connection`).
    pub fn reset_on_close(&self) {
        let g = self.lock();
        let none = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(g.io.tcp(), nix::sys::socket::sockopt::Linger, &none);
    }
}

/// Whether the bytes of `buf` after `scanned` (and the three before, where an end may have
/// begun) hold an empty line: the end of a head, `\n\n` or `\n\r\n`.
fn head_may_end(buf: &[u8], scanned: usize) -> bool {
    // Most heads come whole in one read, ending the buffer: no scan.
    if buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n") {
        return true;
    }
    let from = scanned.saturating_sub(3);
    buf.get(from..)
        .unwrap_or_default()
        .windows(2)
        .enumerate()
        .any(|(i, w)| {
            w[0] == b'\n'
                && (w[1] == b'\n' || (w[1] == b'\r' && buf.get(from + i + 2) == Some(&b'\n')))
        })
}

/// Reads into `buf`, making room for `want` (within reason) first.
#[inline]
fn poll_read(
    io: &mut ClientIo,
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

/// Skips what is left of the request's body when it is all in the buffer; whether the next
/// request can be found after it.
fn skip_unread_body(g: &mut Inbound) -> bool {
    loop {
        match codec::decode(&mut g.rbuf, &mut g.framing) {
            Ok(Decoded::Data(_)) | Ok(Decoded::Trailers(_)) => continue,
            Ok(Decoded::End) => return !g.broken,
            Ok(Decoded::More) | Err(_) => return false,
        }
    }
}

/// Puts the status line and headers of an answer into `wbuf`, with the framing of its body and
/// `set` applied ([`codec::put_fields_setting`]'s rule). Returns how the body goes out (None: it
/// has none) and whether the connection stays.
fn encode_head(
    wbuf: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &ProxyBody,
    meta: &Meta,
    set: &SetFields<'_>,
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
    let start = wbuf.len();
    // A 204 carries no Content-Length (RFC 9110 §8.6), whatever the upstream or a plugin put.
    let lengths = status != StatusCode::NO_CONTENT && !status.is_informational();
    let mut fields = put_answer_fields(wbuf, &parts.headers, set, lengths);
    if fields.bad_length {
        // A length that does not parse (a plugin's) is not sent: the body's own size is.
        wbuf.truncate(start);
        fields = put_answer_fields(wbuf, &parts.headers, set, false);
    }
    let delimiters = fields.delimiters;
    let mut keep_alive = meta.keep_alive && !delimiters.close;
    if !fields.date {
        put_date(wbuf);
    }
    let bodiless = codec::bodiless(status, meta.head);
    let out = match (bodiless, delimiters.length, body.size_hint().exact()) {
        // The answer to HEAD tells the length a GET would get, when it is known.
        (true, None, Some(n)) if meta.head && n > 0 && lengths => {
            codec::put_length(wbuf, n);
            None
        }
        (true, _, _) => None,
        (false, Some(n), _) => Some(BodyOut::Length(n)),
        (false, None, Some(n)) => {
            codec::put_length(wbuf, n);
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
    // A switch of protocols (101) says `Connection: upgrade`, never `close` beside it.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    match (keep_alive, meta.version) {
        (false, _) if !delimiters.close && !switching => {
            wbuf.extend_from_slice(b"connection: close\r\n")
        }
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

/// What [`put_answer_fields`] saw of the fields it wrote.
struct AnswerFields {
    delimiters: Delimiters,
    /// A `Content-Length` did not parse or two differed.
    bad_length: bool,
    /// A `Date` was among them.
    date: bool,
}

/// Writes the answer's fields with `set` applied ([`codec::put_fields_setting`]), noting on
/// the way what bears on framing and whether a `Date` came with them; `lengths`: whether
/// `Content-Length` fields are written.
fn put_answer_fields(
    wbuf: &mut Vec<u8>,
    headers: &http::HeaderMap,
    set: &SetFields<'_>,
    lengths: bool,
) -> AnswerFields {
    let mut seen = AnswerFields {
        delimiters: Delimiters::default(),
        bad_length: false,
        date: false,
    };
    codec::put_fields_setting(wbuf, headers, set, |name, value| {
        if is_delimiter(name) {
            if *name == header::CONTENT_LENGTH {
                if !lengths {
                    return false;
                }
                let repeat = seen.delimiters.length.is_some();
                seen.bad_length |= seen.delimiters.note(name, value.as_bytes()).is_err();
                // One line: an equal repeat is left out (an unequal one makes `bad_length`,
                // and the body's own size is written instead).
                return !repeat;
            }
            seen.bad_length |= seen.delimiters.note(name, value.as_bytes()).is_err();
        }
        seen.date |= *name == header::DATE;
        true
    });
    seen
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

/// The connection as something to write to, under `send_timeout` (`Inbound::poll_send`).
struct Writer<'a>(&'a Conn);

impl AsyncWrite for Writer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.lock().poll_send(cx, buf)
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS holds back what a full socket did not take; a socket has nothing to flush.
        match self.0 .0.tls {
            false => Poll::Ready(Ok(())),
            true => self.0.lock().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.lock().poll_shutdown(cx)
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
    /// What the parser learned of the request's head.
    seen: Seen,
}

impl ClientBody {
    /// What the parser learned of the request's head: its size as received, its `Host`,
    /// whether `Connection` names fields.
    pub fn seen(&self) -> Seen {
        self.seen
    }
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
            return Poll::Ready(Some(Err(Box::new(BadClientBody(
                "read after its request was answered",
            )))));
        }
        g.body_polled = true;
        while g.continue_left > 0 && !g.responding {
            let from = CONTINUE.len() - g.continue_left;
            match ready!(g.poll_send(cx, &CONTINUE[from..])) {
                Ok(n) if n > 0 => g.continue_left -= n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    g.broken = true;
                    return Poll::Ready(Some(Err(Box::new(BadClientBody(
                        "the client took no 100 Continue for send_timeout",
                    )))));
                }
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
            let (out, keep) = encode_head(&mut wbuf, &parts, &body, meta, &[]);
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
        *r.status_mut() = http::StatusCode::NOT_MODIFIED;
        r.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        let (text, out, keep) = head(r, &meta);
        assert_eq!((out, keep), (None, false));
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        assert!(!text.contains("content-length"), "{text}");

        // A HEAD answered by the gateway itself tells its length; a length that does not
        // parse (a plugin's) is replaced by the body's own.
        let head_meta = Meta { head: true, ..meta };
        let (text, out, _) = head(Response::new(crate::body::full("abc")), &head_meta);
        assert!(
            text.contains("content-length: 3\r\n") && out.is_none(),
            "{text}"
        );
        let mut r = Response::new(crate::body::full("abcd"));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from_static("x1"));
        let (text, out, _) = head(r, &meta);
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
        assert!(text.contains("content-length: 4\r\n"), "{text}");
        assert_eq!(out, Some(BodyOut::Length(4)));

        let closing = Meta {
            keep_alive: false,
            ..meta
        };
        let (text, _, keep) = head(Response::new(crate::body::empty()), &closing);
        assert!(text.contains("connection: close\r\n") && !keep, "{text}");
    }

    /// The fields the server sets replace the answer's own of those names, bear on the
    /// framing as the answer's would, and leave the map as it was.
    #[test]
    fn set_fields_replace_the_answers_own() {
        let meta = Meta {
            head: false,
            version: Version::HTTP_11,
            keep_alive: true,
        };
        let mut r = Response::new(crate::body::full("abc"));
        let h = r.headers_mut();
        h.insert(header::SERVER, http::HeaderValue::from_static("nginx"));
        h.insert(
            header::DATE,
            http::HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        h.insert("x-kept", http::HeaderValue::from_static("1"));
        let (parts, body) = r.into_parts();
        let server = http::HeaderValue::from_static("wasmgate");
        let close = http::HeaderValue::from_static("close");
        let set = [
            (&header::SERVER, Some(&server)),
            (&header::CONNECTION, Some(&close)),
            (&header::VIA, None),
        ];
        let mut wbuf = Vec::new();
        let (out, keep) = encode_head(&mut wbuf, &parts, &body, &meta, &set);
        let text = String::from_utf8(wbuf).unwrap();
        assert_eq!(text.matches("server: ").count(), 1, "{text}");
        assert!(text.contains("server: wasmgate\r\n"), "{text}");
        assert_eq!(text.matches("connection: ").count(), 1, "{text}");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(
            text.contains("x-kept: 1\r\n") && !text.contains("via"),
            "{text}"
        );
        assert_eq!((out, keep), (Some(BodyOut::Length(3)), false));
        assert_eq!(parts.headers[header::SERVER], "nginx");
    }

    #[test]
    fn only_an_empty_line_sends_a_head_to_the_parser() {
        let ends = |text: &str, scanned: usize| head_may_end(text.as_bytes(), scanned);
        assert!(!ends("GET / HTTP/1.1\r\nHost: x\r\n", 0));
        assert!(ends("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0));
        assert!(ends("GET / HTTP/1.1\n\n", 0));
        // The end split across reads is found from where the last look stopped.
        let text = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for scanned in 0..text.len() {
            assert!(ends(text, scanned), "{scanned}");
        }
        assert!(!ends("GET / HTTP/1.1\r\n\r", 0));
    }
}
