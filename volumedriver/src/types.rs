//! The data model's vocabulary: clusters, SCOs and where a cluster lives.
//!
//! A volume is addressed in 4 KiB **clusters** (512-byte LBAs, 8 per cluster). Every cluster that
//! was ever written has a [`ClusterLocation`]: which SCO holds it, at which offset, in which
//! volume of the clone chain, and at which SCO version. The location is 8 bytes so that the whole
//! map of a volume fits in RAM: 2 MiB of map per GiB written.

use std::fmt;

/// Logical block (sector) size in bytes. Reads and writes are multiples of this.
pub const LBA_SIZE: u64 = 512;
/// Largest volume the engine accepts.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// A SCO holds at most this many clusters (the offset field is 16 bits).
pub const MAX_SCO_CLUSTERS: u64 = 1 << 16;

/// Index of a cluster in a volume (byte offset / cluster size).
pub type ClusterAddress = u64;

/// Per-volume, monotonically increasing SCO counter. 0 is reserved for "never written".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ScoNumber(pub u32);

/// Per-volume, monotonically increasing TLog counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TLogNumber(pub u64);

impl TLogNumber {
    pub fn object_name(self) -> String {
        format!("tlog_{:016x}", self.0)
    }

    pub fn parse_object_name(name: &str) -> Option<Self> {
        let hex = name.strip_prefix("tlog_")?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(Self)
    }
}

/// Identity of one SCO object: clone id (0 = this volume), number, version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScoName {
    pub clone_id: u8,
    pub number: ScoNumber,
    pub version: u8,
}

impl ScoName {
    pub fn new(number: ScoNumber) -> Self {
        Self {
            clone_id: 0,
            number,
            version: 0,
        }
    }

    /// Parse the `CC_NNNNNNNN_VV` form produced by `Display`.
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split('_');
        let (clone, number, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || clone.len() != 2 || number.len() != 8 || version.len() != 2 {
            return None;
        }
        Some(Self {
            clone_id: u8::from_str_radix(clone, 16).ok()?,
            number: ScoNumber(u32::from_str_radix(number, 16).ok()?),
            version: u8::from_str_radix(version, 16).ok()?,
        })
    }
}

impl fmt::Display for ScoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}_{:08x}_{:02x}",
            self.clone_id, self.number.0, self.version
        )
    }
}

/// Where a cluster's current content lives, packed into 8 bytes:
///
/// ```text
/// bits  0..32  SCO number   (0 = never written: reads return zeros)
/// bits 32..48  offset of the cluster inside the SCO, in clusters
/// bits 48..56  clone id     (0 = this volume, 1 = parent, ...)
/// bits 56..64  SCO version  (bumped when scrubbing rewrites a SCO)
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClusterLocation(u64);

impl ClusterLocation {
    pub const UNWRITTEN: Self = Self(0);

    pub fn new(sco: ScoName, offset: u16) -> Self {
        Self(
            u64::from(sco.number.0)
                | u64::from(offset) << 32
                | u64::from(sco.clone_id) << 48
                | u64::from(sco.version) << 56,
        )
    }

    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn is_unwritten(self) -> bool {
        self.sco_number().0 == 0
    }

    pub fn sco_number(self) -> ScoNumber {
        ScoNumber(self.0 as u32)
    }

    pub fn offset(self) -> u16 {
        (self.0 >> 32) as u16
    }

    pub fn clone_id(self) -> u8 {
        (self.0 >> 48) as u8
    }

    pub fn version(self) -> u8 {
        (self.0 >> 56) as u8
    }

    pub fn sco(self) -> ScoName {
        ScoName {
            clone_id: self.clone_id(),
            number: self.sco_number(),
            version: self.version(),
        }
    }
}

impl fmt::Debug for ClusterLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unwritten() {
            write!(f, "unwritten")
        } else {
            write!(f, "{}:{:04x}", self.sco(), self.offset())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn location_fields_round_trip(number in 1u32.., offset: u16, clone_id: u8, version: u8) {
            let sco = ScoName { clone_id, number: ScoNumber(number), version };
            let loc = ClusterLocation::new(sco, offset);
            prop_assert_eq!(loc.sco(), sco);
            prop_assert_eq!(loc.offset(), offset);
            prop_assert!(!loc.is_unwritten());
            prop_assert_eq!(ClusterLocation::from_raw(loc.raw()), loc);
            prop_assert_eq!(ScoName::parse(&sco.to_string()), Some(sco));
        }
    }

    #[test]
    fn names_have_the_documented_shape() {
        let sco = ScoName {
            clone_id: 1,
            number: ScoNumber(0x2a),
            version: 3,
        };
        assert_eq!(sco.to_string(), "01_0000002a_03");
        assert_eq!(ScoName::parse("01_0000002a"), None);
        assert_eq!(ScoName::parse("zz_0000002a_03"), None);
        assert_eq!(TLogNumber(7).object_name(), "tlog_0000000000000007");
        assert_eq!(
            TLogNumber::parse_object_name("tlog_0000000000000007"),
            Some(TLogNumber(7))
        );
        assert!(ClusterLocation::UNWRITTEN.is_unwritten());
        assert_eq!(std::mem::size_of::<ClusterLocation>(), 8);
    }
}
