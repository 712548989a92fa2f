//! Version-2 ("linked") objects of the [`LocalStore`]: a descriptor under `objects/` naming a
//! data file under `data/` that holds the payload (format in the parent module's docs).
//!
//! Why a separate data file instead of a hard link straight into `objects/`: the payload is the
//! caller's file byte for byte (a sealed SCO), so the object's checksums cannot live in it; a
//! descriptor that carries them, and names the payload, keeps every object self-describing and
//! replacements atomic (one rename of the descriptor), and old version-1 objects need no change.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    fsync_dir, io_err, LocalStore, DATA_DIR, HEADER_LEN, MAGIC, OBJECTS_DIR, VERSION_LINKED,
};
use crate::{chunk_crcs_of, validate_name, BackendError, OwnerTag, Result, CHUNK_SIZE};

/// Data file names are `<object name>.<unique id>`: the object's name characters only, so a
/// descriptor can never point outside `data/`.
pub(super) fn valid_data_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// The descriptor of a linked object: header, CRC table, data file name.
pub(super) fn encode_descriptor(payload_len: u64, crcs: &[u32], data_name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN as usize + crcs.len() * 4 + data_name.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION_LINKED.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&CHUNK_SIZE.to_le_bytes());
    out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    let mut tail: Vec<u8> = crcs.iter().flat_map(|crc| crc.to_le_bytes()).collect();
    tail.extend_from_slice(data_name.as_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &tail);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(data_name.len() as u32).to_le_bytes());
    out.extend_from_slice(&tail);
    out
}

impl LocalStore {
    /// A data file name no other put of this or another process uses.
    fn unique_data_name(&self, name: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{name}.{}-{}-{nanos}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The data file of the linked object at `objects_dir/name`, if that is one. Damaged or
    /// missing descriptors give `None`: then there is nothing to clean up that we could name.
    pub(super) fn data_name_of(&self, objects_dir: &Path, name: &str) -> Option<String> {
        let path = objects_dir.join(name);
        let file = File::open(&path).ok()?;
        let mut version = [0u8; 2];
        file.read_exact_at(&mut version, 4).ok()?;
        if u16::from_le_bytes(version) != VERSION_LINKED {
            return None;
        }
        // Names in errors are not needed here: only a valid header yields a name.
        self.read_header(&file, &path, "-", name).ok()?.data_name
    }

    /// Run `write`, which replaces or removes `objects_dir/name`, then remove the data file the
    /// old object used, if it was a linked one (after the descriptor no longer names it).
    pub(super) fn replacing(
        &self,
        objects_dir: &Path,
        name: &str,
        write: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let old = self.data_name_of(objects_dir, name);
        write()?;
        if let Some(old) = old {
            if self.data_name_of(objects_dir, name).as_deref() != Some(old.as_str()) {
                let data_dir = objects_dir.parent().unwrap_or(&self.root).join(DATA_DIR);
                let _ = fs::remove_file(data_dir.join(old));
            }
        }
        Ok(())
    }

    /// [`ObjectStore::put_file`](crate::ObjectStore::put_file): check `path` against the
    /// chunk CRCs, hard-link it into `data/` (or copy its first `len` bytes where it cannot be
    /// linked: another filesystem, or a file longer than `len`), make it durable, then put a
    /// descriptor naming it.
    pub(super) fn put_linked(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        len: u64,
        chunk_crcs: Option<&[u32]>,
        owner: OwnerTag,
    ) -> Result<()> {
        validate_name(name)?;
        let source_err = |source| BackendError::Source {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        let invalid = |message: String| {
            source_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                message,
            ))
        };
        let source = File::open(path).map_err(source_err)?;
        let source_len = source.metadata().map_err(source_err)?.len();
        if source_len < len {
            return Err(source_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} is {source_len} bytes, not {len}", path.display()),
            )));
        }
        let chunk_count = len.div_ceil(u64::from(CHUNK_SIZE)) as usize;
        if let Some(crcs) = chunk_crcs.filter(|crcs| crcs.len() != chunk_count) {
            return Err(invalid(format!(
                "{} chunk CRCs given for {len} bytes ({chunk_count} chunks)",
                crcs.len()
            )));
        }
        // The checksums are computed once, by the writer, from the bytes it wrote (issue 9): a
        // linked object is stored with the caller's chunk CRCs without reading the file again
        // (that read doubled the device traffic of every upload), and every read of the object
        // checks them, so damage to the file after they were computed is found on its first
        // read, as for any stored object. Without the caller's CRCs, or when the file has to be
        // copied (below), they come from one read of the bytes.
        let given = chunk_crcs.map(<[u32]>::to_vec);
        // The stored copy may be this very inode: its data must be on disk before the
        // descriptor that makes it an object is.
        source.sync_data().map_err(source_err)?;
        self.as_owner(namespace, owner, |dir| {
            let data_dir = dir.join(DATA_DIR);
            if !data_dir.is_dir() {
                fs::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
                fsync_dir(dir)?;
            }
            let data_name = self.unique_data_name(name);
            let data_path = data_dir.join(&data_name);
            let linked = source_len == len && fs::hard_link(path, &data_path).is_ok();
            if !linked {
                self.copy_into(&source, len, &data_dir, &data_name)?;
            }
            let crcs = match (&given, linked) {
                (Some(given), true) => given.clone(),
                _ => {
                    // The kernel made the copy; this is the one read of the stored bytes.
                    let read = File::open(&data_path)
                        .and_then(|file| read_chunk_crcs(&file, &data_path, len))
                        .map_err(io_err(&data_path));
                    let mismatch = match (&read, &given) {
                        (Ok(read), Some(given)) => read.iter().zip(given).position(|(a, b)| a != b),
                        _ => None,
                    };
                    match (read, mismatch) {
                        (Ok(read), None) => read,
                        (Err(e), _) => {
                            let _ = fs::remove_file(&data_path);
                            return Err(e);
                        }
                        (Ok(_), Some(chunk)) => {
                            let _ = fs::remove_file(&data_path);
                            return Err(BackendError::Corrupt {
                                namespace: namespace.to_string(),
                                name: name.to_string(),
                                reason: format!(
                                    "{} does not match the CRC its writer computed, in chunk {chunk}",
                                    path.display()
                                ),
                            });
                        }
                    }
                }
            };
            let objects_dir = dir.join(OBJECTS_DIR);
            let stored = fsync_dir(&data_dir).and_then(|()| {
                self.replacing(&objects_dir, name, || {
                    self.write_descriptor(&objects_dir, name, len, &crcs, &data_name)
                })
            });
            if stored.is_err() {
                let _ = fs::remove_file(&data_path);
            }
            stored
        })
    }

    /// Copy the first `len` bytes of `source` to `data_dir/data_name` (temp file, fsync,
    /// rename). `std::io::copy` between files uses `copy_file_range`, so the kernel copies (or
    /// reflinks, where the filesystem can) without the bytes passing through us.
    fn copy_into(&self, source: &File, len: u64, data_dir: &Path, data_name: &str) -> Result<()> {
        let temp = data_dir.join(self.temp_name(data_name));
        let result = (|| {
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_err(&temp))?;
            let mut reader = source.take(len);
            let copied = std::io::copy(&mut reader, &mut out).map_err(io_err(&temp))?;
            if copied != len {
                return Err(io_err(&temp)(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("copied {copied} of {len} bytes"),
                )));
            }
            out.flush().map_err(io_err(&temp))?;
            out.sync_all().map_err(io_err(&temp))?;
            let target = data_dir.join(data_name);
            fs::rename(&temp, &target).map_err(io_err(&target))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn write_descriptor(
        &self,
        objects_dir: &Path,
        name: &str,
        len: u64,
        crcs: &[u32],
        data_name: &str,
    ) -> Result<()> {
        let descriptor = encode_descriptor(len, crcs, data_name);
        self.atomic_write(objects_dir, name, &[&descriptor])
    }
}

/// The chunk CRCs of the first `len` bytes of the file at `path` (open as `file`), read
/// directly where possible: the write buffer writes its SCOs with `O_DIRECT`, so their data is
/// not in the page cache, and pulling 64 MiB into it only to drop it again costs more than the
/// read.
fn read_chunk_crcs(file: &File, path: &Path, len: u64) -> std::io::Result<Vec<u32>> {
    direct_chunk_crcs(path, len).unwrap_or_else(|| file_chunk_crcs(file, len))
}

/// [`file_chunk_crcs`] through an `O_DIRECT` descriptor into an aligned buffer; `None` when the
/// file system or the length does not allow direct reads (the caller reads through the page
/// cache instead).
fn direct_chunk_crcs(path: &Path, len: u64) -> Option<std::io::Result<Vec<u32>>> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096;
    if !len.is_multiple_of(ALIGN as u64) {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let step = 16 * CHUNK_SIZE as usize;
    let mut backing = vec![0u8; step + ALIGN];
    let skip = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[skip..skip + step];
    let mut crcs = Vec::with_capacity(len.div_ceil(u64::from(CHUNK_SIZE)) as usize);
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(step as u64) as usize;
        match file.read_exact_at(&mut buf[..n], offset) {
            Ok(()) => {}
            Err(e) if offset == 0 && e.raw_os_error() == Some(libc::EINVAL) => return None,
            Err(e) => return Some(Err(e)),
        }
        crcs.extend(chunk_crcs_of(&buf[..n]));
        offset += n as u64;
    }
    Some(Ok(crcs))
}

/// The chunk CRCs of the first `len` bytes of `file`, read from its start (positional reads).
fn file_chunk_crcs(file: &File, len: u64) -> std::io::Result<Vec<u32>> {
    let mut crcs = Vec::with_capacity(len.div_ceil(u64::from(CHUNK_SIZE)) as usize);
    let mut buf = vec![0u8; 16 * CHUNK_SIZE as usize];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)?;
        crcs.extend(chunk_crcs_of(&buf[..n]));
        offset += n as u64;
    }
    Ok(crcs)
}
