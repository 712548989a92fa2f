//! One upload scheduler per node: a fixed pool of worker threads drives every volume's upload
//! pipeline, so 200 volumes do not mean 200 threads.
//!
//! A step of a volume is what its own uploader thread used to do in one loop turn: service the
//! DTL link ([`Volume::dtl_tick`]), close the open TLog and SCO if their data waited longer than
//! `max_open_age` (so an idle volume's last writes reach the backend instead of sitting in the
//! write buffer until 64 MiB accumulate), and one [`Volume::upload_one`]. After a successful
//! upload the write buffer's limit is enforced (eviction).
//!
//! Which volume runs next, back-off after failures, fairness and the periodic tick are decided
//! by the pure [`plan::Plan`]; this module only adds the threads, the clock and the wake-ups.
//! Volumes wake the scheduler through their [`UploadSignal`] whenever they queue work. No lock of
//! the scheduler is held while a step runs (steps do backend I/O); the lock order is volume
//! state → scheduler, never the reverse.

pub mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, WaitTimeoutResult};

use crate::error::VolumeError;
use crate::volume::Volume;
use plan::{Next, Outcome, Plan, VolumeKey};

/// Called when a volume queues upload work; installed by the scheduler.
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

/// A volume's "upload work changed" signal: the condition variable its own waiters use
/// (`wait_for_uploads`, snapshot waits) plus the scheduler's notifier. Same calls as a
/// `Condvar`, so the volume's code notifies through it unchanged.
#[derive(Default)]
pub struct UploadSignal {
    condvar: Condvar,
    notifier: Mutex<Option<Notifier>>,
}

impl UploadSignal {
    pub fn notify_all(&self) {
        self.condvar.notify_all();
        let notifier = self.notifier.lock().clone();
        if let Some(notify) = notifier {
            notify();
        }
    }

    pub fn wait_for<T>(
        &self,
        guard: &mut MutexGuard<'_, T>,
        timeout: Duration,
    ) -> WaitTimeoutResult {
        self.condvar.wait_for(guard, timeout)
    }

    pub fn wait_until<T>(
        &self,
        guard: &mut MutexGuard<'_, T>,
        deadline: Instant,
    ) -> WaitTimeoutResult {
        self.condvar.wait_until(guard, deadline)
    }

    pub fn set_notifier(&self, notifier: Option<Notifier>) {
        *self.notifier.lock() = notifier;
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Upload steps in flight at once (worker threads).
    pub concurrency: usize,
    /// Close a volume's open TLog and SCO once their oldest data waited this long.
    pub max_open_age: Option<Duration>,
}

struct Inner {
    plan: Plan,
    volumes: HashMap<VolumeKey, Arc<Volume>>,
    keys: HashMap<String, VolumeKey>,
    next_key: VolumeKey,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes idle workers: a volume became ready, or the scheduler stops.
    work: Condvar,
    /// Wakes `remove` callers waiting for a volume's running step.
    step_done: Condvar,
    config: SchedulerConfig,
    /// Run after every successful upload (the manager enforces the write-buffer limit).
    after_upload: Box<dyn Fn() + Send + Sync>,
}

pub struct UploadScheduler {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl UploadScheduler {
    /// Start `config.concurrency` workers (at least one).
    pub fn start(config: SchedulerConfig, after_upload: Box<dyn Fn() + Send + Sync>) -> Self {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                plan: Plan::new(Instant::now(), plan::tick_interval(config.max_open_age)),
                volumes: HashMap::new(),
                keys: HashMap::new(),
                next_key: 0,
            }),
            work: Condvar::new(),
            step_done: Condvar::new(),
            config,
            after_upload,
        });
        let mut workers = Vec::new();
        for index in 0..config.concurrency.max(1) {
            let worker = shared.clone();
            match std::thread::Builder::new()
                .name(format!("upload-{index}"))
                .spawn(move || worker.run())
            {
                Ok(handle) => workers.push(handle),
                Err(e) => tracing::error!(error = %e, "cannot start an upload worker thread"),
            }
        }
        if workers.is_empty() {
            tracing::error!("no upload worker thread: nothing will reach the backend");
        }
        Self {
            shared,
            workers: Mutex::new(workers),
        }
    }

    /// Schedule `volume`'s uploads (replacing an earlier registration under its name).
    pub fn add(&self, volume: Arc<Volume>) {
        let name = volume.name().to_string();
        self.remove(&name);
        let key = {
            let mut inner = self.shared.inner.lock();
            let key = inner.next_key;
            inner.next_key += 1;
            inner.keys.insert(name, key);
            inner.volumes.insert(key, volume.clone());
            inner.plan.add(key);
            key
        };
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        volume.set_upload_notifier(Some(Arc::new(move || {
            if let Some(shared) = shared.upgrade() {
                if shared.inner.lock().plan.notify(key) {
                    shared.work.notify_one();
                }
            }
        })));
        self.shared.work.notify_one();
    }

    /// Stop scheduling the volume; returns once no step of it is running.
    pub fn remove(&self, name: &str) {
        let mut inner = self.shared.inner.lock();
        let Some(key) = inner.keys.remove(name) else {
            return;
        };
        if inner.plan.remove(key) {
            while inner.plan.contains(key) {
                self.shared.step_done.wait(&mut inner);
            }
        }
        if let Some(volume) = inner.volumes.remove(&key) {
            drop(inner);
            volume.set_upload_notifier(None);
        }
    }

    /// Stop every worker (after the step each is running) and forget every volume.
    pub fn shutdown(&self) {
        let volumes: Vec<Arc<Volume>> = {
            let mut inner = self.shared.inner.lock();
            inner.plan.stop();
            inner.keys.clear();
            inner.volumes.drain().map(|(_, v)| v).collect()
        };
        self.shared.work.notify_all();
        for volume in volumes {
            volume.set_upload_notifier(None);
        }
        let me = std::thread::current().id();
        let workers = std::mem::take(&mut *self.workers.lock());
        for worker in workers {
            // The last reference to the manager may be dropped on a worker (after an upload).
            if worker.thread().id() != me && worker.join().is_err() {
                tracing::error!("an upload worker thread panicked");
            }
        }
    }
}

impl Drop for UploadScheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn run(&self) {
        let mut inner = self.inner.lock();
        loop {
            match inner.plan.next(Instant::now()) {
                Next::Exit => return,
                Next::Wait(until) => {
                    self.work.wait_until(&mut inner, until);
                }
                Next::Run(key) => {
                    if inner.plan.has_ready() {
                        self.work.notify_one();
                    }
                    let volume = inner.volumes.get(&key).cloned();
                    let outcome = MutexGuard::unlocked(&mut inner, || {
                        volume.map_or(Outcome::Idle, |volume| self.step(&volume))
                    });
                    inner.plan.done(key, outcome, Instant::now());
                    if !inner.plan.contains(key) {
                        self.step_done.notify_all();
                    }
                }
            }
        }
    }

    /// One step of one volume (see the module docs).
    fn step(&self, volume: &Volume) -> Outcome {
        if volume.is_stopped() {
            return Outcome::Idle;
        }
        volume.dtl_tick();
        if plan::should_seal(volume.unclosed_data_age(), self.config.max_open_age) {
            match volume.close_current_tlog() {
                Ok(()) => {
                    tracing::debug!(volume = %volume.name(), "closed the idle open TLog for upload");
                }
                Err(e) => {
                    tracing::debug!(volume = %volume.name(), error = %e, "could not close the idle open TLog");
                }
            }
        }
        let before = volume.uploaded_bytes();
        let started = Instant::now();
        match volume.upload_one() {
            Ok(true) => {
                let bytes = volume.uploaded_bytes() - before;
                let elapsed = started.elapsed().as_secs_f64();
                if bytes > 0 && elapsed > 0.0 {
                    volume.report_upload_rate((bytes as f64 / elapsed) as u64);
                }
                (self.after_upload)();
                Outcome::Progress
            }
            Ok(false) => Outcome::Idle,
            // A fence lifts with a notification (`Volume::set_fenced`), which makes it ready.
            Err(
                VolumeError::Halted { .. }
                | VolumeError::Stopped { .. }
                | VolumeError::Fenced { .. },
            ) => Outcome::Idle,
            Err(e) => {
                tracing::warn!(volume = %volume.name(), error = %e, "upload failed; retrying after a back-off");
                Outcome::Failed
            }
        }
    }
}
