//! The upload pipeline: one step at a time ([`Volume::upload_one`]) in queue order, the uncork
//! that makes a TLog's SCOs disposable once the TLog is on the backend, and the backend TLog list
//! puts.
//!
//! Backend puts run under `upload_lock` (one step at a time) and `list_lock` (list puts), never
//! under the state lock; see the lock order in the `volume` module docs.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vstor_backend::{BackendError, ObjectStore};

use crate::config::{TLogList, TLogRecord, TLOG_LIST_OBJECT};
use crate::error::{Result, VolumeError};
use crate::sco::{self, SCO_HEADER_LEN};
use crate::tlog;
use crate::types::{ScoName, ScoNumber, TLogNumber};

use super::state::{sco_path, ScoState, State};
use super::Volume;

/// One step of the upload pipeline, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadTask {
    Sco(ScoNumber),
    TLog(TLogNumber),
}

/// Reads a SCO file from the start with positional reads (leaving its cursor alone) and
/// computes the CRC32C of its data (everything after the header) on the way.
struct ScoReader<'a> {
    file: &'a File,
    offset: u64,
    crc: u32,
}

impl std::io::Read for ScoReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        let data_start = SCO_HEADER_LEN.saturating_sub(self.offset).min(n as u64) as usize;
        self.crc = crc32c::crc32c_append(self.crc, &buf[data_start..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

impl Volume {
    /// Perform the next upload step, if any. Returns whether there was one. On a transient
    /// backend error the step stays queued and the error is returned; the caller retries.
    pub fn upload_one(&self) -> Result<bool> {
        enum Job {
            Sco {
                number: ScoNumber,
                file: Arc<File>,
                clusters: u64,
                crc: u32,
            },
            TLog {
                number: TLogNumber,
                file: Arc<File>,
                path: PathBuf,
                record: TLogRecord,
            },
        }
        let _step = self.upload_lock.lock();
        let (job, namespace, owner, epoch) = {
            let st = self.state.lock();
            if let Some(reason) = &st.halted {
                return Err(VolumeError::Halted {
                    volume: self.name.clone(),
                    reason: reason.clone(),
                });
            }
            let job = match st.uploads.front() {
                None if st.list_dirty => {
                    drop(st);
                    self.put_backend_list()?;
                    return Ok(true);
                }
                None => return Ok(false),
                Some(UploadTask::Sco(number)) => match st.scos.get(number) {
                    Some(local) => match local.state {
                        ScoState::Sealed { crc } => Ok(Job::Sco {
                            number: *number,
                            file: local.file.clone(),
                            clusters: local.clusters,
                            crc,
                        }),
                        _ => Err(VolumeError::corrupt(
                            &self.name,
                            ScoName::new(*number).to_string(),
                            "queued for upload but not sealed",
                        )),
                    },
                    None => Err(VolumeError::corrupt(
                        &self.name,
                        ScoName::new(*number).to_string(),
                        "queued for upload but missing from the write buffer",
                    )),
                },
                Some(UploadTask::TLog(number)) => {
                    match st.closed_tlogs.iter().find(|t| t.number == *number) {
                        Some(closed) => Ok(Job::TLog {
                            number: *number,
                            file: closed.file.clone(),
                            path: closed.path.clone(),
                            record: closed.record.clone(),
                        }),
                        None => Err(VolumeError::corrupt(
                            &self.name,
                            number.object_name(),
                            "queued for upload but not a closed local TLog",
                        )),
                    }
                }
            };
            (
                job,
                st.config.namespace.clone(),
                st.config.owner_tag,
                st.epoch,
            )
        };
        let job = match job {
            Ok(job) => job,
            Err(err) => return self.halt_with(err),
        };
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
        let done = match job {
            Job::Sco {
                number,
                file,
                clusters,
                crc,
            } => {
                let name = ScoName::new(number);
                let path = sco_path(&self.dir, name);
                let len = sco::cluster_offset(clusters, self.cluster_size);
                // No fsync of the write-buffer copy first: the backend copy is made durable by
                // the put, and restart verifies every not-yet-uploaded SCO against its CRC. The
                // CRC is checked while streaming, in the same pass as the upload; a mismatch
                // deletes the object again (no TLog references it yet) and halts the volume.
                let mut reader = ScoReader {
                    file: &file,
                    offset: 0,
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
                    return self.halt_with(VolumeError::corrupt(
                        &self.name,
                        path.display().to_string(),
                        "data does not match the CRC recorded when it was sealed",
                    ));
                }
                self.stats.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                self.stats.uploaded_scos.fetch_add(1, Ordering::Relaxed);
                UploadTask::Sco(number)
            }
            Job::TLog {
                number,
                file,
                path,
                record,
            } => {
                let mut bytes = Vec::new();
                let read = file.sync_data().and_then(|()| {
                    let len = file.metadata()?.len();
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
                        return Ok(true);
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
                UploadTask::TLog(number)
            }
        };
        let mut st = self.state.lock();
        st.last_upload_error = None;
        if st.uploads.front() == Some(&done) {
            st.uploads.pop_front();
        }
        if let UploadTask::TLog(number) = done {
            self.uncork(&mut st, number);
        }
        if st.uploads.is_empty() {
            self.upload_work.notify_all();
        }
        Ok(true)
    }

    /// The TLog is on the backend: its SCOs become disposable and its local file goes.
    fn uncork(&self, st: &mut State, number: TLogNumber) {
        let Some(position) = st.closed_tlogs.iter().position(|t| t.number == number) else {
            return;
        };
        let Some(closed) = st.closed_tlogs.remove(position) else {
            return;
        };
        for sco in &closed.record.scos {
            if let Some(local) = st.scos.get_mut(&ScoNumber(*sco)) {
                local.state = ScoState::Disposable;
                local.dirty = false;
                let bytes = local.clusters * self.cluster_size;
                st.non_disposable_bytes = st.non_disposable_bytes.saturating_sub(bytes);
                st.disposable_bytes += bytes + SCO_HEADER_LEN;
            }
        }
        self.dtl_uncorked(st, &closed.record);
        if let Err(e) = fs::remove_file(&closed.path) {
            tracing::warn!(volume = %self.name, path = %closed.path.display(), error = %e, "could not remove uploaded TLog");
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

    /// Block until there is upload work, the volume stops, or `timeout` passes.
    pub fn wait_for_upload_work(&self, timeout: Duration) {
        let mut st = self.state.lock();
        if st.uploads.is_empty() && !st.list_dirty && !st.stopped {
            self.upload_work.wait_for(&mut st, timeout);
        }
    }

    /// Block for `timeout` or until the volume stops (upload retry back-off).
    pub fn pause(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.stopped && !self.upload_work.wait_until(&mut st, deadline).timed_out() {}
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
