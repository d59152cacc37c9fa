//! The per-migration report `agent migrate` and `agent source` print: the figures of both
//! link ends, QEMU's times, where the guest runs, and the Prometheus counters it adds to.
use serde::{Deserialize, Serialize};

use crate::{
    migration::{moments::PauseStages, report::Figures},
    plan::model::Forecast,
};

/// The per-migration report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The target QEMU runs the guest after the source QEMU completed.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// What went wrong although the guest moved (the agents failed after the target QEMU had
    /// the whole stream: the target's own figures are then missing from the report).
    pub warning: Option<String>,
    /// The source's figures, with what only the target knows: NAS bytes, fallbacks, fetch time.
    #[serde(flatten)]
    pub figures: Figures,
    pub savings_pct: f64,
    /// QEMU's `total-time`; for a migration that failed, from `migrate` until it ended.
    pub total_time_ms: u64,
    /// QEMU's own figure: from stopping the guest until the source QEMU had written the rest of
    /// its stream.
    pub downtime_ms: u64,
    /// What the guest noticed: from the source QEMU stopping it to the target QEMU resuming it
    /// (QMP STOP and RESUME events, two hosts' clocks; see [`crate::qmp::guest_pause`]).
    pub guest_paused_ms: Option<u64>,
    /// Where that pause went, stage by stage (`paused_*_ms`, see
    /// [`crate::migration::moments`]).
    #[serde(flatten)]
    pub pause: PauseStages,
    pub passthrough_reason: Option<String>,
    pub source_status: String,
    pub target_status: String,
    /// Whether the target QEMU had all its guest RAM allocated before the stream came
    /// (`-mem-prealloc`); otherwise it zeroes a fresh page at the first write to each one while
    /// loading, which can bound the migration's time. `None`: QEMU did not say.
    pub target_ram_preallocated: Option<bool>,
    /// The agent link's rate (bytes/s) last given to the source QEMU for its switchover
    /// decision (`avail-switchover-bandwidth`); `None` when QEMU judged by its own measurement.
    pub switchover_bandwidth: Option<u64>,
    /// The cap (bytes/s) the agent link was paced to while the guest ran: `--max-bandwidth`,
    /// or the source QEMU's `max-bandwidth`, lifted from QEMU's stream meanwhile; `None`: none.
    pub link_bandwidth: Option<u64>,
    /// What `agent plan` predicted for this migration through the agents, made just before it
    /// started (see [`crate::plan`]); `None` when no prediction could be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Forecast>,
}

impl MigrationReport {
    /// A human summary.
    pub fn text(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut s = format!(
            "migration {}\n  QEMU bytes   {:>10.1} MiB\n  link bytes   {:>10.1} MiB  \
             (saved {:.1}%)\n  NAS fetched  {:>10.1} MiB\n  pages        full {} zero {} \
             mapped {} dup {} sent {} (of them verbatim in the pause {}) fallback {}\n  \
             zstd         {:.1} MiB of frames sent as {:.1} MiB\n  total time   {} ms, \
             downtime {} ms, \
             guest paused {}\n  pause stages {}\n  while paused {:.1} MiB of QEMU's stream, {:.1} MiB on the link\n  \
             hashing {:.0} ms, lookups in flight {:.0} ms, NAS fetches under way {:.0} ms\n  \
             source {}, target {}\n  \
             target RAM   {}\n  link cap     {}\n  switchover   judged at {}",
            if self.ok { "completed" } else { "FAILED" },
            mib(self.figures.qemu_bytes),
            mib(self.figures.link_bytes),
            self.savings_pct,
            mib(self.figures.nas_bytes),
            self.figures.pages_full,
            self.figures.pages_zero,
            self.figures.pages_mapped,
            self.figures.pages_dup,
            self.figures.pages_sent,
            self.figures.pages_verbatim,
            self.figures.fallbacks,
            mib(self.figures.zstd_in_bytes),
            mib(self.figures.zstd_out_bytes),
            self.total_time_ms,
            self.downtime_ms,
            self.guest_paused_ms
                .map_or("unknown".to_string(), |ms| format!("{ms} ms")),
            self.pause.text(),
            mib(self.figures.paused_qemu_bytes),
            mib(self.figures.paused_link_bytes),
            self.figures.hash_ms,
            self.figures.lookup_ms,
            self.figures.fetch_ms,
            self.source_status,
            self.target_status,
            match self.target_ram_preallocated {
                Some(true) => "preallocated",
                Some(false) => "allocated on first write",
                None => "unknown",
            },
            match self.link_bandwidth {
                Some(b) if b < super::bandwidth::LIFTED => {
                    format!("{:.1} MB/s until the switchover", b as f64 / 1e6)
                }
                _ => "none".to_string(),
            },
            match self.switchover_bandwidth {
                Some(b) => format!("{:.1} MB/s (the agent link's rate)", b as f64 / 1e6),
                None => "QEMU's own stream rate".to_string(),
            },
        );
        if let Some(p) = &self.predicted {
            s.push_str(&format!("\n  {}", self.against(p)));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!("\n  error: {e}"));
        }
        if let Some(w) = &self.warning {
            s.push_str(&format!("\n  warning: {w}"));
        }
        s
    }

    /// Predicted against measured, one line.
    pub fn against(&self, p: &Forecast) -> String {
        let mib = |b: f64| b / (1 << 20) as f64;
        let off = |predicted: f64, measured: f64| {
            format!(
                "{:+.0}%",
                100.0 * (predicted - measured) / measured.max(1.0)
            )
        };
        let (link, qemu) = (
            self.figures.link_bytes as f64,
            self.figures.qemu_bytes as f64,
        );
        format!(
            "predicted    link {:.1} MiB ({}), QEMU {:.1} MiB ({}), {} (measured {:.1} s)",
            mib(p.link_bytes),
            off(p.link_bytes, link),
            mib(p.qemu_bytes),
            off(p.qemu_bytes, qemu),
            match p.total_s {
                Some(t) => format!("{t:.1} s"),
                None => "never converging".to_string(),
            },
            self.total_time_ms as f64 / 1e3,
        )
    }

    /// Adds this migration to the Prometheus counters.
    pub fn export_metrics(&self) {
        let result = if self.ok { "ok" } else { "failed" };
        metrics::counter!("agent_migrations_total", "result" => result).increment(1);
        metrics::counter!("agent_migration_qemu_bytes_total").increment(self.figures.qemu_bytes);
        metrics::counter!("agent_migration_link_bytes_total").increment(self.figures.link_bytes);
        metrics::counter!("agent_migration_nas_bytes_total").increment(self.figures.nas_bytes);
        metrics::counter!("agent_migration_zstd_in_bytes_total")
            .increment(self.figures.zstd_in_bytes);
        metrics::counter!("agent_migration_zstd_out_bytes_total")
            .increment(self.figures.zstd_out_bytes);
        metrics::counter!("agent_migration_paused_qemu_bytes_total")
            .increment(self.figures.paused_qemu_bytes);
        metrics::counter!("agent_migration_paused_link_bytes_total")
            .increment(self.figures.paused_link_bytes);
        for (kind, n) in [
            ("full", self.figures.pages_full),
            ("zero", self.figures.pages_zero),
            ("mapped", self.figures.pages_mapped),
            ("dup", self.figures.pages_dup),
            ("sent", self.figures.pages_sent),
            ("verbatim", self.figures.pages_verbatim),
            ("fallback", self.figures.fallbacks),
        ] {
            metrics::counter!("agent_migration_pages_total", "kind" => kind).increment(n);
        }
        let ms = |v: u64| v as f64 / 1e3;
        metrics::histogram!("agent_migration_seconds").record(ms(self.total_time_ms));
        metrics::histogram!("agent_migration_downtime_seconds").record(ms(self.downtime_ms));
        if let Some(p) = self.guest_paused_ms {
            metrics::histogram!("agent_migration_guest_paused_seconds").record(ms(p));
        }
    }
}
