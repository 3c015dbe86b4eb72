//! Client connections: accept, serve HTTP/1.1 with keep-alive, drain on reload.
//!
//! Draining (SIGQUIT from the master) stops accepting at once — the listening socket stays open
//! in the master and the new workers, so no connection is refused — then lets each connection
//! finish: for [`DRAIN_GRACE`] responses carry `Connection: close` so busy keep-alive clients
//! reconnect to a new worker between requests, after which idle connections are closed.

use crate::{proxy, Worker};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
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
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(w, req, client).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(w.header_timeout)
        .max_buf_size((w.max_header_size + 16 * 1024).max(16 * 1024))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = until_drain(&mut drain) => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(DRAIN_GRACE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
