//! Keep-alive connections to upstream nodes, one pool per worker.
//!
//! A connection returns to the pool only once its response body has been read to the end
//! ([`ResponseBody`](super::h1::ResponseBody)); a response abandoned midway closes its
//! connection, since HTTP/1.1 cannot reuse it. Idle connections expire after `idle_timeout`;
//! at most `max_idle` are kept per node.

pub use super::h1::Link;
use crate::FastMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A connection ready to carry one request.
pub struct Conn {
    pub link: Link,
    /// Whether it came from the pool (a failure before sending is then retried on a new one).
    pub reused: bool,
    /// When it was handed out: the caller's reading for a pooled one (nothing waited in
    /// between), a reading after the connect for a new one. The exchange's first timer starts
    /// from it, so a request reads the clock once for both.
    pub at: Instant,
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

    /// An idle connection to `authority`, or a new one. `now` is a clock reading the caller
    /// has just taken (idle connections are checked against it).
    pub async fn checkout(
        &self,
        authority: &str,
        connect_timeout: Duration,
        now: Instant,
    ) -> Result<Conn, ConnectError> {
        if let Some(link) = self.take_idle(authority, now) {
            return Ok(Conn {
                link,
                reused: true,
                at: now,
            });
        }
        let io = connect(authority, connect_timeout).await?;
        Ok(Conn {
            link: Link::new(io),
            reused: false,
            at: Instant::now(),
        })
    }

    fn take_idle(&self, authority: &str, now: Instant) -> Option<Link> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(authority)?;
        // The newest went idle last: when it has expired, so have all the others.
        while let Some(i) = list.pop() {
            if now.duration_since(i.since) >= self.idle_timeout {
                list.clear();
                return None;
            }
            // A node may have closed it while idle: the runtime has seen that already.
            if i.link.wire.is_idle_usable() {
                return Some(i.link);
            }
        }
        None
    }

    /// Returns a connection whose exchange completed.
    pub fn checkin(&self, authority: &Arc<str>, link: Link) {
        if self.max_idle == 0 {
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
            list.retain(|i| i.link.wire.is_idle_usable());
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

async fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host(authority)
            .await
            .map_err(|_| ConnectError::Resolve(authority.to_string()))?
            .collect();
        let mut last = ConnectError::Resolve(authority.to_string());
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool connection to a local listener that accepts and holds its sockets open.
    async fn connection(addr: std::net::SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.unwrap()
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
            .checkout(&authority, Duration::from_secs(1), Instant::now())
            .await
            .unwrap();
        assert!(c.reused);
        assert_eq!(pool.idle_count(&authority), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = pool
            .checkout(&authority, Duration::from_secs(1), Instant::now())
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
