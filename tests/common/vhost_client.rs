//! A minimal vhost-user-blk frontend for process tests: libblkio with one queue and one shared
//! buffer region, one request at a time.

use std::path::Path;

/// A vhost-user-blk frontend (libblkio) with one queue and one shared buffer region.
pub struct VhostClient {
    queue: blkio::Blkioq,
    region: blkio::MemoryRegion,
    pub blkio: blkio::Blkio,
}

pub const REGION: usize = 1 << 20;

impl VhostClient {
    pub fn connect(path: &Path) -> Self {
        let mut blkio = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", path.to_str().expect("UTF-8 path"))
            .expect("path");
        blkio
            .connect()
            .unwrap_or_else(|e| panic!("vhost-user connect to {}: {e}", path.display()));
        blkio.set_i32("num-queues", 1).expect("num-queues");
        let queue = blkio.start().expect("start").queues.remove(0);
        let region = blkio.alloc_mem_region(REGION).expect("region");
        blkio.map_mem_region(&region).expect("map");
        Self {
            queue,
            region,
            blkio,
        }
    }

    pub fn run_one(&mut self) -> i32 {
        let mut completion = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
        let got = self
            .queue
            .do_io(&mut completion, 1, None, None)
            .expect("do_io");
        assert_eq!(got, 1);
        // SAFETY: do_io initialised the first `got` (1) entries.
        unsafe { completion[0].assume_init_read() }.ret
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        assert!(len <= REGION);
        let buf = self.region.addr as *mut u8;
        self.queue
            .read(offset, buf, len, 0, blkio::ReqFlags::empty());
        assert_eq!(self.run_one(), 0, "vhost read at {offset}");
        let mut out = vec![0u8; len];
        // SAFETY: the range lies inside our mapped region and no request is using it now.
        unsafe { std::ptr::copy_nonoverlapping(buf, out.as_mut_ptr(), len) };
        out
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert!(data.len() <= REGION);
        let buf = self.region.addr as *mut u8;
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
        self.queue
            .write(offset, buf, data.len(), 0, blkio::ReqFlags::empty());
        assert_eq!(self.run_one(), 0, "vhost write at {offset}");
    }

    pub fn flush(&mut self) {
        self.queue.flush(0, blkio::ReqFlags::empty());
        assert_eq!(self.run_one(), 0, "vhost flush");
    }
}
