//! Which machine this process runs on, so an edge can tell that a volume's owner shares its host
//! and use the owner's unix socket (`vstor serve --edge-socket`) instead of TCP.
//!
//! *Why `/etc/machine-id`.* It is what systemd, journald and D-Bus use for the same question:
//! unique per installation, stable across reboots and renames, and the same for every process
//! of the host whatever network namespace it runs in (so an edge in another namespace of the same
//! host still counts as local; the bench and tests that want TCP there say `--transport tcp`).
//! A host name would be neither unique nor stable. Without a machine id (a minimal container)
//! the host name stands in, and a socket path that does not exist in the edge's mount namespace
//! falls back to TCP anyway (`vstor_edge::remote::Endpoint::unix`).

/// This host's identity: `/etc/machine-id`, or `host:<hostname>` without one.
pub fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("host:{}", crate::edge_host::host_name()))
}
