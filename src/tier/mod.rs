//! The erasure-coded capacity tier as the cluster sees it: OSD daemons (`vstor osd`), presets and
//! the tier's namespaces, all recorded in the cluster registry, and the `ec` backend that a node
//! opens over them (`vstor serve --backend ec[:PRESET]`).
//!
//! The fragments, placement and codec live in `vstor_backend::ec` and `vstor_backend::osd`; this
//! module is the glue to the registry and the daemons:
//! - [`records`]: the registry records and the pure rules over them (an OSD's state, the map
//!   placement sees), tested without a registry;
//! - [`map`]: [`map::RegistryTierMap`], the `TierMap` the `ec` store reads, backed by the
//!   registry, with the OSD map cached in memory;
//! - [`osd`]: the `vstor osd` daemon;
//! - [`cli`]: `vstor osd list|decommission|out|in` and `vstor preset create|list|show`;
//! - [`backend_cli`]: `vstor backend inspect|repair`;
//! - [`maintenance`]: a node's background repair and scrub of its volumes' objects.
//!
//! # Registry records (under `/vstor/` in etcd; values JSON)
//! | key                          | value           | lease  | written by |
//! |------------------------------|-----------------|--------|------------|
//! | `tier/next-osd-id`           | `u64`           | none   | an OSD's first start (compare-and-swap counter) |
//! | `tier/osds/{id}`             | [`records::OsdRecord`] | none | the OSD (address, domain, `last_seen`), the operator (`admin`) |
//! | `tier/osd-live/{id}`         | [`records::OsdLive`]   | OSD's | the OSD, every few seconds (usage); gone when it dies |
//! | `tier/presets/{name}`        | [`records::PresetRecord`] | none | `vstor preset create` |
//! | `tier/namespaces/{ns}`       | [`records::NamespaceEntry`] | none | the `ec` store: create, claim (compare-and-swap), delete |
//!
//! Placement is computed from `tier/osds` alone (rendezvous hashing), so nothing is stored per
//! object: the registry's size depends on the number of OSDs, presets and volumes, never on the
//! number of objects.

pub mod backend_cli;
pub mod cli;
pub mod maintenance;
pub mod map;
pub mod osd;
pub mod records;
