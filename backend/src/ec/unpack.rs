//! The `ec` store's read path for a compressing namespace: ranged reads of an object stored as
//! a compressed container (`compress`). The container's block index is read once per object
//! version (its first bytes, one request to one OSD for an object up to 128 MiB) and cached;
//! a ranged read then asks only for the stored bytes of the blocks holding the range, and
//! decompresses those. The index and the blocks must come from the same version: a read that
//! finds the object rewritten between the two reads its index again, and a whole-object read
//! (`get`) is as long as the version it returns, never a prefix of a newer one sized by an
//! older index.

use std::sync::Arc;

use super::compress::{self, BlockIndex, Parsed};
use super::store::EcStore;
use crate::{BackendError, Result};

/// Blocks whose index the first read of an object covers (128 MiB at 64 KiB blocks, the
/// largest SCO): larger indexes take a second read.
const FIRST_READ_BLOCKS: u64 = 2048;

fn corrupt(namespace: &str, name: &str, reason: String) -> BackendError {
    BackendError::Corrupt {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    }
}

impl EcStore {
    /// The block index of the newest version of `name`, and that version.
    pub(super) fn block_index(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(u64, Arc<BlockIndex>)> {
        let found = self.find(namespace, name)?;
        let key = (namespace.to_string(), name.to_string());
        if let Some((version, index)) = self.indexes.lock().get(&key) {
            if *version == found.version {
                return Ok((*version, index.clone()));
            }
        }
        let mut want = found
            .layout
            .size
            .min(compress::index_len(FIRST_READ_BLOCKS));
        loop {
            let mut prefix = vec![0u8; usize::try_from(want).unwrap_or(usize::MAX)];
            let (version, stored) = self.read_stored(namespace, name, 0, &mut prefix)?;
            match compress::parse_index(&prefix, stored)
                .map_err(|reason| corrupt(namespace, name, reason))?
            {
                Parsed::Index(index) => {
                    self.indexes.lock().insert(key, (version, index.clone()));
                    return Ok((version, index));
                }
                Parsed::Need(more) if more > want && more <= stored => want = more,
                Parsed::Need(more) => {
                    return Err(corrupt(
                        namespace,
                        name,
                        format!("its index needs {more} of its {stored} bytes"),
                    ))
                }
            }
        }
    }

    /// Read `[offset, offset + buf.len())` of a compressed object: only the blocks holding it.
    pub(super) fn read_compressed(
        &self,
        namespace: &str,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        self.one_version(namespace, name, 2, |version, index| {
            self.unpack_version(namespace, name, version, index, offset, buf)
                .map(|done| done.then_some(()))
        })
    }

    /// The whole of a compressed object, one version: sized by the index of the version whose
    /// blocks are read.
    pub(super) fn get_compressed(
        &self,
        namespace: &str,
        name: &str,
        attempts: usize,
    ) -> Result<Vec<u8>> {
        self.one_version(namespace, name, attempts, |version, index| {
            let mut buf = vec![0u8; usize::try_from(index.size).unwrap_or(usize::MAX)];
            self.unpack_version(namespace, name, version, index, 0, &mut buf)
                .map(|done| done.then_some(buf))
        })
    }

    /// Run `read` with the newest block index until it reads the blocks of that index's version
    /// (`Some`), at most `attempts` times. An object rewritten in between is found again: the
    /// cached index and the cached location may both be what is stale.
    fn one_version<T>(
        &self,
        namespace: &str,
        name: &str,
        attempts: usize,
        mut read: impl FnMut(u64, &BlockIndex) -> Result<Option<T>>,
    ) -> Result<T> {
        for _ in 0..attempts {
            let (version, index) = self.block_index(namespace, name)?;
            if let Some(out) = read(version, &index)? {
                return Ok(out);
            }
            self.indexes
                .lock()
                .remove(&(namespace.to_string(), name.to_string()));
            self.forget(namespace, name);
        }
        Err(BackendError::Osd {
            addr: "-".into(),
            reason: format!("{namespace}/{name} was rewritten {attempts} times while it was read"),
        })
    }

    /// Read `[offset, offset + buf.len())` through `index`, the block index of `version`.
    /// `Ok(false)`: the stored bytes read belong to another version, or that version is too
    /// short for `index`'s span (the object was rewritten), and `buf` holds nothing meaningful.
    fn unpack_version(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: &BlockIndex,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > index.size) {
            return Err(BackendError::RangeOutOfBounds {
                namespace: namespace.to_string(),
                name: name.to_string(),
                offset,
                len,
                size: index.size,
            });
        }
        if len == 0 {
            return Ok(true);
        }
        let blocks = index.blocks_for(offset, len);
        let (at, stored_len) = index.stored_span(blocks.0, blocks.1);
        let mut stored = vec![0u8; usize::try_from(stored_len).unwrap_or(usize::MAX)];
        match self.read_stored(namespace, name, at, &mut stored) {
            Ok((read, _)) if read == version => {}
            // Another version: its blocks lie elsewhere, or past its (shorter) end.
            Ok(_) | Err(BackendError::RangeOutOfBounds { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        index
            .unpack(blocks, &stored, offset, buf)
            .map_err(|reason| corrupt(namespace, name, format!("v{version}: {reason}")))?;
        Ok(true)
    }
}
