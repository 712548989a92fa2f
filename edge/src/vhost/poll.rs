//! Adaptive polling of a virtqueue: after a queue worker has served every chain, it looks at the
//! ring a little longer before it goes back to sleep on the guest's kick.
//!
//! # Why
//!
//! A guest (or libblkio) submits its next request a few microseconds after it saw a completion.
//! When the worker has already gone to sleep, that request costs a kick (an eventfd write in the
//! guest), an epoll wake-up and a context switch in the worker: on a busy two-vCPU host that
//! wake-up is most of a 4 KiB read's cost. Looking at the ring for a few more microseconds
//! catches the request without either. Measured on this project's two-vCPU machine with the
//! owner's own vhost-user export (`vstor-bench edge`): QD1 random reads went from about 22 k to
//! 42–56 k IOPS (p50 45 → 15 µs), QD1 writes from about 21 k to 38–50 k. A fixed 30 µs window
//! did better still (66 k QD1 reads, QD32 reads +33 %), but spins after every pass of every
//! queue, idle or not.
//!
//! # Why adaptive
//!
//! Spinning costs a CPU while it lasts, so it must only happen where it pays. The rule is
//! QEMU's `IOThread` adaptive polling (`poll-max-ns`): each queue keeps a polling *window*.
//! After each wait the worker learns how long the guest took to bring more work (the time it
//! polled, plus the time it slept if the poll missed):
//! - within the window: the poll paid, keep the window;
//! - longer than the window but within `max`: a longer window would have caught it: double it
//!   (from [`START`]);
//! - longer than `max`: polling did not pay this time: halve the window, and below [`START`]
//!   stop polling, until waits get short again.
//!
//! # Why a queue that stopped polling probes
//!
//! Without polling, the measured wait includes the worker's own wake-up after the kick, which on
//! an idle two-vCPU guest of a hypervisor is tens of microseconds by itself. So a queue whose
//! guest would come back within `max` can still measure every wait above `max` and never start
//! polling, while the same guest measured with polling on stays within it: two stable states.
//! Seen in `vstor-bench vhost` (QD1 reads on one queue, a fresh connection per round): rounds
//! landed at 14–21 k or at 44–54 k IOPS. So after [`PROBE_EVERY`] long waits without polling the
//! worker polls one pass for the whole `max`; if the guest came back within it, the window
//! starts at `max`, else the queue goes on sleeping. Measured over 8 rounds: median 31 k → 55 k
//! IOPS. An idle queue pays one `max` of spinning per [`PROBE_EVERY`] kicks.
//!
//! Halving rather than QEMU's default reset to zero: one preemption of the guest's thread on a
//! busy host would otherwise throw away a window that pays for every other request (measured:
//! with a reset, QD1 reads through the node's own export reached 35–39 k IOPS, with halving
//! 42–56 k; at QD32 neither kept the fixed window's gain). An idle queue stops polling after a handful of long waits, at a
//! cost of a few `max` of CPU, and a queue with a tight guest spins at most `max` per wait. The spin loop
//! yields the CPU between looks (`sched_yield`), so another runnable thread on the same CPU is
//! not held up by it.
//!
//! This module is the decision only (no clock, no ring): the worker measures and asks.

use std::time::Duration;

/// First window after a wait that a window would have caught.
pub(crate) const START: Duration = Duration::from_micros(4);

/// A queue that does not poll spends one pass in this many on a probe: a window of `max`.
pub(crate) const PROBE_EVERY: u32 = 32;

/// The polling window of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Poller {
    window: Duration,
    max: Duration,
    /// Long waits since polling stopped or since the last probe.
    idle_waits: u32,
}

impl Poller {
    /// A queue that polls at most `max` after each pass (`Duration::ZERO`: never).
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            window: Duration::ZERO,
            max,
            idle_waits: 0,
        }
    }

    /// How long to look at the ring before sleeping.
    pub(crate) fn window(&self) -> Duration {
        if self.probing() {
            self.max
        } else {
            self.window
        }
    }

    fn probing(&self) -> bool {
        self.window.is_zero() && self.idle_waits >= PROBE_EVERY
    }

    /// The guest brought more work `waited` after the worker ran out of it (time spent polling,
    /// plus sleeping if the poll missed).
    pub(crate) fn waited(&mut self, waited: Duration) {
        if self.probing() {
            self.idle_waits = 0;
            if waited <= self.max {
                // The guest is quick after all: poll as long as `max` allows, and let the
                // halving rule find a shorter window if misses say so.
                self.window = self.max;
            }
            return;
        }
        if waited <= self.window {
            return;
        }
        self.window = if waited > self.max {
            let half = self.window / 2;
            if half < START {
                if self.window.is_zero() {
                    self.idle_waits = self.idle_waits.saturating_add(1);
                }
                Duration::ZERO
            } else {
                half
            }
        } else if self.window.is_zero() {
            self.idle_waits = 0;
            START.min(self.max)
        } else {
            (self.window * 2).min(self.max)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_queue_starts_without_polling() {
        assert_eq!(Poller::new(32 * US).window(), Duration::ZERO);
    }

    #[test]
    fn short_waits_grow_the_window_until_it_catches_them() {
        let mut p = Poller::new(32 * US);
        let mut windows = Vec::new();
        for _ in 0..6 {
            p.waited(13 * US);
            windows.push(p.window());
        }
        assert_eq!(
            windows,
            vec![4 * US, 8 * US, 16 * US, 16 * US, 16 * US, 16 * US]
        );
    }

    #[test]
    fn the_window_never_passes_max() {
        let mut p = Poller::new(20 * US);
        for _ in 0..10 {
            p.waited(19 * US);
        }
        assert_eq!(p.window(), 20 * US);
        let mut tiny = Poller::new(2 * US);
        tiny.waited(US + US / 2);
        assert_eq!(tiny.window(), 2 * US, "START is capped at max too");
    }

    #[test]
    fn waits_longer_than_max_halve_the_window_then_stop_polling() {
        let mut p = Poller::new(32 * US);
        for _ in 0..5 {
            p.waited(20 * US);
        }
        assert_eq!(p.window(), 32 * US);
        let mut windows = Vec::new();
        for _ in 0..5 {
            p.waited(Duration::from_millis(5));
            windows.push(p.window());
        }
        assert_eq!(
            windows,
            vec![16 * US, 8 * US, 4 * US, Duration::ZERO, Duration::ZERO]
        );
        p.waited(33 * US);
        assert_eq!(p.window(), Duration::ZERO, "still too slow to poll for");
    }

    #[test]
    fn one_long_wait_costs_half_the_window_not_all_of_it() {
        let mut p = Poller::new(32 * US);
        for _ in 0..5 {
            p.waited(20 * US);
        }
        p.waited(Duration::from_millis(2));
        assert_eq!(p.window(), 16 * US);
        p.waited(20 * US);
        assert_eq!(p.window(), 32 * US, "the next short wait grows it back");
    }

    #[test]
    fn waits_within_the_window_keep_it() {
        let mut p = Poller::new(32 * US);
        for _ in 0..4 {
            p.waited(30 * US);
        }
        assert_eq!(p.window(), 32 * US);
        p.waited(US);
        p.waited(32 * US);
        assert_eq!(p.window(), 32 * US);
    }

    #[test]
    fn zero_max_never_polls() {
        let mut p = Poller::new(Duration::ZERO);
        for wait in [0, 1, 5, 100] {
            p.waited(wait * US);
            assert_eq!(p.window(), Duration::ZERO);
        }
        for _ in 0..3 * PROBE_EVERY {
            p.waited(Duration::from_millis(1));
            assert_eq!(p.window(), Duration::ZERO, "nor probes");
        }
    }

    /// Long waits until the next pass is a probe.
    fn until_probe(p: &mut Poller) -> u32 {
        let mut waits = 0;
        while p.window().is_zero() {
            assert!(waits <= PROBE_EVERY, "no probe after {waits} long waits");
            p.waited(Duration::from_millis(1));
            waits += 1;
        }
        waits
    }

    #[test]
    fn a_queue_that_does_not_poll_probes_once_in_a_while() {
        let mut p = Poller::new(32 * US);
        assert_eq!(until_probe(&mut p), PROBE_EVERY);
        assert_eq!(p.window(), 32 * US, "a probe polls for max");
        p.waited(Duration::from_millis(1));
        assert_eq!(
            p.window(),
            Duration::ZERO,
            "a missed probe: back to sleeping"
        );
        assert_eq!(
            until_probe(&mut p),
            PROBE_EVERY,
            "and the count starts again"
        );
    }

    #[test]
    fn a_probe_that_catches_the_guest_starts_polling_at_max() {
        let mut p = Poller::new(32 * US);
        until_probe(&mut p);
        p.waited(12 * US);
        assert_eq!(p.window(), 32 * US);
        p.waited(12 * US);
        assert_eq!(p.window(), 32 * US, "and keeps it while waits are short");
    }

    #[test]
    fn polling_that_stops_again_counts_long_waits_afresh() {
        let mut p = Poller::new(32 * US);
        for _ in 0..PROBE_EVERY - 1 {
            p.waited(Duration::from_millis(1));
        }
        p.waited(10 * US);
        assert_eq!(
            p.window(),
            START,
            "a short wait starts polling the usual way"
        );
        for _ in 0..2 {
            p.waited(Duration::from_millis(1));
        }
        assert_eq!(p.window(), Duration::ZERO);
        assert_eq!(until_probe(&mut p), PROBE_EVERY - 1);
    }
}
