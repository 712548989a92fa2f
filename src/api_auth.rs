//! Who may use a node's management API, and how this process proves it when it calls one.
//!
//! The API can create, delete and roll back volumes, so on anything but loopback it needs a
//! caller check. A bearer token read from a file (`vstor serve --api-token-file`, `[api]
//! token_file`) is the simplest check every client already speaks: curl, Prometheus
//! (`authorization: {credentials_file: …}`), the dashboard, the CLI. Nodes of a cluster share one
//! token file, so the node that forwards a request to a volume's owner authenticates with the
//! same token. Without a token the API stays open, the zero-config loopback default.
//!
//! `GET /v1/health` stays open (liveness probes and the cluster's "is this node X" check carry no
//! data), and so does the dashboard page `GET /` itself: it holds no data, and asks the user for
//! the token its data calls then send.
//!
//! The outgoing side ([`Outgoing`]) is set once per process: the CLI's token and CA from its
//! flags or environment, or the node's own token and CA for forwarding between nodes (both
//! files re-read when they change: [`ApiTokens`], [`ApiCa`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api_types::ErrorBody;
use vstor_net::{FileSnapshot, Reloadable};

/// The message a CLI user gets for a 401.
pub const NEEDS_TOKEN: &str = "401: the API needs a token: --api-token-file or VSTOR_API_TOKEN";

/// Read a token file: its tokens, one per line, without surrounding whitespace (a trailing
/// newline is what `echo`/editors leave); blank lines are skipped. Unreadable, empty, or a token
/// an HTTP header cannot carry is an error naming the file and `what` set it.
pub fn read_tokens(path: &Path, what: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{what}: cannot read the API token file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        bail!("{what}: the API token file {} is empty", path.display());
    }
    if tokens
        .iter()
        .any(|t| t.chars().any(|c| c.is_control() || c == ' '))
    {
        bail!(
            "{what}: an API token in {} has spaces or control characters; an HTTP header cannot carry them",
            path.display()
        );
    }
    Ok(tokens)
}

/// The token a token file gives a caller to send: its first.
pub fn read_token_file(path: &Path, what: &str) -> Result<String> {
    let mut tokens = read_tokens(path, what)?;
    Ok(tokens.swap_remove(0))
}

/// A file this process reads its API credentials from, as it is now: the token file
/// ([`ApiTokens`]) and the `--api-ca` bundle ([`ApiCa`]). `read` parses the file (its errors
/// name the file and the setting `what`); `reload` re-reads it when `credentials` checks, and
/// replaces what is in use only if the bytes changed and parse (`vstor_net::Reloadable`).
pub struct WatchedFile<T> {
    path: PathBuf,
    what: &'static str,
    /// What the file holds, for errors: "API token", "CA".
    kind: &'static str,
    read: fn(&Path, &str) -> Result<T>,
    live: Reloadable<T>,
}

impl<T> std::fmt::Debug for WatchedFile<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents (tokens).
        f.debug_struct("WatchedFile")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<T> WatchedFile<T> {
    fn open(
        path: &Path,
        what: &'static str,
        kind: &'static str,
        read: fn(&Path, &str) -> Result<T>,
    ) -> Result<Arc<Self>> {
        let live = Reloadable::load(|| Self::snapshot(path, what, kind), || read(path, what))?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            what,
            kind,
            read,
            live,
        }))
    }

    fn snapshot(path: &Path, what: &str, kind: &'static str) -> Result<FileSnapshot> {
        FileSnapshot::read(&[(kind, path)]).with_context(|| what.to_string())
    }

    /// Read the file again and, if it changed, use its contents from the next request or call
    /// on. `Ok(false)`: unchanged; on an error what is in use stays.
    pub fn reload(&self) -> Result<bool> {
        let now = Self::snapshot(&self.path, self.what, self.kind)?;
        self.live
            .replace_if_changed(now, || (self.read)(&self.path, self.what))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The tokens a node's (or edge's) API accepts, from its token file: every line is accepted,
/// and the first is the one the node sends when it calls another node. Several lines are how a
/// cluster changes its token without refusing anyone: add the new token as a second line on
/// every node (clients may switch to it from then on), move it to the first line, then drop
/// the old one. Re-read on `SIGHUP` and when the file changes (`credentials`), so none of
/// those steps is a restart.
pub type ApiTokens = WatchedFile<Vec<String>>;

impl ApiTokens {
    /// Read and check the file (`what` names the setting in errors).
    pub fn load(path: &Path, what: &'static str) -> Result<Arc<Self>> {
        Self::open(path, what, "API token", read_tokens)
    }

    /// The tokens accepted now.
    pub fn accepted(&self) -> Arc<Vec<String>> {
        self.live.current()
    }

    /// The token this process sends now (the file's first).
    pub fn sent(&self) -> String {
        self.live.current().first().cloned().unwrap_or_default()
    }
}

/// The tokens the API requires, if any.
#[derive(Clone, Default)]
pub struct RequiredToken(pub Option<Arc<ApiTokens>>);

/// Whether `presented` equals `expected`, in time independent of where they differ (`subtle`:
/// a plain `==` stops at the first differing byte, which leaks the token's prefix to a caller
/// who can time many attempts). Only the length is not hidden, which reveals nothing usable.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected))
}

/// Requests that need no token: liveness and the dashboard page (not its data).
fn is_open(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD) && (path == "/v1/health" || path == "/")
}

/// The middleware: 401 with `WWW-Authenticate: Bearer` unless the request carries the token.
pub async fn require_token(
    State(required): State<RequiredToken>,
    request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = required.0.as_deref() else {
        return next.run(request).await;
    };
    if is_open(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let accepted = tokens.accepted();
    // Compared with every accepted token (no early exit: which one matched stays hidden too).
    let matches = |token: &str| {
        accepted.iter().fold(false, |hit, t| {
            hit | token_matches(token.as_bytes(), t.as_bytes())
        })
    };
    let error = match presented {
        Some(token) if matches(token) => {
            return next.run(request).await;
        }
        Some(_) => "the API token is wrong",
        None => "the API needs a token: send Authorization: Bearer TOKEN",
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(ErrorBody {
            error: error.to_string(),
        }),
    )
        .into_response()
}

/// The token a process sends.
pub enum OutgoingToken {
    /// The CLI's, read once.
    Fixed(String),
    /// A node's own: the first of its token file as it is now.
    Node(Arc<ApiTokens>),
}

impl OutgoingToken {
    fn current(&self) -> String {
        match self {
            OutgoingToken::Fixed(token) => token.clone(),
            OutgoingToken::Node(tokens) => tokens.sent(),
        }
    }
}

/// How this process calls a node's API: the token it sends and the CAs it trusts for HTTPS.
#[derive(Default)]
pub struct Outgoing {
    pub token: Option<OutgoingToken>,
    /// Where the token came from, for the 401 message.
    pub token_source: Option<String>,
    /// The CAs to trust (`--api-ca`); `None`: the system's.
    pub ca: Option<Arc<ApiCa>>,
    /// Nodes' APIs are HTTPS (this node serves TLS, so its peers do too: one cluster config).
    pub https: bool,
}

static OUTGOING: OnceLock<Outgoing> = OnceLock::new();

/// Set the process's outgoing credentials (once, before any API call).
pub fn set_outgoing(outgoing: Outgoing) {
    if OUTGOING.set(outgoing).is_err() {
        tracing::warn!("the outgoing API credentials were set twice; the first setting stays");
    }
}

pub fn outgoing() -> &'static Outgoing {
    OUTGOING.get_or_init(Outgoing::default)
}

/// Read PEM CA certificates from `path`.
pub fn read_ca(path: &Path, what: &str) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("{what}: cannot read the CA file {}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) =
            item.with_context(|| format!("{what}: {} is not valid PEM", path.display()))?
        {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        bail!("{what}: {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The CAs this process checks other nodes' HTTPS APIs against (`--api-ca`, a bundle of one or
/// more). Re-read with the other credentials (`credentials`): a CA rotation first adds the new
/// CA to every node's bundle, and only then gives nodes API certificates of it, so forwarding
/// between nodes must follow the bundle without a restart. Every call builds its TLS settings
/// from the bundle as it is then (`Outgoing::tls_config`).
pub type ApiCa = WatchedFile<Vec<ureq::tls::Certificate<'static>>>;

impl ApiCa {
    /// Read and check the bundle (`what` names the setting in errors).
    pub fn load(path: &Path, what: &'static str) -> Result<Arc<Self>> {
        Self::open(path, what, "CA", read_ca)
    }

    /// The CAs trusted now.
    pub fn certs(&self) -> Arc<Vec<ureq::tls::Certificate<'static>>> {
        self.live.current()
    }
}

impl Outgoing {
    /// The CLI's credentials: token from `--api-token-file`, else `VSTOR_API_TOKEN`, else the
    /// file `VSTOR_API_TOKEN_FILE` names; CA from `--api-ca`, else `VSTOR_API_CA`.
    pub fn from_cli(token_file: Option<&Path>, ca: Option<&Path>) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let (token, token_source) = if let Some(path) = token_file {
            (
                Some(read_token_file(path, "--api-token-file")?),
                Some(format!("--api-token-file {}", path.display())),
            )
        } else if let Some(token) = env("VSTOR_API_TOKEN") {
            (
                Some(token.trim().to_string()),
                Some("VSTOR_API_TOKEN".to_string()),
            )
        } else if let Some(path) = env("VSTOR_API_TOKEN_FILE") {
            let path = Path::new(&path);
            (
                Some(read_token_file(path, "VSTOR_API_TOKEN_FILE")?),
                Some(format!("VSTOR_API_TOKEN_FILE {}", path.display())),
            )
        } else {
            (None, None)
        };
        let ca = match (ca, env("VSTOR_API_CA")) {
            (Some(path), _) => Some(ApiCa::load(path, "--api-ca")?),
            (None, Some(path)) => Some(ApiCa::load(Path::new(&path), "VSTOR_API_CA")?),
            (None, None) => None,
        };
        Ok(Self {
            token: token.map(OutgoingToken::Fixed),
            token_source,
            ca,
            https: false,
        })
    }

    /// `Authorization` header value, if a token is set.
    pub fn authorization(&self) -> Option<String> {
        self.token
            .as_ref()
            .map(|t| format!("Bearer {}", t.current()))
    }

    /// `https` or `http`, for node-to-node calls.
    pub fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// rustls settings for ureq: the given CAs, else the system's trust store.
    pub fn tls_config(&self) -> ureq::tls::TlsConfig {
        let roots = match &self.ca {
            Some(ca) => ureq::tls::RootCerts::Specific(ca.certs()),
            None => ureq::tls::RootCerts::PlatformVerifier,
        };
        ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(roots)
            .build()
    }
}

/// Whether `addr` is loopback (the only place an unauthenticated, plain-text listener is fine).
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Log the loud startup warnings for listeners reachable from the network without protection.
pub fn warn_exposed(
    api: std::net::SocketAddr,
    api_tls: bool,
    api_token: bool,
    nbd: std::net::SocketAddr,
    nbd_tls: Option<&vstor_edge::nbd::NbdTls>,
) {
    if !is_loopback(&api) {
        let mut missing = Vec::new();
        if !api_tls {
            missing.push("TLS (--api-tls-cert/--api-tls-key): tokens and data cross the network in clear text");
        }
        if !api_token {
            missing.push("a token (--api-token-file): anyone who reaches it can create, delete and roll back volumes");
        }
        if !missing.is_empty() {
            tracing::warn!(
                "SECURITY: the management API listens on {api}, reachable from the network, without {}",
                missing.join("; and without ")
            );
        }
    }
    if !is_loopback(&nbd) {
        match nbd_tls.map(|t| (t.mode(), t.client_auth())) {
            None => tracing::warn!(
                "SECURITY: the NBD server listens on {nbd}, reachable from the network, without TLS or \
                 authentication (--tls-cert/--tls-key/--nbd-tls): anyone who reaches it can read and \
                 write every volume"
            ),
            Some((vstor_edge::nbd::TlsMode::Allow, _)) => tracing::warn!(
                "SECURITY: the NBD server listens on {nbd}, reachable from the network, with TLS only \
                 optional (--nbd-tls allow): clients that skip it read and write in clear text, \
                 unauthenticated"
            ),
            Some((_, false)) => tracing::warn!(
                "SECURITY: the NBD server on {nbd} requires TLS but no client certificates \
                 (--tls-ca): anyone who reaches it can read and write every volume, encrypted"
            ),
            Some((_, true)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(read_token_file(&path, "t").unwrap(), "abc123");
        std::fs::write(&path, " \n").unwrap();
        let err = read_token_file(&path, "t").unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let err = read_token_file(&dir.path().join("missing"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the API token file"), "{err}");
        std::fs::write(&path, "new token\n").unwrap();
        let err = read_token_file(&path, "t").unwrap_err().to_string();
        assert!(err.contains("spaces or control characters"), "{err}");
    }

    #[test]
    fn every_line_is_accepted_the_first_is_sent_and_a_reload_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old\n").unwrap();
        let tokens = ApiTokens::load(&path, "t").unwrap();
        assert_eq!(*tokens.accepted(), ["old"]);
        assert!(!tokens.reload().unwrap(), "unchanged");

        // The rotation's first step: the new token accepted too, the old one still sent.
        std::fs::write(&path, "old\n\n  new  \n").unwrap();
        assert!(tokens.reload().unwrap());
        assert_eq!(*tokens.accepted(), ["old", "new"]);
        assert_eq!(tokens.sent(), "old");
        let outgoing = OutgoingToken::Node(Arc::clone(&tokens));
        assert_eq!(outgoing.current(), "old");
        std::fs::write(&path, "new\nold\n").unwrap();
        assert!(tokens.reload().unwrap());
        assert_eq!(
            outgoing.current(),
            "new",
            "the node sends the new first line"
        );

        // A file emptied by mistake is refused and the tokens in use stay.
        std::fs::write(&path, "\n").unwrap();
        let err = tokens.reload().unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        assert_eq!(*tokens.accepted(), ["new", "old"]);
    }

    /// A PEM certificate block of `base64` (the bundle is parsed, not verified, here).
    fn pem(base64: &str) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{base64}\n-----END CERTIFICATE-----\n")
    }
    const OLD: &str = "b2xkIGNh"; // "old ca"
    const NEW: &str = "bmV3IGNh"; // "new ca"

    /// The DER of each CA the outgoing calls trust now.
    fn trusted(outgoing: &Outgoing) -> Vec<Vec<u8>> {
        match outgoing.tls_config().root_certs() {
            ureq::tls::RootCerts::Specific(certs) => {
                certs.iter().map(|c| c.der().to_vec()).collect()
            }
            _ => panic!("not the --api-ca bundle"),
        }
    }

    #[test]
    fn outgoing_calls_trust_the_ca_bundle_as_it_is_now_and_a_broken_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pem(OLD)).unwrap();
        let ca = ApiCa::load(&path, "--api-ca").unwrap();
        let outgoing = Outgoing {
            ca: Some(Arc::clone(&ca)),
            ..Outgoing::default()
        };
        assert_eq!(trusted(&outgoing), [b"old ca".to_vec()]);
        assert!(!ca.reload().unwrap(), "unchanged");

        // A rotation's first step: both CAs.
        std::fs::write(&path, pem(OLD) + &pem(NEW)).unwrap();
        assert!(ca.reload().unwrap());
        assert_eq!(trusted(&outgoing), [b"old ca".to_vec(), b"new ca".to_vec()]);

        // A file without a certificate is refused, naming it; the CAs in use stay.
        std::fs::write(&path, "half written\n").unwrap();
        let err = format!("{:#}", ca.reload().unwrap_err());
        assert!(
            err.contains("holds no PEM certificate") && err.contains("ca.pem"),
            "{err}"
        );
        assert_eq!(trusted(&outgoing), [b"old ca".to_vec(), b"new ca".to_vec()]);
    }
}
