//! Keep-alive connections to upstream nodes, one pool per worker.
//!
//! A connection returns to the pool only once its response body has been read to the end
//! ([`PooledBody`]); a response abandoned midway closes its connection, since HTTP/1.1 cannot
//! reuse it. Idle connections expire after `idle_timeout`; at most `max_idle` are kept per node.

use crate::body::{BoxError, ProxyBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A connection ready to carry one request.
pub struct Conn {
    pub sender: SendRequest<ProxyBody>,
    /// Whether it came from the pool (a failure before sending is then retried on a new one).
    pub reused: bool,
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
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// The pool of idle upstream connections.
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
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
        while let Some(mut sender) = self.take_idle(authority) {
            // A pooled connection may have been closed by the node meanwhile; `ready`
            // answers at once either way.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_millis(200), sender.ready()).await
            {
                return Ok(Conn {
                    sender,
                    reused: true,
                });
            }
        }
        let sender = connect(authority, connect_timeout).await?;
        Ok(Conn {
            sender,
            reused: false,
        })
    }

    fn take_idle(&self, authority: &str) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(authority)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout && !i.sender.is_closed() {
                return Some(i.sender);
            }
        }
        None
    }

    /// Returns a connection whose exchange completed.
    pub fn checkin(&self, authority: &str, sender: SendRequest<ProxyBody>) {
        if self.max_idle == 0 || sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(authority.to_string()).or_default();
        list.retain(|i| i.since.elapsed() < self.idle_timeout && !i.sender.is_closed());
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
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
    ret: Option<(Arc<Pool>, String, SendRequest<ProxyBody>)>,
    /// Longest wait for the next chunk (`timeout.read`).
    read_timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PooledBody {
    pub fn new(
        inner: hyper::body::Incoming,
        pool: Arc<Pool>,
        authority: String,
        sender: SendRequest<ProxyBody>,
        read_timeout: Duration,
    ) -> PooledBody {
        PooledBody {
            inner,
            ret: Some((pool, authority, sender)),
            read_timeout,
            timer: None,
        }
    }

    fn give_back(&mut self) {
        if let Some((pool, authority, sender)) = self.ret.take() {
            pool.checkin(&authority, sender);
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
                this.timer = None;
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(f))) => {
                this.timer = None;
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ret = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
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
