//! `cargo xtask bench downtime`: how long the guest stays paused, plain QEMU against the
//! agents, over many runs of the setting (512 MiB TCG guest that read 200 MiB of its
//! disk, on-demand target RAM, link limited to 1 Gbit/s by a loopback relay, QEMU's own cap
//! lifted).
//!
//! One run of each, as `bench migration` makes per round, says little about a figure that
//! varies several-fold from run to run for plain QEMU and the agents alike. This bench makes
//! `--repeat` pairs of runs (default 10), alternating which of the two goes first so a drift of
//! the machine hits both, and reports per run and in distribution (median, 90th percentile,
//! worst):
//! - QEMU's downtime, and the guest's pause (source STOP to target RESUME);
//! - the link bytes that crossed the relay after the source's STOP event: the backlog the stop
//!   found on the way and the rest of the stream, which the pause waits for;
//! - for the agents, what their report says crossed while the guest was paused
//!   (`paused_qemu_bytes`, `paused_link_bytes`).

use agent::qmp::{last_event_time, Qmp};
use anyhow::Context;
use serde_json::json;

use crate::{
    bench_migration::{LINK, UNCAPPED},
    guest,
    lab::{self, plain_migration, Lab, Pair, AGENT_PORT},
    relay::Relay,
    sh,
};

/// One migration's figures.
struct Run {
    downtime_ms: u64,
    paused_ms: u64,
    total_ms: u64,
    /// Relay bytes after the source's STOP event.
    link_after_stop: u64,
    /// The agents' report: QEMU and link bytes from the switchover on.
    paused_qemu_bytes: Option<u64>,
    paused_link_bytes: Option<u64>,
}

pub fn run(mem_mb: u32, read_mb: u32, pairs: u32) -> anyhow::Result<()> {
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    anyhow::ensure!(
        sh::is_root(),
        "the benchmark runs QEMU guests and must run as root"
    );
    let dir = sh::workspace_root().join("target/xtask/bench-downtime");
    let lab = Lab::start(&dir)?;
    let uri = lab.disk_uri();
    let rt = tokio::runtime::Runtime::new()?;
    let (mut plain, mut agents) = (Vec::new(), Vec::new());
    for n in 1..=pairs.max(1) {
        eprintln!("bench: pair {n} of {pairs}");
        let plain_first = n % 2 == 1;
        for agents_turn in [!plain_first, plain_first] {
            let pair = Pair::boot(&dir, "downtime", &uri, mem_mb, read_mb, false)?;
            let run = if agents_turn {
                agents_run(&rt, &pair)?
            } else {
                plain_run(&rt, &pair)?
            };
            anyhow::ensure!(pair.verify(), "pair {n}: the target guest did not carry on");
            if agents_turn {
                agents.push(run);
            } else {
                plain.push(run);
            }
        }
    }
    report(mem_mb, read_mb, &plain, &agents);
    Ok(())
}

fn plain_run(rt: &tokio::runtime::Runtime, pair: &Pair) -> anyhow::Result<Run> {
    let relay = std::cell::RefCell::new(None);
    let done = rt.block_on(async {
        let mut src = pair.source.qmp().await;
        src.set_migration_parameter("max-bandwidth", UNCAPPED)
            .await?;
        drop(src);
        let via = |port: u16| -> anyhow::Result<u16> {
            let r = Relay::start(port, LINK)?;
            let p = r.port;
            *relay.borrow_mut() = Some(r);
            Ok(p)
        };
        let via: &dyn Fn(u16) -> anyhow::Result<u16> = &via;
        plain_migration(pair, Some(via)).await
    })?;
    let relay = relay.into_inner().context("the plain run used no relay")?;
    let stop = done.stopped_at.context("plain run: no STOP event")?;
    Ok(Run {
        downtime_ms: done.info["downtime"].as_u64().unwrap_or(0),
        paused_ms: done
            .guest_paused_ms
            .context("plain run: no pause measured")?,
        total_ms: done.info["total-time"].as_u64().unwrap_or(0),
        link_after_stop: relay.bytes_after(stop),
        paused_qemu_bytes: None,
        paused_link_bytes: None,
    })
}

fn agents_run(rt: &tokio::runtime::Runtime, pair: &Pair) -> anyhow::Result<Run> {
    let relay = Relay::start(AGENT_PORT, LINK)?;
    // A second monitor on the source sees the STOP event too (QMP events go to every monitor).
    let mut watch = rt.block_on(Qmp::connect(&pair.source.operator_qmp_path))?;
    let report = lab::agent_migrate(pair, relay.port, &["--max-bandwidth", "0"])?;
    anyhow::ensure!(report["ok"] == true, "agent migrate failed: {report}");
    let events = rt.block_on(async {
        watch.execute("query-status", None).await?;
        Ok::<_, anyhow::Error>(watch.events())
    })?;
    let stop = last_event_time(&events, "STOP").context("agents run: no STOP event")?;
    let figure = |name: &str| report[name].as_u64();
    Ok(Run {
        downtime_ms: figure("downtime_ms").unwrap_or(0),
        paused_ms: figure("guest_paused_ms").context("agents run: no pause measured")?,
        total_ms: figure("total_time_ms").unwrap_or(0),
        link_after_stop: relay.bytes_after(stop),
        paused_qemu_bytes: figure("paused_qemu_bytes"),
        paused_link_bytes: figure("paused_link_bytes"),
    })
}

/// A figure of the summary: its name, how to read it off a run, its unit.
type Figure = (&'static str, fn(&Run) -> u64, &'static str);

/// The value at fraction `q` of the sorted `values` (nearest rank).
fn quantile(values: &[u64], q: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn report(mem_mb: u32, read_mb: u32, plain: &[Run], agents: &[Run]) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let opt_mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
    println!();
    println!(
        "Downtime of a {mem_mb} MiB TCG guest that read {read_mb} MiB of its NAS disk, \
         on-demand target RAM, link limited to 1 Gbit/s, {} pairs:",
        plain.len()
    );
    println!();
    println!(
        "| pair | plain downtime | plain paused | plain MiB after STOP | agents downtime | \
         agents paused | agents MiB after STOP | agents QEMU / link MiB while paused | \
         total plain / agents |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (n, (p, a)) in plain.iter().zip(agents).enumerate() {
        println!(
            "| {} | {} ms | {} ms | {:.1} | {} ms | {} ms | {:.1} | {} / {} | {} / {} ms |",
            n + 1,
            p.downtime_ms,
            p.paused_ms,
            mib(p.link_after_stop),
            a.downtime_ms,
            a.paused_ms,
            mib(a.link_after_stop),
            opt_mib(a.paused_qemu_bytes),
            opt_mib(a.paused_link_bytes),
            p.total_ms,
            a.total_ms,
        );
    }
    println!();
    println!("| figure | run | median | 90th percentile | worst | agents / plain (median, p90) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let figures: [Figure; 4] = [
        ("downtime (QEMU's)", |r| r.downtime_ms, "ms"),
        ("guest paused", |r| r.paused_ms, "ms"),
        ("link bytes after STOP", |r| r.link_after_stop >> 10, "KiB"),
        ("total time", |r| r.total_ms, "ms"),
    ];
    let mut summary = Vec::new();
    for (label, get, unit) in figures {
        let (p, a): (Vec<u64>, Vec<u64>) = (
            plain.iter().map(get).collect(),
            agents.iter().map(get).collect(),
        );
        let ratio = |q| quantile(&a, q) as f64 / quantile(&p, q).max(1) as f64;
        for (run, v) in [("plain QEMU", &p), ("agents", &a)] {
            println!(
                "| {label} | {run} | {} {unit} | {} {unit} | {} {unit} | {} |",
                quantile(v, 0.5),
                quantile(v, 0.9),
                quantile(v, 1.0),
                if run == "agents" {
                    format!("{:.2}x, {:.2}x", ratio(0.5), ratio(0.9))
                } else {
                    String::new()
                }
            );
        }
        summary.push(json!({ "figure": label, "plain": p, "agents": a }));
    }
    let within = |get: fn(&Run) -> u64| {
        plain
            .iter()
            .zip(agents)
            .filter(|(p, a)| get(a) as f64 <= 1.1 * get(p) as f64)
            .count()
    };
    println!();
    println!(
        "Pairs with the agents within plain QEMU's +10%: downtime {} of {n}, guest paused {} \
         of {n}.",
        within(|r| r.downtime_ms),
        within(|r| r.paused_ms),
        n = plain.len()
    );
    eprintln!("bench: {}", serde_json::Value::Array(summary));
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = [50, 10, 40, 20, 30];
        assert_eq!(quantile(&v, 0.5), 30);
        assert_eq!(quantile(&v, 0.9), 50);
        assert_eq!(quantile(&v, 1.0), 50);
        assert_eq!(quantile(&v, 0.0), 10);
        assert_eq!(quantile(&[7], 0.9), 7);
    }
}
