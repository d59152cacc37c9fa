//! Per-migration figures: counted while the stream flows, reported as JSON, text and Prometheus.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Live counters of one migration (shared between the tasks that move the stream).
#[derive(Debug, Default)]
pub struct Counters {
    pub qemu_bytes: AtomicU64,
    pub link_bytes: AtomicU64,
    pub nas_bytes: AtomicU64,
    pub pages_full: AtomicU64,
    pub pages_mapped: AtomicU64,
    pub pages_dup: AtomicU64,
    pub pages_sent: AtomicU64,
    pub fallbacks: AtomicU64,
    pub zstd_in_bytes: AtomicU64,
    pub zstd_out_bytes: AtomicU64,
    pub hash_ns: AtomicU64,
    pub lookup_ns: AtomicU64,
    pub fetch_ns: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> Figures {
        Figures {
            qemu_bytes: self.qemu_bytes.load(Relaxed),
            link_bytes: self.link_bytes.load(Relaxed),
            nas_bytes: self.nas_bytes.load(Relaxed),
            pages_full: self.pages_full.load(Relaxed),
            pages_zero: 0,
            pages_mapped: self.pages_mapped.load(Relaxed),
            pages_dup: self.pages_dup.load(Relaxed),
            pages_sent: self.pages_sent.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            zstd_in_bytes: self.zstd_in_bytes.load(Relaxed),
            zstd_out_bytes: self.zstd_out_bytes.load(Relaxed),
            hash_ms: self.hash_ns.load(Relaxed) as f64 / 1e6,
            lookup_ms: self.lookup_ns.load(Relaxed) as f64 / 1e6,
            fetch_ms: self.fetch_ns.load(Relaxed) as f64 / 1e6,
        }
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
    pub pages_dup: u64,
    /// Full pages forwarded with their content.
    pub pages_sent: u64,
    /// Mapped pages the target had to ask the source for.
    #[serde(rename = "pages_fallback")]
    pub fallbacks: u64,
    /// Link frames the source sent compressed, and the ZSTD frames they went out as (both
    /// counted in `link_bytes` as the latter). Absent from older agents' reports.
    #[serde(default)]
    pub zstd_in_bytes: u64,
    #[serde(default)]
    pub zstd_out_bytes: u64,
    pub hash_ms: f64,
    pub lookup_ms: f64,
    pub fetch_ms: f64,
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
