//! Before a migration: what it will cost. A VM's plan puts together what its QEMU says (RAM
//! blocks, `downtime-limit`, `max-bandwidth`), a sample of its RAM read from QEMU's memory
//! ([`ram`], with the memory-to-disk map's claims verified), and its dirty rate ([`dirty`]),
//! and runs the pre-copy model ([`model`]) for plain QEMU and for the agents.
//!
//! ```text
//! QMP: x-query-ramblock, query-migrate-parameters --+
//! process_vm_readv of sampled pages (+ map claims) -+--> Plan {plain, agents} --> agent plan,
//! QMP calc-dirty-rate (now, or the daemon's mean) --+                            status, rank
//! ```
pub mod dirty;
pub mod model;
pub mod observed;
pub mod ram;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use self::{
    dirty::DirtyReport,
    model::{forecast, Conditions, Forecast, Method},
    ram::{RamProfile, Seen, DEFAULT_SAMPLES},
};
use nas_client::{index::IndexClient, tls::StorageTls};

use crate::{
    migration::compress::Compression,
    qmp::{Qmp, QmpError},
    telemetry::{
        memmap::{ProcessMemory, RamBlock},
        vm::parse_ramblocks,
    },
};

/// QEMU's own defaults, used when its parameters cannot be read.
pub const QEMU_DEFAULT_BANDWIDTH: f64 = (128 << 20) as f64;
pub const QEMU_DEFAULT_DOWNTIME_MS: u64 = 300;
/// Device state a small PC machine sends while paused (CPU, devices), about 0.3-0.5 MiB.
pub const DEVICE_STATE: f64 = (512 << 10) as f64;

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the QMP socket's peer process is unknown (SO_PEERCRED gave no pid)")]
    NoPid,
    #[error("x-query-ramblock lists no RAM block")]
    NoRam,
    #[error("no dirty rate: {0}")]
    Dirty(String),
    #[error("the index service {0}")]
    Index(String),
    #[error("the RAM sampler failed: {0}")]
    Sampler(String),
}

/// What QEMU says of a VM's migration settings and RAM.
#[derive(Clone, Debug)]
pub struct QemuView {
    pub pid: u32,
    pub blocks: Vec<RamBlock>,
    /// `max-bandwidth` (bytes/s) and `downtime-limit`.
    pub max_bandwidth: f64,
    pub downtime_limit: Duration,
    /// The VM runs under KVM (`query-kvm`): its dirty rate can come from KVM's dirty logging.
    pub kvm: bool,
}

impl QemuView {
    pub async fn read(qmp: &mut Qmp) -> Result<Self, PlanError> {
        let pid = qmp.peer_pid.ok_or(PlanError::NoPid)?;
        let text = qmp.execute("x-query-ramblock", None).await?;
        let blocks = parse_ramblocks(text["human-readable-text"].as_str().unwrap_or(""));
        if blocks.is_empty() {
            return Err(PlanError::NoRam);
        }
        let p = qmp.execute("query-migrate-parameters", None).await?;
        let kvm = qmp.execute("query-kvm", None).await?;
        Ok(Self {
            pid,
            blocks,
            kvm: kvm["enabled"].as_bool().unwrap_or(false),
            max_bandwidth: p["max-bandwidth"]
                .as_f64()
                .filter(|b| *b > 0.0)
                .unwrap_or(QEMU_DEFAULT_BANDWIDTH),
            downtime_limit: Duration::from_millis(
                p["downtime-limit"]
                    .as_u64()
                    .unwrap_or(QEMU_DEFAULT_DOWNTIME_MS),
            ),
        })
    }
}

/// The map's claim for a page (RAM block number, offset): its hash.
pub type Claims = Arc<dyn Fn(u32, u64) -> Option<blockhash::Hash> + Send + Sync>;

/// Samples the RAM of the QEMU `view` describes, on a blocking thread; pages nothing placed
/// are looked up in `index`, when given, before compression is measured.
pub async fn sample_ram(
    view: &QemuView,
    samples: u64,
    claim: Claims,
    index: Option<&IndexAsk>,
) -> Result<(RamProfile, Vec<Seen>), PlanError> {
    let (pid, blocks) = (view.pid, view.blocks.clone());
    let mut sampled = tokio::task::spawn_blocking(move || {
        ram::sample_pages(&mut ProcessMemory { pid }, &blocks, samples, |b, o| {
            claim(b, o)
        })
    })
    .await
    .map_err(|e| PlanError::Sampler(e.to_string()))?;
    let asked = match index {
        Some(index) => ask_index(index, &mut sampled).await,
        None => Ok(()),
    };
    let sampled = tokio::task::spawn_blocking(move || {
        sampled.finish();
        sampled
    })
    .await
    .map_err(|e| PlanError::Sampler(e.to_string()))?;
    asked.map(|()| (sampled.profile, sampled.seen))
}

/// A RAM sample (pages the map does not place looked up in `index`, when given), then a
/// dirty-rate measurement over `window`: the profile, the sample's fingerprints (to compare
/// with a later sample, see [`ram::changed_share`]) and the rate.
pub async fn measure(
    qmp: &Path,
    view: &QemuView,
    claim: Claims,
    index: Option<&IndexAsk>,
    window: Duration,
) -> (
    RamProfile,
    Vec<u64>,
    Result<dirty::Sample, dirty::DirtyError>,
) {
    let started = Instant::now();
    let (profile, seen) = match sample_ram(view, DEFAULT_SAMPLES, claim.clone(), index).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("plan: {e}; pages only the index places count as sent in full");
            sample_ram(view, DEFAULT_SAMPLES, claim.clone(), None)
                .await
                .unwrap_or_default()
        }
    };
    let before = ram::fingerprints(&seen);
    let first = started + started.elapsed() / 2;
    let mut rate = dirty::measure_for(qmp, window, view.kvm).await;
    // The same pages again: the sampler's own count of changed pages over the window, pooled
    // with QEMU's sampled figure (capped at 4096 pages per GiB; together the estimate's
    // standard error shrinks by about the square root of the pages sampled). KVM's dirty
    // logging counts every page, so its figure is taken as it is.
    if let Some(sample) = rate
        .as_mut()
        .ok()
        .filter(|s| s.mode == dirty::DirtyMode::PageSampling)
    {
        let again = Instant::now();
        if let Ok((_, after)) = sample_ram(view, DEFAULT_SAMPLES, claim, None).await {
            let span = (again + again.elapsed() / 2).saturating_duration_since(first);
            let after = ram::fingerprints(&after);
            if let Some(share) = ram::changed_share(&before, &after) {
                let gib = profile.ram_bytes as f64 / (1u64 << 30) as f64;
                sample.pool(
                    share * profile.ram_bytes as f64 / span.as_secs_f64().max(1e-3),
                    profile.sampled as f64,
                    dirty::SAMPLE_PAGES as f64 * gib,
                );
            }
        }
    }
    (profile, before, rate)
}

/// What the operator asks a plan for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ask {
    /// Bytes per second the link carries before the switchover; `None`: the VM's
    /// `max-bandwidth`.
    pub bandwidth: Option<f64>,
    /// Bytes per second once the guest is paused; `None`: the same as `bandwidth`.
    pub final_bandwidth: Option<f64>,
    /// The agents' `--zstd`: `auto`, `always` or `never`.
    pub zstd: String,
    /// The NAS index the migration would ask for pages the map does not place.
    #[serde(default)]
    pub index: Option<IndexAsk>,
}

/// An index service and the exports a migration may search in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexAsk {
    pub addr: String,
    pub exports: Vec<String>,
    /// Its TLS credentials directory (`--nas-tls-creds`).
    pub tls_creds: Option<std::path::PathBuf>,
}

/// Asks the index for the sampled pages nothing placed yet: those it finds count as mirrored,
/// as a migration would send them MAPPED after a lookup.
async fn ask_index(index: &IndexAsk, sampled: &mut ram::Sampled) -> Result<(), PlanError> {
    let failed = |e: &dyn std::fmt::Display| PlanError::Index(format!("{}: {e}", index.addr));
    let addr: nas_proto::Endpoint = index.addr.parse().map_err(|e| failed(&e))?;
    let tls = StorageTls::load(index.tls_creds.as_deref()).map_err(|e| failed(&e))?;
    let mut client = IndexClient::connect_with(&addr, &index.exports, tls.as_deref())
        .await
        .map_err(|e| failed(&e))?;
    let asked: Vec<(usize, blockhash::Hash)> = sampled
        .seen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Seen::Other(h) => Some((i, *h)),
            _ => None,
        })
        .collect();
    let hashes: Vec<blockhash::Hash> = asked.iter().map(|(_, h)| *h).collect();
    let found = client.lookup(&hashes).await.map_err(|e| failed(&e))?;
    for (&(i, _), f) in asked.iter().zip(found) {
        if f.is_some() {
            sampled.place(i);
        }
    }
    Ok(())
}

/// A VM's plan: the inputs with their provenance, and both forecasts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub ram: RamProfile,
    pub dirty: DirtyReport,
    pub conditions: Conditions,
    /// Whether the agents' forecast compresses (`--zstd always`, and the sampled pages
    /// shrink).
    pub compress: bool,
    pub plain: Forecast,
    pub agents: Forecast,
    /// With `--zstd auto`, the agents' forecast if every batch were compressed: `auto`
    /// compresses only while the link holds the stream up, which the model does not follow,
    /// so the link bytes lie between this and [`Plan::agents`] (measured: nearer the latter,
    /// docs/design/plan.md).
    #[serde(default)]
    pub agents_all_zstd: Option<Forecast>,
}

impl Plan {
    /// The plan from its inputs.
    pub fn make(ram: RamProfile, dirty: DirtyReport, view: &QemuView, ask: &Ask) -> Self {
        let bandwidth = ask.bandwidth.unwrap_or(view.max_bandwidth);
        let conditions = Conditions {
            dirty_bytes_per_sec: dirty.bytes_per_sec.unwrap_or(0.0),
            bandwidth,
            final_bandwidth: ask.final_bandwidth.unwrap_or(bandwidth),
            downtime_limit: view.downtime_limit,
            device_state: DEVICE_STATE,
        };
        let shrinks = ram.compress_ratio < 1.0;
        let zstd = Compression::parse(&ask.zstd);
        let compress = zstd == Compression::Always && shrinks;
        let plain = forecast(&ram, &conditions, Method::Plain);
        let agents = forecast(&ram, &conditions, Method::Agents { compress });
        let agents_all_zstd = (zstd == Compression::Auto && shrinks)
            .then(|| forecast(&ram, &conditions, Method::Agents { compress: true }));
        Self {
            ram,
            dirty,
            conditions,
            compress,
            plain,
            agents,
            agents_all_zstd,
        }
    }

    /// The share of plain QEMU's bytes the agents keep off the link.
    pub fn saved_pct(&self) -> f64 {
        100.0 * (1.0 - self.agents.link_bytes / self.plain.link_bytes.max(1.0))
    }
}

/// A plan made on the spot, for a VM no daemon follows: its dirty rate measured now for
/// `window`, its RAM sampled with no map (only what the asked index finds counts as
/// mirrored).
pub async fn plan_now(qmp: &Path, window: Duration, ask: &Ask) -> Result<Plan, PlanError> {
    let view = {
        let mut session = Qmp::connect(qmp).await?;
        QemuView::read(&mut session).await?
    };
    let (ram, _, rate) = measure(
        qmp,
        &view,
        Arc::new(|_, _| None),
        ask.index.as_ref(),
        window,
    )
    .await;
    let mut smoothed = dirty::Smoothed::default();
    smoothed.add(rate.map_err(|e| PlanError::Dirty(e.to_string()))?);
    Ok(Plan::make(ram, smoothed.report(), &view, ask))
}
