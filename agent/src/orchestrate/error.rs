//! What can stop `agent migrate`, and which QEMU a QMP failure came from.
use nas_client::index::IndexClientError;

use crate::qmp::QmpError;

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
    #[error("cannot listen for the source QEMU on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot reach the target agent at {addr}: {source}")]
    Link {
        addr: String,
        source: std::io::Error,
    },
    #[error("agent link: {0}")]
    Security(#[from] crate::migration::secure::SecurityError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub(super) fn src_err(source: QmpError) -> ControlError {
    ControlError::Qmp {
        which: "source",
        source,
    }
}

pub(super) fn dst_err(source: QmpError) -> ControlError {
    ControlError::Qmp {
        which: "target",
        source,
    }
}
