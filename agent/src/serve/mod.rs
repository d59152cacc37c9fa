//! `agent serve`, the target host's daemon: the accept loop, one target-side session per
//! agent link, and the refusals.
//!
//! ```text
//! link accepted -> session slot? (no: ERROR "busy") -> HELLO -> incoming policy allows the
//!   QEMU address? (no: ERROR) -> connect to the target QEMU -> run_target -> DONE -> counters
//! ```
//! Each session's outcome and figures go to the log and to the Prometheus counters
//! `agent_serve_*`. Which target QEMU addresses a source may name is decided by
//! [`crate::migration::incoming`].
use std::sync::Arc;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::migration::{
    incoming,
    link::LinkFrame,
    report::{Counters, Figures},
    target::{read_hello, run_target, TargetConfig},
    wire::FrameReader,
};

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
