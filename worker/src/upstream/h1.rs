//! The HTTP/1.1 client the worker speaks to upstream nodes, driven from the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands requests and responses
//! across channels: per request a oneshot, an unbounded channel, a wake-up of the other task,
//! and a header map built through hyper's general-purpose parser. That was about 14,000 of
//! the 35,800 instructions of a plugin-less request (docs/BENCHMARKS.md §6). Here the
//! request's task writes the head from a buffer the connection keeps, parses the answer with
//! `httparse` (what hyper uses underneath), and reads the body straight from the socket in the
//! body's `poll_frame`; the connection goes back to the pool when the body ends.
//!
//! What it keeps from hyper's behaviour: 1xx answers skipped, HEAD / 204 / 304 answers without
//! a body, `Transfer-Encoding: chunked` (with trailers) and `Content-Length` framing in both
//! directions, bodies read to the connection's close, HTTP/1.0 and `Connection: close`
//! answers never pooled, an answer that arrives while the request body is still being sent
//! (a 413, say) relayed, at most [`MAX_HEADERS`] headers in a head of at most
//! [`MAX_HEAD_BYTES`].

use super::io::NodeIo;
use super::pool::Pool;
use crate::body::BoxError;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use wasmgate_http1::codec::{
    self, send_body, BodyOut, Decoded, Delimiters, Framing, SendError, SetFields, MAX_HEADERS,
};

/// Largest response head (or trailer section) taken from an upstream.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// What one read asks of the socket: enough for the head and body of most answers.
const READ_CHUNK: usize = 8 * 1024;
/// How long an answer is waited for once sending the request body failed on the connection
/// (the node may have answered, then closed on the body it would not read).
const ANSWER_AFTER_SEND_FAILED: Duration = Duration::from_millis(200);
/// Reads of long bodies ask for more at a time: a read that fills what it asked for doubles
/// the next one, up to this (a frame holds its read's buffer until the client has it).
const MAX_READ_CHUNK: usize = 512 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed before any of the answer arrived.
    #[error("connection closed before the response ({0})")]
    Closed(io::Error),
    /// The request body failed (the client's body: too large, too slow, gone).
    #[error("request body: {0}")]
    Body(BoxError),
    /// The request body did not match the `Content-Length` it was sent with.
    #[error("request body length differs from its Content-Length {0}")]
    BodyLength(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The node's answer is not valid HTTP/1.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl From<SendError> for ExchangeError {
    fn from(e: SendError) -> ExchangeError {
        match e {
            SendError::Body(e) => ExchangeError::Body(e),
            SendError::Length(n) => ExchangeError::BodyLength(n),
            SendError::Io(e) => ExchangeError::Io(e),
        }
    }
}

impl ExchangeError {
    /// The error to look at for the client's fault (413 / 408).
    pub fn into_box(self) -> BoxError {
        match self {
            ExchangeError::Body(e) => e,
            e => Box::new(e),
        }
    }
}

/// A response head, parsed.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another exchange once the body is read.
    keep_alive: bool,
}

/// A connection with the timer its exchanges are timed by.
///
/// The timer lives as long as the connection and is moved forward for each wait: tokio then
/// only updates the deadline of an entry already in its timer wheel, where a timer per request
/// is put into the wheel and taken out again every time.
pub struct Link {
    pub wire: Wire,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Link {
    pub fn new(io: NodeIo) -> Link {
        Link {
            wire: Wire::new(io),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// A TLS connection's session identity (see [`NodeIo::tag`]); None for a plain one.
    pub fn tag(&self) -> Option<&str> {
        self.wire.io.tag()
    }

    /// The connection's timer, set to fire at `deadline`.
    pub fn timer_at(&mut self, deadline: Instant) -> Pin<&mut tokio::time::Sleep> {
        self.timer.as_mut().reset(deadline.into());
        self.timer.as_mut()
    }

    /// The connection's timer as last set.
    pub fn timer(&mut self) -> Pin<&mut tokio::time::Sleep> {
        self.timer.as_mut()
    }

    /// The wire and the timer, to wait on both.
    pub fn parts(&mut self) -> (&mut Wire, &mut Pin<Box<tokio::time::Sleep>>) {
        (&mut self.wire, &mut self.timer)
    }

    /// The socket and what was read past the answer's head: a connection switched to another
    /// protocol (101) is the tunnel's, never the pool's.
    pub fn into_io(self) -> (NodeIo, BytesMut) {
        (self.wire.io, self.wire.rbuf)
    }
}

/// One connection to a node: the socket, and the buffers its exchanges reuse.
pub struct Wire {
    io: NodeIo,
    /// Bytes read and not yet taken. Heads and body chunks are split off it and shared (not
    /// copied) by the header values and body frames made from them.
    rbuf: BytesMut,
    /// The request head being written; kept for the next one.
    wbuf: Vec<u8>,
}

impl Wire {
    pub fn new(io: NodeIo) -> Wire {
        Wire {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::with_capacity(1024),
        }
    }

    /// Whether an idle connection can carry a request: nothing has arrived on it since its
    /// last exchange (a close, or bytes nobody asked for). Uses the readiness the runtime has
    /// already seen: no system call when the socket is quiet.
    pub fn is_idle_usable(&mut self) -> bool {
        self.rbuf.is_empty() && self.io.is_quiet()
    }

    /// Puts a request head into the write buffer: request line (origin form: `uri`'s path
    /// and query), headers with `set` applied ([`codec::put_fields_setting`]: the proxy's
    /// forwarding fields and `Host`), and the framing of `body` (its `Content-Length` when
    /// known, else chunked). Returns what [`exchange`](Self::exchange) needs to know of the
    /// request.
    pub fn encode_head<B: Body>(
        &mut self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        set: &SetFields<'_>,
        body: &B,
    ) -> Outgoing {
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let w = &mut self.wbuf;
        w.clear();
        w.extend_from_slice(method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        let mut length = None;
        let empty = body.is_end_stream();
        let mut declared = None;
        codec::put_fields_setting(w, headers, set, |name, value| {
            if *name == header::CONTENT_LENGTH {
                // One line, however many equal ones the client sent (unequal ones it was
                // refused for); none for a request without a body (below). A length that is
                // not a number (a plugin's `0x5`) is not written: the body's own framing is,
                // rather than two the node could read differently.
                let first = length.is_none();
                length = length.or(Some(value));
                if first {
                    declared = codec::content_length(value.as_bytes());
                }
                return first && !empty && declared.is_some();
            }
            true
        });
        let out = match (empty, declared, body.size_hint().exact()) {
            // No body goes: a length the request carried (a plugin may have set one) is
            // written as 0, as nginx writes the length of the body it sends. Another number
            // would have the node take the next request on the connection for this body.
            (true, _, _) => {
                if length.is_some() {
                    codec::put_length(w, 0);
                }
                BodyOut::Length(0)
            }
            (false, Some(n), _) => BodyOut::Length(n),
            (false, None, Some(n)) => {
                codec::put_length(w, n);
                BodyOut::Length(n)
            }
            (false, None, None) => {
                w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                BodyOut::Chunked
            }
        };
        w.extend_from_slice(b"\r\n");
        Outgoing {
            body: out,
            head_request: *method == Method::HEAD,
            upgrade: false,
        }
    }

    /// Writes the head put by [`encode_head`](Self::encode_head).
    pub async fn write_head(&mut self) -> io::Result<()> {
        match &mut self.io {
            NodeIo::Plain(tcp) => tcp.write_all(&self.wbuf).await,
            // What TLS holds back when the socket is full goes with the flush.
            NodeIo::Tls(tls) => {
                tls.stream.write_all(&self.wbuf).await?;
                tls.stream.flush().await
            }
        }
    }

    /// After [`write_head`](Self::write_head): sends `body` and returns the answer's head. An
    /// answer that comes while the body is still being sent ends the sending: the node has
    /// decided (a 413, a redirect), and the connection is not reused.
    pub async fn exchange<B>(
        &mut self,
        body: Option<B>,
        out: Outgoing,
    ) -> Result<ResponseHead, ExchangeError>
    where
        B: Body<Data = Bytes, Error = BoxError> + Unpin,
    {
        let Wire { io, rbuf, wbuf } = self;
        if let Some(body) = body {
            let (mut rd, mut wr) = io.split();
            tokio::select! {
                biased;
                sent = send_body(&mut wr, wbuf, body, out.body) => {
                    if let Err(SendError::Io(e)) = sent {
                        // The node may have answered and closed without reading the rest (a
                        // 413): its answer, if it came, is relayed rather than a 502.
                        let late = tokio::time::timeout(
                            ANSWER_AFTER_SEND_FAILED,
                            read_head(&mut rd, rbuf, out),
                        );
                        return match late.await {
                            Ok(Ok(mut head)) => {
                                head.keep_alive = false;
                                Ok(head)
                            }
                            _ => Err(ExchangeError::Io(e)),
                        };
                    }
                    sent?;
                }
                early = read_head(&mut rd, rbuf, out) => {
                    let mut head = early?;
                    head.keep_alive = false;
                    return Ok(head);
                }
            }
        }
        read_head(io, rbuf, out).await
    }
}

/// What an exchange needs to know of the request whose head was encoded.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    body: BodyOut,
    /// The answer to a HEAD request has no body, whatever its headers say.
    head_request: bool,
    /// The request asks to switch protocols (`Upgrade`): a 101 is its answer, not an error.
    upgrade: bool,
}

impl Outgoing {
    /// The request carries `Upgrade` and `Connection: upgrade` (a WebSocket handshake).
    pub fn upgrading(self) -> Outgoing {
        Outgoing {
            upgrade: true,
            ..self
        }
    }
}

/// Reads until a final (non-1xx) response head is complete and takes it off `rbuf`; a 101
/// is final for a request that asked to upgrade. Cancel-safe: a head is consumed only once
/// whole.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    out: Outgoing,
) -> Result<ResponseHead, ExchangeError> {
    let head_request = out.head_request;
    let mut received = !rbuf.is_empty();
    loop {
        // An empty buffer (the usual case: the answer has not come) is not worth parsing.
        let parsed = match rbuf.is_empty() {
            true => None,
            false => parse_head(rbuf, head_request)?,
        };
        if let Some(head) = parsed {
            match head.status.is_informational() {
                // 100 Continue and the like: the real answer follows.
                true if head.status != StatusCode::SWITCHING_PROTOCOLS => continue,
                // To the protocol asked for (the gateway asks for WebSocket only): a 101 must
                // say what it switches to (RFC 9110 §7.8), and an h2c or unnamed one would
                // open a tunnel the client did not ask for.
                true if out.upgrade && upgrades_to_websocket(&head.headers) => return Ok(head),
                true if out.upgrade => {
                    return Err(ExchangeError::Invalid(
                        "101 answer without Upgrade: websocket",
                    ))
                }
                true => return Err(ExchangeError::Invalid("101 answer to a non-upgrade")),
                false => return Ok(head),
            }
        }
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(READ_CHUNK);
        }
        let n = match rd.read_buf(rbuf).await {
            Ok(n) => n,
            Err(e) if !received => return Err(ExchangeError::Closed(e)),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(match received {
                false => ExchangeError::Closed(io::ErrorKind::UnexpectedEof.into()),
                // A failure to read the head (nginx's `error`, retried as one), not an answer
                // that is not HTTP.
                true => ExchangeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside the response head",
                )),
            });
        }
        received = true;
    }
}

/// Whether an answer's `Upgrade` names WebSocket, the one protocol the gateway asks a node
/// to switch to.
fn upgrades_to_websocket(headers: &HeaderMap) -> bool {
    (headers.get_all(http::header::UPGRADE).iter())
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// Parses a response head at the start of `rbuf`; `None` while incomplete.
fn parse_head(
    rbuf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, rbuf, &mut slots);
    let len = match parsed {
        // Over the limit whole as well as in parts: whether a large head is taken must not
        // depend on how the node's writes were split.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Err(ExchangeError::Invalid("response head too large"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if rbuf.len() >= MAX_HEAD_BYTES => {
            return Err(ExchangeError::Invalid("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("more than 100 response headers"))
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed response head")),
    };
    // 100–599 only (RFC 9110 §15): `StatusCode` takes up to 999.
    let status = resp
        .code
        .filter(|c| *c < 600)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Invalid("bad status code"))?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where each name and value lies in the head, so that the values can share its bytes.
    let spans = codec::field_spans(rbuf.as_ptr() as usize, resp.headers);
    let head = rbuf.split_to(len).freeze();
    // Room for what plugins add to the answer, and the `Server` and `X-Request-Id` put into
    // the map given back to them once it is sent, without growing the map.
    let mut headers = HeaderMap::with_capacity(spans.len() + 4);
    // A switch of protocols says which protocol in its `Upgrade`: the client needs it.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let delimiters = codec::read_fields(
        &codec::UPSTREAM_NAMES,
        &head,
        spans,
        &mut headers,
        |n, v| !ends_here(n, v) || (switching && *n == header::UPGRADE),
    )
    .map_err(ExchangeError::Invalid)?;
    if delimiters.nominates {
        codec::strip_nominated(&mut headers);
    }
    if delimiters.other_coding && !codec::bodiless(status, head_request) {
        // The coding would reach the client undeclared (the field stops at this hop):
        // nginx's 502 for an "unknown Transfer-Encoding".
        return Err(ExchangeError::Invalid("unknown Transfer-Encoding"));
    }
    if delimiters.chunked.is_some() && delimiters.length.is_some() {
        // RFC 9112 §6.3: Transfer-Encoding wins, and a proxy removes the length, which
        // would frame the answer differently downstream.
        headers.remove(header::CONTENT_LENGTH);
    }
    let framing = response_framing(&delimiters, status, head_request);
    // Both lengths sent is how requests are smuggled: the answer is read, the connection
    // not trusted again.
    let both = delimiters.chunked.is_some() && delimiters.length.is_some();
    let keep_alive =
        version == Version::HTTP_11 && !delimiters.close && !both && framing != Framing::Close;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Whether a header of the answer stops at this hop (RFC 9110 §7.6.1): the proxy strips
/// them from every answer, and a map that never holds them spares an insert and a removal per
/// request (every nginx upstream sends `Connection: keep-alive`). A `Connection` header that
/// names other headers stays, for [`codec::strip_nominated`] to remove those too. Call-outs'
/// answers reach plugins without them, as Envoy's codec hands them over.
fn ends_here(name: &HeaderName, value: &HeaderValue) -> bool {
    if *name == header::CONNECTION {
        let v = value.as_bytes().trim_ascii();
        return v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close");
    }
    codec::is_hop_by_hop(name)
}

/// How an answer's body is delimited (RFC 9112 §6.3): `Transfer-Encoding` wins over
/// `Content-Length`.
fn response_framing(d: &Delimiters, status: StatusCode, head_request: bool) -> Framing {
    if codec::bodiless(status, head_request) {
        return Framing::Empty;
    }
    match (d.chunked, d.length) {
        (Some(true), _) => Framing::CHUNKED,
        (Some(false), _) | (None, None) => Framing::Close,
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    }
}

/// An upstream response body, read from the connection as the client takes it.
pub struct ResponseBody {
    /// The connection; gone once given back or given up.
    link: Option<Link>,
    framing: Framing,
    keep_alive: bool,
    /// Where the connection goes at the end.
    pool: Arc<Pool>,
    authority: Arc<str>,
    /// Longest wait for the next bytes (`timeout.read`).
    read_timeout: Duration,
    /// Whether the connection's timer is set for the current wait.
    waiting: bool,
    /// How much the next read of a long body asks for.
    read_size: usize,
}

impl ResponseBody {
    pub fn new(
        link: Link,
        head: &ResponseHead,
        pool: Arc<Pool>,
        authority: Arc<str>,
        read_timeout: Duration,
    ) -> ResponseBody {
        let mut body = ResponseBody {
            link: Some(link),
            framing: head.framing,
            keep_alive: head.keep_alive,
            pool,
            authority,
            read_timeout,
            waiting: false,
            read_size: READ_CHUNK,
        };
        if body.framing == Framing::Empty {
            body.finish();
        }
        body
    }

    /// The body has been read: the connection goes back when it can carry another exchange.
    fn finish(&mut self) {
        self.framing = Framing::Empty;
        let Some(link) = self.link.take() else {
            return;
        };
        // Bytes after the answer were never asked for: the connection is not trusted again.
        if self.keep_alive && link.wire.rbuf.is_empty() {
            self.pool.checkin(&self.authority, link);
        }
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.link = None;
        self.framing = Framing::Empty;
        Poll::Ready(Some(Err(e.into())))
    }

    /// Reads more into the buffer; `Ready(Ok(0))` at the node's close. Times the wait.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, BoxError>> {
        let Some(link) = self.link.as_mut() else {
            return Poll::Ready(Err("upstream connection given up".into()));
        };
        let rbuf = &mut link.wire.rbuf;
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(want.clamp(READ_CHUNK, self.read_size));
        }
        let room = rbuf.capacity() - rbuf.len();
        let read = std::pin::pin!(link.wire.io.read_buf(rbuf)).poll(cx);
        if let Poll::Ready(r) = read {
            self.waiting = false;
            if r.as_ref().is_ok_and(|n| *n == room) {
                self.read_size = (self.read_size * 2).min(MAX_READ_CHUNK);
            }
            return Poll::Ready(r.map_err(Into::into));
        }
        let timeout = self.read_timeout;
        let timer = match std::mem::replace(&mut self.waiting, true) {
            true => link.timer(),
            false => link.timer_at(Instant::now() + timeout),
        };
        ready!(timer.poll(cx));
        // An `io::Error` of kind `TimedOut`: a plugin reading the body answers it with a 504.
        let why = format!("upstream read timed out after {timeout:?}");
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why).into()))
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body empty by its framing (HEAD, 204, 304, Content-Length: 0) went back at once;
        // one dropped half-read closes its connection, which HTTP/1.1 cannot reuse.
        if self.framing == Framing::Empty {
            self.finish();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(link) = this.link.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match codec::decode(&mut link.wire.rbuf, &mut this.framing) {
                Ok(Decoded::Data(data)) => Frame::data(data),
                Ok(Decoded::Trailers(trailers)) => Frame::trailers(trailers),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => match ready!(this.poll_fill(cx, this.framing.wants())) {
                    Ok(0) if this.framing == Framing::Close => {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail("upstream closed the connection inside the body"),
                    Ok(_) => continue,
                    Err(e) => return this.fail(e),
                },
                Err(e) => return this.fail(format!("upstream body: {e}")),
            };
            if this.framing == Framing::Empty {
                this.finish();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Empty
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Option<ResponseHead>, ExchangeError> {
        parse_head(&mut BytesMut::from(head), false)
    }

    #[test]
    fn heads_say_how_their_body_ends_and_whether_the_connection_stays() {
        let h = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n";
        let h = parse(h).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(12), true));
        let names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"], "hop-by-hop headers end here");
        assert!(
            h.headers.capacity() > h.headers.len(),
            "room for the proxy's headers"
        );

        // A coding besides chunked would reach the client undeclared: nginx's 502.
        for te in ["gzip, chunked", "gzip", "chunked, chunked"] {
            let h = parse(&format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n"
            ));
            assert!(
                matches!(h, Err(ExchangeError::Invalid("unknown Transfer-Encoding"))),
                "{te}"
            );
        }
        let h = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n");
        let h = h.unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::CHUNKED, true));

        // Both lengths: Transfer-Encoding wins, and the connection is not trusted again.
        let h = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let h = parse(h).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::CHUNKED, false));

        let h = "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n";
        let h = parse(h).unwrap().unwrap();
        assert!(!h.keep_alive);
        assert!(
            h.headers.contains_key(header::CONNECTION),
            "kept: it may name headers"
        );
        // The fields it names are gone as the answer is parsed, before any plugin sees it.
        let h = "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-Kept: 1\r\n\
                 Content-Length: 0\r\n\r\n";
        let h = parse(h).unwrap().unwrap();
        let mut names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "content-length", "x-kept"]);

        let h = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.version, h.keep_alive), (Version::HTTP_10, false));

        let h = parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(h.unwrap().unwrap().framing, Framing::Empty);

        assert!(
            parse("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none(),
            "incomplete"
        );
    }

    #[test]
    fn remembered_names_parse_as_before() {
        // Through the parser: the second answer on the same names reads the same.
        for _ in 0..2 {
            let h = "HTTP/1.1 200 OK\r\nX-Up: 1\r\nContent-Length: 3\r\n\r\n";
            let h = parse(h).unwrap().unwrap();
            assert_eq!(h.headers["x-up"], "1");
            assert_eq!(h.framing, Framing::Length(3));
        }
    }

    #[test]
    fn bad_heads_are_refused_by_name() {
        let refused = |head: String, why: &str| match parse(&head) {
            Err(ExchangeError::Invalid(w)) => assert_eq!(w, why, "{head:?}"),
            _ => panic!("{head:?} taken"),
        };
        refused(
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n".into(),
            "bad Content-Length",
        );
        refused(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".into(),
            "conflicting Content-Length headers",
        );
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        refused(
            format!("HTTP/1.1 200 OK\r\n{many}\r\n"),
            "more than 100 response headers",
        );
        let long = "v".repeat(MAX_HEAD_BYTES);
        refused(
            format!("HTTP/1.1 200 OK\r\nx: {long}"),
            "response head too large",
        );
        // The same, arrived whole in one read.
        refused(
            format!("HTTP/1.1 200 OK\r\nx: {long}\r\n\r\n"),
            "response head too large",
        );
        refused("HTTP/1.1 2000 OK\r\n\r\n".into(), "malformed response head");
    }
}
