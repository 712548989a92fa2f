//! The local-directory object store, the embedded default backend.
//!
//! Layout under the store's root:
//!
//! ```text
//! <root>/<namespace>/owner_tag        fencing token (u64 + CRC32C), flock'ed for claims and
//!                                     conditional writes
//! <root>/<namespace>/objects/<name>   one file per object, in the object format below
//! <root>/<namespace>/objects/.tmp-*   puts in progress (removed on success or at next open)
//! <root>/<namespace>/data/<name>.<id>  payloads of version-2 objects (see below)
//! ```
//!
//! Object file format (version 1), all integers little-endian:
//!
//! ```text
//! 0   u32  magic 0x424f5356 ("VSOB")
//! 4   u16  format version (1)
//! 6   u16  reserved (0)
//! 8   u64  payload length in bytes
//! 16  u32  chunk size in bytes (65536)
//! 20  u32  chunk count = ceil(payload length / chunk size)
//! 24  u32  CRC32C of bytes 0..24 followed by the chunk CRC table
//! 28  u32  reserved (0)
//! 32  u32 × chunk count: CRC32C of each payload chunk
//! ..  payload
//! ```
//!
//! Version 2 ("linked"), written by [`ObjectStore::put_file`]: the same 32-byte header and CRC
//! table with version 2, the payload *not* inline but in `data/<data name>`, whose name follows
//! the table; bytes 28..32 hold its length N (in version 1 they are reserved), and the header
//! CRC covers bytes 0..24, the table and the name:
//!
//! ```text
//! 32       u32 × chunk count: CRC32C of each payload chunk (of the data file)
//! 32+4×n   [u8; N] data file name, `<object name>.<unique id>`
//! ```
//!
//! Why: a sealed SCO in the engine's write buffer is on the same filesystem as the embedded
//! store, so `put_file` hard-links it into `data/` (copying it only across filesystems) and
//! writes this small descriptor instead of a second copy of 64 MiB. The file is read once, from
//! the page cache, to check it against the per-chunk CRCs the engine computed while appending;
//! those become the table. The data
//! file has a unique name so that replacing an object never changes bytes a reader of the old
//! descriptor may still be reading; it is removed after its descriptor is replaced or deleted.
//! Version-1 objects stay readable and are still written by every other put. A crash between
//! linking a data file and renaming its descriptor into place leaves an unreferenced data file
//! behind (space only; nothing reads it).
//!
//! Invariants: a file under `objects/` with a name not starting with `.` is complete (it was
//! written to a temp file, fsynced, renamed into place, and the directory fsynced), so a crash
//! leaves either the old object, the new one, or none. Every read verifies the header CRC and the
//! CRC of each chunk it touches, so a ranged read of a 64 MiB SCO reads and checks only the
//! 64 KiB chunks covering the range, yet no corrupt byte is ever returned.
//!
//! Several processes may share one root (two nodes pointed at one directory share a backend).
//! Claims take an exclusive `flock` on the namespace's `owner_tag` file and conditional puts a
//! shared one, so a conditional put can never interleave with an ownership change.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{validate_name, BackendError, ChunkSpan, ObjectStore, OwnerTag, Result, CHUNK_SIZE};

mod linked;

const MAGIC: u32 = 0x424f_5356;
/// Payload inline, after the CRC table.
const VERSION: u16 = 1;
/// Payload in a data file under `data/`, named after the CRC table.
const VERSION_LINKED: u16 = 2;
const HEADER_LEN: u64 = 32;
const OWNER_TAG_FILE: &str = "owner_tag";
const OBJECTS_DIR: &str = "objects";
const DATA_DIR: &str = "data";

/// A directory holding namespaces of objects.
pub struct LocalStore {
    root: PathBuf,
    temp_counter: AtomicU64,
}

struct Header {
    payload_len: u64,
    chunk_size: u32,
    chunk_crcs: Vec<u32>,
    /// Version 2: the name of the data file under `data/` holding the payload.
    data_name: Option<String>,
}

/// An object opened for reading: where its payload is and the checksums to verify it with.
struct Opened {
    header: Header,
    /// The file holding the payload (the object file itself, or its data file).
    file: File,
    path: PathBuf,
    payload_start: u64,
}

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

impl LocalStore {
    /// Open (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(Self {
            root,
            temp_counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn namespace_dir(&self, namespace: &str) -> Result<PathBuf> {
        validate_name(namespace)?;
        let dir = self.root.join(namespace);
        if dir.join(OWNER_TAG_FILE).is_file() {
            Ok(dir)
        } else {
            Err(BackendError::NoSuchNamespace {
                namespace: namespace.to_string(),
            })
        }
    }

    fn object_path(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.namespace_dir(namespace)?.join(OBJECTS_DIR).join(name))
    }

    fn temp_name(&self, prefix: &str) -> String {
        format!(
            ".tmp-{}-{}-{}",
            prefix,
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn corrupt(namespace: &str, name: &str, reason: impl Into<String>) -> BackendError {
        BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    fn open_object(&self, namespace: &str, name: &str) -> Result<(File, PathBuf)> {
        let path = self.object_path(namespace, name)?;
        match File::open(&path) {
            Ok(file) => Ok((file, path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BackendError::NoSuchObject {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn read_header(&self, file: &File, path: &Path, namespace: &str, name: &str) -> Result<Header> {
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut fixed = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(Self::corrupt(namespace, name, "shorter than its header"));
        }
        file.read_exact_at(&mut fixed, 0).map_err(io_err(path))?;
        let u32_at =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if u32_at(&fixed, 0) != MAGIC {
            return Err(Self::corrupt(namespace, name, "bad magic number"));
        }
        let version = u16::from_le_bytes([fixed[4], fixed[5]]);
        if version != VERSION && version != VERSION_LINKED {
            return Err(Self::corrupt(
                namespace,
                name,
                format!("unsupported format version {version}"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&fixed[8..16]);
        let payload_len = u64::from_le_bytes(len_bytes);
        let chunk_size = u32_at(&fixed, 16);
        let chunk_count = u64::from(u32_at(&fixed, 20));
        let stored_crc = u32_at(&fixed, 24);
        if chunk_size == 0 || payload_len.div_ceil(u64::from(chunk_size)) != chunk_count {
            return Err(Self::corrupt(
                namespace,
                name,
                "inconsistent chunk geometry",
            ));
        }
        let table_len = chunk_count * 4;
        // Version 1: the payload follows the table; version 2: the data file's name does.
        let linked = version == VERSION_LINKED;
        let tail_len = if linked {
            u64::from(u32_at(&fixed, 28))
        } else {
            payload_len
        };
        if file_len != HEADER_LEN + table_len + tail_len {
            return Err(Self::corrupt(
                namespace,
                name,
                format!(
                    "file is {file_len} bytes, header promises {}",
                    HEADER_LEN + table_len + tail_len
                ),
            ));
        }
        let mut table = vec![0u8; (table_len + if linked { tail_len } else { 0 }) as usize];
        file.read_exact_at(&mut table, HEADER_LEN)
            .map_err(io_err(path))?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..24]), &table);
        if crc != stored_crc {
            return Err(Self::corrupt(namespace, name, "header checksum mismatch"));
        }
        let data_name = if linked {
            let bytes = table.split_off(table_len as usize);
            match String::from_utf8(bytes) {
                Ok(data_name) if linked::valid_data_name(&data_name) => Some(data_name),
                _ => return Err(Self::corrupt(namespace, name, "invalid data file name")),
            }
        } else {
            None
        };
        let chunk_crcs = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Header {
            payload_len,
            chunk_size,
            chunk_crcs,
            data_name,
        })
    }

    /// Open an object and its payload: the object file itself (version 1) or its data file
    /// (version 2), which must hold exactly the payload.
    fn open_verified(&self, namespace: &str, name: &str) -> Result<Opened> {
        let (file, path) = self.open_object(namespace, name)?;
        let header = self.read_header(&file, &path, namespace, name)?;
        let Some(data_name) = &header.data_name else {
            let payload_start = HEADER_LEN + 4 * header.chunk_crcs.len() as u64;
            return Ok(Opened {
                header,
                file,
                path,
                payload_start,
            });
        };
        let data_path = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.root)
            .join(DATA_DIR)
            .join(data_name);
        let data = match File::open(&data_path) {
            Ok(data) => data,
            // Deleted or replaced since we read the descriptor: the object is gone, not corrupt.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => {
                return Err(BackendError::NoSuchObject {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Self::corrupt(
                    namespace,
                    name,
                    format!("its data file {data_name} is missing"),
                ))
            }
            Err(e) => return Err(io_err(&data_path)(e)),
        };
        let data_len = data.metadata().map_err(io_err(&data_path))?.len();
        if data_len != header.payload_len {
            return Err(Self::corrupt(
                namespace,
                name,
                format!(
                    "its data file is {data_len} bytes, header promises {}",
                    header.payload_len
                ),
            ));
        }
        Ok(Opened {
            header,
            file: data,
            path: data_path,
            payload_start: 0,
        })
    }

    /// The header and CRC table of an object holding `data`; the payload follows it unchanged.
    fn encode_header(data: &[u8]) -> Vec<u8> {
        let crcs: Vec<u32> = data
            .chunks(CHUNK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        Self::header_from_crcs(data.len() as u64, &crcs)
    }

    fn header_from_crcs(payload_len: u64, crcs: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize + crcs.len() * 4);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&payload_len.to_le_bytes());
        out.extend_from_slice(&CHUNK_SIZE.to_le_bytes());
        out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
        let table: Vec<u8> = crcs.iter().flat_map(|crc| crc.to_le_bytes()).collect();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &table);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&table);
        out
    }

    /// Write `parts` to `dir/name` atomically: temp file, fsync, rename, fsync of the directory.
    fn atomic_write(&self, dir: &Path, name: &str, parts: &[&[u8]]) -> Result<()> {
        self.atomic_write_with(dir, name, |file, temp| {
            for part in parts {
                file.write_all(part).map_err(io_err(temp))?;
            }
            Ok(())
        })
    }

    /// Create `dir/name` atomically with content written by `fill` into a temp file.
    fn atomic_write_with(
        &self,
        dir: &Path,
        name: &str,
        fill: impl FnOnce(&mut File, &Path) -> Result<()>,
    ) -> Result<()> {
        let temp = dir.join(self.temp_name(name));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_err(&temp))?;
            fill(&mut file, &temp)?;
            file.sync_all().map_err(io_err(&temp))?;
            // Objects are cold once stored: hand their clean pages back so the next write-buffer
            // append reuses them instead of faulting in fresh memory.
            let _ = nix::fcntl::posix_fadvise(
                &file,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            let target = dir.join(name);
            fs::rename(&temp, &target).map_err(io_err(&target))?;
            fsync_dir(dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn read_owner_tag(path: &Path, namespace: &str) -> Result<OwnerTag> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_err(path))?;
        if bytes.len() != 12 {
            return Err(Self::corrupt(namespace, OWNER_TAG_FILE, "wrong length"));
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&bytes[..8]);
        let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if crc32c::crc32c(&tag) != crc {
            return Err(Self::corrupt(
                namespace,
                OWNER_TAG_FILE,
                "checksum mismatch",
            ));
        }
        Ok(u64::from_le_bytes(tag))
    }

    fn encode_owner_tag(tag: OwnerTag) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&tag.to_le_bytes());
        out[8..].copy_from_slice(&crc32c::crc32c(&tag.to_le_bytes()).to_le_bytes());
        out
    }

    /// Hold the namespace's owner lock (shared or exclusive) while `f` runs.
    fn with_owner_lock<T>(
        &self,
        namespace: &str,
        exclusive: bool,
        f: impl FnOnce(&Path, OwnerTag) -> Result<T>,
    ) -> Result<T> {
        let dir = self.namespace_dir(namespace)?;
        let lock_path = dir.join(OWNER_TAG_FILE);
        let lock = File::open(&lock_path).map_err(io_err(&lock_path))?;
        if exclusive {
            lock.lock().map_err(io_err(&lock_path))?;
        } else {
            lock.lock_shared().map_err(io_err(&lock_path))?;
        }
        let current = Self::read_owner_tag(&lock_path, namespace)?;
        let result = f(&dir, current);
        let _ = lock.unlock();
        result
    }

    /// Run `f` while `owner` holds the namespace: the shared owner lock keeps a claim from
    /// slipping in between the check and the write.
    fn as_owner<T>(
        &self,
        namespace: &str,
        owner: OwnerTag,
        f: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        self.with_owner_lock(namespace, false, |dir, current| {
            if current != owner {
                return Err(BackendError::Fenced {
                    namespace: namespace.to_string(),
                    current,
                    presented: owner,
                });
            }
            f(dir)
        })
    }

    fn remove_stale_temps(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl ObjectStore for LocalStore {
    fn create_namespace(&self, namespace: &str, owner: OwnerTag) -> Result<()> {
        validate_name(namespace)?;
        let target = self.root.join(namespace);
        if target.exists() {
            return Err(BackendError::NamespaceExists {
                namespace: namespace.to_string(),
            });
        }
        // Build the namespace under a temp name and rename it into place, so a half-created
        // namespace is never visible and two concurrent creators cannot both succeed.
        let temp = self.root.join(self.temp_name(namespace));
        let build = (|| {
            fs::create_dir_all(temp.join(OBJECTS_DIR)).map_err(io_err(&temp))?;
            self.atomic_write(&temp, OWNER_TAG_FILE, &[&Self::encode_owner_tag(owner)])?;
            fsync_dir(&temp.join(OBJECTS_DIR))?;
            fs::rename(&temp, &target).map_err(|e| {
                if e.kind() == std::io::ErrorKind::DirectoryNotEmpty
                    || e.kind() == std::io::ErrorKind::AlreadyExists
                {
                    BackendError::NamespaceExists {
                        namespace: namespace.to_string(),
                    }
                } else {
                    io_err(&target)(e)
                }
            })?;
            fsync_dir(&self.root)
        })();
        if build.is_err() {
            let _ = fs::remove_dir_all(&temp);
        }
        build
    }

    fn delete_namespace(&self, namespace: &str) -> Result<()> {
        let dir = self.namespace_dir(namespace)?;
        // Rename first so the namespace disappears atomically even if the recursive delete is
        // interrupted; leftovers are hidden (dot-prefixed) and removed here or by a later delete.
        let doomed = self
            .root
            .join(self.temp_name(&format!("deleted-{namespace}")));
        fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        fsync_dir(&self.root)?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }

    fn namespace_exists(&self, namespace: &str) -> Result<bool> {
        match self.namespace_dir(namespace) {
            Ok(_) => Ok(true),
            Err(BackendError::NoSuchNamespace { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list_namespaces(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && entry.path().join(OWNER_TAG_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn owner_tag(&self, namespace: &str) -> Result<OwnerTag> {
        self.with_owner_lock(namespace, false, |_, current| Ok(current))
    }

    fn claim(&self, namespace: &str, new: OwnerTag) -> Result<()> {
        self.with_owner_lock(namespace, true, |dir, current| {
            if new <= current {
                return Err(BackendError::Fenced {
                    namespace: namespace.to_string(),
                    current,
                    presented: new,
                });
            }
            // Rewrite in place (the flock lives on this inode): write, then fsync.
            let path = dir.join(OWNER_TAG_FILE);
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
            file.write_all(&Self::encode_owner_tag(new))
                .map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))
        })
    }

    fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()> {
        validate_name(name)?;
        let dir = self.namespace_dir(namespace)?.join(OBJECTS_DIR);
        self.replacing(&dir, name, || {
            self.atomic_write(&dir, name, &[&Self::encode_header(data), data])
        })
    }

    fn put_if_owner(
        &self,
        namespace: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> Result<()> {
        validate_name(name)?;
        let header = Self::encode_header(data);
        self.as_owner(namespace, owner, |dir| {
            let dir = dir.join(OBJECTS_DIR);
            self.replacing(&dir, name, || {
                self.atomic_write(&dir, name, &[&header, data])
            })
        })
    }

    fn put_from(
        &self,
        namespace: &str,
        name: &str,
        len: u64,
        source: &mut dyn Read,
        owner: OwnerTag,
    ) -> Result<()> {
        validate_name(name)?;
        let chunk_count = len.div_ceil(u64::from(CHUNK_SIZE)) as usize;
        let table_at = HEADER_LEN as usize;
        let payload_at = table_at + chunk_count * 4;
        let source_err = |source| BackendError::Source {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        self.as_owner(namespace, owner, |dir| {
            let dir = dir.join(OBJECTS_DIR);
            self.replacing(&dir, name, || {
                self.atomic_write_with(&dir, name, |file, temp| {
                    // Stream the payload behind room for the header, checksumming chunk by chunk,
                    // then write the header (which needs every chunk's CRC) in front of it.
                    let mut crcs = Vec::with_capacity(chunk_count);
                    let mut buf = vec![0u8; 16 * CHUNK_SIZE as usize];
                    let mut remaining = len;
                    let mut offset = payload_at as u64;
                    while remaining > 0 {
                        let n = remaining.min(buf.len() as u64) as usize;
                        source.read_exact(&mut buf[..n]).map_err(source_err)?;
                        crcs.extend(buf[..n].chunks(CHUNK_SIZE as usize).map(crc32c::crc32c));
                        file.write_all_at(&buf[..n], offset).map_err(io_err(temp))?;
                        offset += n as u64;
                        remaining -= n as u64;
                    }
                    let header = Self::header_from_crcs(len, &crcs);
                    file.write_all_at(&header, 0).map_err(io_err(temp))
                })
            })
        })
    }

    fn put_file(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        len: u64,
        chunk_crcs: Option<&[u32]>,
        owner: OwnerTag,
    ) -> Result<()> {
        self.put_linked(namespace, name, path, len, chunk_crcs, owner)
    }

    fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>> {
        let Opened {
            header,
            file,
            path,
            payload_start,
        } = self.open_verified(namespace, name)?;
        let mut data = vec![0u8; header.payload_len as usize];
        file.read_exact_at(&mut data, payload_start)
            .map_err(io_err(&path))?;
        for (index, (chunk, crc)) in data
            .chunks(header.chunk_size as usize)
            .zip(&header.chunk_crcs)
            .enumerate()
        {
            if crc32c::crc32c(chunk) != *crc {
                return Err(Self::corrupt(
                    namespace,
                    name,
                    format!("checksum mismatch in chunk {index}"),
                ));
            }
        }
        Ok(data)
    }

    fn get_range(&self, namespace: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Opened {
            header,
            file,
            path,
            payload_start,
        } = self.open_verified(namespace, name)?;
        let len = buf.len() as u64;
        let chunk_size = u64::from(header.chunk_size);
        let Some(ChunkSpan {
            first,
            start: span_start,
            end: span_end,
        }) = ChunkSpan::of(namespace, name, offset, len, header.payload_len, chunk_size)?
        else {
            return Ok(());
        };
        let mut span = vec![0u8; (span_end - span_start) as usize];
        file.read_exact_at(&mut span, payload_start + span_start)
            .map_err(io_err(&path))?;
        for (i, chunk) in span.chunks(chunk_size as usize).enumerate() {
            let index = first as usize + i;
            if crc32c::crc32c(chunk) != header.chunk_crcs[index] {
                return Err(Self::corrupt(
                    namespace,
                    name,
                    format!("checksum mismatch in chunk {index}"),
                ));
            }
        }
        let skip = (offset - span_start) as usize;
        buf.copy_from_slice(&span[skip..skip + len as usize]);
        Ok(())
    }

    fn size(&self, namespace: &str, name: &str) -> Result<u64> {
        let (file, path) = self.open_object(namespace, name)?;
        Ok(self.read_header(&file, &path, namespace, name)?.payload_len)
    }

    fn exists(&self, namespace: &str, name: &str) -> Result<bool> {
        Ok(self.object_path(namespace, name)?.is_file())
    }

    fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        let path = self.object_path(namespace, name)?;
        let dir = path.parent().unwrap_or(&self.root);
        self.replacing(dir, name, || match fs::remove_file(&path) {
            Ok(()) => fsync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        })
    }

    fn delete_if_owner(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()> {
        self.as_owner(namespace, owner, |_| self.delete(namespace, name))
    }

    fn list(&self, namespace: &str) -> Result<Vec<String>> {
        let dir = self.namespace_dir(namespace)?.join(OBJECTS_DIR);
        Self::remove_stale_temps(&dir);
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path().join("backend")).expect("open store");
        (dir, store)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn put_get_round_trip_and_list() {
        let (_dir, store) = store();
        store.create_namespace("vol1", 1).unwrap();
        let data = pattern(200_000, 7);
        store.put("vol1", "00_00000001_00", &data).unwrap();
        store.put("vol1", "tlog_00000001", b"small").unwrap();
        assert_eq!(store.get("vol1", "00_00000001_00").unwrap(), data);
        assert_eq!(store.size("vol1", "00_00000001_00").unwrap(), 200_000);
        assert_eq!(
            store.list("vol1").unwrap(),
            vec!["00_00000001_00".to_string(), "tlog_00000001".to_string()]
        );
        store.put("vol1", "tlog_00000001", b"replaced").unwrap();
        assert_eq!(store.get("vol1", "tlog_00000001").unwrap(), b"replaced");
        store.delete("vol1", "tlog_00000001").unwrap();
        store.delete("vol1", "tlog_00000001").unwrap();
        assert!(!store.exists("vol1", "tlog_00000001").unwrap());
        assert_eq!(store.list_namespaces().unwrap(), vec!["vol1".to_string()]);
    }

    #[test]
    fn empty_object_round_trips() {
        let (_dir, store) = store();
        store.create_namespace("ns", 0).unwrap();
        store.put("ns", "empty", b"").unwrap();
        assert_eq!(store.get("ns", "empty").unwrap(), Vec::<u8>::new());
        let mut nothing = [0u8; 0];
        store.get_range("ns", "empty", 0, &mut nothing).unwrap();
    }

    #[test]
    fn ranged_reads_match_and_bounds_are_checked() {
        let (_dir, store) = store();
        store.create_namespace("ns", 0).unwrap();
        let data = pattern(3 * CHUNK_SIZE as usize + 1000, 3);
        store.put("ns", "obj", &data).unwrap();
        for (offset, len) in [
            (0usize, 1usize),
            (65535, 2),
            (4096, 8192),
            (131000, 60000),
            (data.len() - 10, 10),
        ] {
            let mut buf = vec![0u8; len];
            store
                .get_range("ns", "obj", offset as u64, &mut buf)
                .unwrap();
            assert_eq!(buf, data[offset..offset + len], "range {offset}+{len}");
        }
        let mut buf = vec![0u8; 11];
        let err = store
            .get_range("ns", "obj", (data.len() - 10) as u64, &mut buf)
            .unwrap_err();
        assert!(
            matches!(err, BackendError::RangeOutOfBounds { .. }),
            "{err}"
        );
        let err = store
            .get_range("ns", "obj", u64::MAX, &mut buf)
            .unwrap_err();
        assert!(
            matches!(err, BackendError::RangeOutOfBounds { .. }),
            "{err}"
        );
    }

    fn object_file(store: &LocalStore, ns: &str, name: &str) -> PathBuf {
        store.root().join(ns).join(OBJECTS_DIR).join(name)
    }

    #[test]
    fn every_corrupted_byte_is_detected() {
        let (_dir, store) = store();
        store.create_namespace("ns", 0).unwrap();
        let data = pattern(70_000, 9);
        store.put("ns", "obj", &data).unwrap();
        let path = object_file(&store, "ns", "obj");
        let pristine = fs::read(&path).unwrap();
        // Flip a bit in the header, the CRC table, and several payload positions.
        for pos in [
            0usize,
            5,
            9,
            17,
            21,
            25,
            33,
            36,
            40,
            1000,
            65_600,
            pristine.len() - 1,
        ] {
            let mut bad = pristine.clone();
            bad[pos] ^= 0x10;
            fs::write(&path, &bad).unwrap();
            let err = store.get("ns", "obj").unwrap_err();
            assert!(
                matches!(err, BackendError::Corrupt { .. }),
                "flip at {pos} gave {err}"
            );
            assert!(err.to_string().contains("ns/obj"), "{err}");
        }
        // Truncation is corruption too.
        fs::write(&path, &pristine[..pristine.len() - 1]).unwrap();
        assert!(matches!(
            store.get("ns", "obj").unwrap_err(),
            BackendError::Corrupt { .. }
        ));
        // A ranged read of an intact chunk still works when another chunk is damaged, and a
        // ranged read touching the damaged chunk fails.
        let mut bad = pristine.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        fs::write(&path, &bad).unwrap();
        let mut buf = vec![0u8; 4096];
        store.get_range("ns", "obj", 0, &mut buf).unwrap();
        assert_eq!(buf, data[..4096]);
        let mut tail = vec![0u8; 16];
        assert!(matches!(
            store.get_range("ns", "obj", (data.len() - 16) as u64, &mut tail),
            Err(BackendError::Corrupt { .. })
        ));
    }

    #[test]
    fn missing_things_are_named_in_errors() {
        let (_dir, store) = store();
        let err = store.get("nope", "obj").unwrap_err();
        assert_eq!(err.to_string(), "namespace nope does not exist");
        store.create_namespace("ns", 0).unwrap();
        let err = store.get("ns", "obj").unwrap_err();
        assert_eq!(err.to_string(), "object ns/obj does not exist");
        assert!(matches!(
            store.create_namespace("ns", 0),
            Err(BackendError::NamespaceExists { .. })
        ));
        assert!(matches!(
            store.put("ns", "../escape", b"x"),
            Err(BackendError::InvalidName { .. })
        ));
        assert!(matches!(
            store.put("ns", ".hidden", b"x"),
            Err(BackendError::InvalidName { .. })
        ));
    }

    #[test]
    fn fencing_refuses_stale_owners() {
        let (_dir, store) = store();
        store.create_namespace("ns", 5).unwrap();
        assert_eq!(store.owner_tag("ns").unwrap(), 5);
        store.put_if_owner("ns", "a", b"1", 5).unwrap();
        store.claim("ns", 6).unwrap();
        let err = store.put_if_owner("ns", "a", b"2", 5).unwrap_err();
        assert!(matches!(
            err,
            BackendError::Fenced {
                current: 6,
                presented: 5,
                ..
            }
        ));
        assert_eq!(store.get("ns", "a").unwrap(), b"1");
        assert!(matches!(
            store.delete_if_owner("ns", "a", 5),
            Err(BackendError::Fenced { .. })
        ));
        assert!(matches!(
            store.claim("ns", 6),
            Err(BackendError::Fenced { .. })
        ));
        store.put_if_owner("ns", "a", b"3", 6).unwrap();
        assert_eq!(store.get("ns", "a").unwrap(), b"3");
        store.delete_if_owner("ns", "a", 6).unwrap();
        assert!(!store.exists("ns", "a").unwrap());
    }

    #[test]
    fn streaming_put_matches_buffered_put() {
        let (_dir, store) = store();
        store.create_namespace("ns", 3).unwrap();
        let data = pattern(5 * CHUNK_SIZE as usize * 16 + 12_345, 11);
        store
            .put_from("ns", "streamed", data.len() as u64, &mut &data[..], 3)
            .unwrap();
        store.put_if_owner("ns", "buffered", &data, 3).unwrap();
        let dir = store.root().join("ns").join(OBJECTS_DIR);
        assert_eq!(
            fs::read(dir.join("streamed")).unwrap(),
            fs::read(dir.join("buffered")).unwrap(),
            "identical on-disk objects"
        );
        let mut part = vec![0u8; 70_000];
        store
            .get_range("ns", "streamed", 1_000_000, &mut part)
            .unwrap();
        assert_eq!(part, data[1_000_000..1_070_000]);

        let err = store
            .put_from("ns", "short", data.len() as u64 + 1, &mut &data[..], 3)
            .unwrap_err();
        assert!(matches!(err, BackendError::Source { .. }), "{err}");
        assert!(
            !store.exists("ns", "short").unwrap(),
            "nothing half-written is visible"
        );
        let err = store
            .put_from("ns", "fenced", 4, &mut &b"abcd"[..], 2)
            .unwrap_err();
        assert!(matches!(err, BackendError::Fenced { .. }), "{err}");
        assert_eq!(store.list("ns").unwrap(), vec!["buffered", "streamed"]);
    }

    /// A file outside the store (as the engine's write buffer is) holding `data`.
    fn source_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, data).unwrap();
        path
    }

    fn data_files(store: &LocalStore, ns: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.root().join(ns).join(DATA_DIR))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn put_file_links_the_file_and_reads_verify_it() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        store.create_namespace("ns", 4).unwrap();
        let data = pattern(5 * CHUNK_SIZE as usize + 4096, 21);
        let source = source_file(dir.path(), "sco", &data);
        let crcs = crate::chunk_crcs_of(&data);
        store
            .put_file("ns", "sco", &source, data.len() as u64, Some(&crcs), 4)
            .unwrap();
        let linked = data_files(&store, "ns");
        assert_eq!(linked.len(), 1, "one data file");
        let data_path = store.root().join("ns").join(DATA_DIR).join(&linked[0]);
        assert_eq!(
            fs::metadata(&data_path).unwrap().ino(),
            fs::metadata(&source).unwrap().ino(),
            "hard link, not a copy"
        );
        assert_eq!(store.get("ns", "sco").unwrap(), data);
        assert_eq!(store.size("ns", "sco").unwrap(), data.len() as u64);
        assert_eq!(store.list("ns").unwrap(), vec!["sco"]);
        let mut part = vec![0u8; 70_000];
        store.get_range("ns", "sco", 100_000, &mut part).unwrap();
        assert_eq!(part, data[100_000..170_000]);

        // The caller may unlink its copy (write-buffer eviction): the object stays.
        fs::remove_file(&source).unwrap();
        assert_eq!(store.get("ns", "sco").unwrap(), data);

        // A damaged payload byte is caught by ranged reads of its chunk only.
        let mut bad = fs::read(&data_path).unwrap();
        bad[2 * CHUNK_SIZE as usize + 7] ^= 0x40;
        fs::write(&data_path, &bad).unwrap();
        let mut buf = vec![0u8; 4096];
        store.get_range("ns", "sco", 0, &mut buf).unwrap();
        assert_eq!(buf, data[..4096]);
        let err = store
            .get_range("ns", "sco", 2 * u64::from(CHUNK_SIZE), &mut buf)
            .unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("ns/sco"), "{err}");
        assert!(matches!(
            store.get("ns", "sco"),
            Err(BackendError::Corrupt { .. })
        ));
        // So is a damaged descriptor (header, CRC table, data file name) or a truncated payload.
        let descriptor_path = object_file(&store, "ns", "sco");
        let descriptor = fs::read(&descriptor_path).unwrap();
        for pos in [0usize, 4, 9, 17, 25, 29, 33, descriptor.len() - 1] {
            let mut bad = descriptor.clone();
            bad[pos] ^= 0x10;
            fs::write(&descriptor_path, &bad).unwrap();
            assert!(
                matches!(
                    store.get_range("ns", "sco", 0, &mut buf),
                    Err(BackendError::Corrupt { .. })
                ),
                "flip at {pos}"
            );
        }
        fs::write(&descriptor_path, &descriptor).unwrap();
        fs::write(&data_path, &data[..data.len() - 1]).unwrap();
        assert!(matches!(
            store.get_range("ns", "sco", 0, &mut buf),
            Err(BackendError::Corrupt { .. })
        ));

        // Replacing it with an inline object, and deleting that, leaves no data file behind.
        store.put_if_owner("ns", "sco", b"inline", 4).unwrap();
        assert_eq!(store.get("ns", "sco").unwrap(), b"inline");
        assert!(data_files(&store, "ns").is_empty());
        let source = source_file(dir.path(), "sco2", &data);
        store
            .put_file("ns", "sco", &source, data.len() as u64, None, 4)
            .unwrap();
        assert_eq!(
            store.get("ns", "sco").unwrap(),
            data,
            "CRCs computed by the store"
        );
        store.delete("ns", "sco").unwrap();
        assert!(!store.exists("ns", "sco").unwrap());
        assert!(data_files(&store, "ns").is_empty());
        assert_eq!(
            fs::read(&source).unwrap(),
            data,
            "the caller's file is untouched"
        );
    }

    #[test]
    fn put_file_copies_what_it_cannot_link() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        store.create_namespace("ns", 1).unwrap();
        let data = pattern(2 * CHUNK_SIZE as usize + 10, 5);
        // A file longer than the object cannot be linked: only its first `len` bytes are copied.
        let mut longer = data.clone();
        longer.extend_from_slice(b"tail that is not part of the object");
        let source = source_file(dir.path(), "longer", &longer);
        let crcs = crate::chunk_crcs_of(&data);
        store
            .put_file("ns", "obj", &source, data.len() as u64, Some(&crcs), 1)
            .unwrap();
        assert_eq!(store.get("ns", "obj").unwrap(), data);
        let copies = data_files(&store, "ns");
        let copy = store.root().join("ns").join(DATA_DIR).join(&copies[0]);
        assert_ne!(
            fs::metadata(&copy).unwrap().ino(),
            fs::metadata(&source).unwrap().ino()
        );
        // Across filesystems (when /dev/shm is another one here) it is copied as well.
        let shm = Path::new("/dev/shm");
        let other_fs = shm.is_dir()
            && fs::metadata(shm).map(|m| m.dev()).ok()
                != fs::metadata(store.root()).map(|m| m.dev()).ok();
        if other_fs {
            let elsewhere = tempfile::tempdir_in(shm).unwrap();
            let source = source_file(elsewhere.path(), "sco", &data);
            store
                .put_file("ns", "far", &source, data.len() as u64, Some(&crcs), 1)
                .unwrap();
            assert_eq!(store.get("ns", "far").unwrap(), data);
        }
        // A source shorter than promised, or CRCs that do not fit, store nothing.
        let source = source_file(dir.path(), "exact", &data);
        let err = store
            .put_file("ns", "short", &source, data.len() as u64 + 1, None, 1)
            .unwrap_err();
        assert!(matches!(err, BackendError::Source { .. }), "{err}");
        let err = store
            .put_file("ns", "bad", &source, data.len() as u64, Some(&crcs[..1]), 1)
            .unwrap_err();
        assert!(matches!(err, BackendError::Source { .. }), "{err}");
        assert!(!store.exists("ns", "short").unwrap());
        assert!(!store.exists("ns", "bad").unwrap());
        // A copy is read once and checked against the writer's CRCs: a damaged file is refused
        // and leaves no data file behind.
        let before = data_files(&store, "ns").len();
        let mut damaged = longer.clone();
        damaged[CHUNK_SIZE as usize + 1] ^= 0x40;
        let source = source_file(dir.path(), "damaged", &damaged);
        let err = store
            .put_file("ns", "dmg", &source, data.len() as u64, Some(&crcs), 1)
            .unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("chunk 1"), "{err}");
        assert!(!store.exists("ns", "dmg").unwrap());
        assert_eq!(data_files(&store, "ns").len(), before);
    }

    #[test]
    fn a_linked_file_damaged_after_its_crcs_were_computed_is_caught_on_its_first_read() {
        let (dir, store) = store();
        store.create_namespace("ns", 2).unwrap();
        let data = pattern(3 * CHUNK_SIZE as usize, 8);
        let crcs = crate::chunk_crcs_of(&data);
        let mut damaged = data.clone();
        damaged[CHUNK_SIZE as usize + 3] ^= 1;
        let source = source_file(dir.path(), "sco", &damaged);
        // Linked: stored with the writer's checksums, not read again (one checksum pass).
        store
            .put_file("ns", "sco", &source, data.len() as u64, Some(&crcs), 2)
            .unwrap();
        let err = store.get("ns", "sco").unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("chunk 1"), "{err}");
        let mut buf = vec![0u8; 4096];
        let err = store
            .get_range("ns", "sco", u64::from(CHUNK_SIZE), &mut buf)
            .unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");
        // The undamaged chunks still read back.
        store.get_range("ns", "sco", 0, &mut buf).unwrap();
        assert_eq!(buf, data[..4096]);
    }

    #[test]
    fn put_file_is_fenced() {
        let (dir, store) = store();
        store.create_namespace("ns", 7).unwrap();
        let data = pattern(100_000, 1);
        let source = source_file(dir.path(), "sco", &data);
        store.claim("ns", 8).unwrap();
        let err = store
            .put_file("ns", "sco", &source, data.len() as u64, None, 7)
            .unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::Fenced {
                    current: 8,
                    presented: 7,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!store.exists("ns", "sco").unwrap());
        assert!(data_files(&store, "ns").is_empty(), "no data file left");
        store
            .put_file("ns", "sco", &source, data.len() as u64, None, 8)
            .unwrap();
        assert_eq!(store.get("ns", "sco").unwrap(), data);
    }

    #[test]
    fn interrupted_puts_leave_no_visible_object() {
        let (_dir, store) = store();
        store.create_namespace("ns", 0).unwrap();
        let dir = store.root().join("ns").join(OBJECTS_DIR);
        fs::write(dir.join(".tmp-obj-1-1"), b"half written").unwrap();
        assert_eq!(store.list("ns").unwrap(), Vec::<String>::new());
        assert!(!dir.join(".tmp-obj-1-1").exists());
    }

    #[test]
    fn delete_namespace_removes_everything() {
        let (_dir, store) = store();
        store.create_namespace("ns", 0).unwrap();
        store.put("ns", "a", b"1").unwrap();
        store.delete_namespace("ns").unwrap();
        assert!(!store.namespace_exists("ns").unwrap());
        assert!(store.list_namespaces().unwrap().is_empty());
        store.create_namespace("ns", 1).unwrap();
        assert!(store.list("ns").unwrap().is_empty());
    }
}
