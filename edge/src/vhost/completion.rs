//! Publishing completed requests to the guest: the status byte, the used ring, the notification.
//!
//! Requests that cannot complete on the queue's worker carry a [`Deferred`]: everything needed to
//! publish their outcome later from another thread (the ring, the head, the status address, the
//! guest memory map and the queue's in-flight count).
//!
//! Requests that complete on the runtime (reads of an asynchronous target such as the edge's
//! remote volume, writes waiting for their acknowledgements) are gathered per pass of the worker
//! into a [`Later`] and run as one task. Why not one task per request: at queue depth 32 through
//! the edge, spawning from the queue thread woke the runtime's worker for every request, and every
//! completion signalled the guest on its own, so the guest's queue was woken for every request
//! too; on a small VM each of those wake-ups costs tens of microseconds, and the pipeline stalled
//! on them with the CPUs idle. With one task per pass, a pass costs one wake-up of the runtime,
//! and completions that become ready together (replies decoded from one socket read) are
//! published together and signalled once.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;
use tracing::{error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryLoadGuard};
use vmm_sys_util::event::EventNotifier;

use super::backend::Inflight;
use super::request::{GuestMem, Outcome, STATUS_IOERR};

pub(super) fn write_status(mem: &GuestMem, addr: GuestAddress, status: u8) {
    // The address was checked against this memory map when the chain was parsed.
    if let Err(e) = mem.write_obj(status, addr) {
        warn!(error = %e, "cannot write virtio-blk status byte");
    }
}

pub(super) fn used_len(outcome: &Outcome) -> u32 {
    u32::try_from(outcome.written.saturating_add(1)).unwrap_or(u32::MAX)
}

/// Notify the guest if it asked for it, from the queue's worker (nothing else contends for the
/// vring's lock there, so it signals under the lock, without `signal_unlocked`'s extra syscalls).
pub(super) fn signal_if_needed(vring: &VringRwLock) {
    if needs_notification(vring) {
        if let Err(e) = vring.signal_used_queue() {
            warn!(error = %e, "cannot signal the used queue");
        }
    }
}

/// Notify the guest if it asked for it, from a thread other than the queue's worker.
fn signal_if_needed_off_worker(vring: &VringRwLock) {
    if needs_notification(vring) {
        signal_unlocked(vring);
    }
}

fn needs_notification(vring: &VringRwLock) -> bool {
    vring.needs_notification().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read used_event; notifying the guest");
        true
    })
}

/// Notify the guest with the vring's lock released.
///
/// Why not `VringRwLock::signal_used_queue`: it writes the call eventfd while holding the vring's
/// read lock, and that write wakes the guest's queue thread, which the scheduler may run at once
/// on this CPU. When this is the runtime's thread completing a request, the guest's next kick
/// wakes the queue's worker, which needs the same lock (`disable_notification`) and spins and
/// sleeps on it until this thread runs again: at queue depth 32 through the edge on a small VM,
/// that lock-holder preemption cost a few percent of a CPU and a context switch pair per pass.
/// So the eventfd is duplicated under the lock (the frontend may replace it at any time,
/// `SET_VRING_CALL`, so a raw fd number kept past the lock could name a closed or reused file)
/// and written after it is released.
fn signal_unlocked(vring: &VringRwLock) {
    // One statement, so the read guard is released at its end (in a `match` scrutinee it would
    // live through the arms, and the fallback below takes the lock again).
    let cloned = vring
        .get_ref()
        .get_call()
        .as_ref()
        .map(EventNotifier::try_clone);
    let call = match cloned {
        None => return,
        Some(Ok(call)) => call,
        Some(Err(e)) => {
            warn!(error = %e, "cannot duplicate the used queue's eventfd; signalling under the lock");
            if let Err(e) = vring.signal_used_queue() {
                warn!(error = %e, "cannot signal the used queue");
            }
            return;
        }
    };
    if let Err(e) = call.notify() {
        warn!(error = %e, "cannot signal the used queue");
    }
}

pub(super) fn add_used(vring: &VringRwLock, head: u16, len: u32) {
    if let Err(e) = vring.add_used(head, len) {
        error!(head, error = %e, "cannot add a chain to the used ring");
    }
}

/// A request completed away from its queue's worker. Completing it publishes the result; dropping
/// it without completing (e.g. the runtime is shutting down) publishes `IOERR`.
pub(super) struct Deferred {
    pub(super) vring: VringRwLock,
    pub(super) head: u16,
    pub(super) status: GuestAddress,
    pub(super) mem: GuestMemoryLoadGuard<GuestMem>,
    pub(super) done: bool,
    // Declared last: released only after the completion is visible to the guest.
    pub(super) _inflight: Inflight,
}

impl Deferred {
    /// Publish `outcome` and notify the guest if it asked for it.
    pub(super) fn complete(&mut self, outcome: Outcome) {
        if self.publish(outcome) {
            signal_if_needed_off_worker(&self.vring);
        }
    }

    /// Publish `outcome` without notifying: the caller signals (once for many). False if it was
    /// already published.
    fn publish(&mut self, outcome: Outcome) -> bool {
        if std::mem::replace(&mut self.done, true) {
            return false;
        }
        write_status(&self.mem, self.status, outcome.status);
        add_used(&self.vring, self.head, used_len(&outcome));
        true
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if !self.done {
            self.complete(Outcome {
                status: STATUS_IOERR,
                written: 0,
                throttle: None,
            });
        }
    }
}

/// A request's completion on the runtime: resolves to its outcome, with its [`Deferred`].
pub(super) type Completion = Pin<Box<dyn Future<Output = (Deferred, Outcome)> + Send + 'static>>;

/// The runtime-completed requests of one pass over a queue (see the module docs). Dropped
/// without [`Later::spawn`] (a panicking pass), its requests complete with `IOERR` through their
/// `Deferred`s' drops.
#[derive(Default)]
pub(super) struct Later {
    vring: Option<VringRwLock>,
    work: Vec<Completion>,
}

impl Later {
    pub(super) fn push(&mut self, vring: &VringRwLock, completion: Completion) {
        self.vring.get_or_insert_with(|| vring.clone());
        self.work.push(completion);
    }

    /// Hand what was gathered to the runtime as one task. Called at the end of a pass and before
    /// the worker may wait (so nothing it waits for sits here unstarted).
    pub(super) fn spawn(&mut self, runtime: &Handle) {
        let (Some(vring), false) = (self.vring.take(), self.work.is_empty()) else {
            return;
        };
        let mut pending: FuturesUnordered<Completion> = self.work.drain(..).collect();
        runtime.spawn(async move {
            // Published but not yet signalled: kept (and so counted in flight) until the guest
            // was notified of them.
            let mut published: Vec<Deferred> = Vec::new();
            std::future::poll_fn(|cx| loop {
                match pending.poll_next_unpin(cx) {
                    Poll::Ready(Some((mut deferred, outcome))) => {
                        if deferred.publish(outcome) {
                            published.push(deferred);
                        }
                    }
                    ready_or_not => {
                        if !published.is_empty() {
                            signal_if_needed_off_worker(&vring);
                            published.clear();
                        }
                        return ready_or_not.map(|_| ());
                    }
                }
            })
            .await;
        });
    }
}
