//! Request and response bodies through plugins' body callbacks
//! (`proxy_on_request_body` / `proxy_on_response_body`).
//!
//! [`PluginBody`] wraps a body: each chunk goes through [`Plugins::on_body`]; what every plugin
//! lets through is passed on, what a plugin holds back (it paused) waits for more data. The
//! last call has `end_of_stream` set.
//!
//! Before the head of a message is sent, the body is **primed** ([`PluginBody::prime`]): polled
//! until its first bytes are let through. A plugin that buffers the whole body (the usual way
//! to rewrite one) is thus done before the head leaves, so the gateway can set the right
//! `Content-Length`, or answer 413/502 when a buffer cap is hit, or send a plugin's local
//! reply — instead of cutting a message already under way.

use crate::body::{BoxError, ProxyBody};
use crate::plugins::{BodyBufs, BodyStep, Dir, Plugins, WasmRequest};
use bytes::Bytes;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use wasmgate_wasm::{BodyBuf, LocalReply};

/// Why a body was cut.
#[derive(Debug)]
pub enum BodyFailure {
    /// A plugin's buffer went over its `body_buffer_limit`.
    TooLarge,
    /// A plugin answered from a body callback.
    Reply(LocalReply),
    /// A plugin faulted.
    Fault,
    /// The client's body failed: over `client_max_body_size` (413) or stalled (408).
    Client(http::StatusCode),
    /// The body's own source failed before the plugins had it whole: the upstream cut or
    /// stalled its answer's body, or the client its request's.
    Source(BoxError),
}

type Wait = Pin<Box<dyn Future<Output = (BodyBufs, BodyStep)> + Send>>;

/// A body seen by plugins.
pub struct PluginBody {
    inner: ProxyBody,
    req: Arc<Mutex<WasmRequest>>,
    plugins: Arc<Plugins>,
    dir: Dir,
    /// One buffer per HttpContext of the request.
    bufs: BodyBufs,
    /// A plugin's wait for its call-outs' answers, which holds the body (it has the buffers
    /// meanwhile). In a mutex only to be `Sync` as bodies must be; never contended.
    waiting: Option<Mutex<Wait>>,
    /// A frame taken by `prime`, to be returned first.
    front: Option<Frame<Bytes>>,
    /// Trailers that arrived, returned after the last data.
    trailers: Option<Frame<Bytes>>,
    /// The plugins' trailers callbacks ran (they run once, when the body is through).
    trailers_run: bool,
    done: bool,
    failure: FailureSlot,
}

/// Where a body's failure is recorded: in the body, until the proxy asks for a shared handle
/// ([`PluginBody::failure`], for a request body that fails while it streams upstream). A
/// response body is never asked, and so costs no shared allocation.
enum FailureSlot {
    Own(Option<BodyFailure>),
    Shared(Arc<Mutex<Option<BodyFailure>>>),
}

impl FailureSlot {
    fn set(&mut self, f: BodyFailure) {
        match self {
            FailureSlot::Own(slot) => *slot = Some(f),
            FailureSlot::Shared(slot) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
        }
    }

    fn take(&mut self) -> Option<BodyFailure> {
        match self {
            FailureSlot::Own(slot) => slot.take(),
            FailureSlot::Shared(slot) => slot.lock().unwrap_or_else(|e| e.into_inner()).take(),
        }
    }
}

/// What priming found.
pub enum Primed {
    /// The whole body is known (every plugin is done with it): its final length.
    Complete(u64),
    /// Bytes flow; the rest follows as it arrives.
    Streaming,
    Failed(BodyFailure),
}

impl PluginBody {
    pub fn new(
        inner: ProxyBody,
        req: Arc<Mutex<WasmRequest>>,
        plugins: Arc<Plugins>,
        dir: Dir,
    ) -> PluginBody {
        let n = req.lock().unwrap_or_else(|e| e.into_inner()).active.len();
        PluginBody {
            inner,
            req,
            plugins,
            dir,
            bufs: std::iter::repeat_with(BodyBuf::default).take(n).collect(),
            waiting: None,
            front: None,
            trailers: None,
            trailers_run: false,
            done: false,
            failure: FailureSlot::Own(None),
        }
    }

    /// Where a failure after priming is recorded (the request body fails while it streams to
    /// the upstream; the proxy then answers with it instead of a 502).
    pub fn failure(&mut self) -> Arc<Mutex<Option<BodyFailure>>> {
        let slot = match &mut self.failure {
            FailureSlot::Shared(slot) => return slot.clone(),
            FailureSlot::Own(f) => Arc::new(Mutex::new(f.take())),
        };
        self.failure = FailureSlot::Shared(slot.clone());
        slot
    }

    /// Polls until the first bytes are let through, the body ends, or it fails.
    pub async fn prime(&mut self) -> Primed {
        let first = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await;
        match first {
            None => Primed::Complete(0),
            Some(Ok(frame)) => {
                let len = frame.data_ref().map(|d| d.len() as u64).unwrap_or(0);
                // Trailers as the first frame (an empty body with trailers): not a body of
                // a known length, or setting one would drop them.
                let data = frame.is_data();
                self.front = Some(frame);
                // The body is whole and its trailers are in: their callbacks run now, before
                // the head goes, so that a local reply there can still answer.
                if self.done && self.run_trailers().is_err() {
                    return Primed::Failed(self.failure.take().unwrap_or(BodyFailure::Fault));
                }
                if self.done && self.trailers.is_none() && data {
                    Primed::Complete(len)
                } else {
                    Primed::Streaming
                }
            }
            Some(Err(e)) => Primed::Failed(self.failure.take().unwrap_or(BodyFailure::Source(e))),
        }
    }

    fn step(&mut self, data: BodyBuf, end_of_stream: bool) -> Result<Option<Bytes>, BoxError> {
        let mut req = self.req.lock().unwrap_or_else(|e| e.into_inner());
        if self.bufs.len() < req.active.len() {
            self.bufs.resize_with(req.active.len(), BodyBuf::default);
        }
        let step = self
            .plugins
            .on_body(&mut req, self.dir, &mut self.bufs, data, end_of_stream);
        drop(req);
        self.outcome(step)
    }

    /// The trailers (if any came) through the plugins' trailers callbacks, once the body is
    /// through; once.
    fn run_trailers(&mut self) -> Result<(), BoxError> {
        if std::mem::replace(&mut self.trailers_run, true) {
            return Ok(());
        }
        let Some(map) = self.trailers.as_mut().and_then(Frame::trailers_mut) else {
            return Ok(());
        };
        let mut req = self.req.lock().unwrap_or_else(|e| e.into_inner());
        let step = self.plugins.on_trailers(&mut req, self.dir, map);
        drop(req);
        self.outcome(step).map(|_| ())
    }

    /// What a step of the plugins made of a chunk: bytes to pass on, none yet, or a failure.
    fn outcome(&mut self, step: BodyStep) -> Result<Option<Bytes>, BoxError> {
        let failure = match step {
            BodyStep::Wait(wait) => {
                let bufs = std::mem::take(&mut self.bufs);
                let wait = self
                    .plugins
                    .clone()
                    .body_wait(self.req.clone(), self.dir, bufs, wait);
                self.waiting = Some(Mutex::new(Box::pin(wait)));
                return Ok(None);
            }
            BodyStep::Release(v) if v.is_empty() => return Ok(None),
            BodyStep::Release(v) => return Ok(Some(v.into_bytes())),
            BodyStep::TooLarge => BodyFailure::TooLarge,
            BodyStep::Reply(r) => BodyFailure::Reply(r),
            BodyStep::Fail => BodyFailure::Fault,
        };
        let msg = match &failure {
            BodyFailure::TooLarge => "a plugin's body buffer is over its limit",
            BodyFailure::Reply(r) if r.is_reset() => "a plugin reset the stream",
            BodyFailure::Reply(_) => "a plugin answered from a body or trailers callback",
            BodyFailure::Fault | BodyFailure::Client(_) | BodyFailure::Source(_) => {
                "a plugin failed in a body or trailers callback"
            }
        };
        self.failure.set(failure);
        self.done = true;
        Err(Box::new(PluginBodyFailed(msg)))
    }
}

/// A body cut by its plugins (the reason is logged where the plugin failed, under the
/// plugins' rate limit): told apart from a body the upstream cut.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginBodyFailed(pub &'static str);

impl Body for PluginBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.front.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        loop {
            if let Some(wait) = self.waiting.as_mut() {
                let wait = wait.get_mut().unwrap_or_else(|e| e.into_inner());
                let (bufs, step) = ready!(wait.as_mut().poll(cx));
                self.waiting = None;
                self.bufs = bufs;
                match self.outcome(step) {
                    Ok(Some(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                    Ok(None) => continue,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            if self.done {
                if let Err(e) = self.run_trailers() {
                    return Poll::Ready(Some(Err(e)));
                }
                return Poll::Ready(self.trailers.take().map(Ok));
            }
            let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
            let (data, eos) = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => (BodyBuf::from(d), self.inner.is_end_stream()),
                    Err(trailers) => {
                        // Trailers end the data: the last body call comes first.
                        self.trailers = Some(trailers);
                        (BodyBuf::default(), true)
                    }
                },
                Some(Err(e)) => {
                    self.done = true;
                    if let Some(status) = crate::body::client_fault(&*e) {
                        self.failure.set(BodyFailure::Client(status));
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                None => (BodyBuf::default(), true),
            };
            if eos {
                self.done = true;
            }
            match self.step(data, eos) {
                Ok(Some(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(None) => continue,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.waiting.is_none() && self.front.is_none() && self.trailers.is_none()
    }
}
