//! An OSD's fragments on its disk: the storage half of `vstor osd`, blocking file I/O.
//!
//! Layout under the OSD's data directory:
//!
//! ```text
//! fragments/<namespace>/<object name>/<version>.<index>   fragment files (`ec::fragment`)
//! tags/<namespace>                                         fencing tag: u64 LE + CRC32C
//! ```
//!
//! A fragment is written to a temporary file, fsynced, renamed into place and its directory
//! fsynced, so after a crash it is either whole or absent. The store checks every fragment it
//! is given (header fields against the request, every block against the CRC table) before
//! keeping it: an OSD never stores bytes that cannot be read back. Partial reads check only the
//! 4 KiB blocks they touch against their entries in the CRC table, without reading the whole
//! table; a damaged table entry then shows up as a corrupt block (a false alarm the client
//! repairs from other fragments), never as wrong data.
//!
//! Tombstones (`ec::fragment`, index 255): a delete stores one instead of removing the name, so
//! the delete outlives an OSD that missed it. Keeping a tombstone of version `v` removes every
//! fragment of the name older than `v` here in the same call (the space comes back at once);
//! a tombstone is tiny and is taken even when the store is full. `usage().fragments` does not
//! count tombstones (they are bytes in `used`). Repair drops them once no OSD can still hold an
//! older fragment (`DeleteFragment` of index 255).
//!
//! Fencing: the store keeps, per namespace, the highest owner tag it has seen (persisted before
//! it is acted on) and refuses mutations carrying an older one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::proto::{FragmentId, HeadEntry, Usage};
use crate::ec::fragment::{self, FragmentHeader, TOMBSTONE_INDEX};
use crate::{validate_name, BackendError, Result};

const FRAGMENTS: &str = "fragments";
const TAGS: &str = "tags";
const TEMP_PREFIX: &str = ".tmp-";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(path))
}

/// The fragments of one OSD.
pub struct FragmentStore {
    root: PathBuf,
    capacity: u64,
    used: AtomicU64,
    fragments: AtomicU64,
    /// Highest owner tag seen per namespace (mirrors `tags/`).
    tags: Mutex<HashMap<String, u64>>,
    /// Serialises puts' capacity checks with their accounting.
    put_lock: Mutex<()>,
    /// Ranged reads served (tests check that a small read touches one OSD).
    range_reads: AtomicU64,
}

impl FragmentStore {
    /// Open (creating if needed) the store at `root`, holding at most `capacity` bytes of
    /// fragment files. Counts what is there and removes temporary files a crash left behind.
    pub fn open(root: &Path, capacity: u64) -> Result<Self> {
        for dir in [root.join(FRAGMENTS), root.join(TAGS)] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let (mut used, mut count) = (0u64, 0u64);
        let fragments = root.join(FRAGMENTS);
        for ns in read_dir(&fragments)? {
            for object in read_dir(&ns)? {
                for file in read_dir(&object)? {
                    let name = file.file_name().unwrap_or_default().to_string_lossy();
                    if name.starts_with(TEMP_PREFIX) {
                        fs::remove_file(&file).map_err(io_err(&file))?;
                        continue;
                    }
                    used += fs::metadata(&file).map_err(io_err(&file))?.len();
                    count += u64::from(!is_tombstone_file(&name));
                }
            }
        }
        let mut tags = HashMap::new();
        for file in read_dir(&root.join(TAGS))? {
            let ns = file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            tags.insert(ns, read_tag(&file)?);
        }
        Ok(Self {
            root: root.to_path_buf(),
            capacity,
            used: AtomicU64::new(used),
            fragments: AtomicU64::new(count),
            tags: Mutex::new(tags),
            put_lock: Mutex::new(()),
            range_reads: AtomicU64::new(0),
        })
    }

    /// Ranged reads served since the store opened.
    pub fn range_reads(&self) -> u64 {
        self.range_reads.load(Ordering::SeqCst)
    }

    /// The headers of every fragment of `name` held here.
    pub fn head(&self, namespace: &str, name: &str) -> Result<Vec<HeadEntry>> {
        let dir = self.object_dir(namespace, name)?;
        let mut out = Vec::new();
        for path in read_dir(&dir)? {
            let file_name = path.file_name().unwrap_or_default().to_string_lossy();
            if file_name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let label = format!("{name} ({file_name})");
            let file = open_fragment(&path, namespace, &label)?;
            // A fragment with a damaged header is not reported: to the reader it is lost.
            if let Ok(h) = read_header(&file, &path, namespace, &label) {
                out.push(HeadEntry {
                    version: h.object_version,
                    index: h.index,
                    k: h.k,
                    m: h.m,
                    codec: h.codec.0,
                    fragment_size: h.fragment_size,
                    object_size: h.object_size,
                    data_len: h.data_len,
                    group: h.local_group,
                });
            }
        }
        Ok(out)
    }

    pub fn usage(&self) -> Usage {
        Usage {
            capacity: self.capacity,
            used: self.used.load(Ordering::SeqCst),
            fragments: self.fragments.load(Ordering::SeqCst),
        }
    }

    fn object_dir(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        validate_name(namespace)?;
        validate_name(name)?;
        Ok(self.root.join(FRAGMENTS).join(namespace).join(name))
    }

    fn path(&self, namespace: &str, name: &str, version: u64, index: u8) -> Result<PathBuf> {
        Ok(self
            .object_dir(namespace, name)?
            .join(format!("{version:016x}.{index}")))
    }

    /// Refuse `tag` if the namespace has seen a newer one; remember it if it is newer.
    fn check_tag(&self, namespace: &str, tag: u64) -> Result<()> {
        let current = self.tags.lock().get(namespace).copied().unwrap_or(0);
        if tag < current {
            return Err(BackendError::Fenced {
                namespace: namespace.to_string(),
                current,
                presented: tag,
            });
        }
        if tag > current {
            self.set_tag(namespace, tag)?;
        }
        Ok(())
    }

    /// Raise the namespace's fencing tag to `tag` (never lowers it). Persisted before it is
    /// remembered, so a restarted OSD refuses what it refused before.
    pub fn set_tag(&self, namespace: &str, tag: u64) -> Result<()> {
        validate_name(namespace)?;
        let mut tags = self.tags.lock();
        if tags.get(namespace).is_some_and(|t| *t >= tag) {
            return Ok(());
        }
        let dir = self.root.join(TAGS);
        let path = dir.join(namespace);
        let temp = dir.join(format!("{TEMP_PREFIX}{namespace}"));
        let mut bytes = tag.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&tag.to_le_bytes()).to_le_bytes());
        write_durably(&temp, &path, &bytes)?;
        tags.insert(namespace.to_string(), tag);
        Ok(())
    }

    /// Keep `file` as fragment `index` of `name` version `version`, after checking it whole.
    pub fn put(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: u8,
        tag: u64,
        file: &[u8],
    ) -> Result<()> {
        let path = self.path(namespace, name, version, index)?;
        let corrupt = |reason: String| BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: format!("{name} v{version} fragment {index}"),
            reason,
        };
        let header = FragmentHeader::decode(file).map_err(|e| corrupt(e.to_string()))?;
        if header.namespace != namespace
            || header.name != name
            || header.object_version != version
            || header.index != index
        {
            return Err(corrupt(format!(
                "the fragment says it is {}/{} v{} fragment {}",
                header.namespace, header.name, header.object_version, header.index
            )));
        }
        if file.len() as u64 != header.file_len() {
            return Err(corrupt(format!(
                "{} bytes, the header says {}",
                file.len(),
                header.file_len()
            )));
        }
        let data_at = header.data_offset() as usize;
        let table_at = header.table_offset() as usize;
        let crcs = fragment::parse_table(&header, &file[table_at..])
            .map_err(|e| corrupt(e.to_string()))?;
        fragment::verify_blocks(&crcs, 0, &file[data_at..table_at])
            .map_err(|e| corrupt(e.to_string()))?;
        self.check_tag(namespace, tag)?;

        let _put = self.put_lock.lock();
        let old = fs::metadata(&path).map(|m| m.len()).ok();
        let used = self.used.load(Ordering::SeqCst) - old.unwrap_or(0);
        // A tombstone frees space: a full OSD takes it.
        if !header.is_tombstone() && used + file.len() as u64 > self.capacity {
            return Err(BackendError::Full {
                path: self.root.clone(),
                capacity: self.capacity,
                used,
                needed: file.len() as u64,
            });
        }
        let dir = self.object_dir(namespace, name)?;
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        let temp = dir.join(format!("{TEMP_PREFIX}{version:016x}.{index}"));
        write_durably(&temp, &path, file)?;
        self.used.store(used + file.len() as u64, Ordering::SeqCst);
        if old.is_none() && !header.is_tombstone() {
            self.fragments.fetch_add(1, Ordering::SeqCst);
        }
        if header.is_tombstone() {
            self.remove_older(&dir, version)?;
        }
        Ok(())
    }

    /// Remove every fragment (and tombstone) in `dir` older than `version` (the caller holds
    /// `put_lock`, and has just stored a tombstone of `version` there).
    fn remove_older(&self, dir: &Path, version: u64) -> Result<()> {
        let mut removed = false;
        for file in read_dir(dir)? {
            let file_name = file.file_name().unwrap_or_default().to_string_lossy();
            let Some((v, index)) = parse_file_name(&file_name) else {
                continue;
            };
            if v >= version {
                continue;
            }
            let len = fs::metadata(&file).map_err(io_err(&file))?.len();
            fs::remove_file(&file).map_err(io_err(&file))?;
            self.used.fetch_sub(len, Ordering::SeqCst);
            if index != TOMBSTONE_INDEX {
                self.fragments.fetch_sub(1, Ordering::SeqCst);
            }
            removed = true;
        }
        if removed {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    /// `len` bytes of the fragment's data at `offset`, checked against the blocks' CRCs.
    pub fn get_range(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: u8,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>> {
        self.range_reads.fetch_add(1, Ordering::Relaxed);
        let path = self.path(namespace, name, version, index)?;
        let label = format!("{name} v{version} fragment {index}");
        let file = open_fragment(&path, namespace, &label)?;
        let header = read_header(&file, &path, namespace, &label)?;
        let end = offset.checked_add(u64::from(len));
        if end.is_none_or(|end| end > header.data_len) {
            return Err(BackendError::RangeOutOfBounds {
                namespace: namespace.to_string(),
                name: label,
                offset,
                len: u64::from(len),
                size: header.data_len,
            });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, start, stop) = fragment::block_span(&header, offset, u64::from(len));
        let mut blocks = vec![0u8; (stop - start) as usize];
        file.read_exact_at(&mut blocks, header.data_offset() + start)
            .map_err(io_err(&path))?;
        let last = stop.div_ceil(fragment::BLOCK as u64);
        let mut table = vec![0u8; ((last - first) * 4) as usize];
        file.read_exact_at(&mut table, header.table_offset() + first * 4)
            .map_err(io_err(&path))?;
        let crcs: Vec<u32> = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // `crcs` starts at block `first`: verify as if it were the whole table from block 0.
        fragment::verify_blocks(&crcs, 0, &blocks).map_err(|e| BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: label,
            reason: format!("{e} (counting from block {first})"),
        })?;
        let skip = (offset - start) as usize;
        Ok(blocks[skip..skip + len as usize].to_vec())
    }

    /// The whole fragment file, checked end to end.
    pub fn get_file(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: u8,
    ) -> Result<Vec<u8>> {
        let path = self.path(namespace, name, version, index)?;
        let label = format!("{name} v{version} fragment {index}");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackendError::NoSuchObject {
                    namespace: namespace.to_string(),
                    name: label,
                })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |reason: String| BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: label.clone(),
            reason,
        };
        let header = FragmentHeader::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if bytes.len() as u64 != header.file_len() {
            return Err(corrupt("truncated".into()));
        }
        let table_at = header.table_offset() as usize;
        let crcs = fragment::parse_table(&header, &bytes[table_at..])
            .map_err(|e| corrupt(e.to_string()))?;
        fragment::verify_blocks(&crcs, 0, &bytes[header.data_offset() as usize..table_at])
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(bytes)
    }

    /// Check every CRC of one fragment (scrub's `Verify`): the whole file is read and checked
    /// here, so nothing crosses the network. `Corrupt` when damaged, `NoSuchObject` if absent.
    pub fn verify(&self, namespace: &str, name: &str, version: u64, index: u8) -> Result<()> {
        self.get_file(namespace, name, version, index).map(drop)
    }

    /// Delete one fragment (one version, one index) under the owner tag: a move's source once
    /// its new copy is durable, a misplaced copy, a stale version. Absent is fine.
    pub fn delete_fragment(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: u8,
        tag: u64,
    ) -> Result<()> {
        let path = self.path(namespace, name, version, index)?;
        self.check_tag(namespace, tag)?;
        let _put = self.put_lock.lock();
        let len = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        fs::remove_file(&path).map_err(io_err(&path))?;
        self.used.fetch_sub(len, Ordering::SeqCst);
        if index != TOMBSTONE_INDEX {
            self.fragments.fetch_sub(1, Ordering::SeqCst);
        }
        let dir = self.object_dir(namespace, name)?;
        // The last fragment of the object here: drop its directory too (not empty: keep it).
        if fs::remove_dir(&dir).is_ok() {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        } else {
            fsync_dir(&dir)?;
        }
        Ok(())
    }

    /// Delete every fragment of `name` in `namespace` (all versions); deleting nothing is fine.
    pub fn delete(&self, namespace: &str, name: &str, tag: u64) -> Result<()> {
        let dir = self.object_dir(namespace, name)?;
        self.check_tag(namespace, tag)?;
        let _put = self.put_lock.lock();
        for file in read_dir(&dir)? {
            let len = fs::metadata(&file).map_err(io_err(&file))?.len();
            fs::remove_file(&file).map_err(io_err(&file))?;
            self.used.fetch_sub(len, Ordering::SeqCst);
            let file_name = file.file_name().unwrap_or_default().to_string_lossy();
            if !is_tombstone_file(&file_name) {
                self.fragments.fetch_sub(1, Ordering::SeqCst);
            }
        }
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir)(e)),
        }
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Fragments of `namespace` whose object name sorts after `after`, in name order, at most
    /// `limit`.
    pub fn list(&self, namespace: &str, after: &str, limit: usize) -> Result<Vec<FragmentId>> {
        validate_name(namespace)?;
        let mut names: Vec<PathBuf> = read_dir(&self.root.join(FRAGMENTS).join(namespace))?;
        names.sort();
        let mut out = Vec::new();
        for dir in names {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.as_str() <= after {
                continue;
            }
            let mut files = read_dir(&dir)?;
            files.sort();
            for file in files {
                let file_name = file.file_name().unwrap_or_default().to_string_lossy();
                let Some((version, index)) = parse_file_name(&file_name) else {
                    continue;
                };
                let size = fs::metadata(&file).map_err(io_err(&file))?.len();
                out.push(FragmentId {
                    name: name.clone(),
                    version,
                    index,
                    size,
                });
            }
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        Ok(out)
    }
}

/// `(version, index)` of a fragment file named `<version hex>.<index>`; `None` for anything
/// else (a temporary file).
fn parse_file_name(file_name: &str) -> Option<(u64, u8)> {
    let (version, index) = file_name.split_once('.')?;
    Some((
        u64::from_str_radix(version, 16).ok()?,
        index.parse::<u8>().ok()?,
    ))
}

fn is_tombstone_file(file_name: &str) -> bool {
    parse_file_name(file_name).is_some_and(|(_, index)| index == TOMBSTONE_INDEX)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn read_tag(path: &Path) -> Result<u64> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let corrupt = || BackendError::Corrupt {
        namespace: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        name: "owner tag".into(),
        reason: format!("{} is damaged", path.display()),
    };
    let (tag, crc) = bytes.split_at_checked(8).ok_or_else(corrupt)?;
    if crc.len() != 4 || crc32c::crc32c(tag).to_le_bytes() != crc {
        return Err(corrupt());
    }
    let mut raw = [0u8; 8];
    raw.copy_from_slice(tag);
    Ok(u64::from_le_bytes(raw))
}

/// Write `bytes` to `temp`, fsync, rename over `path`, fsync the directory.
fn write_durably(temp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temp)
        .map_err(io_err(temp))?;
    file.write_all(bytes).map_err(io_err(temp))?;
    file.sync_all().map_err(io_err(temp))?;
    fs::rename(temp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn open_fragment(path: &Path, namespace: &str, label: &str) -> Result<File> {
    File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BackendError::NoSuchObject {
                namespace: namespace.to_string(),
                name: label.to_string(),
            }
        } else {
            io_err(path)(e)
        }
    })
}

/// The header at the start of `file` (names are at most 2 KiB, so 4 KiB + fixed part covers it).
fn read_header(file: &File, path: &Path, namespace: &str, label: &str) -> Result<FragmentHeader> {
    let mut head = vec![0u8; 2 * fragment::MAX_NAME + 64];
    let n = read_up_to(file, &mut head).map_err(io_err(path))?;
    FragmentHeader::decode(&head[..n]).map_err(|e| BackendError::Corrupt {
        namespace: namespace.to_string(),
        name: label.to_string(),
        reason: e.to_string(),
    })
}

fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use crate::ec::codec::CodecId;

    fn fragment_file(name: &str, version: u64, index: u8, data: &[u8]) -> Vec<u8> {
        let header = FragmentHeader {
            codec: CodecId::REED_SOLOMON_GF8,
            k: 4,
            m: 2,
            index,
            fragment_size: 1 << 20,
            object_size: data.len() as u64 * 4,
            object_version: version,
            owner_tag: 1,
            data_len: data.len() as u64,
            namespace: "ns".into(),
            name: name.into(),
            local_group: Vec::new(),
        };
        fragment::encode_fragment(&header, data).unwrap()
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn fragments_survive_a_reopen_and_read_back_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(20_000, 1);
        {
            let store = FragmentStore::open(dir.path(), 1 << 30).unwrap();
            store
                .put("ns", "obj", 1, 2, 5, &fragment_file("obj", 1, 2, &d))
                .unwrap();
            assert_eq!(store.usage().fragments, 1);
        }
        let store = FragmentStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(store.usage().fragments, 1);
        assert!(store.usage().used > 20_000);
        assert_eq!(
            store.get_range("ns", "obj", 1, 2, 5000, 7000).unwrap(),
            d[5000..12_000]
        );
        assert_eq!(
            store.get_range("ns", "obj", 1, 2, 19_999, 1).unwrap(),
            d[19_999..]
        );
        assert!(matches!(
            store.get_range("ns", "obj", 1, 2, 19_999, 2),
            Err(BackendError::RangeOutOfBounds { .. })
        ));
        assert!(matches!(
            store.get_range("ns", "obj", 1, 3, 0, 1),
            Err(BackendError::NoSuchObject { .. })
        ));
        assert_eq!(store.get_file("ns", "obj", 1, 2).unwrap().len() as u64, {
            FragmentHeader::decode(&fragment_file("obj", 1, 2, &d))
                .unwrap()
                .file_len()
        });
        let listed = store.list("ns", "", 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].version, listed[0].index), (1, 2));
    }

    #[test]
    fn bad_fragments_are_refused_and_damage_on_disk_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = FragmentStore::open(dir.path(), 1 << 30).unwrap();
        let d = data(9000, 2);
        let mut file = fragment_file("obj", 1, 0, &d);
        // Claims to be another fragment than the request says.
        assert!(matches!(
            store.put("ns", "obj", 1, 1, 1, &file),
            Err(BackendError::Corrupt { .. })
        ));
        // A flipped data byte is refused before it is stored.
        let at = file.len() - 100;
        file[at - 40] ^= 1;
        assert!(store.put("ns", "obj", 1, 0, 1, &file).is_err());
        file[at - 40] ^= 1;
        store.put("ns", "obj", 1, 0, 1, &file).unwrap();
        // Damage after storing: the touched block is reported corrupt, others still read.
        let path = dir.path().join("fragments/ns/obj/0000000000000001.0");
        let mut bytes = fs::read(&path).unwrap();
        let header = FragmentHeader::decode(&bytes).unwrap();
        bytes[header.data_offset() as usize + 5000] ^= 0x80;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.get_range("ns", "obj", 1, 0, 4096, 100),
            Err(BackendError::Corrupt { .. })
        ));
        assert_eq!(
            store.get_range("ns", "obj", 1, 0, 0, 4096).unwrap(),
            d[..4096]
        );
        assert!(store.get_file("ns", "obj", 1, 0).is_err());
        assert!(matches!(
            store.verify("ns", "obj", 1, 0),
            Err(BackendError::Corrupt { .. })
        ));
        assert!(matches!(
            store.put("../x", "obj", 1, 0, 1, &file),
            Err(BackendError::InvalidName { .. })
        ));
    }

    #[test]
    fn a_tombstone_removes_older_fragments_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(5000, 4);
        let old = fragment_file("obj", 1, 0, &d);
        let newer = fragment_file("obj", 9, 1, &d);
        let tomb = |version: u64, tag: u64| {
            let h = FragmentHeader::tombstone("ns", "obj", version, tag);
            fragment::encode_fragment(&h, &[]).unwrap()
        };
        {
            // Room for one fragment only: the tombstone still goes in.
            let store = FragmentStore::open(dir.path(), old.len() as u64 + 10).unwrap();
            store.put("ns", "obj", 1, 0, 3, &old).unwrap();
            assert!(matches!(
                store.put("ns", "obj", 5, TOMBSTONE_INDEX, 2, &tomb(5, 2)),
                Err(BackendError::Fenced { .. })
            ));
            store
                .put("ns", "obj", 5, TOMBSTONE_INDEX, 3, &tomb(5, 3))
                .unwrap();
            // The older fragment went with it; the tombstone is not counted as a fragment.
            assert!(matches!(
                store.get_file("ns", "obj", 1, 0),
                Err(BackendError::NoSuchObject { .. })
            ));
            assert_eq!(store.usage().fragments, 0);
            assert_eq!(store.usage().used, tomb(5, 3).len() as u64);
        }
        let store = FragmentStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(store.usage().fragments, 0);
        let heads = store.head("ns", "obj").unwrap();
        assert_eq!(heads.len(), 1);
        assert_eq!(
            (heads[0].version, heads[0].index, heads[0].k),
            (5, TOMBSTONE_INDEX, 0)
        );
        // A newer version is untouched by an older tombstone, and listed beside it.
        store.put("ns", "obj", 9, 1, 3, &newer).unwrap();
        store
            .put("ns", "obj", 4, TOMBSTONE_INDEX, 3, &tomb(4, 3))
            .unwrap();
        assert_eq!(store.get_file("ns", "obj", 9, 1).unwrap(), newer);
        let listed: Vec<(u64, u8)> = store
            .list("ns", "", 10)
            .unwrap()
            .iter()
            .map(|f| (f.version, f.index))
            .collect();
        assert_eq!(
            listed,
            vec![(4, TOMBSTONE_INDEX), (5, TOMBSTONE_INDEX), (9, 1)]
        );
        assert_eq!(store.usage().fragments, 1);
        // Dropping the tombstones (repair) leaves the newer fragment.
        for version in [4, 5] {
            store
                .delete_fragment("ns", "obj", version, TOMBSTONE_INDEX, 3)
                .unwrap();
        }
        assert_eq!(store.head("ns", "obj").unwrap().len(), 1);
        assert_eq!(store.usage().fragments, 1);
        assert_eq!(store.usage().used, newer.len() as u64);
    }

    #[test]
    fn stale_tags_are_fenced_across_restarts_and_capacity_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(4096, 3);
        let file = fragment_file("obj", 1, 0, &d);
        {
            let store = FragmentStore::open(dir.path(), 1 << 30).unwrap();
            store.set_tag("ns", 7).unwrap();
            assert!(matches!(
                store.put("ns", "obj", 1, 0, 6, &file),
                Err(BackendError::Fenced {
                    current: 7,
                    presented: 6,
                    ..
                })
            ));
            store.put("ns", "obj", 1, 0, 7, &file).unwrap();
        }
        let store = FragmentStore::open(dir.path(), file.len() as u64 + 10).unwrap();
        assert!(matches!(
            store.delete("ns", "obj", 6),
            Err(BackendError::Fenced { .. })
        ));
        // Replacing the same fragment fits; a second one does not.
        store.put("ns", "obj", 1, 0, 7, &file).unwrap();
        let other = fragment_file("obj", 1, 1, &d);
        assert!(matches!(
            store.put("ns", "obj", 1, 1, 7, &other),
            Err(BackendError::Full { .. })
        ));
        store.delete("ns", "obj", 8).unwrap();
        assert_eq!(store.usage().fragments, 0);
        assert_eq!(store.usage().used, 0);
        // One fragment at a time, fenced like the rest; absent is fine.
        store.put("ns", "obj", 1, 0, 8, &file).unwrap();
        store.verify("ns", "obj", 1, 0).unwrap();
        assert!(matches!(
            store.delete_fragment("ns", "obj", 1, 0, 7),
            Err(BackendError::Fenced { .. })
        ));
        store.delete_fragment("ns", "obj", 1, 0, 8).unwrap();
        store.delete_fragment("ns", "obj", 1, 0, 8).unwrap();
        assert!(matches!(
            store.verify("ns", "obj", 1, 0),
            Err(BackendError::NoSuchObject { .. })
        ));
        assert!(!dir.path().join("fragments/ns/obj").exists());
        assert_eq!(store.usage().used, 0);
        store.put("ns", "obj", 1, 1, 8, &other).unwrap();
    }
}
