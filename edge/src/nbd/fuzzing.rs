//! Entry point for the fuzz target `nbd_handshake` (`fuzz/`, feature `fuzzing`).
//!
//! The option haggling is private to the server and written as async code over a stream, so the
//! fuzzer drives it here: the input is what a client sends, read from an in-memory stream that
//! never blocks (so the future completes in one poll loop, without a runtime), against a registry
//! with one writable and one read-only export. What the server writes back is counted, not kept.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::handshake::{negotiate, Outcome, TlsPhase};
use crate::target::Client;
use crate::testing::{MemRegistry, MemTarget};

/// Exports the fuzzer can name: seeds use these.
pub const EXPORT_RW: &str = "vol0";
pub const EXPORT_RO: &str = "ro";
/// The advertised maximum payload.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// How a fuzzed handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEnd {
    /// The client entered the transmission phase on this export.
    Transmission {
        export: String,
        structured: bool,
    },
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged (the TLS handshake would come next).
    StartTls,
    /// The server closed the connection with this error (EOF included).
    Closed(String),
}

struct ClientBytes<'a> {
    input: &'a [u8],
    written: usize,
}

impl AsyncRead for ClientBytes<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.input.len().min(buf.remaining());
        let (head, tail) = self.input.split_at(n);
        buf.put_slice(head);
        self.input = tail;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientBytes<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn registry() -> &'static MemRegistry {
    static REGISTRY: OnceLock<MemRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = MemRegistry::new();
        registry.insert(EXPORT_RW, Arc::new(MemTarget::new(1 << 20)));
        registry.insert(EXPORT_RO, Arc::new(MemTarget::new_read_only(1 << 20)));
        registry
    })
}

/// Runs the server side of the handshake over `input` (everything after the server's greeting)
/// and returns how it ended and how many bytes the server wrote.
pub fn handshake(input: &[u8]) -> (HandshakeEnd, usize) {
    let mut stream = ClientBytes { input, written: 0 };
    // A plain-text client of a server that offers TLS: every option is reachable, STARTTLS too.
    let client = Client {
        addr: SocketAddr::from(([127, 0, 0, 1], 10809)),
        subject: None,
    };
    let outcome = futures::executor::block_on(negotiate(
        &mut stream,
        registry(),
        &client,
        MAX_PAYLOAD,
        false,
        TlsPhase::Offered { required: false },
    ));
    let end = match outcome {
        Ok(Outcome::Transmission(n)) => HandshakeEnd::Transmission {
            export: n.name,
            structured: n.structured,
        },
        Ok(Outcome::Aborted) => HandshakeEnd::Aborted,
        Ok(Outcome::StartTls) => HandshakeEnd::StartTls,
        Err(e) => HandshakeEnd::Closed(e.to_string()),
    };
    (end, stream.written)
}
