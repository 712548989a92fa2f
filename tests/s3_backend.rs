//! `vstor serve --backend s3://...`: startup errors for bad S3 settings are one clear line.
//! (The node's behaviour on S3 is covered by the `_on_s3` variants of the crash, snapshot, scrub
//! and DTL failover tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

mod common;

use std::process::Command;

use common::VSTOR;
use vstor_backend::testing::Moto;

/// Run `vstor serve` on `backend` with `env`; it must fail at once. Returns its stderr.
fn serve_fails(backend: &str, env: &[(String, String)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(VSTOR)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args([
            "--backend",
            backend,
            "--api",
            "127.0.0.1:0",
            "--nbd",
            "127.0.0.1:0",
        ])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run vstor serve");
    assert!(
        !out.status.success(),
        "vstor serve --backend {backend} started"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    errors[0].to_string()
}

#[test]
fn serve_refuses_bad_s3_settings_at_startup_with_one_line() {
    let err = serve_fails("s3://No_Such", &[]);
    assert!(
        err.contains("invalid S3 location \"s3://No_Such\""),
        "{err}"
    );

    let moto = Moto::start();
    let err = serve_fails("s3://missing-bucket/vols", &moto.env());
    assert!(
        err.contains("s3://missing-bucket/vols")
            && err.contains("S3 bucket missing-bucket does not exist"),
        "{err}"
    );

    let strict = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let err = serve_fails("s3://some-bucket", &strict.env());
    assert!(
        err.contains("S3 refused the credentials for bucket some-bucket"),
        "{err}"
    );
}
