//! The source side's set-up, one piece of code for `agent migrate` and `agent source`: the
//! stream's settings, the index check made before any QEMU is touched, the listener QEMU's
//! stream comes to, and the link to the target agent.
use std::{path::PathBuf, sync::Arc};

use nas_client::{index::IndexClient, tls::SharedTls};
use nas_proto::{
    net::{Bound, Stream},
    Endpoint,
};
use tokio::net::TcpStream;

use super::error::ControlError;
use crate::migration::{
    compress::Compression,
    pace::Cap,
    pagemap::SharedMap,
    secure::LinkSecurity,
    source::{SourceConfig, QEMU_RECV_BUFFER},
};

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
