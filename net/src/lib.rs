//! Mutual TLS for vstor's internal links (issue 15): the DTL, OSD, MDS and edge protocols.
//!
//! # Why a crate of its own
//!
//! The links live in crates that do not depend on each other (`vstor-dtl`, `vstor-backend`'s OSD
//! protocol, `vstor-mds`), and the lowest crate they share is none of them: putting the TLS code
//! in, say, `vstor-dtl` would make the backend depend on the DTL for PEM loading. A small leaf
//! crate that every link's crate can depend on keeps one copy of the PEM loading, of the trust
//! decisions (which CA, which names) and of the stream type, so the links cannot drift apart.
//!
//! # Trust model
//!
//! A cluster has one CA ([`PeerTlsFiles::ca`]). Every process has a certificate that CA signed
//! and presents it on every internal connection, as a server and as a client:
//!
//! * the server side ([`PeerTls::accept`]) *requires* a client certificate chaining to the CA
//!   (no anonymous clients; a certificate of another CA, an expired one or none at all fails the
//!   handshake);
//! * the client side ([`PeerTls::connect`]) presents its certificate and verifies the server's
//!   against the same CA (and only that CA: the system's roots are not trusted here).
//!
//! ## Which name the client checks
//!
//! The client checks the server certificate against the host it dialled, as written in the
//! address (`dtl.example:7820` → DNS name `dtl.example`, `10.0.0.5:7820` → IP `10.0.0.5`), the
//! way etcd's peers and every HTTPS client do. Checking only that the certificate chains to the
//! cluster CA would let any cluster member (or a stolen key of any one) pose as every other
//! member's DTL, OSD or MDS; binding the certificate to the address means a node's key only
//! speaks for that node's addresses. The cost: a certificate must carry the node's address as a
//! subjectAltName (DNS or IP), which is what a cluster's certificate tooling does anyway. Servers
//! do not check client names: any certificate of the cluster CA is a cluster member, and what a
//! member may do is decided by the protocols (owner tags fence stale writers).
//!
//! # Streams
//!
//! [`PeerStream`] is plain TCP, TLS, or a unix socket (the edge protocol between an edge and an
//! owner on the same host, where the socket file's permissions and the peer's uid take the place
//! of certificates), so one codec (`tokio_util::codec::Framed`) runs over any of them. It is an
//! enum rather than a `Box<dyn AsyncRead + AsyncWrite>`: the plain case is a `match` on a
//! well-predicted tag in front of the same `TcpStream` calls as before, no
//! allocation and no dynamic dispatch, so a cluster without TLS runs exactly the code it ran.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A file (PEM, or another a configuration is built from) is unreadable, has no usable
    /// block, or does not fit the others. The caller's context names the setting.
    #[error("{what} file {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("peer TLS configuration: {0}")]
    Config(String),
    /// The address has no host part a certificate could be checked against.
    #[error("cannot check the TLS certificate of {addr:?}: {reason}")]
    ServerName { addr: String, reason: String },
    /// The TLS handshake failed (the peer's certificate, or our own, was refused).
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake { peer: String, source: io::Error },
    /// The peer did not complete the TLS handshake in time.
    #[error("TLS handshake with {peer} not done within {after:?}")]
    Timeout {
        peer: String,
        after: std::time::Duration,
    },
}

/// The PEM files of this process's cluster identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// This process's certificate chain, leaf first. It is used as a server and as a client
    /// certificate, so it should allow both (`extendedKeyUsage = serverAuth, clientAuth`).
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA: peers' certificates must chain to one of its certificates.
    pub ca: PathBuf,
}

/// A loaded, checked mutual-TLS identity: the server and the client configuration built from
/// the same files, reloadable from them ([`PeerTls::reload`], [`Reloadable`]). Cheap to clone, and
/// the clones share one identity: a reload reaches every link the process built from it.
#[derive(Clone)]
pub struct PeerTls {
    files: Arc<PeerTlsFiles>,
    live: Arc<Reloadable<PeerConfigs>>,
}

/// The two configurations of one identity.
struct PeerConfigs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

pub(crate) fn file_error(
    what: &'static str,
    path: &Path,
    reason: impl std::fmt::Display,
) -> NetError {
    NetError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The certificates of PEM file `path` (`what` names it in errors): at least one, or an error
/// naming the file. Shared by every TLS setup of vstor (NBD, the internal links).
pub fn pem_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// The private key of PEM file `path`, or an error naming the file.
pub fn pem_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key", path, e))
}

impl PeerTlsFiles {
    fn snapshot(&self) -> Result<FileSnapshot, NetError> {
        FileSnapshot::read(&[
            ("certificate", &self.cert),
            ("private key", &self.key),
            ("CA certificate", &self.ca),
        ])
    }
}

impl PeerTls {
    /// Read and check the three PEM files. Unreadable files, files without the expected PEM
    /// blocks, a key that does not match the certificate and a CA file without usable
    /// certificates are errors naming the file.
    pub fn load(files: &PeerTlsFiles) -> Result<Self, NetError> {
        let live = Reloadable::load(|| files.snapshot(), || PeerConfigs::build(files))?;
        Ok(Self {
            files: Arc::new(files.clone()),
            live: Arc::new(live),
        })
    }

    /// The files this identity is read from.
    pub fn files(&self) -> &PeerTlsFiles {
        &self.files
    }

    /// Read the files again and, if they changed, use them for every handshake from now on
    /// (this clone's and every other's). `Ok(false)`: unchanged. On an error (a file unreadable,
    /// half written, a key that does not fit) the identity in use stays.
    pub fn reload(&self) -> Result<bool, NetError> {
        let now = self.files.snapshot()?;
        self.live
            .replace_if_changed(now, || PeerConfigs::build(&self.files))
    }

    /// Client side: the TLS handshake on a connected `tcp` to `addr` (`host:port`, the address
    /// as dialled: its host is the name the server's certificate must carry).
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> Result<PeerStream, NetError> {
        let name = server_name(addr)?;
        let client = Arc::clone(&self.live.current().client);
        let tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|source| NetError::Handshake {
                peer: addr.to_string(),
                source,
            })?;
        Ok(PeerStream::Client(Box::new(tls)))
    }

    /// Server side: the TLS handshake on an accepted `tcp`; fails unless the client presents a
    /// certificate of the cluster CA. The caller bounds it with a timeout.
    pub async fn accept(&self, tcp: TcpStream) -> Result<PeerStream, NetError> {
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
        let server = Arc::clone(&self.live.current().server);
        let tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|source| NetError::Handshake { peer, source })?;
        Ok(PeerStream::Server(Box::new(tls)))
    }
}

impl PeerConfigs {
    fn build(files: &PeerTlsFiles) -> Result<Self, NetError> {
        let chain = pem_certificates("certificate", &files.cert)?;
        let key = pem_private_key(&files.key)?;
        let mut roots = RootCertStore::empty();
        for cert in pem_certificates("CA certificate", &files.ca)? {
            roots
                .add(cert)
                .map_err(|e| file_error("CA certificate", &files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| file_error("CA certificate", &files.ca, e))?;
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| file_error("certificate and key", &files.cert, e))?;

        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| file_error("certificate and key", &files.cert, e))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The host part of `host:port` (`[v6]:port` too) as the name a server certificate must carry.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, NetError> {
    let bad = |reason: &str| NetError::ServerName {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let Some((host, _port)) = addr.rsplit_once(':') else {
        return Err(bad("not HOST:PORT"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| bad(&e.to_string()))
}

/// One end of an internal connection: plain TCP, TLS on TCP (either side), or a unix socket
/// (same host only).
#[derive(Debug)]
pub enum PeerStream {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl PeerStream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, PeerStream::Client(_) | PeerStream::Server(_))
    }
}

impl From<TcpStream> for PeerStream {
    fn from(s: TcpStream) -> Self {
        PeerStream::Plain(s)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Client(s) => s.is_write_vectored(),
            PeerStream::Server(s) => s.is_write_vectored(),
            PeerStream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

mod link;
mod reload;
mod split;

pub use link::{
    accept_peer, accept_served, bad_magic_hint, connect_peer, reserve_frame, Accepted,
    FRAME_RESERVE_STEP, PLAIN_REFUSED, TLS_HANDSHAKE_RECORD,
};
pub use reload::{FileSnapshot, Reloadable};
pub use split::{PeerReader, PeerWriter};

#[cfg(test)]
mod tests;
