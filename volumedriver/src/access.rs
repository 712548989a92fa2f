//! Who may open a volume over NBD: the volume's allow list, persisted in its [`VolumeConfig`]
//! (`allow_subjects`, `allow_networks`) so that it follows the volume through restarts, moves
//! to another node and failover, like every other per-volume setting.
//!
//! The rule, in one place so the frontends, the API and the documentation agree: a client is
//! allowed when both lists are empty (everyone, as before allow lists existed), or its source
//! address is in one of the networks, or it completed TLS with a verified client certificate
//! whose subject common name (CN) is one of the subjects. The lists are alternatives, not both
//! required. Subjects only mean something when the node asks for client certificates; networks
//! work with or without TLS.
//!
//! Networks are [`ipnet::IpNet`]: a small, widely used crate with no dependencies of its own
//! whose parser and `contains` handle both address families and prefix lengths, which std has
//! no type for. A bare address is taken as a host network (`/32`, `/128`).
//!
//! [`VolumeConfig`]: crate::config::VolumeConfig

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The longest subject accepted: X.509's upper bound for a common name (`ub-common-name`).
pub const MAX_SUBJECT_LEN: usize = 64;
/// Entries per list; an allow list is a short list of names, not a database.
pub const MAX_ENTRIES: usize = 256;

/// A volume's NBD allow list (see the module documentation for the rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAccess {
    /// Client-certificate subject CNs.
    #[serde(default)]
    pub allow_subjects: Vec<String>,
    /// Source networks.
    #[serde(default)]
    pub allow_networks: Vec<IpNet>,
}

impl VolumeAccess {
    /// Parse and check user input: every network a CIDR (or a bare address), every subject a
    /// non-empty printable string of at most [`MAX_SUBJECT_LEN`] bytes. The error names the
    /// offending entry.
    pub fn parse(subjects: &[String], networks: &[String]) -> Result<Self, String> {
        Ok(Self {
            allow_subjects: parse_subjects(subjects)?,
            allow_networks: parse_networks(networks)?,
        })
    }

    /// Whether everyone is allowed (both lists empty).
    pub fn is_open(&self) -> bool {
        self.allow_subjects.is_empty() && self.allow_networks.is_empty()
    }

    /// The rule: an empty list allows everyone; otherwise the address must be in a network or
    /// the verified certificate's CN among the subjects.
    pub fn allows(&self, addr: IpAddr, subject: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
        let addr = addr.to_canonical();
        self.allow_networks.iter().any(|net| net.contains(&addr))
            || subject.is_some_and(|s| self.allow_subjects.iter().any(|a| a == s))
    }
}

pub fn parse_subjects(subjects: &[String]) -> Result<Vec<String>, String> {
    if subjects.len() > MAX_ENTRIES {
        return Err(format!("at most {MAX_ENTRIES} subjects"));
    }
    let mut out: Vec<String> = Vec::with_capacity(subjects.len());
    for s in subjects {
        if s.is_empty() || s.len() > MAX_SUBJECT_LEN || s.chars().any(char::is_control) {
            return Err(format!(
                "subject {s:?} must be 1 to {MAX_SUBJECT_LEN} bytes without control characters \
                 (a client certificate's CN)"
            ));
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

pub fn parse_networks(networks: &[String]) -> Result<Vec<IpNet>, String> {
    if networks.len() > MAX_ENTRIES {
        return Err(format!("at most {MAX_ENTRIES} networks"));
    }
    let mut out = Vec::with_capacity(networks.len());
    for n in networks {
        let net = IpNet::from_str(n.trim())
            .or_else(|_| IpAddr::from_str(n.trim()).map(IpNet::from))
            .map_err(|_| {
                format!(
                    "network {n:?} is not a CIDR such as 10.0.0.0/8 or fd00::/64, nor an address"
                )
            })?;
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn rule_and_parsing() {
        let open = VolumeAccess::default();
        assert!(open.allows("192.0.2.1".parse().unwrap_or(IpAddr::from([0; 4])), None));

        let acl = VolumeAccess::parse(&strings(&["alice"]), &strings(&["10.1.2.3/8", "127.0.0.2"]))
            .unwrap_or_default();
        assert_eq!(
            acl.allow_networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "127.0.0.2/32"]
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0; 4]));
        assert!(acl.allows(ip("10.9.9.9"), None));
        assert!(acl.allows(ip("::ffff:127.0.0.2"), None));
        assert!(!acl.allows(ip("127.0.0.1"), None));
        assert!(!acl.allows(ip("127.0.0.1"), Some("bob")));
        assert!(acl.allows(ip("127.0.0.1"), Some("alice")));

        let err = VolumeAccess::parse(&[], &strings(&["10.0.0.0/33"])).unwrap_err();
        assert!(err.contains("\"10.0.0.0/33\" is not a CIDR"), "{err}");
        assert!(VolumeAccess::parse(&strings(&[""]), &[]).is_err());
    }

    /// A configuration written before allow lists existed loads with empty lists (everyone
    /// allowed), and the lists round-trip through the stored form.
    #[test]
    fn configs_without_lists_load_open_and_lists_round_trip() {
        use crate::config::{VolumeConfig, VolumeOptions};
        let mut options = VolumeOptions::new(1 << 30);
        options.access =
            VolumeAccess::parse(&strings(&["alice"]), &strings(&["fd00::/64"])).unwrap();
        let config = VolumeConfig::new("v", &options, 0).unwrap();
        let mut json: serde_json::Value = serde_json::to_value(&config).unwrap();
        assert_eq!(json["allow_subjects"], serde_json::json!(["alice"]));
        assert_eq!(json["allow_networks"], serde_json::json!(["fd00::/64"]));
        let back: VolumeConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, config);

        let object = json.as_object_mut().unwrap();
        object.remove("allow_subjects");
        object.remove("allow_networks");
        let old: VolumeConfig = serde_json::from_value(json).unwrap();
        assert!(old.access.is_open());
    }
}
