//! Body types on both sides of the proxy.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Any body the proxy sends, to a client or an upstream: every kind of body, boxed (a pinned
/// box of a body is itself a body).
pub type ProxyBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>;

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    Box::pin(body)
}

/// [`boxed`] for a body made here: made in its box, not copied there (see
/// [`crate::boxed_in_place`]).
pub fn made<B>(make: impl FnOnce() -> B) -> ProxyBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    Box::into_pin(crate::boxed_in_place(make))
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

pub fn empty() -> ProxyBody {
    boxed(Empty::new().map_err(|never| match never {}))
}

/// Wraps a response body to count the bytes sent and run `done` once — when the body ends,
/// fails, or is dropped (client gone) — which is where the log phase runs.
pub struct Observed<F: FnOnce(u64, bool) + Send + 'static> {
    inner: ProxyBody,
    sent: u64,
    done: Option<F>,
}

impl<F: FnOnce(u64, bool) + Send + 'static> Observed<F> {
    pub fn new(inner: ProxyBody, done: F) -> Self {
        Observed {
            inner,
            sent: 0,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.done.take() {
            f(self.sent, complete);
        }
    }
}

impl<F: FnOnce(u64, bool) + Send + Unpin + 'static> Body for Observed<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64, bool) + Send + 'static> Drop for Observed<F> {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// How far a request body has been sent upstream (see `proxy::send`).
pub struct SendProgress {
    state: std::sync::Mutex<Progress>,
}

struct Progress {
    /// When the upstream last took a chunk.
    last: std::time::Instant,
    /// When the whole body was sent.
    done: Option<std::time::Instant>,
    /// The upstream asked for more and the client has not sent it yet: a stall that
    /// `client_body_timeout` judges, not the upstream's send timeout.
    awaiting_client: bool,
}

impl SendProgress {
    /// A send that starts now.
    pub fn started() -> SendProgress {
        SendProgress {
            state: std::sync::Mutex::new(Progress {
                last: std::time::Instant::now(),
                done: None,
                awaiting_client: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, done: bool) {
        let mut s = self.lock();
        let now = std::time::Instant::now();
        s.last = now;
        s.awaiting_client = false;
        if done && s.done.is_none() {
            s.done = Some(now);
        }
    }

    fn awaiting_client(&self) {
        self.lock().awaiting_client = true;
    }

    /// When the exchange times out if nothing moves, and which wait that is.
    pub fn deadline(
        &self,
        send: std::time::Duration,
        read: std::time::Duration,
    ) -> (std::time::Instant, &'static str) {
        let s = self.lock();
        match s.done {
            Some(done) => (done + read, READING_HEAD),
            // Re-checked after `send`: by then the client has sent more or timed out.
            None if s.awaiting_client => (std::time::Instant::now() + send, SENDING),
            None => (s.last + send, SENDING),
        }
    }
}

/// The wait `timeout.read` bounds, as logged.
pub const READING_HEAD: &str = "reading the response header";
/// The wait `timeout.send` bounds, as logged.
pub const SENDING: &str = "sending the request";

/// A request body that reports its progress to a [`SendProgress`].
pub struct SendWatch {
    inner: ProxyBody,
    progress: std::sync::Arc<SendProgress>,
}

impl SendWatch {
    pub fn new(inner: ProxyBody, progress: std::sync::Arc<SendProgress>) -> SendWatch {
        SendWatch { inner, progress }
    }
}

impl Body for SendWatch {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.progress.touch(true),
            Poll::Ready(Some(_)) => {
                let end = self.inner.is_end_stream();
                self.progress.touch(end);
            }
            Poll::Pending => self.progress.awaiting_client(),
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client stopped sending its request body for longer than `client_body_timeout`.
#[derive(Debug)]
pub struct ClientBodyTimeout(pub std::time::Duration);

impl std::fmt::Display for ClientBodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client sent no request body data for {:?} (client_body_timeout)",
            self.0
        )
    }
}

impl std::error::Error for ClientBodyTimeout {}

/// A client's request body with nginx's `client_body_timeout`: the clock runs only while the
/// body is being read and nothing arrives (a slow upstream taking chunks does not count), and
/// restarts with every frame. Counts the bytes received, for the bandwidth statistics.
pub struct ReadTimeout {
    inner: ProxyBody,
    timeout: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ReadTimeout {
    pub fn new(
        inner: ProxyBody,
        timeout: std::time::Duration,
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> ReadTimeout {
        ReadTimeout {
            inner,
            timeout,
            timer: None,
            received,
        }
    }
}

impl Body for ReadTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.timer = None;
                if let Some(Ok(d)) = r.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    let n = d.map_or(0, |d| d.len() as u64);
                    this.received
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer = None;
                        Poll::Ready(Some(Err(Box::new(ClientBodyTimeout(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The status to answer when a request failed because of the client's body: 413 when it went
/// over `client_max_body_size` (a chunked body has no Content-Length to check up front), 408
/// when it stalled past `client_body_timeout`, 400 when it broke its framing or stopped short.
/// `None` for any other failure.
pub fn client_fault(e: &(dyn std::error::Error + 'static)) -> Option<http::StatusCode> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return Some(http::StatusCode::PAYLOAD_TOO_LARGE);
        }
        if c.is::<ClientBodyTimeout>() {
            return Some(http::StatusCode::REQUEST_TIMEOUT);
        }
        if c.is::<crate::server::h1::BadClientBody>() {
            return Some(http::StatusCode::BAD_REQUEST);
        }
        cause = c.source();
    }
    None
}
