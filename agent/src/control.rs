//! Orchestration: `agent migrate` (drive both QEMUs over QMP through the agents) and
//! `agent serve` (the target-side daemon that accepts agent links).
//!
//! ```text
//! agent migrate (source host)                         agent serve (target host)
//!   checks both QEMUs' capabilities and the index service (version, the VM's exports)
//!   QMP target: migrate-incoming tcp:127.0.0.1:Q        accepts the link, reads HELLO,
//!   link -> target agent ---------------------------->  connects to QEMU at Q, rebuilds
//!   listens on 127.0.0.1:P; QMP source: migrate P       the stream, reports DONE
//!   proxies QEMU's stream, shows progress, waits for completion, prints the report
//! ```
//! Failure is always clean: if anything breaks before the target confirms delivery (or the
//! operator cancels), the source QEMU's connection is dropped, so its migration fails and the
//! guest keeps running; [`crate::settle`] then decides which QEMU runs the guest, and never
//! resumes a source whose whole stream the target may have loaded.
use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use nas_client::index::{IndexClient, IndexClientError};
use nas_proto::{net::Bound, Endpoint};
use serde::Serialize;
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    bandwidth::Bandwidth,
    migration::{
        compress::Compression,
        incoming,
        link::LinkFrame,
        report::{Counters, Figures},
        source::{run_source, SourceConfig, QEMU_RECV_BUFFER},
        target::{read_hello, run_target, TargetConfig},
        wire::FrameReader,
    },
    qmp::{guest_pause, Qmp, QmpError},
    settle::{cancel_if_active, settle, Outcome},
    switchover::Switchover,
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

/// Errors of `agent migrate`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{which} QEMU: {source}")]
    Qmp {
        which: &'static str,
        source: QmpError,
    },
    #[error("{0}")]
    Refused(String),
    #[error("cancelled before the source QEMU's stream began; the source QEMU runs on")]
    Cancelled,
    #[error("index service at {addr}: {source}")]
    Index {
        addr: String,
        source: IndexClientError,
    },
    #[error("cannot reach the target agent at {addr}: {source}")]
    Link {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn src_err(source: QmpError) -> ControlError {
    ControlError::Qmp {
        which: "source",
        source,
    }
}

pub(crate) fn dst_err(source: QmpError) -> ControlError {
    ControlError::Qmp {
        which: "target",
        source,
    }
}

/// What `agent migrate` needs.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub source_qmp: PathBuf,
    pub target_qmp: PathBuf,
    pub target_agent: String,
    pub vm: String,
    pub exports: Vec<String>,
    pub nas_nbd: String,
    pub nas_index: Option<Endpoint>,
    /// Where the target QEMU listens (`tcp:HOST:PORT`); default a free loopback port.
    pub incoming: Option<String>,
    /// Where this agent takes the source QEMU's stream (`HOST:PORT` or `unix:PATH`); default
    /// a free loopback TCP port.
    pub source_listen: Option<Endpoint>,
    pub zstd: Compression,
    pub passthrough: bool,
    /// The cap on the agent link for this migration, bytes per second (0: none); `None`
    /// takes the source QEMU's `max-bandwidth` (see [`crate::bandwidth`]).
    pub max_bandwidth: Option<u64>,
    pub record: Option<PathBuf>,
    pub progress: bool,
    pub timeout: Duration,
}

/// The per-migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// The target QEMU runs the guest after the source QEMU completed.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// What went wrong although the guest moved (the agents failed after the target QEMU had
    /// the whole stream: the target's own figures are then missing from the report).
    pub warning: Option<String>,
    /// The source's figures, with what only the target knows: NAS bytes, fallbacks, fetch time.
    #[serde(flatten)]
    pub figures: Figures,
    pub savings_pct: f64,
    /// QEMU's `total-time`; for a migration that failed, from `migrate` until it ended.
    pub total_time_ms: u64,
    /// QEMU's own figure: from stopping the guest until the source QEMU had written the rest of
    /// its stream.
    pub downtime_ms: u64,
    /// What the guest noticed: from the source QEMU stopping it to the target QEMU resuming it
    /// (QMP STOP and RESUME events, two hosts' clocks; see [`crate::qmp::guest_pause`]).
    pub guest_paused_ms: Option<u64>,
    pub passthrough_reason: Option<String>,
    pub source_status: String,
    pub target_status: String,
    /// Whether the target QEMU had all its guest RAM allocated before the stream came
    /// (`-mem-prealloc`); otherwise it zeroes a fresh page at the first write to each one while
    /// loading, which can bound the migration's time. `None`: QEMU did not say.
    pub target_ram_preallocated: Option<bool>,
    /// The agent link's rate (bytes/s) last given to the source QEMU for its switchover
    /// decision (`avail-switchover-bandwidth`); `None` when QEMU judged by its own measurement.
    pub switchover_bandwidth: Option<u64>,
    /// The cap (bytes/s) the agent link was paced to while the guest ran: `--max-bandwidth`,
    /// or the source QEMU's `max-bandwidth`, lifted from QEMU's stream meanwhile; `None`: none.
    pub link_bandwidth: Option<u64>,
}

impl MigrationReport {
    /// A human summary.
    pub fn text(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut s = format!(
            "migration {}\n  QEMU bytes   {:>10.1} MiB\n  link bytes   {:>10.1} MiB  \
             (saved {:.1}%)\n  NAS fetched  {:>10.1} MiB\n  pages        full {} zero {} \
             mapped {} dup {} sent {} fallback {}\n  zstd         {:.1} MiB of frames sent as \
             {:.1} MiB\n  total time   {} ms, downtime {} ms, \
             guest paused {}\n  while paused {:.1} MiB of QEMU's stream, {:.1} MiB on the link\n  \
             hashing {:.0} ms, lookups in flight {:.0} ms, NAS fetches under way {:.0} ms\n  \
             source {}, target {}\n  \
             target RAM   {}\n  link cap     {}\n  switchover   judged at {}",
            if self.ok { "completed" } else { "FAILED" },
            mib(self.figures.qemu_bytes),
            mib(self.figures.link_bytes),
            self.savings_pct,
            mib(self.figures.nas_bytes),
            self.figures.pages_full,
            self.figures.pages_zero,
            self.figures.pages_mapped,
            self.figures.pages_dup,
            self.figures.pages_sent,
            self.figures.fallbacks,
            mib(self.figures.zstd_in_bytes),
            mib(self.figures.zstd_out_bytes),
            self.total_time_ms,
            self.downtime_ms,
            self.guest_paused_ms
                .map_or("unknown".to_string(), |ms| format!("{ms} ms")),
            mib(self.figures.paused_qemu_bytes),
            mib(self.figures.paused_link_bytes),
            self.figures.hash_ms,
            self.figures.lookup_ms,
            self.figures.fetch_ms,
            self.source_status,
            self.target_status,
            match self.target_ram_preallocated {
                Some(true) => "preallocated",
                Some(false) => "allocated on first write",
                None => "unknown",
            },
            match self.link_bandwidth {
                Some(b) if b < crate::bandwidth::LIFTED => {
                    format!("{:.1} MB/s until the switchover", b as f64 / 1e6)
                }
                _ => "none".to_string(),
            },
            match self.switchover_bandwidth {
                Some(b) => format!("{:.1} MB/s (the agent link's rate)", b as f64 / 1e6),
                None => "QEMU's own stream rate".to_string(),
            },
        );
        if let Some(e) = &self.error {
            s.push_str(&format!("\n  error: {e}"));
        }
        if let Some(w) = &self.warning {
            s.push_str(&format!("\n  warning: {w}"));
        }
        s
    }

    /// Adds this migration to the Prometheus counters.
    pub fn export_metrics(&self) {
        let result = if self.ok { "ok" } else { "failed" };
        metrics::counter!("agent_migrations_total", "result" => result).increment(1);
        metrics::counter!("agent_migration_qemu_bytes_total").increment(self.figures.qemu_bytes);
        metrics::counter!("agent_migration_link_bytes_total").increment(self.figures.link_bytes);
        metrics::counter!("agent_migration_nas_bytes_total").increment(self.figures.nas_bytes);
        metrics::counter!("agent_migration_zstd_in_bytes_total")
            .increment(self.figures.zstd_in_bytes);
        metrics::counter!("agent_migration_zstd_out_bytes_total")
            .increment(self.figures.zstd_out_bytes);
        metrics::counter!("agent_migration_paused_qemu_bytes_total")
            .increment(self.figures.paused_qemu_bytes);
        metrics::counter!("agent_migration_paused_link_bytes_total")
            .increment(self.figures.paused_link_bytes);
        for (kind, n) in [
            ("full", self.figures.pages_full),
            ("zero", self.figures.pages_zero),
            ("mapped", self.figures.pages_mapped),
            ("dup", self.figures.pages_dup),
            ("sent", self.figures.pages_sent),
            ("fallback", self.figures.fallbacks),
        ] {
            metrics::counter!("agent_migration_pages_total", "kind" => kind).increment(n);
        }
        let ms = |v: u64| v as f64 / 1e3;
        metrics::histogram!("agent_migration_seconds").record(ms(self.total_time_ms));
        metrics::histogram!("agent_migration_downtime_seconds").record(ms(self.downtime_ms));
        if let Some(p) = self.guest_paused_ms {
            metrics::histogram!("agent_migration_guest_paused_seconds").record(ms(p));
        }
    }
}

/// Runs one migration from the source QEMU to the target QEMU through the agents.
///
/// `cancel` resolving (the operator's Ctrl-C) stops it: before the source QEMU's stream began,
/// with an error and nothing started; after, like any failure, with a report, the source's
/// migration cancelled and the guest wherever [`settle`] finds it safe.
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

/// Everything up to the source QEMU's stream arriving.
struct Begun {
    src: Qmp,
    dst: Qmp,
    source_was_running: bool,
    target_ram_preallocated: Option<bool>,
    bandwidth: Bandwidth,
    incoming: String,
    link: TcpStream,
    qemu: Box<dyn nas_proto::net::Stream>,
    started: Instant,
}

/// Checks both QEMUs and the index service, sets up the target, opens the link and starts the
/// source QEMU's migration into this agent. `lifted` gets the source's `max-bandwidth` once it
/// is lifted (see [`crate::bandwidth`]), for a cancel to put back.
async fn begin(opts: &MigrateOptions, lifted: &OnceLock<u64>) -> Result<Begun, ControlError> {
    let mut src = Qmp::connect(&opts.source_qmp).await.map_err(src_err)?;
    let mut dst = Qmp::connect(&opts.target_qmp).await.map_err(dst_err)?;
    let source_was_running = src.status().await.map_err(src_err)? == "running";
    let dst_status = dst.status().await.map_err(dst_err)?;
    if dst_status != "inmigrate" {
        return Err(ControlError::Refused(format!(
            "the target QEMU is {dst_status:?}, not waiting for a migration (start it with \
             -incoming defer)"
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
        if !opts.passthrough {
            if let Some(c) = caps.iter().find(|c| NOT_REWRITABLE.contains(&c.as_str())) {
                return Err(ControlError::Refused(format!(
                    "capability {c:?} is on in the {which} QEMU: the agents cannot rewrite \
                     that stream; turn it off or pass --passthrough"
                )));
            }
        }
    }
    // Before either QEMU is told anything: an index service of another protocol version, or
    // one that does not serve the VM's exports, refuses here, not mid-stream.
    if let (Some(addr), false) = (&opts.nas_index, opts.passthrough) {
        IndexClient::connect(addr, &opts.exports)
            .await
            .map_err(|source| ControlError::Index {
                addr: addr.to_string(),
                source,
            })?;
    }
    // Advice only: an older QEMU without query-memdev migrates all the same.
    let target_ram_preallocated = dst.ram_preallocated().await.ok().flatten();
    if target_ram_preallocated == Some(false) {
        tracing::info!(
            "the target QEMU allocates guest RAM on first write: loading the stream includes \
             zeroing every page it writes, which can bound the migration's time; -mem-prealloc \
             (libvirt: <allocation mode='immediate'/>) does that at its start-up instead"
        );
    }
    let incoming = match &opts.incoming {
        Some(i) => i.clone(),
        None => format!("tcp:127.0.0.1:{}", free_port().await?),
    };
    dst.execute("migrate-incoming", Some(json!({ "uri": incoming })))
        .await
        .map_err(dst_err)?;
    let link = TcpStream::connect(&opts.target_agent)
        .await
        .map_err(|source| ControlError::Link {
            addr: opts.target_agent.clone(),
            source,
        })?;
    link.set_nodelay(true)?;
    let listener = Bound::bind(
        opts.source_listen
            .as_ref()
            .unwrap_or(&Endpoint::Tcp(([127, 0, 0, 1], 0).into())),
    )
    .await?;
    listener.set_recv_buffer(QEMU_RECV_BUFFER)?;
    let uri = qemu_uri(&listener.local_addr());
    let bandwidth = Bandwidth::take_over(&mut src, opts.max_bandwidth)
        .await
        .map_err(src_err)?;
    if let Some(v) = bandwidth.operator() {
        let _ = lifted.set(v);
    }
    let started = Instant::now();
    let connected = match src.execute("migrate", Some(json!({ "uri": uri }))).await {
        Ok(_) => tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .map_err(|_| ControlError::Refused("the source QEMU never connected".into()))
            .and_then(|accepted| Ok(accepted?.0)),
        Err(e) => Err(src_err(e)),
    };
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
        incoming,
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
        incoming,
        link,
        qemu,
        started,
    } = begun;
    let mut config = SourceConfig::new(
        &opts.vm,
        opts.exports.clone(),
        &opts.nas_nbd,
        opts.nas_index.clone(),
    );
    config.incoming = incoming;
    config.zstd = opts.zstd;
    config.rewrite = !opts.passthrough;
    config.record = opts.record.clone();
    config.link_cap = bandwidth.cap();
    let counters = Arc::new(Counters::default());
    let mut source = tokio::spawn(run_source(qemu, link, config, counters.clone()));
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
    let bar = progress_bar(opts.progress);
    let outcome = loop {
        tokio::select! {
            r = &mut source => break r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                update_bar(&bar, &counters);
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
    if !source.is_finished() {
        // Dropping its task closes the source QEMU's connection and the link.
        source.abort();
        let _ = (&mut source).await;
    }
    bar.finish_and_clear();
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
    report.target_status = settled.target_status;
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
    if report.ok {
        report.guest_paused_ms =
            guest_pause(&src.events(), &dst.events()).map(|d| d.as_millis() as u64);
    }
    match run {
        Some(r) => {
            report.figures = r.figures();
            report.savings_pct = r.source.savings_pct();
            report.passthrough_reason = r.passthrough_reason;
        }
        None => {
            report.figures = counters.snapshot();
            report.savings_pct = report.figures.savings_pct();
        }
    }
    report.source_status = src.status().await.map_err(src_err)?;
    report.export_metrics();
    Ok(report)
}

/// After a cancel before the stream began: ends a source migration still trying to connect.
/// Cancels the source QEMU's migration, and puts back its `max-bandwidth` if it was lifted.
async fn cancel_source(path: &std::path::Path, lifted: Option<u64>) -> Result<(), QmpError> {
    let mut src = Qmp::connect(path).await?;
    cancel_if_active(&mut src).await?;
    if let Some(v) = lifted {
        crate::bandwidth::put_back(&mut src, v).await?;
    }
    Ok(())
}

async fn free_port() -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

fn progress_bar(enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    bar
}

fn update_bar(bar: &indicatif::ProgressBar, counters: &Counters) {
    let f = counters.snapshot();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
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

/// `agent serve`: accepts agent links until `shutdown`, one target-side migration each, at
/// most `config.max_sessions` at once (a link beyond that is answered with ERROR and closed).
/// Each session's outcome and figures go to the log and to the Prometheus counters
/// `agent_serve_*`.
pub async fn serve(
    listener: TcpListener,
    config: TargetConfig,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let sessions = Arc::new(tokio::sync::Semaphore::new(config.max_sessions.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (link, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a?,
        };
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            let message = format!(
                "busy: {} migration(s) under way, this agent's limit (--max-sessions); try \
                 again later",
                config.max_sessions
            );
            tracing::warn!(%peer, "{message}");
            // Best effort, without waiting on a peer that does not read.
            let _ = link.try_write(&LinkFrame::Error { message }.to_bytes());
            metrics::counter!("agent_serve_migrations_total", "result" => "refused").increment(1);
            continue;
        };
        link.set_nodelay(true)?;
        let config = config.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let counters = Arc::new(Counters::default());
            let result = match serve_one(link, config, counters.clone()).await {
                Session::Delivered(f) => {
                    tracing::info!(%peer, "migration delivered: {}", serde_json::json!(f));
                    "ok"
                }
                Session::Refused(why) => {
                    tracing::warn!(%peer, "migration refused: {why}");
                    "refused"
                }
                Session::Failed(why) => {
                    tracing::warn!(%peer, "migration failed: {why}");
                    "failed"
                }
            };
            export_served(result, &counters.snapshot());
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
    Ok(())
}

/// How one `agent serve` session ended.
enum Session {
    /// With the target's figures, as sent in its DONE.
    Delivered(Figures),
    /// Before anything was connected: a HELLO it cannot serve, or an incoming address its
    /// policy refuses or it cannot reach.
    Refused(String),
    Failed(String),
}

async fn serve_one(mut link: TcpStream, config: TargetConfig, counters: Arc<Counters>) -> Session {
    let mut frames = FrameReader::new();
    let hello = match read_hello(&mut link, &mut frames).await {
        Ok(h) => h,
        Err(e) => return Session::Refused(refuse(&mut link, e.to_string()).await),
    };
    tracing::info!(vm = %hello.vm, incoming = %hello.incoming, "incoming migration");
    let qemu = match config.incoming.check(&hello.incoming) {
        Ok(incoming) => incoming::connect(&incoming).await,
        Err(refused) => Err(refused),
    };
    let qemu = match qemu {
        Ok(q) => q,
        Err(e) => return Session::Refused(refuse(&mut link, e.to_string()).await),
    };
    match run_target(link, frames, hello, qemu, config, counters).await {
        Ok(figures) => Session::Delivered(figures),
        Err(e) => Session::Failed(e.to_string()),
    }
}

/// Answers a session this agent will not serve with the link's ERROR frame (best effort: the
/// source may be gone); returns the reason.
async fn refuse(link: &mut TcpStream, message: String) -> String {
    use tokio::io::AsyncWriteExt;
    let frame = LinkFrame::Error {
        message: message.clone(),
    };
    let _ = link.write_all(&frame.to_bytes()).await;
    message
}

/// Adds one served session to the target side's Prometheus counters: what it delivered even
/// when it failed half-way.
fn export_served(result: &'static str, f: &Figures) {
    metrics::counter!("agent_serve_migrations_total", "result" => result).increment(1);
    metrics::counter!("agent_serve_qemu_bytes_total").increment(f.qemu_bytes);
    metrics::counter!("agent_serve_nas_bytes_total").increment(f.nas_bytes);
    metrics::counter!("agent_serve_fallback_pages_total").increment(f.fallbacks);
}

/// A listening address as a QEMU migration URI.
pub fn qemu_uri(listen: &Endpoint) -> String {
    match listen {
        Endpoint::Tcp(addr) => format!("tcp:{addr}"),
        Endpoint::Unix(path) => format!("unix:{}", path.display()),
    }
}
