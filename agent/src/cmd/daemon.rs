//! `agent daemon`: the host daemon. Follows the VMs it is told about (`agent follow`), keeps
//! their memory-to-disk maps, serves the target side like `agent serve`, and runs the
//! migrations `agent migrate` hands it, with the VM's map.
use std::{path::PathBuf, time::Duration};

use agent::{
    daemon::{control::DEFAULT_SOCKET, figures::FiguresConfig, run, DaemonConfig},
    telemetry::ObjectSource,
};

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The control socket (root-only) that `agent follow`, `status` and `migrate` use.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    /// Seconds between two rounds of dirty-rate measurements of every followed VM (QMP
    /// calc-dirty-rate, one VM at a time); 0: only when a plan asks.
    #[arg(long, default_value_t = 30.0)]
    dirty_interval: f64,
    /// Window of each dirty-rate measurement (milliseconds).
    #[arg(long, default_value_t = 1000)]
    dirty_window_ms: u64,
    /// Never follow KVM's dirty rings. By default the slot and dirty-ring programs are
    /// attached when the first KVM VM is followed; from then on every ioctl of the host pays
    /// for them (`cargo xtask bench dirty-ring`).
    #[arg(long)]
    no_dirty_ring: bool,
    /// The link bandwidth `agent status` judges convergence at (K, M, G suffixes). Default:
    /// each VM's max-bandwidth.
    #[arg(long, value_parser = super::plan::parse_rate)]
    plan_bandwidth: Option<f64>,
    #[command(flatten)]
    serve: super::serve::Args,
}

pub async fn run_daemon(source: &ObjectSource, args: DaemonArgs) -> anyhow::Result<()> {
    super::serve_metrics(args.serve.metrics)?;
    let target = args.serve.target_config()?;
    let link = args.serve.listen().await?;
    let config = DaemonConfig {
        control: args.control,
        link,
        target,
        ebpf: source.clone(),
        figures: FiguresConfig {
            interval: (args.dirty_interval > 0.0)
                .then(|| Duration::from_secs_f64(args.dirty_interval.min(86_400.0))),
            window: Duration::from_millis(args.dirty_window_ms.clamp(100, 60_000)),
            bandwidth: args.plan_bandwidth,
        },
        dirty_ring: !args.no_dirty_ring,
    };
    run(config, super::stop_on_signals()).await?;
    Ok(())
}
