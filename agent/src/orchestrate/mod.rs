//! Orchestration of one migration from the source host: `agent migrate` drives both QEMUs over
//! QMP through the agents (and `agent source` reuses its set-up for libvirt).
//!
//! ```text
//! agent migrate (source host)                         agent serve (target host)
//!   checks both QEMUs' capabilities and the index service (version, the VM's exports)
//!   link -> target agent ---------------------------->  accepts the link
//!   socket pair; QMP source: getfd, migrate fd:
//!   (or listens where --qemu-listen says; migrate there)
//!   HELLO {vm} -------------------------------------->  finds the VM's QEMU on its host,
//!                                                       hands it a socket (getfd,
//!                                                       migrate-incoming fd:), rebuilds
//!                                                       the stream, reports DONE
//!   proxies QEMU's stream, shows progress, waits for completion, prints the report
//! ```
//! Failure is always clean: if anything breaks before the target confirms delivery (or the
//! operator cancels), the source QEMU's connection is dropped, so its migration fails and the
//! guest keeps running; [`settle::settle`] then decides which QEMU runs the guest, and never
//! resumes a source whose whole stream the target may have loaded.
//!
//! Modules: [`bandwidth`] (the operator's cap moved from QEMU's stream to the agent link),
//! [`switchover`] (the link's rate given to QEMU for its switchover decision), [`mod@settle`]
//! (where the guest runs afterwards), [`report`] (the report and its counters). Progress goes
//! out on a `watch` channel of [`Figures`]; the command layer draws it.
use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use nas_proto::Endpoint;
use tokio::sync::watch;

pub mod bandwidth;
pub mod error;
pub mod report;
pub mod settle;
pub mod source_setup;
pub mod switchover;

use self::{
    bandwidth::Bandwidth,
    error::{dst_err, src_err},
    settle::{cancel_if_active, settle, Outcome},
    source_setup::{connect_link, listen_for_qemu, qemu_socket_pair, Inlet},
    switchover::Switchover,
};
pub use self::{error::ControlError, report::MigrationReport, source_setup::StreamSpec};
use crate::{
    migration::{
        moments::PauseStages,
        report::{Counters, Figures},
        secure::LinkSecurity,
        source::run_source,
    },
    qmp::{guest_pause, last_event_time, Qmp, QmpError, RunState},
};

/// Capabilities whose streams cannot go through a one-way, single-connection proxy.
const UNPROXYABLE: &[&str] = &[
    "multifd",
    "postcopy-ram",
    "postcopy-preempt",
    "return-path",
    "switchover-ack",
    "x-colo",
    "rdma-pin-all",
];
/// Capabilities that change the stream in ways the rewriter does not parse.
const NOT_REWRITABLE: &[&str] = &["mapped-ram", "background-snapshot", "x-ignore-shared"];

/// What `agent migrate` needs.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub source_qmp: PathBuf,
    pub target_qmp: PathBuf,
    pub target_agent: String,
    /// The VM's stream, as the source side needs it.
    pub stream: StreamSpec,
    /// TLS on the agent link, or the operator's plaintext opt-out.
    pub link_security: LinkSecurity,
    /// Where this agent takes the source QEMU's stream (`HOST:PORT` or `unix:PATH`); default
    /// a socket pair whose other end QEMU is handed ([`source_setup::qemu_socket_pair`]).
    pub source_listen: Option<Endpoint>,
    /// The cap on the agent link for this migration, bytes per second (0: none); `None`
    /// takes the source QEMU's `max-bandwidth` (see [`bandwidth`]).
    pub max_bandwidth: Option<u64>,
    /// Where the migration's figures go every 250 ms while it runs, for a progress display.
    pub progress: Option<watch::Sender<Figures>>,
    /// The nice value this process's threads take from the source QEMU's STOP until the
    /// migration ends (see [`crate::priority`]); `None` leaves them alone.
    pub pause_nice: Option<i32>,
    pub timeout: Duration,
}

/// Runs one migration from the source QEMU to the target QEMU through the agents.
///
/// `cancel` resolving (the operator's Ctrl-C) stops it: before the source QEMU's stream began,
/// with an error and nothing started; after, like any failure, with a report, the source's
/// migration cancelled and the guest wherever [`settle::settle`] finds it safe.
pub async fn migrate(
    opts: MigrateOptions,
    cancel: impl Future<Output = ()>,
) -> Result<MigrationReport, ControlError> {
    tokio::pin!(cancel);
    // The source QEMU's max-bandwidth, once `begin` has lifted it.
    let lifted = OnceLock::new();
    let begun = tokio::select! {
        r = begin(&opts, &lifted) => r?,
        () = &mut cancel => {
            // At most the source QEMU is connecting to a listener that is closed now.
            if let Err(e) = cancel_source(&opts.source_qmp, lifted.get().copied()).await {
                tracing::warn!("cannot cancel the source QEMU's migration: {e}");
            }
            return Err(ControlError::Cancelled);
        }
    };
    drive(opts, begun, cancel).await
}

/// The source side's task, owned by the migration that runs it: if that migration is dropped
/// half-way (its caller gone, as with a killed process), the task stops with it, closing the
/// source QEMU's connection and the link, instead of proxying on with no one to settle.
struct Owned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything up to the source QEMU's stream arriving.
struct Begun {
    src: Qmp,
    dst: Qmp,
    source_was_running: bool,
    target_ram_preallocated: Option<bool>,
    bandwidth: Bandwidth,
    link: Box<dyn nas_proto::net::Stream>,
    qemu: Box<dyn nas_proto::net::Stream>,
    started: Instant,
}

/// Checks both QEMUs and the index service, sets up the target, opens the link and starts the
/// source QEMU's migration into this agent. `lifted` gets the source's `max-bandwidth` once it
/// is lifted (see [`bandwidth`]), for a cancel to put back.
async fn begin(opts: &MigrateOptions, lifted: &OnceLock<u64>) -> Result<Begun, ControlError> {
    let mut src = Qmp::connect(&opts.source_qmp).await.map_err(src_err)?;
    let mut dst = Qmp::connect(&opts.target_qmp).await.map_err(dst_err)?;
    let source_was_running = src.status().await.map_err(src_err)? == RunState::Running;
    let dst_status = dst.status().await.map_err(dst_err)?;
    if dst_status != RunState::InMigrate {
        return Err(ControlError::Refused(format!(
            "the target QEMU is {:?}, not waiting for a migration (start it with -incoming \
             defer)",
            dst_status.as_str()
        )));
    }
    for (which, caps) in [
        ("source", src.enabled_capabilities().await.map_err(src_err)?),
        ("target", dst.enabled_capabilities().await.map_err(dst_err)?),
    ] {
        if let Some(c) = caps.iter().find(|c| UNPROXYABLE.contains(&c.as_str())) {
            return Err(ControlError::Refused(format!(
                "capability {c:?} is on in the {which} QEMU: its streams cannot go through the \
                 agents; turn it off"
            )));
        }
        if !opts.stream.passthrough {
            if let Some(c) = caps.iter().find(|c| NOT_REWRITABLE.contains(&c.as_str())) {
                return Err(ControlError::Refused(format!(
                    "capability {c:?} is on in the {which} QEMU: the agents cannot rewrite \
                     that stream; turn it off or pass --passthrough"
                )));
            }
        }
    }
    // Before either QEMU is told anything.
    opts.stream.check_index().await?;
    // Advice only: an older QEMU without query-memdev migrates all the same.
    let target_ram_preallocated = dst.ram_preallocated().await.ok().flatten();
    if target_ram_preallocated == Some(false) {
        tracing::info!(
            "the target QEMU allocates guest RAM on first write: loading the stream includes \
             zeroing every page it writes, which can bound the migration's time; -mem-prealloc \
             (libvirt: <allocation mode='immediate'/>) does that at its start-up instead"
        );
    }
    // The target agent starts the target QEMU's incoming migration itself, once the link
    // names the VM (or libvirt did, and the operator registered it there).
    let link = connect_link(&opts.target_agent, &opts.link_security).await?;
    // The stream comes in where the operator said, or by default over a socket pair whose
    // other end QEMU is handed: nothing listens, and QEMU's send buffer stays small.
    let inlet = match &opts.source_listen {
        Some(listen) => Inlet::Listener(listen_for_qemu(listen).await?),
        None => {
            let (ours, theirs) = qemu_socket_pair()?;
            Inlet::Pair(ours, theirs)
        }
    };
    let bandwidth = Bandwidth::take_over(&mut src, opts.max_bandwidth)
        .await
        .map_err(src_err)?;
    if let Some(v) = bandwidth.operator() {
        let _ = lifted.set(v);
    }
    let started = Instant::now();
    let connected = inlet.start(&mut src).await;
    let qemu = match connected {
        Ok(qemu) => qemu,
        Err(e) => {
            // Its migration must not connect later, to a listener that is gone by then.
            let _ = cancel_if_active(&mut src).await;
            if let Err(why) = bandwidth.restore(&mut src).await {
                tracing::warn!("cannot restore the source's max-bandwidth: {why}");
            }
            return Err(e);
        }
    };
    Ok(Begun {
        src,
        dst,
        source_was_running,
        target_ram_preallocated,
        bandwidth,
        link,
        qemu,
        started,
    })
}

/// Proxies the source QEMU's stream to the target agent until it is delivered, fails, times
/// out or is cancelled; then settles where the guest runs and reports.
async fn drive(
    opts: MigrateOptions,
    begun: Begun,
    mut cancel: Pin<&mut impl Future<Output = ()>>,
) -> Result<MigrationReport, ControlError> {
    let Begun {
        mut src,
        mut dst,
        source_was_running,
        target_ram_preallocated,
        mut bandwidth,
        link,
        qemu,
        started,
    } = begun;
    let config = opts.stream.config(bandwidth.cap());
    let counters = Arc::new(Counters::default());
    let mut source = Owned(tokio::spawn(run_source(
        qemu,
        link,
        config,
        counters.clone(),
    )));
    // From here on every path reaches the restore below.
    let link_so_far = || {
        counters
            .link_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut switchover = match Switchover::start(&mut src, link_so_far()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot manage the source's switchover bandwidth: {e}");
            None
        }
    };
    // The source QEMU's STOP event lifts the link's cap at once: the stream QEMU wrote before
    // stopping the guest, still queued in the agents, then crosses at full speed (the reader
    // would lift it only on reaching the switchover in the stream, behind that backlog).
    // It also raises this process's CPU priority for the rest of the migration. The event is
    // acted on as it is read, even while a command below waits for its reply.
    let cap = bandwidth.cap();
    let mut watching = cap.pacing().is_some() || opts.pause_nice.is_some();
    let stopped = Arc::new(tokio::sync::Notify::new());
    if watching {
        let (cap, stopped) = (cap.clone(), stopped.clone());
        src.on_event(Box::new(move |e| {
            if e["event"] == "STOP" {
                cap.lift();
                stopped.notify_one();
            }
        }));
    }
    let mut raised = None;
    let outcome = loop {
        tokio::select! {
            r = &mut source.0 => break r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())),
            // Reads events while no command runs (the hook acts on them).
            event = src.next_event(), if watching => if let Err(e) = event {
                tracing::debug!("stopped watching the source QEMU's events: {e}");
                watching = false;
            },
            () = stopped.notified(), if raised.is_none() && opts.pause_nice.is_some() => {
                if let Some(nice) = opts.pause_nice {
                    match crate::priority::raise(nice) {
                        Ok(r) => raised = Some(r),
                        Err(e) => tracing::warn!("cannot raise the agent's priority to nice {nice} for the pause: {e}"),
                    }
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if let Some(p) = &opts.progress {
                    p.send_replace(counters.snapshot());
                }
                if let Some(s) = switchover.as_mut() {
                    if let Err(e) = s.update(&mut src, link_so_far()).await {
                        tracing::warn!("cannot update the source's switchover bandwidth: {e}");
                    }
                }
                if let Err(e) = bandwidth.follow(&mut src).await {
                    tracing::warn!("cannot follow the source's max-bandwidth: {e}");
                }
                if started.elapsed() > opts.timeout {
                    break Err(format!("no completion within {:?}", opts.timeout));
                }
            }
            () = &mut cancel => break Err("cancelled by the operator".to_string()),
        }
    };
    drop(raised);
    if !source.0.is_finished() {
        // Dropping its task closes the source QEMU's connection and the link.
        source.0.abort();
        let _ = (&mut source.0).await;
    }
    let mut report = MigrationReport {
        target_ram_preallocated,
        link_bandwidth: bandwidth.cap().get(),
        ..MigrationReport::default()
    };
    if let Err(e) = bandwidth.restore(&mut src).await {
        tracing::warn!("cannot restore the source's max-bandwidth: {e}");
    }
    if let Some(s) = switchover {
        report.switchover_bandwidth = Some(s.current());
        if let Err(e) = s.restore(&mut src).await {
            tracing::warn!("cannot restore the source's switchover bandwidth: {e}");
        }
    }
    let run = match outcome {
        Ok(run) => Some(run),
        Err(e) => {
            report.error = Some(e);
            None
        }
    };
    let settled = settle(&mut src, &mut dst, &opts.target_qmp, source_was_running).await?;
    // QEMU reports no total time for a failed migration: then it is this side's clock.
    report.total_time_ms = settled.info["total-time"]
        .as_u64()
        .unwrap_or(started.elapsed().as_millis() as u64);
    report.downtime_ms = settled.info["downtime"].as_u64().unwrap_or(0);
    report.target_status = settled.target_status.to_string();
    report.ok = settled.outcome == Outcome::Target;
    match (&settled.outcome, report.error.take()) {
        (Outcome::Target, None) => {}
        // The source QEMU wrote its whole stream and the target QEMU loaded it: the guest moved.
        (Outcome::Target, Some(e)) => {
            report.warning = Some(format!(
                "{e}, after the source QEMU had written its whole stream; the target QEMU loaded \
                 it and runs the guest"
            ));
        }
        (Outcome::Undecided, e) => {
            report.error = Some(format!(
                "{}the source QEMU completed, but the target QEMU is {}: the source guest stays \
                 paused, since the target may still start it; resume the source (QMP cont) \
                 only once the target QEMU is stopped",
                e.map(|e| format!("{e}; ")).unwrap_or_default(),
                report.target_status
            ));
        }
        (Outcome::Source, e) => {
            report.error = Some(e.unwrap_or_else(|| {
                format!(
                    "source migration {}, target {}",
                    settled.info["status"], report.target_status
                )
            }));
        }
    }
    let (src_events, dst_events) = (src.events(), dst.events());
    if report.ok {
        report.guest_paused_ms =
            guest_pause(&src_events, &dst_events).map(|d| d.as_millis() as u64);
    }
    match run {
        Some(r) => {
            if report.ok {
                report.pause = PauseStages::between(
                    last_event_time(&src_events, "STOP"),
                    &r.source.moments,
                    &r.target.moments,
                    last_event_time(&dst_events, "RESUME"),
                );
            }
            report.figures = r.figures();
            report.savings_pct = r.source.savings_pct();
            report.passthrough_reason = r.passthrough_reason;
        }
        None => {
            report.figures = counters.snapshot();
            report.savings_pct = report.figures.savings_pct();
        }
    }
    report.source_status = src.status().await.map_err(src_err)?.to_string();
    report.export_metrics();
    Ok(report)
}

/// After a cancel before the stream began: ends a source migration still trying to connect.
/// Cancels the source QEMU's migration, and puts back its `max-bandwidth` if it was lifted.
async fn cancel_source(path: &std::path::Path, lifted: Option<u64>) -> Result<(), QmpError> {
    let mut src = Qmp::connect(path).await?;
    cancel_if_active(&mut src).await?;
    if let Some(v) = lifted {
        bandwidth::put_back(&mut src, v).await?;
    }
    Ok(())
}

/// A listening address as a QEMU migration URI.
pub fn qemu_uri(listen: &Endpoint) -> String {
    match listen {
        Endpoint::Tcp(addr) => format!("tcp:{addr}"),
        Endpoint::Unix(path) => format!("unix:{}", path.display()),
    }
}
