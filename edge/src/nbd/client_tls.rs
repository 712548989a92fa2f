//! The connection of the blocking NBD clients ([`NbdClient`](super::client::NbdClient),
//! [`MapClient`](super::map_client::MapClient)): plain TCP, or TLS after `NBD_OPT_STARTTLS`.
//!
//! Why: a node that serves NBD with `--nbd-tls require` refuses every plain client, and `vstor
//! volume import` / `export` go through the node's NBD export like any client. So the clients
//! upgrade the connection as qemu and libnbd do: greet in plain text, ask for `STARTTLS`, run
//! the TLS handshake on the same socket, and haggle the rest over TLS. rustls' blocking
//! `StreamOwned`, on the aws-lc-rs provider the rest of vstor links; PEM files are read by
//! `vstor_net`'s helpers, as for the internal links.
//!
//! The server's certificate must chain to the CA given and carry the host that was dialled (an
//! IP address or a name, as the node's `nbd_uri` says), or the name given with
//! [`ClientTls::with_server_name`] (`--tls-server-name`: a node advertised by IP address whose
//! certificate names its host). A client certificate is sent only when one is given: a node
//! with `nbd_server.tls_ca` requires it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::client::{be_u32, be_u64, greet, invalid};
use super::proto::{IHAVEOPT, NBD_OPT_STARTTLS, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_MAGIC};

/// Longest error message read from a server's option reply.
const MAX_MESSAGE: u32 = 64 * 1024;

/// What a client needs for TLS: whom to trust and, optionally, who it is.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// The name the server's certificate must carry, when not the host dialled.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trust the CA certificates in `ca` (PEM); present `identity` (certificate chain, key; PEM)
    /// when given. Unreadable or unusable files are errors naming the file.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> io::Result<Self> {
        let bad =
            |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let mut roots = RootCertStore::empty();
        for cert in vstor_net::pem_certificates("CA certificate", ca).map_err(|e| bad(&e))? {
            roots
                .add(cert)
                .map_err(|e| bad(&format!("CA certificate {}: {e}", ca.display())))?;
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain =
                    vstor_net::pem_certificates("certificate", cert).map_err(|e| bad(&e))?;
                let key = vstor_net::pem_private_key(key).map_err(|e| bad(&e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(&format!("certificate {} and its key: {e}", cert.display())))?
            }
        };
        Ok(Self {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Check the server's certificate for `name` (a DNS name or an IP address) instead of the
    /// host that is dialled.
    pub fn with_server_name(mut self, name: &str) -> io::Result<Self> {
        let parsed = ServerName::try_from(name.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TLS server name {name:?}: {e}"),
            )
        })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// A credentials directory laid out as qemu's `tls-creds-x509` and libnbd's
    /// `tls-certificates` want it: `ca-cert.pem`, and for a client certificate `client-cert.pem`
    /// with `client-key.pem`. So one directory serves `vstor`, qemu-img and nbdcopy alike.
    pub fn from_dir(dir: &Path) -> io::Result<Self> {
        let ca = dir.join("ca-cert.pem");
        if !ca.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "TLS credentials directory {} has no ca-cert.pem",
                    dir.display()
                ),
            ));
        }
        let cert = dir.join("client-cert.pem");
        let key = dir.join("client-key.pem");
        let identity = match (cert.is_file(), key.is_file()) {
            (true, true) => Some((cert.as_path(), key.as_path())),
            (false, false) => None,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "TLS credentials directory {} has only one of client-cert.pem and \
                         client-key.pem",
                        dir.display()
                    ),
                ))
            }
        };
        Self::load(&ca, identity)
    }
}

/// A blocking client's connection.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

/// Say that a TLS failure is one: with TLS 1.3 the server checks the client's certificate after
/// the client's side of the handshake is done, so its refusal (`CertificateRequired`, `BadCertificate`)
/// arrives as the error of a later read.
fn tls_failure(e: io::Error) -> io::Error {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => io::Error::new(e.kind(), format!("TLS session failed: {tls}")),
        None => e,
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf).map_err(tls_failure),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf).map_err(tls_failure),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Connect to `addr` (HOST:PORT) with `timeout` on every read and write, greet the server and,
/// with `tls`, upgrade the connection. Returns the stream, ready for options, and the server's
/// address for messages.
pub(super) fn open(
    addr: &str,
    timeout: Option<Duration>,
    tls: Option<&ClientTls>,
) -> io::Result<(Stream, String)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(timeout)?;
    tcp.set_write_timeout(timeout)?;
    let server = greet(&mut tcp)?;
    let Some(tls) = tls else {
        return Ok((Stream::Plain(tcp), server));
    };
    starttls(&mut tcp, &server)?;
    let name: ServerName<'static> = match &tls.server_name {
        Some(name) => name.clone(),
        None => vstor_net::server_name(addr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
    };
    let mut conn = ClientConnection::new(Arc::clone(&tls.config), name)
        .map_err(|e| io::Error::other(format!("TLS with {server}: {e}")))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| {
            io::Error::new(e.kind(), format!("TLS handshake with {server} failed: {e}"))
        })?;
    }
    Ok((Stream::Tls(Box::new(StreamOwned::new(conn, tcp))), server))
}

/// Ask for `NBD_OPT_STARTTLS` and take the server's answer: an ACK, or its refusal as an error
/// with the server's message.
fn starttls(tcp: &mut TcpStream, server: &str) -> io::Result<()> {
    let mut option = [0u8; 16];
    option[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    option[8..12].copy_from_slice(&NBD_OPT_STARTTLS.to_be_bytes());
    tcp.write_all(&option)?;
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head)?;
    if be_u64(&head) != NBD_REP_MAGIC || be_u32(&head[8..]) != NBD_OPT_STARTTLS {
        return Err(invalid(format!("{server}: bad reply header to STARTTLS")));
    }
    let kind = be_u32(&head[12..]);
    let len = be_u32(&head[16..]);
    if len > MAX_MESSAGE {
        return Err(invalid(format!(
            "{server}: reply of {len} bytes to STARTTLS"
        )));
    }
    let mut data = vec![0u8; len as usize];
    tcp.read_exact(&mut data)?;
    match kind {
        NBD_REP_ACK if data.is_empty() => Ok(()),
        kind if kind & NBD_REP_FLAG_ERROR != 0 => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{server} refused TLS (STARTTLS answered with error {}): {}",
                kind & !NBD_REP_FLAG_ERROR,
                String::from_utf8_lossy(&data)
            ),
        )),
        kind => Err(invalid(format!(
            "{server}: unexpected reply {kind} to STARTTLS"
        ))),
    }
}
