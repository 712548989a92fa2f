//! What every benchmark here shares: child processes that cannot outlive the run
//! ([`process`]), the `vstor serve` and `vstor dtl` under test ([`vstor`]), the work directory
//! and the checks made before anything starts ([`setup`]), the machine's busy CPU time
//! ([`cpu`]), medians and percentiles ([`stats`]),
//! latency histograms ([`histogram`]), seeded offsets and payloads ([`rng`]) and the report
//! table ([`table`]); for the fio-driven NBD benchmarks also fio itself ([`fio`]) and the peer,
//! `qemu-nbd` ([`qemu_nbd`]).

pub(crate) mod cpu;
pub(crate) mod fio;
pub(crate) mod histogram;
pub(crate) mod process;
pub(crate) mod qemu_nbd;
pub(crate) mod rng;
pub(crate) mod setup;
pub(crate) mod stats;
pub(crate) mod table;
pub(crate) mod vstor;
