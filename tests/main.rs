//! The root crate's integration tests, as one test binary: each file under `tests/` is a module
//! of it (`tests/cluster.rs` is `cluster::…`), and `tests/common` their shared harness.
//!
//! Why one binary: every test binary links the whole dependency graph (tokio, rustls, etcd's
//! gRPC client, object_store, …), so each file as its own binary meant 33 links of ~40 MB:
//! minutes of `cargo build` on two cores and over a gigabyte of a CI machine's disk, which ran
//! out while linking. nextest still runs every test in a process of its own; select a file's
//! tests with `cargo nextest run -p vstor -E 'test(/^cluster::/)'`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

mod api_auth;
mod api_errors;
mod backend_reads;
mod cli;
mod cluster;
mod cluster_failover;
mod crash;
mod credential_renewal;
mod dashboard;
mod dtl;
mod dtl_failover;
mod dtl_mtls;
mod ec_tier;
mod edge;
mod edge_failover;
mod encryption;
mod etcd_tls;
mod hostile_clients;
mod mds;
mod mds_node;
mod metrics;
mod nbd_acl;
mod nbd_clients;
mod nbd_hostile;
mod nbd_tls;
mod netns;
mod rough_edges;
mod s3_backend;
mod safety;
mod snapshots;
mod transfer;
mod upload;
mod vhost_guest;

/// With `autotests = false`, a file under a crate's `tests/` that `tests/main.rs` does not name
/// would be silently left out of the suite: every one must be a module of its crate's binary.
#[test]
fn every_test_file_is_a_module_of_its_crates_test_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for krate in [".", "volumedriver", "edge", "mds"] {
        let dir = root.join(krate).join("tests");
        let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "rs") && stem != "main" {
                assert!(
                    main.lines().any(|l| l == format!("mod {stem};")),
                    "{} is not declared in {}",
                    path.display(),
                    dir.join("main.rs").display()
                );
            }
        }
    }
}
