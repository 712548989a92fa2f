//! Test doubles for the edge protocol: a volume's owner facts held in atomics
//! ([`MemServedState`]), a name → served volume table ([`MemExports`]) and a resolver whose answer
//! a test switches ([`StaticResolver`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_stream::wrappers::ReceiverStream;

use super::lock;
use crate::remote::proto::AllowList;
use crate::remote::{
    Endpoint, Handoff, Opening, OpeningFuture, RemoteExports, ResolveFuture, Resolver, ServedState,
    ServedVolume, WatchFuture,
};
use crate::target::BlockTarget;

/// Owner facts a test can change while connections are open.
pub struct MemServedState {
    tag: AtomicU64,
    dtl_in_sync: AtomicBool,
    alive: AtomicBool,
    fenced: Mutex<Option<String>>,
    access: Mutex<AllowList>,
    handoff: Mutex<Handoff>,
    handoff_checks: AtomicUsize,
}

impl MemServedState {
    /// Served under `tag`, DTL in sync, alive, not fenced.
    pub fn new(tag: u64) -> Arc<Self> {
        Arc::new(Self {
            tag: AtomicU64::new(tag),
            dtl_in_sync: AtomicBool::new(true),
            alive: AtomicBool::new(true),
            fenced: Mutex::new(None),
            access: Mutex::new(AllowList::default()),
            handoff: Mutex::new(Handoff::None),
            handoff_checks: AtomicUsize::new(0),
        })
    }
    pub fn set_tag(&self, tag: u64) {
        self.tag.store(tag, Ordering::SeqCst);
    }
    pub fn set_dtl_in_sync(&self, in_sync: bool) {
        self.dtl_in_sync.store(in_sync, Ordering::SeqCst);
    }
    pub fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::SeqCst);
    }
    pub fn set_fenced(&self, reason: Option<&str>) {
        *lock(&self.fenced) = reason.map(str::to_owned);
    }
    pub fn set_access(&self, access: AllowList) {
        *lock(&self.access) = access;
    }
    /// A hand-off's stage; with [`Handoff::Releasing`] or [`Handoff::Released`] also call
    /// `set_alive(false)`, as a node does (its volume is not served while it is handed over).
    pub fn set_handoff(&self, handoff: Handoff) {
        *lock(&self.handoff) = handoff;
    }
    /// How often a server asked for the hand-off's stage (it asks when a request finds the
    /// volume not served): a test's proof that a request reached the owner check.
    pub fn handoff_checks(&self) -> usize {
        self.handoff_checks.load(Ordering::SeqCst)
    }
}

impl ServedState for MemServedState {
    fn tag(&self) -> u64 {
        self.tag.load(Ordering::SeqCst)
    }
    fn dtl_in_sync(&self) -> bool {
        self.dtl_in_sync.load(Ordering::SeqCst)
    }
    fn fenced(&self) -> Option<String> {
        lock(&self.fenced).clone()
    }
    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
    fn access(&self) -> AllowList {
        lock(&self.access).clone()
    }
    fn handoff(&self) -> Handoff {
        self.handoff_checks.fetch_add(1, Ordering::SeqCst);
        *lock(&self.handoff)
    }
}

/// The volumes one test "node" serves.
#[derive(Default)]
pub struct MemExports {
    volumes: Mutex<BTreeMap<String, ServedVolume>>,
    opening: Arc<Opening>,
    waits: AtomicUsize,
}

impl MemExports {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn insert(&self, name: &str, target: Arc<dyn BlockTarget>, state: Arc<MemServedState>) {
        lock(&self.volumes).insert(name.to_owned(), ServedVolume { target, state });
    }
    pub fn remove(&self, name: &str) -> bool {
        lock(&self.volumes).remove(name).is_some()
    }
    /// This "node" starts opening `name` (as an adoption does): handshakes for it wait.
    pub fn begin_opening(&self, name: &str) {
        self.opening.begin(name);
    }
    /// Opening `name` ended; insert it first to have it served.
    pub fn end_opening(&self, name: &str) {
        self.opening.end(name);
    }
    /// How many handshakes found a volume being opened (and waited).
    pub fn opening_waits(&self) -> usize {
        self.waits.load(Ordering::SeqCst)
    }
}

impl RemoteExports for MemExports {
    fn lookup(&self, volume: &str) -> Option<ServedVolume> {
        lock(&self.volumes).get(volume).cloned()
    }
    fn opening(&self, volume: &str) -> Option<OpeningFuture> {
        let wait = self.opening.until_ended(volume)?;
        self.waits.fetch_add(1, Ordering::SeqCst);
        Some(wait)
    }
}

/// Answers every volume with one endpoint (or an error) that the test sets, and, like the
/// registry, notifies its watchers of each change.
pub struct StaticResolver {
    answer: Mutex<Result<Endpoint, String>>,
    calls: AtomicUsize,
    watchers: Mutex<Vec<mpsc::Sender<()>>>,
}

impl StaticResolver {
    pub fn new(endpoint: Endpoint) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(Ok(endpoint)),
            calls: AtomicUsize::new(0),
            watchers: Mutex::new(Vec::new()),
        })
    }
    /// Change the answer and notify the watchers.
    pub fn set(&self, answer: Result<Endpoint, String>) {
        *lock(&self.answer) = answer;
        lock(&self.watchers).retain(|tx| !matches!(tx.try_send(()), Err(TrySendError::Closed(_))));
    }
    /// How many times `resolve` was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// How many watches are open.
    pub fn watches(&self) -> usize {
        let mut watchers = lock(&self.watchers);
        watchers.retain(|tx| !tx.is_closed());
        watchers.len()
    }
}

impl Resolver for StaticResolver {
    fn resolve(&self, _volume: &str) -> ResolveFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = lock(&self.answer).clone();
        Box::pin(async move { answer })
    }

    fn watch(&self, _volume: &str) -> WatchFuture {
        let (tx, rx) = mpsc::channel(1);
        lock(&self.watchers).push(tx);
        Box::pin(async move { Some(ReceiverStream::new(rx).boxed()) })
    }
}
