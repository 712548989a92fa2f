//! The volume side of the DTL in the engine: ordered, bounded, acknowledged delivery of a
//! volume's writes to its DTL, and the connection's state machine.
//!
//! # Why a queue with one sender
//! The engine submits entries *under the volume lock*, so the queue holds them in exactly the
//! order the volume applied them. One worker thread takes them off in that order and sends them
//! over one connection, coalescing whatever queued up behind a round trip into one `AddEntries`
//! per SCO. The DTL therefore holds a *prefix* of the volume's write history, in order, which is
//! what replay needs (see [`crate::replay`]); and a sync-mode client at queue depth 32 pays one
//! round trip per batch, not per write.
//!
//! Every submitted batch gets a sequence number ([`Ticket`]); the worker publishes the highest
//! acknowledged one. A sync-mode write waits for its ticket (asynchronously for NBD, so the
//! frontend keeps taking requests), an async-mode FLUSH waits for the newest ticket.
//!
//! # States
//! ```text
//!   connecting ──connect+register──▶ catch-up requested ──engine sealed──▶ catch_up ──barrier on backend──▶ ok_sync
//!        ▲                                   │                                  │                              │
//!        └──────────── degraded ◀────────────┴───────── any I/O error ──────────┴──────────────────────────────┘
//!   stale owner tag from the server (another node adopted the volume) ──▶ fenced (terminal)
//! ```
//! *Why a reconnect never replays history into the DTL:* while degraded the volume kept writing
//! without a mirror, so the DTL is missing an unknown stretch of the history. Instead of copying
//! the write buffer over, the engine seals its current SCO (new writes go to a new SCO, mirrored
//! from its first cluster) and waits until everything older is on the backend; only then is the
//! DTL again a complete copy of what the backend lacks, and the state returns to `ok_sync`.
//!
//! While degraded (or before the first connection), submits are dropped and their tickets are
//! already complete: writes are never failed or held because the DTL is away. A worker that stops
//! hearing back within the request timeout (a dead or SIGSTOPped DTL) declares the link degraded,
//! which releases every waiter.
//!
//! # Bounds
//! The backlog counts the data bytes queued and not yet acknowledged. The engine asks
//! [`Mirror::over_backlog`] after submitting and, when over, makes the write wait for its ticket
//! like a sync write, so the backlog stays within its limit plus the frontends' queue depths.
//! Trims are cumulative ("drop every SCO <= n"), so a dropped trim costs nothing but disk space
//! until the next one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;
use tokio::sync::Notify;

use crate::client::{DtlClient, DtlClientConfig};
use crate::error::DtlError;
use crate::protocol::{Entry, ErrorCode, MAX_BATCH_ENTRIES};

/// Most data bytes sent in one `AddEntries` frame.
const MAX_BATCH_BYTES: u64 = 8 << 20;

/// A volume's DTL state as users see it (`vstor volume info`, the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtlState {
    /// Every write the volume acknowledged that is not on the backend is on the DTL.
    OkSync,
    /// The volume has no DTL (mode `none`).
    OkStandalone,
    /// Connected again; waiting until what was written without a DTL is on the backend.
    CatchUp,
    /// The DTL is unreachable; writes continue unprotected and the link is retried.
    Degraded,
}

impl DtlState {
    pub fn as_str(self) -> &'static str {
        match self {
            DtlState::OkSync => "ok_sync",
            DtlState::OkStandalone => "ok_standalone",
            DtlState::CatchUp => "catch_up",
            DtlState::Degraded => "degraded",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// `host:port` of the DTL server.
    pub addr: String,
    pub namespace: String,
    pub cluster_size: u32,
    pub owner_tag: u64,
    /// The volume's incarnation (`DtlStore::register`); 0: not known.
    pub incarnation: u64,
    /// Most data bytes queued and unacknowledged before writes wait for the DTL.
    pub max_backlog_bytes: u64,
    pub client: DtlClientConfig,
    /// Pause between reconnection attempts while degraded.
    pub retry_interval: Duration,
}

impl MirrorConfig {
    pub fn new(addr: &str, namespace: &str, cluster_size: u32, owner_tag: u64) -> Self {
        Self {
            addr: addr.to_string(),
            namespace: namespace.to_string(),
            cluster_size,
            owner_tag,
            incarnation: 0,
            max_backlog_bytes: 64 << 20,
            client: DtlClientConfig {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(3),
                tls: None,
            },
            retry_interval: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Never connected yet, or reconnecting after `Degraded`.
    Connecting {
        degraded: bool,
    },
    /// Connected and registered; the engine has not sealed its SCO yet.
    CatchUpRequested {
        epoch: u64,
    },
    CatchUp {
        epoch: u64,
    },
    OkSync,
    /// The server refused our owner tag: another node owns the volume now.
    Fenced,
}

enum Item {
    Entries {
        seq: u64,
        sco: u32,
        entries: Vec<Entry>,
        bytes: u64,
    },
    Trim {
        sco: u32,
    },
}

struct Inner {
    queue: VecDeque<Item>,
    queued_bytes: u64,
    next_seq: u64,
    phase: Phase,
    epoch: u64,
    /// Newest SCO the DTL held when the link was last (re)established.
    dtl_newest: Option<u32>,
    stopping: bool,
    last_error: Option<String>,
    fenced_reason: Option<String>,
    batches_sent: u64,
    entries_sent: u64,
    degradations: u64,
}

struct Shared {
    config: MirrorConfig,
    inner: Mutex<Inner>,
    /// Highest sequence number the DTL really acknowledged (`acked` also moves when waiters are
    /// released because the link failed).
    stored: AtomicU64,
    /// Set when the engine has something to do (a catch-up to begin, or the link was fenced),
    /// so the write path can check with one atomic load.
    attention: AtomicBool,
    /// Wakes the worker: work queued, or stopping.
    work: Notify,
    /// Set (and `exited` notified) when the worker returns.
    finished: Mutex<bool>,
    exited: Condvar,
    acked: watch::Sender<u64>,
    waker: Box<dyn Fn() + Send + Sync>,
}

/// Waits for the DTL to hold a submitted batch (or for the link to give up on it).
///
/// Waiting succeeds when the DTL stored the batch, and also when the link went degraded first
/// (writes are never failed because the DTL is away). It fails only when the link was *fenced*
/// before storing the batch: another node owns the volume now, and the write must not be
/// acknowledged.
#[must_use = "a ticket does nothing unless waited for"]
pub struct Ticket {
    seq: u64,
    acked: Option<(watch::Receiver<u64>, Arc<Shared>)>,
}

impl Ticket {
    fn done() -> Self {
        Self {
            seq: 0,
            acked: None,
        }
    }

    fn new(seq: u64, shared: &Arc<Shared>) -> Self {
        Self {
            seq,
            acked: Some((shared.acked.subscribe(), shared.clone())),
        }
    }

    pub fn is_done(&self) -> bool {
        self.acked
            .as_ref()
            .is_none_or(|(rx, _)| *rx.borrow() >= self.seq)
    }

    /// Wait; `Err` carries why the link was fenced.
    pub async fn wait(self) -> Result<(), String> {
        let Some((mut rx, shared)) = self.acked else {
            return Ok(());
        };
        // An error means the mirror is gone: nothing is left to wait for.
        let _ = rx.wait_for(|acked| *acked >= self.seq).await;
        Self::outcome(self.seq, &shared)
    }

    pub fn wait_blocking(self) -> Result<(), String> {
        match &self.acked {
            Some((_, shared)) if self.is_done() => Self::outcome(self.seq, shared),
            Some(_) => futures::executor::block_on(self.wait()),
            None => Ok(()),
        }
    }

    fn outcome(seq: u64, shared: &Shared) -> Result<(), String> {
        if shared.stored.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        match &shared.inner.lock().fenced_reason {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
}

/// What [`Mirror::status`] reports.
#[derive(Debug, Clone)]
pub struct MirrorStatus {
    pub state: DtlState,
    pub backlog_bytes: u64,
    pub last_error: Option<String>,
    pub batches_sent: u64,
    pub entries_sent: u64,
    pub degradations: u64,
}

/// A catch-up the engine must perform: seal its SCO, start new SCOs after `min_next_sco`, and
/// report back with [`Mirror::caught_up`] once everything written before is on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpRequest {
    pub epoch: u64,
    pub min_next_sco: u32,
}

pub struct Mirror {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Mirror {
    /// Start the link: its worker runs as a task on `runtime` when given (a server's runtime),
    /// else on a thread of its own. `waker` is called (from the worker) when the engine has
    /// something to do: a catch-up to begin, or the link was fenced.
    pub fn start(
        config: MirrorConfig,
        waker: Box<dyn Fn() + Send + Sync>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Arc<Self> {
        let (acked, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                queued_bytes: 0,
                next_seq: 1,
                phase: Phase::Connecting { degraded: false },
                epoch: 0,
                dtl_newest: None,
                stopping: false,
                last_error: None,
                fenced_reason: None,
                batches_sent: 0,
                entries_sent: 0,
                degradations: 0,
            }),
            stored: AtomicU64::new(0),
            attention: AtomicBool::new(false),
            work: Notify::new(),
            finished: Mutex::new(false),
            exited: Condvar::new(),
            acked,
            waker,
        });
        let worker_shared = shared.clone();
        let worker = match runtime {
            // On the frontends' runtime the worker is woken on the submitting thread and its
            // replies wake the waiting connection there too: no cross-thread hop per write.
            Some(handle) => {
                handle.spawn(run(worker_shared));
                None
            }
            None => std::thread::Builder::new()
                .name(format!("dtl-{}", shared.config.namespace))
                .spawn(move || match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(run(worker_shared)),
                    Err(e) => degrade(&worker_shared, &DtlError::Io(e)),
                })
                .map_err(|e| {
                    tracing::error!(namespace = %shared.config.namespace, error = %e, "cannot start the DTL link thread");
                })
                .ok(),
        };
        Arc::new(Self {
            shared,
            worker: Mutex::new(worker),
        })
    }

    pub fn config(&self) -> &MirrorConfig {
        &self.shared.config
    }

    pub fn state(&self) -> DtlState {
        phase_state(self.shared.inner.lock().phase)
    }

    pub fn status(&self) -> MirrorStatus {
        let inner = self.shared.inner.lock();
        MirrorStatus {
            state: phase_state(inner.phase),
            backlog_bytes: inner.queued_bytes,
            last_error: inner
                .fenced_reason
                .clone()
                .or_else(|| inner.last_error.clone()),
            batches_sent: inner.batches_sent,
            entries_sent: inner.entries_sent,
            degradations: inner.degradations,
        }
    }

    /// Why the server fenced this link, once it did.
    pub fn fenced(&self) -> Option<String> {
        self.shared.inner.lock().fenced_reason.clone()
    }

    /// Queue entries of SCO `sco`, in the volume's write order. Call under the volume lock.
    pub fn submit(&self, sco: u32, entries: Vec<Entry>) -> Ticket {
        let mut inner = self.shared.inner.lock();
        if !accepts_entries(inner.phase) || entries.is_empty() {
            return Ticket::done();
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let bytes = entries.iter().map(|e| e.data.len() as u64).sum();
        inner.queued_bytes += bytes;
        inner.queue.push_back(Item::Entries {
            seq,
            sco,
            entries,
            bytes,
        });
        drop(inner);
        self.shared.work.notify_one();
        Ticket::new(seq, &self.shared)
    }

    /// Whether the unacknowledged backlog is over its limit (the caller should wait).
    pub fn over_backlog(&self) -> bool {
        self.shared.inner.lock().queued_bytes > self.shared.config.max_backlog_bytes
    }

    /// A ticket for everything submitted so far (FLUSH in async mode).
    pub fn flush_ticket(&self) -> Ticket {
        let inner = self.shared.inner.lock();
        let seq = inner.next_seq - 1;
        if seq == 0 || !accepts_entries(inner.phase) {
            return Ticket::done();
        }
        Ticket::new(seq, &self.shared)
    }

    /// The TLog covering every SCO `<= sco` is on the backend: the DTL may drop them.
    pub fn trim(&self, sco: u32) {
        let mut inner = self.shared.inner.lock();
        if !accepts_entries(inner.phase) {
            return;
        }
        inner.queue.push_back(Item::Trim { sco });
        drop(inner);
        self.shared.work.notify_one();
    }

    /// Take a pending catch-up request, moving the link to `catch_up`.
    pub fn take_catch_up(&self) -> Option<CatchUpRequest> {
        let mut inner = self.shared.inner.lock();
        match inner.phase {
            Phase::CatchUpRequested { epoch } => {
                inner.phase = Phase::CatchUp { epoch };
                self.shared.attention.store(false, Ordering::Release);
                Some(CatchUpRequest {
                    epoch,
                    min_next_sco: inner.dtl_newest.map_or(0, |n| n.saturating_add(1)),
                })
            }
            Phase::Fenced => None,
            _ => {
                self.shared.attention.store(false, Ordering::Release);
                None
            }
        }
    }

    /// Whether the engine should look at the link: a catch-up to begin, or fenced (one atomic
    /// load, for the write path).
    pub fn needs_attention(&self) -> bool {
        self.shared.attention.load(Ordering::Acquire)
    }

    /// Everything written before catch-up `epoch` began is on the backend.
    pub fn caught_up(&self, epoch: u64) {
        let mut inner = self.shared.inner.lock();
        if inner.phase == (Phase::CatchUp { epoch }) {
            inner.phase = Phase::OkSync;
            tracing::info!(namespace = %self.shared.config.namespace, "DTL in sync");
        }
    }

    /// Stop the worker after it sent what is queued (bounded by the request timeout while the
    /// DTL is reachable; at once otherwise); pending tickets complete.
    pub fn stop(&self) {
        self.shared.inner.lock().stopping = true;
        self.shared.work.notify_one();
        if let Some(worker) = self.worker.lock().take() {
            let _ = worker.join();
        }
        // A worker task on a runtime: wait for it to finish (it also finishes when the runtime
        // drops it), bounded in case the runtime is gone.
        let mut finished = self.shared.finished.lock();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !*finished {
            if self
                .shared
                .exited
                .wait_until(&mut finished, deadline)
                .timed_out()
            {
                break;
            }
        }
        drop(finished);
        let inner = self.shared.inner.lock();
        self.shared.acked.send_replace(inner.next_seq);
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop();
    }
}

fn phase_state(phase: Phase) -> DtlState {
    match phase {
        Phase::OkSync => DtlState::OkSync,
        Phase::CatchUpRequested { .. } | Phase::CatchUp { .. } => DtlState::CatchUp,
        Phase::Connecting { .. } | Phase::Fenced => DtlState::Degraded,
    }
}

fn accepts_entries(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::CatchUpRequested { .. } | Phase::CatchUp { .. } | Phase::OkSync
    )
}

/// Mark the link broken: drop the queue, release every waiter.
fn degrade(shared: &Shared, error: &DtlError) {
    let mut inner = shared.inner.lock();
    if matches!(inner.phase, Phase::Fenced) {
        return;
    }
    let fenced = matches!(error, DtlError::StaleOwnerTag { .. })
        || error.remote_code() == Some(ErrorCode::StaleOwnerTag);
    let was = inner.phase;
    inner.queue.clear();
    inner.queued_bytes = 0;
    inner.last_error = Some(error.to_string());
    if fenced {
        inner.phase = Phase::Fenced;
        shared.attention.store(true, Ordering::Release);
        inner.fenced_reason = Some(format!(
            "DTL {} refused owner tag {}: another node took the volume over ({error})",
            shared.config.addr, shared.config.owner_tag
        ));
        tracing::error!(namespace = %shared.config.namespace, error = %error, "DTL link fenced");
    } else {
        inner.phase = Phase::Connecting { degraded: true };
        if was != (Phase::Connecting { degraded: true }) {
            inner.degradations += 1;
            tracing::warn!(namespace = %shared.config.namespace, addr = %shared.config.addr, error = %error, "DTL degraded");
        }
    }
    let released = inner.next_seq - 1;
    drop(inner);
    shared.acked.send_replace(released);
    if fenced {
        (shared.waker)();
    }
}

/// Marks the worker finished however it ends (returned, or dropped with its runtime).
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        *self.0.finished.lock() = true;
        self.0.exited.notify_all();
    }
}

async fn run(shared: Arc<Shared>) {
    let _finished = Finished(shared.clone());
    let config = &shared.config;
    let mut client: Option<DtlClient> = None;
    loop {
        {
            let inner = shared.inner.lock();
            // Stopping drains what is queued (trims of the last uploads, say) while connected.
            if inner.stopping && (client.is_none() || inner.queue.is_empty()) {
                return;
            }
        }
        if client.is_none() {
            let connected = async {
                let mut c =
                    DtlClient::connect_with(config.addr.as_str(), config.client.clone()).await?;
                c.register(
                    &config.namespace,
                    config.cluster_size,
                    config.owner_tag,
                    config.incarnation,
                )
                .await?;
                let range = c.sco_range(&config.namespace).await?;
                Ok::<_, DtlError>((c, range))
            }
            .await;
            match connected {
                Ok((c, range)) => {
                    client = Some(c);
                    let mut inner = shared.inner.lock();
                    inner.epoch += 1;
                    inner.dtl_newest = range.newest;
                    inner.phase = Phase::CatchUpRequested { epoch: inner.epoch };
                    shared.attention.store(true, Ordering::Release);
                    inner.last_error = None;
                    drop(inner);
                    tracing::info!(namespace = %config.namespace, addr = %config.addr, "DTL connected");
                    (shared.waker)();
                }
                Err(e) => {
                    degrade(&shared, &e);
                    let (fenced, stopping) = {
                        let inner = shared.inner.lock();
                        (matches!(inner.phase, Phase::Fenced), inner.stopping)
                    };
                    if fenced {
                        return;
                    }
                    if !stopping {
                        tokio::select! {
                            _ = tokio::time::sleep(config.retry_interval) => {}
                            _ = shared.work.notified() => {}
                        }
                    }
                    continue;
                }
            }
        }
        let outgoing = loop {
            match take_batch(&shared) {
                Taken::Batch(outgoing) => break Some(outgoing),
                Taken::Stopping => break None,
                Taken::Nothing => shared.work.notified().await,
            }
        };
        let Some(outgoing) = outgoing else {
            continue;
        };
        let Some(c) = client.as_mut() else {
            continue;
        };
        let result = match &outgoing {
            Outgoing::Trim { sco } => {
                c.remove_up_to(&config.namespace, config.owner_tag, *sco)
                    .await
            }
            Outgoing::Entries { sco, entries, .. } => {
                c.add_entries(&config.namespace, config.owner_tag, *sco, entries.clone())
                    .await
            }
        };
        match result {
            Ok(()) => {
                if let Outgoing::Entries {
                    last_seq,
                    entries,
                    bytes,
                    ..
                } = outgoing
                {
                    let mut inner = shared.inner.lock();
                    inner.queued_bytes = inner.queued_bytes.saturating_sub(bytes);
                    inner.batches_sent += 1;
                    inner.entries_sent += entries.len() as u64;
                    drop(inner);
                    shared.stored.fetch_max(last_seq, Ordering::AcqRel);
                    shared.acked.send_if_modified(|acked| {
                        let moved = *acked < last_seq;
                        *acked = (*acked).max(last_seq);
                        moved
                    });
                }
            }
            Err(e) => {
                client = None;
                degrade(&shared, &e);
                if matches!(shared.inner.lock().phase, Phase::Fenced) {
                    return;
                }
            }
        }
    }
}

enum Taken {
    Batch(Outgoing),
    Nothing,
    Stopping,
}

/// Take the next batch off the queue: consecutive entries of one SCO up to the batch limits, or
/// the newest of consecutive trims.
fn take_batch(shared: &Shared) -> Taken {
    let mut inner = shared.inner.lock();
    let Some(first) = inner.queue.pop_front() else {
        return if inner.stopping {
            Taken::Stopping
        } else {
            Taken::Nothing
        };
    };
    let outgoing = match first {
        Item::Trim { mut sco } => {
            while let Some(Item::Trim { sco: next }) = inner.queue.front() {
                sco = sco.max(*next);
                inner.queue.pop_front();
            }
            Outgoing::Trim { sco }
        }
        Item::Entries {
            seq,
            sco,
            mut entries,
            mut bytes,
        } => {
            let mut last_seq = seq;
            while let Some(Item::Entries {
                sco: next_sco,
                entries: next,
                bytes: next_bytes,
                ..
            }) = inner.queue.front()
            {
                if *next_sco != sco
                    || entries.len() + next.len() > MAX_BATCH_ENTRIES
                    || bytes + next_bytes > MAX_BATCH_BYTES
                {
                    break;
                }
                if let Some(Item::Entries {
                    seq,
                    entries: next,
                    bytes: next_bytes,
                    ..
                }) = inner.queue.pop_front()
                {
                    entries.extend(next);
                    bytes += next_bytes;
                    last_seq = seq;
                }
            }
            Outgoing::Entries {
                last_seq,
                sco,
                entries,
                bytes,
            }
        }
    };
    Taken::Batch(outgoing)
}

enum Outgoing {
    Trim {
        sco: u32,
    },
    Entries {
        last_seq: u64,
        sco: u32,
        entries: Vec<Entry>,
        bytes: u64,
    },
}
