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
    pub link_listen: SocketAddr,
    /// Read the NAS here instead of the address the source announces.
    #[arg(long)]
    nas: Option<Endpoint>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
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

impl Args {
    /// The target side's settings.
    pub fn target_config(&self) -> TargetConfig {
        TargetConfig {
            nas_override: self.nas.clone(),
            incoming: IncomingPolicy {
                unix_dirs: self.incoming_dirs.clone(),
                any_host: self.incoming_any_host,
            },
            max_sessions: self.max_sessions,
            ..TargetConfig::default()
        }
    }

    /// Binds the agent link's listener.
    pub async fn listen(&self) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = tokio::net::TcpListener::bind(self.link_listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.link_listen))?;
        tracing::info!("agent link listening on {}", listener.local_addr()?);
        Ok(listener)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    super::serve_metrics(args.metrics)?;
    let listener = args.listen().await?;
    serve(listener, args.target_config(), super::stop_on_signals()).await?;
    Ok(())
}
