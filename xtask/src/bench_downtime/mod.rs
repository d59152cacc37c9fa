//! `cargo xtask bench downtime`: how long the guest stays paused, plain QEMU against the
//! agents, in every setting and workload of [`cell`], over many runs per cell.
//!
//! A 512 MiB TCG guest, on-demand target RAM, the lab's NAS (its image synced before any
//! guest boots). Per cell, `--repeat` pairs of runs (default 10), alternating which of the two
//! goes first so a drift of the machine hits both; every target guest is verified. Reported
//! per cell: the guest's pause (source STOP to target RESUME) median and 90th percentile for
//! both, QEMU's downtime, the total time, and for the agents where the pause went
//! (`paused_*_ms`, [`agent::migration::moments`]), stage by stage (medians), and what the
//! source QEMU sent of its RAM with the guest stopped (its `downtime-bytes`). A cell that
//! misses the target says by how much. The last line: `cells within target: N of M`.
mod cell;

use agent::qmp::{last_event_time, Qmp};
use anyhow::Context;
use serde_json::{json, Value};

use self::cell::{judge, Cell, Setting};
use crate::{
    bench_migration::{LINK, UNCAPPED},
    guest,
    lab::{self, plain_migration, Lab, Pair, AGENT_PORT},
    relay::Relay,
    sh,
};

const MEM_MB: u32 = 512;
/// The agents' pause stages, as their report names them.
const STAGES: [&str; 6] = [
    "paused_backlog_ms",
    "paused_final_ms",
    "paused_source_ms",
    "paused_link_ms",
    "paused_target_ms",
    "paused_load_ms",
];

/// One migration's figures.
struct Run {
    downtime_ms: u64,
    paused_ms: u64,
    total_ms: u64,
    /// Relay bytes after the source's STOP event (relay cells).
    link_after_stop: Option<u64>,
    /// What the source QEMU sent of its RAM with the guest stopped (`downtime-bytes`).
    qemu_after_stop: Option<u64>,
    /// The agents' stages, in [`STAGES`] order.
    stages: Vec<Option<f64>>,
}

pub fn run(cells: &str, pairs: u32) -> anyhow::Result<()> {
    let cells = Cell::parse_list(cells)?;
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    anyhow::ensure!(
        sh::is_root(),
        "the benchmark runs QEMU guests and must run as root"
    );
    let dir = sh::workspace_root().join("target/xtask/bench-downtime");
    let files = cells.iter().any(|c| c.export() == lab::FILES_EXPORT);
    let _lab = Lab::start_with_files(&dir, files)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    for cell in &cells {
        let uri = lab::export_uri(cell.export());
        let (mut plain, mut agents) = (Vec::new(), Vec::new());
        for n in 1..=pairs.max(1) {
            let plain_first = n % 2 == 1;
            for agents_turn in [!plain_first, plain_first] {
                let pair = Pair::boot_with(&dir, "downtime", &uri, MEM_MB, &cell.load(), false)?;
                let run = if agents_turn {
                    agents_run(&rt, &pair, cell)?
                } else {
                    plain_run(&rt, &pair, cell.setting)?
                };
                anyhow::ensure!(
                    pair.verify(),
                    "{cell} pair {n}: the target guest did not carry on"
                );
                eprintln!(
                    "bench: {cell} pair {n}/{pairs} {}: paused {} ms, downtime {} ms, total {} ms",
                    if agents_turn { "agents" } else { "plain" },
                    run.paused_ms,
                    run.downtime_ms,
                    run.total_ms
                );
                if agents_turn {
                    agents.push(run);
                } else {
                    plain.push(run);
                }
            }
        }
        results.push((*cell, plain, agents));
    }
    report(&results);
    Ok(())
}

fn plain_run(rt: &tokio::runtime::Runtime, pair: &Pair, setting: Setting) -> anyhow::Result<Run> {
    let relay = std::cell::RefCell::new(None);
    let done = rt.block_on(async {
        if setting != Setting::Cap {
            let mut src = pair.source.qmp().await;
            src.set_migration_parameter("max-bandwidth", UNCAPPED)
                .await?;
        }
        let via = crate::relay::via_into(&relay, LINK);
        let via: &dyn Fn(u16) -> anyhow::Result<u16> = &via;
        plain_migration(
            &pair.source,
            &pair.target,
            (setting == Setting::Relay).then_some(via),
        )
        .await
    })?;
    let stop = done.stopped_at.context("plain run: no STOP event")?;
    Ok(Run {
        downtime_ms: done.info["downtime"].as_u64().unwrap_or(0),
        paused_ms: done
            .guest_paused_ms
            .context("plain run: no pause measured")?,
        total_ms: done.info["total-time"].as_u64().unwrap_or(0),
        link_after_stop: relay.into_inner().map(|r| r.bytes_after(stop)),
        qemu_after_stop: done.info["ram"]["downtime-bytes"].as_u64(),
        stages: Vec::new(),
    })
}

fn agents_run(rt: &tokio::runtime::Runtime, pair: &Pair, cell: &Cell) -> anyhow::Result<Run> {
    let setting = cell.setting;
    let relay = match setting {
        Setting::Relay => Some(Relay::start(AGENT_PORT, LINK)?),
        _ => None,
    };
    let port = relay.as_ref().map_or(AGENT_PORT, |r| r.port);
    // With QEMU's cap, `agent migrate` takes it for the link, as an operator's run would.
    let args: &[&str] = match setting {
        Setting::Cap => &[],
        _ => &["--max-bandwidth", "0"],
    };
    // A second monitor on the source sees the STOP event too (QMP events go to every monitor).
    let mut watch = rt.block_on(Qmp::connect(&pair.source.operator_qmp_path))?;
    let report = lab::agent_migrate(pair, port, cell.export(), args)?;
    anyhow::ensure!(report["ok"] == true, "agent migrate failed: {report}");
    let (events, info) = rt.block_on(async {
        watch.execute("query-status", None).await?;
        let info = watch.execute("query-migrate", None).await?;
        Ok::<_, anyhow::Error>((watch.events(), info))
    })?;
    let stop = last_event_time(&events, "STOP").context("agents run: no STOP event")?;
    let figure = |name: &str| report[name].as_u64();
    Ok(Run {
        downtime_ms: figure("downtime_ms").unwrap_or(0),
        paused_ms: figure("guest_paused_ms").context("agents run: no pause measured")?,
        total_ms: figure("total_time_ms").unwrap_or(0),
        link_after_stop: relay.map(|r| r.bytes_after(stop)),
        qemu_after_stop: info["ram"]["downtime-bytes"].as_u64(),
        stages: STAGES.iter().map(|s| report[*s].as_f64()).collect(),
    })
}

/// The value at fraction `q` of the sorted `values` (nearest rank).
fn quantile(values: &[u64], q: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median of the known values, if any.
fn median_f(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
}

fn report(results: &[(Cell, Vec<Run>, Vec<Run>)]) {
    println!();
    println!(
        "The guest's pause, a {MEM_MB} MiB TCG guest, plain QEMU against the agents, {} pairs \
         per cell (ms; median / 90th percentile):",
        results.first().map_or(0, |r| r.1.len())
    );
    println!();
    println!(
        "| cell | plain paused | agents paused | plain / agents downtime | agents stages: \
         backlog, final, source, link, target, load | plain / agents total | QEMU RAM MiB after \
         STOP plain / agents | link MiB after STOP plain / agents | target |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |");
    let mut met = 0;
    let mut summary = Vec::new();
    for (cell, plain, agents) in results {
        let get = |runs: &[Run], f: fn(&Run) -> u64| runs.iter().map(f).collect::<Vec<u64>>();
        let (pp, ap) = (get(plain, |r| r.paused_ms), get(agents, |r| r.paused_ms));
        let q = |v: &[u64]| (quantile(v, 0.5), quantile(v, 0.9));
        let verdict = judge(cell, q(&pp), q(&ap));
        met += usize::from(verdict.is_none());
        let stages: Vec<String> = (0..STAGES.len())
            .map(|i| {
                median_f(agents.iter().map(|r| r.stages.get(i).copied().flatten()))
                    .map_or("-".to_string(), |ms| format!("{ms:.1}"))
            })
            .collect();
        let after_stop = |runs: &[Run], f: fn(&Run) -> Option<u64>| {
            let v: Vec<u64> = runs.iter().filter_map(f).collect();
            match v.is_empty() {
                true => "-".to_string(),
                false => format!("{:.1}", quantile(&v, 0.5) as f64 / (1 << 20) as f64),
            }
        };
        let median = |runs: &[Run], f: fn(&Run) -> u64| quantile(&get(runs, f), 0.5);
        println!(
            "| {cell} | {} / {} | {} / {} | {} / {} | {} | {} / {} | {} / {} | {} / {} | {} |",
            q(&pp).0,
            q(&pp).1,
            q(&ap).0,
            q(&ap).1,
            median(plain, |r| r.downtime_ms),
            median(agents, |r| r.downtime_ms),
            stages.join(", "),
            median(plain, |r| r.total_ms),
            median(agents, |r| r.total_ms),
            after_stop(plain, |r| r.qemu_after_stop),
            after_stop(agents, |r| r.qemu_after_stop),
            after_stop(plain, |r| r.link_after_stop),
            after_stop(agents, |r| r.link_after_stop),
            verdict.as_deref().unwrap_or("met"),
        );
        summary.push(json!({
            "cell": cell.to_string(),
            "plain_paused_ms": pp,
            "agents_paused_ms": ap,
            "agents_stages_ms": agents.iter().map(|r| r.stages.clone()).collect::<Vec<_>>(),
        }));
    }
    println!();
    println!("cells within target: {met} of {}", results.len());
    eprintln!("bench: {}", Value::Array(summary));
}

#[cfg(test)]
mod tests {
    use super::{median_f, quantile};

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = [50, 10, 40, 20, 30];
        assert_eq!(quantile(&v, 0.5), 30);
        assert_eq!(quantile(&v, 0.9), 50);
        assert_eq!(quantile(&v, 1.0), 50);
        assert_eq!(quantile(&v, 0.0), 10);
        assert_eq!(quantile(&[7], 0.9), 7);
    }

    #[test]
    fn the_median_skips_unknown_stages() {
        assert_eq!(
            median_f([Some(3.0), None, Some(1.0), Some(2.0)].into_iter()),
            Some(2.0)
        );
        assert_eq!(median_f([None, None].into_iter()), None);
    }
}
