//! A volume whose data the backend cannot give back (an EC object with fewer than `k` fragments
//! reachable) halts instead of serving around the hole, and `VolumeManager::restart` brings it
//! back, data intact, once the backend can read again (a restart while it still cannot leaves the
//! volume listed as failed); a running volume is not restarted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::FaultStore;
use vstor_volumedriver::{ManagerConfig, VolumeError, VolumeManager, VolumeOptions};

const CS: usize = 4096;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ ((i / CS) as u8))
        .collect()
}

#[test]
fn unreadable_backend_data_halts_the_volume_and_restart_brings_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let config = ManagerConfig {
        max_open_age: None,
        ..ManagerConfig::under(&tmp.path().join("node"), 1 << 30)
    };
    let manager = VolumeManager::open(config, backend.clone()).unwrap();
    let options = VolumeOptions {
        sco_size: 4 << 20,
        ..VolumeOptions::new(64 << 20)
    };
    let volume = manager.create("v", &options).unwrap();
    let data = pattern(8 << 20, 7);
    volume.write(0, &data, false).unwrap();
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    assert!(volume.wait_for_uploads(Instant::now() + Duration::from_secs(30)));
    let (local, _) = volume.local_bytes();
    assert_eq!(volume.evict(u64::MAX), local, "everything evicted");
    // Restarting a running volume is refused.
    let running = manager
        .restart("v")
        .err()
        .expect("a running volume is not restarted");
    assert!(matches!(running, VolumeError::Refused { .. }), "{running}");

    backend.set_unreadable(true);
    let mut buf = vec![0u8; CS];
    let err = volume.read(CS as u64, &mut buf).unwrap_err();
    assert!(err.to_string().contains("cannot be rebuilt"), "{err}");
    let info = volume.info();
    assert_eq!(info.state, "halted", "{info:?}");
    assert!(
        info.halted_reason
            .as_deref()
            .is_some_and(|r| r.contains("cannot be rebuilt")),
        "{info:?}"
    );
    // Halted: every request fails, even ones the write buffer could serve.
    assert!(volume.write(0, &pattern(CS, 1), false).is_err());
    // Restarting while the backend still cannot read fails (opening reads the backend's TLog
    // list) and leaves the volume listed as failed, with the reason: never served around a hole.
    let failed = manager
        .restart("v")
        .err()
        .expect("no restart while unreadable");
    assert!(failed.to_string().contains("cannot be rebuilt"), "{failed}");
    assert!(manager.failed().contains_key("v"));
    assert!(matches!(
        manager.get("v").err(),
        Some(VolumeError::Halted { .. })
    ));
    assert_eq!(volume.info().state, "halted");

    // The OSDs are back: a restart serves every byte again, and writes.
    backend.set_unreadable(false);
    let restarted = manager.restart("v").unwrap();
    assert!(!Arc::ptr_eq(&restarted, &volume));
    assert_eq!(restarted.info().state, "running");
    assert!(manager.failed().is_empty());
    assert!(
        volume.write(0, &pattern(CS, 2), false).is_err(),
        "the old instance serves nothing"
    );
    let mut all = vec![0u8; data.len()];
    restarted.read(0, &mut all).unwrap();
    assert!(all == data, "data differs after the restart");
    let newer = pattern(CS, 9);
    restarted.write(0, &newer, false).unwrap();
    restarted.read(0, &mut buf).unwrap();
    assert_eq!(buf, newer);
    assert!(Arc::ptr_eq(&manager.get("v").unwrap(), &restarted));
    // Unknown volumes get the usual error.
    assert!(matches!(
        manager.restart("nosuch").err(),
        Some(VolumeError::NotFound { .. })
    ));
}
