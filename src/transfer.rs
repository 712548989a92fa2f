//! `vstor volume import FILE NAME` and `vstor volume export NAME FILE`: disk images in and out
//! of volumes, through the node's NBD export (the same path a VM's disk takes).
//!
//! * **Import, raw:** the volume is created with the file's size (rounded up to 4 KiB), then
//!   only the file's data is written: holes are skipped (`SEEK_DATA`/`SEEK_HOLE`), and so are
//!   all-zero chunks inside data, so a thin image stays thin. A final FLUSH makes it durable.
//! * **Import, qcow2:** the volume gets the image's virtual size (`qemu-img info`), and
//!   `qemu-img convert -n` writes it to the NBD export (qemu-img knows qcow2's clusters, backing
//!   files and compression; a second implementation of the format would only be a worse one).
//! * **Export:** the volume's allocation map comes first (NBD block status, on a second
//!   connection: `vstor_edge::nbd::map_client`), so what reads as zeros (never written, trimmed,
//!   zeroed) is neither read nor written; the data runs are read in 1 MiB chunks into a sparse
//!   file, all-zero chunks not written either, so holes stay holes; the file is fsynced at the
//!   end. A thin 1 TiB volume with 1 GiB of data costs 1 GiB of reads, not 1 TiB. The chunks
//!   are read over [`EXPORT_CONNECTIONS`] connections at once (as nbdcopy does), so a node
//!   whose reads wait for S3 or the erasure-coded tier has several in flight; the first failed
//!   read stops the export with the volume and offset named.
//!
//! * **TLS:** a node whose NBD server requires TLS (`--nbd-tls require`) refuses plain clients,
//!   so both take `--tls-certificates DIR`, the credentials directory qemu (`tls-creds-x509`)
//!   and libnbd (`tls-certificates`) use: `ca-cert.pem` to check the node, and
//!   `client-cert.pem` / `client-key.pem` when the node wants client certificates. Our own
//!   clients upgrade with `NBD_OPT_STARTTLS` (`vstor_edge::nbd::client_tls`); a qcow2 import
//!   hands the same directory to qemu-img. The node's certificate must name the host of its
//!   `nbd_uri` unless `--tls-server-name NAME` says which name to check instead (a node
//!   advertised by IP address, its certificate issued for its host name), as qemu's
//!   `tls-hostname` and libnbd's `tls-hostname` do.
//!
//! A failed import deletes the half-imported volume (and says so). Progress is a bar on a
//! terminal and a line every few seconds otherwise.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::unistd::{lseek, Whence};
use serde::Serialize;
use vstor_edge::nbd::client::NbdClient;
use vstor_edge::nbd::client_tls::ClientTls;
use vstor_edge::nbd::map_client::MapClient;

use crate::api_types::{CreateRequest, VolumeView};
use crate::client::Client;

const CHUNK: usize = 1 << 20;
/// Connections an export reads the volume's data over, each one 1 MiB read at a time: as
/// nbdcopy's default, so a node whose reads wait for S3 or the erasure-coded tier (a round trip
/// each) keeps several in flight.
const EXPORT_CONNECTIONS: usize = 4;
/// One block status request of an export asks about this much (the server may answer less).
const MAP_SPAN: u64 = 1 << 30;
const BLOCK: u64 = 4096;
/// Every NBD request may take this long (a node that stops answering fails the transfer).
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Image formats `volume import` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

/// What an import or export did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    pub volume: String,
    pub file: String,
    pub format: Format,
    /// The volume's size.
    pub size: u64,
    /// Bytes of data written (holes and zeros skipped).
    pub data_bytes: u64,
    pub seconds: f64,
}

/// Progress of a transfer: a bar on a terminal, a line every 5 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    total: u64,
    last_line: Instant,
}

impl Progress {
    fn new(what: &str, total: u64) -> Self {
        let bar = crate::client::progress_bar(
            "{prefix} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            what,
            total,
        );
        Self {
            bar,
            what: what.to_string(),
            total,
            last_line: Instant::now(),
        }
    }

    fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                eprintln!("{}: {done}/{} bytes", self.what, self.total);
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `nbd://HOST:PORT/NAME` → (`HOST:PORT`, `NAME`).
fn nbd_target(view: &VolumeView) -> Result<(String, String)> {
    let uri = view
        .nbd_uri
        .as_deref()
        .with_context(|| format!("the node gave no NBD export for volume {}", view.name))?;
    let rest = uri
        .strip_prefix("nbd://")
        .with_context(|| format!("unexpected NBD URI {uri:?}"))?;
    let (addr, export) = rest
        .split_once('/')
        .with_context(|| format!("unexpected NBD URI {uri:?}"))?;
    Ok((addr.to_string(), export.to_string()))
}

/// How `volume import` and `volume export` reach a node whose NBD server wants TLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// TLS to the node's NBD server: a directory with ca-cert.pem, and client-cert.pem and
    /// client-key.pem if the node wants client certificates (qemu's and libnbd's layout)
    /// [default: plain NBD].
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// The name the node's certificate must carry [default: the host of the node's NBD
    /// address, often an IP address].
    #[arg(long, value_name = "NAME", requires = "tls_certificates")]
    pub tls_server_name: Option<String>,
}

/// The TLS credentials of `--tls-certificates`, if given, checking `--tls-server-name`.
fn client_tls(args: &TlsArgs) -> Result<Option<ClientTls>> {
    let Some(dir) = &args.tls_certificates else {
        return Ok(None);
    };
    let tls = ClientTls::from_dir(dir).context("--tls-certificates")?;
    match &args.tls_server_name {
        None => Ok(Some(tls)),
        Some(name) => Ok(Some(
            tls.with_server_name(name).context("--tls-server-name")?,
        )),
    }
}

/// What failing to open the NBD export says; without TLS it names the likely reason.
fn cannot_reach(addr: &str, export: &str, tls: bool) -> String {
    let hint = if tls {
        ""
    } else {
        " (a node that requires NBD TLS drops plain clients: pass --tls-certificates DIR)"
    };
    format!("cannot reach the NBD export nbd://{addr}/{export}{hint}")
}

fn nbd_ok(code: std::io::Result<u32>, what: &str) -> Result<()> {
    match code {
        Ok(0) => Ok(()),
        // NBD's error values are Linux errno values (EIO, ENOSPC, ...): say which.
        Ok(error) => bail!(
            "{what} failed: the node answered NBD error {error} ({})",
            std::io::Error::from_raw_os_error(error as i32)
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{what} failed"))),
    }
}

fn detect(path: &Path) -> Result<Format> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

fn qcow2_virtual_size(path: &Path) -> Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .context("qcow2 import needs qemu-img (package qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{} is not a readable qcow2 image: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    info["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")
}

/// The data extents of `file` (length `len`): `SEEK_DATA`/`SEEK_HOLE`, or the whole file where
/// the file system cannot tell.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Ok(start) = lseek(fd, at as i64, Whence::SeekData) else {
            break; // ENXIO: no data after `at`
        };
        let start = start as u64;
        let end = lseek(fd, start as i64, Whence::SeekHole).map_or(len, |e| e as u64);
        extents.push((start, end.min(len)));
        at = end;
    }
    if extents.is_empty() && len > 0 && lseek(fd, 0, Whence::SeekData).is_err() {
        // A file system without SEEK_DATA reports an error for every offset: read it all.
        if lseek(fd, 0, Whence::SeekHole).is_err() {
            extents.push((0, len));
        }
    }
    extents
}

fn write_raw(
    path: &Path,
    view: &VolumeView,
    tls: Option<&ClientTls>,
    progress: &mut Progress,
) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let (addr, export) = nbd_target(view)?;
    let mut nbd = NbdClient::connect_tls(&addr, &export, Some(IO_TIMEOUT), tls)
        .with_context(|| cannot_reach(&addr, &export, tls.is_some()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0u64;
    for (start, end) in data_extents(&file, len) {
        let mut at = start;
        while at < end {
            let n = (CHUNK as u64).min(end - at) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading {} at {at}", path.display()))?;
            if buf[..n].iter().any(|b| *b != 0) {
                // The tail of an image whose size is not a multiple of 4 KiB is padded.
                let padded = (n as u64).div_ceil(BLOCK) * BLOCK;
                let padded = padded as usize;
                if padded > n {
                    buf[n..padded].fill(0);
                }
                nbd_ok(nbd.write(at, &buf[..padded], false), "NBD write")?;
                data += n as u64;
            }
            at += n as u64;
            progress.set(at);
        }
    }
    nbd_ok(nbd.flush(), "NBD flush")?;
    Ok(data)
}

fn write_qcow2(path: &Path, view: &VolumeView, tls: &TlsArgs) -> Result<u64> {
    let uri = view.nbd_uri.clone().unwrap_or_default();
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-n", "-f", "qcow2", "--target-is-zero"]);
    if crate::client::on_terminal() {
        command.arg("-p");
    }
    let target = match &tls.tls_certificates {
        None => {
            command.args(["-O", "raw"]);
            uri.clone()
        }
        // The target as options (qemu-img takes no URI with TLS credentials); its format is
        // then the options' driver, so no `-O`.
        Some(dir) => {
            let (addr, export) = nbd_target(view)?;
            let (host, port) = addr
                .rsplit_once(':')
                .with_context(|| format!("unexpected NBD address {addr:?}"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            command.args([
                "--object".to_string(),
                // qemu's option syntax doubles a comma inside a value.
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    dir.display().to_string().replace(',', ",,")
                ),
                "--target-image-opts".to_string(),
            ]);
            let mut opts =
                format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0");
            if let Some(name) = &tls.tls_server_name {
                opts.push_str(&format!(",tls-hostname={}", name.replace(',', ",,")));
            }
            opts
        }
    };
    let status = command
        .arg(path)
        .arg(&target)
        .status()
        .context("qcow2 import needs qemu-img (package qemu-utils)")?;
    if !status.success() {
        bail!(
            "qemu-img convert of {} to {uri} failed ({status})",
            path.display()
        );
    }
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()?;
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(map
        .iter()
        .filter(|e| e["data"] == true && e["zero"] != true)
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// `vstor volume import`.
pub fn import(
    client: &Client,
    path: &Path,
    name: &str,
    format: Option<Format>,
    size: Option<u64>,
    tls: &TlsArgs,
) -> Result<TransferReport> {
    let started = Instant::now();
    let format = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    // A bad credentials directory is refused before the volume is made (and qemu-img would
    // explain it less well).
    let credentials = client_tls(tls)?;
    let image_size = match format {
        Format::Raw => {
            std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len()
                .div_ceil(BLOCK)
                * BLOCK
        }
        Format::Qcow2 => qcow2_virtual_size(path)?,
    };
    let size = match size {
        Some(s) if s < image_size => bail!(
            "--size {s} is smaller than the image ({image_size} bytes): the image would not fit"
        ),
        Some(s) => s,
        None => image_size,
    };
    if size == 0 {
        bail!("{} is empty: nothing to import", path.display());
    }
    let view: VolumeView = client.post(
        "/v1/volumes",
        &CreateRequest {
            name: name.to_string(),
            size,
            ..CreateRequest::default()
        },
    )?;
    let mut progress = Progress::new(&format!("import {name}"), image_size);
    let written = match format {
        Format::Raw => write_raw(path, &view, credentials.as_ref(), &mut progress),
        Format::Qcow2 => write_qcow2(path, &view, tls),
    };
    progress.finish();
    let data_bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let cleanup = client.delete::<serde_json::Value>(&format!("/v1/volumes/{name}"));
            let fate = match cleanup {
                Ok(_) => "the half-imported volume was deleted".to_string(),
                Err(d) => format!("the half-imported volume could not be deleted: {d:#}"),
            };
            return Err(e.context(format!(
                "importing {} into volume {name}; {fate}",
                path.display()
            )));
        }
    };
    Ok(TransferReport {
        volume: name.to_string(),
        file: path.display().to_string(),
        format,
        size,
        data_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `vstor volume export`.
pub fn export(
    client: &Client,
    name: &str,
    path: &Path,
    force: bool,
    tls: &TlsArgs,
) -> Result<TransferReport> {
    let started = Instant::now();
    let view: VolumeView = client.get(&format!("/v1/volumes/{name}"))?;
    let size = view
        .size
        .with_context(|| format!("volume {name} is not served ({})", view.state))?;
    if path.exists() && !force {
        bail!(
            "{} exists; remove it or pass --force to overwrite it",
            path.display()
        );
    }
    let (addr, export) = nbd_target(&view)?;
    let tls = client_tls(tls)?;
    let reach = || cannot_reach(&addr, &export, tls.is_some());
    let mut map =
        MapClient::connect(&addr, &export, Some(IO_TIMEOUT), tls.as_ref()).with_context(reach)?;
    let readers = (0..EXPORT_CONNECTIONS)
        .map(|_| NbdClient::connect_tls(&addr, &export, Some(IO_TIMEOUT), tls.as_ref()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(reach)?;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)?;
    let mut progress = Progress::new(&format!("export {name}"), size);
    let copied = AtomicU64::new(0);
    let data = AtomicU64::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let (jobs, queue) = std::sync::mpsc::sync_channel::<(u64, usize)>(2 * EXPORT_CONNECTIONS);
    // Only the readers hold the receiving end: when every one of them has stopped, `send` fails
    // instead of waiting for room.
    let queue = Arc::new(Mutex::new(queue));
    std::thread::scope(|scope| -> Result<()> {
        for mut nbd in readers {
            let queue = Arc::clone(&queue);
            let (file, copied, data, failed) = (&file, &copied, &data, &failed);
            scope.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok((pos, n)) = job else { return };
                    match copy_chunk(&mut nbd, name, file, path, pos, &mut buf[..n]) {
                        Ok(written) => {
                            data.fetch_add(written, Ordering::Relaxed);
                            copied.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
        drop(queue);
        // Runs that read as zeros are skipped: they count as done at once.
        let mut skipped = 0u64;
        let mut at = 0u64;
        while at < size {
            let span = MAP_SPAN.min(size - at) as u32;
            let runs = map
                .block_status(at, span)
                .with_context(|| format!("allocation map of volume {name} at {at}"))?;
            for run in runs {
                let end = run.offset + run.length;
                if run.zero {
                    skipped += run.length;
                }
                let mut pos = run.offset;
                while !run.zero && pos < end {
                    let n = (CHUNK as u64).min(end - pos) as usize;
                    if jobs.send((pos, n)).is_err() {
                        // Every reader stopped: one of them failed.
                        return Ok(());
                    }
                    if failed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some()
                    {
                        return Ok(());
                    }
                    pos += n as u64;
                    progress.set(skipped + copied.load(Ordering::Relaxed));
                }
                at = end;
            }
        }
        drop(jobs);
        Ok(())
    })?;
    if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    let data = data.into_inner();
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))?;
    progress.finish();
    Ok(TransferReport {
        volume: name.to_string(),
        file: path.display().to_string(),
        format: Format::Raw,
        size,
        data_bytes: data,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Read `buf.len()` bytes at `pos` of the export into `buf` and write them at `pos` of `file`
/// unless they are all zeros (holes stay holes). Returns the bytes written.
fn copy_chunk(
    nbd: &mut NbdClient,
    volume: &str,
    file: &File,
    path: &Path,
    pos: u64,
    buf: &mut [u8],
) -> Result<u64> {
    nbd_ok(nbd.read(pos, buf), "NBD read")
        .with_context(|| format!("reading volume {volume} at byte {pos}"))?;
    if buf.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    file.write_all_at(buf, pos)
        .with_context(|| format!("writing {} at {pos}", path.display()))?;
    Ok(buf.len() as u64)
}
