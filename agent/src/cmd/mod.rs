//! One module per subcommand.
pub mod config;
pub mod control;
pub mod daemon;
pub mod migrate;
pub mod plan;
pub mod serve;
pub mod source;
pub mod telemetry;

use std::{net::SocketAddr, path::PathBuf};

use agent::{
    migration::{compress::Compression, secure::LinkSecurity},
    orchestrate::StreamSpec,
};
use anyhow::Context;
use nas_client::tls::StorageTls;
use nas_proto::{endpoint::EndpointError, Endpoint};

/// What the source side needs to know about a VM's stream, shared by `migrate` and `source`.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// NAS export holding this VM's disk (repeatable); lookups never leave these.
    #[arg(long = "export", required = true)]
    pub exports: Vec<String>,
    /// The NAS's NBD address, as the target agent reaches it.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nas_nbd: String,
    /// The NAS's index service; without it every page is sent in full.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub nas_index: Endpoint,
    /// TLS towards nas-server's index service (a credentials directory in QEMU's layout),
    /// when it requires TLS.
    #[arg(long, value_name = "DIR")]
    pub nas_tls_creds: Option<PathBuf>,
    /// No index service: only the host daemon's memory-to-disk map places pages (map-only
    /// mode, for storage that indexes nothing: qemu-nbd, nbdkit, shared image files).
    #[arg(long)]
    pub no_index: bool,
    /// The VM's name: the target agent delivers to the QEMU it knows by this name
    /// (`DIR/VM.qmp` in its QMP directory, or a registration). `agent migrate` defaults it to
    /// the target QMP socket's name without `.qmp`.
    #[arg(long)]
    pub vm: Option<String>,
    /// Compress non-mapped data on the link with zstd: `auto` while the link is what the
    /// stream waits for, `always`, or `never`. `--zstd` alone means `always`.
    #[arg(long, value_enum, default_value_t = Compression::Auto, num_args = 0..=1,
          default_missing_value = "always", value_name = "WHEN")]
    pub zstd: Compression,
    /// Forward the stream verbatim (for capabilities the rewriter cannot parse).
    #[arg(long)]
    pub passthrough: bool,
    /// Deduplicate the pages QEMU sends while the guest is paused even when the link keeps
    /// up: fewer link bytes, a longer pause. By default they go out as QEMU sent them unless
    /// the link is what holds the stream up.
    #[arg(long)]
    pub dedup_paused: bool,
    /// Also write QEMU's exact stream here.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

impl StreamArgs {
    /// The source side's view of the stream; credentials are loaded here.
    pub fn spec(self) -> anyhow::Result<StreamSpec> {
        Ok(StreamSpec {
            vm: self.vm.unwrap_or_default(),
            exports: self.exports,
            nas_nbd: self.nas_nbd,
            nas_index: (!self.no_index).then_some(self.nas_index),
            nas_tls: StorageTls::load(self.nas_tls_creds.as_deref())?,
            zstd: self.zstd,
            passthrough: self.passthrough,
            dedup_paused: self.dedup_paused,
            record: self.record,
            page_map: None,
        })
    }
}

/// How the agent link is protected, shared by every command that opens or serves one.
#[derive(Debug, clap::Args)]
pub struct LinkTlsArgs {
    /// Mutual TLS on the agent link, with the credentials in DIR (QEMU's tls-creds-x509
    /// layout: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem).
    #[arg(long, value_name = "DIR", env = "AGENT_TLS_CREDS")]
    pub tls_creds: Option<PathBuf>,
    /// Run the agent link in plaintext, unauthenticated (only on a network where every host
    /// that reaches the link is trusted). Required when no --tls-creds is given.
    #[arg(long)]
    pub insecure: bool,
}

impl LinkTlsArgs {
    /// The link's security; `allow`: source identities a target accepts (empty: any).
    pub fn security(&self, allow: Vec<String>) -> anyhow::Result<LinkSecurity> {
        Ok(LinkSecurity::configure(
            self.tls_creds.as_deref(),
            self.insecure,
            allow,
        )?)
    }
}

/// Where the local QEMU sends its migration stream: `HOST:PORT`, `tcp:HOST:PORT` (QEMU's own
/// spelling) or `unix:PATH`.
pub fn parse_qemu_listen(s: &str) -> Result<Endpoint, EndpointError> {
    s.strip_prefix("tcp:").unwrap_or(s).parse()
}

/// A switch that turns true at SIGINT or SIGTERM: the daemons' one shutdown path.
pub fn stop_on_signals() -> tokio::sync::watch::Receiver<bool> {
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
    stop_rx
}

/// Serves the process's Prometheus metrics on `addr`, when given.
pub fn serve_metrics(addr: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
    }
    Ok(())
}
