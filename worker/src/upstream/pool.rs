//! Keep-alive connections to upstream nodes, one pool per worker.
//!
//! A connection returns to the pool only once its response body has been read to the end
//! ([`PooledBody`]); a response abandoned midway closes its connection, since HTTP/1.1 cannot
//! reuse it. Idle connections expire after `idle_timeout`; at most `max_idle` are kept per node.

use crate::body::{BoxError, ProxyBody};
use crate::FastMap;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A connection ready to carry one request.
pub struct Conn {
    pub link: Link,
    /// Whether it came from the pool (a failure before sending is then retried on a new one).
    pub reused: bool,
}

/// An upstream connection's sending half, with the timer its exchanges are timed by.
///
/// The timer lives as long as the connection and is moved forward for each wait: tokio then
/// only updates the deadline of an entry already in its timer wheel, where a timer per request
/// is put into the wheel and taken out again every time.
pub struct Link {
    pub sender: SendRequest<ProxyBody>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Link {
    pub fn new(sender: SendRequest<ProxyBody>) -> Link {
        Link {
            sender,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
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
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

struct Idle {
    link: Link,
    since: Instant,
}

/// The pool of idle upstream connections.
pub struct Pool {
    /// Per node, oldest first: connections are checked in in time order, so the expired ones
    /// are always a prefix, and the newest (warmest) is taken first.
    idle: Mutex<FastMap<Arc<str>, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(FastMap::default()),
            max_idle,
            idle_timeout,
        })
    }

    /// An idle connection to `authority`, or a new one.
    pub async fn checkout(
        &self,
        authority: &str,
        connect_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        while let Some(mut link) = self.take_idle(authority) {
            if link.sender.is_ready() {
                return Ok(Conn { link, reused: true });
            }
            // A pooled connection may have been closed by the node meanwhile; `ready`
            // answers at once either way.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_millis(200), link.sender.ready()).await
            {
                return Ok(Conn { link, reused: true });
            }
        }
        let sender = connect(authority, connect_timeout).await?;
        Ok(Conn {
            link: Link::new(sender),
            reused: false,
        })
    }

    fn take_idle(&self, authority: &str) -> Option<Link> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(authority)?;
        // The newest went idle last: when it has expired, so have all the others.
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if now.duration_since(i.since) >= self.idle_timeout {
                list.clear();
                return None;
            }
            if !i.link.sender.is_closed() {
                return Some(i.link);
            }
        }
        None
    }

    /// Returns a connection whose exchange completed.
    pub fn checkin(&self, authority: &Arc<str>, link: Link) {
        if self.max_idle == 0 || link.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.get_mut(&**authority) {
            Some(list) => list,
            None => idle.entry(authority.clone()).or_default(),
        };
        // Expired connections are the oldest: one clock reading and a prefix, not a scan.
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
            .count();
        list.drain(..expired);
        if list.len() >= self.max_idle {
            list.retain(|i| !i.link.sender.is_closed());
        }
        if list.len() < self.max_idle {
            list.push(Idle { link, since: now });
        }
    }

    /// Idle connections kept for `authority` (tests).
    #[cfg(test)]
    fn idle_count(&self, authority: &str) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get(authority).map_or(0, Vec::len)
    }
}

async fn connect(
    authority: &str,
    timeout: Duration,
) -> Result<SendRequest<ProxyBody>, ConnectError> {
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host(authority)
            .await
            .map_err(|_| ConnectError::Resolve(authority.to_string()))?
            .collect();
        let mut last = ConnectError::Resolve(authority.to_string());
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let (sender, conn) = hyper::client::conn::http1::Builder::new()
                        .handshake(TokioIo::new(s))
                        .await
                        .map_err(ConnectError::Handshake)?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    return Ok(sender);
                }
                Err(e) => last = ConnectError::Io(e),
            }
        }
        Err(last)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::Timeout(timeout)))
}

/// An upstream response body that hands its connection back to the pool when it ends.
pub struct PooledBody {
    inner: hyper::body::Incoming,
    /// The connection, until it goes back to the pool (or is dropped: it cannot be reused).
    ret: Option<(Arc<Pool>, Arc<str>, Link)>,
    /// Longest wait for the next chunk (`timeout.read`).
    read_timeout: Duration,
    /// Whether the connection's timer is set for the current wait.
    waiting: bool,
}

impl PooledBody {
    pub fn new(
        inner: hyper::body::Incoming,
        pool: Arc<Pool>,
        authority: Arc<str>,
        link: Link,
        read_timeout: Duration,
    ) -> PooledBody {
        PooledBody {
            inner,
            ret: Some((pool, authority, link)),
            read_timeout,
            waiting: false,
        }
    }

    fn give_back(&mut self) {
        if let Some((pool, authority, link)) = self.ret.take() {
            pool.checkin(&authority, link);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(f))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ret = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                // The connection was given up (a timeout or an error was returned): polled
                // again, the body fails again rather than wait with no timer.
                let Some((_, _, link)) = &mut this.ret else {
                    return Poll::Ready(Some(Err("upstream connection given up".into())));
                };
                let timer = match std::mem::replace(&mut this.waiting, true) {
                    true => link.timer(),
                    false => link.timer_at(Instant::now() + timeout),
                };
                if timer.poll(cx).is_ready() {
                    this.ret = None;
                    return Poll::Ready(Some(Err(format!(
                        "upstream read timed out after {timeout:?}"
                    )
                    .into())));
                }
                Poll::Pending
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

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies that are empty by framing (HEAD, 204, 304, Content-Length: 0) may never be
        // polled; their connection is still reusable.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool connection to a local listener that accepts and holds its sockets open.
    async fn connection(addr: std::net::SocketAddr) -> SendRequest<ProxyBody> {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn listener() -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn idle_connections_are_capped_reused_and_expire() {
        let addr = listener().await;
        let authority: Arc<str> = Arc::from(addr.to_string());
        let pool = Pool::new(2, Duration::from_millis(300));
        for _ in 0..3 {
            let c = connection(addr).await;
            pool.checkin(&authority, Link::new(c));
        }
        assert_eq!(pool.idle_count(&authority), 2, "max_idle caps the list");
        let c = pool
            .checkout(&authority, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(c.reused);
        assert_eq!(pool.idle_count(&authority), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = pool
            .checkout(&authority, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!c.reused, "an expired connection is not handed out");
        assert_eq!(pool.idle_count(&authority), 0);
        // Checking in drops the expired ones before keeping the new one.
        pool.checkin(&authority, Link::new(connection(addr).await));
        tokio::time::sleep(Duration::from_millis(400)).await;
        pool.checkin(&authority, Link::new(connection(addr).await));
        assert_eq!(pool.idle_count(&authority), 1);
    }
}
