//! Binding the proxy and Admin API sockets.

use crate::supervisor::Listener;
use anyhow::Context;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use wasmgate_shared::config::ListenAddr;

/// Backlog of listening sockets: connections wait here while workers are replaced.
const BACKLOG: i32 = 4096;

/// Binds a listening TCP socket (SO_REUSEADDR, IPv6 sockets v6-only).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds every proxy listener, moving each fd to ≥ 64 (see [`Listener::fd`]).
pub fn bind_all(addrs: &[ListenAddr]) -> anyhow::Result<Vec<Listener>> {
    addrs
        .iter()
        .map(|a| {
            let l = bind(a.0).with_context(|| {
                format!(
                    "cannot listen on {} (apisix.node_listen, apisix.ssl.listen)",
                    a.0
                )
            })?;
            Ok(Listener {
                addr: a.0,
                fd: high_fd(OwnedFd::from(l))?,
            })
        })
        .collect()
}

/// Reuses the sockets of `current` for addresses still listed and binds the new ones.
pub fn rebind(current: &[Listener], addrs: &[ListenAddr]) -> anyhow::Result<Vec<Listener>> {
    addrs
        .iter()
        .map(|a| match current.iter().find(|l| l.addr == a.0) {
            Some(l) => Ok(Listener {
                addr: l.addr,
                fd: dup_high(&l.fd)?,
            }),
            None => bind_all(std::slice::from_ref(a)).map(|mut v| v.remove(0)),
        })
        .collect()
}

fn high_fd(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid fd we own returns a new fd or -1.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly duplicated fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A duplicate of `fd` at ≥ 64 (see [`Listener::fd`] for why every inherited fd lives there).
pub fn dup_high(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    high_fd(fd.try_clone()?)
}

/// A memfd (fd ≥ 64) holding `bytes`, for workers to read.
pub fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::Write;
    let fd =
        nix::sys::memfd::memfd_create(c"wasmgate-plugin", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    high_fd(OwnedFd::from(f))
}

/// Serves HTTP/1.1 on `listener` until the process ends: each connection on a task of its own,
/// each request answered by `handle(request, peer)`. Used by the Admin API and the Prometheus
/// listener; `what` names the listener in log lines.
/// Told when a server of the master's own stops: its sender dropped (`run::Served`).
pub type Stop = tokio::sync::watch::Receiver<()>;

pub async fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    stop: Stop,
    handle: F,
) where
    F: Fn(hyper::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = handle(req, peer);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // The server moved (or stopped): the request in progress is answered, then
                // the connection closes — a keep-alive client does not keep the old address.
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
