//! One module per subcommand.
pub mod migrate;
pub mod serve;
pub mod source;
pub mod telemetry;

use std::net::SocketAddr;

use anyhow::Context;

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
