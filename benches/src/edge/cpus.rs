//! How `vstor-bench edge` shares the machine's CPUs between the two hosts it stands for.
//!
//! Why: the picture is an edge on a hypervisor host talking to an owner on another
//! host, each with CPUs of its own. On one small machine every party (the load generator
//! standing for the guest, the edge, the node, the kernel's network path) competes for the same
//! CPUs, so the edge's extra hop is paid for out of the node's and the guest's CPU time too. The
//! bench therefore measures two models, one after the other, on the same processes:
//!
//! - **shared**: nothing is pinned; what the earlier figures measured.
//! - **split**: the owner's host is the last CPU (the node and etcd), the guest's host is the
//!   others (the load generator and the edge). The local baseline keeps the same split: the
//!   guest on its CPUs, the node on its own, as a VM beside its storage service on one host.
//!   With two CPUs this gives the edge *less* than a real host would: it shares one CPU with the
//!   guest.
//!
//! Pinning is `sched_setaffinity(2)` on every thread of a process (as `taskset -a -p` does);
//! threads created later inherit their creator's mask, so a pinned process stays pinned.

use std::fmt;

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// A CPU model of one measurement (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    Shared,
    Split,
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuModel::Shared => "shared",
            CpuModel::Split => "split",
        })
    }
}

/// The CPU sets of the two hosts under each model.
pub(crate) struct CpuSets {
    all: CpuSet,
    /// The owner's host under `split`.
    node: CpuSet,
    /// The guest's host (load generator and edge) under `split`.
    guest: CpuSet,
}

impl CpuSets {
    /// From the CPUs this process may run on; `None` with a single CPU (no split possible).
    pub(crate) fn detect() -> Result<Option<Self>> {
        Self::of(sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?)
    }

    /// The split of `all`: its last CPU for the node, the others for the guest.
    fn of(all: CpuSet) -> Result<Option<Self>> {
        let cpus = members(&all);
        let Some((&last, others)) = cpus.split_last() else {
            bail!("this process may run on no CPU");
        };
        if others.is_empty() {
            return Ok(None);
        }
        let mut node = CpuSet::new();
        node.set(last)?;
        let mut guest = CpuSet::new();
        for &cpu in others {
            guest.set(cpu)?;
        }
        Ok(Some(Self { all, node, guest }))
    }

    /// Which CPUs the split gives each host, for the report.
    pub(crate) fn describe(&self) -> String {
        let list = |set: &CpuSet| {
            members(set)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "node on CPU {}, guest and edge on CPU {}",
            list(&self.node),
            list(&self.guest)
        )
    }

    /// The owner's host's CPUs under `model`.
    pub(crate) fn node(&self, model: CpuModel) -> &CpuSet {
        match model {
            CpuModel::Shared => &self.all,
            CpuModel::Split => &self.node,
        }
    }

    /// The guest's host's CPUs under `model`.
    pub(crate) fn guest(&self, model: CpuModel) -> &CpuSet {
        match model {
            CpuModel::Shared => &self.all,
            CpuModel::Split => &self.guest,
        }
    }
}

/// The CPUs in `set`, ascending.
fn members(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Pin every thread of process `pid` to `cpus`.
pub(crate) fn pin_process(pid: u32, cpus: &CpuSet) -> Result<()> {
    let tasks = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {tasks}"))?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread that exited since the listing is not an error.
        match sched_setaffinity(Pid::from_raw(tid), cpus) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => bail!("cannot pin thread {tid} of process {pid}: {e}"),
        }
    }
    Ok(())
}

/// Pin the calling thread (the load generator runs on it) to `cpus`.
pub(crate) fn pin_this_thread(cpus: &CpuSet) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), cpus).context("cannot pin the load generator's thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpus: &[usize]) -> CpuSet {
        let mut set = CpuSet::new();
        for &cpu in cpus {
            set.set(cpu).unwrap();
        }
        set
    }

    #[test]
    fn the_node_gets_the_last_cpu_and_the_guest_the_others() {
        let two = CpuSets::of(set(&[0, 1])).unwrap().unwrap();
        assert_eq!(members(two.node(CpuModel::Split)), [1]);
        assert_eq!(members(two.guest(CpuModel::Split)), [0]);
        assert_eq!(members(two.node(CpuModel::Shared)), [0, 1]);
        assert_eq!(members(two.guest(CpuModel::Shared)), [0, 1]);
        assert_eq!(two.describe(), "node on CPU 1, guest and edge on CPU 0");

        // Gaps (an affinity mask that excludes some CPUs) are kept out of both sides.
        let four = CpuSets::of(set(&[0, 2, 3, 5])).unwrap().unwrap();
        assert_eq!(members(four.node(CpuModel::Split)), [5]);
        assert_eq!(members(four.guest(CpuModel::Split)), [0, 2, 3]);

        assert!(
            CpuSets::of(set(&[3])).unwrap().is_none(),
            "one CPU cannot split"
        );
        assert!(CpuSets::of(CpuSet::new()).is_err());
    }

    #[test]
    fn pinning_a_process_pins_every_thread_it_has() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let only = members(&sched_getaffinity(Pid::from_raw(0)).unwrap())[0];
        let result = pin_process(pid, &set(&[only]));
        let seen = sched_getaffinity(Pid::from_raw(pid as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        result.unwrap();
        assert_eq!(members(&seen.unwrap()), [only]);

        let err = pin_process(u32::MAX, &set(&[only])).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot list /proc/4294967295/task"),
            "{err:#}"
        );
    }
}
