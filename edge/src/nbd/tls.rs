//! NBD over TLS: the server side of `NBD_OPT_STARTTLS` (`doc/proto.md`, "TLS support").
//!
//! # Why STARTTLS and not a TLS listener
//!
//! NBD clients (qemu, libnbd, nbd-client) never open TLS on connect: they greet in plain text and
//! upgrade the connection with `NBD_OPT_STARTTLS` during option haggling. So TLS is a step of the
//! handshake (`handshake` answers the option, `mod.rs` runs the TLS handshake on the same socket
//! and restarts haggling on the encrypted stream, forgetting everything negotiated before, as the
//! spec demands), and the transmission phase (`conn`) is generic over the stream.
//!
//! # Modes
//!
//! * [`TlsMode::Allow`]: clients may upgrade; plain-text clients are served as before.
//! * [`TlsMode::Require`] (the spec's FORCEDTLS): before the upgrade every option but `STARTTLS`
//!   and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` (so not even the export list leaks), and
//!   `NBD_OPT_EXPORT_NAME`, which has no error reply, closes the connection.
//!
//! # Client certificates
//!
//! With a CA file ([`TlsFiles::ca`]) the TLS handshake requires a client certificate that chains
//! to one of the CA file's certificates and is valid now (rustls' webpki verifier); a client
//! without one, or with one from another CA or expired, fails the TLS handshake. Because a
//! plain-text client would skip that check altogether, client certificates are only accepted
//! together with [`TlsMode::Require`] ([`NbdTls::load`] refuses the other combination).
//!
//! The verified certificate's subject common name ([`client_subject`]) is what per-export allow
//! lists match (`ExportRegistry::allows`). Only the CN is used, not DNS subject alternative
//! names: client certificates name a user or a service, and operators write that name as the CN.
//!
//! # Renewal
//!
//! [`NbdTls::reload`] re-reads the files and, when they changed, gives every later `STARTTLS` the
//! new certificate, key and CA; connections already encrypted keep theirs. `vstor serve` and
//! `vstor edge` call it on `SIGHUP` and when they see the files change (`src/credentials.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use vstor_net::{FileSnapshot, Reloadable};

use super::NbdError;

/// Whether TLS is optional or mandatory for NBD clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Allow,
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(TlsMode::Allow),
            "require" => Ok(TlsMode::Require),
            other => Err(format!("{other:?} is not allow or require")),
        }
    }
}

/// The PEM files of the server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; `None`: no client certificates.
    pub ca: Option<PathBuf>,
}

/// A loaded TLS configuration for the NBD server, reloadable from its files
/// ([`NbdTls::reload`]; why and how: `vstor_net::Reloadable`). Clones share it.
#[derive(Clone)]
pub struct NbdTls {
    files: Arc<TlsFiles>,
    live: Arc<Reloadable<TlsAcceptor>>,
    mode: TlsMode,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("files", &self.files)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn file_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> NbdError {
    NbdError::TlsFile {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// PEM loading is `vstor_net`'s (shared with the internal links); its file errors become ours.
fn from_net(e: vstor_net::NetError) -> NbdError {
    match e {
        vstor_net::NetError::File { what, path, reason } => {
            NbdError::TlsFile { what, path, reason }
        }
        other => NbdError::TlsConfig(other.to_string()),
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, NbdError> {
    vstor_net::pem_certificates(what, path).map_err(from_net)
}

/// The subject common name of the end-entity certificate in `chain` (the client's own, first in
/// the chain rustls returns after verifying it). `None` when the certificate has no CN, a CN that
/// is not a string, or cannot be parsed (it cannot, once rustls accepted it; but a parse failure
/// must not grant anything, and `None` matches no subject).
pub(crate) fn client_subject(chain: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_owned();
    // Two CNs would make "the subject" ambiguous: match neither.
    names.next().is_none().then_some(cn)
}

impl TlsFiles {
    fn snapshot(&self) -> Result<FileSnapshot, NbdError> {
        let mut files = vec![
            ("certificate", self.cert.as_path()),
            ("private key", self.key.as_path()),
        ];
        if let Some(ca) = &self.ca {
            files.push(("CA certificate", ca.as_path()));
        }
        FileSnapshot::read(&files).map_err(from_net)
    }

    fn acceptor(&self, mode: TlsMode) -> Result<TlsAcceptor, NbdError> {
        let chain = certificates("certificate", &self.cert)?;
        let key = vstor_net::pem_private_key(&self.key).map_err(from_net)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| NbdError::TlsConfig(e.to_string()))?;
        let builder = match &self.ca {
            Some(ca) => {
                if mode != TlsMode::Require {
                    return Err(NbdError::TlsConfig(
                        "client certificates (a CA file) need TLS mode require: under allow a \
                         client could skip the certificate check by not using TLS"
                            .into(),
                    ));
                }
                let mut roots = RootCertStore::empty();
                for cert in certificates("CA certificate", ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| file_error("CA certificate", ca, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| file_error("CA certificate", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| file_error("certificate and key", &self.cert, e))?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl NbdTls {
    /// Read and check the PEM files: unreadable files, files without the expected PEM blocks,
    /// a key that does not match the certificate and a CA file without usable certificates are
    /// errors naming the file.
    pub fn load(files: &TlsFiles, mode: TlsMode) -> Result<Self, NbdError> {
        let live = Reloadable::load(|| files.snapshot(), || files.acceptor(mode))?;
        Ok(Self {
            files: Arc::new(files.clone()),
            live: Arc::new(live),
            mode,
        })
    }

    /// Read the files again and, if they changed, use them for every TLS handshake from now on.
    /// `Ok(false)`: unchanged. On an error the configuration in use stays. The mode and whether
    /// clients need certificates (a CA file or not) are settings, not files: they stay.
    pub fn reload(&self) -> Result<bool, NbdError> {
        let now = self.files.snapshot()?;
        self.live
            .replace_if_changed(now, || self.files.acceptor(self.mode))
    }

    /// The files this configuration is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The acceptor for a handshake starting now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::clone(&self.live.current())
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate.
    pub fn client_auth(&self) -> bool {
        self.files.ca.is_some()
    }
}
