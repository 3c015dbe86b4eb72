//! The byte stream to a node: a TCP connection, or TLS over one (`scheme: https`).
//!
//! One enum rather than a boxed trait object: the plain case, every benchmark's and most
//! deployments', costs a branch per read or write and nothing else.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connection to a node.
pub enum NodeIo {
    Plain(TcpStream),
    Tls(Box<TlsLink>),
}

/// A TLS connection and its session's identity (see [`super::tls::Settings::handshake`]): the
/// pool hands it only to a request that would open the same session. Kept here, boxed with
/// the session, so that a plain connection, moved about with every request, stays as small
/// as it was.
pub struct TlsLink {
    pub stream: TlsStream<TcpStream>,
    pub tag: Arc<str>,
}

impl NodeIo {
    /// The session's identity; None for a plain connection.
    #[inline]
    pub fn tag(&self) -> Option<&str> {
        match self {
            NodeIo::Plain(_) => None,
            NodeIo::Tls(t) => Some(&t.tag),
        }
    }

    /// Whether an idle connection can carry a request: nothing has arrived on it since its
    /// last exchange (a close, or bytes nobody asked for). Uses the readiness the runtime has
    /// already seen: no system call when the socket is quiet.
    #[inline]
    pub fn is_quiet(&mut self) -> bool {
        match self {
            NodeIo::Plain(tcp) => {
                let mut probe = [0u8; 1];
                let outcome = tcp.try_read(&mut probe);
                matches!(outcome, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            NodeIo::Tls(tls) => tls_is_quiet(&mut tls.stream),
        }
    }

    /// Reading and writing halves that can be used at once (an answer read while the request
    /// body is still being sent). The plain halves borrow the socket; TLS, one session for
    /// both directions, goes through tokio's lock.
    pub fn split(&mut self) -> (NodeRead<'_>, NodeWrite<'_>) {
        match self {
            NodeIo::Plain(tcp) => {
                let (r, w) = tcp.split();
                (NodeRead::Plain(r), NodeWrite::Plain(w))
            }
            NodeIo::Tls(tls) => {
                let (r, w) = tokio::io::split(&mut tls.stream);
                (NodeRead::Tls(r), NodeWrite::Tls(w))
            }
        }
    }
}

/// Most TLS records a session gets while idle per check: more is a node that keeps talking.
const MAX_IDLE_RECORD_READS: usize = 4;

/// [`NodeIo::is_quiet`] for a TLS connection. What arrived while it was idle is fed to the
/// session rather than judged by its presence: a node may send records that carry no data
/// after an answer (a TLS 1.3 session ticket or key update), and such a connection is as good
/// as a quiet one. It is not when the session holds data nobody asked for (an answer the
/// last exchange did not read), the node has closed (`close_notify` or the socket's end), or
/// a record is broken.
#[cold]
fn tls_is_quiet(tls: &mut TlsStream<TcpStream>) -> bool {
    let (tcp, session) = tls.get_mut();
    for _ in 0..MAX_IDLE_RECORD_READS {
        match session.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
            _ => return false,
        }
        let fd = tcp.as_raw_fd();
        let read = tcp.try_io(Interest::READABLE, || session.read_tls(&mut RawRead(fd)));
        match read {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            // The node's close, or a failed socket.
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    false
}

/// A non-blocking read of a socket by its descriptor, for rustls's `read_tls` (the socket is
/// tokio's, which lends no `std::io::Read` by reference).
struct RawRead(std::os::fd::RawFd);

impl std::io::Read for RawRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        nix::sys::socket::recv(self.0, buf, flags).map_err(io::Error::from)
    }
}

/// Delegates a poll to the variant's stream.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            NodeIo::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            NodeIo::Tls($s) => {
                let $s = Pin::new(&mut $s.stream);
                $e
            }
        }
    };
}

impl AsyncRead for NodeIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NodeIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            NodeIo::Tls(s) => without_close_notify(Pin::new(&mut s.stream).poll_read(cx, buf)),
        }
    }
}

/// A node that closes its connection without TLS's `close_notify` has ended the stream, as
/// nginx and most clients take it: many servers close that way after a body delimited by the
/// close. (A body with a length or chunks still finds out that it was cut: it expected more.)
fn without_close_notify(read: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
    match read {
        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
        other => other,
    }
}

impl AsyncWrite for NodeIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            NodeIo::Plain(s) => s.is_write_vectored(),
            NodeIo::Tls(s) => s.stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}

/// The reading half of [`NodeIo::split`].
pub enum NodeRead<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// The writing half of [`NodeIo::split`].
pub enum NodeWrite<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

/// Delegates a poll to a half's variant.
macro_rules! half {
    ($self:expr, $ty:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            $ty::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            $ty::Tls($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for NodeRead<'_> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NodeRead::Plain(s) => Pin::new(s).poll_read(cx, buf),
            NodeRead::Tls(s) => without_close_notify(Pin::new(s).poll_read(cx, buf)),
        }
    }
}

impl AsyncWrite for NodeWrite<'_> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        half!(self, NodeWrite, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        half!(self, NodeWrite, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            NodeWrite::Plain(s) => s.is_write_vectored(),
            NodeWrite::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half!(self, NodeWrite, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half!(self, NodeWrite, s => s.poll_shutdown(cx))
    }
}
