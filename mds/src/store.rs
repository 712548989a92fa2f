//! The MDS's tables on disk, in one [redb](https://docs.rs/redb) database file.
//!
//! Why redb: the tables need atomic multi-key updates (one TLog's updates and its new cork in
//! one commit, or none of them) and must survive `kill -9` and power loss without a repair step.
//! redb gives ACID transactions over copy-on-write B-trees in a single file, with a commit that
//! is durable when it returns (two-phase fsync, checksummed pages), in pure Rust and with no
//! background threads. fjall (an LSM tree) needs its own journal and compaction threads, and
//! RocksDB a C++ build; neither buys anything at an MDS's write rate (one commit per TLog).
//!
//! Layout: table `tables` maps a volume name to its encoded [`TableMeta`] (role, owner tag,
//! cork, counters, namespace); table `pages:<volume>` holds the map in pages of 512 raw
//! locations and table `entries` each volume's number of written clusters (format and
//! invariants: [`pages`]). Every change of a volume's map is committed together with its
//! metadata (cork), so a reopened store always holds a map that matches its cork exactly. A
//! store written by the first format (`map:<volume>`, one key per cluster) is rewritten as pages
//! when it is opened, and its `volumes` table becomes `tables` (see [`VOLUMES`] for why).
//!
//! The store is synchronous: the server runs it on the blocking pool.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use crate::error::{MdsError, Result};
use crate::table::{check_set, Cork, Role, TableMeta, Update};

/// The database file inside the MDS data directory.
pub const DB_FILE: &str = "mds.redb";

/// Each volume's metadata. Named `tables` since the page format: the first format's `volumes`
/// table is moved here when a store is opened, so a store of this format looks empty to a
/// first-format binary (after a downgrade it starts its tables afresh and catches them up from
/// the backend) instead of showing it metadata whose maps it cannot read.
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("tables");
/// The first format's metadata table.
const FIRST_FORMAT_VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

mod pages;
use pages::PageError;

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
        tx.open_table(pages::COUNTS)
            .map_err(MdsError::store(&store.path, "open table entries"))?;
        store.migrate_first_format(&tx)?;
        tx.commit()
            .map_err(MdsError::store(&store.path, "commit"))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err<E: Into<redb::Error>>(&self, what: &'static str) -> impl FnOnce(E) -> MdsError + '_ {
        MdsError::store(&self.path, what)
    }

    /// Map a page error on `volume`'s table.
    fn page_err<'a>(
        &'a self,
        volume: &'a str,
        what: &'static str,
    ) -> impl FnOnce(PageError) -> MdsError + 'a {
        move |e| match e {
            PageError::Storage(e) => self.err(what)(e),
            PageError::Table(e) => self.err(what)(e),
            PageError::Corrupt(page, len) => MdsError::Corrupt {
                volume: volume.to_string(),
                reason: format!("map page {page} is {len} bytes, not 4096"),
            },
        }
    }

    /// Rewrite every table of the first format as pages (see the module docs).
    fn migrate_first_format(&self, tx: &redb::WriteTransaction) -> Result<()> {
        let names: Vec<String> = tx
            .list_tables()
            .map_err(self.err("list tables"))?
            .map(|t| t.name().to_string())
            .collect();
        if names.iter().any(|n| n == "volumes") {
            let metas: Vec<(String, Vec<u8>)> = {
                let old = tx
                    .open_table(FIRST_FORMAT_VOLUMES)
                    .map_err(self.err("open volumes"))?;
                let mut metas = Vec::new();
                for item in old.iter().map_err(self.err("read volumes"))? {
                    let (k, v) = item.map_err(self.err("read volumes"))?;
                    metas.push((k.value().to_string(), v.value().to_vec()));
                }
                metas
            };
            for (volume, meta) in &metas {
                // The first-format table is what the last binary to run wrote (an older one
                // after a downgrade, say): pages left from an earlier run of this format are
                // stale, whatever their cork says.
                self.clear(tx, volume)?;
                tx.open_table(VOLUMES)
                    .map_err(self.err("open tables"))?
                    .insert(volume.as_str(), meta.as_slice())
                    .map_err(self.err("write tables"))?;
            }
            tx.delete_table(FIRST_FORMAT_VOLUMES)
                .map_err(self.err("drop volumes"))?;
        }
        for volume in names.iter().filter_map(|n| n.strip_prefix("map:")) {
            self.clear(tx, volume)?;
            let count = pages::migrate(tx, volume).map_err(self.page_err(volume, "migrate map"))?;
            tx.open_table(pages::COUNTS)
                .map_err(self.err("open entries"))?
                .insert(volume, count)
                .map_err(self.err("write entries"))?;
            tracing::info!(volume, entries = count, path = %self.path.display(), "MDS table rewritten as pages");
        }
        Ok(())
    }

    /// Apply `batches` of updates, in order, to `volume`'s pages and its count, in `tx`.
    fn apply<'u>(
        &self,
        tx: &redb::WriteTransaction,
        volume: &str,
        batches: impl IntoIterator<Item = &'u [Update]>,
    ) -> Result<()> {
        let name = pages::table_name(volume);
        let delta = {
            let mut table = tx
                .open_table(pages::definition(&name))
                .map_err(self.err("open map"))?;
            let mut apply = pages::Apply::new(&mut table);
            for updates in batches {
                apply
                    .apply(updates)
                    .map_err(self.page_err(volume, "update map"))?;
            }
            apply
                .finish()
                .map_err(self.page_err(volume, "update map"))?
        };
        if delta != 0 {
            let mut counts = tx
                .open_table(pages::COUNTS)
                .map_err(self.err("open entries"))?;
            let old = counts
                .get(volume)
                .map_err(self.err("read entries"))?
                .map_or(0, |v| v.value());
            counts
                .insert(volume, old.saturating_add_signed(delta))
                .map_err(self.err("write entries"))?;
        }
        Ok(())
    }

    /// Remove `volume`'s pages and count, in `tx`.
    fn clear(&self, tx: &redb::WriteTransaction, volume: &str) -> Result<()> {
        let name = pages::table_name(volume);
        tx.delete_table(pages::definition(&name))
            .map_err(self.err("clear map"))?;
        tx.open_table(pages::COUNTS)
            .map_err(self.err("open entries"))?
            .remove(volume)
            .map_err(self.err("write entries"))?;
        Ok(())
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
        let counts = tx
            .open_table(pages::COUNTS)
            .map_err(self.err("open entries"))?;
        let count = counts.get(volume).map_err(self.err("count entries"))?;
        Ok(count.map_or(0, |v| v.value()))
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
                    self.apply(&tx, volume, [updates])?;
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
            if reset {
                self.clear(&tx, volume)?;
                meta.counters.full_rebuilds += 1;
                meta.cork = Cork::EMPTY;
            }
            self.apply(&tx, volume, steps.iter().map(|(_, u)| u.as_slice()))?;
            for (cork, _) in steps {
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

    /// `volume`'s metadata and its pages (`None`: nothing written yet), as of `tx`.
    #[allow(clippy::type_complexity)]
    fn read_map(
        &self,
        tx: &redb::ReadTransaction,
        volume: &str,
    ) -> Result<(TableMeta, Option<redb::ReadOnlyTable<u64, &'static [u8]>>)> {
        let volumes = tx.open_table(VOLUMES).map_err(self.err("open volumes"))?;
        let meta = match volumes.get(volume).map_err(self.err("read volumes"))? {
            Some(v) => Self::decode_meta(volume, v.value())?,
            None => {
                return Err(MdsError::NoTable {
                    volume: volume.to_string(),
                })
            }
        };
        let name = pages::table_name(volume);
        match tx.open_table(pages::definition(&name)) {
            Ok(map) => Ok((meta, Some(map))),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok((meta, None)),
            Err(e) => Err(self.err("open map")(e)),
        }
    }

    /// Locations of `addresses` (0 = unwritten) and the cork they are as of.
    pub fn multi_get(&self, volume: &str, addresses: &[u64]) -> Result<(Cork, Vec<u64>)> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let (meta, map) = self.read_map(&tx, volume)?;
        let Some(map) = map else {
            return Ok((meta.cork, vec![0; addresses.len()]));
        };
        let out = pages::get_many(&map, addresses).map_err(self.page_err(volume, "read map"))?;
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
        let (meta, map) = self.read_map(&tx, volume)?;
        let Some(map) = map else {
            return Ok((meta.cork, Vec::new()));
        };
        let out = pages::dump(&map, after, limit).map_err(self.page_err(volume, "read map"))?;
        Ok((meta.cork, out))
    }

    /// The written pages of `volume` among `count` pages from page `first` (see the `pages`
    /// module for their format), the first written page after them, and the cork they are as
    /// of (one read transaction).
    #[allow(clippy::type_complexity)]
    pub fn dump_pages(
        &self,
        volume: &str,
        first: u64,
        count: u64,
    ) -> Result<(Cork, Option<u64>, Vec<(u64, bytes::Bytes)>)> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let (meta, map) = self.read_map(&tx, volume)?;
        let Some(map) = map else {
            return Ok((meta.cork, None, Vec::new()));
        };
        let (out, next) =
            pages::dump_pages(&map, first, count).map_err(self.page_err(volume, "read map"))?;
        Ok((meta.cork, next, out))
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
            self.clear(&tx, volume)?;
        }
        tx.commit().map_err(self.err("commit"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests;
