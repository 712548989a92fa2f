//! The MDS crate's one error type. Messages name the volume (table) and what failed.

use crate::table::Cork;

#[derive(Debug, thiserror::Error)]
pub enum MdsError {
    #[error("MDS store {path}: {what}: {source}")]
    Store {
        path: String,
        what: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("MDS table of volume {volume} is corrupt: {reason}")]
    Corrupt { volume: String, reason: String },
    #[error("MDS has no table for volume {volume}")]
    NoTable { volume: String },
    #[error("volume {volume}: owner tag {got} is older than the MDS's {known}: refused (fenced)")]
    Fenced {
        volume: String,
        got: u64,
        known: u64,
    },
    #[error("volume {volume}: this MDS is a slave for it and takes no map updates")]
    NotMaster { volume: String },
    #[error("volume {volume}: update expects the table at cork {expected}, the MDS is at {have}")]
    CorkMismatch {
        volume: String,
        expected: Cork,
        have: Cork,
    },
    #[error("volume {volume}: invalid request: {reason}")]
    Invalid { volume: String, reason: String },
    #[error("volume {volume}: backend: {reason}")]
    Backend { volume: String, reason: String },
    #[error("MDS {addr}: {reason}")]
    Net { addr: String, reason: String },
    #[error("MDS {addr} refused: {message}")]
    Refused {
        addr: String,
        code: crate::proto::ErrorCode,
        message: String,
    },
}

pub type Result<T, E = MdsError> = std::result::Result<T, E>;

impl MdsError {
    /// Map a redb error (any of its kinds) on the store at `path`. Lazy: the path is formatted
    /// only when there is an error (this sits on every entry of a dump and of a multi-set).
    pub(crate) fn store<'a, E: Into<redb::Error>>(
        path: &'a std::path::Path,
        what: &'static str,
    ) -> impl FnOnce(E) -> MdsError + 'a {
        move |e| MdsError::Store {
            path: path.display().to_string(),
            what: what.to_string(),
            source: Box::new(e.into()),
        }
    }
}
