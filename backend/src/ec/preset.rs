//! Presets: how a namespace's objects are encoded and spread, chosen per volume at creation.
//!
//! A preset is an ordered list of policies `(k, m, c, x)`, tried best first: `k` data and `m`
//! parity fragments, a put acknowledged once `c` fragments are durable (the rest completed in the
//! background), at most `x` fragments per failure domain. When too few OSDs or domains are up
//! for the first policy, the next one is used (Open vStorage ALBA's rule), so a cluster with a
//! domain down keeps taking writes at lower redundancy instead of refusing them, and repair
//! later re-encodes those objects under the best policy.

use super::placement::OsdSlot;

/// One way of encoding an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub k: u8,
    pub m: u8,
    /// Fragments durable before a put is acknowledged: `k <= c <= k + m`.
    pub c: u8,
    /// Most fragments in one failure domain.
    pub x: u8,
}

impl Policy {
    /// `k + m` fragments, `c` defaulting to `k + 1` (one fragment to spare at the ack), capped at
    /// `k + m`, and `x` to `m` (losing one domain loses at most `m` fragments).
    pub fn new(k: u8, m: u8) -> Self {
        Self {
            k,
            m,
            c: (k.saturating_add(1)).min(k.saturating_add(m)),
            x: m.max(1),
        }
    }

    pub fn fragments(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.k == 0 {
            return Err("k must be at least 1".into());
        }
        if self.fragments() > 255 {
            return Err(format!("k + m = {} exceeds 255", self.fragments()));
        }
        if self.c < self.k || usize::from(self.c) > self.fragments() {
            return Err(format!(
                "c = {} must lie between k = {} and k + m = {}",
                self.c,
                self.k,
                self.fragments()
            ));
        }
        if self.x == 0 {
            return Err("x must be at least 1".into());
        }
        Ok(())
    }

    /// Whether `osds` can hold this policy's fragments: enough writable OSDs, counting at most
    /// `x` per domain.
    pub fn fits(&self, osds: &[OsdSlot]) -> bool {
        let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for osd in osds.iter().filter(|o| o.writable && o.weight > 0.0) {
            *per.entry(osd.domain.as_str()).or_default() += 1;
        }
        let usable: usize = per.values().map(|n| (*n).min(usize::from(self.x))).sum();
        usable >= self.fragments()
    }
}

/// How a preset's objects are compressed before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Lz4,
}

/// A named, ordered list of policies and how fragments are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    pub name: String,
    pub policies: Vec<Policy>,
    /// Bytes per fragment piece of a full chunk (see `layout`).
    pub fragment_size: u32,
    pub compression: Compression,
    /// Fragments are encrypted (AES-256-CTR, so partial reads stay partial).
    pub encrypted: bool,
    /// Add a local parity per failure domain holding two or more of an object's fragments
    /// (`ec::local`), so one lost fragment is rebuilt from its own domain.
    pub local_parity: bool,
}

impl Preset {
    pub fn validate(&self) -> Result<(), String> {
        if self.policies.is_empty() {
            return Err(format!("preset {} has no policy", self.name));
        }
        for policy in &self.policies {
            policy
                .validate()
                .map_err(|e| format!("preset {}: {e}", self.name))?;
        }
        if self.fragment_size < 4096 || !self.fragment_size.is_multiple_of(4096) {
            return Err(format!(
                "preset {}: fragment size {} is not a positive multiple of 4 KiB",
                self.name, self.fragment_size
            ));
        }
        Ok(())
    }

    /// The best policy the OSDs can hold now, with its position (0 = the preset's first).
    pub fn choose(&self, osds: &[OsdSlot]) -> Option<(usize, Policy)> {
        self.policies
            .iter()
            .copied()
            .enumerate()
            .find(|(_, p)| p.fits(osds))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;

    fn map(per_domain: &[usize]) -> Vec<OsdSlot> {
        let mut out = Vec::new();
        for (d, n) in per_domain.iter().enumerate() {
            for _ in 0..*n {
                out.push(OsdSlot {
                    id: out.len() as u64,
                    domain: format!("d{d}"),
                    weight: 1.0,
                    writable: true,
                });
            }
        }
        out
    }

    fn preset() -> Preset {
        Preset {
            name: "default".into(),
            policies: vec![
                Policy {
                    x: 2,
                    ..Policy::new(4, 2)
                },
                Policy {
                    x: 2,
                    ..Policy::new(2, 1)
                },
                Policy {
                    x: 1,
                    ..Policy::new(1, 0)
                },
            ],
            fragment_size: 1 << 20,
            compression: Compression::None,
            encrypted: false,
            local_parity: false,
        }
    }

    #[test]
    fn the_best_policy_that_fits_is_chosen() {
        let p = preset();
        p.validate().unwrap();
        assert_eq!(p.choose(&map(&[2, 2, 2])).map(|c| c.0), Some(0));
        // One domain down: 4 OSDs at most 2 per domain fit 2+1, not 4+2.
        assert_eq!(p.choose(&map(&[2, 2])).map(|c| c.0), Some(1));
        assert_eq!(p.choose(&map(&[1])).map(|c| c.0), Some(2));
        assert_eq!(p.choose(&[]), None);
        let mut down = map(&[2, 2, 2]);
        down[0].writable = false;
        assert_eq!(p.choose(&down).map(|c| c.0), Some(1));
    }

    #[test]
    fn bad_presets_are_refused_with_a_reason() {
        let mut p = preset();
        p.policies[0].c = 7;
        assert!(p.validate().unwrap_err().contains("c = 7"));
        let mut p = preset();
        p.fragment_size = 1000;
        assert!(p.validate().unwrap_err().contains("4 KiB"));
        let mut p = preset();
        p.policies.clear();
        assert!(p.validate().is_err());
        assert_eq!(Policy::new(8, 3).c, 9);
        assert_eq!(Policy::new(1, 0).c, 1);
    }
}
