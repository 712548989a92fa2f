//! Edges and their attachments: which `vstor edge` processes run, and which volumes each one
//! serves to its hypervisor host.
//!
//! An edge registers `/vstor/edges/{edge}` ([`EdgeRecord`]) under its own lease: the key is
//! there while the process lives. A volume's attachments are one key,
//! `/vstor/attachments/{volume}` (a JSON list of [`Attachment`]), not under a lease: they
//! outlive a crashed edge, which re-attaches them when it starts again. Every change of that
//! list is a compare-and-swap on the key's revision, and the new list is computed by one pure
//! function, [`attach_rule`], from the old list and the set of live edges:
//!
//! - a volume may be attached on several edges only while every attachment is read-only
//!   (snapshots, templates): two writers on two hosts would be two guests writing one disk;
//! - a second writable attach (or a read-only one next to a writable one) is refused with
//!   [`RegistryError::AttachedElsewhere`], naming the edge that holds it;
//! - unless that edge is dead (its lease gone): the new attach takes its place, so a VM can be
//!   restarted on another host after its host died;
//! - attaching again on the same edge replaces that edge's entry (a restarted edge re-attaching).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{RegistryError, Result};

/// A running edge, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRecord {
    /// Unique edge name (`vstor edge --name`, default the host name).
    pub name: String,
    /// The edge daemon's HTTP API, `host:port`.
    pub api_addr: String,
    /// Host name of the machine it runs on.
    pub host: String,
    /// The edge's NBD server, `host:port`.
    #[serde(default)]
    pub nbd_addr: String,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub started_at: u64,
}

/// One edge serving one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub edge: String,
    pub read_only: bool,
    /// When it was attached, seconds since the Unix epoch.
    pub since: u64,
}

/// The attachment list of `volume` after `edge` attaches it (`read_only`), or why not.
/// `live` holds the names of the edges whose lease is alive.
pub fn attach_rule(
    volume: &str,
    current: &[Attachment],
    live: &BTreeSet<String>,
    edge: &str,
    read_only: bool,
    now: u64,
) -> Result<Vec<Attachment>> {
    let mut next = Vec::with_capacity(current.len() + 1);
    for other in current {
        if other.edge == edge {
            continue; // replaced below
        }
        if !live.contains(&other.edge) {
            // A dead edge's writable attachment is taken over; its read-only ones go too (it
            // re-attaches them when it comes back, if the rule allows then).
            continue;
        }
        if !read_only || !other.read_only {
            return Err(RegistryError::AttachedElsewhere {
                volume: volume.to_string(),
                edge: other.edge.clone(),
                read_only: other.read_only,
            });
        }
        next.push(other.clone());
    }
    next.push(Attachment {
        edge: edge.to_string(),
        read_only,
        since: now,
    });
    Ok(next)
}

/// The attachment list of `volume` after `edge` detaches it, or
/// [`RegistryError::NotAttached`].
pub fn detach_rule(volume: &str, current: &[Attachment], edge: &str) -> Result<Vec<Attachment>> {
    if !current.iter().any(|a| a.edge == edge) {
        return Err(RegistryError::NotAttached {
            volume: volume.to_string(),
            edge: edge.to_string(),
        });
    }
    Ok(current.iter().filter(|a| a.edge != edge).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_string()).collect()
    }

    fn att(edge: &str, read_only: bool) -> Attachment {
        Attachment {
            edge: edge.into(),
            read_only,
            since: 1,
        }
    }

    #[test]
    fn one_writer_or_many_readers() {
        let first = attach_rule("v", &[], &live(&["a", "b"]), "a", false, 1).unwrap();
        assert_eq!(first, [att("a", false)]);
        match attach_rule("v", &first, &live(&["a", "b"]), "b", false, 2) {
            Err(RegistryError::AttachedElsewhere {
                edge, read_only, ..
            }) => assert_eq!((edge.as_str(), read_only), ("a", false)),
            other => panic!("second writer: {other:?}"),
        }
        // A reader next to a writer is refused too.
        assert!(attach_rule("v", &first, &live(&["a", "b"]), "b", true, 2).is_err());
        // Readers share.
        let ro = attach_rule("t", &[att("a", true)], &live(&["a", "b"]), "b", true, 2).unwrap();
        assert_eq!(ro.len(), 2);
        // A writer next to readers is refused.
        let err = attach_rule("t", &ro, &live(&["a", "b", "c"]), "c", false, 3).unwrap_err();
        assert!(err.to_string().contains("edge a"), "{err}");
    }

    #[test]
    fn dead_holder_is_taken_over_and_reattach_replaces() {
        let taken = attach_rule("v", &[att("a", false)], &live(&["b"]), "b", false, 5).unwrap();
        assert_eq!(
            taken,
            [Attachment {
                edge: "b".into(),
                read_only: false,
                since: 5
            }]
        );
        let again = attach_rule("v", &taken, &live(&["b"]), "b", false, 6).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].since, 6);
    }

    #[test]
    fn detach_removes_only_that_edge() {
        let list = [att("a", true), att("b", true)];
        assert_eq!(detach_rule("t", &list, "a").unwrap(), [att("b", true)]);
        assert!(matches!(
            detach_rule("t", &list, "c"),
            Err(RegistryError::NotAttached { .. })
        ));
    }
}
