//! `agent telemetry`: attach the block-I/O probe, print what it counts, optionally serve it to
//! Prometheus.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use agent::telemetry::{device, BlockIoProbe, IoSnapshot, ObjectSource, ProgramCost};
use agent_common::{IoCount, IoDrop};
use anyhow::Context;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds to run; 0 runs until Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Seconds between reports.
    #[arg(long, default_value_t = 1)]
    interval: u64,
    /// Processes shown per report.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print the final report as JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

#[derive(Debug, Serialize)]
struct Report {
    devices: Vec<DeviceRow>,
    processes: Vec<ProcessRow>,
    dropped: BTreeMap<&'static str, u64>,
    ebpf_events: u64,
    ebpf_ns_per_event: Option<f64>,
}

#[derive(Debug, Serialize)]
struct DeviceRow {
    dev: String,
    name: String,
    requests: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct ProcessRow {
    pid: u32,
    comm: String,
    dev: String,
    requests: u64,
    bytes: u64,
}

pub async fn run(source: &ObjectSource, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.interval > 0, "--interval must be at least 1 second");
    let probe = BlockIoProbe::attach(source).context("cannot start block-I/O telemetry")?;
    // Per-event cost is measured by the kernel only while stats are enabled; the fd keeps them on.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| tracing::warn!("per-event cost will not be measured: {e}"))
        .ok();
    super::serve_metrics(args.metrics)?;
    let mut ticker = tokio::time::interval(Duration::from_secs(args.interval));
    ticker.tick().await;
    let deadline = (args.duration > 0).then(|| Duration::from_secs(args.duration));
    let started = tokio::time::Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        let snapshot = probe.snapshot()?;
        export(&snapshot, probe.cost().ok());
        if !args.json {
            print_text(
                &report(&snapshot, probe.cost().ok(), args.top),
                started.elapsed(),
            );
        }
        if deadline.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    let snapshot = probe.snapshot()?;
    let final_report = report(&snapshot, probe.cost().ok(), args.top);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&final_report)?);
    } else {
        println!("final:");
        print_text(&final_report, started.elapsed());
    }
    Ok(())
}

fn report(snapshot: &IoSnapshot, cost: Option<ProgramCost>, top: usize) -> Report {
    let devices = snapshot
        .by_device()
        .into_iter()
        .map(|(dev, c)| DeviceRow {
            dev: device::display(dev),
            name: device::name(dev),
            requests: c.requests,
            bytes: c.bytes,
        })
        .collect();
    let mut processes: Vec<_> = snapshot.counts.iter().collect();
    processes.sort_by_key(|(_, c)| std::cmp::Reverse(c.requests));
    let processes = processes
        .into_iter()
        .take(top)
        .map(|(k, c)| ProcessRow {
            pid: k.tgid,
            comm: comm(k.tgid),
            dev: device::display(k.dev),
            requests: c.requests,
            bytes: c.bytes,
        })
        .collect();
    Report {
        devices,
        processes,
        dropped: IoDrop::ALL
            .iter()
            .map(|d| (d.name(), snapshot.drops[*d as usize]))
            .collect(),
        ebpf_events: cost.map_or(0, |c| c.runs),
        ebpf_ns_per_event: cost.and_then(|c| c.ns_per_event()),
    }
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(exited)".to_string())
}

fn print_text(report: &Report, elapsed: Duration) {
    println!("-- {:.0}s --", elapsed.as_secs_f64());
    for d in &report.devices {
        println!(
            "  disk {:<8} {:>7}  {:>10} requests  {:>14} bytes",
            d.name, d.dev, d.requests, d.bytes
        );
    }
    for p in &report.processes {
        println!(
            "  pid {:>7} {:<16} disk {:>7}  {:>10} requests  {:>14} bytes",
            p.pid, p.comm, p.dev, p.requests, p.bytes
        );
    }
    let dropped: u64 = report.dropped.values().sum();
    let cost = report
        .ebpf_ns_per_event
        .map_or("n/a".to_string(), |ns| format!("{ns:.0} ns"));
    println!(
        "  eBPF events {}  dropped {}  cost/event {}",
        report.ebpf_events, dropped, cost
    );
}

fn export(snapshot: &IoSnapshot, cost: Option<ProgramCost>) {
    for (dev, IoCount { requests, bytes }) in snapshot.by_device() {
        let name = device::name(dev);
        metrics::counter!("agent_block_requests_total", "device" => name.clone())
            .absolute(requests);
        metrics::counter!("agent_block_bytes_total", "device" => name).absolute(bytes);
    }
    for reason in IoDrop::ALL {
        metrics::counter!("agent_ebpf_events_dropped_total", "reason" => reason.name())
            .absolute(snapshot.drops[reason as usize]);
    }
    if let Some(cost) = cost {
        metrics::counter!("agent_ebpf_program_runs_total").absolute(cost.runs);
        metrics::counter!("agent_ebpf_program_run_nanoseconds_total")
            .absolute(cost.run_time.as_nanos() as u64);
    }
}
