//! Glue between the engine and the frontends: a [`Volume`] seen as an edge [`BlockTarget`], a
//! snapshot seen as a read-only one, and the node's volumes and snapshots seen as an
//! [`ExportRegistry`].
//!
//! Export names: a volume's name, or `VOLUME@SNAPSHOT` for a snapshot (`@` cannot occur in a
//! volume or snapshot name). A snapshot export is read-only: writes, trims and write-zeroes fail
//! with EPERM (NBD) / VIRTIO_BLK_S_IOERR after `VIRTIO_BLK_F_RO` was advertised (vhost-user).
//! Its view (the snapshot's map, replayed from its TLogs) is built on first lookup and cached
//! until the snapshot or its volume goes away; NBD_OPT_LIST shows the snapshots that are on
//! the backend.
//!
//! Building a view reads the snapshot's TLogs from the backend, which during a backend outage
//! takes as long as the backend's retry budget (30 s on S3 by default); so does rebuilding its
//! map after a scrub or rollback, which a `BLOCK_STATUS` does before it answers (a read that
//! would do it goes to the backend-read pool instead, `try_read`). Lookups come from the NBD
//! and edge handshakes, and block status from NBD connections: tasks on the node's runtime. So
//! a build holds no lock (another client's lookup of a view already built, or of another
//! snapshot, does not queue behind it) and runs in `block_in_place` ([`off_worker`]): the
//! runtime hands this worker's other tasks (every NBD connection it was serving) to another
//! thread meanwhile, instead of stalling them; with a build per worker, the whole node's NBD
//! service would otherwise stop until the backend answered. Clients that ask for a view while
//! it is being built wait for that build ([`Build`]) instead of reading the same TLogs again:
//! during an outage, ten clients of one snapshot cost the backend one build, not ten. (They
//! wait on a condition, not on a lock held across the reads.) (A write that must first read its
//! cluster from the backend is the frontends' to place: `VolumeExport` says which ones,
//! `BlockTarget::write_reads_backend`, and they run them on the blocking pool.)
//!
//! Allow lists: [`Exports::allows`] checks the NBD client against the volume's persisted allow
//! list (`vstor_volumedriver::access` has the rule); a snapshot export `VOL@SNAP` follows the
//! list of `VOL`, since it exposes the same data.
//!
//! [`VolumeExport`] times every request it serves into the volume's latency histograms
//! (`vstor_volumedriver::latency`), for `/metrics`, `vstor volume stats` and `vstor top`: from
//! the call to the acknowledgement, a sync DTL round trip included. A read that would block is
//! timed when it is served on the backend-read pool.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use std::time::Instant;
use vstor_edge::{
    BlockTarget, Client, ExportRegistry, Extent, PendingAck, ReadAttempt, TargetError, WriteAck,
};

use vstor_volumedriver::latency::IoOp;
use vstor_volumedriver::{SnapshotView, Volume, VolumeError, VolumeManager, WriteOutcome};

pub struct VolumeExport(pub Arc<Volume>);

fn target_error(err: VolumeError) -> TargetError {
    match err {
        VolumeError::OutOfRange {
            offset, len, size, ..
        } => TargetError::OutOfRange { offset, len, size },
        VolumeError::ReadOnly { .. } => TargetError::ReadOnly,
        VolumeError::Stopped { .. } | VolumeError::NotFound { .. } => TargetError::Shutdown,
        other => TargetError::Io(other.to_string()),
    }
}

fn attempt(attempt: vstor_volumedriver::ReadAttempt) -> ReadAttempt {
    match attempt {
        vstor_volumedriver::ReadAttempt::Done => ReadAttempt::Done,
        vstor_volumedriver::ReadAttempt::WouldBlock => ReadAttempt::WouldBlock,
    }
}

fn ack(outcome: WriteOutcome) -> WriteAck {
    WriteAck {
        throttle: outcome.throttle,
        pending: None,
    }
}

impl BlockTarget for VolumeExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        self.0.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let started = Instant::now();
        let result = self.0.read(offset, buf).map_err(target_error);
        self.0.record_latency(IoOp::Read, started.elapsed());
        result
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt, TargetError> {
        let started = Instant::now();
        let result = self
            .0
            .try_read(offset, buf)
            .map(attempt)
            .map_err(target_error);
        if !matches!(result, Ok(ReadAttempt::WouldBlock)) {
            self.0.record_latency(IoOp::Read, started.elapsed());
        }
        result
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteAck, TargetError> {
        let started = Instant::now();
        if fua {
            let result = self
                .0
                .write(offset, data, true)
                .map(ack)
                .map_err(target_error);
            self.0.record_latency(IoOp::Write, started.elapsed());
            return result;
        }
        let (outcome, dtl) = self.0.write_deferred(offset, data).map_err(target_error)?;
        let mut write_ack = ack(outcome);
        match dtl {
            None => self.0.record_latency(IoOp::Write, started.elapsed()),
            Some(ticket) => {
                let volume = self.0.clone();
                write_ack.pending = Some(Box::pin(async move {
                    let result = ticket
                        .wait()
                        .await
                        .map_err(|reason| target_error(volume.dtl_fenced(reason)))
                        // Fenced while the DTL round trip was in flight: not acknowledged.
                        .and_then(|()| volume.check_fence().map_err(target_error));
                    volume.record_latency(IoOp::Write, started.elapsed());
                    result
                }) as PendingAck);
            }
        }
        Ok(write_ack)
    }

    fn write_waits(&self, len: usize) -> bool {
        vstor_volumedriver::Volume::write_waits_for_device(len)
    }

    fn write_reads_backend(&self, offset: u64, len: u64) -> bool {
        self.0.write_may_read_backend(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<WriteAck, TargetError> {
        let started = Instant::now();
        let result = self
            .0
            .discard(offset, len)
            .map(|()| WriteAck::default())
            .map_err(target_error);
        self.0.record_latency(IoOp::Discard, started.elapsed());
        result
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteAck, TargetError> {
        let started = Instant::now();
        let result = self
            .0
            .write_zeroes(offset, len, allocate, fua)
            .map(ack)
            .map_err(target_error);
        self.0.record_latency(IoOp::Write, started.elapsed());
        result
    }

    fn flush(&self) -> Result<(), TargetError> {
        let started = Instant::now();
        let result = self.0.flush().map_err(target_error);
        self.0.record_latency(IoOp::Flush, started.elapsed());
        result
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, TargetError> {
        Ok(self
            .0
            .block_status(offset, len)
            .map_err(target_error)?
            .into_iter()
            .map(|(length, hole)| Extent { length, hole })
            .collect())
    }
}

/// A snapshot as a read-only block device.
pub struct SnapshotExport(pub Arc<SnapshotView>);

impl BlockTarget for SnapshotExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        self.0.read(offset, buf).map_err(target_error)
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt, TargetError> {
        self.0
            .try_read(offset, buf)
            .map(attempt)
            .map_err(target_error)
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<WriteAck, TargetError> {
        Err(TargetError::ReadOnly)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<WriteAck, TargetError> {
        Err(TargetError::ReadOnly)
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _allocate: bool,
        _fua: bool,
    ) -> Result<WriteAck, TargetError> {
        Err(TargetError::ReadOnly)
    }

    fn flush(&self) -> Result<(), TargetError> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, TargetError> {
        // After a scrub or rollback the view's map is rebuilt from the backend first: like a
        // view's first build, off the runtime's worker (module docs).
        let status = || self.0.block_status(offset, len);
        let runs = if self.0.map_is_current() {
            status()
        } else {
            off_worker(status)
        };
        Ok(runs
            .map_err(target_error)?
            .into_iter()
            .map(|(length, hole)| Extent { length, hole })
            .collect())
    }
}

/// Splits `VOLUME@SNAPSHOT`.
pub fn snapshot_export_name(name: &str) -> Option<(&str, &str)> {
    name.split_once('@')
        .filter(|(volume, snapshot)| !volume.is_empty() && !snapshot.is_empty())
}

/// The volume an export name serves: `VOLUME` of `VOLUME@SNAPSHOT`, else the name itself.
pub fn export_volume(name: &str) -> &str {
    snapshot_export_name(name).map_or(name, |(volume, _)| volume)
}

/// Cached views beyond which the ones no client holds are dropped (each holds a map of the
/// snapshot: about 2 MiB per GiB written).
const MAX_IDLE_VIEWS: usize = 16;

/// A cached snapshot view and what identifies the snapshot it was built for (a snapshot deleted
/// and re-created under the same name is a different one).
struct CachedView {
    view: Arc<SnapshotView>,
    tlog: u64,
    created: u64,
}

/// What a view's build came to: the view and the snapshot it was built for (its TLog and
/// creation time), or why it failed.
type Built = Result<(Arc<SnapshotView>, u64, u64), String>;

/// A view being built: what the build came to, once it has, for the clients that asked
/// meanwhile.
#[derive(Default)]
struct Build {
    outcome: Mutex<Option<Built>>,
    done: Condvar,
}

impl Build {
    fn finish(&self, outcome: Built) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        self.done.notify_all();
    }

    fn wait(&self) -> Built {
        let mut outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = outcome.as_ref() {
                return outcome.clone();
            }
            outcome = self
                .done
                .wait(outcome)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The builder's part: ends the build for everyone, also when the build panics or returns
/// early, and takes it out of the table.
struct Building<'a> {
    exports: &'a Exports,
    key: String,
    build: Arc<Build>,
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        let mut building = self
            .exports
            .building
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if building
            .get(&self.key)
            .is_some_and(|b| Arc::ptr_eq(b, &self.build))
        {
            building.remove(&self.key);
        }
        drop(building);
        let mut outcome = self
            .build
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if outcome.is_none() {
            *outcome = Some(Err("the build was abandoned".into()));
            self.build.done.notify_all();
        }
    }
}

/// The node's exports: volumes and their snapshots.
pub struct Exports {
    manager: Arc<VolumeManager>,
    views: Mutex<HashMap<String, CachedView>>,
    /// Views being built, by export name (see the module docs).
    building: Mutex<HashMap<String, Arc<Build>>>,
}

impl Exports {
    pub fn new(manager: Arc<VolumeManager>) -> Self {
        Self {
            manager,
            views: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
        }
    }

    pub fn manager(&self) -> &Arc<VolumeManager> {
        &self.manager
    }

    fn lock_views(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedView>> {
        self.views.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The read-only view of `volume@snapshot`, cached. A view not cached yet is built without
    /// the cache's lock and off the runtime's worker, once for all the clients that ask for it
    /// meanwhile (module docs).
    pub fn snapshot_view(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<Arc<SnapshotView>, VolumeError> {
        let source = self.manager.get(volume)?;
        let info = source.snapshot(snapshot)?;
        let key = format!("{volume}@{snapshot}");
        let cached = |views: &HashMap<String, CachedView>| {
            views
                .get(&key)
                .filter(|cached| {
                    Arc::ptr_eq(cached.view.volume(), &source)
                        && cached.tlog == info.tlog
                        && cached.created == info.created
                })
                .map(|cached| cached.view.clone())
        };
        let (build, mine) = {
            let mut building = self.building.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked under this table's lock: a builder caches its view before it leaves the
            // table, so a build cannot end unseen between the check and the table (lock
            // order: this table, then the views).
            if let Some(view) = cached(&self.lock_views()) {
                return Ok(view);
            }
            match building.get(&key) {
                Some(build) => (build.clone(), false),
                None => {
                    let build = Arc::new(Build::default());
                    building.insert(key.clone(), build.clone());
                    (build, true)
                }
            }
        };
        if !mine {
            return match off_worker(|| build.wait()) {
                // Built for this very snapshot (not one deleted and re-created meanwhile).
                Ok((view, tlog, created))
                    if Arc::ptr_eq(view.volume(), &source)
                        && (tlog, created) == (info.tlog, info.created) =>
                {
                    Ok(view)
                }
                Ok(_) => Err(VolumeError::Refused {
                    volume: volume.to_string(),
                    reason: format!("snapshot {snapshot:?} changed while its view was built"),
                }),
                Err(reason) => Err(VolumeError::Refused {
                    volume: volume.to_string(),
                    reason: format!(
                        "the view of snapshot {snapshot:?} could not be built: {reason}"
                    ),
                }),
            };
        }
        let building = Building {
            exports: self,
            key: key.clone(),
            build,
        };
        let view = match off_worker(|| source.snapshot_view(snapshot)) {
            Ok(view) => Arc::new(view),
            Err(e) => {
                building.build.finish(Err(e.to_string()));
                return Err(e);
            }
        };
        // Cached before the build ends: a client asking from then on finds it there.
        let view = {
            let mut views = self.lock_views();
            match cached(&views) {
                // Another client's copy (built before this build started): keep one map.
                Some(view) => view,
                None => {
                    if views.len() >= MAX_IDLE_VIEWS {
                        // Drop the views no client uses any more.
                        views.retain(|_, cached| Arc::strong_count(&cached.view) > 1);
                    }
                    views.insert(
                        key,
                        CachedView {
                            view: view.clone(),
                            tlog: info.tlog,
                            created: info.created,
                        },
                    );
                    view
                }
            }
        };
        building
            .build
            .finish(Ok((view.clone(), info.tlog, info.created)));
        Ok(view)
    }

    /// Drop cached views of `volume` (all of them, or of one snapshot).
    pub fn forget(&self, volume: &str, snapshot: Option<&str>) {
        let mut views = self.lock_views();
        views.retain(|key, _| match (snapshot_export_name(key), snapshot) {
            (Some((v, _)), None) => v != volume,
            (Some((v, s)), Some(snapshot)) => v != volume || s != snapshot,
            (None, _) => true,
        });
    }
}

/// Run `f`, which may wait on the backend for a long time, without holding up the other tasks of
/// the tokio worker thread calling it: on a multi-thread runtime, in `block_in_place` (on a
/// worker, its queue moves to another thread until `f` returns; on the blocking pool or a plain
/// thread such as a vhost-user queue's, `f` just runs); on a current-thread runtime, where
/// `block_in_place` would panic, `f` runs as it is.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl ExportRegistry for Exports {
    fn allows(&self, name: &str, client: &Client) -> bool {
        let volume = export_volume(name);
        match self.manager.get(volume) {
            Ok(volume) => volume
                .access()
                .allows(client.addr.ip(), client.subject.as_deref()),
            // Unknown: `lookup` answers it as such.
            Err(_) => true,
        }
    }

    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>> {
        if let Some((volume, snapshot)) = snapshot_export_name(name) {
            return match self.snapshot_view(volume, snapshot) {
                Ok(view) => Some(Arc::new(SnapshotExport(view)) as Arc<dyn BlockTarget>),
                Err(e) => {
                    tracing::debug!(export = name, error = %e, "snapshot export lookup failed");
                    None
                }
            };
        }
        self.manager
            .get(name)
            .ok()
            .map(|volume| Arc::new(VolumeExport(volume)) as Arc<dyn BlockTarget>)
    }

    fn list(&self) -> Vec<String> {
        let mut names = Vec::new();
        for name in self.manager.names() {
            let Ok(volume) = self.manager.get(&name) else {
                continue;
            };
            names.push(name.clone());
            names.extend(
                volume
                    .snapshots()
                    .into_iter()
                    .filter(|s| s.in_backend)
                    .map(|s| format!("{name}@{}", s.name)),
            );
        }
        names
    }
}
