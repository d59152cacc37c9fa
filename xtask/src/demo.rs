//! `cargo xtask demo`: the main job end to end on embedded defaults.
//!
//! It builds everything (guest image, eBPF object, release binaries), starts nas-server on a
//! 256 MiB disk and a target agent (`agent serve`), then migrates a 512 MiB TCG guest that read
//! 200 MiB of its disk twice: once plainly (QEMU to QEMU) and once through the agents
//! (`agent migrate`). After each it checks that the target guest carries on (its heartbeat
//! continues and its RAM checksum is unchanged) and prints the comparison.
use std::path::PathBuf;

use anyhow::bail;
use serde_json::{json, Value};

use crate::{
    ebpf, guest,
    lab::{self, plain_migration, Lab, Pair, AGENT_PORT},
    sh,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also write the comparison as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mb: u32,
    /// MiB of its disk the guest reads before migrating.
    #[arg(long, default_value_t = 200)]
    read_mb: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ebpf::build()?;
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    if !sh::is_root() {
        bail!("the demo runs QEMU guests and the agent, and must run as root");
    }
    let dir = sh::workspace_root().join("target/xtask/demo");
    let lab = Lab::start(&dir)?;
    let uri = lab.disk_uri();
    let rt = tokio::runtime::Runtime::new()?;

    eprintln!("demo: run 1/2: plain QEMU migration");
    let plain = {
        let pair = Pair::boot(&dir, "plain", &uri, args.mem_mb, args.read_mb, false)?;
        let done = rt.block_on(plain_migration(&pair.source, &pair.target, None))?;
        let (info, verified) = (done.info, pair.verify());
        json!({
            "qemu_bytes": info["ram"]["transferred"],
            "total_time_ms": info["total-time"],
            "downtime_ms": info["downtime"],
            "guest_paused_ms": done.guest_paused_ms,
            "guest_verified": verified,
        })
    };
    eprintln!("demo: run 2/2: through the agents");
    let agents = {
        let pair = Pair::boot(&dir, "agents", &uri, args.mem_mb, args.read_mb, false)?;
        let report = lab::agent_migrate(&pair, AGENT_PORT, "disk", &[])?;
        let verified = report["ok"] == true && pair.verify();
        let mut r = report.clone();
        r["guest_verified"] = json!(verified);
        r
    };
    let summary = json!({
        "qemu_bytes": agents["qemu_bytes"],
        "link_bytes": agents["link_bytes"],
        "savings_pct": agents["savings_pct"],
        "guest_verified": plain["guest_verified"] == true && agents["guest_verified"] == true,
        "plain": plain,
        "agents": agents,
    });
    print_table(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
        eprintln!("demo: wrote {}", path.display());
    }
    if summary["guest_verified"] != true {
        bail!(
            "a migrated guest did not carry on correctly; see {}",
            dir.display()
        );
    }
    Ok(())
}

fn print_table(s: &Value) {
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    let (p, a) = (&s["plain"], &s["agents"]);
    println!();
    println!("| | plain QEMU | through the agents |");
    println!("| --- | ---: | ---: |");
    println!(
        "| bytes on the wire | {:.1} MiB | {:.1} MiB ({:.1}% saved) |",
        mib(&p["qemu_bytes"]),
        mib(&a["link_bytes"]),
        a["savings_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| NAS bytes fetched by the target | - | {:.1} MiB |",
        mib(&a["nas_bytes"])
    );
    println!(
        "| pages mapped / dup / sent / fallback | - | {} / {} / {} / {} |",
        a["pages_mapped"], a["pages_dup"], a["pages_sent"], a["pages_fallback"]
    );
    println!(
        "| total time | {} ms | {} ms |",
        p["total_time_ms"], a["total_time_ms"]
    );
    println!(
        "| downtime (QEMU's) | {} ms | {} ms |",
        p["downtime_ms"], a["downtime_ms"]
    );
    println!(
        "| guest paused (source STOP to target RESUME) | {} ms | {} ms |",
        p["guest_paused_ms"], a["guest_paused_ms"]
    );
    println!(
        "| guest carried on (heartbeat, RAM checksum) | {} | {} |",
        p["guest_verified"], a["guest_verified"]
    );
}
