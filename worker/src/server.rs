//! Client connections: accept, serve HTTP/1.1 with keep-alive, drain on reload.
//!
//! Draining (SIGQUIT from the master) stops accepting at once — the listening socket stays open
//! in the master and the new workers, so no connection is refused — then lets each connection
//! finish: for [`DRAIN_GRACE`] responses carry `Connection: close` so busy keep-alive clients
//! reconnect to a new worker between requests, after which idle connections are closed.

use crate::{proxy, Worker};
use futures_util::task::AtomicWaker;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a draining worker keeps serving keep-alive connections before closing idle ones.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Accepts on `listener` until the drain signal.
pub async fn accept_loop(w: Arc<Worker>, listener: TcpListener, mut drain: watch::Receiver<bool>) {
    let for_conns = drain.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection(w.clone(), stream, peer, for_conns.clone()));
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
    peer: SocketAddr,
    mut drain: watch::Receiver<bool>,
) {
    w.segment
        .slot(w.slot)
        .active_connections
        .fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(w.clone());
    let _ = stream.set_nodelay(true);
    let svc_worker = w.clone();
    let client = proxy::Client::new(peer);
    let svc = hyper::service::service_fn(move |req| {
        let w = svc_worker.clone();
        let client = client.clone();
        // Boxed: the request's future holds every phase's state (several KB), and hyper moves
        // the service's future into its slot for each request; a box moves 8 bytes instead.
        // perf: memcpy fell from 4.8 % to 3.4 % of a worker's time with one plugin. Made in its
        // box, not copied there.
        Box::into_pin(crate::boxed_in_place(move || async move {
            Ok::<_, std::convert::Infallible>(proxy::handle(w, req, client).await)
        }))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(ConnTimer::default())
        .header_read_timeout(w.header_timeout)
        .max_buf_size((w.max_header_size + 16 * 1024).max(16 * 1024))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    // The connection's task wakes a few times per request, for the connection's own I/O: the
    // drain signal is polled only when it woke the task.
    let drained = OnWake::new(until_drain(&mut drain));
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = drained => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(DRAIN_GRACE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// hyper's timer for one client connection. hyper asks for a new timer each time it waits for
/// a request head (`header_read_timeout`); each one moves the connection's single tokio timer
/// forward, which tokio does by updating the deadline of an entry already in its timer wheel,
/// instead of putting a new timer into the wheel and taking it out again for every request.
/// hyper's HTTP/1 server has one timer running at a time, the only kind it asks for; what it
/// is handed is a handle on the same timer.
#[derive(Clone)]
struct ConnTimer(Arc<Mutex<Pin<Box<tokio::time::Sleep>>>>);

impl Default for ConnTimer {
    fn default() -> ConnTimer {
        ConnTimer(Arc::new(Mutex::new(Box::pin(tokio::time::sleep(
            Duration::ZERO,
        )))))
    }
}

impl ConnTimer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pin<Box<tokio::time::Sleep>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.lock().as_mut().reset(deadline.into());
        Box::pin(self.clone())
    }
}

impl Future for ConnTimer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.lock().as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for ConnTimer {}

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
    use hyper::rt::Timer;
    use std::sync::atomic::AtomicUsize;

    /// Each sleep hyper asks for waits for its own deadline, later or earlier than the last
    /// one's, although they share one tokio timer.
    #[tokio::test]
    async fn conn_timer_sleeps_last_as_asked() {
        let timer = ConnTimer::default();
        for ms in [60, 20, 80, 10] {
            let started = Instant::now();
            timer.sleep(Duration::from_millis(ms)).await;
            assert!(started.elapsed() >= Duration::from_millis(ms), "{ms} ms");
        }
        // A sleep dropped before its deadline leaves the next one unaffected.
        let early = timer.sleep(Duration::from_secs(60));
        drop(early);
        let started = Instant::now();
        timer.sleep(Duration::from_millis(30)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(30) && took < Duration::from_secs(30));
    }

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
