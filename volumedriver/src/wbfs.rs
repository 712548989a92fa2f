//! Write-buffer file I/O behind a small trait, so that a test can cut the power.
//!
//! The engine's durability rules (a FLUSH fsyncs the SCOs and TLogs written since the last one
//! and the directories that gained files; restart keeps exactly what a verified SYNC covers) can
//! only be tested against a file system that forgets what was not synced. [`StdFs`] is the real
//! one (`std::fs`, positional I/O). [`SimFs`] keeps every file in memory twice: what `sync_data`
//! made durable, and the writes since then, in order. [`SimFs::power_cut`] drops those writes (or,
//! torn, keeps an in-order prefix of them whose last write may be cut short) and un-does every
//! directory change (created, removed, renamed files) that no `sync_dir` of its directory made
//! durable. Directories themselves are always durable. Handles opened before a power cut fail
//! afterwards: the process that held them is gone.
//!
//! Every file of a volume's write buffer (SCOs, TLogs, the volume configuration, the snapshot
//! metadata and its log) is read and written through the volume's `Arc<dyn WbFs>`; the default is
//! [`StdFs`], and `Volume::create_on`/`Volume::open_on` (and `VolumeManager::open_on`) take
//! another one. The engine's model property test (`tests/engine.rs`) cuts the power of a
//! [`SimFs`] between operations and checks what a restart reads back.
//!
//! The hot path pays one virtual call per SCO write or read (no copy, no allocation): `StdFile`
//! forwards to `pwrite`/`pread`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// One open file of the write buffer.
pub trait WbFile: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// The write buffer's file system.
pub trait WbFs: Send + Sync {
    /// Create a file, or truncate an existing one, for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WbFile>>;
    /// Open an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn WbFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Make the entries of `dir` (files created, removed, renamed in it) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files directly in `dir`, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Remove `dir` and everything under it. Like unlinking, not durable until the parent
    /// directory is synced.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The path of `path` on a real file system, when it has one (the local backend can then
    /// hard-link a sealed SCO instead of copying it); `None` for a simulated one.
    fn real_path(&self, path: &Path) -> Option<PathBuf>;

    /// The whole content of the file at `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path)?;
        let len = usize::try_from(file.size()?).map_err(io::Error::other)?;
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// Replace `path` atomically and durably with `bytes`: temporary file, `sync_data`, rename,
    /// `sync_dir` of the directory.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(".tmp-{file_name}-{}", std::process::id()));
        let result = (|| {
            let file = self.create(&temp)?;
            file.write_all_at(bytes, 0)?;
            file.sync_data()?;
            self.rename(&temp, path)?;
            self.sync_dir(dir)
        })();
        if result.is_err() {
            let _ = self.remove(&temp);
        }
        result
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile {
    file: File,
    path: PathBuf,
    /// The same file opened with `O_DIRECT`, for large aligned writes ([`direct`]); opened on
    /// the first such write, `None` where the file system refuses direct I/O.
    direct: std::sync::OnceLock<Option<File>>,
}

impl StdFile {
    fn new(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            direct: std::sync::OnceLock::new(),
        }
    }
}

impl WbFile for StdFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if direct::worth_it(buf.len(), offset) {
            let fd = self.direct.get_or_init(|| direct::open(&self.path));
            if let Some(fd) = fd {
                if direct::write_all_at(fd, buf, offset)? {
                    return Ok(());
                }
            }
        }
        self.file.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// Direct I/O for the write buffer's bulk writes.
///
/// Why: a log-structured write buffer writes every byte to a page it has never used before (a new
/// SCO). Through the page cache each such write allocates and fills fresh pages, which on a VM
/// whose host reclaims free guest memory (virtio-balloon free page reporting) means a host fault
/// per page, and then the kernel writes them back anyway: measured on the development VM, 2 GiB
/// of 1 MiB writes took 0.7–0.9 GB/s buffered against 1.5 GB/s with `O_DIRECT` (benches/README.md).
/// Data written directly goes to the device once and never lands in the page cache, which the
/// guest above already does its own caching for.
///
/// Only large writes go direct (a 4 KiB write through the page cache returns in a microsecond,
/// directly it waits for the device), at 4 KiB-aligned offsets and lengths (the SCO format keeps
/// clusters aligned for this). The kernel keeps the page cache coherent: a direct write
/// invalidates cached pages of its range, so buffered reads of the same file see it. Durability
/// is unchanged: `O_DIRECT` without `O_DSYNC` promises nothing until `sync_data`, which every
/// FLUSH still does. Where the file system refuses `O_DIRECT` (tmpfs) writes stay buffered.
mod direct {
    use std::cell::RefCell;
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::path::Path;

    /// Alignment of offsets, lengths and memory for direct I/O (the largest logical block size in
    /// use; 512-byte devices accept it too).
    const ALIGN: usize = 4096;
    /// Writes smaller than this stay buffered.
    const MIN_DIRECT: usize = 128 << 10;

    pub(super) fn worth_it(len: usize, offset: u64) -> bool {
        len >= MIN_DIRECT && len.is_multiple_of(ALIGN) && offset.is_multiple_of(ALIGN as u64)
    }

    pub(super) fn open(path: &Path) -> Option<File> {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no direct I/O; writes stay buffered");
                None
            }
        }
    }

    thread_local! {
        /// A per-thread bounce buffer for data whose memory is not aligned.
        static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    /// Write `buf` at `offset` through the direct descriptor. `Ok(false)` when the file system
    /// refused this write as direct I/O (the caller writes it buffered).
    pub(super) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<bool> {
        let result = if (buf.as_ptr() as usize).is_multiple_of(ALIGN) {
            file.write_all_at(buf, offset)
        } else {
            BOUNCE.with_borrow_mut(|bounce| {
                if bounce.len() < buf.len() + ALIGN {
                    bounce.resize(buf.len() + ALIGN, 0);
                }
                let skip = bounce.as_ptr().align_offset(ALIGN);
                let aligned = &mut bounce[skip..skip + buf.len()];
                aligned.copy_from_slice(buf);
                file.write_all_at(aligned, offset)
            })
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl WbFs for StdFs {
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(StdFile::new(file, path)))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(StdFile::new(file, path)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::remove_dir_all(dir)
    }
    fn real_path(&self, path: &Path) -> Option<PathBuf> {
        Some(path.to_path_buf())
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
}

/// A write not yet made durable by `sync_data`.
#[derive(Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

fn apply(content: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => content.resize(*len as usize, 0),
    }
}

#[derive(Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Op>,
}

type InodeRef = Arc<Mutex<Inode>>;

#[derive(Default)]
struct Tree {
    /// Directory entries as the running process sees them.
    live: BTreeMap<PathBuf, InodeRef>,
    /// Directory entries a power cut keeps.
    durable: BTreeMap<PathBuf, InodeRef>,
}

/// How a power cut treats writes not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// All of them are lost.
    Clean,
    /// Per file, an in-order prefix of them survives, its last write possibly cut short; which
    /// prefix is derived from the seed (the same seed cuts the same way).
    Torn(u64),
}

/// An in-memory write-buffer file system that can lose power (see the module docs).
#[derive(Default)]
pub struct SimFs {
    tree: Mutex<Tree>,
    power: Arc<Power>,
}

/// The power supply of a [`SimFs`], shared with its open files.
#[derive(Default)]
struct Power {
    /// Bumped by every power cut; handles of an older generation are dead.
    generation: AtomicU64,
    switch: Mutex<Switch>,
}

#[derive(Default)]
struct Switch {
    /// A cut armed by [`SimFs::cut_power_after`]: changing operations left before it, and how.
    armed: Option<(u64, PowerCut)>,
    /// The armed cut fired: every operation fails until [`SimFs::power_on`], which applies it.
    off: Option<PowerCut>,
}

impl Power {
    /// Fail if the power is off; count a changing operation towards an armed cut (the
    /// operation that reaches it does not happen).
    fn check(&self, changes: bool) -> io::Result<()> {
        let mut switch = self.switch.lock();
        if switch.off.is_some() {
            return Err(io::Error::other("power is off (simulated power cut)"));
        }
        if changes {
            match &mut switch.armed {
                Some((0, how)) => {
                    switch.off = Some(*how);
                    switch.armed = None;
                    return Err(io::Error::other("power cut (simulated)"));
                }
                Some((left, _)) => *left -= 1,
                None => {}
            }
        }
        Ok(())
    }
}

struct SimFile {
    inode: InodeRef,
    generation: u64,
    power: Arc<Power>,
}

impl SimFile {
    fn alive(&self, changes: bool) -> io::Result<()> {
        if self.power.generation.load(Ordering::SeqCst) != self.generation {
            return Err(io::Error::other("file handle from before a power cut"));
        }
        self.power.check(changes)
    }
}

impl WbFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.alive(false)?;
        let inode = self.inode.lock();
        let start = offset as usize;
        let end = start + buf.len();
        if end > inode.current.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&inode.current[start..end]);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.alive(true)?;
        let op = Op::Write {
            offset,
            data: buf.to_vec(),
        };
        let mut inode = self.inode.lock();
        apply(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.alive(true)?;
        let mut inode = self.inode.lock();
        inode.durable = inode.current.clone();
        inode.pending.clear();
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.alive(true)?;
        let op = Op::SetLen(len);
        let mut inode = self.inode.lock();
        apply(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.alive(false)?;
        Ok(self.inode.lock().current.len() as u64)
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

/// splitmix64: a few deterministic choices per power cut, no dependency needed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(&self, inode: InodeRef) -> Arc<dyn WbFile> {
        Arc::new(SimFile {
            inode,
            generation: self.power.generation.load(Ordering::SeqCst),
            power: self.power.clone(),
        })
    }

    /// Cut the power in the middle of what comes next: after `operations` more operations that
    /// change something (write, set_len, sync, create, remove, rename, directory sync), the next
    /// one fails and so does every operation after it, as if the machine had stopped there.
    /// [`power_on`](Self::power_on) then applies the cut.
    pub fn cut_power_after(&self, operations: u64, how: PowerCut) {
        let mut switch = self.power.switch.lock();
        switch.armed = Some((operations, how));
        switch.off = None;
    }

    /// Turn the power back on after a cut armed by [`cut_power_after`](Self::cut_power_after):
    /// returns whether it fired, after applying it ([`power_cut`](Self::power_cut)). A cut that
    /// did not fire is disarmed.
    pub fn power_on(&self) -> bool {
        let fired = {
            let mut switch = self.power.switch.lock();
            switch.armed = None;
            switch.off.take()
        };
        if let Some(how) = fired {
            self.power_cut(how);
        }
        fired.is_some()
    }

    /// Lose power now: every file keeps its durable content (plus, torn, a prefix of its later
    /// writes), every directory its durable entries; handles opened before fail from now on.
    pub fn power_cut(&self, how: PowerCut) {
        let mut tree = self.tree.lock();
        self.power.generation.fetch_add(1, Ordering::SeqCst);
        let mut survivors: BTreeMap<*const Mutex<Inode>, InodeRef> = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for (index, (path, inode)) in tree.durable.iter().enumerate() {
            let key = Arc::as_ptr(inode);
            let fresh = survivors
                .entry(key)
                .or_insert_with(|| {
                    let old = inode.lock();
                    let mut content = old.durable.clone();
                    if let PowerCut::Torn(seed) = how {
                        let roll = mix(seed ^ mix(index as u64));
                        let keep = (roll % (old.pending.len() as u64 + 1)) as usize;
                        for op in &old.pending[..keep] {
                            apply(&mut content, op);
                        }
                        if let Some(Op::Write { offset, data }) = old.pending.get(keep) {
                            let cut = (mix(roll) % (data.len() as u64 + 1)) as usize;
                            let torn = Op::Write {
                                offset: *offset,
                                data: data[..cut].to_vec(),
                            };
                            apply(&mut content, &torn);
                        }
                    }
                    Arc::new(Mutex::new(Inode {
                        durable: content.clone(),
                        current: content,
                        pending: Vec::new(),
                    }))
                })
                .clone();
            entries.insert(path.clone(), fresh);
        }
        tree.durable = entries.clone();
        tree.live = entries;
        *self.power.switch.lock() = Switch::default();
    }
}

impl WbFs for SimFs {
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        self.power.check(true)?;
        let mut tree = self.tree.lock();
        let inode = match tree.live.get(path) {
            Some(inode) => {
                let inode = inode.clone();
                let op = Op::SetLen(0);
                let mut guard = inode.lock();
                apply(&mut guard.current, &op);
                guard.pending.push(op);
                drop(guard);
                inode
            }
            None => {
                let inode = InodeRef::default();
                tree.live.insert(path.to_path_buf(), inode.clone());
                inode
            }
        };
        Ok(self.handle(inode))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        self.power.check(false)?;
        let inode = self.tree.lock().live.get(path).cloned();
        inode
            .map(|inode| self.handle(inode))
            .ok_or_else(|| not_found(path))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.power.check(true)?;
        self.tree
            .lock()
            .live
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.power.check(true)?;
        let mut tree = self.tree.lock();
        let inode = tree.live.remove(from).ok_or_else(|| not_found(from))?;
        tree.live.insert(to.to_path_buf(), inode);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.power.check(true)?;
        let mut tree = self.tree.lock();
        let in_dir = |path: &Path| path.parent() == Some(dir);
        tree.durable.retain(|path, _| !in_dir(path));
        let live: Vec<_> = tree
            .live
            .iter()
            .filter(|(path, _)| in_dir(path))
            .map(|(path, inode)| (path.clone(), inode.clone()))
            .collect();
        tree.durable.extend(live);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.power.check(false)?;
        let tree = self.tree.lock();
        Ok(tree
            .live
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect())
    }
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        self.power.check(false)
    }
    /// Unlike the other directory changes this one is durable at once: the engine only removes
    /// a whole write-buffer directory when a volume is destroyed, and a test removes one to
    /// stand for an operator deleting the write buffer.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.power.check(true)?;
        let mut tree = self.tree.lock();
        let before = tree.live.len();
        tree.live.retain(|path, _| !path.starts_with(dir));
        tree.durable.retain(|path, _| !path.starts_with(dir));
        if tree.live.len() == before {
            return Err(not_found(dir));
        }
        Ok(())
    }
    fn real_path(&self, _path: &Path) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(fs: &dyn WbFs, path: &Path) -> io::Result<Vec<u8>> {
        let file = fs.open(path)?;
        let mut buf = vec![0u8; file.size()? as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Bulk writes go through `O_DIRECT` (from aligned and unaligned memory), small ones
    /// through the page cache, and both read back through the buffered descriptor and a fresh
    /// open; on tmpfs, which refuses `O_DIRECT`, everything stays buffered and still works.
    #[test]
    fn direct_and_buffered_writes_read_back_the_same_bytes() {
        let disk = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        let mut dirs = vec![disk.path().to_path_buf()];
        let tmpfs = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        if let Some(t) = &tmpfs {
            dirs.push(t.path().to_path_buf());
        }
        for dir in dirs {
            let path = dir.join("sco");
            let file = StdFs.create(&path).unwrap();
            let big: Vec<u8> = (0..(1usize << 20) + 1)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let header = vec![0x11u8; 4096];
            file.write_all_at(&header, 0).unwrap();
            // Page-aligned slice when the allocation allows one, then a surely unaligned one.
            let aligned_at = big.as_ptr().align_offset(4096).min(1);
            file.write_all_at(&big[aligned_at..aligned_at + (1 << 20)], 4096)
                .unwrap();
            file.write_all_at(&big[1..=(1 << 20)], 4096 + (1 << 20))
                .unwrap();
            let small = vec![0x5au8; 4096];
            file.write_all_at(&small, 4096 + (2 << 20)).unwrap();
            file.sync_data().unwrap();
            let mut expect = header.clone();
            expect.extend_from_slice(&big[aligned_at..aligned_at + (1 << 20)]);
            expect.extend_from_slice(&big[1..=(1 << 20)]);
            expect.extend_from_slice(&small);
            assert_eq!(file.size().unwrap(), expect.len() as u64);
            let mut back = vec![0u8; expect.len()];
            file.read_exact_at(&mut back, 0).unwrap();
            assert!(back == expect, "read back through the open file in {dir:?}");
            assert!(
                fs::read(&path).unwrap() == expect,
                "read back fresh in {dir:?}"
            );
            // Rewriting a range directly is seen by buffered reads (the kernel drops the pages).
            let again = vec![0xa5u8; 256 << 10];
            file.write_all_at(&again, 4096).unwrap();
            let mut part = vec![0u8; again.len()];
            file.read_exact_at(&mut part, 4096).unwrap();
            assert!(part == again, "a direct rewrite is visible in {dir:?}");
        }
    }

    #[test]
    fn a_clean_power_cut_keeps_exactly_what_was_synced() {
        let fs = SimFs::new();
        let dir = Path::new("/wb");
        let path = dir.join("a");
        let file = fs.create(&path).unwrap();
        file.write_all_at(b"hello", 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        file.write_all_at(b"HELLO world", 0).unwrap();
        file.set_len(3).unwrap();
        assert_eq!(read_all(&fs, &path).unwrap(), b"HEL");
        fs.power_cut(PowerCut::Clean);
        assert_eq!(read_all(&fs, &path).unwrap(), b"hello");
        // The process that held the handle is gone.
        assert!(file.write_all_at(b"x", 0).is_err());
        assert!(file.sync_data().is_err());
    }

    #[test]
    fn directory_changes_need_a_directory_sync() {
        let fs = SimFs::new();
        let dir = Path::new("/wb/sco");
        let (kept, lost, gone) = (dir.join("kept"), dir.join("lost"), dir.join("gone"));
        for path in [&kept, &gone] {
            let file = fs.create(path).unwrap();
            file.write_all_at(b"data", 0).unwrap();
            file.sync_data().unwrap();
        }
        fs.sync_dir(dir).unwrap();
        // Synced data, but the new entry never reached the disk.
        let file = fs.create(&lost).unwrap();
        file.write_all_at(b"data", 0).unwrap();
        file.sync_data().unwrap();
        fs.remove(&gone).unwrap();
        fs.rename(&kept, &dir.join("renamed")).unwrap();
        assert_eq!(fs.list(dir).unwrap(), vec!["lost", "renamed"]);
        fs.power_cut(PowerCut::Clean);
        assert_eq!(fs.list(dir).unwrap(), vec!["gone", "kept"]);
        assert_eq!(read_all(&fs, &dir.join("gone")).unwrap(), b"data");

        // The atomic-replace pattern: write a temporary file, sync it, rename, sync the dir.
        let temp = dir.join(".tmp");
        let file = fs.create(&temp).unwrap();
        file.write_all_at(b"new", 0).unwrap();
        file.sync_data().unwrap();
        fs.rename(&temp, &dir.join("kept")).unwrap();
        fs.sync_dir(dir).unwrap();
        fs.power_cut(PowerCut::Clean);
        assert_eq!(read_all(&fs, &dir.join("kept")).unwrap(), b"new");
        assert_eq!(fs.list(dir).unwrap(), vec!["gone", "kept"]);
    }

    #[test]
    fn a_torn_power_cut_keeps_a_prefix_of_the_unsynced_writes() {
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![1; 8]),
            (4, vec![2; 8]),
            (16, vec![3; 4]),
            (2, vec![4; 3]),
        ];
        // Every state a prefix of the writes (the last one possibly cut short) can leave.
        let mut allowed = Vec::new();
        let mut content = b"base".to_vec();
        for (offset, data) in &writes {
            for cut in 0..=data.len() {
                let mut partial = content.clone();
                apply(
                    &mut partial,
                    &Op::Write {
                        offset: *offset,
                        data: data[..cut].to_vec(),
                    },
                );
                allowed.push(partial);
            }
            apply(
                &mut content,
                &Op::Write {
                    offset: *offset,
                    data: data.clone(),
                },
            );
        }
        allowed.push(content.clone());
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let fs = SimFs::new();
            let path = Path::new("/wb/t");
            let file = fs.create(path).unwrap();
            file.write_all_at(b"base", 0).unwrap();
            file.sync_data().unwrap();
            fs.sync_dir(Path::new("/wb")).unwrap();
            for (offset, data) in &writes {
                file.write_all_at(data, *offset).unwrap();
            }
            fs.power_cut(PowerCut::Torn(seed));
            let after = read_all(&fs, path).unwrap();
            assert!(allowed.contains(&after), "seed {seed}: {after:?}");
            seen.insert(after);
        }
        // The seeds reach many different cuts, including none and all of the writes.
        assert!(seen.len() > 10, "{}", seen.len());
        assert!(seen.contains(b"base".as_slice()) && seen.contains(&content));
    }

    #[test]
    fn an_armed_cut_stops_everything_at_that_operation_until_power_on() {
        let fs = SimFs::new();
        let dir = Path::new("/wb");
        let path = dir.join("a");
        let file = fs.create(&path).unwrap();
        file.write_all_at(b"one", 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        fs.cut_power_after(1, PowerCut::Clean);
        file.write_all_at(b"two", 0).unwrap(); // the one operation still allowed
        assert!(file.sync_data().is_err(), "the cut fires here");
        assert!(file.read_exact_at(&mut [0u8; 3], 0).is_err());
        assert!(fs.open(&path).is_err() && fs.list(dir).is_err());
        assert!(fs.create(&dir.join("b")).is_err());
        assert!(fs.power_on());
        assert_eq!(read_all(&fs, &path).unwrap(), b"one");
        assert!(
            file.write_all_at(b"x", 0).is_err(),
            "a handle from before the cut"
        );
        // A cut that does not fire is disarmed by power_on.
        fs.cut_power_after(5, PowerCut::Clean);
        assert!(!fs.power_on());
        fs.create(&dir.join("c")).unwrap();
        assert_eq!(fs.list(dir).unwrap(), vec!["a", "c"]);
    }

    #[test]
    fn std_fs_does_the_same_operations_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = StdFs;
        let dir = tmp.path().join("sco");
        fs.create_dir_all(&dir).unwrap();
        let file = fs.create(&dir.join("a")).unwrap();
        file.write_all_at(b"0123456789", 0).unwrap();
        file.set_len(4).unwrap();
        file.sync_data().unwrap();
        assert_eq!(file.size().unwrap(), 4);
        fs.rename(&dir.join("a"), &dir.join("b")).unwrap();
        fs.sync_dir(&dir).unwrap();
        assert_eq!(fs.list(&dir).unwrap(), vec!["b"]);
        assert_eq!(read_all(&fs, &dir.join("b")).unwrap(), b"0123");
        fs.remove(&dir.join("b")).unwrap();
        assert!(fs.open(&dir.join("b")).is_err());
        assert!(fs.list(&dir).unwrap().is_empty());
    }
}
