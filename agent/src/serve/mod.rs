//! `agent serve`, the target host's daemon: the accept loop, one target-side session per
//! agent link, and the refusals.
//!
//! ```text
//! link accepted -> TLS handshake, the source's certificate verified (unless --insecure;
//!   failed: dropped, counted) -> session slot? (no: ERROR "busy") -> HELLO {vm} (none:
//!   counted as a dropped link) -> the VM's target QEMU on this host (no such VM, or not
//!   waiting: ERROR) -> run_target -> DONE -> counters
//! ```
//! Each session's outcome and figures go to the log and to the Prometheus counters
//! `agent_serve_*`. How a VM's name becomes the channel into its QEMU is
//! [`crate::migration::incoming`]'s: the source names a VM, never an address.
use std::{sync::Arc, time::Duration};

use nas_proto::net::Stream;
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::watch};

use crate::migration::{
    link::LinkFrame,
    report::{Counters, Figures},
    target::{read_hello, run_target, TargetConfig},
    wire::FrameReader,
};

/// Connections in their TLS handshake at once; one more is closed at once.
const MAX_HANDSHAKES: usize = 64;

/// `agent serve`: accepts agent links until `shutdown`, one target-side migration each, at
/// most `config.max_sessions` at once (a link beyond that is answered with ERROR and closed).
/// Each link first passes the link's security (see [`crate::migration::secure`]); each
/// session's outcome and figures go to the log and to the Prometheus counters
/// `agent_serve_*`.
pub async fn serve(
    listener: TcpListener,
    config: TargetConfig,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let sessions = Arc::new(tokio::sync::Semaphore::new(config.max_sessions.max(1)));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a?,
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{MAX_HANDSHAKES} links in their handshake already: closed");
            connection("handshake_limit");
            continue;
        };
        tcp.set_nodelay(true)?;
        let (config, sessions) = (config.clone(), sessions.clone());
        tasks.spawn(async move {
            let (mut link, identity) = match config.link_security.accept(tcp).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%peer, "link refused: {e}");
                    connection("tls_refused");
                    return;
                }
            };
            drop(handshake);
            let source = identity.map_or_else(|| "-".to_string(), |i| i.to_string());
            let Ok(_permit) = sessions.try_acquire_owned() else {
                let message = format!(
                    "busy: {} migration(s) under way, this agent's limit (--max-sessions); try \
                     again later",
                    config.max_sessions
                );
                tracing::warn!(%peer, %source, "{message}");
                // Best effort, without waiting long on a peer that does not read.
                let frame = LinkFrame::Error { message }.to_bytes();
                let _ = tokio::time::timeout(Duration::from_secs(1), link.write_all(&frame)).await;
                metrics::counter!("agent_serve_migrations_total", "result" => "refused")
                    .increment(1);
                return;
            };
            let counters = Arc::new(Counters::default());
            let result = match serve_one(link, config, counters.clone()).await {
                Session::Delivered(f) => {
                    tracing::info!(%peer, %source, "migration delivered: {}", serde_json::json!(f));
                    "ok"
                }
                Session::NoHello(why) => {
                    // A health check or a port scan: worth a line, not a warning.
                    tracing::info!(%peer, %source, "link closed before its HELLO: {why}");
                    connection("no_hello");
                    return;
                }
                Session::Refused(why) => {
                    tracing::warn!(%peer, %source, "migration refused: {why}");
                    "refused"
                }
                Session::Failed(why) => {
                    tracing::warn!(%peer, %source, "migration failed: {why}");
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

/// Counts a link that ended before it became a session.
fn connection(result: &'static str) {
    metrics::counter!("agent_serve_links_dropped_total", "reason" => result).increment(1);
}

/// How one `agent serve` session ended.
enum Session {
    /// With the target's figures, as sent in its DONE.
    Delivered(Figures),
    /// The link closed, or sent nothing, before a HELLO (a port scan, a health check).
    NoHello(String),
    /// Before anything was connected: a HELLO it cannot serve, or a VM it cannot deliver to.
    Refused(String),
    Failed(String),
}

async fn serve_one(
    mut link: Box<dyn Stream>,
    config: TargetConfig,
    counters: Arc<Counters>,
) -> Session {
    let mut frames = FrameReader::new();
    let hello = match read_hello(&mut link, &mut frames).await {
        Ok(h) => h,
        Err(e) if e.is_silence() => return Session::NoHello(e.to_string()),
        Err(e) => return Session::Refused(refuse(&mut link, e.to_string()).await),
    };
    tracing::info!(vm = %hello.vm, "incoming migration");
    let qemu = match config.delivery.open(&hello.vm).await {
        Ok(q) => q,
        Err(e) => return Session::Refused(refuse(&mut link, e.to_string()).await),
    };
    let _raised = config.session_nice.and_then(|nice| {
        crate::priority::raise(nice)
            .map_err(|e| tracing::warn!("cannot raise the agent's priority to nice {nice}: {e}"))
            .ok()
    });
    match run_target(link, frames, hello, qemu, config, counters).await {
        Ok(figures) => Session::Delivered(figures),
        Err(e) => Session::Failed(e.to_string()),
    }
}

/// Answers a session this agent will not serve with the link's ERROR frame (best effort: the
/// source may be gone); returns the reason.
async fn refuse(link: &mut Box<dyn Stream>, message: String) -> String {
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
