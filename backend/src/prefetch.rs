//! Reading a run of objects in order with several gets in flight: how a volume's history is
//! replayed (restart, adoption) and how an MDS slave catches up.
//!
//! A replay applies TLogs strictly in list order, but nothing stops it from fetching the next
//! few while it applies one. On S3 or the EC tier each get is a network round trip (a few
//! milliseconds on loopback, tens against a real S3), so fetching one TLog at a time made a
//! replay's length the sum of its round trips. [`in_order`] runs `fetch` (the get and whatever
//! checking can be done on one object alone, such as parsing it and verifying its CRCs) on up to
//! `depth` worker threads, and hands the results to `apply` on the caller's thread in index
//! order.
//!
//! Invariants: `apply` sees every index from 0 to `count - 1` exactly once, in order, unless an
//! error stops the run; at most `depth` fetched results wait for `apply` at any time, so memory
//! stays bounded however long the history; the first error (from a fetch of the next index to
//! apply, or from `apply`) is returned, and the workers stop claiming indexes once it is seen.
//!
//! Hand-written over std threads rather than a crate: rayon's parallel iterators collect a whole
//! run (unbounded memory for a long history) and would add a global thread pool to every process
//! linking the backend; the ordered, bounded hand-off needs one mutex and a condition variable
//! (parking_lot's, as elsewhere in this crate: no poisoning to unwrap).

use std::collections::BTreeMap;
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex};

/// How many gets a replay keeps in flight by default.
pub const DEFAULT_DEPTH: usize = 8;

/// Which indexes workers may claim: the next unclaimed one, up to `applied + depth`.
struct Window {
    next: usize,
    applied: usize,
    stopped: bool,
}

/// Run `fetch(i)` for `i` in `0..count` on up to `depth` threads and `apply(i, value)` on the
/// calling thread in index order (see the module docs). With `count <= 1` or `depth <= 1`
/// everything runs on the calling thread.
pub fn in_order<T, E>(
    count: usize,
    depth: usize,
    fetch: impl Fn(usize) -> Result<T, E> + Sync,
    mut apply: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
    E: Send,
{
    if count <= 1 || depth <= 1 {
        for index in 0..count {
            apply(index, fetch(index)?)?;
        }
        return Ok(());
    }
    let window = Mutex::new(Window {
        next: 0,
        applied: 0,
        stopped: false,
    });
    let moved = Condvar::new();
    let (sender, results) = mpsc::channel::<(usize, Result<T, E>)>();
    std::thread::scope(|scope| {
        for _ in 0..depth.min(count) {
            let sender = sender.clone();
            let (fetch, window, moved) = (&fetch, &window, &moved);
            scope.spawn(move || loop {
                let index = {
                    let mut w = window.lock();
                    while !w.stopped && w.next < count && w.next >= w.applied + depth {
                        moved.wait(&mut w);
                    }
                    if w.stopped || w.next >= count {
                        return;
                    }
                    w.next += 1;
                    w.next - 1
                };
                if sender.send((index, fetch(index))).is_err() {
                    return;
                }
            });
        }
        drop(sender);
        let mut waiting: BTreeMap<usize, Result<T, E>> = BTreeMap::new();
        let outcome = (|| {
            for index in 0..count {
                let value = loop {
                    if let Some(value) = waiting.remove(&index) {
                        break value;
                    }
                    match results.recv() {
                        Ok((i, value)) => {
                            waiting.insert(i, value);
                        }
                        // Every worker returned without sending `index`: only a panic does
                        // that, and the scope re-raises it.
                        Err(_) => panic!("a prefetch worker died before fetching object {index}"),
                    }
                };
                apply(index, value?)?;
                window.lock().applied = index + 1;
                moved.notify_all();
            }
            Ok(())
        })();
        window.lock().stopped = true;
        moved.notify_all();
        outcome
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn applies_every_index_once_in_order_with_bounded_look_ahead() {
        for (count, depth) in [(0, 8), (1, 8), (5, 1), (100, 8), (7, 3), (3, 16)] {
            let applied = AtomicUsize::new(0);
            let mut seen = Vec::new();
            in_order::<usize, String>(
                count,
                depth,
                |i| {
                    // Never more than `depth` claimed beyond what was applied.
                    let ahead = i - applied.load(Ordering::SeqCst);
                    assert!(ahead < depth.max(1), "index {i} fetched {ahead} ahead");
                    // Later indexes finish first now and then.
                    std::thread::sleep(Duration::from_micros(((count - i) % 4) as u64 * 200));
                    Ok(i * 10)
                },
                |i, value| {
                    assert_eq!(value, i * 10);
                    seen.push(i);
                    applied.store(i + 1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(seen, (0..count).collect::<Vec<_>>(), "{count} by {depth}");
        }
    }

    #[test]
    fn the_first_error_in_order_stops_the_run() {
        let mut seen = Vec::new();
        let fetched = AtomicUsize::new(0);
        let error = in_order(
            1000,
            4,
            |i| {
                fetched.fetch_add(1, Ordering::SeqCst);
                if i == 6 || i == 9 {
                    Err(format!("object {i} is corrupt"))
                } else {
                    Ok(i)
                }
            },
            |i, _| {
                seen.push(i);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(error, "object 6 is corrupt");
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        assert!(
            fetched.load(Ordering::SeqCst) <= 6 + 4,
            "workers stopped claiming"
        );

        let error = in_order(50, 4, Ok::<usize, String>, |i, _| {
            if i == 3 {
                Err("apply failed".to_string())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(error, "apply failed");
    }
}
