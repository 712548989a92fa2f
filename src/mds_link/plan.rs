//! The node's MDS decisions as pure functions of what it has probed: where a volume's tables
//! live ([`Placement`]), which MDS a restart loads its map from ([`seed_source`]) and what a
//! check does about a dead master or a misplaced table ([`check`]). No sockets, no timers: the
//! caller probes each MDS and carries the decision out.

use serde::{Deserialize, Serialize};

/// Where a volume's tables live: one master (fed by the owner) and slaves (following the
/// backend). Kept in the registry under `mds/volumes/VOLUME`, so every node, and the next owner
/// after a failover, finds the same master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub master: String,
    pub slaves: Vec<String>,
    /// How many times a slave was promoted for this volume.
    #[serde(default)]
    pub promotions: u64,
}

impl Placement {
    /// The configured order: the first MDS is the master, the others slaves.
    pub fn initial(servers: &[String]) -> Option<Self> {
        let (master, slaves) = servers.split_first()?;
        Some(Self {
            master: master.clone(),
            slaves: slaves.to_vec(),
            promotions: 0,
        })
    }

    /// Placement on the cluster registry's live MDSes, `(addr, node, domain)` each: the master
    /// beside the owner (an MDS started with `--node OWNER`), else the first; one slave in the
    /// owner's recovery domain, else any other MDS. `None` without MDSes.
    pub fn automatic(
        servers: &[(String, Option<String>, String)],
        owner: &str,
        recovery_domain: &str,
    ) -> Option<Self> {
        let (master, _, _) = servers
            .iter()
            .find(|(_, node, _)| node.as_deref() == Some(owner))
            .or_else(|| servers.first())?;
        let others = || servers.iter().filter(|(addr, _, _)| addr != master);
        let slave = others()
            .find(|(_, _, domain)| domain == recovery_domain)
            .or_else(|| others().next());
        Some(Self {
            master: master.clone(),
            slaves: slave.map(|(addr, _, _)| addr.clone()).into_iter().collect(),
            promotions: 0,
        })
    }

    /// A stored placement made to fit the configured servers: an MDS no longer configured is
    /// dropped (a dropped master is replaced by its first slave still configured, which follows
    /// the backend, else the first configured server), new ones are slaves. `None` without
    /// servers.
    pub fn reconcile(stored: Option<Self>, servers: &[String]) -> Option<Self> {
        let Some(mut p) = stored else {
            return Self::initial(servers);
        };
        if !servers.contains(&p.master) {
            p.master = p
                .slaves
                .iter()
                .find(|s| servers.contains(s))
                .or_else(|| servers.first())?
                .clone();
        }
        p.slaves.retain(|s| servers.contains(s) && *s != p.master);
        for s in servers {
            if *s != p.master && !p.slaves.contains(s) {
                p.slaves.push(s.clone());
            }
        }
        Some(p)
    }

    /// Every MDS of the volume, master first.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.master).chain(&self.slaves)
    }

    /// `to` (a slave) becomes master; the old master becomes a slave.
    pub fn promote(&self, to: &str) -> Self {
        let mut slaves: Vec<String> = self.slaves.iter().filter(|s| *s != to).cloned().collect();
        slaves.push(self.master.clone());
        Self {
            master: to.to_string(),
            slaves,
            promotions: self.promotions + 1,
        }
    }
}

/// What one MDS said about a volume's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No answer (or the connection broke), with the reason.
    Unreachable(String),
    /// Reachable, but it has no table for the volume.
    NoTable,
    /// Its table: the role it holds and how many backend TLogs it lacks (`None`: its history
    /// no longer matches the backend's, so it would need a full rebuild).
    Table { master: bool, behind: Option<u64> },
}

impl Probe {
    fn usable_within(&self, max_behind: u64) -> Option<u64> {
        match self {
            Probe::Table {
                behind: Some(b), ..
            } if *b <= max_behind => Some(*b),
            _ => None,
        }
    }
}

/// Which MDS a restart (or adoption) loads its map from: the master if its table answers,
/// otherwise the most caught-up slave no more than `max_behind` TLogs behind. `Err` says why
/// none is used (the volume then replays its backend history).
pub fn seed_source<'a>(
    placement: &'a Placement,
    probes: &[(String, Probe)],
    max_behind: u64,
) -> Result<&'a str, String> {
    let probe = |addr: &str| probes.iter().find(|(a, _)| a == addr).map(|(_, p)| p);
    if let Some(Probe::Table {
        behind: Some(_), ..
    }) = probe(&placement.master)
    {
        return Ok(&placement.master);
    }
    best_slave(placement, probes, max_behind).map(|(addr, _)| addr)
}

fn best_slave<'a>(
    placement: &'a Placement,
    probes: &[(String, Probe)],
    max_behind: u64,
) -> Result<(&'a str, u64), String> {
    let mut best: Option<(&str, u64)> = None;
    let mut refused = Vec::new();
    for slave in &placement.slaves {
        let Some((_, probe)) = probes.iter().find(|(a, _)| a == slave) else {
            continue;
        };
        match probe.usable_within(max_behind) {
            Some(behind) if best.is_none_or(|(_, b)| behind < b) => best = Some((slave, behind)),
            Some(_) => {}
            None => refused.push(format!("{slave}: {}", describe(probe, max_behind))),
        }
    }
    best.ok_or_else(|| {
        if refused.is_empty() {
            "the master is unusable and there is no slave".to_string()
        } else {
            format!(
                "the master is unusable and no slave qualifies ({})",
                refused.join("; ")
            )
        }
    })
}

fn describe(probe: &Probe, max_behind: u64) -> String {
    match probe {
        Probe::Unreachable(reason) => format!("unreachable: {reason}"),
        Probe::NoTable => "no table".into(),
        Probe::Table { behind: None, .. } => "its history differs from the backend's".into(),
        Probe::Table {
            behind: Some(b), ..
        } => format!("{b} TLogs behind, more than the {max_behind} allowed"),
    }
}

/// What a periodic check does for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckPlan {
    /// Promote this slave (it is caught up first), then feed it.
    pub promote: Option<String>,
    /// Why the dead master could not be replaced (the volume keeps serving; its next restart
    /// replays the backend unless the master comes back).
    pub no_master: Option<String>,
    /// Slaves to (re)create as slaves: no table, or a stale master that came back.
    pub make_slave: Vec<String>,
    /// MDSes to catch up from the backend now (on demand): lagging slaves, and a master
    /// that lacks TLogs (it lost its data, or missed updates while it was down).
    pub catch_up: Vec<String>,
    /// The master lacks a table (an MDS that lost its data): create it before feeding.
    pub make_master: bool,
}

/// Decide a check from the probes of every MDS in `placement` (see [`CheckPlan`]).
pub fn check(placement: &Placement, probes: &[(String, Probe)], max_behind: u64) -> CheckPlan {
    let probe = |addr: &str| probes.iter().find(|(a, _)| a == addr).map(|(_, p)| p);
    let mut plan = CheckPlan::default();
    let master = probe(&placement.master);
    let mut effective = placement.clone();
    match master {
        Some(Probe::Unreachable(_)) | None => match best_slave(placement, probes, max_behind) {
            Ok((to, _)) => {
                plan.promote = Some(to.to_string());
                effective = placement.promote(to);
            }
            Err(reason) => plan.no_master = Some(reason),
        },
        Some(Probe::NoTable) => {
            plan.make_master = true;
            plan.catch_up.push(placement.master.clone());
        }
        Some(Probe::Table { behind, .. }) => {
            if *behind != Some(0) {
                plan.catch_up.push(placement.master.clone());
            }
        }
    }
    for slave in &effective.slaves {
        match probe(slave) {
            Some(Probe::NoTable | Probe::Table { master: true, .. }) => {
                plan.make_slave.push(slave.clone());
                plan.catch_up.push(slave.clone());
            }
            Some(Probe::Table { behind, .. }) if *behind != Some(0) => {
                plan.catch_up.push(slave.clone());
            }
            _ => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:10820")).collect()
    }

    fn table(behind: u64) -> Probe {
        Probe::Table {
            master: false,
            behind: Some(behind),
        }
    }

    #[test]
    fn placement_follows_the_configuration() {
        let s = servers(3);
        let p = Placement::initial(&s).unwrap();
        assert_eq!(p.master, s[0]);
        assert_eq!(p.slaves, s[1..]);
        assert_eq!(Placement::initial(&[]), None);
        // A promoted placement survives a restart with the same servers...
        let promoted = p.promote(&s[2]);
        assert_eq!(promoted.master, s[2]);
        assert_eq!(promoted.slaves, vec![s[1].clone(), s[0].clone()]);
        assert_eq!(promoted.promotions, 1);
        assert_eq!(
            Placement::reconcile(Some(promoted.clone()), &s),
            Some(promoted.clone())
        );
        // ...and loses an MDS no longer configured (its first slave takes over as master),
        // gaining new ones as slaves.
        let fewer = vec![s[0].clone(), s[1].clone(), "10.0.0.9:10820".to_string()];
        let p2 = Placement::reconcile(Some(promoted), &fewer).unwrap();
        assert_eq!(p2.master, s[1]);
        assert_eq!(p2.slaves, vec![s[0].clone(), "10.0.0.9:10820".to_string()]);
    }

    #[test]
    fn automatic_placement_puts_the_master_beside_the_owner_and_a_slave_in_its_recovery_domain() {
        let mds = |addr: &str, node: Option<&str>, domain: &str| {
            (
                addr.to_string(),
                node.map(ToString::to_string),
                domain.to_string(),
            )
        };
        let servers = vec![
            mds("a:1", Some("n0"), "d1"),
            mds("b:1", Some("n1"), "d1"),
            mds("c:1", Some("n2"), "d2"),
        ];
        let p = Placement::automatic(&servers, "n1", "d2").unwrap();
        assert_eq!(
            (p.master.as_str(), p.slaves.clone()),
            ("b:1", vec!["c:1".to_string()])
        );
        // No MDS beside the owner, none in its recovery domain: the first, and any other.
        let p = Placement::automatic(&servers, "n9", "d9").unwrap();
        assert_eq!(
            (p.master.as_str(), p.slaves.clone()),
            ("a:1", vec!["b:1".to_string()])
        );
        // A lone MDS has no slave; none at all places nothing.
        let p = Placement::automatic(&servers[..1], "n0", "d2").unwrap();
        assert!(p.slaves.is_empty());
        assert_eq!(Placement::automatic(&[], "n0", "d1"), None);
    }

    #[test]
    fn a_restart_seeds_from_the_master_or_the_most_caught_up_slave() {
        let s = servers(3);
        let p = Placement::initial(&s).unwrap();
        let mut probes = vec![
            (s[0].clone(), table(3)),
            (s[1].clone(), table(2)),
            (s[2].clone(), table(1)),
        ];
        assert_eq!(seed_source(&p, &probes, 10), Ok(s[0].as_str()));
        probes[0].1 = Probe::Unreachable("refused".into());
        assert_eq!(seed_source(&p, &probes, 10), Ok(s[2].as_str()));
        let err = seed_source(&p, &probes, 0).unwrap_err();
        assert!(err.contains("more than the 0 allowed"), "{err}");
    }

    #[test]
    fn a_dead_master_is_replaced_by_the_best_slave_within_the_limit() {
        let s = servers(3);
        let p = Placement::initial(&s).unwrap();
        let probes = vec![
            (s[0].clone(), Probe::Unreachable("timeout".into())),
            (s[1].clone(), table(5)),
            (s[2].clone(), table(1)),
        ];
        let plan = check(&p, &probes, 4);
        assert_eq!(plan.promote.as_deref(), Some(s[2].as_str()));
        // The other slave lags: it catches up; the dead old master is left alone.
        assert_eq!(plan.catch_up, vec![s[1].clone()]);
        assert!(plan.make_slave.is_empty());
        // Every slave too far behind: no promotion, and the reason names them.
        let plan = check(&p, &probes, 0);
        assert_eq!(plan.promote, None);
        let reason = plan.no_master.unwrap();
        assert!(reason.contains(&s[1]) && reason.contains(&s[2]), "{reason}");
    }

    #[test]
    fn returning_masters_and_empty_mdses_become_slaves() {
        let s = servers(3);
        let p = Placement::initial(&s).unwrap();
        let probes = vec![
            (
                s[0].clone(),
                Probe::Table {
                    master: true,
                    behind: Some(0),
                },
            ),
            (
                s[1].clone(),
                Probe::Table {
                    master: true,
                    behind: Some(0),
                },
            ),
            (s[2].clone(), Probe::NoTable),
        ];
        let plan = check(&p, &probes, 4);
        assert_eq!(plan.promote, None);
        assert_eq!(plan.make_slave, vec![s[1].clone(), s[2].clone()]);
        assert!(!plan.make_master);
        let plan = check(&p, &[(s[0].clone(), Probe::NoTable)], 4);
        assert!(plan.make_master);
        assert_eq!(plan.catch_up, vec![s[0].clone()]);
    }
}
