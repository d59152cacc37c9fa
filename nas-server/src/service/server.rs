//! The index service's listener and sessions.
//!
//! A session starts with HELLO naming the exports it may search; the server answers WELCOME
//! with that scope plus every shared export, or an ERROR and closes. Requests are then answered
//! in order. Lookups and block-hash reads never leave the scope: an export outside it is
//! answered with `OutOfScope` and is never searched. A HOT_SUBSCRIBE starts one forwarder per
//! export in scope that sends a snapshot and then every change. Replies and hot-set frames
//! share one bounded queue to the socket, so a slow client slows its own session only.
//!
//! With TLS configured, a session that opens with a TLS ClientHello is upgraded first (a
//! plaintext one is refused under `require`); an export with an allow-list can be named only
//! by the TLS client identities it lists, and shared exports join a scope only where allowed.
use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter},
    sync::{broadcast::error::RecvError, mpsc, watch, Semaphore},
    task::JoinSet,
};

use nas_proto::{
    index::{
        ErrorCode, ExportInfo, Found, Frame, FrameError, HotEntry, MAX_BATCH, MAX_FRAME,
        MAX_HOT_ENTRIES, VERSION,
    },
    net::{Accepted, BindError, Bound, Rewound, Stream},
    Endpoint,
};
use tls_creds::Identity;

use crate::{
    access::Access,
    config::TlsMode,
    index::{
        hot::{HotChange, HotSet},
        BlockIndex, ExportId, BLOCK,
    },
    server::ServerTls,
};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one client.
const SEND_QUEUE: usize = 64;

/// An export as the service knows it.
pub struct CatalogEntry {
    pub info: ExportInfo,
    pub hot: Option<Arc<HotSet>>,
    /// TLS client identities that may name it; empty: any session (see [`crate::access`]).
    pub allow: Vec<String>,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("refused: {0}")]
    Refused(String),
}

/// A bound index service.
pub struct IndexService {
    catalog: Arc<Vec<CatalogEntry>>,
    index: Arc<BlockIndex>,
    bound: Vec<Bound>,
    max_connections: usize,
    tls: ServerTls,
}

impl IndexService {
    /// TLS as `tls` says: under `require` a plaintext session is refused; under `optional`
    /// a session that opens with a TLS ClientHello gets TLS.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = tls;
        self
    }

    pub async fn bind(
        catalog: Vec<CatalogEntry>,
        index: Arc<BlockIndex>,
        listen: &[Endpoint],
        max_connections: usize,
    ) -> Result<Self, BindError> {
        let bound = Bound::bind_all(listen).await?;
        Ok(Self {
            catalog: Arc::new(catalog),
            index,
            bound,
            max_connections,
            tls: ServerTls::off(),
        })
    }

    pub fn local_addrs(&self) -> Vec<Endpoint> {
        self.bound.iter().map(Bound::local_addr).collect()
    }

    /// Serves until `shutdown` turns true; open sessions are told and closed.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut tasks = JoinSet::new();
        for bound in self.bound {
            let (slots, catalog, index) = (slots.clone(), self.catalog.clone(), self.index.clone());
            let tls = self.tls.clone();
            let mut stop = shutdown.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let mut sessions = JoinSet::new();
                while let Some(Accepted { stream, peer, slot }) = bound
                    .accept_in_slot(&slots, &mut stop, "index service")
                    .await
                {
                    let (catalog, index, shutdown) =
                        (catalog.clone(), index.clone(), shutdown.clone());
                    let tls = tls.clone();
                    sessions.spawn(async move {
                        metrics::gauge!("nas_index_sessions").increment(1.0);
                        let result = match secure(stream, &tls).await {
                            Ok((stream, access)) => {
                                session(stream, &catalog, &index, &access, shutdown).await
                            }
                            Err(e) => Err(e),
                        };
                        if let Err(e) = result {
                            tracing::info!(%peer, "index session ended: {e}");
                        }
                        metrics::gauge!("nas_index_sessions").decrement(1.0);
                        drop(slot);
                    });
                    while sessions.try_join_next().is_some() {}
                }
                while sessions.join_next().await.is_some() {}
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Reads one frame, keeping leftover bytes in `buf` for the next call.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, SessionError> {
    loop {
        match Frame::parse(buf) {
            Ok((frame, used)) => {
                buf.drain(..used);
                return Ok(Some(frame));
            }
            Err(FrameError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        let mut chunk = [0u8; 64 << 10];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(SessionError::Frame(FrameError::Malformed(
                    "connection closed inside a frame",
                )))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        debug_assert!(buf.len() <= MAX_FRAME as usize + 4 + chunk.len());
    }
}

fn error(id: u32, code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    Frame::Error {
        id,
        code,
        message: message.into(),
    }
    .to_bytes()
}

/// A session's TLS: a session that opens with a TLS record (0x16) gets the handshake; a
/// plaintext one is refused under `require` (with ERROR, readable by any client).
async fn secure(
    mut stream: Box<dyn Stream>,
    tls: &ServerTls,
) -> Result<(Box<dyn Stream>, Access), SessionError> {
    let Some(acceptor) = &tls.acceptor else {
        return Ok((stream, Access::default()));
    };
    let mut first = [0u8; 1];
    tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut first))
        .await
        .map_err(|_| SessionError::Refused("nothing sent in time".into()))??;
    let mut stream: Box<dyn Stream> = Box::new(Rewound::new(first.to_vec(), stream));
    if first[0] == TLS_HANDSHAKE_RECORD {
        let upgraded = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| SessionError::Refused("TLS handshake timed out".into()))??;
        let identity = Identity::of_peer(upgraded.get_ref().1.peer_certificates());
        let access = Access {
            tls: true,
            identity,
        };
        return Ok((Box::new(upgraded), access));
    }
    if tls.mode == TlsMode::Require {
        let message = "this index service requires TLS";
        let _ = stream
            .write_all(&error(0, ErrorCode::Forbidden, message))
            .await;
        return Err(SessionError::Refused(message.into()));
    }
    Ok((stream, Access::default()))
}

/// The first byte of a TLS handshake record (a ClientHello); index frames begin with a
/// big-endian length far below 0x16000000.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn session(
    stream: Box<dyn Stream>,
    catalog: &[CatalogEntry],
    index: &Arc<BlockIndex>,
    access: &Access,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(SEND_QUEUE);
    let writer = tokio::spawn(async move {
        let mut out = BufWriter::new(writer);
        while let Some(frame) = rx.recv().await {
            out.write_all(&frame).await?;
            if rx.is_empty() {
                out.flush().await?;
            }
        }
        out.shutdown().await.ok();
        Ok::<_, std::io::Error>(())
    });
    let result = converse(&mut reader, &tx, catalog, index, access, &mut shutdown).await;
    if let Err(SessionError::Frame(e)) = &result {
        let _ = tx.send(error(0, ErrorCode::Protocol, e.to_string())).await;
    }
    let stopping = *shutdown.borrow();
    if stopping {
        let _ = tx
            .send(error(0, ErrorCode::Shutdown, "server shutting down"))
            .await;
    }
    drop(tx);
    writer.await.ok();
    result
}

async fn converse<R: AsyncRead + Unpin>(
    reader: &mut R,
    tx: &mpsc::Sender<Vec<u8>>,
    catalog: &[CatalogEntry],
    index: &Arc<BlockIndex>,
    access: &Access,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut buf = Vec::new();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(reader, &mut buf))
        .await
        .map_err(|_| SessionError::Refused("no HELLO in time".into()))??;
    let Some(Frame::Hello { version, exports }) = hello else {
        let _ = tx
            .send(error(0, ErrorCode::Protocol, "expected HELLO"))
            .await;
        return Err(SessionError::Refused("first frame was not HELLO".into()));
    };
    if version != VERSION {
        let msg = format!("server speaks version {VERSION}, client {version}");
        let _ = tx.send(error(0, ErrorCode::Version, msg.clone())).await;
        return Err(SessionError::Refused(msg));
    }
    let mut scope: Vec<&CatalogEntry> = Vec::new();
    for name in &exports {
        let Some(entry) = catalog.iter().find(|e| &e.info.name == name) else {
            let msg = format!("no export named {name:?}");
            let _ = tx
                .send(error(0, ErrorCode::UnknownExport, msg.clone()))
                .await;
            return Err(SessionError::Refused(msg));
        };
        if access.permits(&entry.allow).is_err() {
            let msg = format!("{} may not name export {name:?}", access.who());
            let _ = tx.send(error(0, ErrorCode::Forbidden, msg.clone())).await;
            return Err(SessionError::Refused(msg));
        }
        scope.push(entry);
    }
    let shared = catalog
        .iter()
        .filter(|e| e.info.shared && access.permits(&e.allow).is_ok());
    for entry in shared {
        if !scope.iter().any(|s| s.info.id == entry.info.id) {
            scope.push(entry);
        }
    }
    let ids: Arc<Vec<ExportId>> = Arc::new(scope.iter().map(|e| e.info.id).collect());
    let welcome = Frame::Welcome {
        version: VERSION,
        exports: scope.iter().map(|e| e.info.clone()).collect(),
    };
    send(tx, welcome.to_bytes()).await?;
    let mut forwarders = JoinSet::new();
    loop {
        let frame = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            f = read_frame(reader, &mut buf) => f?,
        };
        let Some(frame) = frame else { break };
        match frame {
            Frame::Lookup { id, hashes } => {
                let (index, ids) = (index.clone(), ids.clone());
                let found = tokio::task::spawn_blocking(move || {
                    hashes
                        .iter()
                        .map(|h| {
                            index.lookup(h, &ids).map(|l| Found {
                                export: l.export,
                                offset: l.block * BLOCK,
                            })
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| SessionError::Refused(format!("lookup task failed: {e}")))?;
                metrics::counter!("nas_index_lookups_total").increment(found.len() as u64);
                metrics::counter!("nas_index_hits_total")
                    .increment(found.iter().filter(|f| f.is_some()).count() as u64);
                send(tx, Frame::LookupReply { id, found }.to_bytes()).await?;
            }
            Frame::BlockHashes {
                id,
                export,
                first,
                count,
            } => {
                let reply = if !ids.contains(&export) {
                    error(
                        id,
                        ErrorCode::OutOfScope,
                        format!("export {export} is not in scope"),
                    )
                } else if count > MAX_BATCH {
                    error(
                        id,
                        ErrorCode::TooLarge,
                        format!("at most {MAX_BATCH} blocks"),
                    )
                } else {
                    let hashes = index.block_hashes(export, first, u64::from(count));
                    Frame::BlockHashesReply { id, hashes }.to_bytes()
                };
                send(tx, reply).await?;
            }
            Frame::HotSubscribe { id } => {
                if !forwarders.is_empty() {
                    send(tx, error(id, ErrorCode::Protocol, "already subscribed")).await?;
                    continue;
                }
                for entry in &scope {
                    if let Some(hot) = &entry.hot {
                        forwarders.spawn(forward_hot(hot.clone(), tx.clone()));
                    }
                }
            }
            _ => {
                return Err(SessionError::Frame(FrameError::Malformed(
                    "frame not valid from a client",
                )))
            }
        }
    }
    forwarders.shutdown().await;
    Ok(())
}

async fn send(tx: &mpsc::Sender<Vec<u8>>, frame: Vec<u8>) -> Result<(), SessionError> {
    tx.send(frame)
        .await
        .map_err(|_| SessionError::Refused("client writer stopped".into()))
}

/// Streams one export's hot set: a reset snapshot, then changes; a fresh snapshot whenever
/// this client fell too far behind.
async fn forward_hot(hot: Arc<HotSet>, tx: mpsc::Sender<Vec<u8>>) {
    let export = hot.export();
    loop {
        let (snapshot, mut rx) = hot.subscribe();
        if !send_hot(&tx, export, true, &snapshot).await {
            return;
        }
        loop {
            match rx.recv().await {
                Ok(batch) => {
                    if !send_hot(&tx, export, false, &batch).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::info!(export, skipped = n, "hot-set subscriber lagged; resending");
                    metrics::counter!("nas_hot_resyncs_total").increment(1);
                    break;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Sends `changes` as HOT frames of at most [`MAX_HOT_ENTRIES`] entries, at least one frame.
/// For a snapshot (`reset`), the first frame resets and gives the snapshot's size, so the
/// client sizes its replica once; an empty snapshot is still a reset. `false` when the
/// client's writer is gone.
async fn send_hot(
    tx: &mpsc::Sender<Vec<u8>>,
    export: u32,
    reset: bool,
    changes: &[HotChange],
) -> bool {
    let per_frame = MAX_HOT_ENTRIES as usize;
    for n in 0..changes.len().div_ceil(per_frame).max(1) {
        let chunk = &changes[n * per_frame..changes.len().min((n + 1) * per_frame)];
        let frame = Frame::Hot {
            export,
            reset: (reset && n == 0).then_some(changes.len() as u32),
            entries: chunk
                .iter()
                .map(|c| HotEntry {
                    block: c.block,
                    hash: c.hash,
                    was: c.was,
                })
                .collect(),
        };
        if tx.send(frame.to_bytes()).await.is_err() {
            return false;
        }
    }
    true
}
