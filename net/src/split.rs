//! Owned read and write halves of a [`PeerStream`], for clients and servers that read in one
//! task and write in another (the OSD and MDS protocols, the edge protocol's client).
//!
//! *Why two kinds of halves.* Plain TCP splits with `TcpStream::into_split`: two handles on the
//! same socket, no lock, exactly what those links did before TLS existed, so a cluster without
//! TLS keeps its fast path. A TLS session is one state machine for both directions (a read may
//! have to answer a key update, a write appends to the record buffer), so its halves share it
//! through `tokio::io::split`, a mutex taken per poll. That lock is the price of TLS only, and a
//! small one next to the record encryption it guards: one reader and one writer task contend at
//! most for the length of a `poll_read`/`poll_write`, never across an await. A TLS writer must
//! `flush` after writing (rustls keeps records until then); on TCP `flush` is a no-op, so the
//! callers simply always flush.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::unix;

use crate::PeerStream;

/// The read half of a split [`PeerStream`].
#[derive(Debug)]
pub enum PeerReader {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<PeerStream>),
    Unix(unix::OwnedReadHalf),
}

/// The write half of a split [`PeerStream`]. Call `flush` after a batch of writes.
#[derive(Debug)]
pub enum PeerWriter {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<PeerStream>),
    Unix(unix::OwnedWriteHalf),
}

impl PeerStream {
    /// Split into owned halves: lock-free for plain TCP and unix sockets, `tokio::io::split` for
    /// TLS.
    pub fn into_split(self) -> (PeerReader, PeerWriter) {
        match self {
            PeerStream::Plain(tcp) => {
                let (rd, wr) = tcp.into_split();
                (PeerReader::Plain(rd), PeerWriter::Plain(wr))
            }
            PeerStream::Unix(unix) => {
                let (rd, wr) = unix.into_split();
                (PeerReader::Unix(rd), PeerWriter::Unix(wr))
            }
            tls => {
                let (rd, wr) = tokio::io::split(tls);
                (PeerReader::Tls(rd), PeerWriter::Tls(wr))
            }
        }
    }
}

impl AsyncRead for PeerReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerReader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            PeerReader::Tls(r) => Pin::new(r).poll_read(cx, buf),
            PeerReader::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerWriter::Plain(w) => Pin::new(w).poll_write(cx, buf),
            PeerWriter::Tls(w) => Pin::new(w).poll_write(cx, buf),
            PeerWriter::Unix(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerWriter::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            PeerWriter::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            PeerWriter::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerWriter::Plain(w) => w.is_write_vectored(),
            PeerWriter::Tls(w) => w.is_write_vectored(),
            PeerWriter::Unix(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerWriter::Plain(w) => Pin::new(w).poll_flush(cx),
            PeerWriter::Tls(w) => Pin::new(w).poll_flush(cx),
            PeerWriter::Unix(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerWriter::Plain(w) => Pin::new(w).poll_shutdown(cx),
            PeerWriter::Tls(w) => Pin::new(w).poll_shutdown(cx),
            PeerWriter::Unix(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
