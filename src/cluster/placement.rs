//! Where new volumes and their DTLs go: pure functions of the live nodes and their loads.
//!
//! - A new volume goes to the least-loaded live node (fewest volumes; ties by name, so the
//!   choice is deterministic and tests can predict it).
//! - A volume's DTL goes to a live node in the owner's recovery domain, else in the owner's own
//!   domain, never on the owner itself; among candidates the one holding the fewest DTLs (ties
//!   by name). No candidate: no DTL placement (the caller decides whether that is an error).

use std::collections::BTreeMap;

use crate::registry::NodeRecord;

/// The least-loaded node among `live` by `volumes` (per node name; absent = 0).
pub fn least_loaded<'a>(
    live: &'a [NodeRecord],
    volumes: &BTreeMap<String, usize>,
) -> Option<&'a NodeRecord> {
    live.iter()
        .min_by_key(|n| (volumes.get(&n.name).copied().unwrap_or(0), n.name.as_str()))
}

/// The DTL node for a volume owned by `owner`: a live node in the owner's recovery domain,
/// else one in its own domain, never `owner`; the one with the fewest DTLs (`dtls` per node).
pub fn dtl_node<'a>(
    owner: &NodeRecord,
    live: &'a [NodeRecord],
    dtls: &BTreeMap<String, usize>,
) -> Option<&'a NodeRecord> {
    let in_domain = |domain: &str| {
        live.iter()
            .filter(|n| n.name != owner.name && n.domain == domain)
            .min_by_key(|n| (dtls.get(&n.name).copied().unwrap_or(0), n.name.as_str()))
    };
    owner
        .recovery_domain
        .as_deref()
        .and_then(in_domain)
        .or_else(|| in_domain(&owner.domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, domain: &str, recovery: Option<&str>) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            domain: domain.into(),
            recovery_domain: recovery.map(Into::into),
            api_addr: format!("{name}:1"),
            nbd_addr: format!("{name}:2"),
            dtl_addr: format!("{name}:3"),
            edge_addr: None,
            edge_socket: None,
            host_id: None,
            started_at: 0,
            version: String::new(),
        }
    }

    fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, c)| ((*n).to_string(), *c)).collect()
    }

    #[test]
    fn least_loaded_picks_fewest_volumes_then_name() {
        let live = [
            node("n1", "a", None),
            node("n2", "a", None),
            node("n3", "b", None),
        ];
        assert_eq!(least_loaded(&live, &counts(&[])).unwrap().name, "n1");
        let loads = counts(&[("n1", 2), ("n2", 1), ("n3", 1)]);
        assert_eq!(least_loaded(&live, &loads).unwrap().name, "n2");
        let loads = counts(&[("n1", 2), ("n2", 3)]);
        assert_eq!(least_loaded(&live, &loads).unwrap().name, "n3");
        assert!(least_loaded(&[], &loads).is_none());
    }

    #[test]
    fn dtl_prefers_the_recovery_domain_then_the_own_domain_never_the_owner() {
        let owner = node("n1", "a", Some("b"));
        let live = [
            owner.clone(),
            node("n2", "a", None),
            node("n3", "b", None),
            node("n4", "b", None),
        ];
        // Recovery domain first, least DTLs, ties by name.
        assert_eq!(dtl_node(&owner, &live, &counts(&[])).unwrap().name, "n3");
        let dtls = counts(&[("n3", 2), ("n4", 1)]);
        assert_eq!(dtl_node(&owner, &live, &dtls).unwrap().name, "n4");
        // No live node in the recovery domain: the owner's own domain, not the owner.
        let live = [owner.clone(), node("n2", "a", None), node("n5", "c", None)];
        assert_eq!(dtl_node(&owner, &live, &counts(&[])).unwrap().name, "n2");
        // Only the owner (and other domains): nothing.
        let live = [owner.clone(), node("n5", "c", None)];
        assert!(dtl_node(&owner, &live, &counts(&[])).is_none());
        // No recovery domain: own domain.
        let plain = node("n1", "a", None);
        let live = [plain.clone(), node("n2", "a", None), node("n3", "b", None)];
        assert_eq!(dtl_node(&plain, &live, &counts(&[])).unwrap().name, "n2");
    }
}
