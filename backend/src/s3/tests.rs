//! The S3 store against a real S3 server (moto), one server per test.

use std::time::{Duration, Instant};

use super::*;
use crate::testing::{Moto, Proxy};

const BUCKET: &str = "vstor-test";

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn options() -> S3Options {
    S3Options {
        retry_timeout: Duration::from_secs(20),
        max_retries: 10,
        restamp_on_claim: vec!["volume_config".into(), "tlogs".into()],
        open_check_timeout: Duration::from_secs(10),
    }
}

/// A moto server with the test bucket and a store on `s3://BUCKET/<prefix>`.
fn setup(prefix: &str) -> (Moto, S3Store) {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let uri = match prefix {
        "" => format!("s3://{BUCKET}"),
        p => format!("s3://{BUCKET}/{p}"),
    };
    let store = moto.store(&uri, options()).expect("open the S3 store");
    (moto, store)
}

#[test]
fn locations_parse_and_reject_bad_uris() {
    let loc = S3Location::parse("s3://my-bucket/a/b/").unwrap();
    assert_eq!(
        (loc.bucket.as_str(), loc.prefix.as_str()),
        ("my-bucket", "a/b")
    );
    assert_eq!(loc.to_string(), "s3://my-bucket/a/b");
    assert_eq!(S3Location::parse("s3://bkt").unwrap().prefix, "");
    for bad in [
        "/data",
        "s3://",
        "s3://UPPER",
        "s3://b",
        "s3://bkt/a//b",
        "s3://bkt/../x",
        "s3://bkt/a b",
    ] {
        let err = S3Location::parse(bad).unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidUri { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn round_trip_list_delete_and_namespaces() {
    let (_moto, store) = setup("cluster/one");
    store.create_namespace("vol1", 1).unwrap();
    store.create_namespace("vol2", 1).unwrap();
    let data = pattern(200_000, 7);
    store.put("vol1", "00_00000001_00", &data).unwrap();
    store.put("vol1", "tlog_00000001", b"small").unwrap();
    assert_eq!(store.get("vol1", "00_00000001_00").unwrap(), data);
    assert_eq!(store.size("vol1", "00_00000001_00").unwrap(), 200_000);
    assert_eq!(
        store.list("vol1").unwrap(),
        vec!["00_00000001_00".to_string(), "tlog_00000001".to_string()]
    );
    assert!(store.list("vol2").unwrap().is_empty());
    // Keys live under the prefix, in the documented layout.
    let raw = store.raw_get("cluster/one/vol1/tlog_00000001").unwrap();
    assert_eq!(format::decode(&raw).unwrap().0.owner, 1);
    store.put("vol1", "tlog_00000001", b"replaced").unwrap();
    assert_eq!(store.get("vol1", "tlog_00000001").unwrap(), b"replaced");
    store.delete("vol1", "tlog_00000001").unwrap();
    store.delete("vol1", "tlog_00000001").unwrap();
    assert!(!store.exists("vol1", "tlog_00000001").unwrap());
    assert!(store.exists("vol1", "00_00000001_00").unwrap());
    // Streaming put (buffered by the default implementation) round-trips.
    let big = pattern(3 * 1024 * 1024 + 12_345, 11);
    store
        .put_from("vol1", "streamed", big.len() as u64, &mut &big[..], 1)
        .unwrap();
    assert_eq!(store.get("vol1", "streamed").unwrap(), big);
    let err = store
        .put_from("vol1", "short", 10, &mut &b"abc"[..], 1)
        .unwrap_err();
    assert!(matches!(err, BackendError::Source { .. }), "{err}");
    assert!(!store.exists("vol1", "short").unwrap());
    assert_eq!(store.list_namespaces().unwrap(), vec!["vol1", "vol2"]);
    store.delete_namespace("vol1").unwrap();
    assert!(!store.namespace_exists("vol1").unwrap());
    assert_eq!(store.list_namespaces().unwrap(), vec!["vol2"]);
    assert!(matches!(
        store.delete_namespace("vol1"),
        Err(BackendError::NoSuchNamespace { .. })
    ));
    store.create_namespace("vol1", 3).unwrap();
    assert!(store.list("vol1").unwrap().is_empty());
    assert_eq!(store.owner_tag("vol1").unwrap(), 3);
}

#[test]
fn empty_object_and_ranged_reads() {
    let (_moto, store) = setup("");
    store.create_namespace("ns", 0).unwrap();
    store.put("ns", "empty", b"").unwrap();
    assert_eq!(store.get("ns", "empty").unwrap(), Vec::<u8>::new());
    assert_eq!(store.size("ns", "empty").unwrap(), 0);
    let mut nothing = [0u8; 0];
    store.get_range("ns", "empty", 0, &mut nothing).unwrap();
    let mut one = [0u8; 1];
    assert!(matches!(
        store.get_range("ns", "empty", 0, &mut one),
        Err(BackendError::RangeOutOfBounds { .. })
    ));
    // Large enough that the CRC table outgrows the first GET's prefetch.
    let data = pattern(70 * 1024 * 1024 + 1000, 3);
    store.put("ns", "obj", &data).unwrap();
    for (offset, len) in [
        (0usize, 1usize),
        (65535, 2),
        (4096, 8192),
        (131000, 60000),
        (68 * 1024 * 1024 - 5, 300_000),
        (data.len() - 10, 10),
    ] {
        let mut buf = vec![0u8; len];
        store
            .get_range("ns", "obj", offset as u64, &mut buf)
            .unwrap();
        assert!(buf == data[offset..offset + len], "range {offset}+{len}");
    }
    let mut buf = vec![0u8; 11];
    let err = store
        .get_range("ns", "obj", (data.len() - 10) as u64, &mut buf)
        .unwrap_err();
    assert!(
        matches!(err, BackendError::RangeOutOfBounds { .. }),
        "{err}"
    );
    let err = store
        .get_range("ns", "obj", u64::MAX, &mut buf)
        .unwrap_err();
    assert!(
        matches!(err, BackendError::RangeOutOfBounds { .. }),
        "{err}"
    );
}

/// GET requests moto has served for bucket key `key`, from its request log (one line each).
fn gets_of(moto: &Moto, key: &str) -> usize {
    let request = format!("\"GET /{BUCKET}/{key} HTTP/");
    moto.log_text()
        .lines()
        .filter(|line| line.contains(&request))
        .count()
}

#[test]
fn ranged_reads_of_an_object_read_before_are_one_get_and_see_it_rewritten() {
    let (moto, store) = setup("");
    let other_node = moto.store(&format!("s3://{BUCKET}"), options()).unwrap();
    store.create_namespace("ns", 1).unwrap();
    let data = pattern(1 << 20, 1);
    store.put_if_owner("ns", "sco", &data, 1).unwrap();
    let read = |offset: usize, len: usize| {
        let mut buf = vec![0u8; len];
        store
            .get_range("ns", "sco", offset as u64, &mut buf)
            .map(|()| buf)
    };
    let before = gets_of(&moto, "ns/sco");
    for i in 0..5 {
        let (offset, len) = (i * 200_000 + 7, 4096 + i);
        assert!(
            read(offset, len).unwrap() == data[offset..offset + len],
            "read {i}"
        );
    }
    assert_eq!(
        gets_of(&moto, "ns/sco") - before,
        6,
        "the header once, then one GET per read"
    );

    // Another node takes the namespace over and writes the name again: other bytes, twice as
    // long. The header this store keeps says the range is beyond the end: it asks S3 again
    // before refusing.
    other_node.claim("ns", 2).unwrap();
    let rewritten = pattern(2 << 20, 9);
    other_node.put_if_owner("ns", "sco", &rewritten, 2).unwrap();
    let beyond = (1 << 20) + 1000;
    assert!(read(beyond, 4096).unwrap() == rewritten[beyond..beyond + 4096]);
    // Written once more, with the old length: the kept header names the old ETag, so the GET is
    // refused and the header read again.
    let third = pattern(2 << 20, 77);
    other_node.put_if_owner("ns", "sco", &third, 2).unwrap();
    assert!(read(100, 5000).unwrap() == third[100..5100]);
    // Beyond the end of the object as it is now: still refused.
    assert!(matches!(
        read((2 << 20) - 10, 11),
        Err(BackendError::RangeOutOfBounds { .. })
    ));

    // Deleted by the other node: an error naming the object, not bytes from memory.
    other_node.delete_if_owner("ns", "sco", 2).unwrap();
    let err = read(100, 4096).unwrap_err();
    assert!(
        matches!(&err, BackendError::NoSuchObject { name, .. } if name == "sco"),
        "{err}"
    );
}

#[test]
fn corruption_written_behind_the_stores_back_is_detected() {
    let (_moto, store) = setup("pre");
    store.create_namespace("ns", 0).unwrap();
    let data = pattern(70_000, 9);
    store.put("ns", "obj", &data).unwrap();
    let key = "pre/ns/obj";
    let pristine = store.raw_get(key).unwrap();
    for pos in [
        0usize,
        5,
        9,
        17,
        21,
        25,
        33,
        41,
        1000,
        65_600,
        pristine.len() - 1,
    ] {
        let mut bad = pristine.clone();
        bad[pos] ^= 0x10;
        store.raw_put(key, &bad).unwrap();
        let err = store.get("ns", "obj").unwrap_err();
        assert!(
            matches!(err, BackendError::Corrupt { .. }),
            "flip at {pos}: {err}"
        );
        assert!(err.to_string().contains("ns/obj"), "{err}");
    }
    store.raw_put(key, &pristine[..pristine.len() - 1]).unwrap();
    assert!(matches!(
        store.get("ns", "obj"),
        Err(BackendError::Corrupt { .. })
    ));
    let mut buf = vec![0u8; 16];
    assert!(matches!(
        store.get_range("ns", "obj", 0, &mut buf),
        Err(BackendError::Corrupt { .. })
    ));
    store.raw_put(key, b"").unwrap();
    assert!(matches!(
        store.get("ns", "obj"),
        Err(BackendError::Corrupt { .. })
    ));
    // A damaged last chunk: ranged reads of the first chunk still work, of the last fail.
    let mut bad = pristine.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    store.raw_put(key, &bad).unwrap();
    let mut head = vec![0u8; 4096];
    store.get_range("ns", "obj", 0, &mut head).unwrap();
    assert_eq!(head, data[..4096]);
    let err = store
        .get_range("ns", "obj", (data.len() - 16) as u64, &mut buf)
        .unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
    // A corrupt owner record is reported, not taken for a missing namespace.
    store.raw_put("pre/.owners/ns", b"junk").unwrap();
    assert!(matches!(
        store.owner_tag("ns"),
        Err(BackendError::Corrupt { .. })
    ));
}

#[test]
fn missing_things_are_named_in_errors() {
    let (_moto, store) = setup("");
    let err = store.get("nope", "obj").unwrap_err();
    assert_eq!(err.to_string(), "namespace nope does not exist");
    assert!(matches!(
        store.list("nope"),
        Err(BackendError::NoSuchNamespace { .. })
    ));
    assert!(matches!(
        store.put("nope", "a", b"x"),
        Err(BackendError::NoSuchNamespace { .. })
    ));
    assert!(matches!(
        store.exists("nope", "a"),
        Err(BackendError::NoSuchNamespace { .. })
    ));
    store.create_namespace("ns", 0).unwrap();
    let err = store.get("ns", "obj").unwrap_err();
    assert_eq!(err.to_string(), "object ns/obj does not exist");
    let err = store.size("ns", "obj").unwrap_err();
    assert_eq!(err.to_string(), "object ns/obj does not exist");
    let mut buf = [0u8; 4];
    let err = store.get_range("ns", "obj", 0, &mut buf).unwrap_err();
    assert_eq!(err.to_string(), "object ns/obj does not exist");
    assert!(matches!(
        store.create_namespace("ns", 0),
        Err(BackendError::NamespaceExists { .. })
    ));
    assert!(matches!(
        store.put("ns", "../escape", b"x"),
        Err(BackendError::InvalidName { .. })
    ));
    assert!(matches!(
        store.put("ns", ".hidden", b"x"),
        Err(BackendError::InvalidName { .. })
    ));
    store.delete_if_owner("ns", "never-written", 0).unwrap();
}

#[test]
fn a_missing_bucket_fails_at_open_naming_it() {
    let moto = Moto::start();
    let err = moto
        .store("s3://no-such-bucket/p", options())
        .err()
        .expect("opening a missing bucket fails");
    assert!(matches!(err, BackendError::NoSuchBucket { .. }), "{err}");
    assert_eq!(err.to_string(), "S3 bucket no-such-bucket does not exist");
}

#[test]
fn bad_credentials_fail_at_open_naming_the_bucket() {
    // With this setting moto checks every request's credentials against its IAM users.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let err = moto
        .store(&format!("s3://{BUCKET}"), options())
        .err()
        .expect("bad credentials are refused");
    assert!(matches!(err, BackendError::S3Auth { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(BUCKET) && text.contains("credentials"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
}

#[test]
fn retries_ride_out_an_outage_and_give_up_past_the_budget() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let mut proxy = Proxy::start(moto.port());
    let env = Moto::env_for_port(proxy.port());
    let location = S3Location::parse(&format!("s3://{BUCKET}")).unwrap();
    // A budget that outlasts the outage whatever the jitter draws: each backoff is at least
    // 100 ms (decorrelated jitter between that and twice the last), so 10 retries can be
    // spent in about a second; 40 take at least 4 s, and the 20 s timeout still bounds them.
    let patient = S3Options {
        max_retries: 40,
        ..options()
    };
    let store = S3Store::open_with_env(location.clone(), patient, &env).unwrap();
    store.create_namespace("ns", 1).unwrap();
    let data = pattern(100_000, 5);

    proxy.down();
    let started = Instant::now();
    let outage = Duration::from_millis(1500);
    let writer = std::thread::spawn({
        let data = data.clone();
        move || {
            let result = store.put_if_owner("ns", "obj", &data, 1);
            (store, result, started.elapsed())
        }
    });
    // The outage itself is what is being tested: the server is away for this long.
    std::thread::sleep(outage);
    proxy.up();
    let (store, result, took) = writer.join().unwrap();
    result.expect("the put survives a 1.5 s outage");
    assert!(took >= outage, "the put waited for the server ({took:?})");
    assert_eq!(store.get("ns", "obj").unwrap(), data);

    // A budget shorter than the outage gives up, naming the bucket.
    let short = S3Options {
        retry_timeout: Duration::from_secs(1),
        max_retries: 3,
        ..options()
    };
    let impatient = S3Store::open_with_env(location, short, &env).unwrap();
    proxy.down();
    let started = Instant::now();
    let err = impatient.get("ns", "obj").unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "gave up in bounded time"
    );
    assert!(err.to_string().contains(BUCKET), "{err}");
}

#[test]
fn fencing_refuses_stale_owners() {
    let (_moto, store) = setup("");
    store.create_namespace("ns", 5).unwrap();
    assert_eq!(store.owner_tag("ns").unwrap(), 5);
    store.put_if_owner("ns", "a", b"1", 5).unwrap();
    store.put_if_owner("ns", "a", b"1 again", 5).unwrap();
    store.claim("ns", 6).unwrap();
    let err = store.put_if_owner("ns", "a", b"2", 5).unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Fenced {
                current: 6,
                presented: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.get("ns", "a").unwrap(), b"1 again");
    assert!(matches!(
        store.delete_if_owner("ns", "a", 5),
        Err(BackendError::Fenced { .. })
    ));
    assert!(matches!(
        store.put_from("ns", "b", 1, &mut &b"x"[..], 5),
        Err(BackendError::Fenced { .. })
    ));
    assert!(matches!(
        store.claim("ns", 6),
        Err(BackendError::Fenced { .. })
    ));
    assert!(matches!(
        store.claim("ns", 4),
        Err(BackendError::Fenced { .. })
    ));
    store.put_if_owner("ns", "a", b"3", 6).unwrap();
    assert_eq!(store.get("ns", "a").unwrap(), b"3");
    store.delete_if_owner("ns", "a", 6).unwrap();
    assert!(!store.exists("ns", "a").unwrap());
    assert_eq!(store.list("ns").unwrap(), Vec::<String>::new());
    assert!(matches!(
        store.claim("nope", 1),
        Err(BackendError::NoSuchNamespace { .. })
    ));
}

/// The races the owner-record check alone cannot stop: the old owner passed that check before
/// the claim and acts after it. Two stores play two nodes; each step runs to completion before
/// the next, so the interleaving is exact.
#[test]
fn an_old_owner_that_checked_before_the_claim_still_cannot_touch_new_state() {
    let (moto, old) = setup("");
    let new = moto.store(&format!("s3://{BUCKET}"), options()).unwrap();
    old.create_namespace("vol", 1).unwrap();
    old.put_if_owner("vol", "volume_config", b"config v1", 1)
        .unwrap();
    old.put_if_owner("vol", "tlogs", b"list v1", 1).unwrap();
    old.put_if_owner("vol", "sco_1", b"sco by old", 1).unwrap();
    old.put_if_owner("vol", "sco_2", b"sco by old", 1).unwrap();

    // The old owner has read the headers (and ETags) it will act on; then the claim happens.
    let seen = |name: &str| {
        let (header, etag, _) = old
            .read_header(&old.object_key("vol", name))
            .unwrap()
            .ok()
            .unwrap();
        (header.unwrap().owner, etag)
    };
    let (tag, config_etag) = seen("volume_config");
    assert_eq!(tag, 1);
    let (_, sco_etag) = seen("sco_1");
    new.claim("vol", 2).unwrap();

    // Claim re-stamped the mutable objects (payload unchanged, new tag, new ETag).
    let raw = new.raw_get("vol/volume_config").unwrap();
    let (header, payload) = format::decode(&raw).unwrap();
    assert_eq!((header.owner, &raw[payload]), (2, &b"config v1"[..]));
    let (tag, etag) = seen("tlogs");
    assert_eq!(tag, 2);
    assert_ne!(etag, config_etag);

    // The old owner's CAS with the ETag it saw before the claim fails ...
    let stale = PutMode::Update(UpdateVersion {
        e_tag: Some(config_etag),
        version: None,
    });
    let body = Bytes::from(format::encode(b"config by old", 1));
    assert!(matches!(
        old.put_raw(&old.object_key("vol", "volume_config"), body, stale)
            .unwrap(),
        Err(Fail::Changed)
    ));
    // ... and its put, past the owner check, sees the newer tag.
    let err = old
        .put_stamped("vol", "volume_config", b"config by old", 1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Fenced {
                current: 2,
                presented: 1,
                ..
            }
        ),
        "{err}"
    );
    // Through the front door it is refused at the owner record.
    let err = old
        .put_if_owner("vol", "tlogs", b"list by old", 1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Fenced {
                current: 2,
                presented: 1,
                ..
            }
        ),
        "{err}"
    );

    // The new owner rewrites an SCO with the very same payload: its ETag still changes (the tag
    // is in the bytes), so the old owner's delete with the ETag it saw fails, and its delete
    // past the owner check sees the newer tag.
    new.put_if_owner("vol", "sco_1", b"sco by old", 2).unwrap();
    assert!(!old
        .delete_if_etag(&old.object_key("vol", "sco_1"), &sco_etag)
        .unwrap());
    let name = "sco_1";
    let (header, etag, _) = old
        .read_header(&old.object_key("vol", name))
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(header.unwrap().owner, 2);
    assert!(matches!(
        old.delete_if_owner("vol", name, 1),
        Err(BackendError::Fenced { .. })
    ));
    // A new name the old owner still manages to create (an upload that passed the owner check)
    // is overwritten by the new owner's write of that name.
    old.put_stamped("vol", "sco_3", b"late sco by old", 1)
        .unwrap();
    new.put_if_owner("vol", "sco_3", b"sco by new", 2).unwrap();
    assert!(matches!(
        old.put_stamped("vol", "sco_3", b"again", 1),
        Err(BackendError::Fenced { .. })
    ));

    // Everything the new owner holds reads back unchanged.
    assert_eq!(new.get("vol", "volume_config").unwrap(), b"config v1");
    assert_eq!(new.get("vol", "tlogs").unwrap(), b"list v1");
    assert_eq!(new.get("vol", "sco_1").unwrap(), b"sco by old");
    assert_eq!(new.get("vol", "sco_3").unwrap(), b"sco by new");
    assert_eq!(new.owner_tag("vol").unwrap(), 2);
    assert!(new
        .delete_if_etag(&new.object_key("vol", name), &etag)
        .unwrap());
    assert!(!new.exists("vol", name).unwrap());
}

#[test]
fn concurrent_claims_serialise() {
    let (moto, store) = setup("");
    store.create_namespace("ns", 1).unwrap();
    store
        .put_if_owner("ns", "volume_config", b"cfg", 1)
        .unwrap();
    let other = moto.store(&format!("s3://{BUCKET}"), options()).unwrap();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let a = s.spawn(|| store.claim("ns", 7));
        let b = s.spawn(|| other.claim("ns", 8));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert!(results[1].is_ok(), "the highest tag wins: {:?}", results[1]);
    match &results[0] {
        Ok(()) => {}
        Err(BackendError::Fenced {
            current: 8,
            presented: 7,
            ..
        }) => {}
        Err(e) => panic!("unexpected claim error {e}"),
    }
    assert_eq!(store.owner_tag("ns").unwrap(), 8);
    let raw = store.raw_get("ns/volume_config").unwrap();
    assert_eq!(format::decode(&raw).unwrap().0.owner, 8);
}

/// The store is called from tokio workers too (NBD reads of evicted data): many calls from one
/// task that never yields must neither panic nor stall.
#[test]
fn blocking_calls_work_from_inside_another_runtime() {
    let (_moto, store) = setup("");
    store.create_namespace("ns", 1).unwrap();
    store.put("ns", "obj", b"payload").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(store);
    let calls = runtime.block_on({
        let store = store.clone();
        async move {
            tokio::spawn(async move {
                let mut found = 0;
                for _ in 0..300 {
                    found += u32::from(store.exists("ns", "obj").unwrap());
                }
                found
            })
            .await
            .unwrap()
        }
    });
    assert_eq!(calls, 300);
    let inner = Arc::try_unwrap(store).ok().unwrap();
    // Dropping the store (and its runtime) inside another runtime's context must not panic.
    runtime.block_on(async move { drop(inner) });
}
