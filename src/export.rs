//! Glue between the engine and the frontends: a [`Volume`] seen as an edge [`BlockTarget`], and
//! the node's volumes seen as an [`ExportRegistry`] (export name = volume name).

use std::sync::Arc;

use vstor_edge::{BlockTarget, ExportRegistry, Extent, PendingAck, TargetError, WriteAck};
use vstor_volumedriver::{Volume, VolumeError, VolumeManager, WriteOutcome};

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
        self.0.read(offset, buf).map_err(target_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteAck, TargetError> {
        if fua {
            return self
                .0
                .write(offset, data, true)
                .map(ack)
                .map_err(target_error);
        }
        let (outcome, dtl) = self.0.write_deferred(offset, data).map_err(target_error)?;
        let mut write_ack = ack(outcome);
        write_ack.pending = dtl.map(|ticket| Box::pin(ticket.wait()) as PendingAck);
        Ok(write_ack)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.0.discard(offset, len).map_err(target_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteAck, TargetError> {
        self.0
            .write_zeroes(offset, len, allocate, fua)
            .map(ack)
            .map_err(target_error)
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.0.flush().map_err(target_error)
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

pub struct Exports(pub Arc<VolumeManager>);

impl ExportRegistry for Exports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>> {
        self.0
            .get(name)
            .ok()
            .map(|volume| Arc::new(VolumeExport(volume)) as Arc<dyn BlockTarget>)
    }

    fn list(&self) -> Vec<String> {
        self.0.names()
    }
}
