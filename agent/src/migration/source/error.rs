//! Why the source side fails: [`SourceError`] for the whole run, [`LinkFailure`] for the agent
//! link, [`BackError`] for the back channel (shared between the tasks that see it).
use std::sync::Arc;

use nas_client::index::IndexClientError;

use crate::migration::{compress::CompressError, savevm::NotSavevm, wire::WireError};

/// Why the source side failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading QEMU's migration stream failed: {0}")]
    Qemu(std::io::Error),
    #[error("agent link failed: {0}")]
    Link(#[from] LinkFailure),
    /// The index service answered out of turn; the migration stops rather than guess.
    #[error("index service broke the protocol: {0}")]
    IndexReply(#[from] IndexReplyError),
    #[error("the target agent refused: {0}")]
    Refused(String),
    #[error("the target agent reported failure: {0}")]
    TargetFailed(String),
    #[error("index service: {0}")]
    Index(#[from] IndexClientError),
    #[error("refused the stream: {0}")]
    NotSavevm(#[from] NotSavevm),
    #[error("the stream ended, or sent nothing for 30 s, before its savevm header")]
    NoHeader,
}

/// What broke the agent link, as the source saw it.
#[derive(Debug, thiserror::Error)]
pub enum LinkFailure {
    #[error("{0}")]
    Write(std::io::Error),
    #[error(transparent)]
    Read(#[from] WireError),
    #[error("no HELLO_ACK within 30 s")]
    NoHelloAck,
    #[error("expected HELLO_ACK, got {0}")]
    Unexpected(String),
    /// The back channel ended before DONE (shared: the emitter and the reader both see it).
    #[error("{0}")]
    Back(Arc<BackError>),
    #[error("the link writer stopped")]
    WriterStopped,
    #[error("{0}")]
    Compress(#[from] CompressError),
    #[error("emitter task: {0}")]
    EmitterTask(tokio::task::JoinError),
    #[error("{0}")]
    BackTask(tokio::task::JoinError),
}

/// How an index service's reply did not fit the lookups the source sent.
#[derive(Debug, thiserror::Error)]
pub enum IndexReplyError {
    #[error("unexpected index frame {0}")]
    Unexpected(String),
    #[error("lookup reply without a request")]
    NoRequest,
    #[error("lookup reply {got} does not match request {want}")]
    Mismatch { got: u32, want: u32 },
}

/// Why the back channel ended before DONE.
#[derive(Debug, thiserror::Error)]
pub enum BackError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("target acknowledged {credit} stream bytes; {framed} were sent")]
    OverAcked { credit: u64, framed: u64 },
    #[error("target reported link bytes read without CAP_RECEIVED")]
    ReceivedWithoutCap,
    #[error("target asked for unknown page {0}")]
    UnknownPage(u64),
    #[error("link writer stopped")]
    WriterStopped,
    /// The target's own ERROR frame.
    #[error("{0}")]
    Peer(String),
    #[error("unexpected frame from target: {0}")]
    Unexpected(String),
    #[error("target closed the link")]
    Closed,
}
