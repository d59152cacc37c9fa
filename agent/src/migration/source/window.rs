//! The stream window sized by time: how much of QEMU's stream may be framed ahead of what the
//! target has delivered to its QEMU.
//!
//! Everything in that window when QEMU stops the guest is delivered inside the guest's pause,
//! at the rate the target QEMU takes it. That rate can be far below the link's: a target QEMU
//! whose guest RAM is allocated on first write zeroes every new page it loads (about 250 MB/s
//! of stream on the test machine). A fixed 16 MiB window was 10.7 MB ahead at one measured
//! stop, some 40 ms of the pause. So the window is what the pipeline delivers in its round
//! trip plus [`QUEUE`]: the best delivery rate of the last second (ACKed stream bytes per
//! second, sampled every [`SAMPLE`]) times (the shortest recent ACK delay + `QUEUE`), never
//! under [`FLOOR`] (two ACK steps: the target acknowledges at least every
//! [`link::ACK_STEP`], so a smaller window could wait for an ACK that never comes) nor over the
//! configured maximum. Until a rate is known, the maximum applies.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::migration::link;

/// What may wait beyond the round trip: the backlog a stop finds, in time.
pub(super) const QUEUE: Duration = Duration::from_millis(8);
/// The least window: two ACK steps.
pub(super) const FLOOR: u64 = 2 * link::ACK_STEP;
/// How often the delivery rate is sampled, and over how long the best is kept.
const SAMPLE: Duration = Duration::from_millis(50);
const KEEP: Duration = Duration::from_secs(1);

/// Delivery rate and ACK delay, observed by the emitter.
pub(super) struct StreamWindow {
    max: u64,
    /// (when, stream bytes acknowledged then), one per [`SAMPLE`], the last [`KEEP`].
    samples: VecDeque<(Instant, u64)>,
    /// Best rate over the samples kept, bytes per second.
    rate: f64,
    /// Shortest ACK delay in this period and the one before (a period is [`KEEP`]).
    delay: (Option<Duration>, Option<Duration>),
    period_start: Instant,
}

impl StreamWindow {
    pub(super) fn new(max: u64, now: Instant) -> Self {
        Self {
            max,
            samples: VecDeque::new(),
            rate: 0.0,
            delay: (None, None),
            period_start: now,
        }
    }

    /// The target has acknowledged `acked` stream bytes in all, as of `now`.
    pub(super) fn acked(&mut self, now: Instant, acked: u64) {
        if self
            .samples
            .back()
            .is_some_and(|&(at, _)| now.duration_since(at) < SAMPLE)
        {
            return;
        }
        while self
            .samples
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > KEEP)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, acked));
        // The best rate goes with the samples it came from: recomputed over those kept.
        if self.samples.len() >= 2 {
            self.rate = self
                .samples
                .iter()
                .zip(self.samples.iter().skip(1))
                .map(|(&(t0, b0), &(t1, b1))| {
                    b1.saturating_sub(b0) as f64 / t1.duration_since(t0).as_secs_f64().max(1e-6)
                })
                .fold(0.0, f64::max);
        }
    }

    /// A flush sent at `sent` was acknowledged at `now`.
    pub(super) fn delay(&mut self, sent: Instant, now: Instant) {
        if now.duration_since(self.period_start) > KEEP {
            self.delay = (None, self.delay.0);
            self.period_start = now;
        }
        let d = now.duration_since(sent);
        self.delay.0 = Some(self.delay.0.map_or(d, |m| m.min(d)));
    }

    /// Stream bytes that may be ahead of the target's acknowledgement now.
    pub(super) fn bytes(&self) -> u64 {
        let delay = match self.delay {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return self.max,
        };
        if self.rate <= 0.0 {
            return self.max;
        }
        let want = self.rate * (delay + QUEUE).as_secs_f64();
        (want as u64).clamp(FLOOR.min(self.max), self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn the_maximum_holds_until_a_rate_and_a_delay_are_known() {
        let t = Instant::now();
        let mut w = StreamWindow::new(16 << 20, t);
        assert_eq!(w.bytes(), 16 << 20);
        w.acked(t, 0);
        w.acked(t + Duration::from_millis(100), 25 * MB);
        assert_eq!(w.bytes(), 16 << 20, "no delay known yet");
        w.delay(t, t + Duration::from_millis(2));
        // 250 MB/s for 2 + 8 ms: 2.5 MB.
        let b = w.bytes();
        assert!((2_400_000..2_600_000).contains(&b), "{b}");
    }

    #[test]
    fn a_slow_target_shrinks_it_to_the_floor_and_a_long_round_trip_widens_it() {
        let t = Instant::now();
        let mut w = StreamWindow::new(16 << 20, t);
        w.acked(t, 0);
        w.acked(t + Duration::from_millis(100), MB);
        w.delay(t, t + Duration::from_millis(1));
        assert_eq!(w.bytes(), FLOOR, "10 MB/s for 9 ms is under two ACK steps");
        // 1 GB/s over a 40 ms round trip: 48 MB, capped at the maximum.
        let mut w = StreamWindow::new(64 << 20, t);
        w.acked(t, 0);
        w.acked(t + Duration::from_millis(100), 100 * MB);
        w.delay(t, t + Duration::from_millis(40));
        let b = w.bytes();
        assert!((47 * MB..49 * MB).contains(&b), "{b}");
    }

    #[test]
    fn the_best_rate_of_the_last_second_counts_and_older_ones_expire() {
        let t = Instant::now();
        let mut w = StreamWindow::new(64 << 20, t);
        w.delay(t, t + Duration::from_millis(2));
        w.acked(t, 0);
        w.acked(t + Duration::from_millis(100), 50 * MB); // 500 MB/s
        w.acked(t + Duration::from_millis(200), 55 * MB); // 50 MB/s: idle, the best stays
        let b = w.bytes();
        assert!((4_900_000..5_100_000).contains(&b), "{b}");
        // Two seconds on at 50 MB/s: the 500 MB/s sample has expired.
        let mut at = t + Duration::from_millis(200);
        let mut bytes = 55 * MB;
        for _ in 0..20 {
            at += Duration::from_millis(100);
            bytes += 5 * MB;
            w.acked(at, bytes);
        }
        w.delay(at, at + Duration::from_millis(2));
        assert_eq!(w.bytes(), FLOOR, "50 MB/s for 10 ms is under the floor");
    }
}
