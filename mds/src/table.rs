//! What one volume's MDS table is, and the pure decisions about it (no I/O here).
//!
//! A table holds the volume's map (cluster address → raw [`ClusterLocation`]) as of its
//! **cork**: the last backend TLog whose entries it holds. The map never runs ahead of the
//! backend, because the owner sends a TLog's updates only after the TLog is on the backend, and a
//! slave only replays TLogs it read from the backend.
//!
//! # The cork names a history, not only a TLog number
//!
//! Scrubbing rewrites TLogs (a new generation, merged records, new SCO versions) and a rollback
//! drops TLogs; after either, "TLog 42" no longer means what the table applied. So a [`Cork`]
//! carries a fingerprint of the backend list's prefix up to and including its TLog: the count of
//! records and a CRC32C over each record's number, generation and SCO versions. A restart or a
//! catch-up whose backend list has a different prefix knows the table describes another history
//! and rebuilds it from scratch ([`plan_catch_up`]), which is what OVS's scrub ID did.
//!
//! [`ClusterLocation`]: vstor_volumedriver::ClusterLocation

use std::collections::BTreeMap;
use std::fmt;

use vstor_volumedriver::config::TLogRecord;
use vstor_volumedriver::tlog::Entry;

/// Where a table stands in its volume's backend history (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cork {
    /// Number of the last TLog applied (0: none).
    pub tlog: u64,
    /// How many backend list records up to and including `tlog`.
    pub count: u32,
    /// CRC32C chained over those records (see [`Cork::after`]).
    pub crc: u32,
}

impl fmt::Display for Cork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tlog {} ({} records, crc {:08x})",
            self.tlog, self.count, self.crc
        )
    }
}

impl Cork {
    /// Nothing applied: an empty table.
    pub const EMPTY: Cork = Cork {
        tlog: 0,
        count: 0,
        crc: 0,
    };

    /// The cork once `record` (the next backend list record) is applied on top of `self`.
    pub fn after(self, record: &TLogRecord) -> Cork {
        let mut bytes = Vec::with_capacity(16 + record.sco_versions.len() * 5);
        bytes.extend_from_slice(&record.number.to_le_bytes());
        bytes.extend_from_slice(&record.generation.to_le_bytes());
        bytes.extend_from_slice(&(record.sco_versions.len() as u32).to_le_bytes());
        for (sco, version) in &record.sco_versions {
            bytes.extend_from_slice(&sco.to_le_bytes());
            bytes.push(*version);
        }
        Cork {
            tlog: record.number,
            count: self.count.wrapping_add(1),
            crc: crc32c::crc32c_append(self.crc, &bytes),
        }
    }

    /// The cork of a table holding exactly `records` (a prefix of a backend list).
    pub fn of_prefix(records: &[TLogRecord]) -> Cork {
        records.iter().fold(Cork::EMPTY, Cork::after)
    }
}

/// A table's role for its volume: only the master takes map updates from the owner; slaves
/// follow the backend (catch-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Master,
    Slave,
}

impl Role {
    pub fn as_u8(self) -> u8 {
        match self {
            Role::Master => 1,
            Role::Slave => 2,
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Role::Master),
            2 => Some(Role::Slave),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Slave => "slave",
        }
    }
}

/// Counters a table keeps (reported by `Stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Accepted multi-set requests.
    pub sets: u64,
    /// Multi-set requests refused (fenced, not master, cork mismatch).
    pub refused: u64,
    /// TLogs replayed from the backend by catch-up.
    pub tlogs_replayed: u64,
    /// Catch-ups that cleared the table and replayed the whole history.
    pub full_rebuilds: u64,
    /// Catch-ups that replayed only the TLogs after the cork.
    pub incremental: u64,
}

/// Everything about a table except its map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableMeta {
    /// Backend namespace holding the volume's TLogs (for catch-up).
    pub namespace: String,
    pub role: Role,
    /// Highest owner tag seen; older ones are refused.
    pub owner_tag: u64,
    pub cork: Cork,
    pub counters: Counters,
}

const META_VERSION: u8 = 1;

impl TableMeta {
    pub fn new(namespace: &str, role: Role, owner_tag: u64) -> Self {
        Self {
            namespace: namespace.to_string(),
            role,
            owner_tag,
            cork: Cork::EMPTY,
            counters: Counters::default(),
        }
    }

    /// `version u8 | role u8 | owner u64 | cork (u64, u32, u32) | 5 counters u64 | namespace len
    /// u16 + bytes | CRC32C u32 of everything before`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + self.namespace.len());
        out.push(META_VERSION);
        out.push(self.role.as_u8());
        out.extend_from_slice(&self.owner_tag.to_le_bytes());
        out.extend_from_slice(&self.cork.tlog.to_le_bytes());
        out.extend_from_slice(&self.cork.count.to_le_bytes());
        out.extend_from_slice(&self.cork.crc.to_le_bytes());
        let c = &self.counters;
        for v in [
            c.sets,
            c.refused,
            c.tlogs_replayed,
            c.full_rebuilds,
            c.incremental,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let ns = self.namespace.as_bytes();
        out.extend_from_slice(&(ns.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&ns[..ns.len().min(u16::MAX as usize)]);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 4 {
            return Err("table metadata shorter than its CRC".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut want = [0u8; 4];
        want.copy_from_slice(crc);
        if crc32c::crc32c(body) != u32::from_le_bytes(want) {
            return Err("table metadata fails its CRC".into());
        }
        let mut r = body;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if r.len() < n {
                return Err("table metadata truncated".into());
            }
            let (head, rest) = r.split_at(n);
            r = rest;
            Ok(head)
        };
        let u64_at = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        };
        let u32_at = |b: &[u8]| {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            u32::from_le_bytes(a)
        };
        let version = take(1)?[0];
        if version != META_VERSION {
            return Err(format!("unsupported table metadata version {version}"));
        }
        let raw_role = take(1)?[0];
        let role = Role::from_u8(raw_role).ok_or(format!("unknown role {raw_role}"))?;
        let owner_tag = u64_at(take(8)?);
        let cork = Cork {
            tlog: u64_at(take(8)?),
            count: u32_at(take(4)?),
            crc: u32_at(take(4)?),
        };
        let counters = Counters {
            sets: u64_at(take(8)?),
            refused: u64_at(take(8)?),
            tlogs_replayed: u64_at(take(8)?),
            full_rebuilds: u64_at(take(8)?),
            incremental: u64_at(take(8)?),
        };
        let len = usize::from(u16::from_le_bytes([take(1)?[0], take(1)?[0]]));
        let namespace = String::from_utf8(take(len)?.to_vec())
            .map_err(|_| "namespace is not UTF-8".to_string())?;
        if !r.is_empty() {
            return Err("trailing bytes in table metadata".into());
        }
        Ok(Self {
            namespace,
            role,
            owner_tag,
            cork,
            counters,
        })
    }
}

/// One map change, as a TLog's LOC and TRIM entries describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Set a cluster's location (raw [`ClusterLocation`]; 0 = unwritten, which removes it).
    ///
    /// [`ClusterLocation`]: vstor_volumedriver::ClusterLocation
    Loc { address: u64, location: u64 },
    /// Forget `[start, start + count)`.
    Trim { start: u64, count: u64 },
}

/// The map updates a TLog's entries make, in order (SCO CRCs change nothing in the map).
pub fn updates_of(entries: &[Entry]) -> Vec<Update> {
    entries
        .iter()
        .filter_map(|e| match *e {
            Entry::Loc { address, location } => Some(Update::Loc {
                address,
                location: location.raw(),
            }),
            Entry::Trim { start, count } => Some(Update::Trim { start, count }),
            _ => None,
        })
        .collect()
}

/// Apply `updates` to an in-memory map (the model the store must agree with, and what a
/// volume does with them).
pub fn apply_to_model(map: &mut BTreeMap<u64, u64>, updates: &[Update]) {
    for u in updates {
        match *u {
            Update::Loc { address, location } if location as u32 == 0 => {
                map.remove(&address);
            }
            Update::Loc { address, location } => {
                map.insert(address, location);
            }
            Update::Trim { start, count } => {
                let end = start.saturating_add(count);
                let doomed: Vec<u64> = map.range(start..end).map(|(k, _)| *k).collect();
                for k in doomed {
                    map.remove(&k);
                }
            }
        }
    }
}

/// Why a multi-set is refused, decided from the table's metadata alone.
pub fn check_set(
    volume: &str,
    meta: &TableMeta,
    owner_tag: u64,
    expect: Cork,
) -> Result<(), crate::MdsError> {
    if owner_tag < meta.owner_tag {
        return Err(crate::MdsError::Fenced {
            volume: volume.to_string(),
            got: owner_tag,
            known: meta.owner_tag,
        });
    }
    if meta.role != Role::Master {
        return Err(crate::MdsError::NotMaster {
            volume: volume.to_string(),
        });
    }
    if meta.cork != expect {
        return Err(crate::MdsError::CorkMismatch {
            volume: volume.to_string(),
            expected: expect,
            have: meta.cork,
        });
    }
    Ok(())
}

/// What a table must replay to match a backend list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatchUpPlan {
    /// The table holds exactly the list.
    UpToDate,
    /// Replay `list[from..]` on top of the table.
    Incremental { from: usize },
    /// The table describes another history (or none): clear it and replay the whole list.
    Full { reason: String },
}

impl CatchUpPlan {
    /// How many TLogs this plan replays from a list of `len` records.
    pub fn tlogs(&self, len: usize) -> usize {
        match self {
            CatchUpPlan::UpToDate => 0,
            CatchUpPlan::Incremental { from } => len.saturating_sub(*from),
            CatchUpPlan::Full { .. } => len,
        }
    }
}

/// Compare a table's cork with the backend list (see the module docs).
pub fn plan_catch_up(cork: Cork, list: &[TLogRecord]) -> CatchUpPlan {
    if cork == Cork::EMPTY {
        return if list.is_empty() {
            CatchUpPlan::UpToDate
        } else {
            CatchUpPlan::Incremental { from: 0 }
        };
    }
    let Some(at) = list.iter().position(|r| r.number == cork.tlog) else {
        return CatchUpPlan::Full {
            reason: format!(
                "the table's cork TLog {} is no longer in the backend list",
                cork.tlog
            ),
        };
    };
    if Cork::of_prefix(&list[..=at]) != cork {
        return CatchUpPlan::Full {
            reason: format!(
                "the backend history up to TLog {} was rewritten (scrub or rollback)",
                cork.tlog
            ),
        };
    }
    if at + 1 == list.len() {
        CatchUpPlan::UpToDate
    } else {
        CatchUpPlan::Incremental { from: at + 1 }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(number: u64) -> TLogRecord {
        TLogRecord::new(number)
    }

    #[test]
    fn plans_follow_the_history() {
        let list: Vec<TLogRecord> = (1..=5).map(record).collect();
        assert_eq!(plan_catch_up(Cork::EMPTY, &[]), CatchUpPlan::UpToDate);
        assert_eq!(
            plan_catch_up(Cork::EMPTY, &list),
            CatchUpPlan::Incremental { from: 0 }
        );
        let at3 = Cork::of_prefix(&list[..3]);
        assert_eq!(at3.tlog, 3);
        assert_eq!(
            plan_catch_up(at3, &list),
            CatchUpPlan::Incremental { from: 3 }
        );
        assert_eq!(plan_catch_up(at3, &list).tlogs(list.len()), 2);
        assert_eq!(
            plan_catch_up(Cork::of_prefix(&list), &list),
            CatchUpPlan::UpToDate
        );
        // Scrub rewrote TLog 2: same numbers, another history.
        let mut scrubbed = list.clone();
        scrubbed[1].generation = 1;
        scrubbed[1].sco_versions.insert(7, 1);
        assert!(matches!(
            plan_catch_up(at3, &scrubbed),
            CatchUpPlan::Full { .. }
        ));
        // Rollback to TLog 2 then new TLogs 6, 7: the cork's TLog is gone.
        let rolled: Vec<TLogRecord> = [1, 2, 6, 7].into_iter().map(record).collect();
        assert!(matches!(
            plan_catch_up(at3, &rolled),
            CatchUpPlan::Full { .. }
        ));
        // Merged by scrub into one record numbered 3.
        let merged = vec![record(3), record(4)];
        assert!(matches!(
            plan_catch_up(at3, &merged),
            CatchUpPlan::Full { .. }
        ));
    }

    #[test]
    fn fencing_role_and_cork_are_checked_in_that_order() {
        let mut meta = TableMeta::new("ns", Role::Master, 5);
        assert!(check_set("v", &meta, 5, Cork::EMPTY).is_ok());
        assert!(check_set("v", &meta, 6, Cork::EMPTY).is_ok());
        assert!(matches!(
            check_set("v", &meta, 4, Cork::EMPTY),
            Err(crate::MdsError::Fenced {
                got: 4,
                known: 5,
                ..
            })
        ));
        let c = Cork::EMPTY.after(&record(1));
        assert!(matches!(
            check_set("v", &meta, 5, c),
            Err(crate::MdsError::CorkMismatch { .. })
        ));
        meta.role = Role::Slave;
        assert!(matches!(
            check_set("v", &meta, 5, Cork::EMPTY),
            Err(crate::MdsError::NotMaster { .. })
        ));
        meta.role = Role::Master;
        meta.cork = c;
        assert!(check_set("v", &meta, 5, c).is_ok());
    }

    proptest! {
        #[test]
        fn table_meta_round_trips_and_detects_corruption(
            ns in "[a-z0-9_-]{0,40}",
            owner: u64, tlog: u64, count: u32, crc: u32, slave: bool,
            counters: (u64, u64, u64, u64, u64),
            at: prop::sample::Index, flip in 1u8..=255,
        ) {
            let meta = TableMeta {
                namespace: ns,
                role: if slave { Role::Slave } else { Role::Master },
                owner_tag: owner,
                cork: Cork { tlog, count, crc },
                counters: Counters {
                    sets: counters.0, refused: counters.1, tlogs_replayed: counters.2,
                    full_rebuilds: counters.3, incremental: counters.4,
                },
            };
            let mut bytes = meta.encode();
            prop_assert_eq!(TableMeta::decode(&bytes).unwrap(), meta);
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            prop_assert!(TableMeta::decode(&bytes).is_err());
        }

        #[test]
        fn corks_chain(n in 0usize..20, k in 0usize..20) {
            let list: Vec<TLogRecord> = (1..=n as u64).map(record).collect();
            let k = k.min(n);
            let mut cork = Cork::of_prefix(&list[..k]);
            for r in &list[k..] {
                cork = cork.after(r);
            }
            prop_assert_eq!(cork, Cork::of_prefix(&list));
        }
    }
}
