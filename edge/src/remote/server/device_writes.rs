//! Which requests of a connection must wait for the large writes it has at the disk.
//!
//! A write the target says waits for a device (`BlockTarget::write_waits`: a volume's large
//! `O_DIRECT` copy) runs on the blocking pool, so that it holds neither the connection's task nor
//! the runtime thread under it for the disk's time, and so that several reach the disk at once,
//! as from the NBD server and the node's own vhost-user queues.
//!
//! The edge protocol still promises that requests take effect in arrival order: the client's
//! `write` returns once the request is queued, and a read it sends afterwards must see that write
//! (`remote::client`, "Ordering"). So a request that *touches* a range a running device write
//! covers waits until that write is done, and a flush waits for every running device write (it
//! covers everything sent before it). Requests elsewhere on the volume go on meanwhile. The
//! session holds a waiting request as its stalled frame and reads nothing behind it, so nothing
//! overtakes it either.
//!
//! A pure rule over ranges, tested without sockets.

use super::super::proto::Message;

/// The device writes of one connection still running, by request id.
#[derive(Debug, Default)]
pub(super) struct DeviceWrites {
    running: Vec<(u64, std::ops::Range<u64>)>,
}

impl DeviceWrites {
    /// Request `id`, a write of `[offset, offset+len)`, went to the blocking pool.
    pub(super) fn begin(&mut self, id: u64, offset: u64, len: u64) {
        self.running.push((id, offset..offset.saturating_add(len)));
    }

    /// Request `id` completed (a no-op for any other request).
    pub(super) fn end(&mut self, id: u64) {
        self.running.retain(|(running, _)| *running != id);
    }

    /// Whether `message` must wait for a running device write before it executes.
    pub(super) fn blocks(&self, message: &Message) -> bool {
        if self.running.is_empty() {
            return false;
        }
        let (offset, len) = match message {
            Message::Read { offset, len, .. } => (*offset, u64::from(*len)),
            Message::Write { offset, data, .. } => (*offset, data.len() as u64),
            Message::Trim { offset, len, .. }
            | Message::WriteZeroes { offset, len, .. }
            | Message::BlockStatus { offset, len, .. } => (*offset, *len),
            Message::Flush { .. } => return true,
            _ => return false,
        };
        let end = offset.saturating_add(len);
        self.running
            .iter()
            .any(|(_, range)| range.start < end && offset < range.end)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn read(offset: u64, len: u32) -> Message {
        Message::Read {
            tag: 1,
            offset,
            len,
        }
    }

    #[test]
    fn nothing_waits_without_a_running_device_write() {
        let writes = DeviceWrites::default();
        assert!(!writes.blocks(&read(0, 4096)));
        assert!(!writes.blocks(&Message::Flush { tag: 1 }));
    }

    #[test]
    fn requests_touching_a_running_write_wait_and_others_go_on() {
        let mut writes = DeviceWrites::default();
        writes.begin(7, 1 << 20, 1 << 20);
        // Touching either end, or inside.
        assert!(writes.blocks(&read((1 << 20) - 4096, 8192)));
        assert!(writes.blocks(&read((2 << 20) - 512, 512)));
        assert!(writes.blocks(&Message::Write {
            tag: 1,
            offset: 1 << 20,
            fua: false,
            data: Bytes::from(vec![0; 4096]),
        }));
        assert!(writes.blocks(&Message::Trim {
            tag: 1,
            offset: 0,
            len: 4 << 20,
        }));
        assert!(writes.blocks(&Message::WriteZeroes {
            tag: 1,
            offset: (1 << 20) + 4096,
            len: 4096,
            allocate: true,
            fua: false,
        }));
        assert!(writes.blocks(&Message::BlockStatus {
            tag: 1,
            offset: 0,
            len: (1 << 20) + 1,
        }));
        // A flush covers everything sent before it.
        assert!(writes.blocks(&Message::Flush { tag: 1 }));
        // Just outside, on either side.
        assert!(!writes.blocks(&read((1 << 20) - 4096, 4096)));
        assert!(!writes.blocks(&read(2 << 20, 4096)));
        // Near the end of the address space nothing overflows.
        assert!(!writes.blocks(&read(u64::MAX - 4096, 4096)));
    }

    #[test]
    fn a_completed_write_releases_only_its_own_range() {
        let mut writes = DeviceWrites::default();
        writes.begin(1, 0, 1 << 20);
        writes.begin(2, 4 << 20, 1 << 20);
        writes.end(1);
        writes.end(99);
        assert!(!writes.blocks(&read(0, 4096)));
        assert!(writes.blocks(&read(4 << 20, 4096)));
        assert!(writes.blocks(&Message::Flush { tag: 1 }));
        writes.end(2);
        assert!(!writes.blocks(&Message::Flush { tag: 1 }));
    }
}
