//! Keep-alive connections to upstream nodes, one pool per worker.
//!
//! A connection returns to the pool only once its response body has been read to the end
//! ([`ResponseBody`](super::h1::ResponseBody)); a response abandoned midway closes its
//! connection, since HTTP/1.1 cannot reuse it. Idle connections expire after `idle_timeout`;
//! at most `max_idle` are kept per node.

pub use super::h1::Link;
use super::io::{NodeIo, TlsLink};
use super::tls::Handshake;
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

impl Conn {
    fn pooled(link: Link, now: Instant) -> Conn {
        Conn {
            link,
            reused: true,
            at: now,
        }
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
    /// The TLS handshake failed (a certificate not trusted, a node that does not speak TLS).
    #[error("{0}")]
    Tls(std::io::Error),
    /// The upstream's TLS settings cannot be used (said when they were loaded too).
    #[error("the upstream's TLS settings: {0}")]
    TlsSettings(Arc<str>),
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
        match self.take_idle(authority, None, now) {
            Some(link) => Ok(Conn::pooled(link, now)),
            // Boxed: a new connection is rare next to a pooled one, and its state inline
            // would make every checkout's future as large as it.
            None => Box::pin(open(authority, None, connect_timeout)).await,
        }
    }

    /// [`checkout`](Self::checkout) for a TLS node: an idle session of the node that `tls`
    /// would open again (the same settings and server name: its tag), or a new connection
    /// with `tls`'s handshake, within `connect_timeout` as nginx's.
    pub async fn checkout_tls(
        &self,
        authority: &str,
        tls: Handshake,
        connect_timeout: Duration,
        now: Instant,
    ) -> Result<Conn, ConnectError> {
        match self.take_idle(authority, Some(&tls.tag), now) {
            Some(link) => Ok(Conn::pooled(link, now)),
            None => Box::pin(open(authority, Some(tls), connect_timeout)).await,
        }
    }

    /// The newest idle connection to `authority` with session tag `tag` that can still carry
    /// a request.
    #[inline]
    fn take_idle(&self, authority: &str, tag: Option<&str>, now: Instant) -> Option<Link> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(authority)?;
        // The usual case, a plain node's list or a TLS node reached under one name: the newest
        // is of the session asked for, taken off the end. A node may have closed it while
        // idle: the runtime has seen that already.
        while list
            .last()
            .is_some_and(|l| l.link.tag() == tag && now.duration_since(l.since) < self.idle_timeout)
        {
            let Some(mut found) = list.pop() else { break };
            if found.link.wire.is_idle_usable() {
                return Some(found.link);
            }
        }
        take_older(list, tag, now, self.idle_timeout)
    }

    /// Returns a connection whose exchange completed. At most `max_idle` are kept per node,
    /// whatever their sessions: the oldest goes to make room, as nginx's keepalive cache
    /// closes its least recently used (a node reached under many names — one per client
    /// `Host` — keeps no more connections than one reached under one).
    #[inline]
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
            make_room(list, self.max_idle);
        }
        list.push(Idle { link, since: now });
    }

    /// Idle connections kept for `authority` (tests).
    #[cfg(test)]
    fn idle_count(&self, authority: &str) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get(authority).map_or(0, Vec::len)
    }
}

/// [`Pool::take_idle`] past the newest connection: the newest one of session `tag` among
/// those of other sessions. The list is in time order, so the expired ones are a prefix.
#[cold]
fn take_older(
    list: &mut Vec<Idle>,
    tag: Option<&str>,
    now: Instant,
    idle_timeout: Duration,
) -> Option<Link> {
    let mut i = list.len();
    while i > 0 {
        i -= 1;
        if now.duration_since(list[i].since) >= idle_timeout {
            // This one and all older ones.
            list.drain(..=i);
            return None;
        }
        if list[i].link.tag() != tag {
            continue;
        }
        let mut found = list.remove(i);
        if found.link.wire.is_idle_usable() {
            return Some(found.link);
        }
    }
    None
}

/// Room for one more idle connection in a full list: the ones the node closed go first, then
/// the oldest. Kept out of line: the usual check-in is the short path above.
#[cold]
fn make_room(list: &mut Vec<Idle>, max_idle: usize) {
    list.retain_mut(|i| i.link.wire.is_idle_usable());
    if list.len() >= max_idle {
        let over = list.len() + 1 - max_idle;
        list.drain(..over);
    }
}

/// A new connection to `authority`, with a TLS session over it when `tls` says so, all within
/// `connect_timeout`.
async fn open(
    authority: &str,
    tls: Option<Handshake>,
    connect_timeout: Duration,
) -> Result<Conn, ConnectError> {
    let attempt = async {
        let tcp = connect(authority).await?;
        match tls {
            None => Ok(Link::new(NodeIo::Plain(tcp))),
            Some(h) => {
                let session = tokio_rustls::TlsConnector::from(h.config)
                    .connect(h.name, tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                let tls = TlsLink {
                    stream: session,
                    tag: h.tag,
                };
                Ok(Link::new(NodeIo::Tls(Box::new(tls))))
            }
        }
    };
    let link = tokio::time::timeout(connect_timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::Timeout(connect_timeout)))?;
    Ok(Conn {
        link,
        reused: false,
        at: Instant::now(),
    })
}

async fn connect(authority: &str) -> Result<TcpStream, ConnectError> {
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
            pool.checkin(&authority, Link::new(NodeIo::Plain(c)));
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
        pool.checkin(&authority, Link::new(NodeIo::Plain(connection(addr).await)));
        tokio::time::sleep(Duration::from_millis(400)).await;
        pool.checkin(&authority, Link::new(NodeIo::Plain(connection(addr).await)));
        assert_eq!(pool.idle_count(&authority), 1);
    }
}
