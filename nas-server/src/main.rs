//! `nas-server`: the storage-node daemon. Parses flags and config, opens and indexes the
//! exports (restoring the persisted index when `--index-dir` is set), serves NBD until SIGTERM
//! or SIGINT, then drains, flushes, persists the index and exits 0.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use nas_proto::{index::ExportInfo, Endpoint};
use nas_server::{
    config::{Config, ExportSpec, Overrides, TlsMode},
    export::{file::FileExport, hashing::HashingExport, Export, ExportEntry, Exports},
    index::{build::hash_file, hot::HotSet, store::IndexStore, BlockIndex},
    server::{NbdServer, ServerTls},
    service::server::{CatalogEntry, IndexService},
};
use tls_creds::Creds;
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
    listen: Vec<Endpoint>,
    /// Serve a raw image: NAME=PATH[,ro][,shared][,noindex][,allow=IDENTITY]... (repeatable;
    /// `allow`: only TLS clients whose certificate names IDENTITY may use it).
    #[arg(long)]
    export: Vec<ExportSpec>,
    /// TOML configuration file; flags add to it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Persist the block index here, so a restart over an unchanged image does not rehash.
    #[arg(long)]
    index_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Concurrent connections accepted (further clients wait in the listen backlog).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Index service listener, HOST:PORT or unix:PATH (repeatable). Default 127.0.0.1:10810.
    #[arg(long)]
    index_listen: Vec<Endpoint>,
    /// Hot-set capacity per export, in 4 KiB blocks (about the VM's RAM). 0 disables it.
    #[arg(long)]
    hot_blocks: Option<usize>,
    /// TLS credentials for NBD and the index service, in QEMU's tls-creds-x509 layout
    /// (ca-cert.pem, server-cert.pem, server-key.pem).
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// NBD STARTTLS: `require` (the default with --tls-creds; every option before it is
    /// answered NBD_REP_ERR_TLS_REQD), `optional`, or `off` (the default without).
    #[arg(long, value_enum)]
    tls: Option<TlsMode>,
}

type Layered = HashingExport<FileExport>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rustls warns of every client that sends an IP address as SNI (libnbd does).
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rustls=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Installed first: a signal that arrives while exports are being indexed is kept and acted
    // on once serving starts, instead of killing the process with the default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cli = Cli::parse();
    let config = Config::build(
        cli.config.as_deref(),
        Overrides {
            listen: cli.listen,
            exports: cli.export,
            metrics: cli.metrics,
            max_connections: cli.max_connections,
            index_dir: cli.index_dir,
            index_listen: cli.index_listen,
            hot_blocks: cli.hot_blocks,
            tls_creds: cli.tls_creds,
            tls: cli.tls,
        },
    )?;
    // First, so start-up figures (index size) are recorded too.
    if let Some(addr) = config.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let store = match &config.index_dir {
        Some(dir) => Some(
            IndexStore::open(dir)
                .with_context(|| format!("cannot open the index store in {}", dir.display()))?,
        ),
        None => None,
    };
    let index = Arc::new(BlockIndex::new());
    let mut layered: Vec<(String, Arc<Layered>)> = Vec::new();
    let mut entries = Vec::new();
    let mut catalog = Vec::new();
    for (id, spec) in (1..).zip(&config.exports) {
        let file = FileExport::open(&spec.path, spec.read_only)
            .with_context(|| format!("cannot open export {:?}", spec.name))?;
        if spec.noindex {
            // No hashing layer, no hot set, not in the index service's catalog.
            tracing::info!(export = %spec.name, "served without the block index");
            entries.push(ExportEntry {
                name: spec.name.clone(),
                description: spec.description.clone(),
                export: Arc::new(file),
                allow: spec.allow.clone(),
            });
            continue;
        }
        let context = || format!("cannot index export {:?}", spec.name);
        let export = match &store {
            Some(store) => {
                let (table, journal, recovery) = store
                    .prepare(&spec.name, file.file())
                    .with_context(context)?;
                tracing::info!(export = %spec.name, ?recovery, "index restored");
                index.install(id, table);
                HashingExport::new(file, index.clone(), id).with_journal(journal)
            }
            None => {
                index.install(
                    id,
                    hash_file(file.file(), file.size()).with_context(context)?,
                );
                HashingExport::new(file, index.clone(), id)
            }
        };
        let hot = Arc::new(HotSet::new(id, config.hot_blocks));
        let export = Arc::new(export.with_hot_set(hot.clone()));
        catalog.push(CatalogEntry {
            info: ExportInfo {
                id,
                size: export.size(),
                shared: spec.shared,
                name: spec.name.clone(),
            },
            hot: Some(hot),
            allow: spec.allow.clone(),
        });
        tracing::info!(
            export = %spec.name,
            path = %spec.path.display(),
            size = export.size(),
            read_only = spec.read_only,
            "export ready"
        );
        layered.push((spec.name.clone(), export.clone()));
        entries.push(ExportEntry {
            name: spec.name.clone(),
            description: spec.description.clone(),
            export,
            allow: spec.allow.clone(),
        });
    }
    metrics::gauge!("nas_index_distinct_blocks").set(index.distinct() as f64);
    let tls = match &config.tls_creds {
        Some(dir) if config.tls != TlsMode::Off => {
            let creds = Creds::load(dir)?;
            tracing::info!(mode = %config.tls, creds = %dir.display(), "NBD over TLS");
            ServerTls::new(config.tls, &creds)?
        }
        _ => ServerTls::off(),
    };
    let service_tls = tls.clone();
    let server = NbdServer::bind(
        Exports::new(entries),
        &config.listen,
        config.max_connections,
    )
    .await?
    .with_tls(tls);
    for addr in server.local_addrs() {
        tracing::info!("listening on {addr}");
    }
    let service = IndexService::bind(
        catalog,
        index.clone(),
        &config.index_listen,
        config.max_connections,
    )
    .await?
    .with_tls(service_tls);
    for addr in service.local_addrs() {
        tracing::info!("index service on {addr}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    // Returns once every connection is drained and every export flushed.
    tokio::join!(server.run(stop_rx.clone()), service.run(stop_rx));
    if let Some(store) = &store {
        for (name, export) in &layered {
            let (Some(journal), Some(table)) = (export.journal(), index.table(export.id())) else {
                continue;
            };
            store
                .finish(name, export.inner().file(), &table, journal)
                .with_context(|| format!("cannot persist the index of {name:?}"))?;
            tracing::info!(export = %name, "index persisted");
        }
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
