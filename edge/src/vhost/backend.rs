//! The virtio-blk device behind one vhost-user connection: the `VhostUserBackend` implementation.
//!
//! # Threads and queues
//!
//! vhost-user-backend runs one epoll worker per entry of [`queues_per_thread`]; we give every
//! queue its own worker (bit `i` for queue `i`), so the worker's `thread_id` *is* the queue index
//! and queues are served in parallel. The trait is the `&self` one: all mutable state is either
//! atomic or per queue ([`QueueCtl`]), so workers never contend on a backend-wide lock.
//!
//! Fast requests (read, write, discard, write-zeroes, get-id) run to completion on the queue's
//! worker, through the queue's bounce buffer. A read whose data is only on the backend
//! (`BlockTarget::try_read` says `WouldBlock`) goes to the backend-read pool (`read_pool`), so a
//! backend round trip never holds up the rest of the queue. Requests that wait for durability
//! (FLUSH, and writes while the guest has the cache in writethrough mode) or for the disk (a
//! write the target says waits for a device, `BlockTarget::write_waits`: a volume's large
//! `O_DIRECT` writes) go to the tokio blocking pool, so several large writes of one queue reach
//! the disk at once instead of one after the other; so do writes, discards and write-zeroes the
//! target says must first fetch data from the backend (`BlockTarget::write_reads_backend`: a
//! volume's sub-cluster write over evicted data), which would hold up the queue like a read
//! of that data. Both carry
//! everything needed to complete them: a [`VringRwLock`] clone, the head index, the status address
//! and a snapshot of the guest memory map. Their completion writes the status, adds the chain to
//! the used ring and signals the guest if `needs_notification()` says so.
//!
//! An asynchronous target (the edge's remote volume) hands out futures instead: its reads, and
//! writes whose acknowledgement is pending, complete on the runtime, all of one pass in one task
//! that signals the guest once for what completes together (`completion::Later`), and the pass
//! plugs the target so its requests leave in one network write (`BlockTarget::plug`). Both are
//! released before the worker could wait for anything, and at the end of the pass.
//!
//! # In-flight accounting
//!
//! Every queue counts its in-flight work: a pass of the worker over the ring counts as one, and so
//! does every request handed to a pool or the runtime until its completion has been published.
//! At most `MAX_DEFERRED_PER_QUEUE` requests per queue wait on the pools; beyond that the
//! worker waits, which stops the queue (backpressure) instead of growing memory and threads.
//! Requests completed on the runtime hold neither, and are bounded by the ring's size.
//! `stop_vring` (GET_VRING_BASE) and `reset_device` wait for the count to reach zero, so nothing is
//! written to guest memory after the frontend has stopped the ring. A deferred request that is
//! dropped without running (runtime shutting down) is completed with `IOERR` by its `Drop`, so the
//! count always comes back down.
//!
//! [`queues_per_thread`]: VhostUserBackend::queues_per_thread

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::completion::{add_used, signal_if_needed, used_len, write_status, Deferred, Later};
use super::config::{VirtioBlockConfig, WRITEBACK_OFFSET};
use super::poll::Poller;
use super::request::{
    self, GuestMem, Limits, Outcome, Parsed, RequestKind, ID_LEN, MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE,
};
use crate::read_pool;
use crate::target::{
    BlockTarget, ExportRegistry, Extent, PendingAck, PlugGuard, ReadFuture, TargetError, WriteAck,
};

/// Longest pause honoured for one `WriteAck::throttle`.
const MAX_THROTTLE: Duration = Duration::from_secs(1);
/// Most requests of one queue waiting on the blocking pool (FLUSH, writethrough writes). Each may
/// hold a bounce buffer of up to `BOUNCE_CHUNK`, so this bounds memory and blocking threads.
const MAX_DEFERRED_PER_QUEUE: usize = 32;

/// Whether the guest has made chains available that the worker has not popped yet.
fn has_chains(vring: &VringRwLock, mem: &GuestMem) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    // An unreadable ring index (a bad guest address) is for the next pass to report.
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these mutexes stays consistent across a panic (counters, buffers).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The block device served on this connection, resolved when the frontend first asks about it.
struct Device {
    target: Arc<dyn BlockTarget>,
    capacity: u64,
    read_only: bool,
}

/// Stand-in for an export that vanished from the registry: an empty, read-only device.
struct Absent;

impl BlockTarget for Absent {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), TargetError> {
        Err(TargetError::Shutdown)
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<WriteAck, TargetError> {
        Err(TargetError::Shutdown)
    }
    fn discard(&self, _: u64, _: u64) -> Result<WriteAck, TargetError> {
        Err(TargetError::Shutdown)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<WriteAck, TargetError> {
        Err(TargetError::Shutdown)
    }
    fn flush(&self) -> Result<(), TargetError> {
        Err(TargetError::Shutdown)
    }
    fn block_status(&self, _: u64, _: u64) -> Result<Vec<Extent>, TargetError> {
        Err(TargetError::Shutdown)
    }
}

/// Per-queue state: the in-flight counts, the bounce buffer and the polling window of the
/// queue's worker.
struct QueueCtl {
    counts: Mutex<Counts>,
    changed: Condvar,
    bounce: Mutex<Vec<u8>>,
    poll: Mutex<PollState>,
}

/// How a backend's queue workers poll (`VhostConfig::poll_max`) and where they count it.
pub(crate) struct Polling {
    pub(crate) max: Duration,
    pub(crate) polled: Arc<AtomicU64>,
}

/// What the worker knows about its guest's pace (`poll`).
struct PollState {
    poller: Poller,
    /// When the worker last ran out of chains without polling them up: the next pass tells the
    /// poller how long the guest took.
    ran_out: Option<Instant>,
}

#[derive(Default)]
struct Counts {
    /// Worker passes plus deferred requests not yet completed.
    inflight: usize,
    /// Deferred requests not yet completed.
    deferred: usize,
    /// Threads waiting on `changed`. A `Condvar` notification is a futex system call even when
    /// nobody waits, and an `Inflight` ends for every request completed away from the worker:
    /// notifying only when someone waits saved one system call per request.
    waiters: usize,
}

/// One unit of in-flight work on a queue; dropping it ends it.
pub(super) struct Inflight {
    ctl: Arc<QueueCtl>,
    deferred: bool,
}

impl QueueCtl {
    fn new(poll_max: Duration) -> Self {
        Self {
            counts: Mutex::default(),
            changed: Condvar::new(),
            bounce: Mutex::default(),
            poll: Mutex::new(PollState {
                poller: Poller::new(poll_max),
                ran_out: None,
            }),
        }
    }

    fn enter(self: &Arc<Self>) -> Inflight {
        lock(&self.counts).inflight += 1;
        Inflight {
            ctl: Arc::clone(self),
            deferred: false,
        }
    }

    /// Account for a request handed to the blocking pool, first waiting while
    /// [`MAX_DEFERRED_PER_QUEUE`] are already there (backpressure: the queue stops taking work
    /// until durability catches up, and memory and blocking threads stay bounded).
    fn enter_deferred(self: &Arc<Self>) -> Inflight {
        let mut counts = lock(&self.counts);
        while counts.deferred >= MAX_DEFERRED_PER_QUEUE {
            counts = self.wait(counts);
        }
        counts.inflight += 1;
        counts.deferred += 1;
        Inflight {
            ctl: Arc::clone(self),
            deferred: true,
        }
    }

    /// Wait for `changed`, counted in `waiters` so that `Inflight`'s drop notifies only then.
    fn wait<'a>(&self, mut counts: MutexGuard<'a, Counts>) -> MutexGuard<'a, Counts> {
        counts.waiters += 1;
        let mut counts = self
            .changed
            .wait(counts)
            .unwrap_or_else(PoisonError::into_inner);
        counts.waiters -= 1;
        counts
    }

    /// Account for a request completed by the runtime (an asynchronous target's read, a write
    /// waiting for its acknowledgements). Never waits: these hold no thread and no bounce
    /// buffer, and there are never more than the ring has descriptors.
    fn enter_async(self: &Arc<Self>) -> Inflight {
        self.enter()
    }

    fn wait_idle(&self) {
        let mut counts = lock(&self.counts);
        while counts.inflight > 0 {
            counts = self.wait(counts);
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let mut counts = lock(&self.ctl.counts);
        counts.inflight -= 1;
        if self.deferred {
            counts.deferred -= 1;
        }
        let waiters = counts.waiters > 0;
        drop(counts);
        if waiters {
            self.ctl.changed.notify_all();
        }
    }
}

/// The virtio-blk device of one vhost-user connection.
pub(crate) struct BlkBackend {
    name: String,
    id: [u8; ID_LEN],
    registry: Arc<dyn ExportRegistry>,
    device: OnceLock<Device>,
    runtime: Handle,
    num_queues: usize,
    queue_size: u16,
    mem: Mutex<GuestMemoryAtomic<GuestMem>>,
    acked_features: AtomicU64,
    /// The `writeback` config byte: false = writethrough (every write is FUA).
    writeback: AtomicBool,
    /// Set once the connection is over: workers stop touching the rings.
    closed: AtomicBool,
    queues: Vec<Arc<QueueCtl>>,
    /// The server's count of passes that polling found work for (`VhostServer::polled`).
    polled: Arc<AtomicU64>,
    exit_notifiers: Mutex<Vec<EventNotifier>>,
}

impl BlkBackend {
    /// `queue_size` must be a power of two of at least 4 (`seg_max` is `queue_size - 2`).
    pub(crate) fn new(
        name: &str,
        registry: Arc<dyn ExportRegistry>,
        runtime: Handle,
        num_queues: usize,
        queue_size: u16,
        polling: Polling,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            id: request::serial(name),
            registry,
            device: OnceLock::new(),
            runtime,
            num_queues,
            queue_size,
            mem: Mutex::new(mem),
            acked_features: AtomicU64::new(0),
            writeback: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueCtl::new(polling.max)))
                .collect(),
            polled: polling.polled,
            exit_notifiers: Mutex::new(Vec::new()),
        }
    }

    /// The target, looked up in the registry on first use, i.e. once the frontend is connected
    /// and asks for features or config (so each connection sees the volume's current size and
    /// read-only flag).
    fn device(&self) -> &Device {
        self.device
            .get_or_init(|| match self.registry.lookup(&self.name) {
                Some(target) => Device {
                    capacity: target.size() & !(SECTOR_SIZE - 1),
                    read_only: target.read_only(),
                    target,
                },
                None => {
                    warn!(export = %self.name, "vhost-user export is not in the registry; \
                    serving an empty read-only device");
                    Device {
                        target: Arc::new(Absent),
                        capacity: 0,
                        read_only: true,
                    }
                }
            })
    }

    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    fn limits(&self) -> Limits {
        let dev = self.device();
        Limits {
            max_descs: self.seg_max() as usize + 2,
            capacity: dev.capacity,
            read_only: dev.read_only,
        }
    }

    /// Writes must be durable before completing: the guest chose writethrough, or did not
    /// negotiate FLUSH (then it has no other way to make data durable).
    fn writethrough(&self) -> bool {
        let acked = self.acked_features.load(Ordering::Acquire);
        acked & (1 << VIRTIO_BLK_F_FLUSH) == 0 || !self.writeback.load(Ordering::Acquire)
    }

    pub(crate) fn config(&self) -> VirtioBlockConfig {
        let dev = self.device();
        VirtioBlockConfig {
            capacity: (dev.capacity / SECTOR_SIZE).to_le(),
            seg_max: self.seg_max().to_le(),
            blk_size: 512u32.to_le(),
            // 4 KiB physical blocks: the engine's allocation unit.
            physical_block_exp: 3,
            min_io_size: 8u16.to_le(),
            opt_io_size: 8u32.to_le(),
            writeback: u8::from(self.writeback.load(Ordering::Acquire)),
            num_queues: (self.num_queues as u16).to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: 8u32.to_le(),
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// End of the connection: stop the queue workers and wait for every in-flight request.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for notifier in lock(&self.exit_notifiers).iter() {
            if let Err(e) = notifier.notify() {
                error!(error = %e, "cannot stop a vhost-user queue worker");
            }
        }
        for queue in &self.queues {
            queue.wait_idle();
        }
    }

    /// Serve queue `index` until it is empty (re-check after re-enabling notifications, since
    /// the guest may have added chains in between).
    pub(crate) fn serve_queue(&self, index: usize, vring: &VringRwLock) {
        let Some(ctl) = self.queues.get(index) else {
            error!(
                queue = index,
                "event for a queue this backend does not have"
            );
            return;
        };
        // Taken before the checks below so that `stop_vring` either sees this pass or this pass
        // sees the ring stopped.
        let _active = ctl.enter();
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        {
            let state = vring.get_ref();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
        }
        {
            let mut poll = lock(&ctl.poll);
            if let Some(ran_out) = poll.ran_out.take() {
                poll.poller.waited(ran_out.elapsed());
            }
        }
        loop {
            // The guest need not kick while this pass serves and polls. With EVENT_IDX that is
            // already so (the avail event stays behind until `enable_notification` moves it);
            // without it this sets `VRING_USED_F_NO_NOTIFY`, which `enable_notification`
            // clears before the last look.
            if let Err(e) = vring.disable_notification() {
                warn!(queue = index, error = %e, "cannot disable queue notifications");
            }
            self.drain(ctl, vring);
            if self.poll(ctl, vring) {
                continue;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(queue = index, error = %e, "cannot enable queue notifications");
                    break;
                }
            }
        }
    }

    /// The queue is empty: look at the ring for up to the queue's polling window (`poll`
    /// module). True when the guest added chains meanwhile. The window is at most
    /// `VhostConfig::poll_max`, and `closed` ends it early, so `stop_vring` waits no longer.
    fn poll(&self, ctl: &QueueCtl, vring: &VringRwLock) -> bool {
        let ran_out = Instant::now();
        let mut poll = lock(&ctl.poll);
        let window = poll.poller.window();
        if !window.is_zero() {
            let mem = lock(&self.mem).memory();
            while !self.closed.load(Ordering::Acquire) {
                if has_chains(vring, &mem) {
                    poll.poller.waited(ran_out.elapsed());
                    self.polled.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                if ran_out.elapsed() >= window {
                    break;
                }
                // Let another thread that is ready on this CPU run instead of spinning it out.
                std::thread::yield_now();
            }
        }
        poll.ran_out = Some(ran_out);
        false
    }

    /// Pop and process every available chain.
    fn drain(&self, ctl: &Arc<QueueCtl>, vring: &VringRwLock) {
        let mem = lock(&self.mem).memory();
        let target = Arc::clone(&self.device().target);
        let limits = self.limits();
        let fua = self.writethrough();
        // An asynchronous target takes FUA writes inline (durability comes as a pending ack).
        let fua_blocks = fua && !target.fua_inline();
        let mut bounce = lock(&ctl.bounce);
        let mut pending_signal = false;
        let mut pass = Pass {
            later: Later::default(),
            plug: PlugGuard::new(target.as_ref()),
        };
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match request::parse(chain, &mem, &limits) {
                Parsed::NoStatus(reason) => {
                    debug!(
                        head,
                        reason, "virtio-blk chain without status; returned unused"
                    );
                    add_used(vring, head, 0);
                    pending_signal = true;
                }
                Parsed::Rejected {
                    status,
                    code,
                    reason,
                } => {
                    debug!(head, code, reason, "virtio-blk request rejected");
                    write_status(&mem, status, code);
                    add_used(vring, head, 1);
                    pending_signal = true;
                }
                Parsed::Request(req)
                    if request::is_blocking(&req.kind, fua_blocks, target.as_ref()) =>
                {
                    // Publish what is done first: `defer` may wait for earlier deferred requests.
                    if std::mem::take(&mut pending_signal) {
                        signal_if_needed(vring);
                    }
                    if matches!(req.kind, RequestKind::Flush) {
                        if let Some(flush) = target.flush_async() {
                            let ok = Outcome {
                                status: request::STATUS_OK,
                                written: 0,
                                throttle: None,
                            };
                            self.complete_later(
                                ctl,
                                vring,
                                &mut pass.later,
                                head,
                                mem.clone(),
                                req.status,
                                ok,
                                vec![flush],
                            );
                            continue;
                        }
                    }
                    self.defer(
                        ctl,
                        &mut pass,
                        vring,
                        head,
                        mem.clone(),
                        req,
                        fua,
                        &target,
                        Pool::Blocking,
                    );
                }
                Parsed::Request(req) => {
                    let mut acks = Vec::new();
                    let Some(outcome) = request::execute_deferrable(
                        &req.kind,
                        &mem,
                        target.as_ref(),
                        fua,
                        &self.id,
                        &mut bounce,
                        &mut acks,
                    ) else {
                        // A read that waits for the backend: complete it from the backend-read
                        // pool, and keep draining.
                        if std::mem::take(&mut pending_signal) {
                            signal_if_needed(vring);
                        }
                        match request::read_async(&req.kind, target.as_ref()) {
                            Some(reads) => {
                                self.read_later(
                                    ctl,
                                    vring,
                                    &mut pass.later,
                                    head,
                                    mem.clone(),
                                    req,
                                    reads,
                                );
                            }
                            None => self.defer(
                                ctl,
                                &mut pass,
                                vring,
                                head,
                                mem.clone(),
                                req,
                                false,
                                &target,
                                Pool::BackendRead,
                            ),
                        }
                        continue;
                    };
                    if !acks.is_empty() {
                        // Applied, but not acknowledgeable yet (sync DTL): complete it from the
                        // runtime once the acknowledgements arrive, and keep draining.
                        if std::mem::take(&mut pending_signal) {
                            signal_if_needed(vring);
                        }
                        self.complete_later(
                            ctl,
                            vring,
                            &mut pass.later,
                            head,
                            mem.clone(),
                            req.status,
                            outcome,
                            acks,
                        );
                        continue;
                    }
                    write_status(&mem, req.status, outcome.status);
                    add_used(vring, head, used_len(&outcome));
                    pending_signal = true;
                    if let Some(delay) = outcome.throttle {
                        // Backpressure: let the guest see what is done, then stop taking work
                        // from this queue for a while.
                        signal_if_needed(vring);
                        pending_signal = false;
                        pass.release(&self.runtime);
                        std::thread::sleep(delay.min(MAX_THROTTLE));
                    }
                }
            }
        }
        pass.finish(&self.runtime);
        if pending_signal {
            signal_if_needed(vring);
        }
    }

    /// Complete a request from the runtime once its acknowledgements arrived (in `later`, the
    /// pass's batch).
    #[allow(clippy::too_many_arguments)]
    fn complete_later(
        &self,
        ctl: &Arc<QueueCtl>,
        vring: &VringRwLock,
        later: &mut Later,
        head: u16,
        mem: GuestMemoryLoadGuard<GuestMem>,
        status: GuestAddress,
        outcome: Outcome,
        acks: Vec<PendingAck>,
    ) {
        let deferred = Deferred {
            vring: vring.clone(),
            head,
            status,
            mem,
            done: false,
            _inflight: ctl.enter_async(),
        };
        later.push(
            vring,
            Box::pin(async move {
                let mut results = Vec::with_capacity(acks.len());
                for ack in acks {
                    results.push(ack.await);
                }
                (deferred, request::settle(outcome, results))
            }),
        );
    }

    /// Complete a read of an asynchronous target from the runtime once its data arrived (in
    /// `later`, the pass's batch).
    #[allow(clippy::too_many_arguments)]
    fn read_later(
        &self,
        ctl: &Arc<QueueCtl>,
        vring: &VringRwLock,
        later: &mut Later,
        head: u16,
        mem: GuestMemoryLoadGuard<GuestMem>,
        req: request::Request,
        reads: Vec<ReadFuture>,
    ) {
        let deferred = Deferred {
            vring: vring.clone(),
            head,
            status: req.status,
            mem,
            done: false,
            _inflight: ctl.enter_async(),
        };
        later.push(
            vring,
            Box::pin(async move {
                let pieces = futures::future::join_all(reads).await;
                let outcome = request::finish_read(&req.kind, &deferred.mem, pieces);
                (deferred, outcome)
            }),
        );
    }

    /// Run a request that must not run on the queue thread on `pool` and complete its chain
    /// from there.
    #[allow(clippy::too_many_arguments)]
    fn defer(
        &self,
        ctl: &Arc<QueueCtl>,
        pass: &mut Pass<'_>,
        vring: &VringRwLock,
        head: u16,
        mem: GuestMemoryLoadGuard<GuestMem>,
        req: request::Request,
        fua: bool,
        target: &Arc<dyn BlockTarget>,
        pool: Pool,
    ) {
        // `enter_deferred` may wait for earlier requests: release the pass's first.
        pass.release(&self.runtime);
        let mut deferred = Deferred {
            vring: vring.clone(),
            head,
            status: req.status,
            mem,
            done: false,
            _inflight: ctl.enter_deferred(),
        };
        let target = Arc::clone(target);
        let id = self.id;
        let kind: RequestKind = req.kind;
        let job = move || {
            let mut bounce = Vec::new();
            let outcome =
                request::execute(&kind, &deferred.mem, target.as_ref(), fua, &id, &mut bounce);
            deferred.complete(outcome);
        };
        match pool {
            Pool::Blocking => {
                self.runtime.spawn_blocking(job);
            }
            Pool::BackendRead => read_pool::spawn(&self.runtime, job),
        }
    }
}

/// What one pass over a queue holds back until it ends or the worker may wait: requests to a
/// network target, sent together (one write for the batch, [`PlugGuard`]), and the requests
/// completed on the runtime, started as one task ([`Later`]).
struct Pass<'a> {
    later: Later,
    plug: PlugGuard<'a>,
}

impl Pass<'_> {
    /// Send what is held and start the batch: before the worker may wait.
    fn release(&mut self, runtime: &Handle) {
        self.plug.flush();
        self.later.spawn(runtime);
    }

    /// The same at the end of the pass.
    fn finish(self, runtime: &Handle) {
        let Pass { mut later, plug } = self;
        drop(plug);
        later.spawn(runtime);
    }
}

/// Where a deferred request runs.
#[derive(Clone, Copy)]
enum Pool {
    /// The runtime's blocking pool: FLUSH, write-through writes (fsync) and writes that wait for
    /// a device.
    Blocking,
    /// The process-wide bounded pool of reads that wait for the backend (`read_pool`).
    BackendRead,
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        if self.device().read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK is added by vhost-user-backend itself.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        // The handler has already disabled every vring; wait for work still running.
        for queue in &self.queues {
            queue.wait_idle();
        }
        self.acked_features.store(0, Ordering::Release);
        self.writeback.store(true, Ordering::Release);
    }

    /// Nothing to keep: the vrings know (vhost-user-backend sets it on each), and the serving
    /// loop is the same either way (`serve_queue`).
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start.saturating_add(buf.len());
        if end > std::mem::size_of::<VirtioBlockConfig>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write beyond the virtio-blk config space",
            ));
        }
        // Only `writeback` is writable; writes to the other (read-only) fields are ignored.
        if (start..end).contains(&WRITEBACK_OFFSET) {
            let writeback = buf[WRITEBACK_OFFSET - start] != 0;
            debug!(export = %self.name, writeback, "guest set the write cache mode");
            self.writeback.store(writeback, Ordering::Release);
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        *lock(&self.mem) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .and_then(|(consumer, notifier)| {
                let ours = notifier.try_clone()?;
                Ok((consumer, notifier, ours))
            });
        match pair {
            Ok((consumer, notifier, ours)) => {
                lock(&self.exit_notifiers).push(ours);
                Some((consumer, notifier))
            }
            Err(e) => {
                error!(thread = thread_index, error = %e, "cannot create a worker exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(queue) = self.queues.get(queue_index as usize) {
            queue.wait_idle();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per worker: the worker's only vring is local index 0, global `thread_id`.
        // Never return an error: that would end the worker and with it the queue.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve_queue(thread_id, vring),
            None => warn!(device_event, "vhost-user event for an unknown vring"),
        }
        Ok(())
    }
}
