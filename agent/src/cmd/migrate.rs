//! `agent migrate`: one live migration through the agents, with progress and a report.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agent::control::{migrate, MigrateOptions};
use nas_server::listener::Listen;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    source_qmp: PathBuf,
    /// QMP socket of the target QEMU (started with `-incoming defer`).
    #[arg(long)]
    target_qmp: PathBuf,
    /// The target host's agent (`agent serve`), HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7800")]
    target_agent: String,
    /// NAS export holding this VM's disk (repeatable); lookups never leave these.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// The NAS's NBD address, as the target agent reaches it.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nas_nbd: String,
    /// The NAS's index service; without it every page is sent in full.
    #[arg(long, default_value = "127.0.0.1:10810")]
    nas_index: Listen,
    /// Name of the VM, for logs.
    #[arg(long, default_value = "vm")]
    vm: String,
    /// Address the target QEMU listens on (default: a free loopback port).
    #[arg(long)]
    incoming: Option<String>,
    /// Compress non-mapped data on the link with zstd.
    #[arg(long)]
    zstd: bool,
    /// Forward the stream verbatim (for capabilities the rewriter cannot parse).
    #[arg(long)]
    passthrough: bool,
    /// Source QEMU max-bandwidth, bytes per second.
    #[arg(long)]
    max_bandwidth: Option<u64>,
    /// Also write QEMU's exact stream here.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Serve the migration counters to Prometheus on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    super::serve_metrics(args.metrics)?;
    let report = migrate(MigrateOptions {
        source_qmp: args.source_qmp,
        target_qmp: args.target_qmp,
        target_agent: args.target_agent,
        vm: args.vm,
        exports: args.exports,
        nas_nbd: args.nas_nbd,
        nas_index: Some(args.nas_index),
        incoming: args.incoming,
        zstd: args.zstd,
        passthrough: args.passthrough,
        max_bandwidth: args.max_bandwidth,
        record: args.record,
        progress: !args.json,
        timeout: Duration::from_secs(args.timeout),
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.text());
    }
    anyhow::ensure!(
        report.ok,
        "migration failed; the source VM is {}",
        report.source_status
    );
    Ok(())
}
