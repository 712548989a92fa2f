//! The S3 object store: vstor on object storage an operator already runs (Ceph RGW, MinIO,
//! Garage, AWS).
//!
//! Key layout in the bucket, under an optional `PREFIX/`:
//!
//! ```text
//! PREFIX/.owners/<namespace>     the namespace's owner record (payload: owner tag, u64 LE)
//! PREFIX/<namespace>/<name>      one S3 object per store object
//! ```
//!
//! Both kinds of object use the format in [`format`] (magic, version, writer's owner tag, a
//! CRC32C per 64 KiB chunk, header CRC32C), so reads verify what they return and ranged reads
//! check only the chunks they touch. A ranged read needs the header first; the store keeps the
//! headers it read with their ETags ([`headers`]), so a read of an object read before is one GET
//! (`If-Match` on that ETag), and the first read of an object two. A namespace exists
//! iff its owner record does; names never start with '.', so `.owners` cannot clash with one.
//!
//! Client crate: `object_store` (Apache Arrow). It is small next to `aws-sdk-s3`, well kept,
//! signs with SigV4 from the standard `AWS_*` environment, retries transient failures (5xx,
//! timeouts, refused connections, never other 4xx) with exponential backoff, and supports
//! conditional PUT (`If-None-Match: *` and `If-Match`) and ranged GET, which is what fencing needs.
//! It is async: the store owns a small tokio runtime, spawns each request on it and blocks the
//! calling thread on a channel for the answer, which works from plain threads and from inside
//! another runtime's worker alike (no nested `block_on` of that runtime). It has no conditional DELETE,
//! so that one request is presigned by `object_store` and sent with `If-Match` by `reqwest` (the
//! client `object_store` already uses, so no second HTTP stack).
//!
//! # Fencing, and why it is safe on S3
//!
//! S3 has no locks and no multi-object transactions, only per-object compare-and-swap (CAS) on
//! the ETag. The rules:
//!
//! 1. **Claim** (`claim(ns, new)`) is a CAS on the owner record: read it (tag, ETag), refuse
//!    unless `new > tag`, PUT with `If-Match: ETag`. Two claimers serialise: one CAS fails and
//!    re-reads. Then claim *re-stamps* the namespace's mutable objects (the names given in
//!    [`S3Options::restamp_on_claim`]: the objects the volume layer overwrites in place, its
//!    configuration and TLog list) by a CAS rewrite carrying the new tag.
//! 2. **Every object carries its writer's tag** in its bytes, so its ETag changes whenever the
//!    tag does, even for identical payload.
//! 3. **A put by tag T** first reads the owner record and refuses unless it is T (fast refusal).
//!    Then `PUT If-None-Match: *`; if the object exists, read its header: tag > T → `Fenced`;
//!    otherwise `PUT If-Match: <its ETag>`, retrying the CAS a bounded number of times.
//! 4. **A delete by T** reads the owner record (refuse unless T), reads the object's header
//!    (refuse if its tag > T), then `DELETE If-Match: <its ETag>`.
//!
//! Why an old owner T1 cannot damage a new owner T2 (T1 < T2) once `claim(T2)` has returned:
//! every mutable object then carries T2 (rule 1), and any later write or delete of it by T1 must
//! either see T2 in its header (refused) or present an ETag read before the re-stamp, which the
//! CAS rejects; the re-stamp itself is a CAS, so a T1 write racing with it lands *before* it and
//! is seen by T2. Objects created by T2 carry T2 from the start. What T1 can still do is create a
//! *new* name (an SCO or TLog it was uploading) after the claim: such an object is garbage no
//! committed metadata of T2 refers to (the volume's commit point is the TLog list, which T1 can
//! no longer write), and T2 overwrites it if it ever writes that name (T1 ≤ T2 allows it). A T1
//! delete that passed its checks before the claim can still remove a T1-written object after it;
//! the volume layer deletes only objects its *already committed* TLog list no longer references,
//! so T2, which read that list, does not reference them either.
//!
//! Conditional DELETE: AWS S3 and moto honour `If-Match` on DELETE. A server that answers it with
//! 501 Not Implemented gets an unconditional DELETE after the header check; the window that
//! leaves (T2 rewrites the object between T1's check and T1's DELETE) is closed by the same
//! commit-point argument: T1 deletes only names it has itself dropped from a committed list.
//!
//! Large objects (SCOs) are buffered in memory for the PUT: the header in front needs every
//! chunk's CRC, and a single PUT is the only upload S3 makes conditional everywhere.

mod format;
mod headers;
mod outage;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _,
    PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use crate::{validate_name, BackendError, ChunkSpan, ObjectStore, OwnerTag, Result};
use format::{Header, HEADER_LEN};
use headers::{Cached, HeaderCache};
use outage::{Answer, Change, OutageWatch, SLOW_AFTER};

const OWNERS_DIR: &str = ".owners";
/// Bound on compare-and-swap rounds lost to concurrent writers before giving up.
const MAX_CAS_ROUNDS: usize = 16;
/// How much of an object the first GET of a ranged read fetches: the header and the CRC table
/// of up to 64 MiB of payload, so one request covers every SCO's header.
const HEADER_PREFETCH: u64 = HEADER_LEN + 4096;

/// Where a store lives: `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing '/', possibly empty.
    pub prefix: String,
}

impl S3Location {
    /// Parse `s3://BUCKET[/PREFIX]`.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |reason: &'static str| BackendError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-.@".contains(&b))
        {
            return Err(bad(
                "the prefix may hold only letters, digits, '/', '_', '-', '.' and '@'",
            ));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            p => write!(f, "s3://{}/{p}", self.bucket),
        }
    }
}

/// Tunables of an [`S3Store`].
///
/// Why the default budget is bound by time and not by count: `object_store` backs off with
/// decorrelated jitter (each wait drawn between 100 ms and twice the last, at most 5 s here), so
/// a count of retries lasts anywhere from about a second to half a minute. A short outage (an
/// S3 gateway restarting, a load balancer failing over) would fail reads of evicted data with
/// EIO after as little as a second. With a count that is never reached first, every request
/// rides out an outage for `retry_timeout` and then fails, the same length every time.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Give up retrying a request after this long.
    pub retry_timeout: Duration,
    /// Give up after this many retries of one request, if `retry_timeout` has not ended them
    /// first.
    pub max_retries: usize,
    /// Names of objects overwritten in place, re-stamped with the new tag by `claim`.
    pub restamp_on_claim: Vec<String>,
    /// How long the bucket check at open is retried (at most `retry_timeout`). Shorter than the
    /// data path's budget: that one keeps a running guest's reads alive through an outage, but
    /// a node started against an endpoint that does not answer (a wrong address, a server not
    /// up yet) should say so soon, and a supervisor restarts it anyway.
    pub open_check_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            // What a guest waits at most on one read of evicted data during an outage: the
            // same as the edge's default pause bound, so a guest sees one bound either way.
            retry_timeout: Duration::from_secs(30),
            // More than the timeout lets through (at least 100 ms each): the timeout binds.
            max_retries: 10_000,
            restamp_on_claim: Vec::new(),
            open_check_timeout: Duration::from_secs(10),
        }
    }
}

/// An [`ObjectStore`] on an S3 bucket.
pub struct S3Store {
    location: S3Location,
    /// `PREFIX/` or empty.
    key_prefix: String,
    s3: Arc<AmazonS3>,
    http: reqwest::Client,
    options: S3Options,
    /// `Some` until drop, which shuts it down without blocking (dropping a runtime inside
    /// another runtime's context would panic).
    runtime: Option<tokio::runtime::Runtime>,
    /// Whether S3 stopped answering ([`outage`]); locked only to update it, never across a
    /// request.
    outage: std::sync::Mutex<OutageWatch>,
    /// Headers of objects read by range, with their ETags ([`headers`]).
    headers: HeaderCache,
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What went wrong with one S3 request, before it is given its context.
enum Fail {
    NotFound,
    /// `If-None-Match: *` found an object.
    Exists,
    /// `If-Match` found another ETag.
    Changed,
    Other(BackendError),
}

impl S3Store {
    /// Open a store with endpoint, region and credentials from the standard environment
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...;
    /// path-style addressing when an endpoint is given). Checks that the bucket exists and the
    /// credentials are accepted, so a misconfigured server fails at startup.
    pub fn open(location: S3Location, options: S3Options) -> Result<Self> {
        Self::open_from(location, options, None)
    }

    /// As [`open`](Self::open), with the `AWS_*` settings taken from `vars` instead of the
    /// process environment (tests run several servers in one process).
    pub fn open_with_env(
        location: S3Location,
        options: S3Options,
        vars: &[(String, String)],
    ) -> Result<Self> {
        Self::open_from(location, options, Some(vars))
    }

    fn open_from(
        location: S3Location,
        options: S3Options,
        vars: Option<&[(String, String)]>,
    ) -> Result<Self> {
        let bucket = location.bucket.clone();
        let config_err = |e: object_store::Error| BackendError::S3Config {
            bucket: bucket.clone(),
            reason: e.to_string(),
        };
        let var = |name: &str| match vars {
            Some(vars) => vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            None => std::env::var(name).ok(),
        };
        let endpoint = var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT"));
        let region_set = var("AWS_REGION").is_some() || var("AWS_DEFAULT_REGION").is_some();
        let mut builder = match vars {
            None => AmazonS3Builder::from_env(),
            Some(vars) => vars.iter().fold(AmazonS3Builder::new(), |b, (k, v)| {
                match k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    Ok(key) => b.with_config(key, v),
                    Err(_) => b,
                }
            }),
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: options.max_retries,
            retry_timeout: options.retry_timeout,
        };
        builder = builder
            .with_bucket_name(&location.bucket)
            .with_retry(retry.clone())
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(
                        endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    )
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60)),
            );
        if !region_set {
            builder = builder.with_region("us-east-1");
        }
        if let Some(endpoint) = &endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        // The bucket check gets its own client, the same but for a shorter retry budget
        // (`S3Options::open_check_timeout`); its errors still name the cause (refused, timed
        // out, DNS) as the data path's do.
        let check = builder
            .clone()
            .with_retry(RetryConfig {
                retry_timeout: options.open_check_timeout.min(options.retry_timeout),
                ..retry
            })
            .build()
            .map_err(config_err)?;
        let s3 = Arc::new(builder.build().map_err(config_err)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vstor-s3")
            .enable_all()
            .build()
            .map_err(|e| BackendError::S3Config {
                bucket: bucket.clone(),
                reason: format!("cannot start the S3 client runtime: {e}"),
            })?;
        let key_prefix = match location.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let store = Self {
            location,
            key_prefix,
            s3,
            http: reqwest::Client::new(),
            options,
            runtime: Some(runtime),
            outage: std::sync::Mutex::default(),
            headers: HeaderCache::new(headers::DEFAULT_CAPACITY),
        };
        store.check_bucket(check)?;
        Ok(store)
    }

    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// The raw bytes of the object at bucket key `key` (tests: to look behind the format).
    #[cfg(any(test, feature = "testing"))]
    pub fn raw_get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_raw(key, None, None)?
            .map(|(bytes, _, _)| bytes.to_vec())
            .map_err(|fail| self.error("?", key, fail))
    }

    /// Overwrite the object at bucket key `key` with raw bytes (tests: to corrupt objects).
    #[cfg(any(test, feature = "testing"))]
    pub fn raw_put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put_raw(key, Bytes::copy_from_slice(bytes), PutMode::Overwrite)?
            .map_err(|fail| self.error("?", key, fail))
    }

    /// One LIST at open, through `s3` (the client with the open check's budget): a missing
    /// bucket, refused credentials or an endpoint that does not answer fail here, by name.
    fn check_bucket(&self, s3: AmazonS3) -> Result<()> {
        let prefix = self.path(&format!("{}{OWNERS_DIR}", self.key_prefix))?;
        let listed = self.run(
            0,
            async move { s3.list_with_delimiter(Some(&prefix)).await },
        )?;
        listed.map(|_| ()).map_err(|e| match self.fail(e) {
            Fail::Other(e) => e,
            _ => BackendError::NoSuchBucket {
                bucket: self.location.bucket.clone(),
            },
        })
    }

    /// Run one request of the S3 client, which moves about `bytes` of payload (its
    /// [`outage::patience`]), watching for an outage meanwhile.
    fn run<T: Answer + Send + 'static>(
        &self,
        bytes: u64,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let runtime = self.runtime.as_ref().ok_or_else(|| BackendError::S3 {
            bucket: self.location.bucket.clone(),
            key: String::new(),
            reason: "the S3 client runtime is shut down".into(),
        })?;
        // A std channel rather than blocking on the JoinHandle: polling a tokio JoinHandle from a
        // thread of another runtime draws on that runtime's cooperative budget, which a task
        // that blocks here many times without yielding would exhaust (then it never completes).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let started = Instant::now();
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        let ended = || BackendError::S3 {
            bucket: self.location.bucket.clone(),
            key: String::new(),
            reason: "the S3 request task ended without an answer".into(),
        };
        let patience = outage::patience(bytes);
        let answer = match rx.recv_timeout(patience) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let change = self.watch().no_answer(started);
                self.say(change);
                rx.recv().map_err(|_| ended())?
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(ended()),
        };
        let change = self.watch().finished(
            started.elapsed(),
            patience,
            answer.reached_server(),
            Instant::now(),
        );
        self.say(change);
        Ok(answer)
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, OutageWatch> {
        self.outage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Log an outage's start or end ([`outage`]), once each.
    fn say(&self, change: Option<Change>) {
        let bucket = &self.location.bucket;
        match change {
            Some(Change::Began) => tracing::warn!(
                %bucket,
                retry_timeout_s = self.options.retry_timeout.as_secs_f64(),
                "S3 is not answering: a request has had no answer for {} s (plus 1 s per {} MB it carries); each request is retried for up to the retry timeout before it fails",
                SLOW_AFTER.as_secs(),
                outage::SLOW_RATE / 1_000_000
            ),
            Some(Change::Ended { lasted }) => tracing::warn!(
                %bucket,
                lasted_ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
                "S3 answers again"
            ),
            None => {}
        }
    }

    fn path(&self, key: &str) -> Result<Path> {
        Path::parse(key).map_err(|e| BackendError::S3 {
            bucket: self.location.bucket.clone(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    fn object_key(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.key_prefix)
    }

    fn owner_key(&self, namespace: &str) -> String {
        format!("{}{OWNERS_DIR}/{namespace}", self.key_prefix)
    }

    /// Classify an `object_store` error; everything that is not a CAS outcome gets the bucket
    /// (and for missing buckets or refused credentials, a dedicated variant).
    fn fail(&self, e: object_store::Error) -> Fail {
        let text = summarize(&e.to_string());
        let bucket = self.location.bucket.clone();
        if text.contains("NoSuchBucket") {
            return Fail::Other(BackendError::NoSuchBucket { bucket });
        }
        match e {
            object_store::Error::NotFound { .. } => Fail::NotFound,
            object_store::Error::AlreadyExists { .. } => Fail::Exists,
            object_store::Error::Precondition { .. } => Fail::Changed,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => Fail::Other(BackendError::S3Auth {
                bucket,
                reason: text,
            }),
            _ if [
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403 Forbidden",
            ]
            .iter()
            .any(|s| text.contains(s)) =>
            {
                Fail::Other(BackendError::S3Auth {
                    bucket,
                    reason: text,
                })
            }
            other => Fail::Other(BackendError::S3 {
                bucket,
                key: String::new(),
                reason: other.to_string(),
            }),
        }
    }

    /// Turn a failure into the error a caller sees, naming the object.
    fn error(&self, namespace: &str, name: &str, fail: Fail) -> BackendError {
        match fail {
            Fail::NotFound => match self.namespace_exists(namespace) {
                Ok(false) => BackendError::NoSuchNamespace {
                    namespace: namespace.to_string(),
                },
                Ok(true) => BackendError::NoSuchObject {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                },
                Err(e) => e,
            },
            Fail::Exists | Fail::Changed => BackendError::S3 {
                bucket: self.location.bucket.clone(),
                key: self.object_key(namespace, name),
                reason: format!("gave up after {MAX_CAS_ROUNDS} rounds lost to concurrent writers"),
            },
            Fail::Other(BackendError::S3 { bucket, reason, .. }) => BackendError::S3 {
                bucket,
                key: self.object_key(namespace, name),
                reason,
            },
            Fail::Other(e) => e,
        }
    }

    fn corrupt(namespace: &str, name: &str, reason: String) -> BackendError {
        BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason,
        }
    }

    // ---- single requests ------------------------------------------------------------------

    /// GET (a range of) a key, optionally only if its ETag still matches. Returns the bytes, the
    /// ETag and the object's full size.
    fn get_raw(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<String>,
    ) -> Result<std::result::Result<(Bytes, String, u64), Fail>> {
        let path = self.path(key)?;
        let s3 = self.s3.clone();
        let bytes = range.as_ref().map_or(0, |r| r.end.saturating_sub(r.start));
        let got = self.run(bytes, async move {
            let options = GetOptions {
                range: range.map(GetRange::Bounded),
                if_match,
                ..GetOptions::default()
            };
            let result = s3.get_opts(&path, options).await?;
            let meta = result.meta.clone();
            let bytes = result.bytes().await?;
            Ok::<_, object_store::Error>((bytes, meta))
        })?;
        Ok(match got {
            Ok((bytes, meta)) => Ok((bytes, meta.e_tag.unwrap_or_default(), meta.size)),
            Err(e) => Err(self.fail(e)),
        })
    }

    fn put_raw(
        &self,
        key: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<std::result::Result<(), Fail>> {
        let path = self.path(key)?;
        self.headers.forget(key);
        let s3 = self.s3.clone();
        let put = self.run(body.len() as u64, async move {
            s3.put_opts(&path, PutPayload::from(body), PutOptions::from(mode))
                .await
        })?;
        Ok(put.map(|_| ()).map_err(|e| self.fail(e)))
    }

    /// Every key under `prefix` (which ends in '/').
    fn list_keys(&self, prefix: &str) -> Result<std::result::Result<Vec<String>, Fail>> {
        let path = self.path(prefix.trim_end_matches('/'))?;
        let s3 = self.s3.clone();
        let listed = self.run(0, async move {
            s3.list(Some(&path))
                .map_ok(|meta| meta.location.to_string())
                .try_collect::<Vec<_>>()
                .await
        })?;
        Ok(listed.map_err(|e| self.fail(e)))
    }

    fn delete_keys(&self, keys: Vec<String>) -> Result<std::result::Result<(), Fail>> {
        for key in &keys {
            self.headers.forget(key);
        }
        let paths = keys
            .iter()
            .map(|k| self.path(k))
            .collect::<Result<Vec<_>>>()?;
        let s3 = self.s3.clone();
        let deleted = self.run(0, async move {
            let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
            s3.delete_stream(stream).try_collect::<Vec<_>>().await
        })?;
        Ok(match deleted.map_err(|e| self.fail(e)) {
            Ok(_) | Err(Fail::NotFound) => Ok(()),
            Err(e) => Err(e),
        })
    }

    /// DELETE with `If-Match`, retried with backoff on transient failures. `Ok(true)` when
    /// deleted (or already gone), `Ok(false)` when the ETag no longer matched.
    fn delete_if_etag(&self, key: &str, etag: &str) -> Result<bool> {
        let path = self.path(key)?;
        self.headers.forget(key);
        let s3 = self.s3.clone();
        let http = self.http.clone();
        let etag = etag.to_string();
        let deadline = Instant::now() + self.options.retry_timeout;
        let max_retries = self.options.max_retries;
        let outcome = self.run(0, async move {
            let mut backoff = Duration::from_millis(100);
            let mut retries = 0;
            loop {
                let url = s3
                    .signed_url(reqwest::Method::DELETE, &path, Duration::from_secs(300))
                    .await
                    .map_err(|e| e.to_string())?;
                let sent = http
                    .delete(url.as_str())
                    .header("If-Match", etag.as_str())
                    .send()
                    .await;
                let transient = match sent {
                    Ok(r) if r.status().is_success() || r.status() == 404 => return Ok(true),
                    Ok(r) if r.status() == 412 => return Ok(false),
                    Ok(r) if r.status() == 501 => {
                        // No conditional DELETE on this server: see the module docs.
                        tracing::warn!(%path, "server ignores If-Match on DELETE; deleting unconditionally");
                        s3.delete(&path).await.map_err(|e| e.to_string())?;
                        return Ok(true);
                    }
                    Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                        format!("status {}", r.status())
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        return Err(format!("DELETE answered {status}: {body}"));
                    }
                    Err(e) if e.is_connect() || e.is_timeout() => e.to_string(),
                    Err(e) => return Err(e.to_string()),
                };
                if retries >= max_retries || Instant::now() + backoff > deadline {
                    return Err(format!("giving up after {retries} retries: {transient}"));
                }
                retries += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })?;
        outcome.map_err(|reason| BackendError::S3 {
            bucket: self.location.bucket.clone(),
            key: key.to_string(),
            reason,
        })
    }

    // ---- object-level helpers -------------------------------------------------------------

    /// Read the header of `key` (object `name` of `namespace`) from S3 and keep it in the
    /// header cache for the next ranged read.
    fn fresh_header(&self, namespace: &str, name: &str, key: &str) -> Result<Cached> {
        let (header, etag, _) = self
            .read_header(key)?
            .map_err(|fail| self.error(namespace, name, fail))?;
        let header = header.map_err(|reason| Self::corrupt(namespace, name, reason))?;
        Ok(self.headers.insert(key, header, etag))
    }

    /// Read an object's header: `(decoded header or why not, ETag, object size)`.
    #[allow(clippy::type_complexity)]
    fn read_header(
        &self,
        key: &str,
    ) -> Result<std::result::Result<(std::result::Result<Header, String>, String, u64), Fail>> {
        let (mut bytes, etag, size) = match self.get_raw(key, Some(0..HEADER_PREFETCH), None)? {
            Ok(got) => got,
            Err(Fail::Other(e)) => {
                // An empty object has no byte to range over (416): that is corruption here.
                let path = self.path(key)?;
                let s3 = self.s3.clone();
                return Ok(match self.run(0, async move { s3.head(&path).await })? {
                    Ok(meta) if meta.size < HEADER_LEN => Ok((
                        Err("shorter than its header".into()),
                        meta.e_tag.unwrap_or_default(),
                        meta.size,
                    )),
                    _ => Err(Fail::Other(e)),
                });
            }
            Err(fail) => return Ok(Err(fail)),
        };
        let needed = match format::table_len(&bytes) {
            Ok(table) => HEADER_LEN + table,
            Err(reason) => return Ok(Ok((Err(reason), etag, size))),
        };
        if (bytes.len() as u64) < needed && size >= needed {
            // A table larger than the prefetch (objects over 64 MiB): fetch the rest of it.
            match self.get_raw(key, Some(bytes.len() as u64..needed), Some(etag.clone()))? {
                Ok((rest, _, _)) => {
                    let mut all = bytes.to_vec();
                    all.extend_from_slice(&rest);
                    bytes = Bytes::from(all);
                }
                Err(fail) => return Ok(Err(fail)),
            }
        }
        let header = format::decode_header(&bytes).and_then(|h| {
            if h.object_len() == size {
                Ok(h)
            } else {
                Err(format!(
                    "object is {size} bytes, header promises {}",
                    h.object_len()
                ))
            }
        });
        Ok(Ok((header, etag, size)))
    }

    /// The namespace's owner tag and the owner record's ETag.
    fn owner_record(&self, namespace: &str) -> Result<(OwnerTag, String)> {
        validate_name(namespace)?;
        let key = self.owner_key(namespace);
        match self.get_raw(&key, None, None)? {
            Ok((bytes, etag, _)) => {
                let (_, payload) = format::decode(&bytes)
                    .map_err(|reason| Self::corrupt(namespace, OWNERS_DIR, reason))?;
                let payload = &bytes[payload];
                let tag: [u8; 8] = payload.try_into().map_err(|_| {
                    Self::corrupt(namespace, OWNERS_DIR, "owner record is not 8 bytes".into())
                })?;
                Ok((u64::from_le_bytes(tag), etag))
            }
            Err(Fail::NotFound) => Err(BackendError::NoSuchNamespace {
                namespace: namespace.to_string(),
            }),
            Err(fail) => Err(self.error(namespace, OWNERS_DIR, fail)),
        }
    }

    fn require_owner(&self, namespace: &str, owner: OwnerTag) -> Result<()> {
        let (current, _) = self.owner_record(namespace)?;
        if current != owner {
            return Err(BackendError::Fenced {
                namespace: namespace.to_string(),
                current,
                presented: owner,
            });
        }
        Ok(())
    }

    /// Rules 2 and 3 of the module docs: create, or CAS-overwrite an object whose writer's tag
    /// is not newer than `owner`.
    fn put_stamped(&self, namespace: &str, name: &str, data: &[u8], owner: OwnerTag) -> Result<()> {
        let key = self.object_key(namespace, name);
        let body = Bytes::from(format::encode(data, owner));
        let mut last = Fail::Exists;
        for _ in 0..MAX_CAS_ROUNDS {
            match self.put_raw(&key, body.clone(), PutMode::Create)? {
                Ok(()) => return Ok(()),
                Err(Fail::Exists) => {}
                Err(fail) => return Err(self.error(namespace, name, fail)),
            }
            let (header, etag, _) = match self.read_header(&key)? {
                Ok(found) => found,
                Err(Fail::NotFound) => continue,
                Err(fail) => return Err(self.error(namespace, name, fail)),
            };
            // An unreadable header belongs to no owner: the CAS below may replace it.
            if let Ok(header) = header {
                if header.owner > owner {
                    return Err(BackendError::Fenced {
                        namespace: namespace.to_string(),
                        current: header.owner,
                        presented: owner,
                    });
                }
            }
            let update = PutMode::Update(UpdateVersion {
                e_tag: Some(etag),
                version: None,
            });
            match self.put_raw(&key, body.clone(), update)? {
                Ok(()) => return Ok(()),
                Err(fail @ (Fail::Changed | Fail::NotFound)) => last = fail,
                Err(fail) => return Err(self.error(namespace, name, fail)),
            }
        }
        Err(self.error(namespace, name, last))
    }

    /// Claim step 2: give `name` the tag `owner` by a CAS rewrite, unless missing or newer.
    fn restamp(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()> {
        let key = self.object_key(namespace, name);
        for _ in 0..MAX_CAS_ROUNDS {
            let (bytes, etag, _) = match self.get_raw(&key, None, None)? {
                Ok(got) => got,
                Err(Fail::NotFound) => return Ok(()),
                Err(fail) => return Err(self.error(namespace, name, fail)),
            };
            let (header, _) =
                format::decode(&bytes).map_err(|reason| Self::corrupt(namespace, name, reason))?;
            if header.owner >= owner {
                return Ok(());
            }
            let mut object = bytes.to_vec();
            format::restamp(&mut object, owner);
            let update = PutMode::Update(UpdateVersion {
                e_tag: Some(etag),
                version: None,
            });
            match self.put_raw(&key, Bytes::from(object), update)? {
                Ok(()) => return Ok(()),
                Err(Fail::Changed | Fail::NotFound) => continue,
                Err(fail) => return Err(self.error(namespace, name, fail)),
            }
        }
        Err(self.error(namespace, name, Fail::Changed))
    }

    /// Delete every key under `namespace/`.
    fn delete_objects_of(&self, namespace: &str) -> Result<()> {
        let prefix = format!("{}{namespace}/", self.key_prefix);
        let keys = self
            .list_keys(&prefix)?
            .map_err(|fail| self.error(namespace, "*", fail))?;
        if keys.is_empty() {
            return Ok(());
        }
        self.delete_keys(keys)?
            .map_err(|fail| self.error(namespace, "*", fail))
    }
}

/// One line from an error text that may hold an S3 XML error body: the S3 error code and
/// message when present, else the text with whitespace collapsed, cut at 300 characters.
fn summarize(text: &str) -> String {
    let between = |open: &str, close: &str| {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].trim().to_string())
    };
    let mut line = match (
        between("<Code>", "</Code>"),
        between("<Message>", "</Message>"),
    ) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => text.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    if let Some((cut, _)) = line.char_indices().nth(300) {
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

impl ObjectStore for S3Store {
    fn create_namespace(&self, namespace: &str, owner: OwnerTag) -> Result<()> {
        validate_name(namespace)?;
        if self.namespace_exists(namespace)? {
            return Err(BackendError::NamespaceExists {
                namespace: namespace.to_string(),
            });
        }
        // Leftovers of an interrupted delete_namespace (the owner record goes first).
        self.delete_objects_of(namespace)?;
        let record = Bytes::from(format::encode(&owner.to_le_bytes(), owner));
        match self.put_raw(&self.owner_key(namespace), record, PutMode::Create)? {
            Ok(()) => Ok(()),
            Err(Fail::Exists) => Err(BackendError::NamespaceExists {
                namespace: namespace.to_string(),
            }),
            Err(fail) => Err(self.error(namespace, OWNERS_DIR, fail)),
        }
    }

    fn delete_namespace(&self, namespace: &str) -> Result<()> {
        self.owner_record(namespace)?;
        // The owner record first: the namespace disappears at once even if deleting its objects
        // is interrupted; create_namespace clears such leftovers.
        self.delete_keys(vec![self.owner_key(namespace)])?
            .map_err(|fail| self.error(namespace, OWNERS_DIR, fail))?;
        self.delete_objects_of(namespace)
    }

    fn namespace_exists(&self, namespace: &str) -> Result<bool> {
        match self.owner_record(namespace) {
            Ok(_) => Ok(true),
            Err(BackendError::NoSuchNamespace { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list_namespaces(&self) -> Result<Vec<String>> {
        let prefix = format!("{}{OWNERS_DIR}/", self.key_prefix);
        let keys = self
            .list_keys(&prefix)?
            .map_err(|fail| self.error(OWNERS_DIR, "*", fail))?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    fn owner_tag(&self, namespace: &str) -> Result<OwnerTag> {
        Ok(self.owner_record(namespace)?.0)
    }

    fn claim(&self, namespace: &str, new: OwnerTag) -> Result<()> {
        let key = self.owner_key(namespace);
        let mut claimed = false;
        for _ in 0..MAX_CAS_ROUNDS {
            let (current, etag) = self.owner_record(namespace)?;
            if new <= current {
                return Err(BackendError::Fenced {
                    namespace: namespace.to_string(),
                    current,
                    presented: new,
                });
            }
            let record = Bytes::from(format::encode(&new.to_le_bytes(), new));
            let update = PutMode::Update(UpdateVersion {
                e_tag: Some(etag),
                version: None,
            });
            match self.put_raw(&key, record, update)? {
                Ok(()) => {
                    claimed = true;
                    break;
                }
                Err(Fail::Changed) => continue,
                Err(Fail::NotFound) => {
                    return Err(BackendError::NoSuchNamespace {
                        namespace: namespace.to_string(),
                    })
                }
                Err(fail) => return Err(self.error(namespace, OWNERS_DIR, fail)),
            }
        }
        if !claimed {
            return Err(self.error(namespace, OWNERS_DIR, Fail::Changed));
        }
        for name in &self.options.restamp_on_claim {
            self.restamp(namespace, name, new)?;
        }
        Ok(())
    }

    fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()> {
        validate_name(name)?;
        let (owner, _) = self.owner_record(namespace)?;
        let body = Bytes::from(format::encode(data, owner));
        self.put_raw(&self.object_key(namespace, name), body, PutMode::Overwrite)?
            .map_err(|fail| self.error(namespace, name, fail))
    }

    fn put_if_owner(
        &self,
        namespace: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> Result<()> {
        validate_name(name)?;
        self.require_owner(namespace, owner)?;
        self.put_stamped(namespace, name, data, owner)
    }

    fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>> {
        validate_name(namespace)?;
        validate_name(name)?;
        let key = self.object_key(namespace, name);
        let (bytes, _, _) = self
            .get_raw(&key, None, None)?
            .map_err(|fail| self.error(namespace, name, fail))?;
        let (_, payload) =
            format::decode(&bytes).map_err(|reason| Self::corrupt(namespace, name, reason))?;
        Ok(bytes[payload].to_vec())
    }

    fn get_range(&self, namespace: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        validate_name(namespace)?;
        validate_name(name)?;
        let key = self.object_key(namespace, name);
        let mut last = Fail::Changed;
        // A cached header is trusted only as far as `If-Match` proves it current (`headers`).
        let mut use_cache = true;
        for _ in 0..MAX_CAS_ROUNDS {
            let (cached, from_cache) = match self.headers.get(&key).filter(|_| use_cache) {
                Some(cached) => (cached, true),
                None => (self.fresh_header(namespace, name, &key)?, false),
            };
            let Cached { header, etag } = cached;
            let len = buf.len() as u64;
            let span = ChunkSpan::of(
                namespace,
                name,
                offset,
                len,
                header.payload_len,
                u64::from(header.chunk_size),
            );
            let Some(ChunkSpan {
                first,
                start: span_start,
                end: span_end,
            }) = (match span {
                // Beyond the end of the object as it was: ask the object as it is.
                Err(_) if from_cache => {
                    self.headers.forget(&key);
                    use_cache = false;
                    continue;
                }
                span => span?,
            })
            else {
                return Ok(());
            };
            let base = header.payload_start();
            // If-Match: the span must come from the object the header was read from.
            let range = Some(base + span_start..base + span_end);
            let span = match self.get_raw(&key, range, Some(etag.to_string()))? {
                Ok((span, _, _)) => span,
                Err(fail @ (Fail::Changed | Fail::NotFound)) => {
                    self.headers.forget(&key);
                    use_cache = false;
                    last = fail;
                    continue;
                }
                Err(fail) => return Err(self.error(namespace, name, fail)),
            };
            if span.len() as u64 != span_end - span_start {
                return Err(Self::corrupt(namespace, name, "short ranged read".into()));
            }
            format::verify_chunks(&header, first as usize, &span)
                .map_err(|reason| Self::corrupt(namespace, name, reason))?;
            let skip = (offset - span_start) as usize;
            buf.copy_from_slice(&span[skip..skip + len as usize]);
            return Ok(());
        }
        Err(self.error(namespace, name, last))
    }

    /// A GET costs a round trip of milliseconds (tens on a WAN): 128 KiB more payload is
    /// about a millisecond at 1 Gbit/s, so reading across it is the cheaper way.
    fn read_gap(&self) -> u64 {
        128 * 1024
    }

    fn size(&self, namespace: &str, name: &str) -> Result<u64> {
        validate_name(namespace)?;
        validate_name(name)?;
        let (header, _, _) = self
            .read_header(&self.object_key(namespace, name))?
            .map_err(|fail| self.error(namespace, name, fail))?;
        header
            .map(|h| h.payload_len)
            .map_err(|reason| Self::corrupt(namespace, name, reason))
    }

    fn exists(&self, namespace: &str, name: &str) -> Result<bool> {
        validate_name(namespace)?;
        validate_name(name)?;
        let path = self.path(&self.object_key(namespace, name))?;
        let s3 = self.s3.clone();
        match self.run(0, async move { s3.head(&path).await })? {
            Ok(_) => Ok(true),
            Err(e) => match self.fail(e) {
                Fail::NotFound => match self.error(namespace, name, Fail::NotFound) {
                    BackendError::NoSuchObject { .. } => Ok(false),
                    e => Err(e),
                },
                fail => Err(self.error(namespace, name, fail)),
            },
        }
    }

    fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        validate_name(name)?;
        self.owner_record(namespace)?;
        self.delete_keys(vec![self.object_key(namespace, name)])?
            .map_err(|fail| self.error(namespace, name, fail))
    }

    fn delete_if_owner(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()> {
        validate_name(name)?;
        self.require_owner(namespace, owner)?;
        let key = self.object_key(namespace, name);
        for _ in 0..MAX_CAS_ROUNDS {
            let (header, etag, _) = match self.read_header(&key)? {
                Ok(found) => found,
                Err(Fail::NotFound) => return Ok(()),
                Err(fail) => return Err(self.error(namespace, name, fail)),
            };
            if let Ok(header) = header {
                if header.owner > owner {
                    return Err(BackendError::Fenced {
                        namespace: namespace.to_string(),
                        current: header.owner,
                        presented: owner,
                    });
                }
            }
            if self.delete_if_etag(&key, &etag)? {
                return Ok(());
            }
        }
        Err(self.error(namespace, name, Fail::Changed))
    }

    fn list(&self, namespace: &str) -> Result<Vec<String>> {
        self.owner_record(namespace)?;
        let prefix = format!("{}{namespace}/", self.key_prefix);
        let keys = self
            .list_keys(&prefix)?
            .map_err(|fail| self.error(namespace, "*", fail))?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|n| !n.starts_with('.') && !n.contains('/'))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }
}
