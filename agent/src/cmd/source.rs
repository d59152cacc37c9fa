//! `agent source`: the source side alone, for when something else drives QEMU (libvirt's
//! `virsh migrate --migrateuri`, or a QMP script). It accepts one migration connection from
//! the local QEMU, proxies it to the target agent, and prints the report: the figures of
//! `agent migrate`'s report that the agents know (QMP's times and states are the driver's).
use std::sync::Arc;

use agent::{
    migration::{
        pace::Cap,
        report::{Counters, Figures},
        source::run_source,
    },
    orchestrate::{
        qemu_uri,
        source_setup::{connect_link, listen_for_qemu},
    },
};
use nas_proto::Endpoint;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the local QEMU connects (`migrate` / `--migrateuri`): HOST:PORT, tcp:HOST:PORT or
    /// unix:PATH.
    #[arg(long, default_value = "127.0.0.1:4444", value_parser = super::parse_qemu_listen)]
    listen: Endpoint,
    /// The target host's agent (`agent serve`), HOST:PORT.
    #[arg(long)]
    target_agent: String,
    /// Cap the agent link at this many bytes per second until the switchover. QEMU's own
    /// max-bandwidth still holds its stream to this agent; with a link cap here, lift that
    /// (libvirt: leave `--bandwidth` unset).
    #[arg(long)]
    max_bandwidth: Option<u64>,
    #[command(flatten)]
    stream: super::StreamArgs,
    #[command(flatten)]
    tls: super::LinkTlsArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.stream.vm.is_some(),
        "--vm is required: the target agent delivers to the QEMU it knows by that name"
    );
    let security = args.tls.security(Vec::new())?;
    let spec = args.stream.spec()?;
    spec.check_index().await?;
    let listener = listen_for_qemu(&args.listen).await?;
    tracing::info!("waiting for QEMU on {}", qemu_uri(&args.listen));
    let (qemu, _) = listener.accept().await?;
    let link = connect_link(&args.target_agent, &security).await?;
    let cap = Arc::new(Cap::new(args.max_bandwidth));
    let config = spec.config(cap.clone());
    let report = run_source(qemu, link, config, Arc::new(Counters::default())).await?;
    let summary = Summary {
        figures: report.figures(),
        savings_pct: report.source.savings_pct(),
        link_bandwidth: cap.get(),
        passthrough_reason: report.passthrough_reason,
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// What `agent source` prints: named as in `agent migrate --json`.
#[derive(serde::Serialize)]
struct Summary {
    #[serde(flatten)]
    figures: Figures,
    savings_pct: f64,
    /// The cap the link was paced to until the switchover (`--max-bandwidth`); `None`: none.
    link_bandwidth: Option<u64>,
    passthrough_reason: Option<String>,
}
