//! Saying once that S3 stopped answering, and once that it answers again.
//!
//! `object_store` retries transient failures inside each request, for up to the store's retry
//! budget (30 s by default), and logs every retry at INFO: during an outage each pending request
//! wrote a line every 0.1–5 s, and nothing said when the outage was over. The node's default log
//! filter keeps `object_store` at WARN, and this watch turns an outage into two lines of our own:
//! a warning when a request has had no answer for [`SLOW_AFTER`], and one, with how long it
//! lasted, when a request is answered promptly again.
//!
//! "Answered" means the server answered ([`Answer::reached_server`]): a success, or a refusal
//! only a server gives (not found, precondition failed, access denied). A request that gave up
//! after its retry budget ends nothing; its own error says what failed. Only a prompt answer
//! (under [`SLOW_AFTER`]) ends an outage: the requests that were retrying through it finish late
//! even once the server is back, and a slow one proves little.
//!
//! A request that carries many bytes (an SCO's PUT, a long ranged GET) is given longer: its
//! patience ([`patience`]) is [`SLOW_AFTER`] plus its bytes at [`SLOW_RATE`]. Without that, a
//! healthy 64 MiB upload over a link slower than about 20 MB/s said "S3 is not answering"
//! while S3 was answering all along.
//!
//! A pure state machine: the caller passes the clock's readings (no timers here).

use std::time::{Duration, Instant};

/// How long a request goes without an answer before the store says S3 is not answering. Longer
/// than a healthy request of the largest SCO takes on a LAN, shorter than the retry budget.
pub const SLOW_AFTER: Duration = Duration::from_secs(3);

/// Bytes per second below which moving a request's payload counts as S3 not answering
/// (10 MB/s: a 64 MiB SCO gets about 6.7 s on top of [`SLOW_AFTER`]).
pub const SLOW_RATE: u64 = 10_000_000;

/// How long a request that moves `bytes` of payload may go without an answer before it counts
/// as unanswered (and within which an answer counts as prompt).
pub fn patience(bytes: u64) -> Duration {
    SLOW_AFTER + Duration::from_secs_f64(bytes as f64 / SLOW_RATE as f64)
}

/// What the store should say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A request has had no answer for [`SLOW_AFTER`]: an outage began (when that request
    /// started, as far as anyone can tell).
    Began,
    /// A request was answered promptly after an outage that lasted this long.
    Ended { lasted: Duration },
}

/// Whether the store is in an outage, and since when.
#[derive(Debug, Default)]
pub struct OutageWatch {
    since: Option<Instant>,
}

impl OutageWatch {
    /// A request started at `started` has had no answer within its [`patience`].
    pub fn no_answer(&mut self, started: Instant) -> Option<Change> {
        if self.since.is_some() {
            return None;
        }
        self.since = Some(started);
        Some(Change::Began)
    }

    /// A request finished at `now`, after `took` of its `patience`; `reached` says whether the
    /// server answered it.
    pub fn finished(
        &mut self,
        took: Duration,
        patience: Duration,
        reached: bool,
        now: Instant,
    ) -> Option<Change> {
        if !reached || took >= patience {
            return None;
        }
        let since = self.since.take()?;
        Some(Change::Ended {
            lasted: now.saturating_duration_since(since),
        })
    }
}

/// The outcome of one request to the S3 client, as far as the watch cares.
pub trait Answer {
    /// Whether the server answered (success, or a refusal only a server gives).
    fn reached_server(&self) -> bool;
}

impl<T> Answer for Result<T, object_store::Error> {
    fn reached_server(&self) -> bool {
        match self {
            Ok(_) => true,
            Err(e) => matches!(
                e,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotModified { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
        }
    }
}

/// The conditional DELETE's outcome (`S3Store::delete_if_etag`): its errors are text, so only
/// a success counts.
impl Answer for Result<bool, String> {
    fn reached_server(&self) -> bool {
        self.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_and_ends_at_the_first_prompt_answer() {
        let t0 = Instant::now();
        let mut watch = OutageWatch::default();
        // Prompt answers in good times say nothing.
        assert_eq!(
            watch.finished(Duration::from_millis(20), SLOW_AFTER, true, t0),
            None
        );
        // Two requests stuck in the same outage: one warning.
        assert_eq!(watch.no_answer(t0), Some(Change::Began));
        assert_eq!(watch.no_answer(t0 + Duration::from_secs(1)), None);
        // Requests that retried through it finish late, or give up: not the end.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            watch.finished(Duration::from_secs(10), SLOW_AFTER, true, later),
            None
        );
        assert_eq!(
            watch.finished(Duration::from_millis(5), SLOW_AFTER, false, later),
            None
        );
        // A prompt answer from the server is, with the outage's length.
        assert_eq!(
            watch.finished(
                Duration::from_millis(30),
                SLOW_AFTER,
                true,
                t0 + Duration::from_secs(12)
            ),
            Some(Change::Ended {
                lasted: Duration::from_secs(12)
            })
        );
        // Said once: the next prompt answer says nothing; a new outage is a new warning.
        assert_eq!(
            watch.finished(Duration::from_millis(30), SLOW_AFTER, true, later),
            None
        );
        assert_eq!(watch.no_answer(later), Some(Change::Began));
    }

    #[test]
    fn a_large_payload_is_given_time_for_its_bytes() {
        assert_eq!(patience(0), SLOW_AFTER);
        let sco = patience(64 << 20);
        assert!(
            sco > Duration::from_secs(9) && sco < Duration::from_secs(10),
            "{sco:?}"
        );
        // A 64 MiB upload that took 8 s was prompt: it ends an outage...
        let t0 = Instant::now();
        let mut watch = OutageWatch::default();
        assert_eq!(watch.no_answer(t0), Some(Change::Began));
        let now = t0 + Duration::from_secs(20);
        assert!(matches!(
            watch.finished(Duration::from_secs(8), sco, true, now),
            Some(Change::Ended { .. })
        ));
        // ...and a 4 KiB read that took as long was not.
        assert_eq!(watch.no_answer(now), Some(Change::Began));
        let small = patience(4096);
        assert_eq!(
            watch.finished(Duration::from_secs(8), small, true, now),
            None
        );
    }

    #[test]
    fn only_what_a_server_says_counts_as_an_answer() {
        let found: Result<(), object_store::Error> = Err(object_store::Error::NotFound {
            path: "k".into(),
            source: "gone".into(),
        });
        assert!(found.reached_server());
        let refused: Result<(), object_store::Error> = Err(object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        });
        assert!(!refused.reached_server());
        assert!(Ok::<_, object_store::Error>(()).reached_server());
        assert!(Ok::<bool, String>(false).reached_server());
        assert!(!Err::<bool, String>("giving up".into()).reached_server());
    }
}
