use std::path::PathBuf;

use vstor_backend::BackendError;

/// Everything that can go wrong in the volume engine. Each message names the volume and, where
/// there is one, the file or object involved.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume} does not exist")]
    NotFound { volume: String },
    #[error("volume {volume} already exists")]
    Exists { volume: String },
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid setting for volume {volume}: {reason}")]
    InvalidConfig { volume: String, reason: String },
    #[error("volume {volume}: request [{offset}, +{len}) is outside the volume of {size} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("volume {volume}: offset {offset} and length {len} must be multiples of 512")]
    Misaligned {
        volume: String,
        offset: u64,
        len: u64,
    },
    #[error("volume {volume} is read-only")]
    ReadOnly { volume: String },
    #[error("volume {volume} is halted: {reason}")]
    Halted { volume: String, reason: String },
    #[error("volume {volume} is stopped")]
    Stopped { volume: String },
    #[error("volume {volume}: backend: {source}")]
    Backend {
        volume: String,
        #[source]
        source: BackendError,
    },
    #[error("volume {volume}: I/O error on {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: DTL {addr}: {reason}")]
    Dtl {
        volume: String,
        addr: String,
        reason: String,
    },
    #[error("volume {volume} was adopted by another node (backend owner tag {current} is newer than this node's {ours}); it is no longer served here")]
    Adopted {
        volume: String,
        ours: u64,
        current: u64,
    },
    /// The backend namespace holds another volume of the same name: this node's copy was
    /// deleted in the cluster (and the name created again) while this node was down or cut off.
    #[error("volume {volume}: the backend holds another volume of the same name (created at {theirs}, incarnation {theirs_incarnation}; this node's copy was created at {ours}, incarnation {ours_incarnation}): this copy was deleted in the cluster and is not served here")]
    Replaced {
        volume: String,
        /// Creation times, Unix seconds.
        ours: u64,
        theirs: u64,
        /// Incarnations (`VolumeConfig::incarnation`): they tell the two apart within a second.
        ours_incarnation: u64,
        theirs_incarnation: u64,
    },
    /// The node fenced itself (it may have lost its registry lease): writes and flushes are
    /// not acknowledged until it is healthy again. See [`crate::Volume::set_fenced`].
    #[error("volume {volume}: this node is fenced ({reason}); writes are not acknowledged")]
    Fenced { volume: String, reason: String },
    #[error("volume {volume} moved to node {node}; it is no longer served here")]
    Moved { volume: String, node: String },
    #[error("volume {volume} has no snapshot {snapshot:?}")]
    SnapshotNotFound { volume: String, snapshot: String },
    #[error("volume {volume} already has a snapshot {snapshot:?}")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("{what} of volume {volume} has clones ({}); delete them first", clones.join(", "))]
    HasClones {
        volume: String,
        what: String,
        clones: Vec<String>,
    },
    #[error("snapshot {snapshot:?} of volume {volume} is not on the backend yet; retry once its uploads are done")]
    NotInBackend { volume: String, snapshot: String },
    #[error("volume {volume}: {reason}")]
    Refused { volume: String, reason: String },
    /// The volume's encryption key cannot be had: the file is missing, unreadable, too short,
    /// or holds another key than the one the volume was encrypted with.
    #[error("volume {volume}: {source}")]
    EncryptionKey {
        volume: String,
        #[source]
        source: BackendError,
    },
    #[error("volume {volume}: {what} is corrupt: {reason}")]
    Corrupt {
        volume: String,
        what: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, VolumeError>;

impl VolumeError {
    pub fn io(volume: &str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let volume = volume.to_string();
        let path = path.into();
        move |source| VolumeError::Io {
            volume,
            path,
            source,
        }
    }

    pub fn backend(volume: &str) -> impl FnOnce(BackendError) -> Self {
        let volume = volume.to_string();
        move |source| VolumeError::Backend { volume, source }
    }

    pub fn corrupt(volume: &str, what: impl Into<String>, reason: impl Into<String>) -> Self {
        VolumeError::Corrupt {
            volume: volume.to_string(),
            what: what.into(),
            reason: reason.into(),
        }
    }
}
