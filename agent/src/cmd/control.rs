//! `agent follow`, `agent unfollow` and `agent status`: clients of the host daemon's control
//! socket.
use std::path::PathBuf;

use agent::daemon::control::{call, Request, DEFAULT_SOCKET};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct FollowArgs {
    /// The QMP socket of the QEMU to follow.
    #[arg(long)]
    qmp: PathBuf,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the daemon's JSON.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExpectArgs {
    /// The VM, as the source agent names it.
    vm: String,
    /// Where its target QEMU listens for the stream (libvirt's `migrate-incoming` URI as seen
    /// on this host): tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    incoming: String,
    /// The registration lapses unless a migration uses it within this many seconds.
    #[arg(long, default_value_t = 600)]
    ttl: u64,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

/// `agent expect`: registers one incoming migration with the host daemon's target side.
pub async fn expect(args: ExpectArgs) -> anyhow::Result<()> {
    let request = Request::Expect {
        vm: args.vm,
        incoming: args.incoming,
        ttl_secs: args.ttl,
    };
    call(&args.control, &request).await?;
    Ok(())
}

pub async fn follow(args: FollowArgs, on: bool) -> anyhow::Result<()> {
    let request = if on {
        Request::Follow { qmp: args.qmp }
    } else {
        Request::Unfollow { qmp: args.qmp }
    };
    let reply = call(&args.control, &request).await?;
    if on {
        println!("{}", serde_json::to_string_pretty(&reply["vm"])?);
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let reply = call(&args.control, &Request::Status).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("telemetry: {}", reply["telemetry"].as_str().unwrap_or("?"));
    for e in reply["expected_migrations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "expecting a migration of {} into {} ({})",
            e["vm"].as_str().unwrap_or("?"),
            e["incoming"].as_str().unwrap_or("?"),
            match e["expires_in_s"].as_u64() {
                Some(s) => format!("for {s} s more"),
                None => "standing".into(),
            }
        );
    }
    println!("follower drops: {}", reply["drops"]);
    println!(
        "dirty ring: {}",
        reply["dirty_ring"].as_str().unwrap_or("?")
    );
    for vm in reply["vms"].as_array().into_iter().flatten() {
        let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            "{} (pid {}): RAM mirrored on storage {:.1} MiB = {:.1}%, {} map entries \
             ({:.1} MiB of tables), {} events",
            vm["qmp"].as_str().unwrap_or("?"),
            vm["pid"],
            mib(&vm["mirrored_bytes"]),
            vm["mirrored_pct"].as_f64().unwrap_or(0.0),
            vm["map_entries"],
            mib(&vm["map_memory_bytes"]),
            vm["events"],
        );
        println!("  {}", memory_line(vm));
        if let Some(line) = ring_line(&vm["dirty_ring"]) {
            println!("  {line}");
        }
        let aio = &vm["aio"];
        if aio["submitted"].as_u64().unwrap_or(0) > 0 {
            println!(
                "  aio=native reads: {} seen at submission, {} waiting to land, {} cancelled, \
                 {} lost to a full queue",
                aio["submitted"], aio["pending"], aio["cancelled"], aio["overflowed"]
            );
        }
        for d in vm["disks"].as_array().into_iter().flatten() {
            match d["followed"].as_bool() {
                Some(true) => println!("  {}: followed ({})", d["device"], d["export"]),
                _ => println!(
                    "  {}: not followed: {}",
                    d["device"],
                    d["reason"].as_str().unwrap_or("?")
                ),
            }
        }
    }
    Ok(())
}

/// What KVM's dirty ring said of a VM in the last second, when it ever said anything.
fn ring_line(r: &Value) -> Option<String> {
    let counts = &r["counts"];
    if counts["pushes"].as_u64().unwrap_or(0) == 0 && counts["unmapped"].as_u64().unwrap_or(0) == 0
    {
        return None;
    }
    let state = if r["logging"] == true {
        format!(
            "logging: {:.1} MiB/s, {} pages, {} map entries dropped",
            r["bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["pages"],
            r["map_entries_dropped"],
        )
    } else {
        "dirty logging off".to_string()
    };
    Some(format!(
        "dirty ring: {state} ({} pushes, {} unmapped, {} ring-full exits since followed)",
        counts["pushes"], counts["unmapped"], counts["full_exits"]
    ))
}

/// A followed VM's dirty rate, with its age, and whether a migration would converge.
fn memory_line(vm: &Value) -> String {
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let d = &vm["dirty"];
    let mut line = match d["bytes_per_sec"].as_f64() {
        Some(_) => format!(
            "dirty {:.1} MiB/s ({:.0} s old, mean of the last samples)",
            mib(&d["bytes_per_sec"]),
            d["age_s"].as_f64().unwrap_or(0.0)
        ),
        None => "dirty rate not measured yet".to_string(),
    };
    if let Some(e) = d["error"].as_str().or(vm["figures_error"].as_str()) {
        line += &format!("; latest attempt failed: {e}");
    }
    let m = &vm["migration"];
    if m.is_object() {
        let verdict = |v: &Value| {
            if v == true {
                "converges"
            } else {
                "does NOT converge"
            }
        };
        line += &format!(
            "; at {:.0} MiB/s plain QEMU {}, the agents {} ({:.1} MiB on the link, {})",
            mib(&m["bandwidth"]),
            verdict(&m["plain_converges"]),
            verdict(&m["agents_converge"]),
            mib(&m["agents_link_bytes"]),
            match m["agents_total_s"].as_f64() {
                Some(t) => format!("{t:.1} s"),
                None => "never".to_string(),
            }
        );
    }
    line
}
