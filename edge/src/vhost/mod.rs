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
//! [`VhostServer`] runs one acceptor thread for all exports: it polls (epoll) every idle export's
//! listening socket. A `VhostUserDaemon` handles exactly one frontend, so when one knocks the
//! acceptor starts a connection thread for that export, which builds a backend and a daemon
//! (which starts one worker thread per queue), accepts the frontend, serves it until it
//! disconnects, drains its in-flight requests and hands the socket back to the acceptor (the
//! socket is registered one-shot, so it is not polled while its frontend is served). An idle
//! export therefore costs no thread: a node with hundreds of volumes and no VMs runs one.
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
//! connection and `shutdown(2)` the listening socket (which wakes a connection thread blocked
//! in accept), wait for the queue workers and every request in flight to finish, then remove the
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
mod completion;
mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod poll;
mod request;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

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

/// Default [`VhostConfig::poll_max`]: QEMU's default `poll-max-ns` for its I/O threads, and
/// enough to catch a guest that queues its next request right after a completion.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(32);
/// Longest [`VhostConfig::poll_max`]: beyond this a queue would spin longer than a wake-up costs.
pub const MAX_POLL: Duration = Duration::from_millis(1);

/// Tunables of the vhost-user-blk server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostConfig {
    /// Queues offered to the frontend (it may use fewer); 1 to [`MAX_QUEUES`]. Each has its own
    /// worker thread.
    pub num_queues: u16,
    /// Largest queue size the frontend may configure; a power of two from 4 to 32768.
    pub queue_size: u16,
    /// Longest a queue worker keeps looking at its ring for more requests before it sleeps
    /// (adaptive: only queues whose guest comes back within it poll at all; see `poll.rs`).
    /// Zero: never poll. At most [`MAX_POLL`].
    pub poll_max: Duration,
}

impl Default for VhostConfig {
    fn default() -> Self {
        Self {
            num_queues: 4,
            queue_size: 256,
            poll_max: DEFAULT_POLL_MAX,
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
        if self.poll_max > MAX_POLL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "vhost poll_max must be at most {MAX_POLL:?}, not {:?}",
                    self.poll_max
                ),
            ));
        }
        Ok(())
    }
}

/// Mode and owner every export's socket gets right after it is bound. Connecting to a UNIX
/// socket needs write permission on it, and whoever connects drives a volume, so the default is
/// 0600: only the daemon's own user. A VMM running as another user (libvirt's `qemu`) gets in
/// through a group: mode 0660 and that group (`[vhost] socket_mode`, `socket_group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPermissions {
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// New owner; `None` keeps the daemon's user.
    pub uid: Option<u32>,
    /// New group; `None` keeps the daemon's group.
    pub gid: Option<u32>,
}

impl Default for SocketPermissions {
    fn default() -> Self {
        Self {
            mode: 0o600,
            uid: None,
            gid: None,
        }
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

/// Epoll token of the acceptor's wake-up eventfd; exports use their id (never 0).
const WAKE_TOKEN: u64 = 0;

/// State shared between the server, the acceptor and the thread serving one export's frontend.
struct ExportShared {
    name: String,
    path: PathBuf,
    /// The export's epoll token.
    id: u64,
    stop: AtomicBool,
    connected: AtomicBool,
    /// Set while a frontend is being served; checked under the same lock as `stop`.
    conn: Mutex<Option<ShutdownHandle>>,
    /// Taken by the connection thread while it accepts and serves a frontend.
    listener: Mutex<Listener>,
    /// The listening socket's fd, as registered with the acceptor's epoll.
    listen_fd: RawFd,
    /// The listening socket (a duplicate of its fd), only used to `shutdown(2)` it. Typed as a
    /// stream because std offers `shutdown` there; the syscall is the same for a listener.
    accept_waker: UnixStream,
}

impl ExportShared {
    /// Ask the export's connection thread to stop and get it out of whatever it blocks on.
    fn request_stop(&self) {
        let conn = lock(&self.conn);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = conn.as_ref() {
            // Serving a frontend: close its connection; the daemon's request loop ends.
            handle.shutdown();
        }
        // Accepting: shutdown(2) on the listening socket makes a blocked (or the next) accept
        // fail with EINVAL.
        if let Err(e) = self.accept_waker.shutdown(Shutdown::Both) {
            debug!(export = %self.name, error = %e, "cannot shut down the listening socket");
        }
    }
}

struct Export {
    shared: Arc<ExportShared>,
    /// The thread serving the current frontend, if one connected.
    thread: Option<JoinHandle<()>>,
}

impl Export {
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!(export = %self.shared.name, "vhost-user connection thread panicked");
            }
        }
    }
}

/// What a connection thread needs (it must not hold the server itself, whose drop shuts it down).
#[derive(Clone)]
struct ServeParams {
    registry: Arc<dyn ExportRegistry>,
    config: VhostConfig,
    runtime: tokio::runtime::Handle,
    /// Passes of any queue worker that found the guest's next requests by polling.
    polled: Arc<AtomicU64>,
}

#[derive(Default)]
struct Exports {
    shutting_down: bool,
    next_id: u64,
    map: HashMap<String, Export>,
}

/// Shared by the server handle, the acceptor thread and the connection threads.
struct Shared {
    params: ServeParams,
    exports: Mutex<Exports>,
    /// Every idle export's listening socket (one-shot: disarmed while its frontend is served)
    /// and the wake-up eventfd.
    epoll: Epoll,
    wake: EventFd,
}

impl Shared {
    /// Watch `shared`'s listening socket again (one-shot), unless the export is stopping.
    fn arm(&self, shared: &ExportShared, op: ControlOperation) -> io::Result<()> {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.epoll.ctl(
            op,
            shared.listen_fd,
            EpollEvent::new(EventSet::IN | EventSet::ONE_SHOT, shared.id),
        )
    }
}

struct Inner {
    dir: PathBuf,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Mode and owner of new sockets.
    socket_permissions: Mutex<SocketPermissions>,
    /// Held by `stop_all`, so that a concurrent second `shutdown()` also returns only when done.
    stopping: Mutex<()>,
}

impl Inner {
    fn stop_all(&self) {
        let _serial = lock(&self.stopping);
        let mut exports = {
            let mut guard = lock(&self.shared.exports);
            guard.shutting_down = true;
            std::mem::take(&mut guard.map)
        };
        if let Some(acceptor) = lock(&self.acceptor).take() {
            if let Err(e) = self.shared.wake.write(1) {
                error!(error = %e, "cannot wake the vhost-user acceptor");
            }
            if acceptor.join().is_err() {
                error!("vhost-user acceptor thread panicked");
            }
        }
        if !exports.is_empty() {
            info!(exports = exports.len(), "vhost-user server shutting down");
        }
        // Signal everyone first so the exports drain in parallel.
        for export in exports.values() {
            export.shared.request_stop();
        }
        for export in exports.values_mut() {
            export.join();
            let _ = self.shared.epoll.ctl(
                ControlOperation::Delete,
                export.shared.listen_fd,
                EpollEvent::default(),
            );
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
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let shared = Arc::new(Shared {
            params: ServeParams {
                registry,
                config,
                runtime,
                polled: Arc::default(),
            },
            exports: Mutex::new(Exports {
                next_id: WAKE_TOKEN + 1,
                ..Exports::default()
            }),
            epoll,
            wake,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vhost-acceptor".into())
                .spawn(move || accept_loop(&shared))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                shared,
                acceptor: Mutex::new(Some(acceptor)),
                socket_permissions: Mutex::new(SocketPermissions::default()),
                stopping: Mutex::new(()),
            }),
        })
    }

    /// Mode and owner of the sockets of exports added from now on (default: 0600, the daemon's
    /// user and group).
    pub fn set_socket_permissions(&self, permissions: SocketPermissions) {
        *lock(&self.inner.socket_permissions) = permissions;
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
        let shared = &self.inner.shared;
        let mut exports = lock(&shared.exports);
        if exports.shutting_down {
            return Err(VhostError::ShuttingDown);
        }
        if exports.map.contains_key(name) {
            return Ok(path);
        }
        if let Some((other, _)) = exports.map.iter().find(|(_, e)| e.shared.path == path) {
            return Err(VhostError::PathTaken {
                name: name.to_owned(),
                other: other.clone(),
                path,
            });
        }
        if shared.params.registry.lookup(name).is_none() {
            return Err(VhostError::UnknownExport(name.to_owned()));
        }
        let permissions = *lock(&self.inner.socket_permissions);
        let (listener, accept_waker) =
            bind(&path, permissions).map_err(|source| VhostError::Listen {
                path: path.clone(),
                source,
            })?;
        let id = exports.next_id;
        exports.next_id += 1;
        let export = Arc::new(ExportShared {
            name: name.to_owned(),
            path: path.clone(),
            id,
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            conn: Mutex::new(None),
            listen_fd: listener.as_raw_fd(),
            listener: Mutex::new(listener),
            accept_waker,
        });
        if let Err(e) = shared.arm(&export, ControlOperation::Add) {
            remove_socket(&path);
            return Err(VhostError::Listen {
                path,
                source: VhostUserError::SocketError(e),
            });
        }
        info!(export = name, path = %path.display(), "vhost-user-blk export listening");
        exports.map.insert(
            name.to_owned(),
            Export {
                shared: export,
                thread: None,
            },
        );
        Ok(path)
    }

    /// Stop serving `name`: disconnect its frontend (in-flight requests finish first), remove the
    /// socket file. Blocks until done; a no-op for an unknown name.
    pub fn remove_export(&self, name: &str) {
        let shared = &self.inner.shared;
        let Some(mut export) = lock(&shared.exports).map.remove(name) else {
            return;
        };
        export.shared.request_stop();
        export.join();
        let _ = shared.epoll.ctl(
            ControlOperation::Delete,
            export.shared.listen_fd,
            EpollEvent::default(),
        );
        // Unless the export was added again meanwhile (it then owns a new socket at this path).
        let exports = lock(&shared.exports);
        if !exports.map.contains_key(name) {
            remove_socket(&export.shared.path);
        }
        drop(exports);
        info!(export = name, "vhost-user-blk export removed");
    }

    /// How many times a queue worker found the guest's next requests by polling its ring
    /// (`VhostConfig::poll_max`), i.e. without a kick and a wake-up. Counts since start.
    pub fn polled(&self) -> u64 {
        self.inner.shared.params.polled.load(Ordering::Relaxed)
    }

    /// Whether a frontend is currently connected to this export.
    pub fn connected(&self, name: &str) -> bool {
        lock(&self.inner.shared.exports)
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

/// The acceptor: one thread for all exports. When a frontend knocks on an idle export's socket
/// it starts that export's connection thread; the socket stays disarmed (one-shot) until that
/// thread is done with the frontend, so an idle export costs no thread at all.
fn accept_loop(shared: &Arc<Shared>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!(error = %e, "vhost-user acceptor cannot poll; no new frontends are accepted");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == WAKE_TOKEN {
                let _ = shared.wake.read();
                if lock(&shared.exports).shutting_down {
                    debug!("vhost-user acceptor exiting");
                    return;
                }
                continue;
            }
            start_connection(shared, token);
        }
    }
}

/// Start the connection thread of the export with epoll token `id` (if it still exists).
fn start_connection(shared: &Arc<Shared>, id: u64) {
    let mut exports = lock(&shared.exports);
    let Some(export) = exports.map.values_mut().find(|e| e.shared.id == id) else {
        return; // Removed meanwhile.
    };
    if export.shared.stop.load(Ordering::SeqCst) {
        return;
    }
    // The previous frontend's thread re-armed the socket as its last step.
    export.join();
    let thread_shared = Arc::clone(shared);
    let export_shared = Arc::clone(&export.shared);
    let name = export.shared.name.clone();
    match std::thread::Builder::new()
        .name(format!("vhost-{name}"))
        .spawn(move || serve_connection(&thread_shared, &export_shared))
    {
        Ok(thread) => export.thread = Some(thread),
        Err(e) => {
            // Out of threads: the frontend stays queued; try again shortly.
            error!(export = %name, error = %e, "cannot start the vhost-user connection thread");
            let export_shared = Arc::clone(&export.shared);
            drop(exports);
            std::thread::sleep(ACCEPT_RETRY);
            if let Err(e) = shared.arm(&export_shared, ControlOperation::Modify) {
                debug!(export = %name, error = %e, "cannot re-arm the vhost-user socket");
            }
        }
    }
}

/// A connection thread: accept the waiting frontend, serve it until it disconnects, drain its
/// in-flight requests, then hand the socket back to the acceptor.
fn serve_connection(shared: &Shared, export: &ExportShared) {
    let name = export.name.as_str();
    let params = &shared.params;
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = Arc::new(BlkBackend::new(
        name,
        Arc::clone(&params.registry),
        params.runtime.clone(),
        usize::from(params.config.num_queues),
        params.config.queue_size,
        backend::Polling {
            max: params.config.poll_max,
            polled: Arc::clone(&params.polled),
        },
        mem.clone(),
    ));
    let rearm = || {
        if let Err(e) = shared.arm(export, ControlOperation::Modify) {
            debug!(export = name, error = %e, "cannot re-arm the vhost-user socket");
        }
    };
    let mut daemon = match VhostUserDaemon::new(format!("vhost-{name}"), Arc::clone(&backend), mem)
    {
        Ok(daemon) => daemon,
        Err(e) => {
            // Out of threads or file descriptors: try again (the frontend is still queued).
            error!(export = name, error = %e, "cannot create the vhost-user daemon");
            backend.close();
            std::thread::sleep(ACCEPT_RETRY);
            rearm();
            return;
        }
    };
    let started = daemon.start(&mut lock(&export.listener));
    if let Err(e) = started {
        backend.close();
        if !export.stop.load(Ordering::SeqCst) {
            error!(export = name, error = %e, "vhost-user accept failed");
            std::thread::sleep(ACCEPT_RETRY);
            rearm();
        }
        return;
    }
    let serving = {
        let mut conn = lock(&export.conn);
        if export.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
            false
        } else {
            *conn = daemon.shutdown_handle();
            export.connected.store(true, Ordering::SeqCst);
            true
        }
    };
    if serving {
        info!(export = name, "vhost-user frontend connected");
    }
    let result = daemon.wait();
    {
        let _conn = lock(&export.conn).take();
        export.connected.store(false, Ordering::SeqCst);
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
    rearm();
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
///
/// The socket is created with the process umask's mode and then set to `permissions`: between
/// the two a umask of 022 (or stricter) leaves it unconnectable by other users, so nobody
/// outside gets in; with a laxer umask, keep the socket directory closed (see docs/security.md).
fn bind(
    path: &Path,
    permissions: SocketPermissions,
) -> Result<(Listener, UnixStream), VhostUserError> {
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
    let restricted =
        std::os::unix::fs::chown(path, permissions.uid, permissions.gid).and_then(|()| {
            std::fs::set_permissions(
                path,
                std::os::unix::fs::PermissionsExt::from_mode(permissions.mode),
            )
        });
    if let Err(e) = restricted {
        remove_socket(path);
        return Err(VhostUserError::SocketError(io::Error::new(
            e.kind(),
            format!(
                "cannot give the socket mode {:o}, owner {:?} and group {:?}: {e}",
                permissions.mode, permissions.uid, permissions.gid
            ),
        )));
    }
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
