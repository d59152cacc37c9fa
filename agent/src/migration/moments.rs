//! Where the guest's pause goes: the moments each agent marks while the guest is paused, and
//! the stages between them.
//!
//! ```text
//! source QEMU STOP ─ backlog ─> source read the switchover (the first section END)
//!                  ─ final ───> source read QEMU's last byte (EOF)
//!                  ─ source ──> source flushed the link's END frame
//!                  ─ link ────> target read END
//!                  ─ target ──> target delivered its QEMU's last byte
//!                  ─ load ────> target QEMU RESUME
//! ```
//! - backlog: the stream QEMU had written before the stop that the source agent had not yet
//!   read (QEMU's socket and the agent's queues);
//! - final: QEMU's final iteration and device state, at the rate the source agent reads them;
//! - source: what the source agent still had to process, frame and write after QEMU was done;
//! - link: the END frame's transit;
//! - target: what the target still had to fetch and write after the last frame arrived;
//! - load: the target QEMU loading the device state and starting the guest.
//!
//! Each agent marks its moments on its own wall clock (microseconds since the epoch); the
//! source's and the target's come together in END and DONE ([`super::link::LinkStats`]). Across
//! two hosts a stage between the two agents' moments is as exact as the clocks' agreement (as
//! the pause itself, from QMP events): it can even come out negative.
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// One agent's moments, in microseconds since the epoch; 0: not reached (or an older agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moments {
    /// Source: read the switchover.
    #[serde(default)]
    pub switchover_us: u64,
    /// Source: read QEMU's EOF.
    #[serde(default)]
    pub qemu_eof_us: u64,
    /// Source: flushed END onto the link. Target: read END off it.
    #[serde(default)]
    pub end_us: u64,
    /// Target: delivered the last byte to its QEMU.
    #[serde(default)]
    pub delivered_us: u64,
}

/// What an agent can mark.
#[derive(Clone, Copy, Debug)]
pub enum Moment {
    Switchover,
    QemuEof,
    End,
    Delivered,
}

/// Live marks, first one of each kind kept.
#[derive(Debug, Default)]
pub struct Marks {
    at: [AtomicU64; 4],
}

impl Marks {
    /// Marks `m` now, unless it was marked before.
    pub fn mark(&self, m: Moment) {
        let _ = self.at[m as usize].compare_exchange(0, now_us(), Relaxed, Relaxed);
    }

    pub fn snapshot(&self) -> Moments {
        let get = |m: Moment| self.at[m as usize].load(Relaxed);
        Moments {
            switchover_us: get(Moment::Switchover),
            qemu_eof_us: get(Moment::QemuEof),
            end_us: get(Moment::End),
            delivered_us: get(Moment::Delivered),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// The guest's pause by stage, in milliseconds; a stage is `None` when a moment around it is
/// unknown (the parser saw no switchover, an older peer, no STOP or RESUME event).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseStages {
    pub paused_backlog_ms: Option<f64>,
    pub paused_final_ms: Option<f64>,
    pub paused_source_ms: Option<f64>,
    pub paused_link_ms: Option<f64>,
    pub paused_target_ms: Option<f64>,
    pub paused_load_ms: Option<f64>,
}

impl PauseStages {
    /// The stages between the source QEMU's STOP, the agents' moments and the target QEMU's
    /// RESUME (both events as times since the epoch).
    pub fn between(
        stop: Option<Duration>,
        source: &Moments,
        target: &Moments,
        resume: Option<Duration>,
    ) -> Self {
        let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
        let (stop, resume) = (us(stop), us(resume));
        let ms = |from: u64, to: u64| {
            (from != 0 && to != 0).then(|| (to as i64 - from as i64) as f64 / 1e3)
        };
        Self {
            paused_backlog_ms: ms(stop, source.switchover_us),
            paused_final_ms: ms(source.switchover_us, source.qemu_eof_us),
            paused_source_ms: ms(source.qemu_eof_us, source.end_us),
            paused_link_ms: ms(source.end_us, target.end_us),
            paused_target_ms: ms(target.end_us, target.delivered_us),
            paused_load_ms: ms(target.delivered_us, resume),
        }
    }

    /// One line: each known stage and its share.
    pub fn text(&self) -> String {
        let parts: Vec<String> = [
            ("backlog", self.paused_backlog_ms),
            ("final", self.paused_final_ms),
            ("source", self.paused_source_ms),
            ("link", self.paused_link_ms),
            ("target", self.paused_target_ms),
            ("load", self.paused_load_ms),
        ]
        .iter()
        .filter_map(|(name, ms)| ms.map(|ms| format!("{name} {ms:.1}")))
        .collect();
        if parts.is_empty() {
            "unknown".to_string()
        } else {
            format!("{} ms", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_mark_counts() {
        let marks = Marks::default();
        marks.mark(Moment::QemuEof);
        let first = marks.snapshot().qemu_eof_us;
        std::thread::sleep(Duration::from_millis(2));
        marks.mark(Moment::QemuEof);
        assert_eq!(marks.snapshot().qemu_eof_us, first);
        assert_eq!(marks.snapshot().switchover_us, 0);
    }

    #[test]
    fn stages_span_consecutive_moments() {
        let source = Moments {
            switchover_us: 1_002_000,
            qemu_eof_us: 1_010_000,
            end_us: 1_012_500,
            delivered_us: 0,
        };
        let target = Moments {
            switchover_us: 0,
            qemu_eof_us: 0,
            end_us: 1_012_700,
            delivered_us: 1_020_000,
        };
        let s = PauseStages::between(
            Some(Duration::from_micros(1_000_000)),
            &source,
            &target,
            Some(Duration::from_micros(1_030_000)),
        );
        assert_eq!(s.paused_backlog_ms, Some(2.0));
        assert_eq!(s.paused_final_ms, Some(8.0));
        assert_eq!(s.paused_source_ms, Some(2.5));
        assert_eq!(s.paused_link_ms, Some(0.2));
        assert_eq!(s.paused_target_ms, Some(7.3));
        assert_eq!(s.paused_load_ms, Some(10.0));
        // Without a STOP event, and with an older target, those stages are unknown.
        let s = PauseStages::between(None, &source, &Moments::default(), None);
        assert_eq!(s.paused_backlog_ms, None);
        assert_eq!(s.paused_link_ms, None);
        assert_eq!(s.paused_final_ms, Some(8.0));
        assert_eq!(s.text(), "final 8.0, source 2.5 ms");
    }
}
