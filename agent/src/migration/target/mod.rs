//! The target side of the hook: agent-link frames in, QEMU's exact stream out.
//!
//! ```text
//! link --> reader --slots, in order--> writer --> QEMU -incoming
//!             |  MAPPED                   ^ waits for each page's content
//!             +--> fetcher --NBD READ (coalesced, pipelined)--> blake3 == hash? --> content
//!                     | mismatch / NAS error / NAS unreachable
//!                     +--> FALLBACK_REQ to the source --> FALLBACK_DATA --> content
//! ```
//! Nothing reaches QEMU out of order or unverified: a mapped page is written only once its
//! content is known to hash to what the source hashed. Read-ahead is bounded by the slot queue;
//! the writer acknowledges mapped pages as it delivers them, which frees the source's copies.
//!
//! Stages: the reader (here, [`run_target`]) turns frames into slots and fetch requests;
//! `fetch` reads and verifies mapped pages; `deliver` writes slots to QEMU in order.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nas_proto::Endpoint;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

mod deliver;
mod fetch;
pub mod storage;

use self::{
    deliver::{write_loop, Cell, Slot},
    fetch::{fetch_loop, Fetch},
};
use super::{
    dedup::ContentCache,
    incoming::Delivery,
    link::{Hash, Hello, LinkFrame, LinkStats, CAP_RECEIVED, CAP_ZSTD, VERSION},
    moments::Moment,
    report::{Counters, Figures},
    secure::LinkSecurity,
    stream::PAGE_SIZE,
    wire::{FrameReader, WireError},
};

/// Target settings.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// Read the NAS here instead of the address the source announced.
    pub nas_override: Option<Endpoint>,
    /// TLS towards the NAS (NBD STARTTLS), when it requires it.
    pub nas_tls: nas_client::tls::SharedTls,
    /// Directories of image files shared with source hosts: an export named by a path inside
    /// one is read from that file (map-only mode against shared files).
    pub image_dirs: Vec<std::path::PathBuf>,
    /// Mapped pages queued for fetching ahead of what QEMU has received.
    pub read_ahead: usize,
    /// NBD reads in flight per fetch round.
    pub fetch_window: usize,
    /// Time allowed for one fetch round before its pages fall back to the source.
    pub fetch_timeout: Duration,
    /// Fetch rounds in parallel, each on its own NBD connections.
    pub fetchers: usize,
    pub dedup_capacity: usize,
    /// Also write the rebuilt stream to this file (for verification).
    pub record: Option<std::path::PathBuf>,
    /// How a VM's name becomes the channel into its target QEMU (see [`super::incoming`]).
    pub delivery: Delivery,
    /// `agent serve`: migrations served at once; a link beyond that is refused with ERROR.
    pub max_sessions: usize,
    /// TLS on the agent link, or the operator's plaintext opt-out.
    pub link_security: LinkSecurity,
    /// `agent serve`: the nice value its threads take while it serves a migration (see
    /// [`crate::priority`]); `None` leaves them alone.
    pub session_nice: Option<i32>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            nas_override: None,
            nas_tls: None,
            image_dirs: Vec::new(),
            read_ahead: 8192,
            fetch_window: 64,
            fetch_timeout: Duration::from_secs(10),
            fetchers: 4,
            dedup_capacity: super::dedup::DEFAULT_CAPACITY,
            record: None,
            delivery: Delivery::default(),
            max_sessions: MAX_SESSIONS,
            link_security: LinkSecurity::default(),
            session_nice: None,
        }
    }
}

/// `agent serve`'s default for [`TargetConfig::max_sessions`].
pub const MAX_SESSIONS: usize = 16;

/// Stream bytes a source may send beyond what this side has delivered to its QEMU: four times
/// the source's window (16 MiB of stream, plus one frame). Past it the session ends, so a
/// source that ignores its window cannot make this side buffer without bound.
pub const MAX_AHEAD: u64 = 64 << 20;

/// Why the target side failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("agent link failed: {0}")]
    Link(#[from] LinkFailure),
    #[error("the source agent broke the protocol: {0}")]
    Protocol(#[from] Violation),
    #[error("writing to the target QEMU failed: {0}")]
    Qemu(std::io::Error),
    #[error("refused the stream, nothing delivered: {0}")]
    NotSavevm(#[from] crate::migration::savevm::NotSavevm),
}

impl TargetError {
    /// The peer said nothing at all: no HELLO in time, or closed at once.
    pub fn is_silence(&self) -> bool {
        matches!(
            self,
            TargetError::Link(LinkFailure::NoHello | LinkFailure::ClosedBeforeHello)
        )
    }
}

/// What broke the agent link, as the target saw it.
#[derive(Debug, thiserror::Error)]
pub enum LinkFailure {
    #[error("no HELLO within 30 s")]
    NoHello,
    #[error("closed before sending anything")]
    ClosedBeforeHello,
    #[error(transparent)]
    Read(#[from] WireError),
    #[error("{0}")]
    Write(std::io::Error),
    #[error("writer task: {0}")]
    WriterTask(tokio::task::JoinError),
    #[error("source closed the link early")]
    ClosedEarly,
    #[error("fetcher stopped")]
    FetcherStopped,
    /// The source's own ERROR frame.
    #[error("{0}")]
    Peer(String),
}

/// How a source broke the link protocol.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("source speaks version {0}, this agent {VERSION}")]
    Version(u16),
    #[error("expected HELLO, got {0}")]
    NoHello(String),
    #[error("data after END")]
    DataAfterEnd,
    #[error("MAPPED sequence {0} out of order")]
    MappedOutOfOrder(u64),
    #[error("MAPPED after END")]
    MappedAfterEnd,
    #[error("DUP of content frame {0}, which is not in the cache")]
    UnknownDup(u64),
    #[error("unexpected frame {0}")]
    Unexpected(String),
    #[error(
        "the source sent {0} bytes of stream beyond what this side delivered, more than any \
         source's window allows ({MAX_AHEAD})"
    )]
    TooFarAhead(u64),
}

/// Reads the source's HELLO: the session parameters, before anything is connected.
pub async fn read_hello<R: AsyncRead + Unpin>(
    link: &mut R,
    frames: &mut FrameReader,
) -> Result<Hello, TargetError> {
    match tokio::time::timeout(Duration::from_secs(30), frames.next(link)).await {
        Err(_) => Err(LinkFailure::NoHello.into()),
        Ok(Err(e)) => Err(LinkFailure::Read(e).into()),
        Ok(Ok(Some(LinkFrame::Hello(h)))) if h.version == VERSION => Ok(h),
        Ok(Ok(Some(LinkFrame::Hello(h)))) => Err(Violation::Version(h.version).into()),
        Ok(Ok(None)) => Err(LinkFailure::ClosedBeforeHello.into()),
        Ok(Ok(other)) => Err(Violation::NoHello(format!("{other:?}")).into()),
    }
}

/// Runs the target side after [`read_hello`]: rebuilds the stream into `qemu` and reports.
pub async fn run_target<L, Q>(
    link: L,
    mut frames: FrameReader,
    hello: Hello,
    qemu: Q,
    config: TargetConfig,
    counters: Arc<Counters>,
) -> Result<Figures, TargetError>
where
    L: AsyncRead + AsyncWrite + Send + 'static,
    Q: AsyncWrite + Unpin + Send + 'static,
{
    let (mut link_rd, mut link_wr) = tokio::io::split(link);
    let caps = hello.caps & (CAP_ZSTD | CAP_RECEIVED);
    let ack = LinkFrame::HelloAck {
        version: VERSION,
        caps,
    };
    // Link bytes read so far, for the ACKs, when the source asked for them.
    let received = (caps & CAP_RECEIVED != 0).then(|| Arc::new(AtomicU64::new(0)));
    // Every write that leaves the channel idle is flushed: over TLS a written frame may
    // otherwise wait in the session's buffer (when the socket was full) until the next write,
    // and an ACK the source waits for would never leave.
    link_wr
        .write_all(&ack.to_bytes())
        .await
        .map_err(LinkFailure::Write)?;
    link_wr.flush().await.map_err(LinkFailure::Write)?;
    let (back_tx, mut back_rx) = mpsc::channel::<LinkFrame>(256);
    let back_writer = tokio::spawn(async move {
        while let Some(frame) = back_rx.recv().await {
            link_wr.write_all(&frame.to_bytes()).await?;
            if back_rx.is_empty() {
                link_wr.flush().await?;
            }
        }
        link_wr.flush().await?;
        Ok::<_, std::io::Error>(link_wr)
    });

    let nas = match &config.nas_override {
        Some(l) => Some(l.clone()),
        None => hello.nas.parse::<Endpoint>().ok(),
    };
    let names: HashMap<u32, String> = hello.exports.iter().cloned().collect();
    let (fetch_tx, fetch_rx) = mpsc::channel::<Fetch>(config.read_ahead.max(1));
    // Several fetchers, each with its own NBD connections, take rounds from one queue: the
    // NAS is read in parallel while the writer still delivers in order.
    let fetch_rx = Arc::new(tokio::sync::Mutex::new(fetch_rx));
    let mut fetchers = tokio::task::JoinSet::new();
    for _ in 0..config.fetchers.max(1) {
        fetchers.spawn(fetch_loop(
            fetch_rx.clone(),
            nas.clone(),
            names.clone(),
            back_tx.clone(),
            counters.clone(),
            config.clone(),
        ));
    }

    // Not bounded by the channel: the reader must never block, or a fallback answer could wait
    // behind data that waits for it. Bounded instead by what the source may send ahead of the
    // credit this side returns, which the reader enforces ([`MAX_AHEAD`]).
    let (slot_tx, slot_rx) = mpsc::unbounded_channel::<Vec<Slot>>();
    let record = match &config.record {
        Some(path) => Some(
            tokio::fs::File::create(path)
                .await
                .map_err(TargetError::Qemu)?,
        ),
        None => None,
    };
    let writer = tokio::spawn(write_loop(
        slot_rx,
        qemu,
        record,
        back_tx.clone(),
        counters.clone(),
        received.clone(),
    ));

    // The reader runs here: frames in order become slots; fallbacks fill cells.
    // Content by the ordinal of the frame that carried it, for DUP.
    let mut cache: ContentCache<u64, Arc<Cell>> = ContentCache::new(config.dedup_capacity);
    let mut next_ordinal = 0u64;
    // Mapped pages in sequence order, for fallback answers; filled ones are dropped from the
    // front, so it holds about the read-ahead.
    let mut waiting: VecDeque<(u64, Hash, Arc<Cell>)> = VecDeque::new();
    let mut slot_tx = Some(slot_tx);
    let mut fetch_tx = Some(fetch_tx);
    let mut source_stats = None;
    let mut writer = Some(writer);
    // Slots go to the writer in batches: one hand-off per run of frames already buffered.
    let mut slots: Vec<Slot> = Vec::new();
    // Stream bytes the frames read so far stand for.
    let mut taken = 0u64;
    let outcome: Result<(), TargetError> = loop {
        if !slots.is_empty() && (!frames.has_buffered() || slots.len() >= 1024) {
            let Some(tx) = &slot_tx else {
                break Err(Violation::DataAfterEnd.into());
            };
            if tx.send(std::mem::take(&mut slots)).is_err() {
                // The writer failed; its error is collected below.
                slot_tx = None;
            }
        }
        let frame = tokio::select! {
            f = frames.next(&mut link_rd) => f,
            done = async { writer.as_mut().expect("writer present").await }, if writer.is_some() => {
                writer = None;
                match done {
                    Ok(Ok(())) => break Ok(()),
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(LinkFailure::WriterTask(e).into()),
                }
            }
        };
        if let Some(r) = &received {
            r.store(frames.bytes_read(), Ordering::Relaxed);
        }
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Err(LinkFailure::ClosedEarly.into()),
            Err(e) => break Err(LinkFailure::Read(e).into()),
        };
        let slot = match frame {
            LinkFrame::Raw(bytes) => Slot::Bytes(bytes),
            LinkFrame::Page(page) => {
                let cell = Cell::ready(page);
                cache.insert(next_ordinal, cell.clone());
                next_ordinal += 1;
                Slot::Content { cell, seq: None }
            }
            LinkFrame::Mapped {
                seq,
                export,
                offset,
                hash,
            } => {
                let cell = Arc::new(Cell::default());
                cache.insert(next_ordinal, cell.clone());
                next_ordinal += 1;
                while waiting
                    .front()
                    .is_some_and(|(_, _, c)| c.value.get().is_some())
                {
                    waiting.pop_front();
                }
                if waiting.back().is_some_and(|(last, _, _)| *last >= seq) {
                    break Err(Violation::MappedOutOfOrder(seq).into());
                }
                waiting.push_back((seq, hash, cell.clone()));
                let fetch = Fetch {
                    seq,
                    export,
                    offset,
                    hash,
                    cell: cell.clone(),
                };
                let Some(tx) = &fetch_tx else {
                    break Err(Violation::MappedAfterEnd.into());
                };
                if tx.send(fetch).await.is_err() {
                    break Err(LinkFailure::FetcherStopped.into());
                }
                Slot::Content {
                    cell,
                    seq: Some(seq),
                }
            }
            LinkFrame::Dup { ordinal } => match cache.touch(&ordinal) {
                Some(cell) => Slot::Content {
                    cell: cell.clone(),
                    seq: None,
                },
                None => break Err(Violation::UnknownDup(ordinal).into()),
            },
            LinkFrame::FallbackData { seq, page } => {
                match waiting.binary_search_by_key(&seq, |(s, _, _)| *s) {
                    Ok(i) => {
                        let (_, hash, cell) = &waiting[i];
                        if &blockhash::hash(&page[..]) != hash {
                            tracing::warn!(seq, "fallback content does not match its hash");
                        }
                        cell.set(page);
                    }
                    Err(_) => tracing::debug!(seq, "fallback for a page already filled"),
                }
                continue;
            }
            LinkFrame::End { stats } => {
                counters.marks.mark(Moment::End);
                source_stats = Some(stats);
                if let Some(tx) = slot_tx.take() {
                    let _ = tx.send(std::mem::take(&mut slots));
                }
                fetch_tx = None;
                continue;
            }
            LinkFrame::Error { message } => break Err(LinkFailure::Peer(message).into()),
            other => break Err(Violation::Unexpected(format!("{other:?}")).into()),
        };
        if slot_tx.is_none() {
            break Err(Violation::DataAfterEnd.into());
        }
        taken += match &slot {
            Slot::Bytes(b) => b.len() as u64,
            Slot::Content { .. } => PAGE_SIZE as u64,
        };
        let ahead = taken - counters.qemu_bytes.load(Ordering::Relaxed);
        if ahead > MAX_AHEAD {
            break Err(Violation::TooFarAhead(ahead).into());
        }
        slots.push(slot);
    };
    drop(slot_tx);
    drop(fetch_tx);
    if let Some(w) = writer {
        w.abort();
    }
    fetchers.abort_all();
    let mut figures = counters.snapshot();
    if let Some(s) = &source_stats {
        figures.pages_zero = s.pages_zero;
    }
    let done = LinkFrame::Done {
        outcome: match &outcome {
            Ok(()) => Ok(LinkStats::from(&figures)),
            Err(e) => Err(e.to_string()),
        },
    };
    let _ = back_tx.send(done).await;
    drop(back_tx);
    let _ = back_writer.await;
    outcome.map(|()| figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_that_ignores_its_window_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let (mut source, link) = tokio::io::duplex(1 << 20);
        // A target QEMU that reads nothing: every slot the reader takes stays undelivered.
        let (qemu, _stalled) = tokio::io::duplex(64 << 10);
        let hello = Hello {
            version: VERSION,
            vm: "vm".into(),
            exports: Vec::new(),
            nas: "127.0.0.1:1".into(),
            caps: 0,
        };
        let target = tokio::spawn(run_target(
            link,
            FrameReader::new(),
            hello,
            qemu,
            TargetConfig::default(),
            Arc::new(Counters::default()),
        ));
        // A savevm header, then far more than MAX_AHEAD of RAW frames, never waiting for an
        // ACK.
        let header = LinkFrame::Raw(b"QEVM\0\0\0\x03".to_vec()).to_bytes();
        source.write_all(&header).await.unwrap();
        let raw = LinkFrame::Raw(vec![0x5a; 256 << 10]).to_bytes();
        let mut sent = 0u64;
        while sent < 4 * MAX_AHEAD && source.write_all(&raw).await.is_ok() {
            sent += raw.len() as u64;
        }
        assert!(sent < 4 * MAX_AHEAD, "the target kept reading {sent} bytes");
        let err = tokio::time::timeout(Duration::from_secs(30), target)
            .await
            .expect("the target ends")
            .expect("no panic")
            .expect_err("the session fails");
        assert!(
            matches!(&err, TargetError::Protocol(m) if m.to_string().contains("beyond what this side delivered")),
            "{err}"
        );
    }
}
