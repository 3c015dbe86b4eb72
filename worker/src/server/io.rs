//! The byte stream from a client: a TCP connection, or TLS over one (the `apisix.ssl`
//! listener).
//!
//! One enum rather than a boxed trait object, as [`crate::upstream::io::NodeIo`]: the plain
//! case costs a branch per read or write and nothing else.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<TlsClient>),
}

/// A TLS connection.
pub struct TlsClient {
    pub stream: TlsStream<TcpStream>,
}

impl ClientIo {
    /// The TCP connection under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientIo::Plain(tcp) => tcp,
            ClientIo::Tls(t) => t.stream.get_ref().0,
        }
    }
}

impl AsyncRead for ClientIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientIo::Tls(t) => tls_read(t, cx, buf),
        }
    }
}

/// A read over TLS, out of line: the plain path's reads stay as small as a socket's.
#[inline(never)]
fn tls_read(
    t: &mut TlsClient,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    // What a full socket held back of an earlier write (an interim `100 Continue`) goes out
    // before the wait for the client's next bytes: the client may be waiting for it.
    let _ = Pin::new(&mut t.stream).poll_flush(cx);
    Pin::new(&mut t.stream).poll_read(cx, buf)
}

/// A write over TLS, out of line (as [`tls_read`]).
#[inline(never)]
fn tls_write(t: &mut TlsClient, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    Pin::new(&mut t.stream).poll_write(cx, buf)
}

impl AsyncWrite for ClientIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientIo::Tls(t) => tls_write(t, cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(_) => Poll::Ready(Ok(())),
            ClientIo::Tls(t) => Pin::new(&mut t.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            // Sends `close_notify`, then closes the writing side.
            ClientIo::Tls(t) => Pin::new(&mut t.stream).poll_shutdown(cx),
        }
    }
}
