//! The tier's registry records and the pure rules over them: what state an OSD is in, and what
//! placement sees. No I/O here; [`super::map`] reads and writes the records.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vstor_backend::ec::placement::OsdSlot;
use vstor_backend::ec::preset::{Compression, Policy, Preset};
use vstor_backend::ec::store::{NamespaceRecord, OsdEntry, OsdState};

pub const NEXT_OSD_ID: &str = "tier/next-osd-id";
pub const OSDS: &str = "tier/osds/";
pub const OSD_LIVE: &str = "tier/osd-live/";
pub const PRESETS: &str = "tier/presets/";
pub const NAMESPACES: &str = "tier/namespaces/";

/// What the operator decided about an OSD (`vstor osd decommission|out|in`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsdAdmin {
    /// In service (the default).
    #[default]
    In,
    /// Being emptied: takes nothing new, serves reads, repair moves its fragments off.
    Draining,
    /// Out of service: never read, its fragments are rebuilt elsewhere.
    Out,
}

/// An OSD's persistent record (`tier/osds/{id}`): it outlives the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdRecord {
    pub id: u64,
    /// `host:port` of its OSD protocol listener.
    pub addr: String,
    pub domain: String,
    /// Bytes it may hold (`--capacity`).
    pub capacity: u64,
    /// Its data directory, as the OSD saw it (for operators).
    #[serde(default)]
    pub data_dir: String,
    #[serde(default)]
    pub admin: OsdAdmin,
    /// Last time the OSD wrote this record, seconds since the Unix epoch: the start of its
    /// down time when it dies (refreshed every [`LAST_SEEN_INTERVAL`]).
    #[serde(default)]
    pub last_seen: u64,
    #[serde(default)]
    pub version: String,
}

/// How often a running OSD refreshes `last_seen`.
pub const LAST_SEEN_INTERVAL: Duration = Duration::from_secs(30);

/// An OSD's live record (`tier/osd-live/{id}`, under its lease): present while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdLive {
    pub addr: String,
    /// Host name and data directory of the process: a restarted OSD that finds its previous
    /// run's record (dead, its lease not expired yet) recognises it by these and ends `lease`.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub data_dir: String,
    #[serde(default)]
    pub lease: i64,
    pub used: u64,
    pub capacity: u64,
    pub fragments: u64,
    /// Seconds since the Unix epoch of this report.
    pub reported_at: u64,
}

/// A preset as the registry stores it (`tier/presets/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetRecord {
    pub name: String,
    pub policies: Vec<PolicyRecord>,
    pub fragment_size: u32,
    #[serde(default = "none")]
    pub compression: String,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub local_parity: bool,
}

fn none() -> String {
    "none".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub k: u8,
    pub m: u8,
    pub c: u8,
    pub x: u8,
}

impl PresetRecord {
    pub fn from_preset(preset: &Preset) -> Self {
        Self {
            name: preset.name.clone(),
            policies: preset
                .policies
                .iter()
                .map(|p| PolicyRecord {
                    k: p.k,
                    m: p.m,
                    c: p.c,
                    x: p.x,
                })
                .collect(),
            fragment_size: preset.fragment_size,
            compression: match preset.compression {
                Compression::None => "none",
                Compression::Zstd => "zstd",
                Compression::Lz4 => "lz4",
            }
            .into(),
            encrypted: preset.encrypted,
            local_parity: preset.local_parity,
        }
    }

    /// The preset, validated.
    pub fn to_preset(&self) -> Result<Preset, String> {
        let preset = Preset {
            name: self.name.clone(),
            policies: self
                .policies
                .iter()
                .map(|p| Policy {
                    k: p.k,
                    m: p.m,
                    c: p.c,
                    x: p.x,
                })
                .collect(),
            fragment_size: self.fragment_size,
            compression: match self.compression.as_str() {
                "none" => Compression::None,
                "zstd" => Compression::Zstd,
                "lz4" => Compression::Lz4,
                other => return Err(format!("preset {}: unknown compression {other}", self.name)),
            },
            encrypted: self.encrypted,
            local_parity: self.local_parity,
        };
        preset.validate()?;
        Ok(preset)
    }
}

/// The preset a tier gets when it has none: 4+2 with at most two fragments per domain (so
/// three domains of two OSDs survive a whole domain), falling back to 2+1 and then to 1+1 when
/// fewer OSDs or domains are up. 1 MiB fragment pieces: a 64 MiB SCO is 16 chunks.
pub fn default_preset(name: &str) -> Preset {
    Preset {
        name: name.to_string(),
        policies: vec![
            Policy {
                x: 2,
                ..Policy::new(4, 2)
            },
            Policy {
                x: 1,
                ..Policy::new(2, 1)
            },
            Policy {
                x: 1,
                ..Policy::new(1, 1)
            },
        ],
        fragment_size: 1 << 20,
        compression: Compression::None,
        encrypted: false,
        local_parity: false,
    }
}

/// A namespace's tier record (`tier/namespaces/{ns}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceEntry {
    pub tag: u64,
    pub preset: String,
}

impl From<&NamespaceRecord> for NamespaceEntry {
    fn from(r: &NamespaceRecord) -> Self {
        Self {
            tag: r.tag,
            preset: r.preset.clone(),
        }
    }
}

impl From<NamespaceEntry> for NamespaceRecord {
    fn from(e: NamespaceEntry) -> Self {
        Self {
            tag: e.tag,
            preset: e.preset,
        }
    }
}

/// An OSD's state: the operator's decision first, then liveness; an OSD dead for longer than
/// `grace` counts as out (its fragments are rebuilt elsewhere), as Ceph marks an OSD out after
/// `mon_osd_down_out_interval`.
pub fn osd_state(record: &OsdRecord, live: bool, now: u64, grace: Duration) -> OsdState {
    match (record.admin, live) {
        (OsdAdmin::Out, _) => OsdState::Out,
        (OsdAdmin::Draining, true) => OsdState::Draining,
        (_, true) => OsdState::Up,
        (_, false) if now.saturating_sub(record.last_seen) > grace.as_secs() => OsdState::Out,
        (_, false) => OsdState::Down,
    }
}

/// An OSD as `vstor osd list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdStatus {
    pub id: u64,
    pub addr: String,
    pub domain: String,
    pub state: OsdState,
    pub capacity: u64,
    /// From the live report; `None` while the OSD is not running.
    pub used: Option<u64>,
    pub free: Option<u64>,
    pub fragments: Option<u64>,
    pub data_dir: String,
}

pub fn osd_status(record: &OsdRecord, live: Option<&OsdLive>, state: OsdState) -> OsdStatus {
    OsdStatus {
        id: record.id,
        addr: live.map_or_else(|| record.addr.clone(), |l| l.addr.clone()),
        domain: record.domain.clone(),
        state,
        capacity: record.capacity,
        used: live.map(|l| l.used),
        free: live.map(|l| l.capacity.saturating_sub(l.used)),
        fragments: live.map(|l| l.fragments),
        data_dir: record.data_dir.clone(),
    }
}

/// Below this much free space an OSD takes no new fragments (one full 4+2 fragment of a 64 MiB
/// SCO plus headroom), so a nearly full disk is skipped by placement instead of failing puts.
pub const FULL_MARGIN: u64 = 64 << 20;

/// The map entry placement and the `ec` store use. Weight: capacity in GiB (bigger disks take
/// proportionally more); zero while draining or out (nothing new goes there).
pub fn osd_entry(record: &OsdRecord, live: Option<&OsdLive>, state: OsdState) -> OsdEntry {
    let full = live.is_some_and(|l| l.used.saturating_add(FULL_MARGIN) >= l.capacity);
    let weight = match state {
        OsdState::Out | OsdState::Draining => 0.0,
        OsdState::Up | OsdState::Down => (record.capacity as f64 / f64::from(1u32 << 30)).max(1e-3),
    };
    OsdEntry {
        slot: OsdSlot {
            id: record.id,
            domain: record.domain.clone(),
            weight,
            writable: state == OsdState::Up && !full,
        },
        addr: live.map_or_else(|| record.addr.clone(), |l| l.addr.clone()),
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(admin: OsdAdmin, last_seen: u64) -> OsdRecord {
        OsdRecord {
            id: 1,
            addr: "127.0.0.1:1".into(),
            domain: "d0".into(),
            capacity: 10 << 30,
            data_dir: String::new(),
            admin,
            last_seen,
            version: String::new(),
        }
    }

    #[test]
    fn state_follows_the_operator_then_liveness_then_the_grace_period() {
        let grace = Duration::from_secs(600);
        let now = 10_000;
        assert_eq!(
            osd_state(&record(OsdAdmin::In, now), true, now, grace),
            OsdState::Up
        );
        assert_eq!(
            osd_state(&record(OsdAdmin::In, now - 600), false, now, grace),
            OsdState::Down
        );
        assert_eq!(
            osd_state(&record(OsdAdmin::In, now - 601), false, now, grace),
            OsdState::Out
        );
        assert_eq!(
            osd_state(&record(OsdAdmin::Draining, now), true, now, grace),
            OsdState::Draining
        );
        // A draining OSD that died is down (its fragments are read from the others), then out.
        assert_eq!(
            osd_state(&record(OsdAdmin::Draining, now), false, now, grace),
            OsdState::Down
        );
        assert_eq!(
            osd_state(&record(OsdAdmin::Out, now), true, now, grace),
            OsdState::Out
        );
    }

    #[test]
    fn placement_sees_weight_and_writability() {
        let r = record(OsdAdmin::In, 0);
        let live = OsdLive {
            addr: "127.0.0.1:2".into(),
            host: String::new(),
            data_dir: String::new(),
            lease: 0,
            used: 1 << 30,
            capacity: 10 << 30,
            fragments: 3,
            reported_at: 0,
        };
        let up = osd_entry(&r, Some(&live), OsdState::Up);
        assert!(up.slot.writable);
        assert!((up.slot.weight - 10.0).abs() < 1e-9);
        assert_eq!(up.addr, "127.0.0.1:2");
        let full = OsdLive {
            used: (10 << 30) - (1 << 20),
            ..live.clone()
        };
        assert!(!osd_entry(&r, Some(&full), OsdState::Up).slot.writable);
        let draining = osd_entry(&r, Some(&live), OsdState::Draining);
        assert!(!draining.slot.writable);
        assert_eq!(draining.slot.weight, 0.0);
        let down = osd_entry(&r, None, OsdState::Down);
        assert!(!down.slot.writable);
        assert!(
            down.slot.weight > 0.0,
            "a down OSD keeps its fragments' places"
        );
        assert_eq!(down.addr, "127.0.0.1:1");
    }

    #[test]
    fn presets_round_trip_through_their_record_and_bad_ones_are_refused() {
        let preset = default_preset("default");
        let record = PresetRecord::from_preset(&preset);
        let json = serde_json::to_string(&record).unwrap();
        let back: PresetRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_preset().unwrap(), preset);
        let mut bad = record.clone();
        bad.policies[0].c = 1;
        assert!(bad.to_preset().unwrap_err().contains("c = 1"));
        let mut bad = record;
        bad.compression = "brotli".into();
        assert!(bad.to_preset().unwrap_err().contains("brotli"));
    }
}
