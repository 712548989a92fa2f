//! The management API over HTTPS (`vstor serve --api-tls-cert FILE --api-tls-key FILE`).
//!
//! A bearer token sent over plain HTTP can be read by anyone on the path, so an API reachable
//! from the network should be HTTPS. rustls (with the aws-lc-rs provider the S3 client already
//! links) does the TLS; [`TlsListener`] plugs it into `axum::serve` through axum's `Listener`
//! trait. Handshakes run in their own tasks with a deadline, so a client that connects and never
//! finishes its handshake holds up nobody else; accepted streams reach axum through a channel.
//!
//! The certificate and key are an [`ApiTls`]: every handshake takes the current configuration,
//! and [`ApiTls::reload`] (on `SIGHUP` and when the files change, `credentials`) swaps in one
//! built from the files as they are now, so a renewed certificate needs no restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use vstor_net::{FileSnapshot, Reloadable};

/// How long a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for axum.
const BACKLOG: usize = 64;

/// Install aws-lc-rs as the process's rustls provider (once; later calls are no-ops). ureq
/// looks the provider up at run time and would otherwise panic.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The API's certificate and key, reloadable from their files. Clones share them.
#[derive(Clone)]
pub struct ApiTls {
    cert: PathBuf,
    key: PathBuf,
    live: Arc<Reloadable<TlsAcceptor>>,
}

impl ApiTls {
    /// Read and check the files (at startup: an error stops the node).
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let live = Reloadable::load(|| snapshot(cert, key), || acceptor(cert, key))?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            live: Arc::new(live),
        })
    }

    /// Read the files again and, if they changed, use them for every handshake from now on.
    /// `Ok(false)`: unchanged. On an error the certificate in use stays.
    pub fn reload(&self) -> Result<bool> {
        let now = snapshot(&self.cert, &self.key)?;
        self.live
            .replace_if_changed(now, || acceptor(&self.cert, &self.key))
    }

    /// The certificate file (for logs).
    pub fn cert(&self) -> &Path {
        &self.cert
    }
}

fn snapshot(cert: &Path, key: &Path) -> Result<FileSnapshot> {
    FileSnapshot::read(&[("certificate", cert), ("private key", key)])
        .context("settings api.tls_cert/api.tls_key (--api-tls-cert/--api-tls-key)")
}

/// The server's certificate chain and key, checked.
fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("setting api.tls_cert: cannot read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("setting api.tls_cert: {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "setting api.tls_cert: {} holds no PEM certificate",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "setting api.tls_key: cannot read a PEM private key from {}",
            key.display()
        )
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("setting api.tls_cert/api.tls_key: the key does not fit the certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS connections accepted on a TCP listener, for `axum::serve`.
pub struct TlsListener {
    streams: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: ApiTls) -> Result<Self> {
        let local = listener.local_addr()?;
        let (tx, streams) = mpsc::channel(BACKLOG);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "API: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = TlsAcceptor::clone(&tls.live.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API: TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "API: TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(Self {
            streams,
            local,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.streams.recv().await {
            Some(accepted) => accepted,
            // The acceptor task ended (it only does when aborted): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
