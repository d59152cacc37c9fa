//! Per followed VM: its dirty rate on the operator's schedule, its RAM sampled with the map's
//! claims verified, and the plans asked of it (`agent plan`, `agent status`, Prometheus).
//!
//! ```text
//! every --dirty-interval: for each VM, one at a time (one measurement per host at once):
//!   QMP (held briefly) -> QemuView; process_vm_readv samples + map claims -> RamProfile;
//!   calc-dirty-rate over --dirty-window -> Smoothed (a failure is kept beside the old figure);
//!   the sample against the oldest of the last few -> the working set
//! plan asked -> fresh RAM sample + the smoothed rate (or a fresh one if stale) -> Plan
//! ```
use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::maps::{Followed, Registry};
use crate::{
    plan::{
        measure,
        ram::{fingerprints, DEFAULT_SAMPLES},
        sample_ram, Ask, Claims, Plan, QemuView,
    },
    qmp::{Qmp, QmpError},
};

/// The schedule and the question `agent status` answers.
#[derive(Clone, Debug)]
pub struct FiguresConfig {
    /// Between two rounds of measurements; `None`: only when a plan asks.
    pub interval: Option<Duration>,
    /// Each dirty-rate measurement's window.
    pub window: Duration,
    /// The bandwidth status judges convergence at; `None`: each VM's `max-bandwidth`.
    pub bandwidth: Option<f64>,
}

impl Default for FiguresConfig {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(30)),
            window: Duration::from_secs(1),
            bandwidth: None,
        }
    }
}

/// Measures every followed VM, round after round, until `stop`.
pub async fn sampler(
    registry: Arc<Registry>,
    config: FiguresConfig,
    mut stop: watch::Receiver<bool>,
) {
    let Some(interval) = config.interval else {
        return;
    };
    loop {
        for vm in registry.all() {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = refresh(&vm, config.window) => {
                    if let Err(e) = r {
                        tracing::debug!("{}: {e}", vm.qmp.display());
                    }
                    // The Prometheus gauges follow every round.
                    status(&vm, config.bandwidth);
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// One round for one VM: QEMU's view, a RAM sample, a dirty rate over the window (QEMU's,
/// pooled with a second RAM sample's count of changed pages), the working set against older
/// samples. A failure is kept beside the older figures.
pub async fn refresh(vm: &Arc<Followed>, window: Duration) -> Result<(), String> {
    let _one = vm.measuring.lock().await;
    let view = match view(vm).await {
        Ok(v) => v,
        Err(e) => {
            let mut f = vm.figures();
            f.error = Some(e.clone());
            f.dirty.failed(e.clone());
            return Err(e);
        }
    };
    let at = Instant::now();
    let (mut ram, prints, rate) = measure(&vm.qmp, &view, claims(vm), None, window).await;
    let mut f = vm.figures();
    f.view = Some(view);
    f.error = None;
    f.remember(&mut ram, prints, at);
    match rate {
        Ok(s) => {
            f.dirty.add(s);
            f.ram = Some((ram, SystemTime::now()));
            Ok(())
        }
        Err(e) => {
            f.dirty.failed(e.to_string());
            Err(format!("no dirty rate: {e}"))
        }
    }
}

/// QEMU's view, the monitor held only for it.
async fn view(vm: &Followed) -> Result<QemuView, String> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut session = Qmp::connect(&vm.qmp).await.map_err(|e| match e {
            QmpError::Connect { .. } => format!("QMP socket unreachable: {e}"),
            e => e.to_string(),
        })?;
        QemuView::read(&mut session)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| "the monitor is busy (another client holds it)".to_string())?
}

/// The VM's map as the RAM sampler asks it.
fn claims(vm: &Arc<Followed>) -> Claims {
    let vm = vm.clone();
    Arc::new(move |block, offset| vm.track().map().claim_at(block, offset))
}

/// A plan for `vm`: the smoothed dirty rate from the rounds while fresh (younger than
/// `fresh`), else from a round now; RAM sampled now (by that round, when it ran and no index
/// is asked).
pub async fn plan_for(
    vm: &Arc<Followed>,
    ask: &Ask,
    window: Duration,
    fresh: Duration,
) -> Result<Plan, String> {
    let stale = vm.figures().dirty.age().is_none_or(|a| a > fresh);
    if stale {
        refresh(vm, window).await?;
        // The round just sampled the RAM; without an index to ask, that sample is the plan's.
        if ask.index.is_none() {
            let f = vm.figures();
            if let (Some((ram, _)), Some(view)) = (&f.ram, &f.view) {
                return Ok(Plan::make(ram.clone(), f.dirty.report(), view, ask));
            }
        }
    }
    let view = view(vm).await?;
    let at = Instant::now();
    let (mut ram, seen) = sample_ram(&view, DEFAULT_SAMPLES, claims(vm), ask.index.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let mut f = vm.figures();
    f.remember(&mut ram, fingerprints(&seen), at);
    f.view = Some(view.clone());
    f.ram = Some((ram.clone(), SystemTime::now()));
    Ok(Plan::make(ram, f.dirty.report(), &view, ask))
}

/// The figures `agent status` shows for `vm`, each with its age, and whether a migration
/// would converge at `bandwidth` (from the latest figures; none are made up).
pub fn status(vm: &Followed, bandwidth: Option<f64>) -> Value {
    let f = vm.figures();
    let dirty = f.dirty.report();
    let age = |t: &SystemTime| {
        SystemTime::now()
            .duration_since(*t)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let ram = f.ram.as_ref().map(|(r, at)| {
        json!({"zero": r.zero, "repeated": r.repeated, "mirrored": r.mirrored,
               "compress_ratio": r.compress_ratio,
               "sampled": r.sampled, "age_s": age(at)})
    });
    let verdict = match (&f.ram, &f.view, dirty.bytes_per_sec) {
        (Some((ram, _)), Some(view), Some(_)) => {
            let ask = Ask {
                bandwidth,
                final_bandwidth: None,
                zstd: "auto".into(),
                index: None,
            };
            let plan = Plan::make(ram.clone(), dirty.clone(), view, &ask);
            metrics::gauge!("agent_vm_converges", "qmp" => vm.qmp.display().to_string())
                .set(f64::from(u8::from(plan.agents.converges)));
            json!({
                "bandwidth": plan.conditions.bandwidth,
                "plain_converges": plan.plain.converges,
                "agents_converge": plan.agents.converges,
                "dirty_ratio": plan.agents.dirty_ratio,
                "agents_total_s": plan.agents.total_s,
                "agents_link_bytes": plan.agents.link_bytes,
                "plain_link_bytes": plan.plain.link_bytes,
            })
        }
        _ => Value::Null,
    };
    let name = vm.qmp.display().to_string();
    if let Some(rate) = dirty.bytes_per_sec {
        metrics::gauge!("agent_vm_dirty_bytes_per_second", "qmp" => name.clone()).set(rate);
    }
    if let Some(a) = dirty.age_s {
        metrics::gauge!("agent_vm_dirty_age_seconds", "qmp" => name).set(a);
    }
    json!({"dirty": dirty, "ram_sample": ram, "figures_error": f.error, "migration": verdict})
}

/// Plans for `vms`, cheapest to move first (predicted time through the agents; those that
/// never converge last), each with its QMP path or its error.
pub async fn rank(
    vms: Vec<Arc<Followed>>,
    ask: &Ask,
    window: Duration,
    fresh: Duration,
) -> Vec<Value> {
    let mut plans = Vec::new();
    for vm in vms {
        let qmp = vm.qmp.display().to_string();
        match plan_for(&vm, ask, window, fresh).await {
            Ok(plan) => plans.push((
                plan.agents.total_s.unwrap_or(f64::INFINITY),
                json!({"qmp": qmp, "plan": plan}),
            )),
            Err(e) => plans.push((f64::NAN, json!({"qmp": qmp, "error": e}))),
        }
    }
    // NaN (no plan) sorts after infinity (never converges).
    plans.sort_by(|a, b| a.0.total_cmp(&b.0));
    plans.into_iter().map(|(_, v)| v).collect()
}
