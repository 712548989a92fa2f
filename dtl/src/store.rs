//! The DTL server's storage.
//!
//! # Layout: one directory per namespace, one append-only segment file per SCO
//!
//! ```text
//! <data_dir>/<namespace>/registration        cluster size, owner tag, incarnation (CRC'd)
//! <data_dir>/<namespace>/sco_0000002a.seg    entries of SCO 0x2a, in append order
//! ```
//!
//! *Why per SCO and not one log per volume:* the only deletion the DTL ever does is "drop every
//! entry of SCOs <= n" (trim, once the TLog covering them is on the backend), and an AddEntries
//! batch always belongs to one SCO. With one file per SCO, trim is an `unlink` per SCO — O(1),
//! no rewrite of the live tail, no compaction, no write amplification — and a torn tail can only
//! affect the newest segment. Open vStorage's file backend made the same choice. A volume has few
//! SCOs not yet on the backend (a TLog covers ~one 64 MiB SCO), so the file count stays small.
//!
//! *Append order:* a volume fills SCOs in increasing number order, so the store refuses an append
//! to a SCO older than the newest one it holds (`Invalid`); replaying segments in SCO order, each
//! in file order, is then exactly append order.
//!
//! # Segment format (little-endian)
//!
//! ```text
//! header (20 B): magic "DSEG" u32 | format u16 (=1) | reserved u16 | sco u32 | cluster_size u32
//!                | crc32c(previous 16 bytes) u32
//! record (28 B + data): magic "DREC" u32 | location u64 | lba u64 | data_len u32
//!                | crc32c(location..data_len ++ data) u32 | data (cluster_size bytes)
//! ```
//!
//! Every record carries its own CRC, so at startup each segment is scanned and the first record
//! that is short, has a bad magic, a wrong length, a location outside the segment's SCO or a bad
//! CRC ends the valid prefix: the file is truncated there (a torn tail after a crash — those
//! entries were never acknowledged in fsync mode). A segment whose header itself is torn (the
//! file is no longer than a header) is removed. A namespace whose registration or segment
//! headers are corrupt beyond that is *quarantined* (its directory renamed to
//! `.quarantine-<namespace>-<unix time>`) rather than deleted, so an operator can still inspect
//! it, and the server keeps serving the other namespaces.
//!
//! If an append fails part-way (ENOSPC, EIO), the segment is truncated back to its last good
//! length before the error is returned; if even that fails the namespace refuses further appends,
//! because entries written after garbage would be cut at the next restart.
//!
//! # Durability: the `fsync` switch
//!
//! * `fsync = true`: every `AddEntries` is `fdatasync`ed before it is acknowledged, and segment
//!   creation/removal and registration changes fsync the directory. An acknowledged entry
//!   survives a crash of the DTL node itself. Cost: ~100 µs per batch on this machine type.
//! * `fsync = false` (what Open vStorage did: its `Flush` was an `fflush`): an acknowledged entry
//!   has been `write(2)`n to the page cache. It survives the death of the *volume's* node and a
//!   crash/restart of the DTL *process*, but not a power loss or kernel crash of the DTL node. The
//!   DTL exists to cover the loss of one node; losing both nodes at once is out of its scope in
//!   this mode. `Flush` is then a barrier with nothing to do (there is no user-space buffer).
//!
//! Records are written with one `write(2)` per batch straight from the server task (no thread
//! hand-off): page-cache writes take microseconds, and the design favours run-to-completion over
//! cross-thread wake-ups. In fsync mode this blocks the runtime worker for the fdatasync.
//!
//! Recovery reads every segment once at startup (CRC check of all held data). The held data is
//! bounded by the volumes' not-yet-uploaded write buffers, so this is a few SCOs per volume.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::error::DtlError;
use crate::protocol::{Entry, ScoRange, MAX_BATCH_ENTRIES};
use crate::Result;

const SEGMENT_MAGIC: u32 = 0x4745_5344; // "DSEG" as LE bytes
const SEGMENT_FORMAT: u16 = 1;
const SEGMENT_HEADER_LEN: usize = 20;
const RECORD_MAGIC: u32 = 0x4345_5244; // "DREC"
const RECORD_HEADER_LEN: usize = 28;
const REG_FILE: &str = "registration";
const REG_TMP: &str = "registration.tmp";
const REG_MAGIC: u32 = 0x4745_5244; // "DREG"
/// Format 2 added the incarnation; format 1 (24 bytes, written before) is still read, as
/// incarnation 0.
const REG_FORMAT: u16 = 2;
const REG_LEN: usize = 32;
const REG_LEN_V1: usize = 24;

/// Smallest and largest accepted cluster sizes (powers of two).
pub const MIN_CLUSTER_SIZE: u32 = 512;
pub const MAX_CLUSTER_SIZE: u32 = 1 << 20;
/// Longest namespace name (it is a directory name).
pub const MAX_NAMESPACE_LEN: usize = 200;

/// What a namespace was registered with.
///
/// Registration file (little-endian), format 2:
///
/// ```text
/// magic "DREG" u32 | format u16 (=2) | reserved u16 | cluster_size u32 | owner_tag u64
///       | incarnation u64 | crc32c(previous 28 bytes) u32
/// ```
///
/// Format 1 is the same without `incarnation` (24 bytes); it is read as incarnation 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    pub cluster_size: u32,
    pub owner_tag: u64,
    /// Which incarnation of the volume the entries belong to (see [`DtlStore::register`]); 0:
    /// not known (a client or a registration file from before incarnations).
    pub incarnation: u64,
}

impl Registration {
    fn encode(&self) -> [u8; REG_LEN] {
        let mut b = [0u8; REG_LEN];
        b[0..4].copy_from_slice(&REG_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&REG_FORMAT.to_le_bytes());
        b[8..12].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[12..20].copy_from_slice(&self.owner_tag.to_le_bytes());
        b[20..28].copy_from_slice(&self.incarnation.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        let (format, len) = match b.len() {
            REG_LEN => (REG_FORMAT, REG_LEN),
            REG_LEN_V1 => (1, REG_LEN_V1),
            other => {
                return Err(DtlError::Corrupt(format!(
                    "registration is {other} bytes, expected {REG_LEN} (or {REG_LEN_V1})"
                )))
            }
        };
        let crc = (&b[len - 4..len]).get_u32_le();
        if crc32c::crc32c(&b[0..len - 4]) != crc
            || (&b[0..4]).get_u32_le() != REG_MAGIC
            || (&b[4..6]).get_u16_le() != format
        {
            return Err(DtlError::Corrupt("registration fails its checks".into()));
        }
        Ok(Self {
            cluster_size: (&b[8..12]).get_u32_le(),
            owner_tag: (&b[12..20]).get_u64_le(),
            incarnation: if format == 1 {
                0
            } else {
                (&b[20..28]).get_u64_le()
            },
        })
    }
}

/// Whether a request names a newer incarnation of the volume than the one registered in `ns`
/// (its entries are a deleted volume's); `OlderIncarnation` when it names an older one. When
/// either is not known (0), `false`: owner tags alone decide (see [`DtlStore::register`]).
fn newer_incarnation(ns: &str, got: u64, registered: u64) -> Result<bool> {
    if got == 0 || registered == 0 || got == registered {
        return Ok(false);
    }
    if got < registered {
        return Err(DtlError::OlderIncarnation {
            namespace: ns.to_string(),
            registered,
            got,
        });
    }
    Ok(true)
}

/// Checks that a namespace is a safe single path component.
pub fn validate_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && !ns.starts_with('.')
        && ns
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DtlError::Invalid(format!(
            "namespace {ns:?} must be 1..={MAX_NAMESPACE_LEN} of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

fn validate_cluster_size(cs: u32) -> Result<()> {
    if cs.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
        Ok(())
    } else {
        Err(DtlError::Invalid(format!(
            "cluster size {cs} must be a power of two in {MIN_CLUSTER_SIZE}..={MAX_CLUSTER_SIZE}"
        )))
    }
}

fn segment_file_name(sco: u32) -> String {
    format!("sco_{sco:08x}.seg")
}

fn parse_segment_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_prefix("sco_")?.strip_suffix(".seg")?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_header(sco: u32, cluster_size: u32) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    b[8..12].copy_from_slice(&sco.to_le_bytes());
    b[12..16].copy_from_slice(&cluster_size.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fn encode_record(out: &mut Vec<u8>, e: &Entry) {
    let start = out.len();
    out.put_u32_le(RECORD_MAGIC);
    out.put_u64_le(e.location);
    out.put_u64_le(e.lba);
    out.put_u32_le(e.data.len() as u32);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start + 4..start + 24]), &e.data);
    out.put_u32_le(crc);
    out.put_slice(&e.data);
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

enum RecordRead {
    Entry(Entry),
    Eof,
    Bad(String),
}

fn read_record(r: &mut impl Read, sco: u32, cluster_size: u32) -> io::Result<RecordRead> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    let n = read_full(r, &mut head)?;
    if n == 0 {
        return Ok(RecordRead::Eof);
    }
    if n < RECORD_HEADER_LEN {
        return Ok(RecordRead::Bad(format!("short record header ({n} bytes)")));
    }
    let magic = (&head[0..4]).get_u32_le();
    let location = (&head[4..12]).get_u64_le();
    let lba = (&head[12..20]).get_u64_le();
    let len = (&head[20..24]).get_u32_le();
    let crc = (&head[24..28]).get_u32_le();
    if magic != RECORD_MAGIC {
        return Ok(RecordRead::Bad(format!("bad record magic {magic:#x}")));
    }
    if len != cluster_size {
        return Ok(RecordRead::Bad(format!(
            "record length {len} != cluster size"
        )));
    }
    let mut data = vec![0u8; len as usize];
    let n = read_full(r, &mut data)?;
    if n < data.len() {
        return Ok(RecordRead::Bad(format!("short record data ({n} of {len})")));
    }
    let actual = crc32c::crc32c_append(crc32c::crc32c(&head[4..24]), &data);
    if actual != crc {
        return Ok(RecordRead::Bad("record CRC mismatch".into()));
    }
    if location as u32 != sco {
        return Ok(RecordRead::Bad(format!(
            "record location {location:#x} outside SCO {sco}"
        )));
    }
    Ok(RecordRead::Entry(Entry {
        location,
        lba,
        data: Bytes::from(data),
    }))
}

struct Segment {
    /// Length of the valid prefix (header + whole records).
    len: u64,
    entries: u64,
}

struct Namespace {
    name: String,
    dir: PathBuf,
    reg: Registration,
    segments: BTreeMap<u32, Segment>,
    /// Open append handle of the newest segment.
    writer: Option<(u32, File)>,
    /// Set when the namespace was unregistered while someone held a reference.
    removed: bool,
    /// Set when a failed append could not be rolled back.
    poisoned: bool,
    /// When a client last registered, appended, trimmed or read it (or the store opened):
    /// [`DtlStore::remove_leftover`] removes only namespaces idle for a while.
    last_active: Instant,
}

impl Namespace {
    fn segment_path(&self, sco: u32) -> PathBuf {
        self.dir.join(segment_file_name(sco))
    }

    fn check_tag(&self, owner_tag: u64) -> Result<()> {
        if owner_tag < self.reg.owner_tag {
            Err(DtlError::StaleOwnerTag {
                namespace: self.name.clone(),
                registered: self.reg.owner_tag,
                got: owner_tag,
            })
        } else if owner_tag > self.reg.owner_tag {
            Err(DtlError::Invalid(format!(
                "owner tag {owner_tag} is newer than the registered {}; register it first",
                self.reg.owner_tag
            )))
        } else {
            Ok(())
        }
    }

    /// Scans the namespace directory, cutting torn tails. Errors mean "quarantine me".
    fn load(name: &str, dir: &Path, fsync: bool) -> Result<Self> {
        let reg = Registration::decode(&fs::read(dir.join(REG_FILE))?)?;
        validate_cluster_size(reg.cluster_size)?;
        let mut segments = BTreeMap::new();
        for dent in fs::read_dir(dir)? {
            let dent = dent?;
            let fname = dent.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            if fname == REG_TMP {
                fs::remove_file(dent.path())?;
                continue;
            }
            let Some(sco) = parse_segment_file_name(fname) else {
                continue;
            };
            if let Some(seg) = scan_segment(&dent.path(), sco, reg.cluster_size, fsync)? {
                segments.insert(sco, seg);
            }
        }
        if fsync {
            fsync_dir(dir)?;
        }
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            reg,
            segments,
            writer: None,
            removed: false,
            last_active: Instant::now(),
            poisoned: false,
        })
    }

    fn append(&mut self, sco: u32, entries: &[Entry], fsync: bool) -> Result<()> {
        if self.poisoned {
            return Err(DtlError::Io(io::Error::other(
                "namespace refuses appends after an unrecoverable write failure",
            )));
        }
        if self.writer.as_ref().map(|(s, _)| *s) != Some(sco) {
            self.writer = None;
            let path = self.segment_path(sco);
            if self.segments.contains_key(&sco) {
                let f = OpenOptions::new().append(true).open(&path)?;
                self.writer = Some((sco, f));
            } else {
                let mut f = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(&path)?;
                let created = f
                    .write_all(&segment_header(sco, self.reg.cluster_size))
                    .and_then(|_| if fsync { f.sync_data() } else { Ok(()) })
                    .and_then(|_| if fsync { fsync_dir(&self.dir) } else { Ok(()) });
                if let Err(e) = created {
                    let _ = fs::remove_file(&path);
                    return Err(e.into());
                }
                self.segments.insert(
                    sco,
                    Segment {
                        len: SEGMENT_HEADER_LEN as u64,
                        entries: 0,
                    },
                );
                self.writer = Some((sco, f));
            }
        }
        let mut buf = Vec::with_capacity(
            entries.len() * (RECORD_HEADER_LEN + self.reg.cluster_size as usize),
        );
        for e in entries {
            encode_record(&mut buf, e);
        }
        let (Some((_, file)), Some(seg)) = (self.writer.as_mut(), self.segments.get_mut(&sco))
        else {
            return Err(DtlError::Corrupt(format!(
                "namespace {}: segment {sco} vanished while appending",
                self.name
            )));
        };
        let res = file
            .write_all(&buf)
            .and_then(|_| if fsync { file.sync_data() } else { Ok(()) });
        if let Err(e) = res {
            // Roll back to the last good length so later appends don't land after garbage.
            if let Err(e2) = file.set_len(seg.len) {
                warn!(namespace = %self.name, sco, "cannot roll back failed append: {e2}; refusing further appends");
                self.poisoned = true;
            }
            self.writer = None;
            return Err(e.into());
        }
        seg.len += buf.len() as u64;
        seg.entries += entries.len() as u64;
        Ok(())
    }

    fn remove_segments(&mut self, up_to: Option<u32>, fsync: bool) -> Result<()> {
        let doomed: Vec<u32> = match up_to {
            Some(n) => self.segments.range(..=n).map(|(s, _)| *s).collect(),
            None => self.segments.keys().copied().collect(),
        };
        if doomed.is_empty() {
            return Ok(());
        }
        if let Some((s, _)) = &self.writer {
            if doomed.contains(s) {
                self.writer = None;
            }
        }
        for sco in doomed {
            match fs::remove_file(self.segment_path(sco)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            self.segments.remove(&sco);
        }
        if fsync {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Scans one segment, truncating a torn tail. `Ok(None)`: the segment was torn at creation and
/// has been removed.
fn scan_segment(path: &Path, sco: u32, cluster_size: u32, fsync: bool) -> Result<Option<Segment>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    let n = read_full(&mut r, &mut head)?;
    let header_ok = n == SEGMENT_HEADER_LEN && head == segment_header(sco, cluster_size);
    if !header_ok {
        if file_len <= SEGMENT_HEADER_LEN as u64 {
            warn!(path = %path.display(), "removing segment torn at creation");
            fs::remove_file(path)?;
            return Ok(None);
        }
        return Err(DtlError::Corrupt(format!(
            "segment {} has a bad header",
            path.display()
        )));
    }
    let mut len = SEGMENT_HEADER_LEN as u64;
    let mut entries = 0;
    loop {
        match read_record(&mut r, sco, cluster_size)? {
            RecordRead::Entry(_) => {
                len += (RECORD_HEADER_LEN as u64) + u64::from(cluster_size);
                entries += 1;
            }
            RecordRead::Eof => break,
            RecordRead::Bad(why) => {
                warn!(
                    path = %path.display(),
                    valid = len,
                    dropped = file_len - len,
                    "cutting torn segment tail: {why}"
                );
                break;
            }
        }
    }
    if len < file_len {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        if fsync {
            f.sync_all()?;
        }
    }
    Ok(Some(Segment { len, entries }))
}

/// A consistent view of one segment for reading: its valid prefix at the time of the snapshot.
pub struct SegmentSnapshot {
    pub sco: u32,
    path: PathBuf,
    len: u64,
    cluster_size: u32,
}

impl SegmentSnapshot {
    pub fn cluster_size(&self) -> u32 {
        self.cluster_size
    }

    /// Opens the segment for sequential reading. `Ok(None)`: it was trimmed meanwhile.
    pub fn open(&self) -> Result<Option<SegmentReader>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut r = BufReader::with_capacity(1 << 20, file).take(self.len);
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        if read_full(&mut r, &mut head)? != SEGMENT_HEADER_LEN
            || head != segment_header(self.sco, self.cluster_size)
        {
            return Err(DtlError::Corrupt(format!(
                "segment {} header changed under us",
                self.path.display()
            )));
        }
        Ok(Some(SegmentReader {
            sco: self.sco,
            cluster_size: self.cluster_size,
            reader: r,
        }))
    }
}

/// Sequential reader of a segment's records.
pub struct SegmentReader {
    pub sco: u32,
    cluster_size: u32,
    reader: io::Take<BufReader<File>>,
}

impl SegmentReader {
    /// Up to `max_entries` next entries (empty at the end). Anything invalid inside the prefix
    /// that was valid at startup/append time is corruption, not a torn tail.
    pub fn next_batch(&mut self, max_entries: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        while out.len() < max_entries {
            match read_record(&mut self.reader, self.sco, self.cluster_size)? {
                RecordRead::Entry(e) => out.push(e),
                RecordRead::Eof => break,
                RecordRead::Bad(why) => {
                    return Err(DtlError::Corrupt(format!("SCO {}: {why}", self.sco)))
                }
            }
        }
        Ok(out)
    }
}

/// The server's storage: namespaces of per-SCO segment files under one data directory.
pub struct DtlStore {
    root: PathBuf,
    fsync: bool,
    namespaces: Mutex<HashMap<String, Arc<Mutex<Namespace>>>>,
}

impl DtlStore {
    /// Opens (creating if needed) the data directory and recovers every namespace in it.
    pub fn open(root: impl Into<PathBuf>, fsync: bool) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        let mut namespaces = HashMap::new();
        for dent in fs::read_dir(&root)? {
            let dent = dent?;
            if !dent.file_type()?.is_dir() {
                continue;
            }
            let Some(name) = dent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with(".deleting-") {
                // An Unregister interrupted after its atomic rename: finish it.
                fs::remove_dir_all(dent.path())?;
                continue;
            }
            if validate_namespace(&name).is_err() {
                continue;
            }
            match Namespace::load(&name, &dent.path(), fsync) {
                Ok(ns) => {
                    info!(namespace = %name, segments = ns.segments.len(), "recovered DTL namespace");
                    namespaces.insert(name, Arc::new(Mutex::new(ns)));
                }
                Err(DtlError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                    // Register crashed before its registration file landed: nothing was ever
                    // acknowledged into this directory.
                    warn!(namespace = %name, "removing namespace without registration");
                    fs::remove_dir_all(dent.path())?;
                }
                Err(e) => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let q = root.join(format!(".quarantine-{name}-{secs}"));
                    warn!(namespace = %name, error = %e, quarantine = %q.display(), "quarantining unreadable DTL namespace");
                    fs::rename(dent.path(), &q)?;
                }
            }
        }
        if fsync {
            fsync_dir(&root)?;
        }
        Ok(Self {
            root,
            fsync,
            namespaces: Mutex::new(namespaces),
        })
    }

    pub fn fsync_enabled(&self) -> bool {
        self.fsync
    }

    /// Names of all registered namespaces (unordered).
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.lock().keys().cloned().collect()
    }

    fn get(&self, ns: &str) -> Result<Arc<Mutex<Namespace>>> {
        self.namespaces
            .lock()
            .get(ns)
            .cloned()
            .ok_or_else(|| DtlError::UnknownNamespace(ns.to_string()))
    }

    /// Every client request on a namespace goes through here, and marks it active.
    fn with_ns<T>(&self, ns: &str, f: impl FnOnce(&mut Namespace) -> Result<T>) -> Result<T> {
        let arc = self.get(ns)?;
        let mut guard = arc.lock();
        if guard.removed {
            return Err(DtlError::UnknownNamespace(ns.to_string()));
        }
        guard.last_active = Instant::now();
        f(&mut guard)
    }

    /// Every namespace with its registration and how long no client has used it (since the
    /// store opened at most), for the leftover sweep.
    pub fn idle_namespaces(&self) -> Vec<(String, Registration, Duration)> {
        let all: Vec<_> = self
            .namespaces
            .lock()
            .iter()
            .map(|(name, arc)| (name.clone(), arc.clone()))
            .collect();
        all.into_iter()
            .filter_map(|(name, arc)| {
                let n = arc.lock();
                (!n.removed).then(|| (name, n.reg, n.last_active.elapsed()))
            })
            .collect()
    }

    /// Removes namespace `ns` as a leftover (a deleted volume's, or one whose DTL is elsewhere
    /// now) if it is still registered as `expected` and no client has used it for `idle`: a
    /// client that registered or wrote since the caller looked keeps it. `Ok(false)`: kept.
    pub fn remove_leftover(
        &self,
        ns: &str,
        expected: Registration,
        idle: Duration,
    ) -> Result<bool> {
        let mut map = self.namespaces.lock();
        let Some(arc) = map.get(ns).cloned() else {
            return Ok(false);
        };
        let mut n = arc.lock();
        if n.removed || n.reg != expected || n.last_active.elapsed() < idle {
            return Ok(false);
        }
        let doomed = self.unlink_locked(&mut map, &mut n)?;
        drop(n);
        drop(map);
        fs::remove_dir_all(&doomed)?;
        Ok(true)
    }

    /// Forget `n` and move its directory out of the way (atomic disappearance first, slow
    /// deletion after, by the caller with the locks released; a crash in between is finished
    /// at open). The caller holds the map's lock and `n`'s. Returns the directory to delete.
    fn unlink_locked(
        &self,
        map: &mut HashMap<String, Arc<Mutex<Namespace>>>,
        n: &mut Namespace,
    ) -> Result<PathBuf> {
        n.writer = None;
        let doomed = self.root.join(format!(".deleting-{}", n.name));
        fs::rename(&n.dir, &doomed)?;
        if self.fsync {
            fsync_dir(&self.root)?;
        }
        n.removed = true;
        map.remove(&n.name);
        Ok(doomed)
    }

    fn write_registration(&self, dir: &Path, reg: &Registration) -> Result<()> {
        let tmp = dir.join(REG_TMP);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&reg.encode())?;
            if self.fsync {
                f.sync_all()?;
            }
        }
        fs::rename(&tmp, dir.join(REG_FILE))?;
        if self.fsync {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    /// Registers a namespace, or takes it over with a newer owner tag (keeping its entries, which
    /// the new owner will replay). The same tag again is an idempotent no-op; an older tag is
    /// refused (fencing). Changing the cluster size is only allowed while it holds no entries.
    ///
    /// **Incarnations.** A volume deleted and created again under the same name is another
    /// volume, and owner tags start again at 1 for it. Entries the DTL kept of the deleted one
    /// (its DTL node was down at the delete) must neither fence the new volume (their tag may be
    /// higher) nor be replayed into it. So a registration names the volume's incarnation, an
    /// id that orders creations (the volume's creation time in nanoseconds):
    /// - a newer incarnation than the registered one drops the namespace's entries (they are a
    ///   deleted volume's) and takes the namespace over, whatever its owner tag;
    /// - an older one is refused like a stale owner tag: it is a copy of the deleted volume;
    /// - the same one (or 0 on either side: not known) follows the owner-tag rules above, and
    ///   a known incarnation is recorded where the registration had none.
    ///
    /// The entries go before the new registration is written, so a crash in between leaves an
    /// empty namespace of the old incarnation, never its entries under the new one.
    pub fn register(
        &self,
        ns: &str,
        cluster_size: u32,
        owner_tag: u64,
        incarnation: u64,
    ) -> Result<Registration> {
        validate_namespace(ns)?;
        validate_cluster_size(cluster_size)?;
        let mut new = Registration {
            cluster_size,
            owner_tag,
            incarnation,
        };
        let mut map = self.namespaces.lock();
        if let Some(arc) = map.get(ns).cloned() {
            drop(map);
            let mut n = arc.lock();
            if n.removed {
                return Err(DtlError::Invalid(format!(
                    "namespace {ns:?} is being unregistered; retry"
                )));
            }
            n.last_active = Instant::now();
            let registered = n.reg.incarnation;
            if newer_incarnation(ns, incarnation, registered)? {
                warn!(
                    namespace = %ns,
                    registered, incarnation,
                    held = n.segments.len(),
                    "a newer incarnation of the volume registers: dropping the entries of the deleted one"
                );
                n.remove_segments(None, self.fsync)?;
                let dir = n.dir.clone();
                self.write_registration(&dir, &new)?;
                n.reg = new;
                return Ok(new);
            }
            if incarnation == 0 {
                new.incarnation = registered;
            }
            if owner_tag < n.reg.owner_tag {
                return Err(DtlError::StaleOwnerTag {
                    namespace: ns.to_string(),
                    registered: n.reg.owner_tag,
                    got: owner_tag,
                });
            }
            if cluster_size != n.reg.cluster_size && !n.segments.is_empty() {
                return Err(DtlError::Invalid(format!(
                    "namespace {ns:?} holds entries of cluster size {}; clear it before changing to {cluster_size}",
                    n.reg.cluster_size
                )));
            }
            if n.reg != new {
                let dir = n.dir.clone();
                self.write_registration(&dir, &new)?;
                n.reg = new;
            }
            return Ok(new);
        }
        let dir = self.root.join(ns);
        if dir.exists() {
            // Leftover of a half-done registration or unregister: nothing in it was acknowledged.
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir(&dir)?;
        if let Err(e) = self.write_registration(&dir, &new) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        if self.fsync {
            fsync_dir(&self.root)?;
        }
        map.insert(
            ns.to_string(),
            Arc::new(Mutex::new(Namespace {
                name: ns.to_string(),
                dir,
                reg: new,
                segments: BTreeMap::new(),
                writer: None,
                removed: false,
                last_active: Instant::now(),
                poisoned: false,
            })),
        );
        Ok(new)
    }

    pub fn registration(&self, ns: &str) -> Result<Registration> {
        self.with_ns(ns, |n| Ok(n.reg))
    }

    /// Forgets the namespace and deletes its entries, as owner tag `owner_tag` of the volume's
    /// `incarnation` (0: not known). A namespace of a newer incarnation is another volume's,
    /// created again under the name since (a delete whose DTL step comes late must not remove
    /// it): refused. One of an older incarnation holds a deleted volume's leftovers: removed
    /// whatever their owner tag. Within one incarnation the owner-tag rules apply.
    pub fn unregister(&self, ns: &str, owner_tag: u64, incarnation: u64) -> Result<()> {
        let mut map = self.namespaces.lock();
        let arc = map
            .get(ns)
            .cloned()
            .ok_or_else(|| DtlError::UnknownNamespace(ns.to_string()))?;
        let mut n = arc.lock();
        if !newer_incarnation(ns, incarnation, n.reg.incarnation)? {
            n.check_tag(owner_tag)?;
        }
        let doomed = self.unlink_locked(&mut map, &mut n)?;
        drop(n);
        drop(map);
        fs::remove_dir_all(&doomed)?;
        Ok(())
    }

    /// Appends a batch of entries of SCO `sco`. On `Ok` the entries are durable per the fsync
    /// setting (see the module doc).
    pub fn add_entries(&self, ns: &str, owner_tag: u64, sco: u32, entries: &[Entry]) -> Result<()> {
        if sco == 0 {
            return Err(DtlError::Invalid(
                "SCO number 0 means \"never written\"".into(),
            ));
        }
        if entries.len() > MAX_BATCH_ENTRIES {
            return Err(DtlError::TooManyEntries {
                count: entries.len(),
                max: MAX_BATCH_ENTRIES,
            });
        }
        let fsync = self.fsync;
        self.with_ns(ns, |n| {
            n.check_tag(owner_tag)?;
            for e in entries {
                if e.data.len() != n.reg.cluster_size as usize {
                    return Err(DtlError::Invalid(format!(
                        "entry of {} bytes, cluster size is {}",
                        e.data.len(),
                        n.reg.cluster_size
                    )));
                }
                if e.sco() != sco {
                    return Err(DtlError::Invalid(format!(
                        "entry location {:#x} is in SCO {}, batch is for SCO {sco}",
                        e.location,
                        e.sco()
                    )));
                }
            }
            if let Some((&newest, _)) = n.segments.last_key_value() {
                if sco < newest {
                    return Err(DtlError::Invalid(format!(
                        "append to SCO {sco} after SCO {newest}: SCOs must be filled in order"
                    )));
                }
            }
            if entries.is_empty() {
                return Ok(());
            }
            n.append(sco, entries, fsync)
        })
    }

    /// Barrier: everything acknowledged so far is as durable as the fsync setting promises.
    /// Appends are already written (and fdatasync'ed in fsync mode) before they are
    /// acknowledged, so this only re-syncs the open segment in fsync mode.
    pub fn flush(&self, ns: &str) -> Result<()> {
        let fsync = self.fsync;
        self.with_ns(ns, |n| {
            if fsync {
                if let Some((_, f)) = &n.writer {
                    f.sync_data()?;
                }
            }
            Ok(())
        })
    }

    pub fn sco_range(&self, ns: &str) -> Result<ScoRange> {
        self.with_ns(ns, |n| {
            Ok(ScoRange {
                oldest: n.segments.first_key_value().map(|(s, _)| *s),
                newest: n.segments.last_key_value().map(|(s, _)| *s),
            })
        })
    }

    /// Number of entries held per SCO (for metrics and tests).
    pub fn entry_counts(&self, ns: &str) -> Result<BTreeMap<u32, u64>> {
        self.with_ns(ns, |n| {
            Ok(n.segments.iter().map(|(s, g)| (*s, g.entries)).collect())
        })
    }

    /// Snapshots of the segments of SCOs `from..=to`, oldest first. Reading them needs no lock.
    pub fn segments(&self, ns: &str, from: u32, to: u32) -> Result<Vec<SegmentSnapshot>> {
        self.with_ns(ns, |n| {
            if from > to {
                return Ok(Vec::new());
            }
            Ok(n.segments
                .range(from..=to)
                .map(|(sco, seg)| SegmentSnapshot {
                    sco: *sco,
                    path: n.segment_path(*sco),
                    len: seg.len,
                    cluster_size: n.reg.cluster_size,
                })
                .collect())
        })
    }

    /// All entries of SCOs `from..=to` in append order (convenience for tests and tools; the
    /// server streams segment by segment instead).
    pub fn entries(&self, ns: &str, from: u32, to: u32) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for snap in self.segments(ns, from, to)? {
            if let Some(mut r) = snap.open()? {
                loop {
                    let batch = r.next_batch(MAX_BATCH_ENTRIES)?;
                    if batch.is_empty() {
                        break;
                    }
                    out.extend(batch);
                }
            }
        }
        Ok(out)
    }

    /// Trim: drops every entry of SCOs `<= sco` by deleting their segment files.
    pub fn remove_up_to(&self, ns: &str, owner_tag: u64, sco: u32) -> Result<()> {
        let fsync = self.fsync;
        self.with_ns(ns, |n| {
            n.check_tag(owner_tag)?;
            n.remove_segments(Some(sco), fsync)
        })
    }

    /// Drops every entry of the namespace (it stays registered).
    pub fn clear(&self, ns: &str, owner_tag: u64) -> Result<()> {
        let fsync = self.fsync;
        self.with_ns(ns, |n| {
            n.check_tag(owner_tag)?;
            n.remove_segments(None, fsync)
        })
    }

    /// fsyncs every open segment (used at shutdown).
    pub fn sync_all(&self) -> Result<()> {
        let all: Vec<_> = self.namespaces.lock().values().cloned().collect();
        for ns in all {
            if let Some((_, f)) = &ns.lock().writer {
                f.sync_data()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 512;

    fn entry(sco: u32, offset: u16, lba: u64, fill: u8) -> Entry {
        Entry {
            location: u64::from(sco) | u64::from(offset) << 32,
            lba,
            data: Bytes::from(vec![fill; CS as usize]),
        }
    }

    fn batch(sco: u32, n: u16, seed: u8) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                entry(
                    sco,
                    i,
                    u64::from(sco) * 1000 + u64::from(i),
                    seed.wrapping_add(i as u8),
                )
            })
            .collect()
    }

    /// The leftover sweep removes a namespace only if it is still what the sweep looked at and
    /// idle for as long as asked; a client's use in between keeps it.
    #[test]
    fn leftovers_are_removed_only_when_unchanged_and_idle() {
        let dir = tempfile::tempdir().unwrap();
        let s = DtlStore::open(dir.path(), true).unwrap();
        s.register("gone", CS, 2, 100).unwrap();
        s.add_entries("gone", 2, 1, &batch(1, 3, 1)).unwrap();
        s.register("live", CS, 1, 200).unwrap();
        let mut seen: Vec<_> = s.idle_namespaces();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(seen.len(), 2);
        let (name, reg, idle) = seen[0].clone();
        assert_eq!(
            (name.as_str(), reg.owner_tag, reg.incarnation),
            ("gone", 2, 100)
        );
        assert!(idle < Duration::from_secs(60), "{idle:?}");

        // Used just now: not idle for an hour.
        assert!(!s
            .remove_leftover("gone", reg, Duration::from_secs(3600))
            .unwrap());
        // Registered again since the sweep looked (a newer owner): kept.
        let live = s.registration("live").unwrap();
        s.register("live", CS, 2, 200).unwrap();
        assert!(!s.remove_leftover("live", live, Duration::ZERO).unwrap());
        assert_eq!(s.registration("live").unwrap().owner_tag, 2);
        // Unchanged and idle: removed, directory and all, and gone after a reopen too.
        assert!(s.remove_leftover("gone", reg, Duration::ZERO).unwrap());
        assert!(!dir.path().join("gone").exists());
        assert!(matches!(
            s.registration("gone"),
            Err(DtlError::UnknownNamespace(_))
        ));
        assert!(!s.remove_leftover("gone", reg, Duration::ZERO).unwrap());
        drop(s);
        let s = DtlStore::open(dir.path(), true).unwrap();
        assert_eq!(s.namespaces(), vec!["live".to_string()]);
        // A reopened store counts idle time from the open.
        assert!(s.idle_namespaces()[0].2 < Duration::from_secs(60));
    }

    #[test]
    fn append_replay_trim_clear() {
        let dir = tempfile::tempdir().unwrap();
        let s = DtlStore::open(dir.path(), true).unwrap();
        s.register("vol1", CS, 1, 0).unwrap();
        let mut expect = Vec::new();
        for sco in 1..=4u32 {
            for k in 0..2u8 {
                let b = batch(sco, 3, sco as u8 * 10 + k);
                s.add_entries("vol1", 1, sco, &b).unwrap();
                expect.extend(b);
            }
        }
        assert_eq!(
            s.sco_range("vol1").unwrap(),
            ScoRange {
                oldest: Some(1),
                newest: Some(4)
            }
        );
        assert_eq!(s.entries("vol1", 0, u32::MAX).unwrap(), expect);
        assert_eq!(s.entries("vol1", 2, 3).unwrap(), expect[6..18].to_vec());

        s.remove_up_to("vol1", 1, 2).unwrap();
        assert!(!dir.path().join("vol1").join(segment_file_name(1)).exists());
        assert!(!dir.path().join("vol1").join(segment_file_name(2)).exists());
        assert_eq!(
            s.entries("vol1", 0, u32::MAX).unwrap(),
            expect[12..].to_vec()
        );
        assert_eq!(s.sco_range("vol1").unwrap().oldest, Some(3));

        // Appending to an older SCO than the newest is refused; to the newest is fine.
        assert!(matches!(
            s.add_entries("vol1", 1, 3, &batch(3, 1, 0)),
            Err(DtlError::Invalid(_))
        ));
        s.add_entries("vol1", 1, 4, &batch(4, 1, 99)).unwrap();

        s.clear("vol1", 1).unwrap();
        assert_eq!(s.sco_range("vol1").unwrap(), ScoRange::default());
        assert!(s.entries("vol1", 0, u32::MAX).unwrap().is_empty());
        let left: Vec<_> = fs::read_dir(dir.path().join("vol1"))
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(REG_FILE)]);
        // After a clear, any SCO may start again.
        s.add_entries("vol1", 1, 2, &batch(2, 1, 5)).unwrap();
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let s = DtlStore::open(dir.path(), false).unwrap();
        for bad in ["", ".x", "a/b", "..", "a b"] {
            assert!(
                matches!(s.register(bad, CS, 1, 0), Err(DtlError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            s.register("v", 1000, 1, 0),
            Err(DtlError::Invalid(_))
        ));
        s.register("v", CS, 1, 0).unwrap();
        assert!(matches!(
            s.add_entries("nope", 1, 1, &batch(1, 1, 0)),
            Err(DtlError::UnknownNamespace(_))
        ));
        assert!(matches!(
            s.add_entries("v", 1, 0, &batch(0, 1, 0)),
            Err(DtlError::Invalid(_))
        ));
        // Entry outside the batch's SCO.
        assert!(matches!(
            s.add_entries("v", 1, 2, &batch(1, 1, 0)),
            Err(DtlError::Invalid(_))
        ));
        // Wrong data size.
        let mut e = entry(1, 0, 0, 0);
        e.data = Bytes::from_static(b"short");
        assert!(matches!(
            s.add_entries("v", 1, 1, &[e]),
            Err(DtlError::Invalid(_))
        ));
        // Nothing was written by refused requests.
        assert!(s.entries("v", 0, u32::MAX).unwrap().is_empty());
    }

    #[test]
    fn owner_tags_fence() {
        let dir = tempfile::tempdir().unwrap();
        let s = DtlStore::open(dir.path(), false).unwrap();
        s.register("v", CS, 5, 0).unwrap();
        s.add_entries("v", 5, 1, &batch(1, 2, 0)).unwrap();
        // Same tag again: idempotent. Older tag: stale.
        s.register("v", CS, 5, 0).unwrap();
        assert!(matches!(
            s.register("v", CS, 4, 0),
            Err(DtlError::StaleOwnerTag { .. })
        ));
        // Newer owner takes over and keeps the entries.
        s.register("v", CS, 6, 0).unwrap();
        assert_eq!(s.entries("v", 0, u32::MAX).unwrap().len(), 2);
        for res in [
            s.add_entries("v", 5, 1, &batch(1, 1, 0)),
            s.remove_up_to("v", 5, 10),
            s.clear("v", 5),
            s.unregister("v", 5, 0),
        ] {
            assert!(
                matches!(
                    res,
                    Err(DtlError::StaleOwnerTag {
                        registered: 6,
                        got: 5,
                        ..
                    })
                ),
                "{res:?}"
            );
        }
        assert_eq!(s.entries("v", 0, u32::MAX).unwrap().len(), 2);
        // Cluster size can't change under existing entries.
        assert!(matches!(
            s.register("v", CS * 2, 7, 0),
            Err(DtlError::Invalid(_))
        ));
        s.unregister("v", 6, 0).unwrap();
        assert!(!dir.path().join("v").exists());
        assert!(matches!(
            s.sco_range("v"),
            Err(DtlError::UnknownNamespace(_))
        ));
    }

    #[test]
    fn a_newer_incarnation_drops_a_deleted_volumes_entries_and_an_older_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let old = batch(4, 3, 1);
        {
            let s = DtlStore::open(dir.path(), true).unwrap();
            // A volume adopted twice (tag 3), deleted while this DTL was away: its entries stay.
            s.register("v", CS, 3, 100).unwrap();
            s.add_entries("v", 3, 4, &old).unwrap();
            // The same incarnation follows the owner-tag rules: older refused, newer takes over
            // and keeps the entries.
            assert!(matches!(
                s.register("v", CS, 2, 100),
                Err(DtlError::StaleOwnerTag { .. })
            ));
            s.register("v", CS, 3, 0).unwrap();
            assert_eq!(s.registration("v").unwrap().incarnation, 100, "0 keeps it");
            assert_eq!(s.entries("v", 0, u32::MAX).unwrap(), old);
        }
        let s = DtlStore::open(dir.path(), true).unwrap();
        assert_eq!(s.registration("v").unwrap().incarnation, 100);
        // The name created again: tag 1 of a newer incarnation takes the namespace over, and
        // none of the old volume's entries are left to replay into the new one.
        let reg = s.register("v", CS, 1, 200).unwrap();
        assert_eq!((reg.owner_tag, reg.incarnation), (1, 200));
        assert_eq!(s.sco_range("v").unwrap(), ScoRange::default());
        let new = batch(1, 2, 9);
        s.add_entries("v", 1, 1, &new).unwrap();
        // A copy of the deleted volume (tag 3, incarnation 100) is refused, as a stale owner
        // on the wire (its mirror is fenced), and leaves the new entries alone.
        let err = s.register("v", CS, 3, 100).unwrap_err();
        assert!(
            matches!(
                err,
                DtlError::OlderIncarnation {
                    registered: 200,
                    got: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), crate::ErrorCode::StaleOwnerTag);
        assert!(matches!(
            s.add_entries("v", 3, 2, &batch(2, 1, 5)),
            Err(DtlError::Invalid(_))
        ));
        // The deleted volume's delete reaching this DTL late (same tag 1 as the new volume)
        // does not remove the new volume's namespace.
        assert!(matches!(
            s.unregister("v", 1, 100),
            Err(DtlError::OlderIncarnation { .. })
        ));
        drop(s);
        let s = DtlStore::open(dir.path(), false).unwrap();
        assert_eq!(s.entries("v", 0, u32::MAX).unwrap(), new);
        assert_eq!(s.registration("v").unwrap().incarnation, 200);
        // A newer incarnation's delete removes an older one's leftovers whatever their tag;
        // within one incarnation the tag must match.
        assert!(s.unregister("v", 2, 200).is_err());
        s.register("w", CS, 4, 100).unwrap();
        s.unregister("w", 1, 300).unwrap();
        s.unregister("v", 1, 200).unwrap();
        assert!(s.namespaces().is_empty());
    }

    #[test]
    fn a_format_1_registration_is_read_as_incarnation_0() {
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("v");
        fs::create_dir(&ns).unwrap();
        // What a DTL before incarnations wrote: 24 bytes, format 1.
        let mut b = [0u8; REG_LEN_V1];
        b[0..4].copy_from_slice(&REG_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        b[8..12].copy_from_slice(&CS.to_le_bytes());
        b[12..20].copy_from_slice(&7u64.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        fs::write(ns.join(REG_FILE), b).unwrap();
        let s = DtlStore::open(dir.path(), true).unwrap();
        let reg = s.registration("v").unwrap();
        assert_eq!(
            (reg.cluster_size, reg.owner_tag, reg.incarnation),
            (CS, 7, 0)
        );
        // Not known: the owner-tag rules alone, and the first known incarnation is recorded.
        assert!(s.register("v", CS, 6, 500).is_err());
        s.register("v", CS, 7, 500).unwrap();
        drop(s);
        let s = DtlStore::open(dir.path(), true).unwrap();
        assert_eq!(s.registration("v").unwrap().incarnation, 500);
        assert_eq!(fs::read(ns.join(REG_FILE)).unwrap().len(), REG_LEN);
    }

    #[test]
    fn registration_and_entries_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let b1 = batch(7, 4, 1);
        let b2 = batch(9, 2, 2);
        {
            let s = DtlStore::open(dir.path(), true).unwrap();
            s.register("a", CS, 3, 0).unwrap();
            s.register("a", CS, 4, 0).unwrap();
            s.register("b", 4096, 1, 0).unwrap();
            s.add_entries("a", 4, 7, &b1).unwrap();
            s.add_entries("a", 4, 9, &b2).unwrap();
        }
        let s = DtlStore::open(dir.path(), true).unwrap();
        let mut names = s.namespaces();
        names.sort();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(
            s.registration("a").unwrap(),
            Registration {
                cluster_size: CS,
                owner_tag: 4,
                incarnation: 0,
            }
        );
        assert_eq!(s.registration("b").unwrap().cluster_size, 4096);
        let mut all = b1.clone();
        all.extend(b2.clone());
        assert_eq!(s.entries("a", 0, u32::MAX).unwrap(), all);
        // Appending after reopen continues the existing segment.
        let b3 = batch(9, 1, 3);
        s.add_entries("a", 4, 9, &b3).unwrap();
        all.extend(b3);
        drop(s);
        let s = DtlStore::open(dir.path(), false).unwrap();
        assert_eq!(s.entries("a", 0, u32::MAX).unwrap(), all);
        assert_eq!(
            s.entry_counts("a").unwrap(),
            BTreeMap::from([(7, 4), (9, 3)])
        );
    }

    #[test]
    fn torn_tail_is_cut_at_reopen() {
        let rec = (RECORD_HEADER_LEN + CS as usize) as u64;
        let dir = tempfile::tempdir().unwrap();
        let b = batch(3, 5, 0);
        {
            let s = DtlStore::open(dir.path(), true).unwrap();
            s.register("v", CS, 1, 0).unwrap();
            s.add_entries("v", 1, 3, &b).unwrap();
        }
        let seg = dir.path().join("v").join(segment_file_name(3));
        let full = SEGMENT_HEADER_LEN as u64 + 5 * rec;
        assert_eq!(fs::metadata(&seg).unwrap().len(), full);

        // Torn in the middle of the 5th record's data: 4 survive, file cut to 4 records.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full - 100).unwrap();
        drop(f);
        let s = DtlStore::open(dir.path(), true).unwrap();
        assert_eq!(s.entries("v", 0, u32::MAX).unwrap(), b[..4].to_vec());
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            SEGMENT_HEADER_LEN as u64 + 4 * rec
        );
        // New appends land right after the cut and survive another reopen.
        let more = batch(3, 1, 77);
        s.add_entries("v", 1, 3, &more).unwrap();
        drop(s);

        // Garbage (a flipped data byte) in the last record: it and only it is dropped.
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        // ... followed by a few bytes of a torn next header.
        bytes.extend_from_slice(&[0x44, 0x52]);
        fs::write(&seg, &bytes).unwrap();
        let s = DtlStore::open(dir.path(), false).unwrap();
        assert_eq!(s.entries("v", 0, u32::MAX).unwrap(), b[..4].to_vec());
        assert_eq!(s.entry_counts("v").unwrap(), BTreeMap::from([(3, 4)]));
    }

    #[test]
    fn segment_torn_at_creation_is_removed_and_bad_namespace_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DtlStore::open(dir.path(), false).unwrap();
            s.register("v", CS, 1, 0).unwrap();
            s.add_entries("v", 1, 1, &batch(1, 1, 0)).unwrap();
            s.register("w", CS, 1, 0).unwrap();
            s.add_entries("w", 1, 1, &batch(1, 1, 0)).unwrap();
        }
        // A segment whose header never fully landed.
        fs::write(
            dir.path().join("v").join(segment_file_name(2)),
            [0x44, 0x53],
        )
        .unwrap();
        // A registration that is garbage.
        fs::write(dir.path().join("w").join(REG_FILE), [0u8; REG_LEN]).unwrap();
        let s = DtlStore::open(dir.path(), false).unwrap();
        assert!(!dir.path().join("v").join(segment_file_name(2)).exists());
        assert_eq!(s.sco_range("v").unwrap().newest, Some(1));
        assert!(matches!(
            s.sco_range("w"),
            Err(DtlError::UnknownNamespace(_))
        ));
        let quarantined: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".quarantine-w-"))
            .collect();
        assert_eq!(quarantined.len(), 1);
        // The name is free again.
        s.register("w", CS, 1, 0).unwrap();
    }
}
