//! The owner side against a real MDS server: the feed sends every uncorked TLog to the master,
//! and a restart seeded from the master's table replays only the TLogs after its cork — proven
//! by deleting the backend TLogs the table covers: the seeded restart still reads every
//! cluster right, while a plain restart cannot even open the volume. A stale table (history
//! rewritten by a scrub) is refused and the volume falls back to the full replay.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::catchup::read_list;
use vstor_mds::client::MdsClient;
use vstor_mds::owner::{seed_from_mds, MdsFeed};
use vstor_mds::server::{serve, MdsServerConfig};
use vstor_mds::{Cork, MdsStore, Role};
use vstor_volumedriver::{StdFs, Volume, VolumeConfig, VolumeOptions};

const CS: u64 = 4096;
const CLUSTERS: u64 = 512;
const T: Duration = Duration::from_secs(10);

fn upload(volume: &Volume) {
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
}

/// Volume `v` of `clusters` clusters (4 MiB SCOs) with its write buffer in `wb`.
fn create(wb: &Path, backend: &Arc<dyn ObjectStore>, clusters: u64) -> Arc<Volume> {
    let mut options = VolumeOptions::new(clusters * CS);
    options.sco_size = 4 << 20;
    Volume::create(
        wb,
        backend.clone(),
        VolumeConfig::new("v", &options, 0).unwrap(),
    )
    .unwrap()
}

fn round(volume: &Volume, model: &mut [Option<u8>], n: u8) {
    let start = (u64::from(n) * 37) % (CLUSTERS - 64);
    volume
        .write(start * CS, &vec![n; (48 * CS) as usize], false)
        .unwrap();
    for c in start..start + 48 {
        model[c as usize] = Some(n);
    }
    volume.discard((start + 10) * CS, 5 * CS).unwrap();
    for c in start + 10..start + 15 {
        model[c as usize] = None;
    }
    upload(volume);
}

fn check(volume: &Volume, model: &[Option<u8>]) {
    let mut buf = vec![0u8; CS as usize];
    for (c, want) in model.iter().enumerate() {
        volume.read(c as u64 * CS, &mut buf).unwrap();
        let byte = want.unwrap_or(0);
        assert!(
            buf.iter().all(|b| *b == byte),
            "cluster {c}: want {byte}, got {}",
            buf[0]
        );
    }
}

async fn table_at(client: &MdsClient, backend: &dyn ObjectStore) -> bool {
    let want = Cork::of_prefix(&read_list(backend, "v", "v").unwrap().tlogs);
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if client.stat("v").await.unwrap().meta.cork == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_seeded_from_the_master_replays_only_the_tlogs_after_its_cork() {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let store = Arc::new(MdsStore::open(&tmp.path().join("mds")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let mut config = MdsServerConfig::new("mds", Some(backend.clone()));
    config.catch_up_every = None;
    let server = tokio::spawn(serve(listener, store, config, shutdown.clone()));
    let client = Arc::new(MdsClient::connect(&addr, "owner", T).await.unwrap());

    let wb = tmp.path().join("wb");
    let volume = create(&wb, &backend, CLUSTERS);
    client.set_role("v", "v", Role::Master, 0).await.unwrap();
    volume.set_uncork_sink(Some(MdsFeed::start(client.clone(), "v", 0, Cork::EMPTY)));
    let mut model = vec![None; CLUSTERS as usize];
    for n in 1..=5 {
        round(&volume, &mut model, n);
    }
    assert!(
        table_at(&client, backend.as_ref()).await,
        "the feed keeps the master current"
    );
    let info = client.stat("v").await.unwrap();
    assert_eq!((info.meta.cork.tlog, info.meta.counters.sets), (5, 5));

    // Two more TLogs the master never hears of: it is 2 behind.
    volume.set_uncork_sink(None);
    for n in 6..=7 {
        round(&volume, &mut model, n);
    }
    volume.stop();
    drop(volume);
    std::fs::remove_dir_all(&wb).unwrap();
    // The TLogs the table covers are gone from the backend: only the seed can stand for them.
    for record in read_list(backend.as_ref(), "v", "v").unwrap().tlogs {
        if record.number <= info.meta.cork.tlog {
            backend.delete("v", &record.object_name()).unwrap();
        }
    }
    assert!(
        Volume::open(&wb, backend.clone(), "v").is_err(),
        "a full replay needs them"
    );
    std::fs::remove_dir_all(&wb).ok();
    let seed = seed_from_mds(&client, backend.clone(), "v", "v")
        .await
        .unwrap();
    assert_eq!((seed.records, seed.through_tlog), (5, 5));
    let volume =
        Volume::open_seeded(Arc::new(StdFs), &wb, backend.clone(), "v", Some(seed)).unwrap();
    check(&volume, &model);
    volume.stop();
    drop(volume);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_missing_table_falls_back_to_the_full_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let store = Arc::new(MdsStore::open(&tmp.path().join("mds")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let mut config = MdsServerConfig::new("mds", Some(backend.clone()));
    config.catch_up_every = None;
    let server = tokio::spawn(serve(listener, store, config, shutdown.clone()));
    let client = Arc::new(MdsClient::connect(&addr, "owner", T).await.unwrap());
    assert!(seed_from_mds(&client, backend.clone(), "v", "v")
        .await
        .is_none());

    let wb = tmp.path().join("wb");
    let volume = create(&wb, &backend, CLUSTERS);
    client.set_role("v", "v", Role::Master, 0).await.unwrap();
    volume.set_uncork_sink(Some(MdsFeed::start(client.clone(), "v", 0, Cork::EMPTY)));
    let mut model = vec![None; CLUSTERS as usize];
    for n in 1..=4 {
        round(&volume, &mut model, n);
    }
    assert!(table_at(&client, backend.as_ref()).await);
    // Scrub rewrites the history behind the table's cork.
    volume.set_uncork_sink(None);
    volume.scrub(None, &mut |_| {}).unwrap();
    volume.stop();
    drop(volume);
    assert!(seed_from_mds(&client, backend.clone(), "v", "v")
        .await
        .is_none());
    // A seed that does not fit the backend list is refused by the volume itself, too.
    let bogus = vstor_volumedriver::MapSeed::from_entries(
        2,
        99,
        [(
            0,
            vstor_volumedriver::ClusterLocation::from_raw(0x1_0000_0007),
        )],
    );
    std::fs::remove_dir_all(&wb).unwrap();
    let volume =
        Volume::open_seeded(Arc::new(StdFs), &wb, backend.clone(), "v", Some(bogus)).unwrap();
    check(&volume, &model);
    volume.stop();
    drop(volume);
    // So is one that fits the list but maps a cluster beyond the volume: nothing of it is
    // loaded, and the full replay gives the right map.
    let list = read_list(backend.as_ref(), "v", "v").unwrap();
    let last = list.tlogs.last().unwrap().number;
    let beyond = vstor_volumedriver::MapSeed::from_entries(
        list.tlogs.len(),
        last,
        [
            (
                1,
                vstor_volumedriver::ClusterLocation::from_raw(0x1_0000_0007),
            ),
            (
                CLUSTERS + 600,
                vstor_volumedriver::ClusterLocation::from_raw(0x1_0000_0007),
            ),
        ],
    );
    std::fs::remove_dir_all(&wb).unwrap();
    let volume =
        Volume::open_seeded(Arc::new(StdFs), &wb, backend.clone(), "v", Some(beyond)).unwrap();
    assert_eq!(
        volume.info().opened_from_mds_tlogs,
        0,
        "the seed was refused"
    );
    check(&volume, &model);
    volume.stop();
    drop(volume);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A volume whose last map page reaches past its end (700 clusters: page 1 holds clusters
/// 512..1024): a seed equal to the replayed map is adopted page by page and gives the same
/// map; one with an entry in that last page beyond the volume is refused whole.
#[test]
fn a_seed_whose_last_page_reaches_past_the_volume_is_checked_there() {
    const SMALL: u64 = 700;
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let wb = tmp.path().join("wb");
    let volume = create(&wb, &backend, SMALL);
    for (n, start) in [(1u8, 0u64), (2, 500), (3, 640)] {
        volume
            .write(start * CS, &vec![n; (60 * CS) as usize], false)
            .unwrap();
        upload(&volume);
    }
    let map = volume.map_entries();
    assert!(map.iter().any(|(a, _)| *a >= 512), "the last page is used");
    volume.stop();
    drop(volume);
    let list = read_list(backend.as_ref(), "v", "v").unwrap();
    let (records, last) = (list.tlogs.len(), list.tlogs.last().unwrap().number);
    let open = |seed| {
        std::fs::remove_dir_all(&wb).unwrap();
        let volume =
            Volume::open_seeded(Arc::new(StdFs), &wb, backend.clone(), "v", Some(seed)).unwrap();
        let (seeded, entries) = (volume.info().opened_from_mds_tlogs, volume.map_entries());
        volume.stop();
        (seeded, entries)
    };

    let (seeded, entries) = open(vstor_volumedriver::MapSeed::from_entries(
        records,
        last,
        map.iter().copied(),
    ));
    assert_eq!(seeded, records as u64, "the seed was adopted");
    assert_eq!(entries, map);

    let beyond = map.iter().copied().chain([(
        SMALL + 10,
        vstor_volumedriver::ClusterLocation::from_raw(0x1_0000_0007),
    )]);
    let (seeded, entries) = open(vstor_volumedriver::MapSeed::from_entries(
        records, last, beyond,
    ));
    assert_eq!(seeded, 0, "the seed was refused");
    assert_eq!(entries, map, "the full replay gave the map");
}
