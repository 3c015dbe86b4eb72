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

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one read of either side takes at most.
const CHUNK: usize = 16 * 1024;

/// The `Upgrade` a request asks for: an HTTP/1.1 request with `Upgrade` and the `upgrade`
/// option in `Connection`.
pub fn asked(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let protocol = parts.headers.get(header::UPGRADE)?;
    let listed = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (listed && !protocol.is_empty()).then(|| protocol.clone())
}

/// The node's side of a switched connection, carried to the server in the 101 answer's
/// extensions (which must be `Clone`: the socket is taken out once).
#[derive(Clone)]
pub struct Upstream {
    io: Arc<Mutex<Option<(TcpStream, BytesMut)>>>,
    idle: Duration,
}

impl Upstream {
    /// `rest`: what the node sent after its 101; `idle`: how long the tunnel may carry
    /// nothing before it is closed.
    pub fn new(io: TcpStream, rest: BytesMut, idle: Duration) -> Upstream {
        Upstream {
            io: Arc::new(Mutex::new(Some((io, rest)))),
            idle,
        }
    }

    /// Carries bytes between the client (`client`, with `client_rest` read past its request
    /// head) and the node until the tunnel ends.
    pub async fn run(self, mut client: TcpStream, client_rest: BytesMut, peer: SocketAddr) {
        let taken = self.io.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((mut node, node_rest)) = taken else {
            return;
        };
        let idle = self.idle;
        let early = async {
            node.write_all(&client_rest).await?;
            client.write_all(&node_rest).await
        };
        if !matches!(tokio::time::timeout(idle, early).await, Ok(Ok(()))) {
            return;
        }
        let (mut cr, mut cw) = client.split();
        let (mut nr, mut nw) = node.split();
        match pipe(&mut cr, &mut cw, &mut nr, &mut nw, idle).await {
            Ok(End::Closed) => {}
            Ok(End::Idle) => tracing::info!("tunnel of {peer} closed: idle for {idle:?}"),
            Err(e) => tracing::info!("tunnel of {peer} failed: {e}"),
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

/// Copies client → node and node → client until both directions have ended (a side's close
/// half-closes the other side's writing) or nothing moves for `idle`.
async fn pipe<CR, CW, NR, NW>(
    cr: &mut CR,
    cw: &mut CW,
    nr: &mut NR,
    nw: &mut NW,
    idle: Duration,
) -> std::io::Result<End>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    NR: AsyncRead + Unpin,
    NW: AsyncWrite + Unpin,
{
    let mut up = vec![0u8; CHUNK];
    let mut down = vec![0u8; CHUNK];
    let (mut client_open, mut node_open) = (true, true);
    while client_open || node_open {
        let moved = tokio::time::timeout(idle, async {
            tokio::select! {
                r = cr.read(&mut up), if client_open => match r? {
                    0 => {
                        client_open = false;
                        nw.shutdown().await
                    }
                    n => nw.write_all(&up[..n]).await,
                },
                r = nr.read(&mut down), if node_open => match r? {
                    0 => {
                        node_open = false;
                        cw.shutdown().await
                    }
                    n => cw.write_all(&down[..n]).await,
                },
            }
        })
        .await;
        match moved {
            Ok(r) => r?,
            Err(_) => return Ok(End::Idle),
        }
    }
    Ok(End::Closed)
}
