//! Client connections: accept (over TLS on the `apisix.ssl` listener: [`tls`], [`io`]), serve
//! HTTP/1.1 with keep-alive ([`h1`]), drain on reload.
//!
//! Draining (SIGQUIT from the master) stops accepting at once — the listening socket stays open
//! in the master and the new workers, so no connection is refused — then lets each connection
//! finish: for [`DRAIN_GRACE`] responses carry `Connection: close` so busy keep-alive clients
//! reconnect to a new worker between requests, after which idle connections are closed.

pub mod h1;
pub mod io;
mod mtls;
mod resume;
pub mod tls;

pub use h1::ClientBody;

use crate::{proxy, tunnel, Worker};
use futures_util::task::AtomicWaker;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wasmgate_http1::codec;

/// How long a draining worker keeps serving keep-alive connections before closing idle ones.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Accepts on `listener` until the drain signal; `tls`: the clients speak TLS (`apisix.ssl`).
pub async fn accept_loop(
    w: Arc<Worker>,
    listener: TcpListener,
    tls: bool,
    mut drain: watch::Receiver<bool>,
) {
    let for_conns = drain.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection(w.clone(), stream, tls, peer, for_conns.clone()));
                }
                Err(e) => {
                    // EMFILE/ENFILE: pause instead of spinning; the backlog holds the clients.
                    tracing::error!("accept() failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = until_drain(&mut drain) => return,
        }
    }
}

/// Resolves once draining starts (the guard `wait_for` returns is dropped here: it is not
/// `Send` and must not live across an await).
async fn until_drain(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await.map(|_| ());
}

/// Counts something in one of the worker's slot gauges (nginx's connection states) for as
/// long as it lives.
struct Gauge<'a>(&'a AtomicU32);

impl<'a> Gauge<'a> {
    fn up(cell: &'a AtomicU32) -> Gauge<'a> {
        cell.fetch_add(1, Ordering::Relaxed);
        Gauge(cell)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection in the worker's status slot for as long as it lives.
struct ConnGuard(Arc<Worker>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0
            .segment
            .slot(self.0.slot)
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    w: Arc<Worker>,
    stream: TcpStream,
    tls: bool,
    peer: SocketAddr,
    mut drain: watch::Receiver<bool>,
) {
    let slot = w.segment.slot(w.slot);
    slot.active_connections.fetch_add(1, Ordering::Relaxed);
    slot.accepted.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(w.clone());
    // The first head is due `client_header_timeout` from here, a TLS handshake included.
    let opened = tokio::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (io, sni) = match tls {
        false => (io::ClientIo::Plain(stream), None),
        // Boxed: the handshake's state would otherwise be part of every connection's future.
        true => match Box::pin(handshake(&w, stream, peer)).await {
            Some((io, info)) => (io, Some(Arc::new(info))),
            None => return,
        },
    };
    let client = proxy::Client::new(peer, local, sni);
    let conn = h1::Conn::new(io, w.send_timeout);
    let mut wbuf = Vec::with_capacity(1024);
    let mut waiting = HeadWait::new(opened, (w.header_timeout, w.keepalive_timeout), &mut drain);
    loop {
        let head = match waiting.next(&conn, w.max_header_size, &slot.reading).await {
            Ok(head) => head,
            Err(h1::NoHead::Closed) => return,
            Err(h1::NoHead::TimedOut) => {
                // nginx's way: logged as 408, the connection closed without an answer.
                tracing::info!(
                    "client timed out while reading client request headers, client: {peer}"
                );
                proxy::log_refused(&w, &client, (408, 0), w.header_timeout);
                return;
            }
            Err(h1::NoHead::Refused(why)) => {
                if let h1::Refusal::Bad(why) = why {
                    tracing::info!("bad request from {peer}: {why}");
                }
                let page = proxy::error_page(why.status());
                let sent = http_body::Body::size_hint(page.body()).exact().unwrap_or(0);
                proxy::log_refused(&w, &client, (why.status().as_u16(), sent), Duration::ZERO);
                let set = proxy::answer_fields(None, false);
                match conn
                    .respond(&mut wbuf, page, &h1::Meta::refusal(), &set, drop)
                    .await
                {
                    Ok(_) => conn.linger_close().await,
                    Err(e) => answer_cut(&conn, peer, &e),
                }
                return;
            }
        };
        // Until the answer is sent (or the tunnel it opened closes).
        let _writing = Gauge::up(&slot.writing);
        let meta = head.meta;
        let req = conn.request(head);
        // Boxed: the request's future holds every phase's state (several KB); made in its box,
        // not copied there.
        let mut handler = {
            let (w, client) = (w.clone(), client.clone());
            Box::into_pin(crate::boxed_in_place(move || proxy::handle(w, req, client)))
        };
        let Some(answer) = conn.unless_gone(handler.as_mut()).await else {
            return; // The client left: its request is dropped, as hyper and nginx do.
        };
        let proxy::Answer {
            mut response,
            back,
            request_id,
        } = answer;
        // A plugin reset the stream: the connection closes without an answer (the request's
        // log phase runs as the answer is dropped).
        if proxy::is_reset(&response) {
            tracing::debug!("request from {peer}: a plugin reset the stream, closing");
            return;
        }
        // A 101 from the node: once it is written, the connection is a tunnel. (A plugin
        // that answered in its place dropped the node's side with the node's answer.)
        let switching = tunnel::switching(&response);
        let tunnel = response
            .extensions_mut()
            .remove::<tunnel::Upstream>()
            .filter(|_| switching);
        // Draining, or keep-alive off: the answer closes the connection.
        let draining = (w.draining.load(Ordering::Relaxed) || w.keepalive_timeout.is_zero())
            && tunnel.is_none();
        let set = proxy::answer_fields(request_id.as_ref(), draining);
        match conn
            .respond(&mut wbuf, response, &meta, &set, |h| back.give(h, &set))
            .await
        {
            Ok(_) if tunnel.is_some() => {
                drop(handler);
                if let (Some(tunnel), Some((io, rest))) = (tunnel, conn.into_io()) {
                    // Boxed: the tunnel's state would otherwise be part of every
                    // connection's future, which is moved and polled for each request.
                    Box::pin(tunnel.run(io, rest, peer)).await;
                }
                return;
            }
            Ok(keep_alive) => {
                if conn.finish_request() && keep_alive {
                    continue;
                }
                // The answer went whole: the client reads it before the close, even with
                // more of its input unread (a body, pipelined requests while draining).
                conn.linger_close().await;
                return;
            }
            // Cut midway (the body failed, the client left or stopped reading): the close
            // says so.
            Err(e) => {
                answer_cut(&conn, peer, &e);
                return;
            }
        }
    }
}

/// The TLS handshake of a client of the `apisix.ssl` listener, within `client_header_timeout`,
/// with the certificate of the SSL object that serves the name it asks for; the stream and
/// that name (None: it sent none).
async fn handshake(
    w: &Arc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(io::ClientIo, proxy::TlsInfo)> {
    let (stream, info) = tls::accept(stream, peer, w.header_timeout, || {
        w.live.current().certs.clone()
    })
    .await?;
    Some((io::ClientIo::Tls(Box::new(io::TlsClient { stream })), info))
}

/// An answer that could not be sent whole. One the client stopped taking (`send_timeout`) is
/// logged, as nginx does at `info`, and its connection reset: the kernel would otherwise hold
/// the unsent rest for a client that reads nothing. One whose body failed on the way (the
/// upstream closed early, sent a broken chunk or went silent; a plugin failed) is an error,
/// as nginx's "upstream prematurely closed connection": the access log alone shows a 200.
fn answer_cut(conn: &h1::Conn, peer: SocketAddr, e: &codec::SendError) {
    match e {
        codec::SendError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            tracing::info!("answer to {peer} cut: {e}");
            conn.reset_on_close();
        }
        // A plugin's failure is in the log already, under the plugins' rate limit. The close
        // is a reset: a client reading to the close (HTTP/1.0, no length) must not take the
        // cut answer for a whole one — and a plugin that reset the stream asked for one.
        codec::SendError::Body(e) if e.is::<crate::wasm_body::PluginBodyFailed>() => {
            tracing::debug!("answer to {peer} cut: {e}");
            conn.reset_on_close();
        }
        codec::SendError::Body(e) => tracing::error!("answer to {peer} cut, its body failed: {e}"),
        codec::SendError::Length(n) => {
            tracing::error!("answer to {peer} cut: its body is not the {n} bytes announced")
        }
        codec::SendError::Io(_) => {}
    }
}

/// Waiting for the next request head on a connection, as nginx waits: the first request's
/// head must come whole within `client_header_timeout` of the connection's start; between
/// requests the connection may stay idle for `keepalive_timeout`, and once the next request's
/// first bytes are in, the rest of its head gets `client_header_timeout`. Once the worker
/// drains, [`DRAIN_GRACE`] for a request to begin.
///
/// One tokio timer serves every wait of the connection. The deadline only moves later from one
/// request to the next, so the timer is left where it was and, when it fires early, moved to
/// the deadline then: a wait costs a reading of the clock instead of an update of tokio's timer
/// wheel per request.
struct HeadWait<'a> {
    header: Duration,
    idle: Duration,
    /// No request came yet: when its head is due (`client_header_timeout` from the
    /// connection's start, its TLS handshake included).
    first: Option<tokio::time::Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
    drained: OnWake<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    /// When draining: the end of the grace.
    grace_end: Option<tokio::time::Instant>,
}

impl<'a> HeadWait<'a> {
    /// `opened`: when the connection was accepted (the first head is due `header` after it).
    fn new(
        opened: tokio::time::Instant,
        (header, idle): (Duration, Duration),
        drain: &'a mut watch::Receiver<bool>,
    ) -> HeadWait<'a> {
        HeadWait {
            header,
            idle,
            first: Some(opened + header),
            timer: Box::pin(tokio::time::sleep_until(opened + header)),
            drained: OnWake::new(Box::pin(until_drain(drain))),
            grace_end: None,
        }
    }

    /// The next head; counted in `reading` while it has begun to arrive and is not whole.
    async fn next(
        &mut self,
        conn: &h1::Conn,
        max: usize,
        reading: &AtomicU32,
    ) -> Result<h1::Head, h1::NoHead> {
        let mut begun: Option<Gauge> = None;
        let now = tokio::time::Instant::now();
        // Idle until bytes come (not for the first request): a head already begun (pipelined)
        // is seen at the first poll, which switches to the header timeout.
        let first = self.first.take();
        let mut idle = first.is_none();
        let mut deadline = first.unwrap_or(now + self.idle);
        std::future::poll_fn(|cx| {
            if self.grace_end.is_none() && Pin::new(&mut self.drained).poll(cx).is_ready() {
                self.grace_end = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            if let Poll::Ready(r) = conn.poll_head(cx, max) {
                return Poll::Ready(r);
            }
            if begun.is_none() && !conn.nothing_buffered() {
                begun = Some(Gauge::up(reading));
            }
            if idle && !conn.nothing_buffered() {
                idle = false;
                deadline = tokio::time::Instant::now() + self.header;
            }
            let limit = match self.grace_end {
                Some(grace) if conn.nothing_buffered() => grace.min(deadline),
                _ => deadline,
            };
            if self.timer.deadline() > limit {
                self.timer.as_mut().reset(limit);
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                if tokio::time::Instant::now() >= limit {
                    return Poll::Ready(Err(match conn.nothing_buffered() {
                        true => h1::NoHead::Closed,
                        false => h1::NoHead::TimedOut,
                    }));
                }
                self.timer.as_mut().reset(limit);
            }
            Poll::Pending
        })
        .await
    }
}

/// A future polled only after its own waker fired (and once at first), however often the task
/// that awaits it is woken for other reasons: the same thing `FuturesUnordered` does for many.
struct OnWake<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WokenFlag>,
    waker: Waker,
}

struct WokenFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> OnWake<F> {
    fn new(inner: F) -> OnWake<F> {
        let flag = Arc::new(WokenFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn on_wake_polls_its_future_only_once_that_future_was_woken() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let counted = {
            let polls = polls.clone();
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                Pin::new(&mut rx).poll(cx)
            })
        };
        let mut f = OnWake::new(counted);
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);
        // The task wakes for other reasons: the inner future is polled the first time only.
        for _ in 0..5 {
            assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        tx.send(7).unwrap();
        assert!(matches!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(Ok(7))));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
