//! The vhost-user-blk server: exports volumes of an [`ExportRegistry`] as virtio-blk devices to
//! VMMs (QEMU `vhost-user-blk-pci`, Cloud Hypervisor, libblkio) over one UNIX socket per export,
//! `<dir>/<export>.sock`.
//!
//! # Socket paths
//!
//! A UNIX socket address holds at most 107 bytes of path, fewer than a long export name needs
//! (volume names go up to 128 characters, snapshot exports `VOL@SNAP` twice that). So every name
//! gets a connectable path: `<dir>/<export>.sock` when that fits in 107 bytes, otherwise
//! `<dir>/<prefix>~<hash>.sock`, where `<hash>` is the 16-hex-digit FNV-1a 64 hash of the export
//! name (stable across restarts and versions, so VM definitions keep working) and `<prefix>` as
//! many leading characters of the name as still fit. [`VhostServer::socket_path`] tells which;
//! the server refuses a directory too long to hold even the shortest such path
//! ([`check_socket_dir`]).
//!
//! # Why vhost-user
//!
//! With vhost-user the guest's virtqueues live in guest memory that the VMM shares with us, so a
//! request goes guest → our queue worker → volume engine without passing through the VMM or a
//! network stack, and completions are signalled straight back through an eventfd. That is the
//! lowest-latency way to put a vstor volume under a VM; NBD remains for everything else.
//!
//! # Shape
//!
//! Built on rust-vmm: `vhost-user-backend` speaks the protocol and runs the queue workers,
//! `virtio-queue` walks the rings, `vm-memory` guards every access to guest memory.
//!
//! * `request`: parsing a descriptor chain into a validated request and executing it
//!   against a [`BlockTarget`](crate::BlockTarget). All guest-controlled input is checked there.
//! * `backend`: the `VhostUserBackend` of one connection: features, config space, one worker per
//!   queue, the EVENT_IDX loop, off-thread FLUSH/FUA and the in-flight accounting behind
//!   `stop_vring`.
//! * `config`: the virtio-blk configuration space.
//!
//! [`VhostServer`] runs one thread per export. A `VhostUserDaemon` handles exactly one frontend,
//! so the thread loops: wait for a frontend to connect, build a backend and a daemon (which starts
//! one worker thread per queue), accept the frontend, serve it until it disconnects, drain its
//! in-flight requests, repeat. An idle export therefore costs one thread.
//!
//! The target is looked up in the registry when the frontend first asks for features or config,
//! so every connection sees the volume's current size and read-only flag. If the volume has left
//! the registry, the frontend sees an empty read-only device.
//!
//! # Device
//!
//! 512-byte logical and 4 KiB physical blocks, `seg_max = queue_size - 2`, up to
//! [`MAX_QUEUES`] queues, FLUSH, DISCARD and WRITE_ZEROES (one segment of up to 1 GiB each),
//! guest-settable write cache mode (CONFIG_WCE; writethrough makes every write FUA), EVENT_IDX,
//! indirect descriptors, and `VIRTIO_BLK_F_RO` for read-only volumes. `GET_ID` returns the export
//! name (first 20 bytes).
//!
//! # Stopping
//!
//! [`VhostServer::remove_export`] and [`VhostServer::shutdown`] shut down the frontend's
//! connection and `shutdown(2)` the listening socket (which wakes an export thread waiting for a
//! frontend), wait for the queue workers and every request in flight to finish, then remove the
//! socket file. They block until that is done (call them from `spawn_blocking`
//! in async code).
//!
//! # Limitations
//!
//! * **No inflight tracking.** vhost-user-backend does not implement `GET_INFLIGHT_FD`, so we do
//!   not offer `INFLIGHT_SHMFD`. If this process dies with requests in flight, QEMU cannot
//!   resubmit them when it reconnects: they are lost, and the guest's block layer times out and
//!   retries them. Requests completed before the crash are unaffected (FLUSH still means durable).
//! * No dirty-page logging (`LOG_SHMFD`), hence no live migration of a VM using the device.
//! * Guest memory must be shared with us (e.g. QEMU `memory-backend-memfd,share=on`).

mod backend;
mod config;
mod request;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::target::ExportRegistry;
use backend::BlkBackend;
use request::GuestMem;

/// Most queues a device can offer.
pub const MAX_QUEUES: u16 = 8;
/// Longest socket path a `sockaddr_un` holds (108 bytes including the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Suffix of a hashed socket name: `~` and 16 hex digits of the name's hash, then `.sock`.
const HASHED_SUFFIX_LEN: usize = 1 + 16 + 5;
/// Longest socket directory: one that still holds `/` and a hashed name with an empty prefix.
pub const MAX_SOCKET_DIR: usize = MAX_SOCKET_PATH - 1 - HASHED_SUFFIX_LEN;
/// Pause after a failed `accept` or daemon creation before trying again (e.g. out of file
/// descriptors or threads).
const ACCEPT_RETRY: Duration = Duration::from_millis(200);

/// Tunables of the vhost-user-blk server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostConfig {
    /// Queues offered to the frontend (it may use fewer); 1 to [`MAX_QUEUES`]. Each has its own
    /// worker thread.
    pub num_queues: u16,
    /// Largest queue size the frontend may configure; a power of two from 4 to 32768.
    pub queue_size: u16,
}

impl Default for VhostConfig {
    fn default() -> Self {
        Self {
            num_queues: 4,
            queue_size: 256,
        }
    }
}

impl VhostConfig {
    fn validate(&self) -> io::Result<()> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "vhost num_queues must be 1..={MAX_QUEUES}, not {}",
                    self.num_queues
                ),
            ));
        }
        if !self.queue_size.is_power_of_two() || !(4..=32768).contains(&self.queue_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "vhost queue_size must be a power of two in 4..=32768, not {}",
                    self.queue_size
                ),
            ));
        }
        Ok(())
    }
}

/// Failures of the vhost-user-blk server itself (as opposed to errors reported to the guest).
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("export name {0:?} cannot be a socket file name")]
    InvalidName(String),
    #[error("socket path {0} is longer than a UNIX socket address allows")]
    PathTooLong(PathBuf),
    #[error(
        "vhost socket directory {0} is too long: a UNIX socket path holds at most {MAX_SOCKET_PATH} bytes, so the directory may have at most {max} bytes",
        max = MAX_SOCKET_DIR
    )]
    DirTooLong(PathBuf),
    #[error("socket path {path} of export {name:?} is already used by export {other:?}")]
    PathTaken {
        name: String,
        other: String,
        path: PathBuf,
    },
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    #[error("vhost-user server is shutting down")]
    ShuttingDown,
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: VhostUserError,
    },
    #[error("cannot start the thread serving export {name:?}")]
    Spawn {
        name: String,
        #[source]
        source: io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Single inserts/removes and flag updates: the state stays consistent across a panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared between the server and the thread serving one export.
struct ExportShared {
    name: String,
    path: PathBuf,
    stop: AtomicBool,
    connected: AtomicBool,
    /// Set while a frontend is being served; checked under the same lock as `stop`.
    conn: Mutex<Option<ShutdownHandle>>,
    /// The listening socket (a duplicate of its fd), only used to `shutdown(2)` it. Typed as a
    /// stream because std offers `shutdown` there; the syscall is the same for a listener.
    accept_waker: UnixStream,
}

impl ExportShared {
    /// Ask the export's thread to stop and get it out of whatever it blocks on.
    fn request_stop(&self) {
        let conn = lock(&self.conn);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = conn.as_ref() {
            // Serving a frontend: close its connection; the daemon's request loop ends.
            handle.shutdown();
        }
        // Waiting for a frontend: shutdown(2) on the listening socket wakes the thread's poll and
        // makes a blocked (or the next) accept fail with EINVAL.
        if let Err(e) = self.accept_waker.shutdown(Shutdown::Both) {
            debug!(export = %self.name, error = %e, "cannot shut down the listening socket");
        }
    }
}

struct Export {
    shared: Arc<ExportShared>,
    thread: Option<JoinHandle<()>>,
}

impl Export {
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!(export = %self.shared.name, "vhost-user export thread panicked");
            }
        }
    }
}

/// What an export thread needs (it must not hold the server itself, whose drop shuts it down).
#[derive(Clone)]
struct ServeParams {
    registry: Arc<dyn ExportRegistry>,
    config: VhostConfig,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct Exports {
    shutting_down: bool,
    map: HashMap<String, Export>,
}

struct Inner {
    dir: PathBuf,
    params: ServeParams,
    exports: Mutex<Exports>,
    /// Held by `stop_all`, so that a concurrent second `shutdown()` also returns only when done.
    stopping: Mutex<()>,
}

impl Inner {
    fn stop_all(&self) {
        let _serial = lock(&self.stopping);
        let mut exports = {
            let mut guard = lock(&self.exports);
            guard.shutting_down = true;
            std::mem::take(&mut guard.map)
        };
        if !exports.is_empty() {
            info!(exports = exports.len(), "vhost-user server shutting down");
        }
        // Signal everyone first so the exports drain in parallel.
        for export in exports.values() {
            export.shared.request_stop();
        }
        for export in exports.values_mut() {
            export.join();
            remove_socket(&export.shared.path);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The vhost-user-blk server. Cloning is cheap and every clone controls the same server; the
/// last one dropped shuts it down.
#[derive(Clone)]
pub struct VhostServer {
    inner: Arc<Inner>,
}

impl VhostServer {
    /// `dir` holds one socket per export: `<dir>/<export>.sock`. Blocking work (flush, FUA) runs
    /// on `runtime`.
    pub fn new(
        registry: Arc<dyn ExportRegistry>,
        dir: PathBuf,
        config: VhostConfig,
        runtime: tokio::runtime::Handle,
    ) -> io::Result<Self> {
        config.validate()?;
        check_socket_dir(&dir)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                params: ServeParams {
                    registry,
                    config,
                    runtime,
                },
                exports: Mutex::new(Exports::default()),
                stopping: Mutex::new(()),
            }),
        })
    }

    /// Where `name` is (or would be) served: `<dir>/<name>.sock`, or a hashed name when that is
    /// too long for a UNIX socket (see the module docs).
    pub fn socket_path(&self, name: &str) -> PathBuf {
        socket_path_in(&self.inner.dir, name)
    }

    /// Start serving `name` (export name = volume name) at its socket path, replacing a stale
    /// socket file. Idempotent. Returns the path.
    pub fn add_export(&self, name: &str) -> Result<PathBuf, VhostError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(VhostError::InvalidName(name.to_owned()));
        }
        let path = self.socket_path(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VhostError::PathTooLong(path));
        }
        let mut exports = lock(&self.inner.exports);
        if exports.shutting_down {
            return Err(VhostError::ShuttingDown);
        }
        if let Some((other, _)) = exports
            .map
            .iter()
            .find(|(other, e)| other.as_str() != name && e.shared.path == path)
        {
            return Err(VhostError::PathTaken {
                name: name.to_owned(),
                other: other.clone(),
                path,
            });
        }
        if let Some(existing) = exports.map.get_mut(name) {
            let alive = existing.thread.as_ref().is_some_and(|t| !t.is_finished());
            if alive {
                return Ok(path);
            }
            // The thread ended on its own (it logged why); serve afresh.
            existing.join();
            exports.map.remove(name);
        }
        if self.inner.params.registry.lookup(name).is_none() {
            return Err(VhostError::UnknownExport(name.to_owned()));
        }
        let (listener, accept_waker) = bind(&path).map_err(|source| VhostError::Listen {
            path: path.clone(),
            source,
        })?;
        let shared = Arc::new(ExportShared {
            name: name.to_owned(),
            path: path.clone(),
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            conn: Mutex::new(None),
            accept_waker,
        });
        let params = self.inner.params.clone();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || serve_export(thread_shared, listener, params))
            .map_err(|source| VhostError::Spawn {
                name: name.to_owned(),
                source,
            })?;
        info!(export = name, path = %path.display(), "vhost-user-blk export listening");
        exports.map.insert(
            name.to_owned(),
            Export {
                shared,
                thread: Some(thread),
            },
        );
        Ok(path)
    }

    /// Stop serving `name`: disconnect its frontend (in-flight requests finish first), remove the
    /// socket file. Blocks until done; a no-op for an unknown name.
    pub fn remove_export(&self, name: &str) {
        let Some(mut export) = lock(&self.inner.exports).map.remove(name) else {
            return;
        };
        export.shared.request_stop();
        export.join();
        // Unless the export was added again meanwhile (it then owns a new socket at this path).
        let exports = lock(&self.inner.exports);
        if !exports.map.contains_key(name) {
            remove_socket(&export.shared.path);
        }
        drop(exports);
        info!(export = name, "vhost-user-blk export removed");
    }

    /// Whether a frontend is currently connected to this export.
    pub fn connected(&self, name: &str) -> bool {
        lock(&self.inner.exports)
            .map
            .get(name)
            .is_some_and(|e| e.shared.connected.load(Ordering::SeqCst))
    }

    /// Stop every export: drain in-flight requests, close connections, remove the socket files.
    /// Returns when done; afterwards `add_export` fails with [`VhostError::ShuttingDown`].
    pub fn shutdown(&self) {
        self.inner.stop_all();
    }
}

/// The export thread: one frontend after another until asked to stop. The server removes the
/// socket file once this has returned.
fn serve_export(shared: Arc<ExportShared>, mut listener: Listener, params: ServeParams) {
    let name = shared.name.as_str();
    let waiter = match AcceptWaiter::new(&listener) {
        Ok(waiter) => waiter,
        Err(e) => {
            error!(export = name, error = %e, "cannot poll the vhost-user socket; export stopped");
            return;
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        // Build the daemon (and its per-queue worker threads) only once a frontend knocks, so an
        // idle export costs one thread.
        if let Err(e) = waiter.wait() {
            error!(export = name, error = %e, "cannot poll the vhost-user socket; export stopped");
            break;
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let backend = Arc::new(BlkBackend::new(
            name,
            Arc::clone(&params.registry),
            params.runtime.clone(),
            usize::from(params.config.num_queues),
            params.config.queue_size,
            mem.clone(),
        ));
        let mut daemon =
            match VhostUserDaemon::new(format!("vhost-{name}"), Arc::clone(&backend), mem) {
                Ok(daemon) => daemon,
                Err(e) => {
                    // Out of threads or file descriptors: try again (the frontend is still
                    // queued).
                    error!(export = name, error = %e, "cannot create the vhost-user daemon");
                    backend.close();
                    std::thread::sleep(ACCEPT_RETRY);
                    continue;
                }
            };
        if let Err(e) = daemon.start(&mut listener) {
            backend.close();
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            error!(export = name, error = %e, "vhost-user accept failed");
            std::thread::sleep(ACCEPT_RETRY);
            continue;
        }
        let serving = {
            let mut conn = lock(&shared.conn);
            if shared.stop.load(Ordering::SeqCst) {
                daemon.request_shutdown();
                false
            } else {
                *conn = daemon.shutdown_handle();
                shared.connected.store(true, Ordering::SeqCst);
                true
            }
        };
        if serving {
            info!(export = name, "vhost-user frontend connected");
        }
        let result = daemon.wait();
        {
            let _conn = lock(&shared.conn).take();
            shared.connected.store(false, Ordering::SeqCst);
        }
        // The frontend is gone; let the queue workers finish what they started.
        backend.close();
        drop(daemon);
        if serving {
            match result {
                Ok(()) => info!(export = name, "vhost-user frontend disconnected"),
                Err(e) if is_disconnect(&e) => {
                    info!(export = name, "vhost-user frontend disconnected");
                }
                Err(e) => warn!(export = name, error = %e, "vhost-user connection ended"),
            }
        }
    }
    debug!(export = name, "vhost-user export thread exiting");
}

/// Waits until the listening socket has a connection to accept (or has been shut down).
struct AcceptWaiter {
    epoll: Epoll,
}

impl AcceptWaiter {
    fn new(listener: &Listener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(Self { epoll })
    }

    fn wait(&self) -> io::Result<()> {
        let mut events = [EpollEvent::default()];
        loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage
        )
    )
}

/// Fail if `dir` is too long to hold any socket (even a hashed name).
pub fn check_socket_dir(dir: &Path) -> Result<(), VhostError> {
    if dir.as_os_str().len() > MAX_SOCKET_DIR {
        return Err(VhostError::DirTooLong(dir.to_path_buf()));
    }
    Ok(())
}

/// `<dir>/<name>.sock` if it fits in a socket address, else `<dir>/<prefix>~<hash>.sock`.
fn socket_path_in(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(format!("{name}.sock"));
    if plain.as_os_str().len() <= MAX_SOCKET_PATH {
        return plain;
    }
    let mut hasher = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut hasher, name.as_bytes());
    let hash = std::hash::Hasher::finish(&hasher);
    let room = MAX_SOCKET_PATH.saturating_sub(dir.as_os_str().len() + 1 + HASHED_SUFFIX_LEN);
    let mut prefix = String::new();
    for c in name.chars() {
        if prefix.len() + c.len_utf8() > room {
            break;
        }
        prefix.push(c);
    }
    dir.join(format!("{prefix}~{hash:016x}.sock"))
}

/// Listen on `path`, replacing a stale socket file (but nothing else). The socket file is
/// removed by the server, not by the listener, so that a thread still winding down cannot delete
/// the socket of a newer export of the same name.
fn bind(path: &Path) -> Result<(Listener, UnixStream), VhostUserError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => remove_socket(path),
        Ok(_) => {
            return Err(VhostUserError::SocketError(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(VhostUserError::SocketError)?;
    let waker = listener.try_clone().map_err(VhostUserError::SocketError)?;
    Ok((
        Listener::from(listener),
        UnixStream::from(OwnedFd::from(waker)),
    ))
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove vhost-user socket"),
    }
}
