//! The MDS's tables on disk, in one [redb](https://docs.rs/redb) database file.
//!
//! Why redb: the tables need atomic multi-key updates (one TLog's updates and its new cork in
//! one commit, or none of them) and must survive `kill -9` and power loss without a repair step.
//! redb gives ACID transactions over copy-on-write B-trees in a single file, with a commit that
//! is durable when it returns (two-phase fsync, checksummed pages), in pure Rust and with no
//! background threads. fjall (an LSM tree) needs its own journal and compaction threads, and
//! RocksDB a C++ build; neither buys anything at an MDS's write rate (one commit per TLog).
//!
//! Layout: table `volumes` maps a volume name to its encoded [`TableMeta`] (role, owner tag,
//! cork, counters, namespace); table `map:<volume>` maps cluster address → raw location. Every
//! change of a volume's map is committed together with its metadata (cork), so a reopened store
//! always holds a map that matches its cork exactly.
//!
//! The store is synchronous: the server runs it on the blocking pool.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{MdsError, Result};
use crate::table::{check_set, Cork, Role, TableMeta, Update};

/// The database file inside the MDS data directory.
pub const DB_FILE: &str = "mds.redb";

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

fn map_table_name(volume: &str) -> String {
    format!("map:{volume}")
}

/// Longest volume name the MDS accepts (table names stay short).
pub const MAX_VOLUME_NAME: usize = 255;

/// A table's metadata plus how many clusters its map holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub volume: String,
    pub meta: TableMeta,
    pub entries: u64,
}

/// The per-volume tables of one MDS.
pub struct MdsStore {
    db: Database,
    path: PathBuf,
}

fn check_name(volume: &str) -> Result<()> {
    if volume.is_empty() || volume.len() > MAX_VOLUME_NAME {
        return Err(MdsError::Invalid {
            volume: volume.to_string(),
            reason: format!("volume name must be 1..={MAX_VOLUME_NAME} bytes"),
        });
    }
    Ok(())
}

fn apply_updates(
    table: &mut redb::Table<'_, u64, u64>,
    updates: &[Update],
) -> std::result::Result<(), redb::StorageError> {
    for u in updates {
        match *u {
            Update::Loc { address, location } if location as u32 == 0 => {
                table.remove(address)?;
            }
            Update::Loc { address, location } => {
                table.insert(address, location)?;
            }
            Update::Trim { start, count } => {
                let end = start.saturating_add(count);
                table.retain_in(start..end, |_, _| false)?;
            }
        }
    }
    Ok(())
}

impl MdsStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| MdsError::Store {
            path: dir.display().to_string(),
            what: "create the data directory".into(),
            source: Box::new(e.into()),
        })?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(MdsError::store(&path, "open"))?;
        let store = Self { db, path };
        // Make sure the volumes table exists so readers never see "no such table".
        let tx = store
            .db
            .begin_write()
            .map_err(MdsError::store(&store.path, "begin"))?;
        tx.open_table(VOLUMES)
            .map_err(MdsError::store(&store.path, "open table volumes"))?;
        tx.commit()
            .map_err(MdsError::store(&store.path, "commit"))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err<E: Into<redb::Error>>(&self, what: impl Into<String>) -> impl FnOnce(E) -> MdsError {
        MdsError::store(&self.path, what)
    }

    fn decode_meta(volume: &str, bytes: &[u8]) -> Result<TableMeta> {
        TableMeta::decode(bytes).map_err(|reason| MdsError::Corrupt {
            volume: volume.to_string(),
            reason,
        })
    }

    /// The table's metadata, `None` without a table.
    pub fn meta(&self, volume: &str) -> Result<Option<TableMeta>> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
        let got = volumes.get(volume).map_err(self.err("read volumes"))?;
        got.map(|v| Self::decode_meta(volume, v.value()))
            .transpose()
    }

    fn require_meta(&self, volume: &str) -> Result<TableMeta> {
        self.meta(volume)?.ok_or_else(|| MdsError::NoTable {
            volume: volume.to_string(),
        })
    }

    /// Every table with its metadata and size, by volume name.
    pub fn tables(&self) -> Result<Vec<TableInfo>> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
        let mut out = Vec::new();
        for item in volumes.iter().map_err(self.err("list volumes"))? {
            let (k, v) = item.map_err(self.err("list volumes"))?;
            let volume = k.value().to_string();
            let meta = Self::decode_meta(&volume, v.value())?;
            let entries = self.entries_in(&tx, &volume)?;
            out.push(TableInfo {
                volume,
                meta,
                entries,
            });
        }
        Ok(out)
    }

    fn entries_in(&self, tx: &redb::ReadTransaction, volume: &str) -> Result<u64> {
        let name = map_table_name(volume);
        let def: TableDefinition<u64, u64> = TableDefinition::new(&name);
        match tx.open_table(def) {
            Ok(t) => t.len().map_err(self.err("count entries")),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err("open map")(e)),
        }
    }

    /// One table's metadata and size.
    pub fn info(&self, volume: &str) -> Result<TableInfo> {
        let meta = self.require_meta(volume)?;
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        Ok(TableInfo {
            volume: volume.to_string(),
            entries: self.entries_in(&tx, volume)?,
            meta,
        })
    }

    /// Create the table if needed and set its role. A role change with an owner tag older than
    /// the table's is refused; a newer one raises the table's tag.
    pub fn set_role(
        &self,
        volume: &str,
        namespace: &str,
        role: Role,
        owner_tag: u64,
    ) -> Result<TableMeta> {
        check_name(volume)?;
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        let meta = {
            let mut volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
            let old = volumes
                .get(volume)
                .map_err(self.err("read volumes"))?
                .map(|v| Self::decode_meta(volume, v.value()))
                .transpose()?;
            let meta = match old {
                Some(mut meta) => {
                    if owner_tag < meta.owner_tag {
                        return Err(MdsError::Fenced {
                            volume: volume.to_string(),
                            got: owner_tag,
                            known: meta.owner_tag,
                        });
                    }
                    if meta.namespace != namespace {
                        return Err(MdsError::Invalid {
                            volume: volume.to_string(),
                            reason: format!(
                                "table is for namespace {:?}, not {namespace:?}",
                                meta.namespace
                            ),
                        });
                    }
                    meta.role = role;
                    meta.owner_tag = owner_tag;
                    meta
                }
                None => TableMeta::new(namespace, role, owner_tag),
            };
            volumes
                .insert(volume, meta.encode().as_slice())
                .map_err(self.err("write volumes"))?;
            meta
        };
        tx.commit().map_err(self.err("commit"))?;
        Ok(meta)
    }

    /// The master's multi-set: apply `updates` and move the cork from `expect` to `cork`, in one
    /// commit. Refused (see [`check_set`]) for an old owner tag, on a slave, or when the table is
    /// not at `expect`; a refusal is counted.
    pub fn multi_set(
        &self,
        volume: &str,
        owner_tag: u64,
        expect: Cork,
        cork: Cork,
        updates: &[Update],
    ) -> Result<TableMeta> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        let outcome = {
            let mut volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
            let mut meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
                Some(v) => Self::decode_meta(volume, v.value())?,
                None => {
                    return Err(MdsError::NoTable {
                        volume: volume.to_string(),
                    })
                }
            };
            match check_set(volume, &meta, owner_tag, expect) {
                Ok(()) => {
                    let name = map_table_name(volume);
                    let mut map = tx
                        .open_table(TableDefinition::<u64, u64>::new(&name))
                        .map_err(self.err("open map"))?;
                    apply_updates(&mut map, updates).map_err(self.err("update map"))?;
                    meta.owner_tag = owner_tag;
                    meta.cork = cork;
                    meta.counters.sets += 1;
                    volumes
                        .insert(volume, meta.encode().as_slice())
                        .map_err(self.err("write volumes"))?;
                    Ok(meta)
                }
                Err(refusal) => {
                    meta.counters.refused += 1;
                    volumes
                        .insert(volume, meta.encode().as_slice())
                        .map_err(self.err("write volumes"))?;
                    Err(refusal)
                }
            }
        };
        tx.commit().map_err(self.err("commit"))?;
        outcome
    }

    /// Catch-up's step: apply one backend TLog's updates (after clearing the map when `reset`)
    /// and move the cork from `expect` to `cork`. Refused with `CorkMismatch` if the table moved
    /// meanwhile (the master took a set): the caller plans again.
    pub fn replay(
        &self,
        volume: &str,
        reset: bool,
        expect: Cork,
        cork: Cork,
        updates: &[Update],
    ) -> Result<TableMeta> {
        self.replay_batch(volume, reset, expect, &[(cork, updates.to_vec())])
    }

    /// [`replay`](Self::replay) of several consecutive TLogs in one commit (`steps`: the cork
    /// after each and its updates, in order). One commit per batch instead of per TLog is what
    /// makes catch-up fast (a commit is two fsyncs); the batch is still all-or-nothing.
    pub fn replay_batch(
        &self,
        volume: &str,
        reset: bool,
        expect: Cork,
        steps: &[(Cork, Vec<Update>)],
    ) -> Result<TableMeta> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        let meta = {
            let mut volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
            let mut meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
                Some(v) => Self::decode_meta(volume, v.value())?,
                None => {
                    return Err(MdsError::NoTable {
                        volume: volume.to_string(),
                    })
                }
            };
            if meta.cork != expect {
                return Err(MdsError::CorkMismatch {
                    volume: volume.to_string(),
                    expected: expect,
                    have: meta.cork,
                });
            }
            let name = map_table_name(volume);
            let def = TableDefinition::<u64, u64>::new(&name);
            if reset {
                tx.delete_table(def).map_err(self.err("clear map"))?;
                meta.counters.full_rebuilds += 1;
                meta.cork = Cork::EMPTY;
            }
            let mut map = tx.open_table(def).map_err(self.err("open map"))?;
            for (cork, updates) in steps {
                apply_updates(&mut map, updates).map_err(self.err("update map"))?;
                meta.counters.tlogs_replayed += u64::from(*cork != meta.cork);
                meta.cork = *cork;
            }
            volumes
                .insert(volume, meta.encode().as_slice())
                .map_err(self.err("write volumes"))?;
            meta
        };
        tx.commit().map_err(self.err("commit"))?;
        Ok(meta)
    }

    /// Count an incremental catch-up (one that replayed on top of the cork).
    pub fn count_incremental(&self, volume: &str) -> Result<()> {
        self.update_meta(volume, |m| m.counters.incremental += 1)
    }

    fn update_meta(&self, volume: &str, change: impl FnOnce(&mut TableMeta)) -> Result<()> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            let mut volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
            let mut meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
                Some(v) => Self::decode_meta(volume, v.value())?,
                None => {
                    return Err(MdsError::NoTable {
                        volume: volume.to_string(),
                    })
                }
            };
            change(&mut meta);
            volumes
                .insert(volume, meta.encode().as_slice())
                .map_err(self.err("write volumes"))?;
        }
        tx.commit().map_err(self.err("commit"))
    }

    /// Locations of `addresses` (0 = unwritten) and the cork they are as of.
    pub fn multi_get(&self, volume: &str, addresses: &[u64]) -> Result<(Cork, Vec<u64>)> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
        let meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
            Some(v) => Self::decode_meta(volume, v.value())?,
            None => {
                return Err(MdsError::NoTable {
                    volume: volume.to_string(),
                })
            }
        };
        let name = map_table_name(volume);
        let map = match tx.open_table(TableDefinition::<u64, u64>::new(&name)) {
            Ok(map) => map,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok((meta.cork, vec![0; addresses.len()]))
            }
            Err(e) => return Err(self.err("open map")(e)),
        };
        let mut out = Vec::with_capacity(addresses.len());
        for a in addresses {
            out.push(
                map.get(*a)
                    .map_err(self.err("read map"))?
                    .map_or(0, |v| v.value()),
            );
        }
        Ok((meta.cork, out))
    }

    /// Up to `limit` entries with addresses after `after` (all from the start with `None`), in
    /// address order, and the cork they are as of (one read transaction: a consistent page).
    pub fn dump(
        &self,
        volume: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Cork, Vec<(u64, u64)>)> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
        let meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
            Some(v) => Self::decode_meta(volume, v.value())?,
            None => {
                return Err(MdsError::NoTable {
                    volume: volume.to_string(),
                })
            }
        };
        let name = map_table_name(volume);
        let map = match tx.open_table(TableDefinition::<u64, u64>::new(&name)) {
            Ok(map) => map,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((meta.cork, Vec::new())),
            Err(e) => return Err(self.err("open map")(e)),
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for item in map
            .range::<u64>((start, Bound::Unbounded))
            .map_err(self.err("read map"))?
            .take(limit)
        {
            let (k, v) = item.map_err(self.err("read map"))?;
            out.push((k.value(), v.value()));
        }
        Ok((meta.cork, out))
    }

    /// Remove a volume's table (its map and metadata). Refused with an older owner tag.
    pub fn drop_table(&self, volume: &str, owner_tag: u64) -> Result<()> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            let mut volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
            let meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
                Some(v) => Self::decode_meta(volume, v.value())?,
                None => {
                    return Err(MdsError::NoTable {
                        volume: volume.to_string(),
                    })
                }
            };
            if owner_tag < meta.owner_tag {
                return Err(MdsError::Fenced {
                    volume: volume.to_string(),
                    got: owner_tag,
                    known: meta.owner_tag,
                });
            }
            volumes.remove(volume).map_err(self.err("write volumes"))?;
            let name = map_table_name(volume);
            tx.delete_table(TableDefinition::<u64, u64>::new(&name))
                .map_err(self.err("drop map"))?;
        }
        tx.commit().map_err(self.err("commit"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests;
