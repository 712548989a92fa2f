//! The cluster layer: how nodes share volumes through the registry.
//!
//! `failover_plan` holds the pure decisions of failover (who adopts what, where a DTL goes,
//! what a node does after it was fenced); the code that carries them out against the registry
//! and the volume manager lives next to it.

pub mod failover;
pub mod failover_plan;
pub mod move_api;
pub mod moving;
