//! The backend `vstor-bench mds` writes the volume to and replays it from (`--backend`).
//!
//! A full replay fetches every TLog of the volume's history from the backend, one `get` after
//! another, while a restart from the MDS fetches only the TLogs after the table's cork. On the
//! local store (the default) a TLog fetch is a read from the page cache, so the comparison is the
//! engine's own work; on S3 each one is an HTTP round trip, which is where an MDS earns its keep.
//! `--backend s3` starts a moto server (the S3 server the tests use) on loopback for the run;
//! `--backend s3://BUCKET[/PREFIX]` uses a real endpoint from the `AWS_*` environment, as
//! `vstor serve` does.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use vstor_backend::testing::Moto;
use vstor_backend::{ObjectStore, S3Options};

/// The bucket of the moto server `--backend s3` starts.
const MOTO_BUCKET: &str = "vstor-bench";

pub(super) struct BenchStore {
    pub(super) store: Arc<dyn ObjectStore>,
    /// `vstor mds --backend` for the same store.
    pub(super) spec: OsString,
    /// Environment the `vstor mds` processes need to reach it (moto's endpoint).
    pub(super) env: Vec<(String, String)>,
    /// What the report calls it.
    pub(super) label: String,
    /// The S3 server started for the run; stopped when this is dropped.
    _moto: Option<Moto>,
}

impl BenchStore {
    /// `s3`: a moto server for the run; anything else as `vstor-bench backend --backend` takes
    /// it (`None`: a local store under `work`; a directory or `file://PATH`;
    /// `s3://BUCKET[/PREFIX]` with the `AWS_*` environment).
    pub(super) fn open(spec: Option<&str>, work: &Path) -> Result<Self> {
        match spec {
            Some("s3") => {
                // Moto panics with its log when it cannot start (a missing moto_server says
                // how to install it).
                let moto = Moto::start();
                moto.create_bucket(MOTO_BUCKET);
                let uri = format!("s3://{MOTO_BUCKET}/mds");
                let store = moto
                    .store(&uri, S3Options::default())
                    .with_context(|| format!("cannot open {uri} on moto"))?;
                Ok(Self {
                    store: Arc::new(store),
                    spec: uri.into(),
                    env: moto.env(),
                    label: format!("S3 (moto on 127.0.0.1:{})", moto.port()),
                    _moto: Some(moto),
                })
            }
            other => {
                let (store, label) = crate::backend::open_store(other, work)?;
                // `vstor mds --backend` takes a directory or an s3:// URI, as `vstor serve`.
                let spec = match other {
                    None => work.join("backend").into_os_string(),
                    Some(spec) => spec.strip_prefix("file://").unwrap_or(spec).into(),
                };
                Ok(Self {
                    store,
                    spec,
                    env: Vec::new(),
                    label,
                    _moto: None,
                })
            }
        }
    }
}
