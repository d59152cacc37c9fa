//! The source side's set-up, one piece of code for `agent migrate` and `agent source`: the
//! stream's settings, the index check made before any QEMU is touched, where QEMU's stream
//! comes in (a listener, or a socket pair handed to QEMU), and the link to the target agent.
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use nas_client::{index::IndexClient, tls::SharedTls};
use nas_proto::{
    net::{Bound, Stream},
    Endpoint,
};
use serde_json::json;
use tokio::net::TcpStream;

use super::{
    error::{src_err, ControlError},
    qemu_uri,
};
use crate::migration::{
    compress::Compression,
    pace::Cap,
    pagemap::SharedMap,
    secure::LinkSecurity,
    source::{SourceConfig, QEMU_RECV_BUFFER},
};
use crate::qmp::Qmp;

/// What the source side must know of a VM's stream.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub vm: String,
    /// The VM's exports; lookups never leave them.
    pub exports: Vec<String>,
    /// The storage's NBD address, as the target agent reaches it.
    pub nas_nbd: String,
    /// The index service; `None` sends every page in full.
    pub nas_index: Option<Endpoint>,
    /// TLS towards the storage (the index service), when it requires it.
    pub nas_tls: SharedTls,
    pub zstd: Compression,
    /// Forward QEMU's bytes verbatim, no rewriting.
    pub passthrough: bool,
    /// Deduplicate the final iteration even when the link keeps up (see
    /// [`SourceConfig::whole_when_paused`]).
    pub dedup_paused: bool,
    /// Also write QEMU's exact stream to this file.
    pub record: Option<PathBuf>,
    /// The VM's memory-to-disk map, when the host daemon runs the migration.
    pub page_map: Option<SharedMap>,
}

impl StreamSpec {
    /// Before QEMU is pointed at the agents: an index service of another protocol version, or
    /// one that does not serve the VM's exports, refuses now rather than mid-stream.
    pub async fn check_index(&self) -> Result<(), ControlError> {
        match (&self.nas_index, self.passthrough) {
            (Some(addr), false) => {
                IndexClient::connect_with(addr, &self.exports, self.nas_tls.as_deref())
                    .await
                    .map(drop)
                    .map_err(|source| ControlError::Index {
                        addr: addr.to_string(),
                        source,
                    })
            }
            _ => Ok(()),
        }
    }

    /// The source pipeline's settings, paced to `cap`.
    pub fn config(&self, cap: Arc<Cap>) -> SourceConfig {
        let mut config = SourceConfig::new(
            &self.vm,
            self.exports.clone(),
            &self.nas_nbd,
            self.nas_index.clone(),
        );
        config.zstd = self.zstd;
        config.nas_tls = self.nas_tls.clone();
        config.rewrite = !self.passthrough;
        config.whole_when_paused = !self.dedup_paused;
        config.record = self.record.clone();
        config.link_cap = cap;
        config.page_map = self.page_map.clone();
        config
    }
}

/// Binds where the source QEMU sends its stream, with the receive buffer capped (see
/// [`QEMU_RECV_BUFFER`]).
pub async fn listen_for_qemu(listen: &Endpoint) -> Result<Bound, ControlError> {
    let listener = Bound::bind(listen)
        .await
        .map_err(|source| ControlError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    listener.set_recv_buffer(QEMU_RECV_BUFFER)?;
    Ok(listener)
}

/// What the source QEMU's end of a [`qemu_socket_pair`] may hold of its stream (SO_SNDBUF,
/// which Linux doubles for its own bookkeeping). Whatever QEMU has written and this agent has
/// not read when QEMU stops the guest is read inside the guest's pause, ahead of the final
/// iteration. Over loopback TCP, QEMU's send buffer grows by autotuning to several MiB (2.5-3.2
/// MB measured at the stop, 4-15 ms of the pause); a unix socket holds what its sender's buffer
/// allows, so it is set here.
pub const QEMU_SEND_BUFFER: usize = 128 << 10;

/// A connected socket pair for the source QEMU's stream: this agent's end, and QEMU's end (to
/// hand over with `getfd`, for `migrate fd:NAME`), its send buffer capped at
/// [`QEMU_SEND_BUFFER`]. Nothing listens: no other process can connect in QEMU's place.
pub fn qemu_socket_pair() -> std::io::Result<(Box<dyn Stream>, OwnedFd)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let value = QEMU_SEND_BUFFER as libc::c_int;
    // SAFETY: setsockopt reads one c_int through a valid pointer, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            theirs.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    Ok((Box::new(ours), theirs.into()))
}

/// Opens the agent link to the target agent, through its TLS handshake unless the operator
/// opted out.
pub async fn connect_link(
    target_agent: &str,
    security: &LinkSecurity,
) -> Result<Box<dyn Stream>, ControlError> {
    let link = TcpStream::connect(target_agent)
        .await
        .map_err(|source| ControlError::Link {
            addr: target_agent.to_string(),
            source,
        })?;
    link.set_nodelay(true)?;
    Ok(security.connect(link, target_agent).await?)
}

/// Where the source QEMU's stream comes in.
pub enum Inlet {
    /// The operator's `--qemu-listen`: QEMU connects to it.
    Listener(Bound),
    /// This agent's end, and QEMU's end until it is handed over.
    Pair(Box<dyn Stream>, OwnedFd),
}

/// What QEMU calls the descriptor of an [`Inlet::Pair`].
const OUTGOING_FD: &str = "nas-agent-outgoing";

impl Inlet {
    /// Starts the source QEMU's migration into this inlet; returns this agent's end once QEMU
    /// is connected.
    pub async fn start(self, src: &mut Qmp) -> Result<Box<dyn Stream>, ControlError> {
        match self {
            Inlet::Listener(listener) => {
                let uri = qemu_uri(&listener.local_addr());
                src.execute("migrate", Some(json!({ "uri": uri })))
                    .await
                    .map_err(src_err)?;
                tokio::time::timeout(Duration::from_secs(30), listener.accept())
                    .await
                    .map_err(|_| ControlError::Refused("the source QEMU never connected".into()))
                    .and_then(|accepted| Ok(accepted?.0))
            }
            Inlet::Pair(ours, theirs) => {
                src.pass_fd(OUTGOING_FD, theirs.as_fd())
                    .await
                    .map_err(src_err)?;
                // QEMU holds its own copy now.
                drop(theirs);
                let uri = json!({ "uri": format!("fd:{OUTGOING_FD}") });
                if let Err(e) = src.execute("migrate", Some(uri)).await {
                    // QEMU keeps a named descriptor until it is used or closed.
                    let _ = src
                        .execute("closefd", Some(json!({ "fdname": OUTGOING_FD })))
                        .await;
                    return Err(src_err(e));
                }
                Ok(ours)
            }
        }
    }
}
