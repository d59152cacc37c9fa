//! `agent source`: the source side alone, for when something else drives QEMU (libvirt's
//! `virsh migrate --migrateuri`, or a QMP script). It accepts one migration connection from
//! the local QEMU, proxies it to the target agent, and prints the report.
use std::{path::PathBuf, sync::Arc};

use agent::migration::{
    report::Counters,
    source::{run_source, SourceConfig},
};
use anyhow::Context;
use nas_server::listener::Listen;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the local QEMU connects (`migrate tcp:...` / `--migrateuri`).
    #[arg(long, default_value = "127.0.0.1:4444")]
    listen: String,
    /// The target host's agent (`agent serve`), HOST:PORT.
    #[arg(long)]
    target_agent: String,
    /// Where the target agent finds the target QEMU's incoming socket, as seen on the target
    /// host (with libvirt and `--migrateuri tcp:127.0.0.1:P`, that is `tcp:127.0.0.1:P`).
    #[arg(long)]
    incoming: String,
    /// NAS export holding this VM's disk (repeatable).
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:10809")]
    nas_nbd: String,
    #[arg(long, default_value = "127.0.0.1:10810")]
    nas_index: Listen,
    #[arg(long, default_value = "vm")]
    vm: String,
    #[arg(long)]
    zstd: bool,
    /// Forward the stream verbatim.
    #[arg(long)]
    passthrough: bool,
    /// Also write QEMU's exact stream here.
    #[arg(long)]
    record: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!("waiting for QEMU on {}", args.listen);
    let (qemu, _) = listener.accept().await?;
    let link = TcpStream::connect(&args.target_agent)
        .await
        .with_context(|| format!("cannot reach the target agent at {}", args.target_agent))?;
    link.set_nodelay(true)?;
    let mut config = SourceConfig::new(&args.vm, args.exports, &args.nas_nbd, Some(args.nas_index));
    config.incoming = args.incoming;
    config.zstd = args.zstd;
    config.rewrite = !args.passthrough;
    config.record = args.record;
    let report = run_source(qemu, link, config, Arc::new(Counters::default())).await?;
    println!("{}", serde_json::to_string_pretty(&report.source)?);
    Ok(())
}
