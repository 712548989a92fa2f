//! What every benchmark here shares: child processes that cannot outlive the run
//! ([`process`]), the `vstor serve` under test ([`vstor`]), the work directory and the checks
//! made before anything starts ([`setup`]), medians ([`stats`]) and the report table
//! ([`table`]).

pub(crate) mod process;
pub(crate) mod setup;
pub(crate) mod stats;
pub(crate) mod table;
pub(crate) mod vstor;
