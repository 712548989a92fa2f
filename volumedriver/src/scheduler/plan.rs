//! The upload scheduler's decisions, free of threads, timers and files: which volume gets the
//! next upload step, when a volume that failed is due again, and when every volume is ticked.
//!
//! Each volume is in exactly one slot:
//! - `Idle`: nothing known to do; a notification or the periodic tick makes it `Ready`.
//! - `Ready`: waiting in the round-robin queue for a worker.
//! - `Running`: one step in flight. At most one per volume, so a volume's steps run in its own
//!   FIFO order (the barrier: a TLog after all its SCOs). A notification meanwhile is remembered
//!   and makes the volume `Ready` again when the step ends.
//! - `Backoff`: its last step failed; it waits in the timer queue until due, doubling the delay
//!   (up to a cap) on each consecutive failure. Workers are free for other volumes meanwhile.
//!
//! Fairness: a volume that made progress goes to the back of the ready queue, so with more
//! volumes than workers every volume with work gets a step per round.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The scheduler's handle of a registered volume.
pub type VolumeKey = u64;

/// First retry delay after a failed step, and its cap.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a worker should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run one step of this volume, then report with [`Plan::done`].
    Run(VolumeKey),
    /// Nothing to do before this instant (unless notified).
    Wait(Instant),
    /// The scheduler is stopping.
    Exit,
}

/// How a volume's step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Something was uploaded; there may be more.
    Progress,
    /// Nothing to do (or the volume is stopped or halted).
    Idle,
    /// The backend failed; retry after the volume's back-off.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle,
    Ready,
    Running { notified: bool, removed: bool },
    Backoff { until: Instant },
}

#[derive(Debug)]
struct Entry {
    slot: Slot,
    backoff: Duration,
}

/// Should a volume's open TLog (and SCO) be closed and queued for upload? `age` is how long
/// its oldest unqueued data has waited (`None`: there is none); `max_age` the setting (`None`:
/// only size and shutdown close TLogs).
pub fn should_seal(age: Option<Duration>, max_age: Option<Duration>) -> bool {
    matches!((age, max_age), (Some(age), Some(max)) if age >= max)
}

/// The tick interval: the DTL tick keeps the uploader thread's old cadence (at least once a
/// second) and the age check runs a few times per `max_open_age`.
pub fn tick_interval(max_open_age: Option<Duration>) -> Duration {
    let second = Duration::from_secs(1);
    max_open_age
        .map_or(second, |age| (age / 4).min(second))
        .max(Duration::from_millis(10))
}

#[derive(Debug)]
pub struct Plan {
    entries: HashMap<VolumeKey, Entry>,
    /// Round-robin order of `Ready` volumes. May hold stale keys (removed volumes); they are
    /// skipped when popped.
    ready: VecDeque<VolumeKey>,
    timers: BTreeSet<(Instant, VolumeKey)>,
    tick: Duration,
    next_tick: Instant,
    stopping: bool,
}

impl Plan {
    pub fn new(now: Instant, tick: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            ready: VecDeque::new(),
            timers: BTreeSet::new(),
            tick,
            next_tick: now + tick,
            stopping: false,
        }
    }

    /// Register a volume; it gets a first step (it may have work queued at restart).
    pub fn add(&mut self, key: VolumeKey) {
        self.entries.insert(
            key,
            Entry {
                slot: Slot::Ready,
                backoff: BACKOFF_MIN,
            },
        );
        self.ready.push_back(key);
    }

    /// Forget a volume. Returns whether a step of it is still running: the caller waits until
    /// [`Plan::contains`] turns false (`done` drops it).
    pub fn remove(&mut self, key: VolumeKey) -> bool {
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        match entry.slot {
            Slot::Running { notified, .. } => {
                entry.slot = Slot::Running {
                    notified,
                    removed: true,
                };
                true
            }
            Slot::Backoff { until } => {
                self.timers.remove(&(until, key));
                self.entries.remove(&key);
                false
            }
            Slot::Idle | Slot::Ready => {
                self.entries.remove(&key);
                false
            }
        }
    }

    pub fn contains(&self, key: VolumeKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// The volume queued work (or something it waits for happened). Returns whether it became
    /// ready, i.e. whether a worker should be woken.
    pub fn notify(&mut self, key: VolumeKey) -> bool {
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        match &mut entry.slot {
            Slot::Idle => {
                entry.slot = Slot::Ready;
                self.ready.push_back(key);
                true
            }
            Slot::Running { notified, .. } => {
                *notified = true;
                false
            }
            // A backed-off volume waits for its timer: the backend it failed on is not back
            // because the volume queued more work.
            Slot::Ready | Slot::Backoff { .. } => false,
        }
    }

    /// Begin stopping: every worker gets `Exit`.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Whether volumes are waiting for a worker (so another worker should be woken).
    pub fn has_ready(&self) -> bool {
        self.ready
            .iter()
            .any(|k| self.entries.get(k).is_some_and(|e| e.slot == Slot::Ready))
    }

    /// The next step for a free worker at `now`.
    pub fn next(&mut self, now: Instant) -> Next {
        if self.stopping {
            return Next::Exit;
        }
        if now >= self.next_tick {
            self.next_tick = now + self.tick;
            let mut idle: Vec<VolumeKey> = self
                .entries
                .iter()
                .filter(|(_, e)| e.slot == Slot::Idle)
                .map(|(k, _)| *k)
                .collect();
            idle.sort_unstable();
            for key in idle {
                self.make_ready(key);
            }
        }
        while let Some(&(until, key)) = self.timers.first() {
            if until > now {
                break;
            }
            self.timers.pop_first();
            self.make_ready(key);
        }
        while let Some(key) = self.ready.pop_front() {
            if let Some(entry) = self.entries.get_mut(&key) {
                if entry.slot == Slot::Ready {
                    entry.slot = Slot::Running {
                        notified: false,
                        removed: false,
                    };
                    return Next::Run(key);
                }
            }
        }
        let wake = self
            .timers
            .first()
            .map_or(self.next_tick, |(until, _)| (*until).min(self.next_tick));
        Next::Wait(wake)
    }

    fn make_ready(&mut self, key: VolumeKey) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.slot = Slot::Ready;
            self.ready.push_back(key);
        }
    }

    /// A step of `key` ended at `now` with `outcome`.
    pub fn done(&mut self, key: VolumeKey, outcome: Outcome, now: Instant) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let Slot::Running { notified, removed } = entry.slot else {
            return;
        };
        if removed {
            self.entries.remove(&key);
            return;
        }
        match outcome {
            Outcome::Progress => {
                entry.backoff = BACKOFF_MIN;
                entry.slot = Slot::Ready;
                self.ready.push_back(key);
            }
            Outcome::Idle if notified => {
                entry.slot = Slot::Ready;
                self.ready.push_back(key);
            }
            Outcome::Idle => entry.slot = Slot::Idle,
            Outcome::Failed => {
                let until = now + entry.backoff;
                entry.backoff = (entry.backoff * 2).min(BACKOFF_MAX);
                entry.slot = Slot::Backoff { until };
                self.timers.insert((until, key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(1);

    fn run(plan: &mut Plan, now: Instant) -> VolumeKey {
        match plan.next(now) {
            Next::Run(key) => key,
            other => panic!("expected a step, got {other:?}"),
        }
    }

    #[test]
    fn round_robin_over_volumes_with_work() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, TICK);
        for key in 0..3 {
            plan.add(key);
        }
        // Volume 0 always has more work; 1 and 2 too: each gets a turn per round.
        let mut order = Vec::new();
        for _ in 0..9 {
            let key = run(&mut plan, t0);
            order.push(key);
            plan.done(key, Outcome::Progress, t0);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn at_most_one_step_per_volume_in_flight() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, TICK);
        plan.add(7);
        assert_eq!(plan.next(t0), Next::Run(7));
        // Notified while running: not handed to a second worker.
        assert!(!plan.notify(7));
        assert!(matches!(plan.next(t0), Next::Wait(_)));
        // The notification is remembered: an idle outcome still re-queues it.
        plan.done(7, Outcome::Idle, t0);
        assert_eq!(plan.next(t0), Next::Run(7));
        plan.done(7, Outcome::Idle, t0);
        assert_eq!(plan.next(t0), Next::Wait(t0 + TICK));
        // Now idle: a notification wakes it exactly once.
        assert!(plan.notify(7));
        assert!(!plan.notify(7));
        assert_eq!(plan.next(t0), Next::Run(7));
        assert!(matches!(plan.next(t0), Next::Wait(_)));
    }

    #[test]
    fn failing_volume_backs_off_while_others_proceed() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, Duration::from_secs(3600));
        plan.add(1);
        plan.add(2);
        assert_eq!(plan.next(t0), Next::Run(1));
        plan.done(1, Outcome::Failed, t0);
        // Volume 2 keeps getting steps while 1 waits in the timer queue, notified or not.
        assert!(!plan.notify(1));
        for _ in 0..3 {
            assert_eq!(plan.next(t0), Next::Run(2));
            plan.done(2, Outcome::Progress, t0);
        }
        assert_eq!(plan.next(t0), Next::Run(2));
        plan.done(2, Outcome::Idle, t0);
        assert_eq!(plan.next(t0), Next::Wait(t0 + BACKOFF_MIN));
        // Due: retried; each further failure doubles the delay, up to the cap.
        let mut now = t0 + BACKOFF_MIN;
        let mut expected = BACKOFF_MIN;
        for _ in 0..10 {
            assert_eq!(plan.next(now), Next::Run(1));
            expected = (expected * 2).min(BACKOFF_MAX);
            plan.done(1, Outcome::Failed, now);
            assert_eq!(plan.next(now), Next::Wait(now + expected));
            now += expected;
        }
        assert_eq!(expected, BACKOFF_MAX);
        // Success resets the back-off.
        assert_eq!(plan.next(now), Next::Run(1));
        plan.done(1, Outcome::Progress, now);
        assert_eq!(plan.next(now), Next::Run(1));
        plan.done(1, Outcome::Failed, now);
        assert_eq!(plan.next(now), Next::Wait(now + BACKOFF_MIN));
    }

    #[test]
    fn tick_gives_every_idle_volume_a_step() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, TICK);
        for key in 0..4 {
            plan.add(key);
            assert_eq!(plan.next(t0), Next::Run(key));
            plan.done(key, Outcome::Idle, t0);
        }
        // A failing volume is not ticked before it is due.
        assert!(plan.notify(3));
        assert_eq!(plan.next(t0), Next::Run(3));
        plan.done(3, Outcome::Failed, t0);
        assert_eq!(plan.next(t0), Next::Wait(t0 + BACKOFF_MIN));
        plan.done(3, Outcome::Failed, t0); // not running: ignored
        let t1 = t0 + TICK;
        let mut ticked: Vec<VolumeKey> = (0..3).map(|_| run(&mut plan, t1)).collect();
        ticked.sort_unstable();
        assert_eq!(ticked, [0, 1, 2]);
        // The back-off came due meanwhile.
        assert_eq!(plan.next(t1), Next::Run(3));
        assert_eq!(plan.next(t1), Next::Wait(t1 + TICK));
    }

    #[test]
    fn removal_waits_for_the_running_step() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, TICK);
        plan.add(1);
        plan.add(2);
        plan.add(3);
        assert_eq!(plan.next(t0), Next::Run(1));
        assert!(plan.remove(1), "running: the caller must wait");
        assert!(plan.contains(1));
        assert!(!plan.notify(1));
        plan.done(1, Outcome::Progress, t0);
        assert!(!plan.contains(1), "dropped when its step ended");
        // Removing a ready volume and a backed-off one is immediate.
        assert!(!plan.remove(2));
        assert_eq!(plan.next(t0), Next::Run(3));
        plan.done(3, Outcome::Failed, t0);
        assert!(!plan.remove(3));
        assert!(!plan.has_ready());
        assert_eq!(plan.next(t0 + TICK * 10), Next::Wait(t0 + TICK * 11));
        assert!(!plan.remove(42));
    }

    #[test]
    fn stop_releases_every_worker() {
        let t0 = Instant::now();
        let mut plan = Plan::new(t0, TICK);
        plan.add(1);
        plan.stop();
        assert_eq!(plan.next(t0), Next::Exit);
    }

    #[test]
    fn age_decision_and_tick_interval() {
        let minute = Some(Duration::from_secs(60));
        assert!(!should_seal(None, minute));
        assert!(!should_seal(Some(Duration::from_secs(59)), minute));
        assert!(should_seal(Some(Duration::from_secs(60)), minute));
        assert!(!should_seal(Some(Duration::from_secs(3600)), None));
        assert_eq!(tick_interval(None), Duration::from_secs(1));
        assert_eq!(tick_interval(minute), Duration::from_secs(1));
        assert_eq!(
            tick_interval(Some(Duration::from_millis(200))),
            Duration::from_millis(50)
        );
        assert_eq!(
            tick_interval(Some(Duration::from_millis(1))),
            Duration::from_millis(10)
        );
    }
}
