//! A volume's map in the store: pages of 512 locations, the volume map's leaf.
//!
//! Why pages and not one key per cluster: a restart loads the whole table (see
//! `MdsClient::dump_sorted`), and walking a B-tree entry by entry cost about 100 ns per cluster,
//! which made a restart from the MDS slower than replaying the TLogs it stands for. A page is
//! one B-tree value, so a dump walks 512 clusters per step; Open vStorage's MDS stored pages for
//! the same reason. Updates read, change and rewrite the pages they touch inside the commit.
//!
//! Format of table `pages:<volume>` (key: page number = cluster address / 512):
//!
//! ```text
//! 4096 bytes   512 little-endian u64 raw locations; entry i is cluster page * 512 + i;
//!              0 = unwritten
//! ```
//!
//! Invariants: a value is exactly 4096 bytes (anything else is reported as a corrupt table); a
//! page with no written entry is absent, never stored as zeros; a location whose SCO number
//! (low 32 bits) is 0 is unwritten and stored as 0. Table `entries` holds each volume's number of
//! written clusters, kept equal to the pages' non-zero entries in the same commit. Whole-table
//! integrity (checksums, atomic commits) is redb's.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ops::Bound;

use redb::{ReadableTable, TableDefinition};

use crate::table::Update;

/// Clusters per page.
pub(super) const PAGE_ENTRIES: u64 = crate::proto::PAGE_ENTRIES as u64;
const PAGE_BYTES: usize = crate::proto::PAGE_BYTES;
/// Pages an update batch keeps decoded before writing them back (32 MiB): a batch of a million
/// random updates on a large thin volume must not hold a page per update in memory.
#[cfg(not(test))]
const MAX_WORKING_PAGES: usize = 8192;
#[cfg(test)]
const MAX_WORKING_PAGES: usize = 3;

/// Number of written clusters per volume.
pub(super) const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("entries");

pub(super) type Entries = Box<[u64; PAGE_ENTRIES as usize]>;
/// Stored pages as they are on disk: (page number, 4096 bytes).
pub(super) type PageList = Vec<(u64, bytes::Bytes)>;

pub(super) fn table_name(volume: &str) -> String {
    format!("pages:{volume}")
}

pub(super) fn definition(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

/// What can go wrong reading or writing pages: the store maps it to its error.
#[derive(Debug)]
pub(super) enum PageError {
    Storage(redb::StorageError),
    Table(redb::TableError),
    /// A value that is not a page: (page number, its length).
    Corrupt(u64, usize),
}

impl From<redb::StorageError> for PageError {
    fn from(e: redb::StorageError) -> Self {
        Self::Storage(e)
    }
}

impl From<redb::TableError> for PageError {
    fn from(e: redb::TableError) -> Self {
        Self::Table(e)
    }
}

pub(super) fn decode(page: u64, bytes: &[u8]) -> Result<Entries, PageError> {
    if bytes.len() != PAGE_BYTES {
        return Err(PageError::Corrupt(page, bytes.len()));
    }
    let mut entries: Entries = Box::new([0; PAGE_ENTRIES as usize]);
    for (entry, raw) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut le = [0u8; 8];
        le.copy_from_slice(raw);
        *entry = u64::from_le_bytes(le);
    }
    Ok(entries)
}

fn encode(entries: &[u64; PAGE_ENTRIES as usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE_BYTES);
    for entry in entries {
        out.extend_from_slice(&entry.to_le_bytes());
    }
    out
}

fn written(entries: &[u64; PAGE_ENTRIES as usize]) -> u64 {
    entries.iter().filter(|e| **e != 0).count() as u64
}

fn normalise(location: u64) -> u64 {
    if location as u32 == 0 {
        0
    } else {
        location
    }
}

struct Working {
    entries: Entries,
    /// Written entries when it was read (0 for a new page).
    before: u64,
}

impl Working {
    fn empty() -> Self {
        Self {
            entries: Box::new([0; PAGE_ENTRIES as usize]),
            before: 0,
        }
    }
}

/// Applies updates to one volume's pages inside a write transaction: pages are read once,
/// changed in memory and written back by [`finish`](Self::finish) (or earlier, when more than
/// `MAX_WORKING_PAGES` are held). Returns the change in written clusters.
pub(super) struct Apply<'a, 't> {
    table: &'a mut redb::Table<'t, u64, &'static [u8]>,
    pages: HashMap<u64, Working>,
    delta: i64,
}

impl<'a, 't> Apply<'a, 't> {
    pub(super) fn new(table: &'a mut redb::Table<'t, u64, &'static [u8]>) -> Self {
        Self {
            table,
            pages: HashMap::new(),
            delta: 0,
        }
    }

    fn page(&mut self, page: u64) -> Result<&mut Working, PageError> {
        let loaded = if self.pages.contains_key(&page) {
            None
        } else {
            if self.pages.len() >= MAX_WORKING_PAGES {
                self.write_back()?;
            }
            Some(match self.table.get(page)? {
                Some(value) => {
                    let entries = decode(page, value.value())?;
                    Working {
                        before: written(&entries),
                        entries,
                    }
                }
                None => Working::empty(),
            })
        };
        Ok(match self.pages.entry(page) {
            Entry::Occupied(e) => e.into_mut(),
            // `loaded` is always `Some` here: the page was absent above.
            Entry::Vacant(v) => v.insert(loaded.unwrap_or_else(Working::empty)),
        })
    }

    /// Apply `updates` in order.
    pub(super) fn apply(&mut self, updates: &[Update]) -> Result<(), PageError> {
        for update in updates {
            match *update {
                Update::Loc { address, location } => {
                    let working = self.page(address / PAGE_ENTRIES)?;
                    working.entries[(address % PAGE_ENTRIES) as usize] = normalise(location);
                }
                Update::Trim { start, count } => self.trim(start, count)?,
            }
        }
        Ok(())
    }

    fn trim(&mut self, start: u64, count: u64) -> Result<(), PageError> {
        if count == 0 {
            return Ok(());
        }
        let end = start.saturating_add(count); // exclusive
        let (first, last) = (start / PAGE_ENTRIES, (end - 1) / PAGE_ENTRIES);
        // Only pages that exist (stored, or new in this batch) have anything to clear.
        let mut touched: Vec<u64> = self
            .pages
            .keys()
            .copied()
            .filter(|p| (first..=last).contains(p))
            .collect();
        for item in self.table.range(first..=last)? {
            touched.push(item?.0.value());
        }
        touched.sort_unstable();
        touched.dedup();
        for page in touched {
            let base = page * PAGE_ENTRIES;
            let from = start.max(base) - base;
            let to = end.min(base + PAGE_ENTRIES) - base;
            let working = self.page(page)?;
            working.entries[from as usize..to as usize].fill(0);
        }
        Ok(())
    }

    fn write_back(&mut self) -> Result<(), PageError> {
        for (page, working) in self.pages.drain() {
            let after = written(&working.entries);
            self.delta += after as i64 - working.before as i64;
            if after == 0 {
                if working.before > 0 {
                    self.table.remove(page)?;
                }
            } else {
                self.table
                    .insert(page, encode(&working.entries).as_slice())?;
            }
        }
        Ok(())
    }

    /// Write every changed page back; returns the change in written clusters.
    pub(super) fn finish(mut self) -> Result<i64, PageError> {
        self.write_back()?;
        Ok(self.delta)
    }
}

/// Written entries with addresses after `after` (all with `None`), in address order, at most
/// `limit`.
pub(super) fn dump(
    table: &impl ReadableTable<u64, &'static [u8]>,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, u64)>, PageError> {
    let start = match after {
        None => 0,
        Some(u64::MAX) => return Ok(Vec::new()),
        Some(a) => a + 1,
    };
    let mut out = Vec::with_capacity(limit.min(1 << 20));
    for item in table.range::<u64>((Bound::Included(start / PAGE_ENTRIES), Bound::Unbounded))? {
        let (key, value) = item?;
        let page = key.value();
        let entries = decode(page, value.value())?;
        let base = page * PAGE_ENTRIES;
        for (i, raw) in entries.iter().enumerate() {
            let address = base + i as u64;
            if *raw != 0 && address >= start {
                if out.len() == limit {
                    return Ok(out);
                }
                out.push((address, *raw));
            }
        }
    }
    Ok(out)
}

/// Locations of `addresses` (0 = unwritten), reading each page once per run of addresses on it.
pub(super) fn get_many(
    table: &impl ReadableTable<u64, &'static [u8]>,
    addresses: &[u64],
) -> Result<Vec<u64>, PageError> {
    let mut out = Vec::with_capacity(addresses.len());
    let mut current: Option<(u64, Option<Entries>)> = None;
    for address in addresses {
        let page = address / PAGE_ENTRIES;
        if current.as_ref().map(|(p, _)| *p) != Some(page) {
            let entries = match table.get(page)? {
                Some(value) => Some(decode(page, value.value())?),
                None => None,
            };
            current = Some((page, entries));
        }
        let location = current
            .as_ref()
            .and_then(|(_, entries)| entries.as_ref())
            .map_or(0, |e| e[(address % PAGE_ENTRIES) as usize]);
        out.push(location);
    }
    Ok(out)
}

/// Rewrite a table of the first format (one key per cluster, `map:<volume>`) as pages, and
/// drop it. Returns the number of written clusters.
pub(super) fn migrate(tx: &redb::WriteTransaction, volume: &str) -> Result<u64, PageError> {
    let old_name = format!("map:{volume}");
    let old_def = TableDefinition::<u64, u64>::new(&old_name);
    let name = table_name(volume);
    let count;
    {
        let old = tx.open_table(old_def)?;
        let mut pages = tx.open_table(definition(&name))?;
        let mut apply = Apply::new(&mut pages);
        for item in old.iter()? {
            let (address, location) = item?;
            apply.apply(&[Update::Loc {
                address: address.value(),
                location: location.value(),
            }])?;
        }
        count = apply.finish()?.max(0) as u64;
    }
    tx.delete_table(old_def)?;
    Ok(count)
}

/// The stored pages among `count` pages from `first`, and the first stored page after them.
pub(super) fn dump_pages(
    table: &impl ReadableTable<u64, &'static [u8]>,
    first: u64,
    count: u64,
) -> Result<(PageList, Option<u64>), PageError> {
    let end = first.saturating_add(count); // exclusive
    let mut out = Vec::new();
    for item in table.range::<u64>(first..)? {
        let (key, value) = item?;
        let page = key.value();
        if page >= end {
            return Ok((out, Some(page)));
        }
        let bytes = value.value();
        if bytes.len() != PAGE_BYTES {
            return Err(PageError::Corrupt(page, bytes.len()));
        }
        out.push((page, bytes::Bytes::copy_from_slice(bytes)));
    }
    Ok((out, None))
}
