//! The OSD side of the erasure-coded tier (issue 12, in progress): the wire protocol between the
//! `ec` store and `vstor osd` daemons ([`proto`]), and an OSD's fragments on its disk
//! ([`store`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod store;
