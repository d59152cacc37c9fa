//! The prediction error: before each run whose link is limited, `agent plan`'s model (the same
//! code `agent migrate` prints its prediction with) predicts the bytes the run will put on the
//! link, at the link's 1 Gbit/s, with the lab's NAS index; the table sets that against what
//! the run measured.
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use super::LINK;
use crate::lab::{release_bin, Pair, INDEX_PORT};

/// One run's predicted and measured link bytes.
pub struct Prediction {
    pub name: &'static str,
    pub predicted: f64,
    /// With `--zstd auto`: the prediction if every batch were compressed (the low end).
    pub all_zstd: Option<f64>,
    pub measured: u64,
}

/// The link bytes predicted for migrating `pair`'s source, plain QEMU (`zstd` is `None`) or
/// through the agents with that `--zstd`: the release `agent plan --local` (its per-page costs
/// are measured in the process that plans, so a debug build would misjudge compression).
pub fn link_bytes(pair: &Pair, zstd: Option<&str>) -> anyhow::Result<(f64, Option<f64>)> {
    let out = Command::new(release_bin("agent"))
        .arg("plan")
        .arg(&pair.source.qmp_path)
        .args(["--local", "--json", "--bandwidth", &LINK.to_string()])
        .args(["--zstd", zstd.unwrap_or("never")])
        .args([
            "--nas-index",
            &format!("127.0.0.1:{INDEX_PORT}"),
            "--export",
            "disk",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run agent plan")?;
    anyhow::ensure!(out.status.success(), "agent plan failed");
    let reply: Value = serde_json::from_slice(&out.stdout).context("agent plan printed no JSON")?;
    let plan = &reply["plans"][0]["plan"];
    eprintln!(
        "bench: plan: zero {} mirrored {} compress {} ratio {}",
        plan["ram"]["zero"],
        plan["ram"]["mirrored"],
        plan["compress"],
        plan["ram"]["compress_ratio"]
    );
    let forecast = if zstd.is_none() { "plain" } else { "agents" };
    let bytes = plan[forecast]["link_bytes"]
        .as_f64()
        .context("the plan has no link bytes")?;
    Ok((bytes, plan["agents_all_zstd"]["link_bytes"].as_f64()))
}

/// Adds run `name`'s prediction (link bytes, and auto's low end), if one was made.
pub fn record(
    list: &mut Vec<Prediction>,
    name: &'static str,
    predicted: Option<(f64, Option<f64>)>,
    measured: u64,
) {
    if let Some((predicted, all_zstd)) = predicted {
        list.push(Prediction {
            name,
            predicted,
            all_zstd,
            measured,
        });
    }
}

/// The table, and the largest error.
pub fn table(rows: &[Prediction]) {
    println!();
    println!(
        "Prediction error (`agent plan`'s model just before each run, at 1 Gbit/s, with the \
         NAS index; bytes on the link):"
    );
    println!();
    println!("| run | predicted | every batch zstd'd (auto's low end) | measured | error |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mib = |b: f64| b / (1 << 20) as f64;
    let mut worst: f64 = 0.0;
    for r in rows {
        let err = 100.0 * (r.predicted - r.measured as f64) / (r.measured as f64).max(1.0);
        worst = worst.max(err.abs());
        println!(
            "| {} | {:.1} MiB | {} | {:.1} MiB | {err:+.1}% |",
            r.name,
            mib(r.predicted),
            r.all_zstd
                .map_or("-".to_string(), |b| format!("{:.1} MiB", mib(b))),
            mib(r.measured as f64)
        );
    }
    println!("largest prediction error: {worst:.1}%");
}
