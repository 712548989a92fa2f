//! Configurations that follow their files while the process runs: TLS (PEM files), API tokens.
//!
//! # Why
//!
//! Certificates expire, and the tools that renew them (cert-manager, Vault agent, an ACME
//! client, a cron job around `openssl ca`) replace the files in place and expect the service to
//! pick them up. Restarting a vstor node for that is not free: its NBD clients reconnect and its
//! vhost-user guests pause. So every TLS configuration built from files (the internal links'
//! [`PeerTls`](crate::PeerTls), the NBD server's, the API's) is a [`Reloadable`]: connections
//! take the current configuration at their handshake, and a reload swaps in a new one built from
//! the files as they are now. The API's bearer tokens (`src/api_auth.rs`) follow their file the
//! same way. Connections already up keep the configuration they started with
//! (TLS only checks certificates at the handshake), so a rotation never cuts one.
//!
//! # Rules
//!
//! * A reload first reads the files ([`FileSnapshot`]); when their bytes are those the current
//!   configuration was built from, nothing is rebuilt, so checking often costs three small reads.
//! * A configuration that cannot be built (a file half written, a key that does not match its
//!   certificate yet) leaves the current one in place and is an error naming the file; the
//!   snapshot is not recorded, so the next check tries again.
//! * The configuration is built after the snapshot was read, from the files: if they changed in
//!   between, the next check sees bytes other than the recorded ones and builds again. Never a
//!   configuration older than the recorded bytes.
//!
//! No lock is held across I/O: the files are read before the lock is taken, and a handshake
//! clones the current `Arc` out of the lock before it starts.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use crate::{file_error, NetError};

/// The bytes of the files a configuration is built from (PEM files, a token file), in a fixed
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSnapshot(Vec<Vec<u8>>);

impl FileSnapshot {
    /// Read every file of `files` (`what` names it in errors: "certificate", "private key"...).
    pub fn read(files: &[(&'static str, &Path)]) -> Result<Self, NetError> {
        files
            .iter()
            .map(|&(what, path)| std::fs::read(path).map_err(|e| file_error(what, path, e)))
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// A value built from files (a rustls configuration, an acceptor, a token list), replaceable
/// while in use.
pub struct Reloadable<T> {
    current: RwLock<Built<T>>,
}

struct Built<T> {
    value: Arc<T>,
    from: FileSnapshot,
}

impl<T> Reloadable<T> {
    /// `value`, built from the files whose bytes were `from`.
    pub fn new(value: T, from: FileSnapshot) -> Self {
        Self {
            current: RwLock::new(Built {
                value: Arc::new(value),
                from,
            }),
        }
    }

    /// Build the first value: the files' bytes are read first (see the rules above), then
    /// `build` runs even if that read failed, because its error says more than "cannot read"
    /// (a certificate file without a certificate, a key that does not fit).
    pub fn load<E>(
        snapshot: impl FnOnce() -> Result<FileSnapshot, E>,
        build: impl FnOnce() -> Result<T, E>,
    ) -> Result<Self, E> {
        let snapshot = snapshot();
        let value = build()?;
        Ok(Self::new(value, snapshot?))
    }

    /// The configuration new connections use now.
    pub fn current(&self) -> Arc<T> {
        let built = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&built.value)
    }

    /// Rebuild with `build` if `now` (the files' bytes, just read) differs from the bytes the
    /// current value was built from. `Ok(true)`: replaced; `Ok(false)`: the files are unchanged;
    /// `Err`: `build` failed and the current value stays.
    pub fn replace_if_changed<E>(
        &self,
        now: FileSnapshot,
        build: impl FnOnce() -> Result<T, E>,
    ) -> Result<bool, E> {
        if self.unchanged(&now) {
            return Ok(false);
        }
        let value = Arc::new(build()?);
        let mut built = self.current.write().unwrap_or_else(PoisonError::into_inner);
        *built = Built { value, from: now };
        Ok(true)
    }

    fn unchanged(&self, now: &FileSnapshot) -> bool {
        let built = self.current.read().unwrap_or_else(PoisonError::into_inner);
        built.from == *now
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(bytes: &[&[u8]]) -> FileSnapshot {
        FileSnapshot(bytes.iter().map(|b| b.to_vec()).collect())
    }

    #[test]
    fn only_new_bytes_rebuild_and_a_failed_build_keeps_the_current_value() {
        let live = Reloadable::new(1, snapshot(&[b"a", b"b"]));
        let same = live.replace_if_changed(snapshot(&[b"a", b"b"]), || -> Result<_, ()> {
            panic!("unchanged files must not be rebuilt")
        });
        assert_eq!(same, Ok(false));

        let failed = live.replace_if_changed(snapshot(&[b"a", b"c"]), || Err("half written"));
        assert_eq!(failed, Err("half written"));
        assert_eq!(*live.current(), 1, "a failed build keeps what was there");

        // The failed bytes were not recorded: the same bytes are tried again.
        let again = live.replace_if_changed(snapshot(&[b"a", b"c"]), || Ok::<_, ()>(2));
        assert_eq!(again, Ok(true));
        assert_eq!(*live.current(), 2);
    }

    #[test]
    fn a_handshake_keeps_the_value_it_took() {
        let live = Reloadable::new(String::from("old"), snapshot(&[b"x"]));
        let taken = live.current();
        live.replace_if_changed(snapshot(&[b"y"]), || Ok::<_, ()>(String::from("new")))
            .unwrap();
        assert_eq!(*taken, "old");
        assert_eq!(*live.current(), "new");
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("cert.pem");
        std::fs::write(&present, b"pem").unwrap();
        let missing = dir.path().join("key.pem");
        let err = FileSnapshot::read(&[("certificate", &present), ("private key", &missing)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("private key") && err.contains("key.pem"),
            "{err}"
        );
    }
}
