//! `agent daemon`: the host daemon. Follows the VMs it is told about (`agent follow`), keeps
//! their memory-to-disk maps, serves the target side like `agent serve`, and runs the
//! migrations `agent migrate` hands it, with the VM's map.
use std::path::PathBuf;

use agent::{
    daemon::{control::DEFAULT_SOCKET, run, DaemonConfig},
    telemetry::ObjectSource,
};

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The control socket (root-only) that `agent follow`, `status` and `migrate` use.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
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
    };
    run(config, super::stop_on_signals()).await?;
    Ok(())
}
