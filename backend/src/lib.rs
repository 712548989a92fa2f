//! The backend tier: where SCOs and TLogs go once they leave a node's write buffer.
//!
//! Everything above this crate talks to an [`ObjectStore`]: namespaces (one per volume) of named,
//! immutable objects with put, get, ranged get, delete and list. Backend TLogs are the source of
//! truth for a volume's metadata, so a store must never hand back bytes it cannot vouch for: every
//! implementation verifies checksums on read and names the object in its errors.
//!
//! Fencing. Each namespace carries an *owner tag*, a number that grows with every ownership change.
//! [`ObjectStore::put_if_owner`] succeeds only while the namespace's tag equals the writer's, so a
//! node that lost a volume (and does not know it yet) cannot overwrite the new owner's objects.
//!
//! The embedded default is [`LocalStore`], a directory tree; [`S3Store`] puts the same namespaces
//! on an S3 bucket (see its module for how fencing holds without locks).

mod chunks;
pub mod crypt;
pub mod ec;
mod local;
pub mod osd;
pub mod prefetch;
pub mod s3;
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is a failure report
pub mod testing;

pub use chunks::{chunk_crcs_of, ChunkCrcs, CHUNK_SIZE};
pub use local::LocalStore;
pub use s3::{S3Location, S3Options, S3Store};

use std::path::{Path, PathBuf};

/// Fencing token of a namespace's current owner; higher is newer.
pub type OwnerTag = u64;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("namespace {namespace} does not exist")]
    NoSuchNamespace { namespace: String },
    #[error("namespace {namespace} already exists")]
    NamespaceExists { namespace: String },
    #[error("object {namespace}/{name} does not exist")]
    NoSuchObject { namespace: String, name: String },
    #[error("object {namespace}/{name} is corrupt: {reason}")]
    Corrupt {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("range [{offset}, +{len}) is outside object {namespace}/{name} of {size} bytes")]
    RangeOutOfBounds {
        namespace: String,
        name: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("write to {namespace} fenced: owner tag is {current}, writer holds {presented}")]
    Fenced {
        namespace: String,
        current: OwnerTag,
        presented: OwnerTag,
    },
    #[error("reading the data for {namespace}/{name} failed: {source}")]
    Source {
        namespace: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid S3 location {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    #[error("S3 bucket {bucket} does not exist")]
    NoSuchBucket { bucket: String },
    #[error("S3 refused the credentials for bucket {bucket} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {reason}")]
    S3Auth { bucket: String, reason: String },
    #[error("cannot configure the S3 client for bucket {bucket}: {reason}")]
    S3Config { bucket: String, reason: String },
    #[error("S3 request on bucket {bucket}, key {key:?} failed: {reason}")]
    S3 {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("OSD store {path} is full: {used} of {capacity} bytes used, {needed} more needed")]
    Full {
        path: PathBuf,
        capacity: u64,
        used: u64,
        needed: u64,
    },
    #[error("OSD {addr}: {reason}")]
    Osd { addr: String, reason: String },
    /// Fewer than `k` fragments of the object could be read (too many OSDs down or fragments
    /// lost): its data is not available, and no store answers with anything but this error.
    /// The volume driver halts a volume that meets it (see [`BackendError::is_unreadable`]).
    #[error("{namespace}/{name} cannot be rebuilt: {reason}")]
    Unreadable {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("the EC tier's registry: {reason}")]
    TierRegistry { reason: String },
    #[error("OSD {addr} refused the request ({code:?}): {message}")]
    OsdRefused {
        addr: String,
        code: osd::proto::ErrorCode,
        message: String,
    },
    #[error("encryption key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("cannot encrypt or decrypt {len} bytes in units of {unit_size}: not whole units of a multiple of 16 bytes")]
    CryptUnits { len: usize, unit_size: usize },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// Whether this error means an existing object's data cannot be read at all (as opposed to
    /// a missing object, a bad request, or a transient failure a retry may cure): a read that
    /// meets it must not be answered, and the volume stops serving until an operator has
    /// brought the data back (the OSDs) and restarts it.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, BackendError::Unreadable { .. })
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// A store of namespaces of immutable named objects.
///
/// Puts are atomic: a reader sees either the old object, the new one, or none, never a mix. All
/// methods are blocking; callers keep them off latency-sensitive threads.
pub trait ObjectStore: Send + Sync + 'static {
    /// Create an empty namespace with the given owner tag.
    fn create_namespace(&self, namespace: &str, owner: OwnerTag) -> Result<()>;
    /// Remove a namespace and every object in it.
    fn delete_namespace(&self, namespace: &str) -> Result<()>;
    fn namespace_exists(&self, namespace: &str) -> Result<bool>;
    fn list_namespaces(&self) -> Result<Vec<String>>;

    /// Current owner tag of a namespace.
    fn owner_tag(&self, namespace: &str) -> Result<OwnerTag>;
    /// Take ownership: set the tag to `new`, which must be greater than the current one.
    fn claim(&self, namespace: &str, new: OwnerTag) -> Result<()>;

    /// Store `data` as `namespace/name`, replacing any previous object of that name.
    fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()>;
    /// As [`put`](Self::put), but only if `owner` is the namespace's current owner tag.
    fn put_if_owner(&self, namespace: &str, name: &str, data: &[u8], owner: OwnerTag)
        -> Result<()>;
    /// As [`put_if_owner`](Self::put_if_owner), with the `len` bytes of data read from
    /// `source`, so that large objects (SCOs) need not be held in memory. Stores that cannot
    /// stream fall back to buffering.
    fn put_from(
        &self,
        namespace: &str,
        name: &str,
        len: u64,
        source: &mut dyn std::io::Read,
        owner: OwnerTag,
    ) -> Result<()> {
        let mut data = Vec::with_capacity(len as usize);
        let read = std::io::Read::read_to_end(&mut std::io::Read::take(source, len), &mut data);
        match read {
            Ok(n) if n as u64 == len => self.put_if_owner(namespace, name, &data, owner),
            Ok(n) => Err(BackendError::Source {
                namespace: namespace.to_string(),
                name: name.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("source ended after {n} of {len} bytes"),
                ),
            }),
            Err(source) => Err(BackendError::Source {
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            }),
        }
    }
    /// As [`put_from`](Self::put_from), with the first `len` bytes of the file at `path`.
    /// `chunk_crcs`, if given, are the CRC32Cs of every [`CHUNK_SIZE`] chunk of those bytes (as
    /// [`ChunkCrcs`] computes them while the file is written): the store checks the file against
    /// them in the one pass it reads it in, and refuses a file that changed since with
    /// [`BackendError::Corrupt`], storing nothing.
    ///
    /// The caller must never modify the file after this call: a store on the same filesystem may
    /// keep it by hard link ([`LocalStore`] does). Unlinking or renaming it is fine. The object is
    /// durable when this returns.
    fn put_file(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        len: u64,
        chunk_crcs: Option<&[u32]>,
        owner: OwnerTag,
    ) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|source| BackendError::Source {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        })?;
        let mut source = chunks::CheckingReader::new(file, len, chunk_crcs);
        match self.put_from(namespace, name, len, &mut source, owner) {
            Err(BackendError::Source { source, .. })
                if source.kind() == std::io::ErrorKind::InvalidData =>
            {
                Err(BackendError::Corrupt {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    reason: format!("{}: {source}", path.display()),
                })
            }
            other => other,
        }
    }
    fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>>;
    /// Read `buf.len()` bytes at `offset` of the object, verifying only the parts read.
    fn get_range(&self, namespace: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// How many bytes lying between two ranges wanted from one object are cheaper to read and
    /// drop than a second [`get_range`](Self::get_range): about one request's fixed cost times
    /// the store's bandwidth. A reader of ranges scattered in one object (the volume driver's
    /// reads of evicted clusters) fetches those closer than this with one request. 0, the
    /// default, where a request costs little more than its bytes (a local file).
    fn read_gap(&self) -> u64 {
        0
    }
    /// Size of the object's payload in bytes.
    fn size(&self, namespace: &str, name: &str) -> Result<u64>;
    fn exists(&self, namespace: &str, name: &str) -> Result<bool>;
    /// Delete an object; deleting a missing object is not an error.
    fn delete(&self, namespace: &str, name: &str) -> Result<()>;
    /// Delete an object only while `owner` holds the namespace.
    fn delete_if_owner(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()>;
    /// Names of every object in the namespace, sorted.
    fn list(&self, namespace: &str) -> Result<Vec<String>>;
}

/// The whole checksum chunks a ranged read of `[offset, offset+len)` must fetch and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkSpan {
    /// Index of the first chunk.
    pub first: u64,
    /// Payload offsets of the span: from the first chunk's start to the last chunk's end.
    pub start: u64,
    pub end: u64,
}

impl ChunkSpan {
    /// The span of a read of `len` bytes at `offset` of an object of `payload_len` bytes cut
    /// into `chunk_size` chunks (not zero); `None` for an empty read, an error outside the
    /// object. Shared by every store that keeps a CRC32C per chunk.
    pub(crate) fn of(
        namespace: &str,
        name: &str,
        offset: u64,
        len: u64,
        payload_len: u64,
        chunk_size: u64,
    ) -> Result<Option<Self>> {
        if offset.checked_add(len).is_none_or(|end| end > payload_len) {
            return Err(BackendError::RangeOutOfBounds {
                namespace: namespace.to_string(),
                name: name.to_string(),
                offset,
                len,
                size: payload_len,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        let first = offset / chunk_size;
        let last = (offset + len - 1) / chunk_size;
        Ok(Some(Self {
            first,
            start: first * chunk_size,
            end: ((last + 1) * chunk_size).min(payload_len),
        }))
    }
}

/// Names are used as file names by the local store and as keys elsewhere: keep them portable.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 200 {
        Some("longer than 200 bytes")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
    {
        Some("only ASCII letters, digits, '_', '-', '.' and '@' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BackendError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}
