//! Renewed credentials without a restart: every long-running vstor process (`serve`, `edge`,
//! `dtl`, `osd`, `mds`) re-reads its certificate files and API token file on `SIGHUP` and every
//! [`CHECK_EVERY`], and the handshakes and requests that follow use whatever changed.
//!
//! Why both: renewal tools differ. Some signal the service (a `systemctl reload`, certbot's
//! deploy hook), others only replace the files (cert-manager's mounted secrets, Vault agent);
//! the periodic check catches the second kind, `SIGHUP` makes the first immediate. The check
//! compares the files' bytes with those the configuration in use was built from
//! (`vstor_net::Reloadable`), so it costs a few small reads and rebuilds nothing while the files
//! stay the same.
//!
//! What is reloaded: the internal links' identity (`--peer-tls-*`: DTL, OSD, MDS and edge
//! protocol, as server and as client), the NBD server's (`--tls-*`), the API's (`--api-tls-*`),
//! the API's tokens (`--api-token-file`, several lines for a rotation: `api_auth`) and the CAs
//! a node checks other nodes' APIs against (`--api-ca`). The etcd link's files
//! (`--etcd-ca/cert/key`, the password file) are re-read too: a registry whose files changed
//! connects a new client, checks it, and only then replaces the old one
//! (`registry::etcd::reload_all`). A reload that fails (a file half written, a key that
//! does not fit its certificate) is logged with the file and counted
//! (`vstor_credential_reload_failures_total`), and the credentials in use stay; the next check
//! or signal tries again. A process without any of these files still takes `SIGHUP` (and logs
//! it) rather than dying of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// How often the files are compared with those in use.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// One set of credentials built from files.
#[derive(Clone)]
pub enum Credentials {
    /// `--peer-tls-*`: the internal links.
    Peer(vstor_net::PeerTls),
    /// `--tls-*`: the NBD server.
    Nbd(vstor_edge::nbd::NbdTls),
    /// `--api-tls-*`: the management API's certificate.
    Api(crate::api_tls::ApiTls),
    /// `--api-token-file`: the tokens the API accepts, and the one this process sends.
    ApiToken(Arc<crate::api_auth::ApiTokens>),
    /// `--api-ca`: the CAs other nodes' APIs are checked against.
    ApiCa(Arc<crate::api_auth::ApiCa>),
    /// `--etcd-*`: every etcd registry connection of the process
    /// (`registry::etcd::reload_all`).
    Etcd,
}

/// The credentials a process loaded (each may be absent), in the order they are checked, and
/// its etcd connections (if it has any).
pub fn of(
    peer: Option<vstor_net::PeerTls>,
    nbd: Option<vstor_edge::nbd::NbdTls>,
    api: Option<crate::api_tls::ApiTls>,
    api_token: Option<Arc<crate::api_auth::ApiTokens>>,
) -> Vec<Credentials> {
    let peer = peer.map(Credentials::Peer);
    let nbd = nbd.map(Credentials::Nbd);
    let api = api.map(Credentials::Api);
    let token = api_token.map(Credentials::ApiToken);
    [peer, nbd, api, token, Some(Credentials::Etcd)]
        .into_iter()
        .flatten()
        .collect()
}

/// What the loop needs of a configuration (a trait so the loop is tested without certificates).
trait Reload: Clone + Send + Sync + 'static {
    /// The setting it comes from, for logs.
    fn setting(&self) -> &'static str;
    /// Its (first) file, for logs.
    fn file(&self) -> String;
    /// Read the files again: replaced, unchanged, or why not.
    fn reload(&self) -> Result<bool, String>;
}

impl Reload for Credentials {
    fn setting(&self) -> &'static str {
        match self {
            Credentials::Peer(_) => "peer_tls",
            Credentials::Nbd(_) => "nbd_server.tls",
            Credentials::Api(_) => "api.tls",
            Credentials::ApiToken(_) => "api.token_file",
            Credentials::ApiCa(_) => "api.ca_file",
            Credentials::Etcd => "cluster.etcd",
        }
    }

    fn file(&self) -> String {
        match self {
            Credentials::Peer(tls) => tls.files().cert.display().to_string(),
            Credentials::Nbd(tls) => tls.files().cert.display().to_string(),
            Credentials::Api(tls) => tls.cert().display().to_string(),
            Credentials::ApiToken(tokens) => tokens.path().display().to_string(),
            Credentials::ApiCa(ca) => ca.path().display().to_string(),
            Credentials::Etcd => "the --etcd-* files".to_string(),
        }
    }

    fn reload(&self) -> Result<bool, String> {
        match self {
            Credentials::Peer(tls) => tls.reload().map_err(|e| e.to_string()),
            Credentials::Nbd(tls) => tls.reload().map_err(|e| e.to_string()),
            Credentials::Api(tls) => tls.reload().map_err(|e| format!("{e:#}")),
            Credentials::ApiToken(tokens) => tokens.reload().map_err(|e| format!("{e:#}")),
            Credentials::ApiCa(ca) => ca.reload().map_err(|e| format!("{e:#}")),
            Credentials::Etcd => crate::registry::etcd::reload_all(),
        }
    }
}

/// What the reloads did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Configurations replaced by new files.
    pub reloads: AtomicU64,
    /// Attempts whose files could not be used.
    pub failures: AtomicU64,
    /// Configurations whose files could not be used at the last check (they still run on what
    /// was loaded before, certificates that will expire): what an alert watches.
    pub failing: AtomicU64,
}

/// Watch `credentials` from now on: install the `SIGHUP` handler (so the signal no longer ends the
/// process) and start the checks on the current runtime.
pub fn spawn(credentials: Vec<Credentials>) -> Result<Arc<ReloadStats>> {
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let signals = futures::stream::poll_fn(move |cx| hup.poll_recv(cx));
    let stats = Arc::new(ReloadStats::default());
    tokio::spawn(run(credentials, signals, CHECK_EVERY, Arc::clone(&stats)));
    Ok(stats)
}

/// The loop behind [`spawn`]: check at every item of `signals` and every `every`.
async fn run<R: Reload>(
    credentials: Vec<R>,
    signals: impl Stream<Item = ()> + Unpin,
    every: Duration,
    stats: Arc<ReloadStats>,
) {
    let mut signals = signals.fuse();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            got = signals.next() => match got {
                Some(()) => true,
                None => return,
            },
            _ = ticks.tick() => false,
        };
        if signalled {
            info!(
                configurations = credentials.len(),
                "SIGHUP: reading the credential files again"
            );
        }
        let batch = credentials.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            batch
                .iter()
                .map(|t| (t.setting(), t.file(), t.reload()))
                .collect::<Vec<_>>()
        })
        .await;
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                error!(error = %e, "the credentials check failed");
                continue;
            }
        };
        let failing = outcomes.iter().filter(|(_, _, o)| o.is_err()).count();
        stats.failing.store(failing as u64, Ordering::Relaxed);
        for (setting, file, outcome) in outcomes {
            match outcome {
                Ok(true) => {
                    stats.reloads.fetch_add(1, Ordering::Relaxed);
                    info!(
                        setting,
                        file, "credentials reloaded: new connections and requests use them"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    error!(
                        setting,
                        error = %e,
                        "cannot reload credentials; the ones in use stay"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A configuration whose "files" are a script of outcomes, one per check.
    #[derive(Clone)]
    struct Scripted(Arc<Mutex<Vec<Result<bool, String>>>>);

    impl Reload for Scripted {
        fn setting(&self) -> &'static str {
            "test"
        }
        fn file(&self) -> String {
            "cert.pem".into()
        }
        fn reload(&self) -> Result<bool, String> {
            self.0.lock().unwrap().pop().unwrap_or(Ok(false))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_and_the_periodic_check_both_reload_and_failures_are_counted() {
        // Popped from the end: changed (at the signal), broken, unchanged, changed.
        let script = Scripted(Arc::new(Mutex::new(vec![
            Ok(true),
            Ok(false),
            Err("half written".into()),
            Ok(true),
        ])));
        let stats = Arc::new(ReloadStats::default());
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let every = Duration::from_secs(30);
        let task = tokio::spawn(run(vec![script.clone()], rx, every, Arc::clone(&stats)));

        tx.unbounded_send(()).unwrap();
        wait_for(|| stats.reloads.load(Ordering::Relaxed) == 1).await;
        assert_eq!(script.0.lock().unwrap().len(), 3, "one check per signal");

        // No signal from here on: the periodic check alone goes through the rest.
        tokio::time::sleep(every).await;
        wait_for(|| stats.failures.load(Ordering::Relaxed) == 1).await;
        assert_eq!(stats.failing.load(Ordering::Relaxed), 1);
        tokio::time::sleep(every).await;
        wait_for(|| script.0.lock().unwrap().len() == 1).await;
        tokio::time::sleep(every).await;
        wait_for(|| stats.reloads.load(Ordering::Relaxed) == 2).await;
        assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
        assert_eq!(stats.failing.load(Ordering::Relaxed), 0, "mended");

        // The signal stream ends (the handler is gone): so does the loop.
        drop(tx);
        task.await.unwrap();
    }

    /// Yield until `done` (the checks run on the blocking pool's real threads), for at most a
    /// few seconds of real time.
    async fn wait_for(done: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the check did not happen"
            );
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
