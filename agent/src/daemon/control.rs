//! The control protocol of the host daemon: one JSON request per connection on a root-only
//! unix socket, one JSON reply. Clients: `agent follow`, `agent status`, `agent migrate`.
//!
//! ```text
//! client --{"op":"follow","qmp":"/run/vm1.qmp"}-----------------> daemon
//!        <-{"ok":true,"vm":{"pid":..,"disks":[..]}}---------------
//! client --{"op":"migrate","request":{..}}------------------------> daemon (runs it, with the
//!        <-{"ok":true,"report":{..}}-----------------------------    VM's map when it has one)
//! client --{"op":"plan","qmp":null,"ask":{..}}-----------------> daemon (every followed VM,
//!        <-{"ok":true,"plans":[{"qmp":..,"plan":{..}},..]}-------    cheapest to move first)
//! client --{"op":"expect","vm":"vm1","incoming":"tcp:..",..}-----> daemon (the target side
//!        <-{"ok":true}-------------------------------------------    delivers vm1 there, once)
//! ```
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nas-agent/control.sock";
/// Largest request or reply line.
pub const MAX_LINE: usize = 1 << 20;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Follow the QEMU behind this QMP socket and keep its memory-to-disk map.
    Follow { qmp: PathBuf },
    /// Stop following it.
    Unfollow { qmp: PathBuf },
    /// Every followed VM, its map and the follower's drops.
    Status,
    /// Plans for the VM behind `qmp`, or for every followed VM (cheapest to move first).
    Plan {
        qmp: Option<PathBuf>,
        ask: crate::plan::Ask,
    },
    /// Run a migration from this host, with the VM's map when the daemon keeps one.
    Migrate { request: Box<MigrateRequest> },
    /// Expect one incoming migration of `vm` within `ttl_secs`, delivered to `incoming`
    /// (where the target QEMU listens, libvirt having issued `migrate-incoming`).
    Expect {
        vm: String,
        incoming: String,
        ttl_secs: u64,
    },
}

/// What `agent migrate` asks the daemon to run (its command-line options).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub source_qmp: PathBuf,
    pub target_qmp: PathBuf,
    pub target_agent: String,
    pub vm: String,
    pub exports: Vec<String>,
    pub nas_nbd: String,
    /// `None`: map-only (no index service).
    pub nas_index: Option<String>,
    /// TLS towards the index service (`--nas-tls-creds`).
    pub nas_tls_creds: Option<PathBuf>,
    pub qemu_listen: Option<String>,
    /// `auto`, `always` or `never`.
    pub zstd: String,
    pub passthrough: bool,
    /// `--dedup-paused` (absent from older clients: false).
    #[serde(default)]
    pub dedup_paused: bool,
    pub max_bandwidth: Option<u64>,
    pub record: Option<PathBuf>,
    pub timeout_secs: u64,
    /// The agent link's credentials (`--tls-creds`), or `insecure` (the explicit opt-out).
    pub tls_creds: Option<PathBuf>,
    pub insecure: bool,
    /// The nice value for the pause (`agent migrate --pause-nice`); absent from older clients.
    #[serde(default)]
    pub pause_nice: Option<i32>,
    /// The prediction `agent migrate` made before asking (added to the report).
    #[serde(default)]
    pub predicted: Option<crate::plan::model::Forecast>,
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the agent daemon at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("agent daemon connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent daemon sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("agent daemon sent malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("agent daemon: {0}")]
    Refused(String),
}

/// Sends one request and returns the reply's fields (an `"ok": false` reply is an error).
pub async fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    call_cancellable(socket, request, std::future::pending()).await
}

/// Like [`call`]; when `cancel` resolves first, the request is cancelled (the connection's
/// write side closes, which a running migration takes as the operator's cancel) and the reply
/// still awaited.
pub async fn call_cancellable(
    socket: &Path,
    request: &Request,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<serde_json::Value, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut rd = BufReader::new(rd);
    let reply = tokio::select! {
        r = read_line(&mut rd) => r?,
        () = cancel => {
            wr.shutdown().await?;
            read_line(&mut rd).await?
        }
    };
    let reply: serde_json::Value = serde_json::from_str(&reply)?;
    if reply["ok"] == true {
        Ok(reply)
    } else {
        Err(ControlError::Refused(
            reply["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string(),
        ))
    }
}

/// One line of at most [`MAX_LINE`] bytes.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<String, ControlError> {
    let mut line = String::new();
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_line(&mut line)
        .await?;
    if n > MAX_LINE {
        return Err(ControlError::TooLong);
    }
    Ok(line)
}
