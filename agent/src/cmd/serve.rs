//! `agent serve`: the target-side daemon. Accepts agent links and rebuilds each migration into
//! the target QEMU the source agent names.
use std::{net::SocketAddr, path::PathBuf};

use agent::{
    migration::{
        incoming::IncomingPolicy,
        target::{TargetConfig, MAX_SESSIONS},
    },
    serve::serve,
};
use anyhow::Context;
use nas_proto::Endpoint;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where source agents connect.
    #[arg(long, default_value = "127.0.0.1:7800")]
    link_listen: SocketAddr,
    /// Read the NAS here instead of the address the source announces.
    #[arg(long)]
    nas: Option<Endpoint>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Deliver to target QEMUs listening on unix sockets in this directory (repeatable). A
    /// source names the socket; without this, unix sockets are refused.
    #[arg(long = "incoming-dir", value_name = "DIR")]
    incoming_dirs: Vec<PathBuf>,
    /// Deliver to target QEMUs on TCP addresses other than loopback too. By default only
    /// loopback is accepted: the target QEMU runs on this host, and the address comes from the
    /// network.
    #[arg(long)]
    incoming_any_host: bool,
    /// Migrations served at once; a source connecting beyond that is refused.
    #[arg(long, default_value_t = MAX_SESSIONS)]
    max_sessions: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    super::serve_metrics(args.metrics)?;
    let listener = tokio::net::TcpListener::bind(args.link_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.link_listen))?;
    tracing::info!("agent link listening on {}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = stop_tx.send(true);
    });
    let config = TargetConfig {
        nas_override: args.nas,
        incoming: IncomingPolicy {
            unix_dirs: args.incoming_dirs,
            any_host: args.incoming_any_host,
        },
        max_sessions: args.max_sessions,
        ..TargetConfig::default()
    };
    serve(listener, config, stop_rx).await?;
    Ok(())
}
