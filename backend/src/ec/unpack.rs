//! The `ec` store's read path for a compressing namespace: ranged reads of an object stored as
//! a compressed container (`compress`). The container's block index is read once per object
//! version (its first bytes, one request to one OSD for an object up to 128 MiB) and cached;
//! a ranged read then asks only for the stored bytes of the blocks holding the range, and
//! decompresses those. The index and the blocks must come from the same version: a read that
//! finds the object rewritten between the two reads its index again.

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
        let key = (namespace.to_string(), name.to_string());
        for _ in 0..2 {
            let (version, index) = self.block_index(namespace, name)?;
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
                return Ok(());
            }
            let blocks = index.blocks_for(offset, len);
            let (at, stored_len) = index.stored_span(blocks.0, blocks.1);
            let mut stored = vec![0u8; usize::try_from(stored_len).unwrap_or(usize::MAX)];
            let (read, _) = self.read_stored(namespace, name, at, &mut stored)?;
            if read != version {
                // Rewritten between the index and the blocks: read its index again.
                self.indexes.lock().remove(&key);
                continue;
            }
            return index
                .unpack(blocks, &stored, offset, buf)
                .map_err(|reason| corrupt(namespace, name, format!("v{version}: {reason}")));
        }
        Err(BackendError::Osd {
            addr: "-".into(),
            reason: format!("{namespace}/{name} was rewritten twice while it was read"),
        })
    }
}
