//! `agent migrate`: one live migration through the agents, with progress and a report.
//! Ctrl-C or SIGTERM cancels it cleanly (see [`agent::orchestrate::migrate`]); a second one exits.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agent::{
    daemon::control::{
        call, call_cancellable, ControlError, MigrateRequest, Request, DEFAULT_SOCKET,
    },
    migration::report::Figures,
    orchestrate::{migrate, MigrateOptions, MigrationReport},
    plan::{model::Forecast, plan_now, Ask, IndexAsk, Plan},
};
use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    source_qmp: PathBuf,
    /// QMP socket of the target QEMU (started with `-incoming defer`).
    #[arg(long)]
    target_qmp: PathBuf,
    /// The target host's agent (`agent serve`), HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7800")]
    target_agent: String,
    #[command(flatten)]
    stream: super::StreamArgs,
    #[command(flatten)]
    tls: super::LinkTlsArgs,
    /// Where this agent takes the source QEMU's stream: HOST:PORT, tcp:HOST:PORT or
    /// unix:PATH (default: a socket pair whose other end the source QEMU is handed over QMP,
    /// with its send buffer kept small: what QEMU wrote before it stops the guest is read
    /// inside the pause).
    #[arg(long, value_parser = super::parse_qemu_listen)]
    qemu_listen: Option<nas_proto::Endpoint>,
    /// Cap the agent link at this many bytes per second until the switchover (0: no cap).
    /// Default: the source QEMU's own max-bandwidth, which the agent carries on the link
    /// instead, lifting it from QEMU's stream to this agent for the migration.
    #[arg(long)]
    max_bandwidth: Option<u64>,
    /// From the source QEMU's STOP until the stream is delivered (the guest is paused then),
    /// run this agent's threads at this nice value, so that the final iteration does not wait
    /// for a CPU; a value at or above the agent's own leaves it alone.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    pause_nice: i32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Serve the migration counters to Prometheus on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The host daemon's control socket: the migration runs there, with the VM's
    /// memory-to-disk map. When no daemon answers, it runs here without a map.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    /// Run the migration in this process even when the host daemon is up.
    #[arg(long)]
    no_daemon: bool,
    /// Do not predict the migration before starting it (`agent plan`; without the host
    /// daemon that measures the dirty rate for a second first).
    #[arg(long)]
    no_plan: bool,
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.stream.vm.is_none() {
        let stem = args.target_qmp.file_stem().and_then(|s| s.to_str());
        args.stream.vm = Some(
            stem.context("name the VM with --vm (the target QMP socket's name is not one)")?
                .to_string(),
        );
    }
    super::serve_metrics(args.metrics)?;
    // Registered before anything starts, so no signal kills the process half-way.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    // Checked before anything starts, daemon or not.
    let link_security = args.tls.security(Vec::new())?;
    let predicted = if args.no_plan {
        None
    } else {
        predict(&args).await
    };
    if !args.no_daemon {
        let cancel = async {
            signalled(&mut interrupt, &mut terminate).await;
            tracing::warn!("cancelling the migration in the host daemon");
        };
        if let Some(report) = via_daemon(&args, predicted.clone(), cancel).await? {
            return print(&report, args.json);
        }
    }
    let cancel = async move {
        signalled(&mut interrupt, &mut terminate).await;
        tracing::warn!(
            "cancelling the migration; the guest stays with the source QEMU unless the target \
             already runs it (a second Ctrl-C or SIGTERM exits at once)"
        );
        tokio::spawn(async move {
            signalled(&mut interrupt, &mut terminate).await;
            std::process::exit(130);
        });
    };
    // The library reports progress on a channel; the bar is this command's.
    let progress = (!args.json).then(|| {
        let (tx, rx) = tokio::sync::watch::channel(Figures::default());
        (tx, tokio::spawn(draw_progress(rx)))
    });
    let stream = args.stream.spec()?;
    let report = migrate(
        MigrateOptions {
            source_qmp: args.source_qmp,
            target_qmp: args.target_qmp,
            target_agent: args.target_agent,
            stream,
            link_security,
            source_listen: args.qemu_listen,
            max_bandwidth: args.max_bandwidth,
            progress: progress.as_ref().map(|(tx, _)| tx.clone()),
            pause_nice: Some(args.pause_nice),
            timeout: Duration::from_secs(args.timeout),
        },
        cancel,
    )
    .await;
    if let Some((tx, bar)) = progress {
        drop(tx);
        let _ = bar.await;
    }
    let mut report = report?;
    report.predicted = predicted;
    print(&report, args.json)
}

/// The plan for this migration, printed before it starts: asked of the host daemon (with the
/// VM's map and smoothed dirty rate), else made here. A plan that cannot be made costs only a
/// warning.
async fn predict(args: &Args) -> Option<Forecast> {
    let ask = Ask {
        bandwidth: args.max_bandwidth.filter(|b| *b > 0).map(|b| b as f64),
        final_bandwidth: None,
        zstd: args.stream.zstd.name().to_string(),
        index: (!args.stream.no_index).then(|| IndexAsk {
            addr: args.stream.nas_index.to_string(),
            exports: args.stream.exports.clone(),
            tls_creds: args.stream.nas_tls_creds.clone(),
        }),
    };
    let qmp = &args.source_qmp;
    let from_daemon = if args.no_daemon || !args.control.exists() {
        None
    } else {
        let request = Request::Plan {
            qmp: Some(qmp.clone()),
            ask: ask.clone(),
        };
        call(&args.control, &request)
            .await
            .ok()
            .and_then(|r| serde_json::from_value::<Plan>(r["plans"][0]["plan"].clone()).ok())
    };
    let plan = match from_daemon {
        Some(p) => p,
        None => match plan_now(qmp, Duration::from_secs(1), &ask).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("no prediction for this migration: {e}");
                return None;
            }
        },
    };
    eprint!(
        "{}",
        super::plan::describe(0, &qmp.display().to_string(), &plan, false)
    );
    Some(plan.agents)
}

fn print(report: &MigrationReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{}", report.text());
    }
    anyhow::ensure!(
        report.ok,
        "migration failed; the source VM is {}",
        report.source_status
    );
    Ok(())
}

/// Hands the migration to the host daemon; `None` when no daemon answers (then it runs here).
async fn via_daemon(
    args: &Args,
    predicted: Option<Forecast>,
    cancel: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Option<MigrationReport>> {
    if !args.control.exists() {
        tracing::info!(
            "no host daemon at {}: migrating from this process, without a memory-to-disk map",
            args.control.display()
        );
        return Ok(None);
    }
    let s = &args.stream;
    let request = MigrateRequest {
        source_qmp: args.source_qmp.clone(),
        target_qmp: args.target_qmp.clone(),
        target_agent: args.target_agent.clone(),
        vm: s.vm.clone().unwrap_or_default(),
        exports: s.exports.clone(),
        nas_nbd: s.nas_nbd.clone(),
        nas_index: (!s.no_index).then(|| s.nas_index.to_string()),
        nas_tls_creds: s.nas_tls_creds.clone(),
        qemu_listen: args.qemu_listen.as_ref().map(ToString::to_string),
        zstd: s.zstd.name().to_string(),
        passthrough: s.passthrough,
        dedup_paused: s.dedup_paused,
        max_bandwidth: args.max_bandwidth,
        pause_nice: Some(args.pause_nice),
        record: s.record.clone(),
        timeout_secs: args.timeout,
        tls_creds: args.tls.tls_creds.clone(),
        insecure: args.tls.insecure,
        predicted,
    };
    let request = Request::Migrate {
        request: Box::new(request),
    };
    match call_cancellable(&args.control, &request, cancel).await {
        Ok(reply) => Ok(Some(serde_json::from_value(reply["report"].clone())?)),
        Err(ControlError::Connect { path, source }) => {
            tracing::warn!(
                "the host daemon at {path} does not answer ({source}): migrating from this \
                 process, without a memory-to-disk map"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Until either signal arrives.
async fn signalled(interrupt: &mut Signal, terminate: &mut Signal) {
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

/// Draws the migration's figures as a one-line spinner until the channel closes.
async fn draw_progress(mut figures: tokio::sync::watch::Receiver<Figures>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    while figures.changed().await.is_ok() {
        let f = *figures.borrow_and_update();
        bar.set_message(format!(
            "QEMU {:.1} MiB -> link {:.1} MiB | mapped {} dup {} sent {} | saved {:.1}%",
            mib(f.qemu_bytes),
            mib(f.link_bytes),
            f.pages_mapped,
            f.pages_dup,
            f.pages_sent,
            f.savings_pct()
        ));
        bar.tick();
    }
    bar.finish_and_clear();
}
