//! `agent plan`: what a migration will cost, before it starts, for plain QEMU and through the
//! agents. Asks the host daemon (which has the VM's map and smoothed dirty rate) and, when no
//! daemon runs, measures here without a map.
use std::{path::PathBuf, time::Duration};

use agent::{
    daemon::control::{call, ControlError, Request, DEFAULT_SOCKET},
    migration::compress::Compression,
    plan::{plan_now, Ask, IndexAsk, Plan},
};
use anyhow::bail;
use serde_json::{json, Value};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM's QMP socket (omit with --rank).
    #[arg(required_unless_present = "rank")]
    qmp: Option<PathBuf>,
    /// Plan every VM the host daemon follows, cheapest to move first.
    #[arg(long, conflicts_with = "qmp")]
    rank: bool,
    /// What the link carries before the switchover, per second (bytes; K, M, G for KiB, MiB,
    /// GiB). Default: the VM's max-bandwidth.
    #[arg(long, value_parser = parse_rate)]
    bandwidth: Option<f64>,
    /// What the link carries once the guest is paused (its capacity). Default: --bandwidth.
    #[arg(long, value_parser = parse_rate)]
    final_bandwidth: Option<f64>,
    /// The agents' --zstd setting to predict for.
    #[arg(long, value_enum, default_value_t = Compression::Auto)]
    zstd: Compression,
    /// Window of a dirty-rate measurement made now (milliseconds).
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    /// Do not ask the daemon: measure here, with no map (nothing counts as mirrored).
    #[arg(long)]
    local: bool,
    /// The NAS index the migration would ask for pages the map does not place (with
    /// --export); without it only the map places pages.
    #[arg(long, requires = "exports")]
    nas_index: Option<String>,
    /// An export the migration may search in the index (repeatable).
    #[arg(long = "export")]
    exports: Vec<String>,
    /// TLS towards the index service (a credentials directory in QEMU's layout).
    #[arg(long, value_name = "DIR")]
    nas_tls_creds: Option<PathBuf>,
}

/// `128M` -> 128 MiB/s in bytes; a plain number is bytes per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let scale = match unit
        .to_ascii_uppercase()
        .trim_end_matches("/S")
        .trim_end_matches("IB")
    {
        "" | "B" => 1.0,
        "K" => 1024.0,
        "M" => (1 << 20) as f64,
        "G" => (1 << 30) as f64,
        other => return Err(format!("unknown unit {other:?}: use K, M or G")),
    };
    let v: f64 = num.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: a rate must be positive"));
    }
    Ok(v * scale)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let ask = Ask {
        bandwidth: args.bandwidth,
        final_bandwidth: args.final_bandwidth,
        zstd: args.zstd.name().to_string(),
        index: args.nas_index.clone().map(|addr| IndexAsk {
            addr,
            exports: args.exports.clone(),
            tls_creds: args.nas_tls_creds.clone(),
        }),
    };
    let window = Duration::from_millis(args.window_ms.clamp(100, 60_000));
    let plans = if args.local {
        local(&args, window, &ask).await?
    } else {
        let request = Request::Plan {
            qmp: args.qmp.clone(),
            ask: ask.clone(),
        };
        match call(&args.control, &request).await {
            Ok(reply) => reply["plans"].as_array().cloned().unwrap_or_default(),
            Err(ControlError::Connect { .. }) if !args.rank => {
                eprintln!(
                    "no host daemon at {}: measuring here, without a map",
                    args.control.display()
                );
                local(&args, window, &ask).await?
            }
            Err(e) => return Err(e.into()),
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "plans": plans }))?
        );
        return Ok(());
    }
    for (i, p) in plans.iter().enumerate() {
        let qmp = p["qmp"].as_str().unwrap_or("?");
        match serde_json::from_value::<Plan>(p["plan"].clone()) {
            Ok(plan) => print!("{}", describe(i + 1, qmp, &plan, args.rank)),
            Err(_) => println!("{qmp}: no plan: {}", p["error"].as_str().unwrap_or("?")),
        }
    }
    Ok(())
}

async fn local(args: &Args, window: Duration, ask: &Ask) -> anyhow::Result<Vec<Value>> {
    let Some(qmp) = &args.qmp else {
        bail!("--rank needs the host daemon (it knows the host's VMs)");
    };
    let plan = plan_now(qmp, window, ask).await?;
    Ok(vec![json!({"qmp": qmp, "plan": plan, "followed": false})])
}

const MIB: f64 = (1 << 20) as f64;

/// A plan for people.
pub fn describe(rank: usize, qmp: &str, p: &Plan, ranked: bool) -> String {
    let r = &p.ram;
    let d = &p.dirty;
    let mut out = String::new();
    if ranked {
        out += &format!("#{rank} ");
    }
    out += &format!(
        "{qmp}: RAM {:.0} MiB: zero {:.1}%, repeats {:.1}%, mirrored on storage {:.1}%, the rest \
         zstd's to {:.2}; dirty {:.1} MiB/s ({})\n",
        r.ram_bytes as f64 / MIB,
        100.0 * r.zero,
        100.0 * r.repeated,
        100.0 * r.mirrored,
        r.compress_ratio,
        d.bytes_per_sec.unwrap_or(0.0) / MIB,
        match d.age_s {
            Some(a) => format!("{a:.0} s old, {} samples", d.samples),
            None => "never measured".into(),
        },
    );
    let c = &p.conditions;
    out += &format!(
        "  link {:.0} MiB/s ({:.0} MiB/s paused), downtime-limit {} ms, agents {}\n",
        c.bandwidth / MIB,
        c.final_bandwidth / MIB,
        c.downtime_limit.as_millis(),
        match (&p.agents_all_zstd, p.compress) {
            (Some(_), _) => "with --zstd auto: between no compression and every batch",
            (None, true) => "compressing every batch",
            (None, false) => "not compressing",
        },
    );
    out += "              QEMU bytes   link bytes   time      passes  downtime  converges\n";
    let mut rows = vec![("plain QEMU", &p.plain), ("agents", &p.agents)];
    if let Some(all) = &p.agents_all_zstd {
        rows.push(("  all zstd", all));
    }
    for (name, f) in rows {
        out += &format!(
            "  {name:<11} {:>8.1} MiB {:>8.1} MiB {:>8} {:>7} {:>9}  {}\n",
            f.qemu_bytes / MIB,
            f.link_bytes / MIB,
            f.total_s.map_or("never".into(), |t| format!("{t:.1} s")),
            f.iterations,
            f.downtime_ms.map_or("-".into(), |d| format!("{d:.0} ms")),
            if f.converges {
                "yes".to_string()
            } else {
                format!("no: dirtied {:.2}x faster than re-sent", f.dirty_ratio)
            },
        );
    }
    out += &format!(
        "  the agents keep {:.1}% of plain QEMU's bytes off the link\n",
        p.saved_pct()
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_take_binary_units() {
        assert_eq!(super::parse_rate("128M"), Ok(128.0 * 1048576.0));
        assert_eq!(super::parse_rate("1GiB/s"), Ok(1073741824.0));
        assert_eq!(super::parse_rate("4096"), Ok(4096.0));
        assert!(super::parse_rate("0").is_err());
        assert!(super::parse_rate("5T").is_err());
    }
}
