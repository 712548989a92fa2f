//! One daemon per data directory: every daemon (`vstor serve`, `vstor dtl`, and any later one)
//! takes an exclusive lock on `<data-dir>/lock` before it reads or writes anything else there.
//!
//! Why: a second daemon on the same directory would "recover" the running one's open TLogs, SCOs
//! and DTL logs — truncating torn tails the first is still appending to — and both would serve
//! the same volumes. The first node then loses acknowledged writes. So a second daemon refuses
//! to start and names the PID holding the directory.
//!
//! Why `flock(2)` (through `std::fs::File::try_lock`, no crate needed since Rust 1.89) and not a
//! PID file alone: the kernel drops the lock when the holder's last descriptor closes, so a
//! daemon killed with `kill -9` never leaves a stale lock behind, and there is no PID-reuse race.
//! The PID written into the file is only for the error message. The file is opened close-on-exec
//! (std's default), so child processes do not inherit the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "lock";

/// Held for the daemon's lifetime; dropping it (or the process dying) releases the directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Create `dir` if needed and lock it for this process, or fail naming the holder's PID.
    /// `what` names the daemon for the message (e.g. "vstor serve").
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: the holder's PID must stay readable for the message.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = holder_pid(&mut file)
                    .map_or_else(|| "an unknown PID".to_string(), |pid| format!("PID {pid}"));
                bail!(
                    "data directory {} is in use by another process ({holder}); stop it first or use another --data-dir",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"))
            .with_context(|| format!("cannot write the PID into {}", path.display()))?;
        tracing::info!(dir = %dir.display(), pid, daemon = what, "data directory locked");
        Ok(Self { _file: file })
    }
}

/// The PID the holder wrote, if it has written it yet (it locks first, then writes).
fn holder_pid(file: &mut File) -> Option<u32> {
    // The holder writes its PID right after locking; allow it a moment to do so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        let mut text = String::new();
        file.seek(SeekFrom::Start(0)).ok()?;
        file.read_to_string(&mut text).ok()?;
        if let Ok(pid) = text.trim().parse() {
            return Some(pid);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_fails_naming_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = DirLock::acquire(&dir, "test").unwrap();
        let text = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description, so a second open in the same process
        // conflicts just as another process would.
        let err = DirLock::acquire(&dir, "test").unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(first);
        let again = DirLock::acquire(&dir, "test").unwrap();
        drop(again);
    }
}
