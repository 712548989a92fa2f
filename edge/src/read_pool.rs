//! Where reads that must wait for the backend run: the runtime's blocking pool, at most
//! [`MAX_BACKEND_READS`] at a time in the whole process.
//!
//! A read of data that left the write buffer is a synchronous `ObjectStore::get_range`: a thread
//! is busy for the whole backend round trip. Frontends must not spend their reactor task (NBD) or
//! queue thread (vhost-user) on it, so they hand such reads here (see `BlockTarget::try_read`).
//!
//! Why `spawn_blocking` behind a semaphore rather than a dedicated pool of N threads: the blocking
//! pool already exists, starts threads on demand and retires idle ones, so an idle node keeps no
//! threads for this; the semaphore gives the bound a dedicated pool would. Without it, a burst of
//! slow reads from many clients could occupy every blocking thread and delay the flushes and FUA
//! writes that use the same pool, and open as many concurrent requests to the backend. A read
//! waiting for a permit is an async task, not a parked thread. The cap is process-wide because the
//! backend is: every connection and queue of both frontends shares it. Each frontend still bounds
//! its own in-flight requests per connection / queue, which is what pushes back on one client.

use tokio::runtime::Handle;
use tokio::sync::Semaphore;

/// Backend reads running at once in the process.
pub const MAX_BACKEND_READS: usize = 64;

static PERMITS: Semaphore = Semaphore::const_new(MAX_BACKEND_READS);

/// Run `job` on `runtime`'s blocking pool once a permit is free. `job` must report its own
/// outcome (and, if it may be dropped without running when the runtime shuts down, report that
/// from a `Drop` guard it owns).
pub(crate) fn spawn(runtime: &Handle, job: impl FnOnce() + Send + 'static) {
    runtime.spawn(async move {
        // PERMITS is never closed, so acquiring only waits.
        let Ok(_permit) = PERMITS.acquire().await else {
            return;
        };
        // A panic in `job` is the job's to report (its guard runs during the unwind).
        let _ = tokio::task::spawn_blocking(job).await;
    });
}
