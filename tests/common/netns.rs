//! Network namespaces for partition tests: one bridge on the host and, per node, a namespace
//! joined to it by a veth pair, with an address on a private /24. A partition is the node's
//! link going down (`tc netem` is not installed here); everything is removed in `Drop`, also
//! when the test panics.
//!
//! Names are unique per harness: the first free number `N` (0..=255) whose bridge `vsbrN` can
//! be created claims the subnet `10.213.N.0/24` (creating a link is atomic, so concurrent tests
//! never share one). The host end of the bridge is `10.213.N.1`, so daemons on the host (etcd)
//! can listen there; node `i` is `10.213.N.(i+10)` in namespace `vstorN-i`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::{Command, Output};

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct NetNs {
    id: u8,
    bridge: String,
    nodes: usize,
    /// Namespaces created so far (removed in `Drop`).
    created: Vec<String>,
}

impl NetNs {
    /// A bridge and `nodes` namespaces, each with loopback and `eth0` up.
    pub fn new(nodes: usize) -> Self {
        assert!(nodes < 200, "at most 199 nodes per harness");
        let id = (0..=255u8)
            .find(|id| {
                let bridge = format!("vsbr{id}");
                ip(&["link", "add", &bridge, "type", "bridge"])
                    .status
                    .success()
            })
            .expect("no free bridge name vsbr0..vsbr255");
        let mut net = Self {
            id,
            bridge: format!("vsbr{id}"),
            nodes,
            created: Vec::new(),
        };
        let host = format!("{}/24", net.host_ip());
        ip_ok(&["addr", "add", &host, "dev", &net.bridge]);
        ip_ok(&["link", "set", &net.bridge, "up"]);
        for i in 0..nodes {
            let ns = net.ns(i);
            // A namespace left behind by a killed test run with the same number.
            let _ = ip(&["netns", "del", &ns]);
            ip_ok(&["netns", "add", &ns]);
            net.created.push(ns.clone());
            let outer = format!("vs{id}h{i}");
            let inner = format!("vs{id}n{i}");
            let _ = ip(&["link", "del", &outer]);
            ip_ok(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip_ok(&["link", "set", &outer, "master", &net.bridge]);
            ip_ok(&["link", "set", &outer, "up"]);
            ip_ok(&["link", "set", &inner, "netns", &ns]);
            ip_ok(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            let addr = format!("{}/24", net.ip(i));
            ip_ok(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Namespace name of node `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("vstor{}-{i}", self.id)
    }

    /// Address of node `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.id, 10 + i as u8)
    }

    /// The host's address on the bridge (reachable from every namespace while its link is up).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.id, 1)
    }

    /// `program` run inside node `i`'s namespace (`ip netns exec`).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.ns(i)).arg(program);
        cmd
    }

    /// Run `work` on a new thread that entered node `i`'s namespace (sockets it creates live
    /// there) and return its result.
    pub fn run_in<T: Send + 'static>(
        &self,
        i: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.ns(i));
        std::thread::spawn(move || {
            let handle = File::open(&path).expect("open the namespace");
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the namespace");
            work()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// Partition node `i`: its link goes down (nothing in or out but its own loopback).
    pub fn link_down(&self, i: usize) {
        ip_ok(&["-n", &self.ns(i), "link", "set", "eth0", "down"]);
    }

    /// Heal the partition of node `i`.
    pub fn link_up(&self, i: usize) {
        ip_ok(&["-n", &self.ns(i), "link", "set", "eth0", "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the host end.
        for ns in &self.created {
            let _ = ip(&["netns", "del", ns]);
        }
        for i in 0..self.nodes {
            let _ = ip(&["link", "del", &format!("vs{}h{i}", self.id)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
