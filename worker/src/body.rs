//! Body types on both sides of the proxy.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Any body the proxy sends, to a client or an upstream.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
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
    /// (last chunk taken, all sent at)
    state: std::sync::Mutex<(std::time::Instant, Option<std::time::Instant>)>,
}

impl SendProgress {
    pub fn new(already_done: bool) -> SendProgress {
        let now = std::time::Instant::now();
        SendProgress {
            state: std::sync::Mutex::new((now, already_done.then_some(now))),
        }
    }

    fn touch(&self, done: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        s.0 = now;
        if done && s.1.is_none() {
            s.1 = Some(now);
        }
    }

    /// When the exchange times out if nothing moves, and which wait that is.
    pub fn deadline(
        &self,
        send: std::time::Duration,
        read: std::time::Duration,
    ) -> (std::time::Instant, &'static str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.1 {
            Some(done) => (done + read, "reading the response header"),
            None => (s.0 + send, "sending the request"),
        }
    }
}

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
