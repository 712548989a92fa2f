//! `vstor-bench mds`: what the MDS buys a restart, and what it costs.
//!
//! A volume of `--size` is written with 4 KiB writes at pseudo-random offsets, straight through
//! the engine over a local backend, while a real `vstor mds` process (the master) receives every
//! uncorked TLog from the volume's feed, as on a node started with `--mds`. After writing half
//! as many clusters as the volume has, as many, and twice as many (so the history grows past
//! the map, which fills up more slowly), everything is uploaded and the master caught up, and
//! then, `--rounds` times:
//!
//! * **restart from the MDS**: the master's table is dumped and checked against the backend
//!   list (`seed_from_mds`) while the volume opens into an empty write-buffer directory, which
//!   then starts from it (as an adoption does, or a restart after losing the write buffer);
//! * **full replay**: the same open without a seed, replaying every backend TLog;
//!
//! and the two maps are compared (they must be equal). The report gives both times and their
//! ratio at each history length (the MDS restart should stay flat as history grows), when in
//! the MDS restart the table was in hand (the seed), the MDS's
//! disk use (its data directory) and resident memory per GiB of volume data, and the catch-up
//! rate of a second `vstor mds` (a new slave replaying the whole history from the backend), in
//! TLogs and map entries per second.
//!
//! `--backend` picks the store (see [`store`]): the local store by default, where a replay
//! reads TLogs from the page cache, or S3 (`--backend s3` runs moto for the run), where each
//! replayed TLog is an HTTP round trip.

mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use vstor_backend::ObjectStore;
use vstor_mds::catchup::read_list;
use vstor_mds::client::MdsClient;
use vstor_mds::owner::{seed_from_mds, MdsFeed};
use vstor_mds::{Cork, Role};
use vstor_volumedriver::config::CLUSTER_SIZE;
use vstor_volumedriver::{ManagerConfig, StdFs, Volume, VolumeManager, VolumeOptions};

use crate::common::process::{check_interrupted, spawn_until_ready, ChildGuard, InterruptGuard};
use crate::common::setup::{self, GIB};
use crate::common::table;
use crate::BenchOptions;
use store::BenchStore;

const VOLUME: &str = "mdsbench";
/// Every MDS call of the benchmark may take this long (a whole-history catch-up is one call).
const CALL_TIMEOUT: Duration = Duration::from_secs(1800);

struct MdsProcess {
    process: ChildGuard,
    addr: String,
}

fn start_mds(o: &BenchOptions, work: &Path, store: &BenchStore, name: &str) -> Result<MdsProcess> {
    let dir = work.join(name);
    let mut command = std::process::Command::new(&o.vstor_bin);
    command
        .args(["mds", "--listen", "127.0.0.1:0", "--catch-up-every", "0s"])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--backend")
        .arg(&store.spec)
        .envs(store.env.iter().map(|(k, v)| (k, v)));
    let (process, addr) = spawn_until_ready(
        &mut command,
        name,
        Duration::from_secs(10),
        &work.join(format!("{name}.log")),
        Duration::from_secs(30),
        |line| {
            line.strip_prefix("vstor mds ready: ")
                .map(ToString::to_string)
        },
    )?;
    Ok(MdsProcess { process, addr })
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One history length's figures.
struct Point {
    written: u64,
    tlogs: usize,
    entries: usize,
    from_mds_s: f64,
    seed_s: f64,
    replay_s: f64,
    mds_disk: u64,
    mds_rss: u64,
}

pub fn run(o: &BenchOptions) -> Result<()> {
    setup::validate(o.size, 1, o.rounds)?;
    let _interrupt = InterruptGuard::install()?;
    let work = setup::work_dir(o.work_dir.as_deref())?;
    let work = work.path();
    setup::require_free_space(work, o.size, 3)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = BenchStore::open(o.backend.as_deref(), work)?;
    eprintln!("mds bench: backend {}", store.label);
    let backend = store.store.clone();
    let master = start_mds(o, work, &store, "mds-master")?;
    let client =
        Arc::new(runtime.block_on(MdsClient::connect(&master.addr, "bench", CALL_TIMEOUT))?);
    let manager = VolumeManager::open(
        ManagerConfig {
            max_open_age: Some(Duration::from_secs(1)),
            ..ManagerConfig::under(&work.join("node"), GIB)
        },
        backend.clone(),
    )?;
    let volume = manager.create(VOLUME, &VolumeOptions::new(o.size))?;
    let tag = volume.config().owner_tag;
    runtime.block_on(client.set_role(VOLUME, VOLUME, Role::Master, tag))?;
    {
        let _rt = runtime.enter();
        volume.set_uncork_sink(Some(MdsFeed::start(
            client.clone(),
            VOLUME,
            tag,
            Cork::EMPTY,
        )));
    }

    let clusters = o.size / CLUSTER_SIZE;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; CLUSTER_SIZE as usize];
    let mut points = Vec::new();
    let mut done = 0u64;
    for target in [clusters / 2, clusters, 2 * clusters] {
        let started = Instant::now();
        while done < target {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            block[..8].copy_from_slice(&rng.to_le_bytes());
            let outcome = volume.write((rng % clusters) * CLUSTER_SIZE, &block, false)?;
            if let Some(delay) = outcome.throttle {
                std::thread::sleep(delay);
            }
            done += 1;
            if done.is_multiple_of(65_536) {
                check_interrupted()?;
            }
        }
        volume.flush()?;
        volume.close_current_tlog()?;
        if !volume.wait_for_uploads(Instant::now() + Duration::from_secs(3600)) {
            bail!("uploads did not finish");
        }
        eprintln!(
            "mds bench: {} written in {:.1} s; waiting for the master's table",
            table::mib_or_gib((done * CLUSTER_SIZE) as f64),
            started.elapsed().as_secs_f64()
        );
        let list = read_list(backend.as_ref(), VOLUME, VOLUME)?;
        let cork = Cork::of_prefix(&list.tlogs);
        let deadline = Instant::now() + Duration::from_secs(600);
        while runtime.block_on(client.stat(VOLUME))?.meta.cork != cork {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("the master MDS never reached the backend list's cork {cork}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        points.push(measure(
            o,
            work,
            &runtime,
            &client,
            &backend,
            &master,
            done,
            list.tlogs.len(),
        )?);
    }
    let catch_up = measure_catch_up(o, work, &store, &runtime, tag)?;
    drop(volume);
    manager.shutdown(Duration::from_secs(60));
    report(o, &store.label, &points, &catch_up);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(
    o: &BenchOptions,
    work: &Path,
    runtime: &tokio::runtime::Runtime,
    client: &Arc<MdsClient>,
    backend: &Arc<dyn ObjectStore>,
    master: &MdsProcess,
    written: u64,
    tlogs: usize,
) -> Result<Point> {
    let (mut from_mds, mut seeds, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    let mut entries = 0;
    for round in 0..o.rounds {
        check_interrupted()?;
        let dir = work.join(format!("restart-{round}"));
        // As a node's restart does (`VolumeManager`): the table is fetched while the open
        // reads the volume's configuration, owner tag and backend list.
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fetch = (client.clone(), backend.clone());
        runtime.spawn(async move {
            let seed = seed_from_mds(&fetch.0, fetch.1, VOLUME, VOLUME).await;
            let _ = tx.send((seed, started.elapsed()));
        });
        let mut fetched = None;
        let seeded =
            Volume::open_seeded_with(Arc::new(StdFs), &dir, backend.clone(), VOLUME, || {
                let (seed, took) = rx.recv().ok()?;
                fetched = Some((seed.as_ref().map(|s| s.records), took));
                seed
            })?;
        from_mds.push(started.elapsed().as_secs_f64());
        match fetched {
            Some((Some(records), took)) if records == tlogs => seeds.push(took.as_secs_f64()),
            Some((Some(records), _)) => bail!("the seed stands for {records} of {tlogs} TLogs"),
            _ => bail!("the MDS gave no seed"),
        }
        let seeded_map = seeded.map_entries();
        seeded.stop();
        drop(seeded);
        std::fs::remove_dir_all(&dir)?;

        let started = Instant::now();
        let replayed = Volume::open_seeded(Arc::new(StdFs), &dir, backend.clone(), VOLUME, None)?;
        replay.push(started.elapsed().as_secs_f64());
        let replayed_map = replayed.map_entries();
        replayed.stop();
        drop(replayed);
        std::fs::remove_dir_all(&dir)?;
        if seeded_map != replayed_map {
            bail!("the map restarted from the MDS differs from the full replay's");
        }
        entries = seeded_map.len();
    }
    Ok(Point {
        written: written * CLUSTER_SIZE,
        tlogs,
        entries,
        from_mds_s: median(from_mds),
        seed_s: median(seeds),
        replay_s: median(replay),
        mds_disk: dir_bytes(&work.join("mds-master")),
        mds_rss: rss_bytes(master.process.pid()),
    })
}

struct CatchUp {
    tlogs: u64,
    entries: u64,
    secs: f64,
}

fn measure_catch_up(
    o: &BenchOptions,
    work: &Path,
    store: &BenchStore,
    runtime: &tokio::runtime::Runtime,
    tag: u64,
) -> Result<CatchUp> {
    let slave = start_mds(o, work, store, "mds-slave")?;
    let client = runtime.block_on(MdsClient::connect(&slave.addr, "bench", CALL_TIMEOUT))?;
    runtime.block_on(client.set_role(VOLUME, VOLUME, Role::Slave, tag))?;
    let started = Instant::now();
    let report = runtime.block_on(client.catch_up(VOLUME, false))?;
    let secs = started.elapsed().as_secs_f64();
    let entries = runtime.block_on(client.stat(VOLUME))?.entries;
    Ok(CatchUp {
        tlogs: report.replayed,
        entries,
        secs,
    })
}

fn report(o: &BenchOptions, backend: &str, points: &[Point], catch_up: &CatchUp) {
    // Per GiB of volume data: the clusters the map holds, not the bytes written (overwrites
    // cost the MDS nothing).
    let per_gib = |bytes: u64, entries: usize| {
        bytes as f64 / ((entries as u64 * CLUSTER_SIZE) as f64 / GIB as f64)
    };
    if o.json {
        let points: Vec<serde_json::Value> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "written_bytes": p.written,
                    "tlogs": p.tlogs,
                    "map_entries": p.entries,
                    "restart_from_mds_s": p.from_mds_s,
                    "seed_from_mds_s": p.seed_s,
                    "full_replay_s": p.replay_s,
                    "speedup": p.replay_s / p.from_mds_s,
                    "mds_disk_bytes_per_gib": per_gib(p.mds_disk, p.entries),
                    "mds_rss_bytes_per_gib": per_gib(p.mds_rss, p.entries),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "backend": backend,
                "points": points,
                "catch_up": {
                    "tlogs": catch_up.tlogs,
                    "entries": catch_up.entries,
                    "seconds": catch_up.secs,
                    "tlogs_per_s": catch_up.tlogs as f64 / catch_up.secs,
                },
            })
        );
        return;
    }
    let mut lines = vec![vec![
        "written".to_string(),
        "TLogs".into(),
        "map entries".into(),
        "restart from MDS".into(),
        "of which seed".into(),
        "full replay".into(),
        "speedup".into(),
        "MDS disk / GiB data".into(),
        "MDS RSS / GiB data".into(),
    ]];
    for p in points {
        lines.push(vec![
            table::mib_or_gib(p.written as f64),
            p.tlogs.to_string(),
            p.entries.to_string(),
            format!("{:.3} s", p.from_mds_s),
            format!("{:.3} s", p.seed_s),
            format!("{:.3} s", p.replay_s),
            format!("{:.1}x", p.replay_s / p.from_mds_s),
            table::mib_or_gib(per_gib(p.mds_disk, p.entries)),
            table::mib_or_gib(per_gib(p.mds_rss, p.entries)),
        ]);
    }
    println!(
        "MDS: restart of a volume written with 4 KiB random writes ({}), medians; backend: {backend}",
        table::rounds_label(o.rounds)
    );
    print!("{}", table::render(&lines));
    println!(
        "slave catch-up from the backend: {} TLogs ({} entries) in {:.2} s = {:.0} TLogs/s",
        catch_up.tlogs,
        catch_up.entries,
        catch_up.secs,
        catch_up.tlogs as f64 / catch_up.secs
    );
}
