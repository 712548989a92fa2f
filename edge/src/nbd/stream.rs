//! The byte streams a connection can run on: plain TCP, TLS over TCP, or a unix socket (the edge
//! protocol's same-host transport; split like TCP).
//!
//! The transmission loop (`conn`) reads and writes the socket from the same task, in one
//! `select!`, so it needs a read half and a write half borrowed at once. For TCP that is
//! `TcpStream::split`: two plain references, no lock, no copy, so the plain-text fast path is
//! exactly what it was before TLS existed. A TLS stream is one state machine for both directions;
//! `tokio::io::split` shares it behind a lock that is never contended (one task polls both
//! halves). TLS also keeps written records until flushed, which [`NbdStream::NEEDS_FLUSH`] tells
//! the loop; TCP's flush is a no-op the loop skips.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub(crate) trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether written bytes may stay buffered until `flush`.
    const NEEDS_FLUSH: bool;
    type Reader<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

impl NbdStream for TcpStream {
    const NEEDS_FLUSH: bool = false;
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl NbdStream for TlsStream<TcpStream> {
    const NEEDS_FLUSH: bool = true;
    type Reader<'a> = tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }
}

impl NbdStream for tokio::net::UnixStream {
    const NEEDS_FLUSH: bool = false;
    type Reader<'a> = tokio::net::unix::ReadHalf<'a>;
    type Writer<'a> = tokio::net::unix::WriteHalf<'a>;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}
