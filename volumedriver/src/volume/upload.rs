//! The upload pipeline: one step at a time ([`Volume::upload_one`]) in queue order, the uncork
//! that makes a TLog's SCOs disposable once the TLog is on the backend, and the backend TLog list
//! puts.
//!
//! Backend puts run under `upload_lock` (one step at a time) and `list_lock` (list puts), never
//! under the state lock; see the lock order in the `volume` module docs.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vstor_backend::{BackendError, ObjectStore};

use crate::config::{TLogList, TLogRecord, TLOG_LIST_OBJECT};
use crate::error::{Result, VolumeError};
use crate::sco::{self, SCO_HEADER_LEN};
use crate::tlog;
use crate::types::{ScoName, ScoNumber, TLogNumber};
use crate::wbfs::WbFile;

use super::state::{sco_path, ClosedTLog, ScoState, State};
use super::Volume;

/// One step of the upload pipeline, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadTask {
    Sco(ScoNumber),
    TLog(TLogNumber),
}

/// Reads the first `len` bytes of a SCO file with positional reads and computes the CRC32C of
/// its data (everything after the header) on the way: the upload of a SCO whose write buffer has
/// no real path (a simulated one), streamed with `put_from`.
struct ScoReader<'a> {
    file: &'a dyn WbFile,
    offset: u64,
    len: u64,
    crc: u32,
}

impl std::io::Read for ScoReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.offset)) as usize;
        self.file.read_exact_at(&mut buf[..n], self.offset)?;
        let data_start = SCO_HEADER_LEN.saturating_sub(self.offset).min(n as u64) as usize;
        self.crc = crc32c::crc32c_append(self.crc, &buf[data_start..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

/// The backend chunk CRCs of the first `len` bytes of a SCO file (header included) and the
/// CRC32C of its data (after the header), in one read.
fn sco_chunk_crcs(file: &dyn WbFile, len: u64) -> std::io::Result<(Vec<u32>, u32)> {
    let mut header = vec![0u8; SCO_HEADER_LEN.min(len) as usize];
    file.read_exact_at(&mut header, 0)?;
    let mut crcs = vstor_backend::ChunkCrcs::with_prefix(&header);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = header.len() as u64;
    while offset < len {
        let n = ((len - offset) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], offset)?;
        crcs.append(&buf[..n]);
        offset += n as u64;
    }
    Ok((crcs.chunk_crcs(), crcs.data_crc()))
}

/// The next upload step, as [`plan_upload`] decides it from the state alone.
enum UploadJob {
    /// The queue is empty but the backend TLog list lacks a metadata change.
    PutList,
    Sco {
        number: ScoNumber,
        file: Arc<dyn WbFile>,
        clusters: u64,
        crc: u32,
        chunk_crcs: Option<Arc<[u32]>>,
        /// The newest write reservation into the file: waited for before it is read.
        written_by: u64,
    },
    TLog {
        number: TLogNumber,
        file: Arc<dyn WbFile>,
        path: PathBuf,
        record: TLogRecord,
    },
}

/// A planned step and what its puts need: where they go, and the list generation (`epoch`) the
/// step was planned against.
struct UploadPlan {
    job: UploadJob,
    namespace: String,
    owner: u64,
    epoch: u64,
}

/// Decide the next upload step (pure: no I/O). `Ok(None)` when there is nothing to do. An error
/// means the volume must halt: it is halted already, or the queue contradicts the state.
fn plan_upload(volume: &str, st: &State) -> Result<Option<UploadPlan>> {
    if let Some(reason) = &st.halted {
        return Err(VolumeError::Halted {
            volume: volume.to_string(),
            reason: reason.clone(),
        });
    }
    let job = match st.uploads.front() {
        None if st.list_dirty => UploadJob::PutList,
        None => return Ok(None),
        Some(UploadTask::Sco(number)) => {
            let object = || ScoName::new(*number).to_string();
            match st.scos.get(number) {
                Some(local) => match local.state {
                    ScoState::Sealed { crc } => UploadJob::Sco {
                        number: *number,
                        file: local.file.clone(),
                        clusters: local.clusters,
                        crc,
                        chunk_crcs: local.chunk_crcs.clone(),
                        written_by: local.last_write,
                    },
                    _ => {
                        return Err(VolumeError::corrupt(
                            volume,
                            object(),
                            "queued for upload but not sealed",
                        ))
                    }
                },
                None => {
                    return Err(VolumeError::corrupt(
                        volume,
                        object(),
                        "queued for upload but missing from the write buffer",
                    ))
                }
            }
        }
        Some(UploadTask::TLog(number)) => {
            match st.closed_tlogs.iter().find(|t| t.number == *number) {
                Some(closed) => UploadJob::TLog {
                    number: *number,
                    file: closed.file.clone(),
                    path: closed.path.clone(),
                    record: closed.record.clone(),
                },
                None => {
                    return Err(VolumeError::corrupt(
                        volume,
                        number.object_name(),
                        "queued for upload but not a closed local TLog",
                    ))
                }
            }
        }
    };
    Ok(Some(UploadPlan {
        job,
        namespace: st.config.namespace.clone(),
        owner: st.config.owner_tag,
        epoch: st.epoch,
    }))
}

/// Record a completed step (pure): it leaves the queue (unless a rollback rebuilt the queue
/// meanwhile), and a TLog is uncorked: its SCOs become disposable and it leaves the closed
/// TLogs. Returns the uncorked TLog, whose local file the caller deletes.
fn complete_upload(st: &mut State, done: UploadTask, cluster_size: u64) -> Option<ClosedTLog> {
    st.last_upload_error = None;
    if st.uploads.front() == Some(&done) {
        st.uploads.pop_front();
    }
    let UploadTask::TLog(number) = done else {
        return None;
    };
    let position = st.closed_tlogs.iter().position(|t| t.number == number)?;
    let closed = st.closed_tlogs.remove(position)?;
    for sco in &closed.record.scos {
        if let Some(local) = st.scos.get_mut(&ScoNumber(*sco)) {
            local.state = ScoState::Disposable;
            local.dirty = false;
            let bytes = local.clusters * cluster_size;
            st.non_disposable_bytes = st.non_disposable_bytes.saturating_sub(bytes);
            st.disposable_bytes += bytes + SCO_HEADER_LEN;
        }
    }
    Some(closed)
}

impl Volume {
    /// Perform the next upload step, if any. Returns whether there was one. On a transient
    /// backend error the step stays queued and the error is returned; the caller retries.
    ///
    /// Plan ([`plan_upload`], under the state lock), execute (the backend I/O, without it), then
    /// complete ([`complete_upload`], under the lock again).
    ///
    /// A fenced volume uploads nothing (`Err(Fenced)`; the scheduler leaves it idle until the
    /// fence lifts). Another node may own it by now, and its puts would be judged by the owner
    /// tag alone: after a delete and a re-create of the same name, the new volume starts at the
    /// same tag as this one may hold, and a pending SCO or TLog of this node would overwrite the
    /// new volume's object of the same name. Nothing is lost by waiting: what is not on the
    /// backend is in the DTL, which the adopter replays, and a fence that lifts because the
    /// volume is still ours resumes the uploads.
    pub fn upload_one(&self) -> Result<bool> {
        let _step = self.upload_lock.lock();
        self.check_fence()?;
        let plan = plan_upload(&self.name, &self.state.lock());
        let plan = match plan {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(false),
            Err(err) => return self.halt_with(err),
        };
        let Some(done) = self.execute_upload(plan)? else {
            return Ok(true);
        };
        let mut st = self.state.lock();
        let uncorked = complete_upload(&mut st, done, self.cluster_size);
        if let Some(closed) = &uncorked {
            self.dtl_uncorked(&mut st, &closed.record);
        }
        if st.uploads.is_empty() {
            self.upload_work.notify_all();
        }
        drop(st);
        if let Some(closed) = uncorked {
            self.notify_uncorked(&closed.record, &closed.path);
            if let Err(e) = self.fs.remove(&closed.path) {
                tracing::warn!(volume = %self.name, path = %closed.path.display(), error = %e, "could not remove uploaded TLog");
            }
        }
        Ok(true)
    }

    /// The I/O of one planned step. Returns the task to complete, or `None` when there is
    /// nothing to complete (a list put; a TLog whose list was rewritten meanwhile).
    fn execute_upload(&self, plan: UploadPlan) -> Result<Option<UploadTask>> {
        let UploadPlan {
            job,
            namespace,
            owner,
            epoch,
        } = plan;
        let upload =
            |object: &str,
             store_op: &mut dyn FnMut(&dyn ObjectStore, &str) -> vstor_backend::Result<()>|
             -> Result<()> {
                match store_op(self.backend.as_ref(), object) {
                    Ok(()) => Ok(()),
                    Err(e @ BackendError::Fenced { .. }) => {
                        self.halt_with(VolumeError::backend(&self.name)(e))
                    }
                    Err(e) => {
                        self.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
                        let err = VolumeError::backend(&self.name)(e);
                        self.state.lock().last_upload_error = Some(err.to_string());
                        Err(err)
                    }
                }
            };
        let put = |object: &str, bytes: &[u8]| -> Result<()> {
            upload(object, &mut |store: &dyn ObjectStore, object: &str| {
                store.put_if_owner(&namespace, object, bytes, owner)
            })
        };
        match job {
            UploadJob::PutList => {
                self.put_backend_list()?;
                Ok(None)
            }
            UploadJob::Sco {
                number,
                file,
                clusters,
                crc,
                chunk_crcs,
                written_by,
            } => {
                let name = ScoName::new(number);
                let path = sco_path(&self.dir, name);
                // The last writes into it may still be copying their data (see `inflight`).
                if let Err(reason) = self.inflight.wait_through(written_by) {
                    return Err(VolumeError::Halted {
                        volume: self.name.clone(),
                        reason,
                    });
                }
                let len = sco::cluster_offset(clusters, self.cluster_size);
                let corrupt = |reason: String| {
                    self.halt_with(VolumeError::corrupt(
                        &self.name,
                        path.display().to_string(),
                        reason,
                    ))
                };
                // The write-buffer copy is made durable first: once its TLog is on the backend
                // it is a cached copy that restart keeps and reads from, so a power cut must not
                // leave it shorter or older than the backend's (the power-cut model test found
                // this). On the local store `put_file` below syncs this same inode anyway.
                if let Err(e) = file.sync_data() {
                    return self.halt_with(VolumeError::io(&self.name, &path)(e));
                }
                let Some(real_path) = self.fs.real_path(&path) else {
                    // A write buffer without real files (a simulated one): stream through it,
                    // checking the data CRC on the way; a mismatch deletes the object again (no
                    // TLog references it yet) and halts the volume.
                    let mut reader = ScoReader {
                        file: file.as_ref(),
                        offset: 0,
                        len,
                        crc: 0,
                    };
                    upload(
                        &name.to_string(),
                        &mut |store: &dyn ObjectStore, object: &str| {
                            store.put_from(&namespace, object, len, &mut reader, owner)
                        },
                    )?;
                    if reader.crc != crc {
                        let _ = self
                            .backend
                            .delete_if_owner(&namespace, &name.to_string(), owner);
                        return corrupt(
                            "data does not match the CRC recorded when it was sealed".into(),
                        );
                    }
                    self.stats.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                    self.stats.uploaded_scos.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(UploadTask::Sco(number)));
                };
                // The chunk CRCs come from the write path; only a SCO restored after a restart
                // is read (once) to compute them, checked against the CRC its TLog recorded.
                let chunk_crcs = match chunk_crcs {
                    Some(crcs) => crcs,
                    None => match sco_chunk_crcs(file.as_ref(), len) {
                        Ok((crcs, data_crc)) if data_crc == crc => crcs.into(),
                        Ok(_) => {
                            return corrupt(
                                "data does not match the CRC recorded when it was sealed".into(),
                            )
                        }
                        Err(e) => return self.halt_with(VolumeError::io(&self.name, &path)(e)),
                    },
                };
                // `put_file` makes the backend's copy durable (on the local store it *is* this
                // file, hard-linked), and restart verifies every not-yet-uploaded SCO against
                // its CRC. A store that copies the bytes checks them against the chunk CRCs in
                // the one pass it reads them in; a file changed since it was sealed is refused,
                // nothing is stored, and the volume halts. A local store that links the file
                // stores it with these CRCs unread, and its reads check them.
                let stored = upload(
                    &name.to_string(),
                    &mut |store: &dyn ObjectStore, object: &str| {
                        store.put_file(
                            &namespace,
                            object,
                            &real_path,
                            len,
                            Some(&chunk_crcs),
                            owner,
                        )
                    },
                );
                if let Err(VolumeError::Backend {
                    source: BackendError::Corrupt { reason, .. },
                    ..
                }) = &stored
                {
                    return corrupt(format!(
                        "data does not match the chunk CRCs recorded when it was sealed: {reason}"
                    ));
                }
                stored?;
                self.stats.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                self.stats.uploaded_scos.fetch_add(1, Ordering::Relaxed);
                Ok(Some(UploadTask::Sco(number)))
            }
            UploadJob::TLog {
                number,
                file,
                path,
                record,
            } => {
                let mut bytes = Vec::new();
                let read = file.sync_data().and_then(|()| {
                    let len = file.size()?;
                    bytes.resize(len as usize, 0);
                    file.read_exact_at(&mut bytes, 0)
                });
                if let Err(e) = read {
                    return self.halt_with(VolumeError::io(&self.name, path)(e));
                }
                if let Err(reason) = tlog::parse(&bytes, true) {
                    return self.halt_with(VolumeError::corrupt(
                        &self.name,
                        path.display().to_string(),
                        reason,
                    ));
                }
                put(&record.object_name(), &bytes)?;
                let _list = self.list_lock.lock();
                let (list, changes) = {
                    let st = self.state.lock();
                    if st.epoch != epoch {
                        // A rollback or scrub rewrote the list meanwhile; the queue was rebuilt.
                        return Ok(None);
                    }
                    let mut list = Self::backend_list(&st);
                    list.tlogs.push(record.clone());
                    (list, st.list_changes)
                };
                put(TLOG_LIST_OBJECT, &list.encode())?;
                let mut st = self.state.lock();
                st.backend_tlogs.tlogs.push(record);
                if st.list_changes == changes {
                    st.list_dirty = false;
                }
                drop(st);
                self.stats.uploaded_tlogs.fetch_add(1, Ordering::Relaxed);
                Ok(Some(UploadTask::TLog(number)))
            }
        }
    }

    /// Bytes of SCO data uploaded since the volume was opened.
    pub fn uploaded_bytes(&self) -> u64 {
        self.stats.uploaded_bytes.load(Ordering::Relaxed)
    }

    /// Run upload steps until the queue is empty (tests, clean shutdown).
    pub fn drain_uploads(&self) -> Result<()> {
        while self.upload_one()? {}
        Ok(())
    }

    /// Number of queued upload steps.
    pub fn pending_uploads(&self) -> usize {
        self.state.lock().uploads.len()
    }

    /// Block until the upload queue is empty, the volume halts, or `deadline` passes. Returns
    /// whether everything was uploaded.
    pub fn wait_for_uploads(&self, deadline: std::time::Instant) -> bool {
        let mut st = self.state.lock();
        while (!st.uploads.is_empty() || st.list_dirty) && st.halted.is_none() {
            if self.upload_work.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.uploads.is_empty() && !st.list_dirty
    }

    /// The full backend TLog list: uploaded TLogs plus the current snapshot metadata.
    pub(super) fn backend_list(st: &State) -> TLogList {
        TLogList {
            tlogs: st.backend_tlogs.tlogs.clone(),
            snapshots: st.meta.snapshots.clone(),
            dropped: st.meta.dropped.clone(),
            dtl_floor: st.meta.dtl_floor,
        }
    }

    /// Put the backend TLog list as the state says it is now.
    pub(super) fn put_backend_list(&self) -> Result<()> {
        let _list = self.list_lock.lock();
        let (list, namespace, owner, changes) = {
            let st = self.state.lock();
            (
                Self::backend_list(&st),
                st.config.namespace.clone(),
                st.config.owner_tag,
                st.list_changes,
            )
        };
        match self
            .backend
            .put_if_owner(&namespace, TLOG_LIST_OBJECT, &list.encode(), owner)
        {
            Ok(()) => {
                let mut st = self.state.lock();
                if st.list_changes == changes {
                    st.list_dirty = false;
                }
                drop(st);
                self.upload_work.notify_all();
                Ok(())
            }
            Err(e @ vstor_backend::BackendError::Fenced { .. }) => {
                self.halt_with(VolumeError::backend(&self.name)(e))
            }
            Err(e) => Err(VolumeError::backend(&self.name)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::testing::{add_closed_tlog, add_sco, state, CLUSTER};
    use super::*;

    fn job(st: &State) -> Option<UploadJob> {
        plan_upload("unit", st)
            .expect("a consistent state plans")
            .map(|p| p.job)
    }

    #[test]
    fn plan_upload_is_idle_without_work_and_puts_a_dirty_list() {
        let mut st = state();
        assert!(job(&st).is_none());
        st.list_dirty = true;
        assert!(matches!(job(&st), Some(UploadJob::PutList)));
    }

    #[test]
    fn plan_upload_takes_the_queue_front() {
        let mut st = state();
        st.epoch = 7;
        add_sco(&mut st, 3, 5, ScoState::Sealed { crc: 0xabcd });
        add_closed_tlog(&mut st, 2, &[3]);
        st.uploads.push_back(UploadTask::Sco(ScoNumber(3)));
        st.uploads.push_back(UploadTask::TLog(TLogNumber(2)));
        // A dirty list waits for the queue: the TLog put rewrites the list anyway.
        st.list_dirty = true;
        let plan = plan_upload("unit", &st).unwrap().unwrap();
        assert_eq!((plan.epoch, plan.owner), (7, st.config.owner_tag));
        assert_eq!(plan.namespace, st.config.namespace);
        match plan.job {
            UploadJob::Sco {
                number,
                clusters,
                crc,
                ..
            } => assert_eq!((number, clusters, crc), (ScoNumber(3), 5, 0xabcd)),
            _ => panic!("expected the SCO first"),
        }
        st.uploads.pop_front();
        match job(&st) {
            Some(UploadJob::TLog { number, record, .. }) => {
                assert_eq!(number, TLogNumber(2));
                assert_eq!(record.scos, vec![3]);
            }
            _ => panic!("expected the TLog after its SCO"),
        }
    }

    #[test]
    fn plan_upload_refuses_a_queue_that_contradicts_the_state() {
        let mut st = state();
        add_sco(&mut st, 1, 1, ScoState::Open);
        st.uploads.push_back(UploadTask::Sco(ScoNumber(1)));
        let err = plan_upload("unit", &st)
            .err()
            .expect("an open SCO is not uploaded");
        assert!(err.to_string().contains("not sealed"), "{err}");

        st.uploads = [UploadTask::Sco(ScoNumber(9))].into();
        let err = plan_upload("unit", &st).err().expect("a missing SCO");
        assert!(err.to_string().contains("missing"), "{err}");

        st.uploads = [UploadTask::TLog(TLogNumber(4))].into();
        let err = plan_upload("unit", &st).err().expect("a missing TLog");
        assert!(err.to_string().contains("not a closed local TLog"), "{err}");

        st.halted = Some("test".into());
        st.uploads.clear();
        assert!(matches!(
            plan_upload("unit", &st),
            Err(VolumeError::Halted { .. })
        ));
    }

    #[test]
    fn complete_upload_uncorks_a_tlog_and_moves_its_bytes_to_disposable() {
        let mut st = state();
        add_sco(&mut st, 1, 4, ScoState::Sealed { crc: 1 });
        add_sco(&mut st, 2, 2, ScoState::Sealed { crc: 2 });
        add_sco(&mut st, 3, 1, ScoState::Open);
        add_closed_tlog(&mut st, 1, &[1, 2]);
        st.uploads = [UploadTask::TLog(TLogNumber(1))].into();
        st.last_upload_error = Some("earlier".into());

        let closed = complete_upload(&mut st, UploadTask::TLog(TLogNumber(1)), CLUSTER)
            .expect("the TLog is uncorked");
        assert_eq!(closed.number, TLogNumber(1));
        assert!(st.uploads.is_empty() && st.closed_tlogs.is_empty());
        assert_eq!(st.last_upload_error, None);
        for n in [1, 2] {
            assert_eq!(st.scos[&ScoNumber(n)].state, ScoState::Disposable);
            assert!(!st.scos[&ScoNumber(n)].dirty);
        }
        assert_eq!(st.scos[&ScoNumber(3)].state, ScoState::Open);
        assert_eq!(st.non_disposable_bytes, CLUSTER);
        assert_eq!(st.disposable_bytes, 6 * CLUSTER + 2 * SCO_HEADER_LEN);
    }

    #[test]
    fn complete_upload_leaves_a_rebuilt_queue_alone() {
        let mut st = state();
        add_sco(&mut st, 5, 1, ScoState::Sealed { crc: 0 });
        st.uploads = [UploadTask::Sco(ScoNumber(5))].into();
        // The step completed was planned before a rollback rebuilt the queue.
        assert!(complete_upload(&mut st, UploadTask::Sco(ScoNumber(4)), CLUSTER).is_none());
        assert_eq!(st.uploads.len(), 1);
        assert!(complete_upload(&mut st, UploadTask::TLog(TLogNumber(3)), CLUSTER).is_none());
        assert_eq!(st.uploads.len(), 1);
        assert!(complete_upload(&mut st, UploadTask::Sco(ScoNumber(5)), CLUSTER).is_none());
        assert!(st.uploads.is_empty());
        assert_eq!(st.scos[&ScoNumber(5)].state, ScoState::Sealed { crc: 0 });
    }
}
