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
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use blockhash::multi::hash_present;
use nas_client::nbd::NbdClient;
use nas_proto::Endpoint;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter},
    sync::{mpsc, Notify},
};

use super::{
    dedup::ContentCache,
    incoming::IncomingPolicy,
    link::{Hash, Hello, LinkFrame, ACK_MAPPED, ACK_STEP, CAP_RECEIVED, CAP_ZSTD, VERSION},
    report::{Counters, Figures},
    stream::PAGE_SIZE,
    wire::FrameReader,
};

/// Target settings.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// Read the NAS here instead of the address the source announced.
    pub nas_override: Option<Endpoint>,
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
    /// Which target QEMU addresses a source may name (see [`super::incoming`]).
    pub incoming: IncomingPolicy,
    /// `agent serve`: migrations served at once; a link beyond that is refused with ERROR.
    pub max_sessions: usize,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            nas_override: None,
            read_ahead: 8192,
            fetch_window: 64,
            fetch_timeout: Duration::from_secs(10),
            fetchers: 4,
            dedup_capacity: super::dedup::DEFAULT_CAPACITY,
            record: None,
            incoming: IncomingPolicy::default(),
            max_sessions: MAX_SESSIONS,
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
    Link(String),
    #[error("the source agent broke the protocol: {0}")]
    Protocol(String),
    #[error("writing to the target QEMU failed: {0}")]
    Qemu(std::io::Error),
}

/// A page's content, filled once by the fetcher or by a fallback.
#[derive(Default)]
struct Cell {
    value: OnceLock<Box<[u8; PAGE_SIZE]>>,
    ready: Notify,
}

impl Cell {
    fn ready(page: Box<[u8; PAGE_SIZE]>) -> Arc<Self> {
        let c = Arc::new(Self::default());
        c.set(page);
        c
    }

    fn set(&self, page: Box<[u8; PAGE_SIZE]>) {
        if self.value.set(page).is_ok() {
            self.ready.notify_waiters();
        }
    }

    async fn get(&self) -> &[u8; PAGE_SIZE] {
        loop {
            let notified = self.ready.notified();
            if let Some(v) = self.value.get() {
                return v;
            }
            notified.await;
        }
    }
}

enum Slot {
    Bytes(Vec<u8>),
    Content { cell: Arc<Cell>, seq: Option<u64> },
}

struct Fetch {
    seq: u64,
    export: u32,
    offset: u64,
    hash: Hash,
    cell: Arc<Cell>,
}

/// Reads the source's HELLO: the session parameters, before anything is connected.
pub async fn read_hello<R: AsyncRead + Unpin>(
    link: &mut R,
    frames: &mut FrameReader,
) -> Result<Hello, TargetError> {
    match tokio::time::timeout(Duration::from_secs(30), frames.next(link)).await {
        Err(_) => Err(TargetError::Link("no HELLO within 30 s".into())),
        Ok(Err(e)) => Err(TargetError::Link(e)),
        Ok(Ok(Some(LinkFrame::Hello(h)))) if h.version == VERSION => Ok(h),
        Ok(Ok(Some(LinkFrame::Hello(h)))) => Err(TargetError::Protocol(format!(
            "source speaks version {}, this agent {VERSION}",
            h.version
        ))),
        Ok(Ok(other)) => Err(TargetError::Protocol(format!(
            "expected HELLO, got {other:?}"
        ))),
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
    link_wr
        .write_all(&ack.to_bytes())
        .await
        .map_err(|e| TargetError::Link(e.to_string()))?;
    let (back_tx, mut back_rx) = mpsc::channel::<LinkFrame>(256);
    let back_writer = tokio::spawn(async move {
        while let Some(frame) = back_rx.recv().await {
            link_wr.write_all(&frame.to_bytes()).await?;
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
                break Err(TargetError::Protocol("data after END".into()));
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
                    Err(e) => break Err(TargetError::Link(format!("writer task: {e}"))),
                }
            }
        };
        if let Some(r) = &received {
            r.store(frames.bytes_read(), Ordering::Relaxed);
        }
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Err(TargetError::Link("source closed the link early".into())),
            Err(e) => break Err(TargetError::Link(e)),
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
                    break Err(TargetError::Protocol(format!(
                        "MAPPED sequence {seq} out of order"
                    )));
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
                    break Err(TargetError::Protocol("MAPPED after END".into()));
                };
                if tx.send(fetch).await.is_err() {
                    break Err(TargetError::Link("fetcher stopped".into()));
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
                None => {
                    break Err(TargetError::Protocol(format!(
                        "DUP of content frame {ordinal}, which is not in the cache"
                    )))
                }
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
                source_stats = Some(stats);
                if let Some(tx) = slot_tx.take() {
                    let _ = tx.send(std::mem::take(&mut slots));
                }
                fetch_tx = None;
                continue;
            }
            LinkFrame::Error { message } => break Err(TargetError::Link(message)),
            other => break Err(TargetError::Protocol(format!("unexpected frame {other:?}"))),
        };
        if slot_tx.is_none() {
            break Err(TargetError::Protocol("data after END".into()));
        }
        taken += match &slot {
            Slot::Bytes(b) => b.len() as u64,
            Slot::Content { .. } => PAGE_SIZE as u64,
        };
        let ahead = taken - counters.qemu_bytes.load(Ordering::Relaxed);
        if ahead > MAX_AHEAD {
            break Err(TargetError::Protocol(format!(
                "the source sent {ahead} bytes of stream beyond what this side delivered, more \
                 than any source's window allows ({MAX_AHEAD})"
            )));
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
        if let Ok(src) = serde_json::from_str::<Figures>(s) {
            figures.pages_zero = src.pages_zero;
        }
    }
    let done = LinkFrame::Done {
        ok: outcome.is_ok(),
        stats: match &outcome {
            Ok(()) => serde_json::to_string(&figures).expect("figures serialise"),
            Err(e) => e.to_string(),
        },
    };
    let _ = back_tx.send(done).await;
    drop(back_tx);
    let _ = back_writer.await;
    outcome.map(|()| figures)
}

/// Delivers slots to QEMU in order and acknowledges delivered mapped pages.
async fn write_loop<Q: AsyncWrite + Unpin>(
    mut slots: mpsc::UnboundedReceiver<Vec<Slot>>,
    qemu: Q,
    mut record: Option<tokio::fs::File>,
    back: mpsc::Sender<LinkFrame>,
    counters: Arc<Counters>,
    received: Option<Arc<AtomicU64>>,
) -> Result<(), TargetError> {
    let mut out = BufWriter::with_capacity(1 << 20, qemu);
    // Delivered so far: MAPPED pages and stream bytes (the credit); and what was last
    // acknowledged.
    let (mut mapped, mut credit) = (0u64, 0u64);
    let (mut acked_mapped, mut acked_credit) = (0u64, 0u64);
    while let Some(batch) = slots.recv().await {
        let mut delivered = 0u64;
        for slot in batch {
            let n = match slot {
                Slot::Bytes(b) => {
                    out.write_all(&b).await.map_err(TargetError::Qemu)?;
                    if let Some(f) = record.as_mut() {
                        f.write_all(&b).await.map_err(TargetError::Qemu)?;
                    }
                    b.len()
                }
                Slot::Content { cell, seq } => {
                    if cell.value.get().is_none() {
                        // Waiting for the NAS: let QEMU have what is ready meanwhile.
                        out.flush().await.map_err(TargetError::Qemu)?;
                    }
                    let page = cell.get().await;
                    out.write_all(page).await.map_err(TargetError::Qemu)?;
                    if let Some(f) = record.as_mut() {
                        f.write_all(page).await.map_err(TargetError::Qemu)?;
                    }
                    if let Some(seq) = seq {
                        mapped = seq + 1;
                    }
                    PAGE_SIZE
                }
            };
            credit += n as u64;
            delivered += n as u64;
            // Ack in steps: below the source's windows (16 MiB of stream, 2 MiB of link
            // bytes) and page store (16384 pages), so it never waits for an ack, and far above
            // one frame, so acks stay rare.
            if credit - acked_credit >= ACK_STEP || mapped - acked_mapped >= ACK_MAPPED {
                let received = received.as_ref().map(|r| r.load(Ordering::Relaxed));
                let ack = LinkFrame::Ack {
                    mapped,
                    credit,
                    received,
                };
                let _ = back.send(ack).await;
                (acked_mapped, acked_credit) = (mapped, credit);
            }
        }
        Counters::add(&counters.qemu_bytes, delivered);
        if slots.is_empty() {
            out.flush().await.map_err(TargetError::Qemu)?;
        }
    }
    out.flush().await.map_err(TargetError::Qemu)?;
    out.shutdown().await.map_err(TargetError::Qemu)?;
    if let Some(mut f) = record {
        f.flush().await.map_err(TargetError::Qemu)?;
    }
    Ok(())
}

/// Fetches mapped pages from the NAS, verifies them, and asks the source for any it cannot
/// get or verify.
async fn fetch_loop(
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<Fetch>>>,
    nas: Option<Endpoint>,
    names: HashMap<u32, String>,
    back: mpsc::Sender<LinkFrame>,
    counters: Arc<Counters>,
    config: TargetConfig,
) {
    let mut clients: HashMap<u32, Option<NbdClient>> = HashMap::new();
    loop {
        let round = {
            let mut queue = requests.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut round = vec![first];
            while round.len() < 256 {
                match queue.try_recv() {
                    Ok(f) => round.push(f),
                    Err(_) => break,
                }
            }
            round
        };
        let mut by_export: HashMap<u32, Vec<Fetch>> = HashMap::new();
        for f in round {
            by_export.entry(f.export).or_default().push(f);
        }
        for (export, fetches) in by_export {
            counters.fetches.begin();
            let client = match clients.get_mut(&export) {
                Some(c) => c,
                None => {
                    let c = match (&nas, names.get(&export)) {
                        (Some(addr), Some(name)) => {
                            match tokio::time::timeout(
                                config.fetch_timeout,
                                NbdClient::connect(addr, name),
                            )
                            .await
                            {
                                Ok(Ok(c)) => Some(c),
                                Ok(Err(e)) => {
                                    tracing::warn!("NAS export {name}: {e}; using fallbacks");
                                    None
                                }
                                Err(_) => {
                                    tracing::warn!("NAS export {name}: connect timed out");
                                    None
                                }
                            }
                        }
                        _ => None,
                    };
                    clients.entry(export).or_insert(c)
                }
            };
            let results = match client.as_mut() {
                Some(c) => {
                    let ranges: Vec<(u64, u32)> = fetches
                        .iter()
                        .map(|f| (f.offset, PAGE_SIZE as u32))
                        .collect();
                    match tokio::time::timeout(
                        config.fetch_timeout,
                        c.read_many(&ranges, config.fetch_window),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) => {
                            tracing::warn!(export, "NAS read failed: {e}; using fallbacks");
                            None
                        }
                        Err(_) => {
                            tracing::warn!(export, "NAS read timed out; using fallbacks");
                            None
                        }
                    }
                }
                None => None,
            };
            if results.is_none() {
                // A broken connection is not reused.
                clients.insert(export, None);
            }
            // Every page that arrived whole is hashed, the round's pages together.
            let mut data: Vec<Option<Vec<u8>>> = results
                .map(|r| {
                    r.into_iter()
                        .map(|d| d.ok().filter(|d| d.len() == PAGE_SIZE))
                })
                .into_iter()
                .flatten()
                .collect();
            let mut hashes = Vec::new();
            {
                let whole: Vec<Option<&[u8; PAGE_SIZE]>> = data
                    .iter()
                    .map(|d| {
                        d.as_deref()
                            .map(|d| d.try_into().expect("kept only whole pages"))
                    })
                    .collect();
                hash_present(&whole, &mut hashes);
            }
            for (i, f) in fetches.into_iter().enumerate() {
                let verified = data
                    .get_mut(i)
                    .and_then(Option::take)
                    .filter(|_| hashes[i] == Some(f.hash))
                    .and_then(|d| Box::<[u8; PAGE_SIZE]>::try_from(d).ok());
                match verified {
                    Some(page) => {
                        Counters::add(&counters.nas_bytes, PAGE_SIZE as u64);
                        f.cell.set(page);
                    }
                    None => {
                        Counters::add(&counters.fallbacks, 1);
                        if back
                            .send(LinkFrame::FallbackReq { seq: f.seq })
                            .await
                            .is_err()
                        {
                            counters.fetches.end(1);
                            return;
                        }
                    }
                }
            }
            counters.fetches.end(1);
        }
    }
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
            incoming: String::new(),
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
        // Far more than MAX_AHEAD of RAW frames, never waiting for an ACK.
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
            matches!(&err, TargetError::Protocol(m) if m.contains("beyond what this side delivered")),
            "{err}"
        );
    }
}
