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
