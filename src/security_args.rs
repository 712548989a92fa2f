//! Security flag groups shared by several commands, so the flags, their help and their checks
//! cannot drift apart: `--peer-tls-cert/--peer-tls-key/--peer-tls-ca` for every command that
//! speaks an internal protocol (`vstor serve`, `dtl`, `osd`, `mds`, `edge`, `backend`; all three
//! or none, files checked at startup and reloaded by `credentials`), and the NBD frontend's TLS
//! and connection limits for the two commands that serve NBD (`vstor serve`, `vstor edge`: the
//! same NBD server code), and the etcd link's TLS and credentials (`--etcd-*`) for every command
//! that takes `--registry`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::config::{EtcdSettings, PeerTlsSettings};

/// Mutual TLS on the internal links (DTL, OSD, MDS, edge protocol): all three or none.
#[derive(Args, Clone, Default)]
pub struct PeerTlsArgs {
    /// PEM certificate chain of this process, signed by the cluster CA, presented on internal
    /// links as server and client (config: `peer_tls.cert`) [default: none, plain TCP].
    #[arg(long, value_name = "FILE")]
    pub peer_tls_cert: Option<PathBuf>,
    /// PEM private key of --peer-tls-cert (config: `peer_tls.key`).
    #[arg(long, value_name = "FILE")]
    pub peer_tls_key: Option<PathBuf>,
    /// PEM cluster CA: peers must present a certificate chaining to it, and servers one for the
    /// host dialled (config: `peer_tls.ca`).
    #[arg(long, value_name = "FILE")]
    pub peer_tls_ca: Option<PathBuf>,
}

impl PeerTlsArgs {
    /// The flags as settings (a command without a config file starts from none).
    pub fn settings(self) -> PeerTlsSettings {
        let mut settings = PeerTlsSettings::default();
        settings.merge(self.peer_tls_cert, self.peer_tls_key, self.peer_tls_ca);
        settings
    }

    /// Read and check the files (`None`: plain TCP).
    pub fn load(self) -> Result<Option<vstor_net::PeerTls>> {
        self.settings().load()
    }
}

/// NBD TLS and connection limits (`vstor serve`, `vstor edge`).
#[derive(Args, Clone, Default)]
pub struct NbdFrontendArgs {
    /// PEM certificate chain NBD clients get after NBD_OPT_STARTTLS (serve config:
    /// `nbd_server.tls_cert`) [default: none, no TLS].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert (serve config: `nbd_server.tls_key`).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<String>,
    /// PEM CA certificates: NBD clients must present a certificate chaining to one of them;
    /// needs --nbd-tls require (serve config: `nbd_server.tls_ca`) [default: no client
    /// certificates].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<String>,
    /// TLS for NBD clients: `allow` (optional) or `require` (every option but STARTTLS refused
    /// before TLS) (serve config: `nbd_server.tls`) [default: require when --tls-cert is given].
    #[arg(long, value_name = "MODE", value_parser = ["allow", "require"])]
    pub nbd_tls: Option<String>,
    /// NBD connections at once; more are closed on accept (serve config:
    /// `nbd_server.max_connections`) [default: 1024].
    #[arg(long, value_name = "N")]
    pub nbd_max_connections: Option<usize>,
    /// NBD connections at once from one client IP address (serve config:
    /// `nbd_server.max_connections_per_client`) [default: 128].
    #[arg(long, value_name = "N")]
    pub nbd_max_connections_per_client: Option<usize>,
}

/// TLS and authentication to the cluster registry (etcd), for every command that takes
/// `--registry`. Global, so they may follow a verb (`vstor osd list --etcd-ca …`).
#[derive(Args, Clone, Default)]
pub struct EtcdArgs {
    /// PEM CA certificate(s) etcd's server certificate must chain to, with an etcd+https://
    /// registry (serve config: `cluster.etcd.ca`) [default: the system's CAs].
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate chain presented to etcd (etcd's `--client-cert-auth`); needs
    /// --etcd-key (serve config: `cluster.etcd.cert`) [default: none].
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert (serve config: `cluster.etcd.key`).
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, when etcd runs with authentication enabled; the password comes from
    /// --etcd-password-file or the environment variable VSTOR_ETCD_PASSWORD, never from the
    /// command line (serve config: `cluster.etcd.user`) [default: none].
    #[arg(long, value_name = "NAME", global = true)]
    pub etcd_user: Option<String>,
    /// File holding the --etcd-user's password, one line (serve config:
    /// `cluster.etcd.password_file`).
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_password_file: Option<PathBuf>,
    /// Bound on one call to the registry, e.g. 5s: an etcd whose disk is slow or shared may need
    /// more than the default; from 100ms to 60s (serve config: `cluster.etcd.timeout`)
    /// [default: 2s].
    #[arg(long, value_name = "DURATION", global = true)]
    pub registry_timeout: Option<String>,
}

impl EtcdArgs {
    /// The flags as settings (a command without a config file starts from none).
    pub fn settings(self) -> EtcdSettings {
        EtcdSettings {
            ca: self.etcd_ca,
            cert: self.etcd_cert,
            key: self.etcd_key,
            user: self.etcd_user,
            password_file: self.etcd_password_file,
            timeout: self.registry_timeout,
        }
    }

    /// Parse the registry URI `spec` and read the files: what
    /// [`EtcdTarget::connect`](crate::registry::etcd::EtcdTarget::connect) needs.
    pub fn target(&self, spec: &str) -> Result<crate::registry::etcd::EtcdTarget> {
        self.clone().settings().target("--registry", spec)
    }
}
