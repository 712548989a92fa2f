//! The machine's busy CPU time over a measured window, for reports of CPU per I/O.
//!
//! Why the whole machine and not the processes under test: through `vstor edge` one I/O is
//! worked on by three processes (the load generator, the edge, the node), and the kernel's part
//! (loopback TCP's softirqs, the veth pair, the scheduler's wake-ups) is charged to whichever
//! task happened to be running. `/proc/stat` counts all of it, so "CPU per I/O" of two paths
//! measured one after the other on an otherwise idle machine compares what each path costs.
//! Busy is user + nice + system + irq + softirq: idle and iowait are not work, steal is the
//! hypervisor's, and guest time is already inside user.
//!
//! procfs (eminence/procfs, the crate most Rust tools read `/proc` with) rather than parsing
//! `/proc/stat` by hand: it knows the optional columns of older kernels and the tick rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use procfs::{CurrentSI, KernelStats};

/// Longest sleep between looks at the abort flag.
const SLICE: Duration = Duration::from_millis(100);

/// Busy CPU time of the whole machine since boot, in seconds; `None` if `/proc/stat` cannot be
/// read (the report then leaves the column empty).
pub(crate) fn busy_seconds() -> Option<f64> {
    let total = KernelStats::current().ok()?.total;
    let ticks = total.user
        + total.nice
        + total.system
        + total.irq.unwrap_or(0)
        + total.softirq.unwrap_or(0);
    Some(ticks as f64 / procfs::ticks_per_second() as f64)
}

/// Busy CPU seconds between `from` and `until` (both in the future or now), or `None` if the
/// window was cut short by `abort` or `/proc/stat` could not be read. Blocks until `until`.
pub(crate) fn busy_between(from: Instant, until: Instant, abort: &AtomicBool) -> Option<f64> {
    let wait = |deadline: Instant| -> bool {
        loop {
            if abort.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(SLICE));
        }
    };
    if !wait(from) {
        return None;
    }
    let start = busy_seconds()?;
    if !wait(until) {
        return None;
    }
    Some(busy_seconds()? - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_shows_as_busy_time() {
        let abort = AtomicBool::new(false);
        let from = Instant::now() + Duration::from_millis(50);
        let until = from + Duration::from_millis(500);
        let busy = std::thread::scope(|scope| {
            let meter = scope.spawn(|| busy_between(from, until, &abort));
            // Keep one CPU busy through the whole window.
            let mut x = 0u64;
            while Instant::now() < until + Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            meter.join().expect("meter thread")
        })
        .expect("/proc/stat is readable");
        // One CPU for 0.5 s, counted in ticks of 10 ms: at least 0.4 s, at most every CPU.
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
        assert!(busy >= 0.4, "busy {busy} s");
        assert!(busy <= 0.5 * cpus + 0.05, "busy {busy} s on {cpus} CPUs");
    }

    #[test]
    fn an_aborted_window_measures_nothing() {
        let abort = AtomicBool::new(true);
        let now = Instant::now();
        assert_eq!(
            busy_between(now, now + Duration::from_secs(5), &abort),
            None
        );
    }
}
