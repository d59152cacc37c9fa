//! `nas-server`: the storage-node daemon. Parses flags and config, opens and indexes the
//! exports, serves NBD until SIGTERM or SIGINT, then drains, flushes and exits 0.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use nas_server::{
    config::{Config, ExportSpec},
    export::{file::FileExport, hashing::HashingExport, Export, ExportEntry, Exports},
    index::{build::hash_file, BlockIndex},
    server::{Listen, NbdServer},
};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "NBD storage server for VM disks, with a BLAKE3 block index"
)]
struct Cli {
    /// Listen on HOST:PORT or unix:PATH (repeatable). Default 127.0.0.1:10809.
    #[arg(long)]
    listen: Vec<Listen>,
    /// Serve a raw image: NAME=PATH[,ro] (repeatable).
    #[arg(long)]
    export: Vec<ExportSpec>,
    /// TOML configuration file; flags add to it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Concurrent connections accepted (further clients wait in the listen backlog).
    #[arg(long)]
    max_connections: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = Config::build(
        cli.config.as_deref(),
        cli.listen,
        cli.export,
        cli.metrics,
        cli.max_connections,
    )?;
    let index = Arc::new(BlockIndex::new());
    let mut entries = Vec::new();
    for (id, spec) in (1..).zip(&config.exports) {
        let export = FileExport::open(&spec.path, spec.read_only)
            .with_context(|| format!("cannot open export {:?}", spec.name))?;
        let size = export.size();
        tracing::info!(export = %spec.name, path = %spec.path.display(), size, "hashing blocks");
        let table = hash_file(export.file(), size)
            .with_context(|| format!("cannot index export {:?}", spec.name))?;
        index.install(id, table);
        tracing::info!(export = %spec.name, read_only = spec.read_only, "export ready");
        entries.push(ExportEntry {
            name: spec.name.clone(),
            description: spec.description.clone(),
            export: Arc::new(HashingExport::new(export, index.clone(), id)),
        });
    }
    metrics::gauge!("nas_index_distinct_blocks").set(index.distinct() as f64);
    if let Some(addr) = config.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let server = NbdServer::bind(
        Exports::new(entries),
        &config.listen,
        config.max_connections,
    )
    .await?;
    for addr in server.local_addrs() {
        tracing::info!("listening on {addr}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    server.run(stop_rx).await;
    tracing::info!("stopped cleanly");
    Ok(())
}
