//! Child processes that cannot outlive the benchmark.
//!
//! A benchmark run leaves gigabytes in its work directory and two servers listening on loopback;
//! an early `?`, a Ctrl-C or a `kill` of the harness must not leave either behind. Three layers
//! take care of that:
//!
//! - [`ChildGuard`] stops its child (SIGTERM, then SIGKILL after a grace period) when dropped, so
//!   every return path, error or not, tears the servers down before the work directory goes.
//! - [`InterruptGuard`] turns SIGINT/SIGTERM sent to the harness into an error returned from the
//!   next wait ([`check_interrupted`]), so that those drops run instead of the process dying on
//!   the spot. A second signal cuts the grace periods short.
//! - Children are started with `PR_SET_PDEATHSIG`, so even if the harness is killed with SIGKILL
//!   (or aborts on a panic, as the workspace's `panic = "abort"` profiles do), the kernel ends
//!   them.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

pub(crate) const POLL: Duration = Duration::from_millis(50);

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: nix::libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM for as long as it lives and restores the previous handlers after.
pub(crate) struct InterruptGuard {
    previous: Vec<(Signal, SigAction)>,
}

impl InterruptGuard {
    pub(crate) fn install() -> Result<Self> {
        SIGNALS.store(0, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(count_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut guard = Self {
            previous: Vec::new(),
        };
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only touches an atomic, which is async-signal-safe.
            let previous = unsafe { sigaction(signal, &action) }
                .with_context(|| format!("cannot catch {signal}"))?;
            guard.previous.push((signal, previous));
        }
        Ok(guard)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (signal, previous) in self.previous.drain(..).rev() {
            // SAFETY: reinstates the action that was in place before `install`.
            let _ = unsafe { sigaction(signal, &previous) };
        }
    }
}

fn signal_count() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}

pub(crate) fn check_interrupted() -> Result<()> {
    if signal_count() > 0 {
        bail!("interrupted by a signal; stopping the servers and removing the work directory");
    }
    Ok(())
}

/// A running child that is stopped, and waited for, when the guard goes away.
pub(crate) struct ChildGuard {
    child: Child,
    name: String,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `command` with the parent-death signal set to SIGKILL. `grace` is how long
    /// [`ChildGuard::stop`] waits after SIGTERM before it sends SIGKILL.
    pub(crate) fn spawn(command: &mut Command, name: &str, grace: Duration) -> Result<Self> {
        // SAFETY: the closure runs between fork and exec and only makes the prctl(2) system call,
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            child,
            name: name.to_string(),
            grace,
            status: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("cannot check on {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit on its own; `None` if it is still running.
    /// Returns an error as soon as the harness is interrupted.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// `kill -9` (a crash, for failover measurements) and reap it.
    pub(crate) fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// SIGTERM, then SIGKILL if the child is still there after the grace period (or once the
    /// harness receives another signal). Returns the exit status.
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        let _ = kill(pid, Signal::SIGTERM);
        let signals_before = signal_count();
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline && signal_count() == signals_before {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(POLL);
        }
        eprintln!(
            "{} (pid {pid}) did not stop within {} s of SIGTERM; killing it",
            self.name,
            self.grace.as_secs()
        );
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Starts a server that announces on stdout when it is ready (`vstor serve`, `vstor dtl`) and
/// waits up to `timeout` for the first line `ready` accepts. Its stderr goes to `log_path`,
/// whose tail goes into the error if it exits or stays silent. `grace` is as for
/// [`ChildGuard::spawn`]; the rest of its stdout is drained so it never blocks on the pipe.
pub(crate) fn spawn_until_ready<T>(
    command: &mut Command,
    name: &str,
    grace: Duration,
    log_path: &Path,
    timeout: Duration,
    ready: impl Fn(&str) -> Option<T>,
) -> Result<(ChildGuard, T)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(log_path)?);
    let mut process = ChildGuard::spawn(command, name, grace)?;
    let stdout = process
        .child_mut()
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{name} has no stdout pipe"))?;
    let lines = forward_lines(stdout);

    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        check_interrupted()?;
        match lines.recv_timeout(POLL) {
            Ok(line) => match ready(&line) {
                Some(value) => return Ok((process, value)),
                None => seen.push(line),
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let status = process.wait_timeout(Duration::from_secs(5))?;
                let stdout = if seen.is_empty() {
                    String::new()
                } else {
                    format!("its stdout:\n{}\n", seen.join("\n"))
                };
                bail!(
                    "{name} exited before it was ready ({})\n{stdout}{}",
                    status.map_or_else(|| "closed its stdout".to_string(), |s| s.to_string()),
                    log_tail(log_path, 20)
                );
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} did not print its ready line within {} s\n{}",
                timeout.as_secs(),
                log_tail(log_path, 20)
            );
        }
    }
}

/// Sends each line of `stdout` over a channel until the receiver goes away, then keeps draining
/// the pipe so the child never blocks on a full stdout.
fn forward_lines(stdout: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            if sender.send(line.trim_end().to_string()).is_err() {
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return;
            }
            line.clear();
        }
    });
    receiver
}

/// Finds `program` on `PATH`, or checks it directly when it is a path.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The last `lines` lines of a log file, for error messages about a child that went away.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        "(its log is empty)".to_string()
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

pub(crate) fn log_file(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("cannot create log file {}", path.display()))
}
