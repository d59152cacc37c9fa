//! The migration's bandwidth cap, applied to the agent link.
//!
//! Operators cap what a migration may take of the network with QEMU's `max-bandwidth`. Through
//! the agents QEMU's stream only goes to the local agent; what crosses the network is the agent
//! link. So the cap belongs on the link: `agent migrate` lifts QEMU's own cap for the migration
//! and paces the link to it instead (`crate::orchestrate::bandwidth`), and QEMU's stream runs as much
//! faster as the agents shrink it.
//!
//! Like QEMU's own limit, which holds while the guest runs and not for the final iteration
//! (QEMU sends that at full speed, with the guest paused), the cap is lifted at the switchover:
//! once the stream reaches its first section END, everything left is downtime.
//!
//! The pacer is a virtual clock (GCRA): each write is due when the writes before it would have
//! finished at the cap. A link that was idle may run up to [`BURST`] ahead of it, no more.
use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How far ahead of the cap a link that was idle may send.
pub const BURST: Duration = Duration::from_millis(10);

/// The cap in force, in bytes per second; shared with whoever may change it while the
/// migration runs (an operator's new `max-bandwidth`), and lifted for good at the switchover
/// by whoever sees it first: the source agent's reader when the stream reaches its first
/// section END, or `agent migrate` when the source QEMU reports that it stopped the guest
/// (earlier: the stream QEMU wrote before stopping still waits in the agents' queues then).
#[derive(Debug, Default)]
pub struct Cap {
    /// Zero: none.
    rate: AtomicU64,
    lifted: AtomicBool,
    /// Wakes writes waiting on the pacer when the cap is lifted.
    on_lift: tokio::sync::Notify,
}

impl Cap {
    /// `None` or 0: no cap.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            rate: AtomicU64::new(bytes_per_sec.unwrap_or(0)),
            lifted: AtomicBool::new(false),
            on_lift: tokio::sync::Notify::new(),
        }
    }

    pub fn set(&self, bytes_per_sec: Option<u64>) {
        self.rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// The configured cap, lifted or not.
    pub fn get(&self) -> Option<u64> {
        match self.rate.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// The guest is paused for the switchover: nothing is paced any more, and a write
    /// waiting on the pacer goes at once.
    pub fn lift(&self) {
        self.lifted.store(true, Ordering::Release);
        self.on_lift.notify_waiters();
    }

    /// Returns once the cap is lifted.
    async fn lifted(&self) {
        loop {
            let notified = self.on_lift.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a lift in between is not missed.
            notified.as_mut().enable();
            if self.lifted.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// The cap the link is paced to now: none once lifted.
    pub fn pacing(&self) -> Option<u64> {
        self.get().filter(|_| !self.lifted.load(Ordering::Acquire))
    }
}

/// When the writes to a capped link may go.
#[derive(Debug, Default)]
pub struct Pacer {
    /// When the next write is due; `None` after an uncapped write.
    due: Option<Instant>,
}

impl Pacer {
    /// How long a write of `bytes` made at `now` must wait under `cap` (bytes per second;
    /// `None` for none); counts it as sent.
    pub fn delay(&mut self, bytes: usize, cap: Option<u64>, now: Instant) -> Duration {
        let Some(rate) = cap else {
            self.due = None;
            return Duration::ZERO;
        };
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let due = self.due.map_or(earliest, |d| d.max(earliest));
        let takes = Duration::from_nanos(
            (bytes as u128 * 1_000_000_000 / u128::from(rate)).min(u64::MAX as u128) as u64,
        );
        self.due = Some(due + takes);
        due.saturating_duration_since(now)
    }

    /// Waits until a write of `bytes` may go under `cap`, or until the cap is lifted: a write
    /// held back when QEMU stops the guest must not sleep out its pacing inside the pause.
    pub async fn pace(&mut self, bytes: usize, cap: &Cap) {
        let wait = self.delay(bytes, cap.pacing(), Instant::now());
        if wait.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cap.lifted() => self.due = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn writes_are_spaced_at_the_cap() {
        let mut p = Pacer::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let cap = Some(100 * MB);
        // An idle link may be BURST ahead: 1 MB (10 ms at 100 MB/s) goes at once.
        assert_eq!(p.delay(1_000_000, cap, t0), Duration::ZERO);
        // The next is due when the first would have finished, less the burst.
        assert_eq!(p.delay(1_000_000, cap, t0), Duration::ZERO);
        assert_eq!(p.delay(1_000_000, cap, t0), Duration::from_millis(10));
        assert_eq!(p.delay(500_000, cap, t0), Duration::from_millis(20));
        assert_eq!(p.delay(1, cap, t0), Duration::from_millis(25));
    }

    #[test]
    fn at_most_a_burst_over_any_span() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let cap = Some(10 * MB);
        let mut sent_by = Vec::new();
        let mut clock = t0;
        let mut total = 0u64;
        for i in 0..1000 {
            let n = 1 + (i * 7919) % 300_000;
            clock += p.delay(n, cap, clock);
            total += n as u64;
            sent_by.push((clock, total));
            // Now and then the writer idles.
            if i % 97 == 0 {
                clock += Duration::from_millis(40);
            }
        }
        for (at, total) in sent_by {
            let secs = (at - t0).as_secs_f64() + BURST.as_secs_f64();
            // Bytes whose write began by `at`, less the one that just began.
            assert!(total as f64 <= secs * 1e7 + 300_000.0, "{total} by {secs}");
        }
    }

    #[test]
    fn idle_time_is_not_saved_up_beyond_the_burst() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let cap = Some(MB);
        assert_eq!(p.delay(10_000, cap, t0), Duration::ZERO);
        // A second later: only the burst (10 kB) may go without waiting.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.delay(10_000, cap, t1), Duration::ZERO);
        assert_eq!(p.delay(10_000, cap, t1), Duration::ZERO);
        assert_eq!(p.delay(10_000, cap, t1), Duration::from_millis(10));
    }

    #[test]
    fn no_cap_never_waits_and_forgets_the_clock() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        assert_eq!(p.delay(1 << 30, Some(MB), t0), Duration::ZERO);
        assert_eq!(p.delay(1 << 30, None, t0), Duration::ZERO);
        // Capped again: starts from now, not from the gigabyte before.
        assert_eq!(p.delay(1, Some(MB), t0), Duration::ZERO);
    }

    #[tokio::test]
    async fn lifting_the_cap_wakes_a_paced_write_at_once() {
        let cap = std::sync::Arc::new(Cap::new(Some(MB)));
        let mut p = Pacer::default();
        // The burst goes at once; a megabyte after it would wait about a second.
        p.pace(10_000, &cap).await;
        let lifter = {
            let cap = cap.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                cap.lift();
            })
        };
        let t = Instant::now();
        p.pace(1_000_000, &cap).await;
        p.pace(1_000_000, &cap).await;
        let waited = t.elapsed();
        lifter.await.unwrap();
        assert!(
            waited < Duration::from_millis(500),
            "waited {waited:?} after the lift"
        );
        assert!(
            waited >= Duration::from_millis(15),
            "did not wait before the lift"
        );
        assert_eq!(cap.pacing(), None);
        // A cap lifted before the write never waits.
        p.pace(1 << 30, &cap).await;
    }

    #[test]
    fn the_cap_is_shared_and_zero_means_none() {
        let cap = Cap::new(Some(5));
        assert_eq!(cap.get(), Some(5));
        cap.set(None);
        assert_eq!(cap.get(), None);
        assert_eq!(Cap::new(Some(0)).get(), None);
    }
}
