//! Scrubs run by this node: at most one per volume at a time, their progress (shown by
//! `vstor volume info` as `scrub_progress` while one runs) and the last one's outcome
//! (`last_scrub`), whether started by `vstor volume scrub` or by the background scrubber.
//!
//! The background scrubber (`[scrub]` in the config file) is one thread: every
//! `check_interval_secs` it looks at each volume's garbage estimate and scrubs, one volume after
//! another, those at or above `garbage_threshold`, copying at most `rate` bytes per second. A
//! volume whose data is not all on the backend yet is passed over (a scrub only sees the backend)
//! for up to [`MAX_DEFERRALS`] checks in a row.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vstor_volumedriver::{ScrubProgress, ScrubReport, Volume, VolumeError, VolumeManager};

use crate::config::AutoScrub;

#[derive(Debug, Clone, Serialize)]
pub struct ScrubOutcome {
    /// What started it: `api` or `auto`.
    pub trigger: &'static str,
    /// Unix seconds when it ended.
    pub finished: u64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ScrubReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The volume's garbage estimate when the scrub ended (see [`falling_behind`]).
    pub garbage_after: u64,
    /// A background scrub fell behind the writes ([`falling_behind`]).
    pub behind: bool,
}

/// Whether a background scrub fell behind the writes: the garbage they made while it ran
/// (`garbage_after`; a scrub takes off the estimate only what it covered, so this also holds the
/// little that was not uploaded when it started, which the scrubber waits for) already reaches
/// the `threshold` that starts the next one. Then scrubs run back to back at `[scrub] rate` and
/// the garbage, and the disk it takes, still grows: a disk that fills halts the volume. A
/// failed scrub is not judged (its error says more).
pub(crate) fn falling_behind(garbage_after: u64, threshold: u64, failed: bool) -> bool {
    !failed && garbage_after >= threshold.max(1)
}

#[derive(Default)]
struct Entry {
    /// `Some` while a scrub runs (its latest progress report).
    running: Option<ScrubProgress>,
    last: Option<ScrubOutcome>,
}

/// Why [`Scrubs::run`] did not produce a report.
pub enum ScrubError {
    /// Another scrub of the volume is running.
    Busy,
    Volume(VolumeError),
}

#[derive(Default)]
pub struct Scrubs {
    volumes: Mutex<HashMap<String, Entry>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Scrubs {
    /// Scrub `volume` on the calling thread (it blocks: call from the blocking pool). Refused
    /// with [`ScrubError::Busy`] while another scrub of the same volume runs.
    ///
    /// `behind_at`: the background scrubber's threshold, to judge whether this scrub fell
    /// behind the writes ([`falling_behind`]); `None` for scrubs by hand.
    pub fn run(
        &self,
        volume: &Volume,
        rate: Option<u64>,
        trigger: &'static str,
        behind_at: Option<u64>,
    ) -> Result<ScrubReport, ScrubError> {
        let name = volume.name().to_string();
        {
            let mut volumes = lock(&self.volumes);
            let entry = volumes.entry(name.clone()).or_default();
            if entry.running.is_some() {
                return Err(ScrubError::Busy);
            }
            entry.running = Some(ScrubProgress {
                phase: "starting",
                done: 0,
                total: 0,
            });
        }
        tracing::info!(volume = %name, trigger, ?rate, "scrub started");
        let started = std::time::Instant::now();
        let result = volume.scrub(rate, &mut |progress| {
            if let Some(entry) = lock(&self.volumes).get_mut(&name) {
                entry.running = Some(progress);
            }
        });
        let garbage_after = volume.garbage_bytes();
        let seconds = started.elapsed().as_secs_f64();
        let behind = behind_at
            .is_some_and(|threshold| falling_behind(garbage_after, threshold, result.is_err()));
        let outcome = ScrubOutcome {
            trigger,
            finished: now_secs(),
            seconds,
            report: result.as_ref().ok().cloned(),
            error: result.as_ref().err().map(std::string::ToString::to_string),
            garbage_after,
            behind,
        };
        if let Some(error) = &outcome.error {
            tracing::warn!(volume = %name, trigger, %error, "scrub failed");
        }
        if behind {
            tracing::warn!(
                volume = %name,
                garbage_after,
                seconds,
                garbage_per_second = (garbage_after as f64 / seconds.max(0.001)) as u64,
                ?rate,
                threshold = behind_at,
                "the background scrub is falling behind the writes: they made more garbage while \
                 it ran than the threshold that starts the next; raise [scrub] rate, or the disk \
                 fills and the volume halts"
            );
        }
        let mut volumes = lock(&self.volumes);
        let entry = volumes.entry(name).or_default();
        entry.running = None;
        entry.last = Some(outcome);
        result.map_err(ScrubError::Volume)
    }

    /// `scrub_progress` and `last_scrub` of a volume, for its info.
    pub fn status(
        &self,
        name: &str,
    ) -> (
        Option<crate::api_types::ScrubProgress>,
        Option<crate::api_types::ScrubOutcome>,
    ) {
        let volumes = lock(&self.volumes);
        let Some(entry) = volumes.get(name) else {
            return (None, None);
        };
        let running = entry
            .running
            .as_ref()
            .map(|p| crate::api_types::ScrubProgress {
                phase: p.phase.to_string(),
                done: p.done,
                total: p.total,
            });
        let last = entry.last.as_ref().map(|o| crate::api_types::ScrubOutcome {
            trigger: o.trigger.to_string(),
            finished: o.finished,
            seconds: o.seconds,
            report: o.report.clone().map(Into::into),
            error: o.error.clone(),
            garbage_after: o.garbage_after,
            behind: o.behind,
        });
        (running, last)
    }

    /// Forget a deleted volume.
    pub fn forget(&self, name: &str) {
        let mut volumes = lock(&self.volumes);
        if volumes.get(name).is_some_and(|e| e.running.is_none()) {
            volumes.remove(name);
        }
    }
}

/// Checks a volume with garbage may be skipped because its uploads are behind.
const MAX_DEFERRALS: u32 = 10;

/// The background scrubber's thread; stopped (not joined: a scrub in progress is crash-safe and
/// is cut short when its volume stops) by [`AutoScrubber::stop`].
pub struct AutoScrubber {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl AutoScrubber {
    pub fn start(manager: Arc<VolumeManager>, scrubs: Arc<Scrubs>, settings: AutoScrub) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("auto-scrub".into())
            .spawn(move || auto_scrub_loop(&manager, &scrubs, settings, &flag));
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the background scrubber");
                None
            }
        };
        tracing::info!(
            threshold = settings.garbage_threshold,
            rate = ?settings.rate,
            interval = ?settings.check_interval,
            "background scrubbing enabled"
        );
        Self { stop, thread }
    }

    /// Ask the thread to stop after the scrub it may be running; it is not waited for.
    pub fn stop(self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        drop(self.thread);
    }
}

fn auto_scrub_loop(
    manager: &VolumeManager,
    scrubs: &Scrubs,
    settings: AutoScrub,
    stop: &(Mutex<bool>, Condvar),
) {
    let mut deferred: HashMap<String, u32> = HashMap::new();
    loop {
        {
            let (stopped, wake) = stop;
            let mut stopped = lock(stopped);
            if !*stopped {
                stopped = wake
                    .wait_timeout(stopped, settings.check_interval)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if *stopped {
                return;
            }
        }
        for name in manager.names() {
            if *lock(&stop.0) {
                return;
            }
            let Ok(volume) = manager.get(&name) else {
                continue;
            };
            let garbage = volume.garbage_bytes();
            if garbage < settings.garbage_threshold.max(1) || volume.is_stopped() {
                deferred.remove(&name);
                continue;
            }
            // A scrub sees only what is on the backend (and resets the engine's garbage
            // estimate): wait for the uploads to catch up, but not forever.
            let pending = volume.info().not_uploaded_bytes;
            let waits = deferred.entry(name.clone()).or_insert(0);
            if pending > 0 && *waits < MAX_DEFERRALS {
                *waits += 1;
                continue;
            }
            deferred.remove(&name);
            tracing::info!(volume = %name, garbage, "garbage above the scrub threshold");
            let threshold = Some(settings.garbage_threshold);
            if let Ok(report) = scrubs.run(&volume, settings.rate, "auto", threshold) {
                tracing::info!(volume = %name, ?report, "background scrub done");
            } // failures are logged by `run`; Busy: a scrub by hand is running
        }
    }
}

#[cfg(test)]
mod tests {
    use super::falling_behind;

    #[test]
    fn a_scrub_falls_behind_when_the_garbage_made_meanwhile_reaches_the_threshold() {
        const MIB: u64 = 1 << 20;
        assert!(!falling_behind(0, 64 * MIB, false));
        assert!(!falling_behind(64 * MIB - 1, 64 * MIB, false));
        assert!(falling_behind(64 * MIB, 64 * MIB, false));
        assert!(falling_behind(5 << 30, 64 * MIB, false));
        // A failed scrub is not judged.
        assert!(!falling_behind(5 << 30, 64 * MIB, true));
        // A zero threshold scrubs any garbage: behind only once there is some.
        assert!(!falling_behind(0, 0, false));
        assert!(falling_behind(1, 0, false));
    }
}
