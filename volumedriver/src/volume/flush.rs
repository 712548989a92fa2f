//! FLUSH: make every completed write durable in the write buffer, with the fsyncs outside the
//! state lock (see "FLUSH" in the `volume` module docs).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Result, VolumeError};
use crate::types::ScoName;
use crate::wbfs::WbFile;

use super::state::{sco_path, State, SCO_DIR, TLOG_DIR};
use super::Volume;

impl Volume {
    /// Make every write completed before this call durable: in the write buffer, and on the DTL
    /// when the volume has one.
    pub fn flush(&self) -> Result<()> {
        self.check_fence()?;
        let dtl = self.dtl_flush_ticket();
        self.flush_local()?;
        if let Some(ticket) = dtl {
            self.dtl_wait(ticket)?;
        }
        // Fenced while flushing: not acknowledged (another node may be taking over).
        self.check_fence()
    }

    fn flush_local(&self) -> Result<()> {
        let _serial = self.flush_lock.lock();
        let (files, dirs, point, reserved) = {
            let mut st = self.state.lock();
            self.check_usable(&st)?;
            self.check_fence()?;
            let mut files: Vec<(Arc<dyn WbFile>, PathBuf)> = Vec::new();
            let mut dirs: Vec<PathBuf> = Vec::new();
            for (number, local) in st.scos.iter_mut().filter(|(_, s)| s.dirty) {
                local.dirty = false;
                files.push((
                    local.file.clone(),
                    sco_path(&self.dir, ScoName::new(*number)),
                ));
            }
            for closed in st.closed_tlogs.iter_mut().filter(|t| t.dirty) {
                closed.dirty = false;
                files.push((closed.file.clone(), closed.path.clone()));
            }
            if std::mem::take(&mut st.meta_unsynced) {
                if let Some(log) = st.meta_log.clone() {
                    files.push((log, self.dir.join("snapshots.log")));
                }
            }
            if std::mem::take(&mut st.new_files) {
                dirs = vec![
                    self.dir.join(SCO_DIR),
                    self.dir.join(TLOG_DIR),
                    self.dir.clone(),
                ];
            }
            let last_sync = st.last_sync;
            let mut point = None;
            let mut failure = None;
            if let Some(tlog) = st
                .tlog
                .as_mut()
                .filter(|t| t.writer.has_entries_after(last_sync))
            {
                match tlog.writer.write_out() {
                    Ok(()) => point = Some(tlog.writer.sync_point()),
                    Err(e) => {
                        failure = Some(VolumeError::io(
                            &self.name,
                            tlog.writer.path().to_path_buf(),
                        )(e));
                    }
                }
            }
            if let Some(err) = failure {
                self.halt(&mut st, err.to_string());
                return Err(err);
            }
            if files.is_empty() && dirs.is_empty() && point.is_none() {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            st.flush_in_progress = true;
            (files, dirs, point, self.inflight.issued())
        };
        // Writes reserved before the SYNC point copy their data without the lock: wait for
        // them before the fsyncs the SYNC vouches for (see `inflight`).
        let copied = self
            .inflight
            .wait_through(reserved)
            .map_err(|reason| VolumeError::Halted {
                volume: self.name.clone(),
                reason,
            });
        let synced = copied.and_then(|()| {
            files.iter().try_for_each(|(file, path)| {
                file.sync_data().map_err(VolumeError::io(&self.name, path))
            })
        });
        let synced = synced.and_then(|()| {
            dirs.iter().try_for_each(|dir| {
                self.fs
                    .sync_dir(dir)
                    .map_err(VolumeError::io(&self.name, dir))
            })
        });
        let mut st = self.state.lock();
        st.flush_in_progress = false;
        if let Err(err) = synced {
            // After a failed fsync the page cache may have dropped the data: never pretend.
            self.halt(&mut st, err.to_string());
            return Err(err);
        }
        let mut tlog_file = None;
        let mut failure = None;
        if let (Some(point), Some(tlog)) = (point, st.tlog.as_mut()) {
            if tlog.writer.number() == point.number {
                let path = tlog.writer.path().to_path_buf();
                match tlog.writer.append_sync(point) {
                    Ok(()) => tlog_file = Some((tlog.writer.file().clone(), path, point)),
                    Err(e) => failure = Some(VolumeError::io(&self.name, path)(e)),
                }
            }
        }
        if let Some(err) = failure {
            self.halt(&mut st, err.to_string());
            return Err(err);
        }
        if let Some((_, _, point)) = &tlog_file {
            st.last_sync = Some(*point);
        }
        if st.roll_pending {
            self.close_tlog(&mut st)?;
        }
        drop(st);
        if let Some((file, path, _)) = tlog_file {
            if let Err(e) = file.sync_data() {
                return self.halt_with(VolumeError::io(&self.name, path)(e));
            }
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Seal the open SCO and close the current TLog so that everything written so far is queued
    /// for upload (clean shutdown; later, snapshots).
    pub fn close_current_tlog(&self) -> Result<()> {
        let _serial = self.flush_lock.lock();
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        if self.has_unclosed_data(&st) {
            self.close_tlog(&mut st)?;
        }
        Ok(())
    }

    /// Whether the current TLog or open SCO holds anything not yet queued for upload.
    pub(super) fn has_unclosed_data(&self, st: &State) -> bool {
        st.tlog
            .as_ref()
            .is_some_and(|t| t.writer.data_entries() > 0 || !t.scos.is_empty())
            || st.open_sco.as_ref().is_some_and(|o| o.clusters > 0)
    }
}
