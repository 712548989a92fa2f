//! `vstor mds` as a process: acknowledged map updates survive `kill -9`, an old owner tag is
//! refused after the restart, a second daemon on the same data directory is refused, and a
//! table is rebuilt from the backend (`vstor mds rebuild`) after its data directory was deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::mds::Mds;
use common::VSTOR;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::catchup::backend_map;
use vstor_mds::client::MdsClient;
use vstor_mds::proto::ErrorCode;
use vstor_mds::table::apply_to_model;
use vstor_mds::{Cork, MdsError, Role, Update};
use vstor_volumedriver::config::TLogRecord;
use vstor_volumedriver::{Volume, VolumeConfig, VolumeOptions};

const T: Duration = Duration::from_secs(10);

fn refused(e: &MdsError) -> Option<ErrorCode> {
    match e {
        MdsError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_updates_survive_kill_9_and_old_owners_stay_fenced() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, backend) = (tmp.path().join("mds"), tmp.path().join("backend"));
    let mut mds = Mds::start(&dir, &backend);

    // A second daemon on the same directory is refused, naming the holder.
    let second = Command::new(VSTOR)
        .args(["mds", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let client = MdsClient::connect(&mds.addr, "test", T).await.unwrap();
    client
        .set_role("vol", "vol", Role::Master, 7)
        .await
        .unwrap();
    let mut model = BTreeMap::new();
    let mut cork = Cork::EMPTY;
    for tlog in 1..=40u64 {
        let updates: Vec<Update> = (0..500u64)
            .map(|i| {
                let address = (tlog * 7919 + i * 31) % 20_000;
                if i % 50 == 49 {
                    Update::Trim {
                        start: address,
                        count: 9,
                    }
                } else {
                    Update::Loc {
                        address,
                        location: (i << 32) | tlog,
                    }
                }
            })
            .collect();
        let next = cork.after(&TLogRecord::new(tlog));
        client
            .multi_set("vol", 7, cork, next, updates.clone())
            .await
            .unwrap();
        apply_to_model(&mut model, &updates);
        cork = next;
    }
    drop(client);
    mds.kill9();

    let mds = Mds::start(&dir, &backend);
    let client = MdsClient::connect(&mds.addr, "test", T).await.unwrap();
    let (got_cork, map) = client.dump_all("vol").await.unwrap();
    assert_eq!(got_cork, cork);
    assert_eq!(map, model);
    let err = client
        .multi_set("vol", 6, cork, cork.after(&TLogRecord::new(41)), vec![])
        .await
        .unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::Fenced), "{err}");
    assert_eq!(client.dump_all("vol").await.unwrap().0, cork);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_data_dir_is_rebuilt_from_the_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, backend_dir) = (tmp.path().join("mds"), tmp.path().join("backend"));
    let backend: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(&backend_dir).unwrap());
    let mut options = VolumeOptions::new(4 << 20);
    options.sco_size = 4 << 20;
    let volume = Volume::create(
        &tmp.path().join("wb"),
        backend.clone(),
        VolumeConfig::new("v", &options, 0).unwrap(),
    )
    .unwrap();
    for round in 0..5u64 {
        volume
            .write(
                round * 12288,
                &vec![round as u8 + 1; 3 * 4096 + 4096],
                false,
            )
            .unwrap();
        volume.discard(round * 4096, 4096).unwrap();
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        volume.drain_uploads().unwrap();
    }
    let (full_cork, full) = backend_map(backend.as_ref(), "v", "v").unwrap();
    assert!(!full.is_empty());

    let mut mds = Mds::start(&dir, &backend_dir);
    let out = mds.cli(&["rebuild", "v", "--mds", &mds.addr]);
    assert!(out.contains("5 TLogs replayed"), "{out}");
    let client = MdsClient::connect(&mds.addr, "test", T).await.unwrap();
    assert_eq!(
        client.dump_all("v").await.unwrap(),
        (full_cork, full.clone())
    );
    let listing = mds.cli(&["list", "--mds", &mds.addr]);
    assert!(
        listing.contains("slave") && listing.contains("behind 0"),
        "{listing}"
    );
    drop(client);

    // The MDS loses its disk: a new one starts empty and the table is rebuilt.
    mds.kill9();
    std::fs::remove_dir_all(&dir).unwrap();
    let mds = Mds::start(&dir, &backend_dir);
    let client = MdsClient::connect(&mds.addr, "test", T).await.unwrap();
    assert!(client.list().await.unwrap().is_empty());
    mds.cli(&["rebuild", "v", "--mds", &mds.addr]);
    assert_eq!(client.dump_all("v").await.unwrap(), (full_cork, full));
}
