//! Self-fencing: the decision a node makes about itself when it cannot renew its lease.
//!
//! A pure state machine fed with events and the current time; no timers, sockets or tasks (the
//! driver in `cluster::runtime` is a thin loop around it). The rule:
//!
//! - The node renews its lease every keepalive interval. `last_ok_sent` is when the last
//!   *successful* renewal was **sent**: etcd counts the TTL from when it processed that request,
//!   which is no earlier, so the lease lives at least until `last_ok_sent + TTL`.
//! - Once `fence_after = TTL - margin` has passed since `last_ok_sent`, the node asks its peers
//!   whether they reach the registry ([`Action::Probe`]). When one does, the driver tries one
//!   renewal of its own (bounded to a tenth of the margin) before reporting the answers: a
//!   registry back for everybody at once must not fence a node whose next scheduled renewal is
//!   merely later than a peer's (a renewal that works makes the answers moot, as below).
//!   - At least one peer reaches it, or no peer answers at all: this node is the one cut off.
//!     It enters [`Health::Fenced`] and stops acknowledging writes, `margin` before its lease
//!     can expire anywhere (so before anyone can take its volumes over).
//!   - Every peer that answers says the registry is unreachable for it too: the registry is
//!     down for everybody, nobody can take ownership, so the node keeps serving
//!     ([`Health::RegistryDown`]) and probes again every interval (a peer that reaches the
//!     registry again while this node still cannot means this node is partitioned).
//! - A renewal that works again (the lease never expired) makes the node [`Health::Healthy`].
//!   A lease found expired makes it [`Health::Fenced`] and asks for a new registration
//!   ([`Action::Register`]) until one works; then it is healthy again.

use std::time::{Duration, Instant};

/// What the node may do, published to the rest of the node (a `tokio::sync::watch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Lease renewed recently: serve.
    Healthy,
    /// The registry is unreachable for every peer that answered: keep serving, no ownership
    /// changes can happen anywhere.
    RegistryDown,
    /// Possibly partitioned, or the lease is gone: acknowledge no writes.
    Fenced { reason: String },
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask every peer's API whether it reaches the registry; report with [`Monitor::probed`].
    Probe,
    /// Register again with a new lease; report with [`Monitor::registered`].
    Register,
}

/// One peer's answer to "do you reach the registry?"; `None`: no answer in time.
pub type PeerAnswer = Option<bool>;

#[derive(Debug)]
pub struct Monitor {
    fence_after: Duration,
    /// When the last successful renewal was sent.
    last_ok_sent: Instant,
    health: Health,
    /// The lease expired: only a new registration helps.
    lease_lost: bool,
    /// A probe is out; no new one until it is answered.
    probing: bool,
    /// When the last probe was sent: probes go out at most once per `PROBE_EVERY`.
    last_probe: Option<Instant>,
}

/// Least time between two probes while the registry stays unreachable.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

impl Monitor {
    /// A node that just registered (its registration request was sent at `sent_at`).
    pub fn new(sent_at: Instant, fence_after: Duration) -> Self {
        Self {
            fence_after,
            last_ok_sent: sent_at,
            health: Health::Healthy,
            lease_lost: false,
            probing: false,
            last_probe: None,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    fn overdue(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_ok_sent) >= self.fence_after
    }

    /// A renewal sent at `sent_at` succeeded.
    pub fn renewed(&mut self, sent_at: Instant) {
        self.last_ok_sent = self.last_ok_sent.max(sent_at);
        if !self.lease_lost {
            self.health = Health::Healthy;
        }
    }

    /// The registry says the lease is gone.
    pub fn lease_expired(&mut self) -> Option<Action> {
        self.lease_lost = true;
        self.health = Health::Fenced {
            reason: "the node's registry lease expired".into(),
        };
        Some(Action::Register)
    }

    /// A new registration sent at `sent_at` succeeded.
    pub fn registered(&mut self, sent_at: Instant) {
        self.lease_lost = false;
        self.last_ok_sent = self.last_ok_sent.max(sent_at);
        self.health = Health::Healthy;
    }

    /// Time passes (call at least every keepalive interval).
    pub fn tick(&mut self, now: Instant) -> Option<Action> {
        if self.lease_lost {
            return Some(Action::Register);
        }
        if self.probing || !self.overdue(now) {
            return None;
        }
        if matches!(self.health, Health::Fenced { .. }) {
            // Already fenced: keep renewing (the driver does), nothing to ask.
            return None;
        }
        if self
            .last_probe
            .is_some_and(|at| now.saturating_duration_since(at) < PROBE_EVERY)
        {
            return None;
        }
        self.last_probe = Some(now);
        self.probing = true;
        Some(Action::Probe)
    }

    /// The peers answered (or not) the probe sent earlier.
    pub fn probed(&mut self, now: Instant, answers: &[PeerAnswer]) {
        self.probing = false;
        if self.lease_lost || !self.overdue(now) {
            // Renewed meanwhile (or re-registering): the answers are moot.
            return;
        }
        let answered: Vec<bool> = answers.iter().filter_map(|a| *a).collect();
        let since = now.saturating_duration_since(self.last_ok_sent);
        self.health = if answered.is_empty() {
            Health::Fenced {
                reason: format!(
                    "no lease renewal for {since:?} and no peer answers: this node is cut off"
                ),
            }
        } else if answered.iter().any(|reaches| *reaches) {
            Health::Fenced {
                reason: format!(
                    "no lease renewal for {since:?} while peers reach the registry: this node is partitioned"
                ),
            }
        } else {
            Health::RegistryDown
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(3);

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn healthy_while_renewals_work() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        for s in 1..10 {
            m.renewed(at(t0, s * 1000));
            assert_eq!(m.tick(at(t0, s * 1000 + 500)), None);
        }
        assert_eq!(m.health(), &Health::Healthy);
    }

    #[test]
    fn overdue_probes_once_measured_from_the_last_successful_send() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        m.renewed(at(t0, 1000));
        assert_eq!(m.tick(at(t0, 3999)), None);
        assert_eq!(m.tick(at(t0, 4000)), Some(Action::Probe));
        // One probe at a time.
        assert_eq!(m.tick(at(t0, 4500)), None);
        assert_eq!(m.health(), &Health::Healthy);
    }

    #[test]
    fn a_peer_reaching_the_registry_fences() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        assert_eq!(m.tick(at(t0, 3000)), Some(Action::Probe));
        m.probed(at(t0, 3300), &[Some(false), Some(true), None]);
        assert!(matches!(m.health(), Health::Fenced { reason } if reason.contains("partitioned")));
        // Fenced stays fenced while renewals fail; no more probes.
        assert_eq!(m.tick(at(t0, 4000)), None);
        assert!(matches!(m.health(), Health::Fenced { .. }));
        // The same lease renews again (it never expired): healthy.
        m.renewed(at(t0, 4500));
        assert_eq!(m.health(), &Health::Healthy);
    }

    #[test]
    fn no_peer_answering_fences() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        assert_eq!(m.tick(at(t0, 3100)), Some(Action::Probe));
        m.probed(at(t0, 3600), &[None, None]);
        assert!(matches!(m.health(), Health::Fenced { reason } if reason.contains("cut off")));
        // A node without peers is alone: it fences too.
        let mut alone = Monitor::new(t0, AFTER);
        alone.tick(at(t0, 3000));
        alone.probed(at(t0, 3000), &[]);
        assert!(matches!(alone.health(), Health::Fenced { .. }));
    }

    #[test]
    fn registry_down_for_everybody_keeps_serving_and_probes_again() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        m.tick(at(t0, 3000));
        m.probed(at(t0, 3200), &[Some(false), None, Some(false)]);
        assert_eq!(m.health(), &Health::RegistryDown);
        // Still overdue: probe again, at most once a second; now a peer reaches it: fence.
        assert_eq!(m.tick(at(t0, 3500)), None);
        assert_eq!(m.tick(at(t0, 4200)), Some(Action::Probe));
        m.probed(at(t0, 4300), &[Some(true), Some(false)]);
        assert!(matches!(m.health(), Health::Fenced { .. }));
    }

    #[test]
    fn a_renewal_during_the_probe_makes_its_answers_moot() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        m.tick(at(t0, 3000));
        m.renewed(at(t0, 3100));
        m.probed(at(t0, 3200), &[Some(true)]);
        assert_eq!(m.health(), &Health::Healthy);
    }

    #[test]
    fn an_expired_lease_fences_until_registered_again() {
        let t0 = Instant::now();
        let mut m = Monitor::new(t0, AFTER);
        assert_eq!(m.lease_expired(), Some(Action::Register));
        assert!(matches!(m.health(), Health::Fenced { .. }));
        // A late success of the old lease's renewal does not unfence.
        m.renewed(at(t0, 100));
        assert!(matches!(m.health(), Health::Fenced { .. }));
        assert_eq!(m.tick(at(t0, 1000)), Some(Action::Register));
        m.registered(at(t0, 1100));
        assert_eq!(m.health(), &Health::Healthy);
        assert_eq!(m.tick(at(t0, 2000)), None);
    }
}
