//! Per-migration figures: counted while the stream flows, reported as JSON, text and Prometheus.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex, PoisonError,
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    link::LinkStats,
    moments::{Marks, Moment, Moments},
};

/// Live counters of one migration (shared between the tasks that move the stream).
#[derive(Debug, Default)]
pub struct Counters {
    pub qemu_bytes: AtomicU64,
    pub link_bytes: AtomicU64,
    pub nas_bytes: AtomicU64,
    pub pages_full: AtomicU64,
    pub pages_mapped: AtomicU64,
    /// Of `pages_mapped`, those the memory-to-disk map placed (no index asked).
    pub pages_map: AtomicU64,
    /// Pages the map had a claim for whose content no longer matched it.
    pub pages_map_stale: AtomicU64,
    pub pages_dup: AtomicU64,
    pub pages_sent: AtomicU64,
    /// Of `pages_sent`, final-iteration pages forwarded unhashed while the link kept up.
    pub pages_verbatim: AtomicU64,
    pub fallbacks: AtomicU64,
    pub zstd_in_bytes: AtomicU64,
    pub zstd_out_bytes: AtomicU64,
    pub hash_ns: AtomicU64,
    /// QEMU and link bytes counted when the source saw the switchover (see
    /// [`Counters::switched_over`]); `None` before.
    switchover: Mutex<Option<(u64, u64)>>,
    /// Index-service lookups in flight.
    pub lookups: Busy,
    /// NAS fetch rounds under way.
    pub fetches: Busy,
    /// The moments of the guest's pause this end saw.
    pub marks: Marks,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Marks the switchover, which lay `qemu_at` bytes into QEMU's stream: what QEMU sent from
    /// there on, it sent with the guest paused. Only the first call counts.
    pub fn switched_over(&self, qemu_at: u64) {
        let mut at = self
            .switchover
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        at.get_or_insert_with(|| (qemu_at, self.link_bytes.load(Relaxed)));
        self.marks.mark(Moment::Switchover);
    }

    pub fn snapshot(&self) -> Figures {
        // The mark before the counters, which only grow: it never exceeds what they say then.
        let at = *self
            .switchover
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (qemu_bytes, link_bytes) =
            (self.qemu_bytes.load(Relaxed), self.link_bytes.load(Relaxed));
        Figures {
            qemu_bytes,
            link_bytes,
            paused_qemu_bytes: at.map_or(0, |(q, _)| qemu_bytes.saturating_sub(q)),
            paused_link_bytes: at.map_or(0, |(_, l)| link_bytes.saturating_sub(l)),
            nas_bytes: self.nas_bytes.load(Relaxed),
            pages_full: self.pages_full.load(Relaxed),
            pages_zero: 0,
            pages_mapped: self.pages_mapped.load(Relaxed),
            pages_map: self.pages_map.load(Relaxed),
            pages_map_stale: self.pages_map_stale.load(Relaxed),
            pages_dup: self.pages_dup.load(Relaxed),
            pages_sent: self.pages_sent.load(Relaxed),
            pages_verbatim: self.pages_verbatim.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            zstd_in_bytes: self.zstd_in_bytes.load(Relaxed),
            zstd_out_bytes: self.zstd_out_bytes.load(Relaxed),
            hash_ms: self.hash_ns.load(Relaxed) as f64 / 1e6,
            lookup_ms: self.lookups.ms(),
            fetch_ms: self.fetches.ms(),
            moments: self.marks.snapshot(),
        }
    }
}

impl From<&Figures> for LinkStats {
    /// What one end tells the other of its figures.
    fn from(f: &Figures) -> Self {
        LinkStats {
            qemu_bytes: f.qemu_bytes,
            pages_zero: f.pages_zero,
            nas_bytes: f.nas_bytes,
            fallbacks: f.fallbacks,
            fetch_us: (f.fetch_ms * 1e3) as u64,
            moments: f.moments,
        }
    }
}

impl From<LinkStats> for Figures {
    /// The other end's figures, as far as the link carries them.
    fn from(s: LinkStats) -> Self {
        Figures {
            qemu_bytes: s.qemu_bytes,
            pages_zero: s.pages_zero,
            nas_bytes: s.nas_bytes,
            fallbacks: s.fallbacks,
            fetch_ms: s.fetch_us as f64 / 1e3,
            moments: s.moments,
            ..Figures::default()
        }
    }
}

/// Wall time during which at least one of some overlapping operations (lookups in flight,
/// fetch rounds of several fetchers) was under way. The sum of their durations would count
/// the same moment once per operation and could exceed the migration's own time.
#[derive(Debug, Default)]
pub struct Busy {
    /// Operations under way, and since when at least one has been.
    state: Mutex<(usize, Option<Instant>)>,
    /// Finished busy periods.
    ns: AtomicU64,
}

impl Busy {
    /// One more operation is under way.
    pub fn begin(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 == 0 {
            state.1 = Some(Instant::now());
        }
        state.0 += 1;
    }

    /// `n` operations ended.
    pub fn end(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 -= n.min(state.0);
        if state.0 == 0 {
            if let Some(since) = state.1.take() {
                self.ns
                    .fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
            }
        }
    }

    /// Milliseconds busy so far, the current busy period included.
    pub fn ms(&self) -> f64 {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let current = state.1.map_or(0, |since| since.elapsed().as_nanos() as u64);
        (self.ns.load(Relaxed) + current) as f64 / 1e6
    }
}

/// A snapshot of [`Counters`], as sent in END/DONE frames and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub qemu_bytes: u64,
    pub link_bytes: u64,
    pub nas_bytes: u64,
    /// Full PAGE records QEMU sent.
    pub pages_full: u64,
    /// ZERO records QEMU sent.
    pub pages_zero: u64,
    pub pages_mapped: u64,
    /// Of `pages_mapped`, those the memory-to-disk map placed with no index round trip (the
    /// rest came from the index). Absent from older agents' reports.
    #[serde(default)]
    pub pages_map: u64,
    /// Pages the map had a claim for whose content had changed since: sent another way.
    #[serde(default)]
    pub pages_map_stale: u64,
    pub pages_dup: u64,
    /// Full pages forwarded with their content.
    pub pages_sent: u64,
    /// Of `pages_sent`, the pages of the final iteration (the guest paused) forwarded as QEMU
    /// sent them, neither hashed nor matched, because the link kept up (see
    /// [`super::source`]). Absent from older agents' reports.
    #[serde(default)]
    pub pages_verbatim: u64,
    /// Mapped pages the target had to ask the source for.
    #[serde(rename = "pages_fallback")]
    pub fallbacks: u64,
    /// Link frames the source sent compressed, and the ZSTD frames they went out as (both
    /// counted in `link_bytes` as the latter). Absent from older agents' reports.
    #[serde(default)]
    pub zstd_in_bytes: u64,
    #[serde(default)]
    pub zstd_out_bytes: u64,
    /// QEMU bytes that came from the read holding the switchover on (the final iteration and
    /// the device state, sent while the guest is paused), and the link bytes sent from then
    /// on (those, and the backlog the switchover found in the source agent): what the guest's
    /// pause waits for. 0 when the stream never reached a switchover the parser could see.
    #[serde(default)]
    pub paused_qemu_bytes: u64,
    #[serde(default)]
    pub paused_link_bytes: u64,
    /// Time spent hashing pages.
    pub hash_ms: f64,
    /// Time during which index-service lookups were in flight (overlapping lookups count
    /// once).
    pub lookup_ms: f64,
    /// Time during which NAS fetches were under way (overlapping fetches count once).
    pub fetch_ms: f64,
    /// This end's moments of the guest's pause (reported as stages, not as they are).
    #[serde(skip)]
    pub moments: Moments,
}

impl Figures {
    /// Bytes saved on the link, as a percentage of what QEMU produced.
    pub fn savings_pct(&self) -> f64 {
        if self.qemu_bytes == 0 {
            return 0.0;
        }
        100.0 * (1.0 - self.link_bytes as f64 / self.qemu_bytes as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bytes_while_paused_count_from_the_first_switchover() {
        let c = Counters::default();
        Counters::add(&c.qemu_bytes, 1000);
        Counters::add(&c.link_bytes, 300);
        let before = c.snapshot();
        assert_eq!((before.paused_qemu_bytes, before.paused_link_bytes), (0, 0));
        c.switched_over(1000);
        Counters::add(&c.qemu_bytes, 50);
        Counters::add(&c.link_bytes, 20);
        // A later call (the parser says it every read from then on) moves nothing.
        c.switched_over(1040);
        Counters::add(&c.qemu_bytes, 7);
        Counters::add(&c.link_bytes, 3);
        let after = c.snapshot();
        assert_eq!((after.qemu_bytes, after.link_bytes), (1057, 323));
        assert_eq!((after.paused_qemu_bytes, after.paused_link_bytes), (57, 23));
        // A switchover inside the last read: QEMU's bytes count from where it lay.
        let c = Counters::default();
        Counters::add(&c.qemu_bytes, 1000);
        c.switched_over(900);
        assert_eq!(c.snapshot().paused_qemu_bytes, 100);
    }

    #[test]
    fn overlapping_operations_count_once() {
        let busy = Busy::default();
        busy.begin();
        busy.begin();
        std::thread::sleep(Duration::from_millis(20));
        busy.end(1);
        std::thread::sleep(Duration::from_millis(20));
        busy.end(1);
        let first = busy.ms();
        // Two operations over ~40 ms: about 40 ms busy, not the ~60 ms their durations sum to.
        assert!((40.0..55.0).contains(&first), "{first}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(busy.ms(), first, "idle time is not busy time");
        busy.begin();
        busy.end(5);
        busy.end(1);
        assert!(busy.ms() >= first);
    }
}
