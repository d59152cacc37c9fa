//! Keeps the source QEMU's switchover decision honest about the agent link.
//!
//! QEMU stops the guest for the final iteration once what is left to send fits in its
//! `downtime-limit` at the bandwidth it measured: its own stream bytes per second. Through the
//! agents that is the link's rate times the reduction (3-4x, docs/benchmarks.md), so QEMU may stop
//! the guest with several times more left than the link can carry in the limit, and what is
//! left need not reduce as well as the average (a guest's own recent writes are not on the
//! NAS): the final iteration then crosses the link at link speed, inside the downtime.
//!
//! So `agent migrate` tells QEMU (`avail-switchover-bandwidth`, QEMU 8.2+, which QEMU then uses
//! for that decision instead of its measurement) the rate the agent link has been carrying,
//! as if nothing left would reduce, refreshes it while the migration runs, and puts the
//! operator's value back afterwards. An operator who set the parameter keeps it.
//!
//! For its first passes over guest RAM QEMU is told only a fraction of that rate
//! ([`strictness`]). What QEMU leaves for the pause is, for a guest that dirties little, the
//! tail of its first pass, and QEMU checks it only between send rounds of up to 50 ms: at the
//! link's rate it stopped a 512 MiB guest with 5.6-9.0 MB left where plain QEMU left 2.5-3.2
//! MB, and the pause took 25-40 ms against 5-12. Told 10 MB/s, it left 1.0 MB and the pause
//! was 9 ms, plain QEMU's (docs/design/switchover.md). A guest that dirties memory too fast to
//! converge under the strict value gets the full rate back within a few more passes, so the
//! migration converges wherever it did before.
use std::{collections::VecDeque, time::Instant};

use crate::{
    plan::model::strictness,
    qmp::{Qmp, QmpError},
};

const PARAMETER: &str = "avail-switchover-bandwidth";
/// Link-rate samples averaged (one per progress tick).
const SAMPLES: usize = 4;
/// A new estimate replaces the one QEMU has only when it differs by more than this fraction.
const CHANGE: f64 = 0.1;

/// The link rate, averaged over the last few intervals.
#[derive(Debug, Default)]
pub struct LinkRate {
    last: Option<(Instant, u64)>,
    samples: VecDeque<f64>,
}

impl LinkRate {
    /// Records that `bytes` had crossed the link by `at`; returns the average rate of the last
    /// [`SAMPLES`] intervals in bytes per second, once there is one.
    pub fn sample(&mut self, at: Instant, bytes: u64) -> Option<u64> {
        match self.last {
            None => self.last = Some((at, bytes)),
            Some((then, before)) => {
                let secs = at.saturating_duration_since(then).as_secs_f64();
                // A clock that did not move keeps the interval open.
                if secs > 0.0 {
                    if self.samples.len() == SAMPLES {
                        self.samples.pop_front();
                    }
                    self.samples
                        .push_back(bytes.saturating_sub(before) as f64 / secs);
                    self.last = Some((at, bytes));
                }
            }
        }
        let mean = self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64;
        (mean >= 1.0).then_some(mean as u64)
    }
}

/// The source QEMU's switchover bandwidth while `agent migrate` manages it.
#[derive(Debug)]
pub struct Switchover {
    /// What QEMU has now.
    current: u64,
    rate: LinkRate,
}

impl Switchover {
    /// Takes over the parameter if QEMU has it and the operator left it unset (0);
    /// `link_bytes`: what the link has carried so far. Until the first measurement QEMU is
    /// told 1 byte/s, so it does not stop the guest on a guess.
    pub async fn start(src: &mut Qmp, link_bytes: u64) -> Result<Option<Self>, QmpError> {
        let params = src.execute("query-migrate-parameters", None).await?;
        match params[PARAMETER].as_u64() {
            Some(0) => {
                set(src, 1).await?;
                let mut rate = LinkRate::default();
                rate.sample(Instant::now(), link_bytes);
                Ok(Some(Self { current: 1, rate }))
            }
            Some(_) => {
                tracing::info!("{PARAMETER} is set on the source QEMU: left as it is");
                Ok(None)
            }
            None => {
                tracing::info!(
                    "the source QEMU has no {PARAMETER} (before 8.2): it will judge the \
                     switchover by its stream rate, not the link's"
                );
                Ok(None)
            }
        }
    }

    /// Feeds the link bytes so far; tells QEMU a new rate (the link's, divided by the
    /// [`strictness`] of the pass QEMU is in) when it moved by more than [`CHANGE`].
    pub async fn update(&mut self, src: &mut Qmp, link_bytes: u64) -> Result<(), QmpError> {
        let Some(rate) = self.rate.sample(Instant::now(), link_bytes) else {
            return Ok(());
        };
        let (_, info) = src.migration().await?;
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let rate = (rate / strictness(syncs)).max(1);
        if (rate as f64 - self.current as f64).abs() > CHANGE * self.current as f64 {
            set(src, rate).await?;
            self.current = rate;
        }
        Ok(())
    }

    /// The rate QEMU was last told, bytes per second.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Puts the operator's value back: unset (0), the only value under which it is managed.
    pub async fn restore(self, src: &mut Qmp) -> Result<(), QmpError> {
        set(src, 0).await
    }
}

async fn set(src: &mut Qmp, bytes_per_sec: u64) -> Result<(), QmpError> {
    src.set_migration_parameter(PARAMETER, bytes_per_sec).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn averages_the_last_intervals() {
        let mut rate = LinkRate::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(rate.sample(at(0), 0), None, "no interval yet");
        // 100 MB/s, then 200 MB/s: the mean of both.
        assert_eq!(rate.sample(at(250), 25_000_000), Some(100_000_000));
        assert_eq!(rate.sample(at(500), 75_000_000), Some(150_000_000));
        // Four more intervals at 200 MB/s push the 100 MB/s one out.
        let mut bytes = 75_000_000;
        let mut last = None;
        for i in 3..=6 {
            bytes += 50_000_000;
            last = rate.sample(at(250 * i), bytes);
        }
        assert_eq!(last, Some(200_000_000));
        // An idle link averages down, never below one byte per second.
        for i in 7..=10 {
            last = rate.sample(at(250 * i), bytes);
        }
        assert_eq!(last, None);
    }

    #[test]
    fn a_clock_that_did_not_move_adds_no_sample() {
        let mut rate = LinkRate::default();
        let t0 = Instant::now();
        rate.sample(t0, 0);
        assert_eq!(rate.sample(t0, 1_000), None);
        assert_eq!(rate.sample(t0 + Duration::from_secs(1), 1_000), Some(1_000));
    }
}
