//! This crate's integration tests, as one test binary: each file under `tests/` is a module of
//! it. One binary instead of 4: each links the
//! crate's whole dependency graph, which costs link time and disk on a two-core CI machine (see
//! the root crate's `tests/main.rs`); nextest still runs every test in a process of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod figures;
mod model;
mod net;
mod owner;
