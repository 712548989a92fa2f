//! This crate's integration tests, as one test binary: each file under `tests/` is a module of
//! it, and `tests/common` their shared helpers. One binary instead of 7: each links the
//! crate's whole dependency graph, which costs link time and disk on a two-core CI machine (see
//! the root crate's `tests/main.rs`); nextest still runs every test in a process of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;
mod nbd_clients;
mod nbd_protocol;
mod remote;
mod remote_server;
mod remote_vhost;
mod vhost_blkio;
mod vhost_protocol;
