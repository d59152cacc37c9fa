//! How fast a VM dirties memory, from QEMU itself: QMP `calc-dirty-rate`, which works on any
//! accelerator (page sampling: QEMU hashes a sample of pages at the start and the end of a
//! window and counts those that changed; on KVM the dirty ring or dirty bitmap can be asked
//! for instead).
//!
//! ```text
//! connect -> calc-dirty-rate {window, sample pages} -> disconnect   (QEMU measures alone)
//! wait the window -> connect -> query-dirty-rate -> disconnect -> Sample -> Smoothed
//! ```
//! The monitor is held a few milliseconds at each end, never for the window: QEMU serves one
//! client per monitor, and the operator's tools or `agent migrate` may want it in between.
use std::{
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::json;

use crate::qmp::{Qmp, QmpError};

/// Pages QEMU samples per GiB of RAM (QEMU's own default is 512; more sampled pages make a
/// finer estimate for a few more microseconds of hashing).
pub const SAMPLE_PAGES: u64 = 4096;
/// How long a QMP step may wait: longer means another client holds the monitor.
const STEP_LIMIT: Duration = Duration::from_secs(2);

/// Why no dirty rate could be measured.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("QMP socket unreachable: {0}")]
    Gone(QmpError),
    #[error("the monitor is busy (another client holds it)")]
    Busy,
    #[error("QEMU refused calc-dirty-rate: {0}")]
    Refused(QmpError),
    #[error("QMP failed: {0}")]
    Qmp(#[from] QmpError),
    #[error("QEMU did not finish measuring within {0:?}")]
    Unfinished(Duration),
    #[error("QEMU's answer has no dirty rate: {0}")]
    Unreadable(String),
    #[error(
        "not measured: a migration is under way ({0}), and KVM's dirty logging is the \
         migration's until it ends"
    )]
    Migrating(String),
}

/// How QEMU measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyMode {
    /// Hash sampled pages (any accelerator, TCG included).
    #[default]
    PageSampling,
    /// KVM's dirty ring (KVM with `dirty-ring-size` only).
    DirtyRing,
    /// KVM's dirty bitmap (KVM only; dirty logging on for the window).
    DirtyBitmap,
}

impl DirtyMode {
    /// The mode's name in `calc-dirty-rate`.
    pub fn qmp_name(self) -> &'static str {
        match self {
            Self::PageSampling => "page-sampling",
            Self::DirtyRing => "dirty-ring",
            Self::DirtyBitmap => "dirty-bitmap",
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Bytes of memory dirtied per second over the window: QEMU's figure (it reports MiB/s),
    /// pooled with the agent's own sampler's when there is one (see [`Sample::pool`]).
    pub bytes_per_sec: f64,
    /// QEMU's figure alone.
    pub qemu_bytes_per_sec: f64,
    /// The agent's sampler's figure over about the same window, if it took one.
    pub sampler_bytes_per_sec: Option<f64>,
    pub window_ms: u64,
    pub mode: DirtyMode,
    /// When the window ended.
    #[serde(skip)]
    pub at: SystemTime,
    /// The monitor time the measurement cost: both QMP exchanges, connects included.
    pub monitor_ms: f64,
}

impl Sample {
    /// Pools QEMU's figure (from `qemu_pages` sampled pages) with the agent sampler's `rate`
    /// (from `pages`): the mean weighted by pages sampled.
    pub fn pool(&mut self, rate: f64, pages: f64, qemu_pages: f64) {
        let (a, b) = (qemu_pages.max(0.0), pages.max(0.0));
        if a + b > 0.0 {
            self.bytes_per_sec = (self.qemu_bytes_per_sec * a + rate * b) / (a + b);
        }
        self.sampler_bytes_per_sec = Some(rate);
    }
}

/// Measures once in the best mode the accelerator has: under KVM its dirty ring, or, when QEMU
/// runs without `dirty-ring-size` and refuses that, its dirty bitmap (both count every page
/// written, with dirty logging on for the window); under TCG, page sampling.
pub async fn measure_for(qmp: &Path, window: Duration, kvm: bool) -> Result<Sample, DirtyError> {
    if !kvm {
        return measure(qmp, window, DirtyMode::PageSampling).await;
    }
    // KVM's modes start, sync and stop dirty logging themselves; a migration relies on the
    // same logging, so a VM being migrated is left alone (the migration reports its own rate).
    let mut session = open(qmp).await?;
    let state = session
        .execute_timeout("query-migrate", None, STEP_LIMIT)
        .await?;
    drop(session);
    let status = state["status"].as_str().unwrap_or("none");
    if !matches!(status, "none" | "completed" | "failed" | "cancelled") {
        return Err(DirtyError::Migrating(status.to_string()));
    }
    match measure(qmp, window, DirtyMode::DirtyRing).await {
        Err(DirtyError::Refused(e)) => {
            tracing::debug!("dirty-ring mode refused ({e}); measuring with the dirty bitmap");
            measure(qmp, window, DirtyMode::DirtyBitmap).await
        }
        r => r,
    }
}

/// Measures once: asks QEMU behind `qmp` to measure for `window`, and reads the result.
pub async fn measure(qmp: &Path, window: Duration, mode: DirtyMode) -> Result<Sample, DirtyError> {
    let ms = window.as_millis().clamp(100, 60_000) as u64;
    let mut args =
        json!({"calc-time": ms, "calc-time-unit": "millisecond", "mode": mode.qmp_name()});
    if mode == DirtyMode::PageSampling {
        args["sample-pages"] = json!(SAMPLE_PAGES);
    }
    let started = Instant::now();
    let mut session = open(qmp).await?;
    session
        .execute_timeout("calc-dirty-rate", Some(args), STEP_LIMIT)
        .await
        .map_err(|e| match e {
            QmpError::Command { .. } => DirtyError::Refused(e),
            QmpError::Timeout(_) => DirtyError::Busy,
            e => DirtyError::Qmp(e),
        })?;
    drop(session);
    let mut monitor = started.elapsed();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    // QEMU may take a moment past the window to hash the second round of samples.
    let deadline = Instant::now() + Duration::from_millis(ms) + STEP_LIMIT;
    loop {
        let asked = Instant::now();
        let mut session = open(qmp).await?;
        let reply = session
            .execute_timeout(
                "query-dirty-rate",
                Some(json!({"calc-time-unit": "millisecond"})),
                STEP_LIMIT,
            )
            .await?;
        drop(session);
        monitor += asked.elapsed();
        match reply["status"].as_str() {
            Some("measured") => {
                let mib = reply["dirty-rate"]
                    .as_f64()
                    .ok_or_else(|| DirtyError::Unreadable(reply.to_string()))?;
                return Ok(Sample {
                    bytes_per_sec: mib * (1 << 20) as f64,
                    qemu_bytes_per_sec: mib * (1 << 20) as f64,
                    sampler_bytes_per_sec: None,
                    window_ms: ms,
                    mode,
                    at: SystemTime::now(),
                    monitor_ms: monitor.as_secs_f64() * 1e3,
                });
            }
            Some("measuring") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some("measuring") => return Err(DirtyError::Unfinished(window + STEP_LIMIT)),
            _ => return Err(DirtyError::Unreadable(reply.to_string())),
        }
    }
}

/// A session on the monitor, or why not: a socket that refuses is gone, one that accepts but
/// never greets is held by another client.
async fn open(qmp: &Path) -> Result<Qmp, DirtyError> {
    match tokio::time::timeout(STEP_LIMIT, Qmp::connect(qmp)).await {
        Err(_) => Err(DirtyError::Busy),
        Ok(Err(e @ QmpError::Connect { .. })) => Err(DirtyError::Gone(e)),
        Ok(Err(e)) => Err(DirtyError::Qmp(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// A VM's dirty rate over time: the mean of its last [`WINDOW`] samples (a burst moves it by a
/// third at most, and it forgets one entirely after that many samples), with the age of the
/// newest and the last failure, so a stale figure is never shown as fresh.
#[derive(Clone, Debug, Default)]
pub struct Smoothed {
    recent: std::collections::VecDeque<f64>,
    mean: Option<f64>,
    last: Option<Sample>,
    samples: u64,
    error: Option<(String, SystemTime)>,
}

/// Samples in the mean.
pub const WINDOW: usize = 3;

impl Smoothed {
    pub fn add(&mut self, sample: Sample) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(sample.bytes_per_sec);
        self.mean = Some(self.recent.iter().sum::<f64>() / self.recent.len() as f64);
        self.samples += 1;
        self.last = Some(sample);
        self.error = None;
    }

    pub fn failed(&mut self, why: String) {
        self.error = Some((why, SystemTime::now()));
    }

    /// The smoothed rate in bytes per second, if ever measured.
    pub fn rate(&self) -> Option<f64> {
        self.mean
    }

    /// How old the newest sample is.
    pub fn age(&self) -> Option<Duration> {
        let at = self.last.as_ref()?.at;
        Some(SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// The figures for `agent status` and plans: rate, age, samples, last error.
    pub fn report(&self) -> DirtyReport {
        DirtyReport {
            bytes_per_sec: self.mean,
            last_bytes_per_sec: self.last.as_ref().map(|s| s.bytes_per_sec),
            last_qemu_bytes_per_sec: self.last.as_ref().map(|s| s.qemu_bytes_per_sec),
            last_sampler_bytes_per_sec: self.last.as_ref().and_then(|s| s.sampler_bytes_per_sec),
            age_s: self.age().map(|a| a.as_secs_f64()),
            samples: self.samples,
            mode: self.last.as_ref().map(|s| s.mode),
            monitor_ms: self.last.as_ref().map(|s| s.monitor_ms),
            error: self.error.as_ref().map(|(e, _)| e.clone()),
        }
    }
}

/// A dirty rate as reported: every figure carries its age.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct DirtyReport {
    /// Smoothed bytes per second; `None` until a sample succeeded.
    pub bytes_per_sec: Option<f64>,
    pub last_bytes_per_sec: Option<f64>,
    /// The newest sample's two figures before pooling: QEMU's, and the agent sampler's.
    #[serde(default)]
    pub last_qemu_bytes_per_sec: Option<f64>,
    #[serde(default)]
    pub last_sampler_bytes_per_sec: Option<f64>,
    /// Seconds since the newest sample.
    pub age_s: Option<f64>,
    pub samples: u64,
    #[serde(skip_deserializing)]
    pub mode: Option<DirtyMode>,
    pub monitor_ms: Option<f64>,
    /// Why the latest attempt failed (cleared by the next success).
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rate: f64) -> Sample {
        Sample {
            bytes_per_sec: rate,
            qemu_bytes_per_sec: rate,
            sampler_bytes_per_sec: None,
            window_ms: 1000,
            mode: DirtyMode::PageSampling,
            at: SystemTime::now(),
            monitor_ms: 1.0,
        }
    }

    #[test]
    fn pooling_weighs_each_figure_by_the_pages_behind_it() {
        let mut s = sample(100.0);
        s.pool(400.0, 2.0, 1.0);
        assert_eq!(s.bytes_per_sec, 300.0);
        assert_eq!(s.qemu_bytes_per_sec, 100.0);
        assert_eq!(s.sampler_bytes_per_sec, Some(400.0));
    }

    #[test]
    fn the_mean_follows_samples_and_a_failure_keeps_the_figure_with_its_age() {
        let mut s = Smoothed::default();
        assert_eq!(s.rate(), None);
        assert_eq!(s.report().age_s, None);
        s.add(sample(100.0));
        assert_eq!(s.rate(), Some(100.0));
        s.add(sample(300.0));
        assert_eq!(s.rate(), Some(200.0));
        s.add(sample(200.0));
        assert_eq!(s.rate(), Some(200.0));
        s.failed("the monitor is busy".into());
        let r = s.report();
        assert_eq!(r.bytes_per_sec, Some(200.0));
        assert_eq!(r.error.as_deref(), Some("the monitor is busy"));
        assert!(r.age_s.is_some_and(|a| a < 5.0));
        // The first sample (100) leaves the window.
        s.add(sample(400.0));
        assert_eq!(s.rate(), Some(300.0));
        assert_eq!(s.report().error, None);
        assert_eq!(s.report().samples, 4);
    }
}
