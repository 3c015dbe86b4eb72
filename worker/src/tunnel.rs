//! Connections switched to another protocol (`Upgrade`, WebSocket): once the node has answered
//! 101 and the client has that answer, the gateway carries bytes both ways until one side
//! closes, as nginx does for an upgraded connection.
//!
//! Only routes with `enable_websocket` pass an `Upgrade` request on (APISIX's rule); elsewhere
//! `Upgrade` is a hop-by-hop field like any other and is dropped. Plugins see the handshake
//! (its request headers, the 101's headers, `proxy_on_log`), not the bytes of the tunnel.
//! The tunnel ends when either side closes (the other is half-closed first, so what is in
//! flight still arrives), or when nothing has crossed it either way for the route's
//! `timeout.read`.

use crate::server::io::ClientIo;
use crate::upstream::io::NodeIo;
use crate::upstream::Busy;
use bytes::BytesMut;
use http::header::{self, HeaderValue};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What one read of either side takes at most.
const CHUNK: usize = 16 * 1024;

/// The `Upgrade` a request asks for: an HTTP/1.1 request with `Upgrade: websocket` and the
/// `upgrade` option in `Connection`. Other protocols (`h2c`…) are not tunnelled: the option is
/// WebSocket's, and an `h2c` upgrade through a proxy is a known way past its rules.
pub fn asked(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let protocol = parts
        .headers
        .get(header::UPGRADE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))?;
    let listed = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (listed && !protocol.is_empty()).then(|| protocol.clone())
}

/// The two hop-by-hop fields a switch of protocols keeps, on its way to the node and back.
pub fn put_upgrade(headers: &mut http::HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Whether an answer switches the connection to a tunnel: the node's 101, still a 101 after
/// the plugins, with the node's side of it.
pub fn switching<B>(resp: &http::Response<B>) -> bool {
    resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        && resp.extensions().get::<Upstream>().is_some()
}

/// The node's side of a switched connection, carried to the server in the 101 answer's
/// extensions (which must be `Clone`: the socket is taken out once).
#[derive(Clone)]
pub struct Upstream {
    node: Arc<Mutex<Option<Node>>>,
    idle: Duration,
}

struct Node {
    io: NodeIo,
    /// What the node sent after its 101.
    rest: BytesMut,
    held: Option<Busy>,
    closing: Closing,
}

/// The bytes a tunnel carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub from_client: u64,
    pub to_client: u64,
}

/// The request's log phase, left for when the tunnel closes.
pub type OnClose = Box<dyn FnOnce(Carried) + Send>;

/// Runs the log phase with what was carried once the tunnel is over — however it ends: its
/// task dropped as a draining worker exits, or never run (the 101 could not be sent).
#[derive(Default)]
struct Closing {
    log: Option<OnClose>,
    carried: Counts,
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log(self.carried.get());
        }
    }
}

impl Upstream {
    /// `rest`: what the node sent after its 101; `idle`: how long the tunnel may carry
    /// nothing before it is closed.
    pub fn new(io: NodeIo, rest: BytesMut, idle: Duration) -> Upstream {
        Upstream {
            node: Arc::new(Mutex::new(Some(Node {
                io,
                rest,
                held: None,
                closing: Closing::default(),
            }))),
            idle,
        }
    }

    fn take(&self) -> Option<Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Keeps the node counted busy until the tunnel ends, or until the answer is dropped
    /// unsent, as nginx frees an upgraded connection's peer only when it closes.
    pub fn hold(&self, held: Busy) {
        if let Some(node) = self.node.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            node.held = Some(held);
        }
    }

    /// Leaves the request's log phase to the tunnel's end. Given back when the tunnel is
    /// gone already, for the caller to run at once.
    pub fn on_close(&self, log: OnClose) -> Result<(), OnClose> {
        match self.node.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(node) => {
                node.closing.log = Some(log);
                Ok(())
            }
            None => Err(log),
        }
    }

    /// Carries bytes between the client (`client`, with `client_rest` read past its request
    /// head) and the node until the tunnel ends.
    pub async fn run(self, mut client: ClientIo, client_rest: BytesMut, peer: SocketAddr) {
        // Dropped last: the node stays counted busy until the log phase has run.
        let Some(Node {
            io: mut node,
            rest: node_rest,
            held: _held,
            mut closing,
        }) = self.take()
        else {
            return;
        };
        let idle = self.idle;
        let early = async {
            node.write_all(&client_rest).await?;
            node.flush().await?;
            client.write_all(&node_rest).await?;
            client.flush().await
        };
        if !matches!(tokio::time::timeout(idle, early).await, Ok(Ok(()))) {
            return;
        }
        closing.carried = Counts::new(client_rest.len(), node_rest.len());
        let end = pipe(&mut client, &mut node, idle, &closing.carried).await;
        match end {
            Ok(End::Closed) => {}
            Ok(End::Idle) => tracing::info!("tunnel of {peer} closed: idle for {idle:?}"),
            Err(e) => tracing::info!("tunnel of {peer} failed: {e}"),
        }
    }
}

/// Bytes carried each way so far.
#[derive(Default)]
struct Counts {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

impl Counts {
    fn new(from_client: usize, to_client: usize) -> Counts {
        Counts {
            from_client: AtomicU64::new(from_client as u64),
            to_client: AtomicU64::new(to_client as u64),
        }
    }

    fn get(&self) -> Carried {
        Carried {
            from_client: self.from_client.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// How a tunnel ended.
enum End {
    /// Both sides closed.
    Closed,
    /// Nothing crossed it for the idle time.
    Idle,
}

/// Copies client → node and node → client at once (a side that waits to send while the other
/// sends must not stall the tunnel) until both directions have ended — a side's close
/// half-closes the other's writing — or nothing has moved either way for `idle`. One timer
/// watches the whole tunnel: moved on when it fires early, not for every chunk.
async fn pipe(
    client: &mut ClientIo,
    node: &mut NodeIo,
    idle: Duration,
    carried: &Counts,
) -> std::io::Result<End> {
    let start = Instant::now();
    // When bytes last moved, in nanoseconds since `start`.
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    // One lock per read or write over both halves: tunnels are rare, their frames large.
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut nr, mut nw) = node.split();
    let both = async {
        tokio::try_join!(
            copy_one(&mut cr, &mut nw, &touch, &carried.from_client),
            copy_one(&mut nr, &mut cw, &touch, &carried.to_client)
        )
    };
    let watch = async {
        loop {
            let moved = Duration::from_nanos(last.load(Ordering::Relaxed));
            tokio::time::sleep_until((start + moved + idle).into()).await;
            if start.elapsed() >= Duration::from_nanos(last.load(Ordering::Relaxed)) + idle {
                return;
            }
        }
    };
    tokio::select! {
        r = both => r.map(|_| End::Closed),
        () = watch => Ok(End::Idle),
    }
}

/// One direction of a tunnel: until the reader's close, which is passed on as a half-close.
async fn copy_one<R, W>(
    r: &mut R,
    w: &mut W,
    touch: &impl Fn(),
    count: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // The other side may be gone already: its close ends its own direction.
            let _ = w.shutdown().await;
            return Ok(());
        }
        touch();
        w.write_all(&buf[..n]).await?;
        // TLS holds back what the socket did not take; a socket sends it all.
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        touch();
    }
}
