//! The source side of the hook: QEMU's outgoing stream in, agent-link frames out.
//!
//! ```text
//! QEMU --bytes--> parser --pages--> blake3 --> hot-set replica hit?  -> MAPPED
//!                   |                          miss: batched LOOKUP  -> MAPPED / PAGE
//!                   +--verbatim--------------------------------------> RAW
//!                 (in stream order; DUP when the target's cache holds the content)
//! ```
//! A read's pages are hashed together, several per SIMD pass ([`hash_blocks`]).
//! Lookups for misses go out in batches, several batches in flight, so the stream never waits
//! a round trip per page. Pages in the final `ram` END section (sent while the guest is
//! paused) are never looked up remotely: a round trip there would add to downtime. Every
//! mapped page's content is kept (in place, in the read buffer it arrived in) until the target
//! acknowledges it, at most `unacked_pages` pages in at most [`KEPT_READS`] buffers; past that
//! the source stops reading QEMU (backpressure) until acks arrive. A FALLBACK_REQ is answered
//! from that store, ahead of normal traffic. The link writer paces its writes to the
//! migration's bandwidth cap until the stream reaches the switchover ([`super::pace`]).
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::{Duration, Instant},
};

use blockhash::multi::hash_blocks;
use nas_client::index::{HotReplica, IndexClient, IndexClientError};
use nas_proto::{
    index::{Found, Frame},
    Endpoint,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, Notify},
};

use super::{
    compress::{Compression, LinkCompressor},
    dedup::ContentCache,
    link::{self, Hash, Hello, LinkFrame, CAP_RECEIVED, CAP_ZSTD, VERSION},
    outgoing::Outgoing,
    pace::{Cap, Pacer},
    report::{Counters, Figures},
    stream::{Sink, StreamParser, PAGE_SIZE},
    wire::FrameReader,
};

/// Source settings.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub vm: String,
    /// The VM's NAS exports (NBD export names); lookups never leave them (plus shared ones).
    pub exports: Vec<String>,
    /// The NAS NBD address the target should read from.
    pub nas_nbd: String,
    /// The index service; `None` sends every page in full.
    pub nas_index: Option<Endpoint>,
    /// Where the target agent delivers the stream (`tcp:HOST:PORT` or `unix:PATH`).
    pub incoming: String,
    /// When to compress non-mapped data on the link (see [`super::compress`]).
    pub zstd: Compression,
    pub hot_replica: bool,
    /// Lookups in flight at once (each covers one read of up to 1 MiB from QEMU).
    pub lookup_window: usize,
    pub unacked_pages: usize,
    /// Bytes of QEMU's stream allowed in flight ahead of the target's acknowledgement.
    pub link_window: u64,
    /// Bytes on the agent link allowed in flight ahead of the target's acknowledgement.
    pub wire_window: u64,
    /// Rewrite pages (the product); `false` forwards QEMU's bytes verbatim (`--passthrough`).
    pub rewrite: bool,
    /// Also write QEMU's exact stream to this file (for verification).
    pub record: Option<std::path::PathBuf>,
    pub dedup_capacity: usize,
    /// The migration's bandwidth cap, paced on the link until the switchover (see
    /// [`super::pace`]); it may change while the migration runs.
    pub link_cap: Arc<Cap>,
}

impl SourceConfig {
    pub fn new(vm: &str, exports: Vec<String>, nas_nbd: &str, nas_index: Option<Endpoint>) -> Self {
        Self {
            vm: vm.to_string(),
            exports,
            nas_nbd: nas_nbd.to_string(),
            nas_index,
            incoming: String::new(),
            zstd: Compression::Auto,
            hot_replica: true,
            lookup_window: 8,
            unacked_pages: 16_384,
            link_window: 16 << 20,
            wire_window: 2 << 20,
            rewrite: true,
            record: None,
            dedup_capacity: super::dedup::DEFAULT_CAPACITY,
            link_cap: Arc::new(Cap::default()),
        }
    }
}

/// Why the source side failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading QEMU's migration stream failed: {0}")]
    Qemu(std::io::Error),
    #[error("agent link failed: {0}")]
    Link(String),
    #[error("the target agent refused: {0}")]
    Refused(String),
    #[error("the target agent reported failure: {0}")]
    TargetFailed(String),
    #[error("index service: {0}")]
    Index(#[from] IndexClientError),
}

/// Outcome of the source side.
#[derive(Clone, Debug, Default)]
pub struct SourceReport {
    pub source: Figures,
    pub target: Figures,
    pub passthrough_reason: Option<String>,
}

impl SourceReport {
    /// The migration's figures: the source's, with what only the target knows (NAS bytes it
    /// fetched, the fallbacks it asked for, its fetch time).
    pub fn figures(&self) -> Figures {
        Figures {
            nas_bytes: self.target.nas_bytes,
            fallbacks: self.target.fallbacks,
            fetch_ms: self.target.fetch_ms,
            ..self.source
        }
    }
}

/// Mapped pages awaiting the target's acknowledgement, bounded. Sequence numbers are given
/// out in order and acknowledged as a prefix, so a queue ordered by them is enough. A page is
/// kept without a copy, as a share of the read buffer it arrived in; a buffer goes back to the
/// reader once neither the emitter nor this store holds it. Bounded twice: in pages
/// (`unacked_pages`) and in read buffers held ([`KEPT_READS`]).
struct Unacked {
    store: Mutex<Store>,
    freed: Notify,
    capacity: usize,
    spare: mpsc::Sender<Vec<u8>>,
    /// No ACK will come any more: a full store stops waiting (the session is failing).
    closed: AtomicBool,
}

#[derive(Default)]
struct Store {
    pages: VecDeque<(u64, Kept)>,
    /// Distinct read buffers the pages share. The pages of one buffer are adjacent in the
    /// queue (they are emitted read by read).
    reads: usize,
}

/// A kept page.
enum Kept {
    /// In a read buffer, at an offset.
    Shared { read: Arc<Vec<u8>>, offset: usize },
    /// Copied: a page that straddled two reads.
    Own(Box<[u8; PAGE_SIZE]>),
}

impl Kept {
    fn read(&self) -> Option<&Arc<Vec<u8>>> {
        match self {
            Kept::Shared { read, .. } => Some(read),
            Kept::Own(_) => None,
        }
    }

    fn bytes(&self) -> &[u8; PAGE_SIZE] {
        match self {
            Kept::Shared { read, offset } => read[*offset..*offset + PAGE_SIZE]
                .try_into()
                .expect("a page is PAGE_SIZE bytes"),
            Kept::Own(page) => page,
        }
    }
}

/// Read buffers (of up to [`READ_SIZE`] and a page) the store may hold at once: 64 MiB.
const KEPT_READS: usize = 256;

/// Hands a read buffer back to the reader if nobody else holds it.
fn recycle(read: Arc<Vec<u8>>, spare: &mpsc::Sender<Vec<u8>>) {
    if let Ok(buf) = Arc::try_unwrap(read) {
        let _ = spare.try_send(buf);
    }
}

fn same_read(a: Option<&Arc<Vec<u8>>>, b: Option<&Arc<Vec<u8>>>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
}

impl Unacked {
    fn new(capacity: usize, spare: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            store: Mutex::new(Store::default()),
            freed: Notify::new(),
            capacity: capacity.max(1),
            spare,
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps page `seq`, waiting while the store is full (unless it is closed).
    async fn keep(&self, seq: u64, mut page: Kept) {
        loop {
            let freed = self.freed.notified();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match self.try_keep(seq, page) {
                Ok(()) => return,
                Err(back) => page = back,
            }
            freed.await;
        }
    }

    /// Keeps page `seq` if there is room; hands it back if the store is full.
    fn try_keep(&self, seq: u64, page: Kept) -> Result<(), Kept> {
        let mut store = self.lock();
        if store.full(self.capacity) {
            return Err(page);
        }
        let last = store.pages.back().and_then(|(_, k)| k.read());
        if page.read().is_some() && !same_read(last, page.read()) {
            store.reads += 1;
        }
        store.pages.push_back((seq, page));
        Ok(())
    }

    /// No ACK will come any more: wake a waiting `keep`.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.freed.notify_waiters();
    }

    /// The target holds the first `mapped` pages: let them go.
    fn ack(&self, mapped: u64) {
        let mut released = Vec::new();
        let mut store = self.lock();
        let before = store.pages.len();
        while store.pages.front().is_some_and(|(seq, _)| *seq < mapped) {
            let (_, page) = store.pages.pop_front().expect("front exists");
            if let Kept::Shared { read, .. } = page {
                let next = store.pages.front().and_then(|(_, k)| k.read());
                if !same_read(Some(&read), next) {
                    store.reads -= 1;
                    released.push(read);
                }
            }
        }
        let freed = store.pages.len() != before;
        drop(store);
        for read in released {
            recycle(read, &self.spare);
        }
        if freed {
            self.freed.notify_waiters();
        }
    }

    fn get(&self, seq: u64) -> Option<Box<[u8; PAGE_SIZE]>> {
        let store = self.lock();
        let i = store.pages.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(Box::new(*store.pages[i].1.bytes()))
    }
}

impl Store {
    fn full(&self, capacity: usize) -> bool {
        self.pages.len() >= capacity || self.reads >= KEPT_READS
    }
}

/// Link flow control. Everything in flight is backlog the source QEMU's final iteration (its
/// downtime) waits behind, so it is bounded twice: at most `window` bytes of QEMU's stream
/// ahead of what the target has delivered to its QEMU (a 57-byte MAPPED frame still costs the
/// target a 4 KiB fetch), and at most `wire_window` bytes of link frames (a backlog of whole
/// pages costs link time). ACKs carry stream credit; the emitter maps it to link bytes through
/// its flush checkpoints.
struct Flow {
    acked: AtomicU64,
    /// Stream bytes framed so far: no honest ACK carries more credit.
    framed: AtomicU64,
    /// Why the back channel ended early, if it did: no ACK will come any more.
    failed: OnceLock<String>,
    moved: Notify,
    window: u64,
    wire_window: u64,
    /// Link bytes the target has read, as its latest ACK says, when it reports them
    /// ([`CAP_RECEIVED`]); advisory: it only steers compression.
    received: Option<AtomicU64>,
}

/// Whether the link holds the stream up, rather than the target: of the link bytes sent and
/// not yet delivered to the target QEMU (`sent - delivered`), at least as many are still on
/// their way (`sent - received`) as wait at the target (`received - delivered`).
fn link_holds_up(sent: u64, received: u64, delivered: u64) -> bool {
    sent.saturating_sub(received) >= received.saturating_sub(delivered)
}

/// Where a page's payload is: in the batch's read buffer, or (for a page that straddled two
/// reads) in its side buffer.
#[derive(Clone, Copy)]
enum At {
    Input(usize),
    Side(usize),
}

enum Item {
    /// Verbatim bytes, a range of the batch's side buffer.
    Raw(std::ops::Range<usize>),
    Page {
        hash: Hash,
        at: At,
        found: Option<Found>,
        needs_lookup: bool,
    },
}

/// Collects parser output into items; [`Collector::finish`] then hashes the read's pages
/// together. Payloads are referred to, not copied, wherever they lie whole in the read.
struct Collector<'a> {
    items: Vec<Item>,
    side: Vec<u8>,
    counters: &'a Counters,
    replica: Option<&'a Mutex<HotReplica>>,
    remote: bool,
}

impl Collector<'_> {
    fn add_page(&mut self, at: At) {
        self.items.push(Item::Page {
            hash: [0; 32],
            at,
            needs_lookup: false,
            found: None,
        });
    }

    /// Hashes every page of the read (several per SIMD pass), then resolves what the hot-set
    /// replica knows and marks the rest for a lookup.
    fn finish(mut self, input: Vec<u8>) -> Batch {
        let started = Instant::now();
        let mut hashes = Vec::new();
        {
            let pages: Vec<&[u8; PAGE_SIZE]> = self
                .items
                .iter()
                .filter_map(|item| match item {
                    Item::Page { at, .. } => Some(page_at(&input, &self.side, *at)),
                    Item::Raw(_) => None,
                })
                .collect();
            hash_blocks(&pages, &mut hashes);
        }
        Counters::add(&self.counters.hash_ns, started.elapsed().as_nanos() as u64);
        Counters::add(&self.counters.pages_full, hashes.len() as u64);
        let mut places = Vec::with_capacity(hashes.len());
        match self.replica.filter(|_| !hashes.is_empty()) {
            Some(replica) => replica
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_many(&hashes, &mut places),
            None => places.resize(hashes.len(), None),
        }
        let mut resolved = hashes.into_iter().zip(places);
        for item in &mut self.items {
            if let Item::Page {
                hash,
                found,
                needs_lookup,
                ..
            } = item
            {
                (*hash, *found) = resolved.next().expect("one digest per page");
                *needs_lookup = found.is_none() && self.remote;
            }
        }
        Batch {
            input: Arc::new(input),
            side: self.side,
            items: self.items,
            lookup: None,
        }
    }
}

impl Sink for Collector<'_> {
    fn verbatim(&mut self, bytes: &[u8]) {
        let start = self.side.len();
        self.side.extend_from_slice(bytes);
        match self.items.last_mut() {
            Some(Item::Raw(range)) if range.end == start => range.end = self.side.len(),
            _ => self.items.push(Item::Raw(start..self.side.len())),
        }
    }

    fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
        let at = At::Side(self.side.len());
        self.side.extend_from_slice(payload);
        self.add_page(at);
    }

    fn page_in_input(&mut self, offset: usize, _payload: &[u8; PAGE_SIZE]) {
        self.add_page(At::Input(offset));
    }
}

/// One read from QEMU and what the parser found in it.
struct Batch {
    /// Shared with the unacked store, which keeps mapped pages in place.
    input: Arc<Vec<u8>>,
    side: Vec<u8>,
    items: Vec<Item>,
    /// Lookup in flight: (request id, indexes of the items it answers).
    lookup: Option<(u32, Vec<usize>)>,
}

impl Batch {
    fn page(&self, at: At) -> &[u8; PAGE_SIZE] {
        page_at(&self.input, &self.side, at)
    }
}

fn page_at<'a>(input: &'a [u8], side: &'a [u8], at: At) -> &'a [u8; PAGE_SIZE] {
    let bytes = match at {
        At::Input(o) => &input[o..o + PAGE_SIZE],
        At::Side(o) => &side[o..o + PAGE_SIZE],
    };
    bytes.try_into().expect("a page is PAGE_SIZE bytes")
}

/// Turns resolved items into link frames, in order.
struct Emitter {
    /// Content already sent, by hash: the ordinal of the frame that carried it.
    cache: ContentCache<Hash, u64>,
    next_ordinal: u64,
    next_seq: u64,
    /// `None` when nothing is compressed.
    compress: Option<LinkCompressor>,
    /// Where read buffers go back to the reader, when a batch lets go of its pages.
    spare: mpsc::Sender<Vec<u8>>,
    /// Frames not yet handed to the writer; whole pages in them are shares of read buffers.
    pending: Outgoing,
    /// Batches the writer has sent, back for reuse.
    spent: mpsc::Receiver<Outgoing>,
    out: mpsc::Sender<Outgoing>,
    unacked: Arc<Unacked>,
    flow: Arc<Flow>,
    /// Stream bytes framed so far.
    sent: u64,
    /// Link bytes handed to the writer so far.
    wire_sent: u64,
    /// Link bytes the target has consumed, as far as its ACKs tell.
    wire_acked: u64,
    /// Per flush not yet acknowledged: (stream bytes, link bytes) sent up to and with it.
    checkpoints: VecDeque<(u64, u64)>,
    counters: Arc<Counters>,
    /// Pages of the read being emitted, by kind, not yet added to `counters`.
    tally: Tally,
    export_ids: Vec<u32>,
}

#[derive(Default)]
struct Tally {
    dup: u64,
    mapped: u64,
    sent: u64,
}

const ZSTD_BATCH: usize = 256 << 10;
/// Flush checkpoints kept for mapping ACK credit to link bytes.
const MAX_CHECKPOINTS: usize = 4096;
/// Bytes asked of QEMU per read. Small enough that the reads queued in the source (the
/// backlog the rest of the stream finds when QEMU stops the guest, which then crosses the link
/// inside the guest's pause) stay a few MiB; large enough that a lookup covers 64 pages.
const READ_SIZE: usize = 256 << 10;
/// Resolved batches (reads) queued for the emitter.
const EMIT_QUEUE: usize = 2;
/// The kernel receive buffer for QEMU's connection (see [`Bound::set_recv_buffer`]): without
/// a cap it grows to several MiB, all of it backlog when QEMU stops the guest.
///
/// [`Bound::set_recv_buffer`]: nas_proto::net::Bound::set_recv_buffer
pub const QEMU_RECV_BUFFER: usize = 256 << 10;
/// Reads held while their lookups are answered: with the emitter queue and the link window,
/// all the backlog the source QEMU's final iteration can find ahead of it.
const MAX_BATCHES: usize = 16;

impl Emitter {
    /// Emits every item of `batch`, in order.
    async fn batch(&mut self, batch: &Batch) -> Result<(), SourceError> {
        for item in &batch.items {
            match item {
                Item::Raw(range) => {
                    self.wait_window().await?;
                    let raw = &batch.side[range.clone()];
                    self.encoded(raw.len(), |out| link::encode_raw(out, raw))
                        .await?;
                }
                Item::Page {
                    hash, at, found, ..
                } => self.page(hash, batch, *at, *found).await?,
            }
        }
        // Counted per read, not per page: the counters are shared atomics.
        let tally = std::mem::take(&mut self.tally);
        Counters::add(&self.counters.pages_dup, tally.dup);
        Counters::add(&self.counters.pages_mapped, tally.mapped);
        Counters::add(&self.counters.pages_sent, tally.sent);
        Ok(())
    }

    async fn page(
        &mut self,
        hash: &Hash,
        batch: &Batch,
        at: At,
        found: Option<Found>,
    ) -> Result<(), SourceError> {
        let data = batch.page(at);
        if let Some(&ordinal) = self.cache.touch(hash) {
            self.tally.dup += 1;
            return self.frame(PAGE_SIZE, &LinkFrame::Dup { ordinal }).await;
        }
        self.cache.insert(*hash, self.next_ordinal);
        self.next_ordinal += 1;
        match found.filter(|f| self.export_ids.contains(&f.export)) {
            Some(f) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let kept = match at {
                    At::Input(offset) => Kept::Shared {
                        read: batch.input.clone(),
                        offset,
                    },
                    At::Side(_) => Kept::Own(Box::new(*data)),
                };
                if let Err(kept) = self.unacked.try_keep(seq, kept) {
                    // Full. The target can only ack what it has received.
                    self.flush().await?;
                    self.unacked.keep(seq, kept).await;
                }
                self.tally.mapped += 1;
                self.frame(
                    PAGE_SIZE,
                    &LinkFrame::Mapped {
                        seq,
                        export: f.export,
                        offset: f.offset,
                        hash: *hash,
                    },
                )
                .await
            }
            None => {
                self.tally.sent += 1;
                self.wait_window().await?;
                match at {
                    At::Input(offset) => {
                        link::encode_page_header(self.pending.bytes_mut());
                        self.pending.push_page(&batch.input, offset);
                        self.encoded(PAGE_SIZE, |_| ()).await
                    }
                    _ => {
                        self.encoded(PAGE_SIZE, |out| link::encode_page(out, data))
                            .await
                    }
                }
            }
        }
    }

    /// Waits until the link window has room for another frame.
    async fn wait_window(&mut self) -> Result<(), SourceError> {
        // Nearly always open: checked first without arming a wake-up.
        if self.window_open()? {
            return Ok(());
        }
        let flow = self.flow.clone();
        loop {
            // Armed before the check, so an ACK landing in between still wakes this.
            let moved = flow.moved.notified();
            if self.window_open()? {
                return Ok(());
            }
            // Whatever is batched must go out first, or the target can never ack it.
            self.flush().await?;
            let held = Instant::now();
            moved.await;
            self.held_up_since(held);
        }
    }

    /// Banks the time since `held` as time the link held the stream up: compression may spend
    /// it. Not when the bytes waited on had already crossed and wait at the target (for its
    /// QEMU or the NAS): compressing would not make them go faster.
    fn held_up_since(&mut self, held: Instant) {
        if self.compress.is_none() {
            return;
        }
        self.take_acks();
        let crossing = match &self.flow.received {
            // No report yet (a report counts at least the HELLO): unknown, so not banked.
            Some(received) => match received.load(Ordering::Acquire) {
                0 => false,
                r => link_holds_up(self.wire_sent, r, self.wire_acked),
            },
            // An older target does not say: take the wait as the link's.
            None => true,
        };
        if let (true, Some(c)) = (crossing, &mut self.compress) {
            c.held_up(held.elapsed());
        }
    }

    /// Takes in the ACKs that arrived: moves `wire_acked` up to the newest checkpoint they
    /// cover. Returns the stream bytes acknowledged.
    fn take_acks(&mut self) -> u64 {
        let acked = self.flow.acked.load(Ordering::Acquire);
        while let Some(&(stream, wire)) = self.checkpoints.front() {
            if stream > acked {
                break;
            }
            self.wire_acked = wire;
            self.checkpoints.pop_front();
        }
        acked
    }

    /// Takes in the ACKs that arrived; whether another frame fits the link window now.
    fn window_open(&mut self) -> Result<bool, SourceError> {
        if let Some(why) = self.flow.failed.get() {
            return Err(SourceError::Link(why.clone()));
        }
        let acked = self.take_acks();
        let flow = &*self.flow;
        // Never more than sent: the back channel refuses such an ACK.
        let stream_ahead = self.sent.saturating_sub(acked);
        let wire_ahead = self.wire_sent + self.pending.len() as u64 - self.wire_acked;
        // Below two ACK steps of stream the target may not ack again: never wait there.
        Ok(stream_ahead <= flow.window
            && (wire_ahead <= flow.wire_window || stream_ahead < 2 * link::ACK_STEP))
    }

    /// Appends one frame written by `encode`, which stands for `stream_bytes` of QEMU's
    /// stream: those count against the window.
    async fn encoded(
        &mut self,
        stream_bytes: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), SourceError> {
        encode(self.pending.bytes_mut());
        self.sent += stream_bytes as u64;
        self.flow.framed.store(self.sent, Ordering::Release);
        // Frames go out in batches (one channel hand-off and one write per batch, not per
        // page); the main loop also flushes whenever it has emitted what it can.
        if self.pending.len() >= ZSTD_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn frame(&mut self, stream_bytes: usize, frame: &LinkFrame) -> Result<(), SourceError> {
        self.wait_window().await?;
        self.encoded(stream_bytes, |out| frame.encode(out)).await
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // The next batch goes into a buffer the writer has finished with, if there is one.
        let next = self
            .spent
            .try_recv()
            .unwrap_or_else(|_| Outgoing::with_capacity(ZSTD_BATCH + 2 * PAGE_SIZE));
        let mut bytes = std::mem::replace(&mut self.pending, next);
        if let Some(compress) = &mut self.compress {
            let spare = &self.spare;
            let raw = bytes.len() as u64;
            if compress
                .apply(&mut bytes, |read| recycle(read, spare))
                .map_err(|e| SourceError::Link(e.to_string()))?
            {
                Counters::add(&self.counters.zstd_in_bytes, raw);
                Counters::add(&self.counters.zstd_out_bytes, bytes.len() as u64);
            }
        }
        self.wire_sent += bytes.len() as u64;
        let point = (self.sent, self.wire_sent);
        if self.checkpoints.len() >= MAX_CHECKPOINTS {
            // Bounded: past the cap a flush joins the newest checkpoint (acked a little later).
            *self.checkpoints.back_mut().expect("at the cap, not empty") = point;
        } else {
            self.checkpoints.push_back(point);
        }
        let stopped = || SourceError::Link("the link writer stopped".into());
        match self.out.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(stopped()),
            Err(mpsc::error::TrySendError::Full(bytes)) => {
                // The writer is behind: the link holds the stream up here too.
                let held = Instant::now();
                self.out.send(bytes).await.map_err(|_| stopped())?;
                self.held_up_since(held);
                Ok(())
            }
        }
    }
}

/// Frames and sends resolved batches in order until the reader is done; hands the emitter
/// back for the END frame.
async fn emit_loop(
    mut emitter: Emitter,
    mut batches: mpsc::Receiver<Batch>,
) -> Result<Emitter, SourceError> {
    while let Some(batch) = batches.recv().await {
        emitter.batch(&batch).await?;
        recycle(batch.input, &emitter.spare);
        if batches.is_empty() {
            emitter.flush().await?;
        }
    }
    Ok(emitter)
}

/// Runs the source side: reads `qemu` to its end, drives `link`, and returns once the target
/// reports that it delivered everything.
pub async fn run_source<Q, L>(
    mut qemu: Q,
    link: L,
    config: SourceConfig,
    counters: Arc<Counters>,
) -> Result<SourceReport, SourceError>
where
    Q: AsyncRead + Unpin,
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    // Index service: the lookup session, and a second one streaming the hot set.
    let mut index = match &config.nas_index {
        Some(addr) => Some(IndexClient::connect(addr, &config.exports).await?),
        None => None,
    };
    let scope: Vec<(u32, String)> = index
        .as_ref()
        .map(|c| c.scope().iter().map(|e| (e.id, e.name.clone())).collect())
        .unwrap_or_default();
    let replica = Arc::new(Mutex::new(HotReplica::default()));
    let hot_task = match (&config.nas_index, config.hot_replica) {
        (Some(addr), true) => Some(tokio::spawn(follow_hot_set(
            addr.clone(),
            config.exports.clone(),
            replica.clone(),
        ))),
        _ => None,
    };

    let (mut link_rd, mut link_wr) = tokio::io::split(link);
    let hello = LinkFrame::Hello(Hello {
        version: VERSION,
        vm: config.vm.clone(),
        exports: scope.clone(),
        nas: config.nas_nbd.clone(),
        incoming: config.incoming.clone(),
        caps: if config.zstd == Compression::Never {
            0
        } else {
            CAP_ZSTD | CAP_RECEIVED
        },
    });
    link_wr
        .write_all(&hello.to_bytes())
        .await
        .map_err(|e| SourceError::Link(e.to_string()))?;
    let mut frames = FrameReader::new();
    let ack = tokio::time::timeout(Duration::from_secs(30), frames.next(&mut link_rd))
        .await
        .map_err(|_| SourceError::Link("no HELLO_ACK within 30 s".into()))?
        .map_err(SourceError::Link)?;
    let caps = match ack {
        Some(LinkFrame::HelloAck { caps, .. }) => caps,
        Some(LinkFrame::Error { message }) => return Err(SourceError::Refused(message)),
        other => {
            return Err(SourceError::Link(format!(
                "expected HELLO_ACK, got {other:?}"
            )))
        }
    };

    // Read buffers come back to the reader for reuse, from whoever held them last: the
    // emitter, the link writer or the unacked store.
    let (spare_tx, mut spare_rx) = mpsc::channel::<Vec<u8>>(MAX_BATCHES);
    // Writer: urgent fallback data first, then the stream.
    let (data_tx, mut data_rx) = mpsc::channel::<Outgoing>(32);
    let (spent_tx, spent_rx) = mpsc::channel::<Outgoing>(32);
    let (urgent_tx, mut urgent_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer_counters = counters.clone();
    let writer_spare = spare_tx.clone();
    // Set by the reader once the stream reaches the switchover: the cap no longer applies.
    let switched_over = Arc::new(AtomicBool::new(false));
    let writer_switched_over = switched_over.clone();
    let link_cap = config.link_cap.clone();
    let writer = tokio::spawn(async move {
        let mut pacer = Pacer::default();
        loop {
            let mut batch = tokio::select! {
                biased;
                Some(b) = urgent_rx.recv() => Outgoing::from(b),
                b = data_rx.recv() => match b { Some(b) => b, None => break },
            };
            let cap = link_cap
                .get()
                .filter(|_| !writer_switched_over.load(Ordering::Relaxed));
            pacer.pace(batch.len(), cap).await;
            Counters::add(&writer_counters.link_bytes, batch.len() as u64);
            batch.write_to(&mut link_wr).await?;
            batch.clear(|read| recycle(read, &writer_spare));
            let _ = spent_tx.try_send(batch);
        }
        // Fallback answers may still be needed after the stream ended.
        while let Some(b) = urgent_rx.recv().await {
            Counters::add(&writer_counters.link_bytes, b.len() as u64);
            link_wr.write_all(&b).await?;
        }
        link_wr.flush().await?;
        Ok::<_, std::io::Error>(link_wr)
    });

    let unacked = Arc::new(Unacked::new(config.unacked_pages, spare_tx.clone()));
    let flow = Arc::new(Flow {
        acked: AtomicU64::new(0),
        framed: AtomicU64::new(0),
        failed: OnceLock::new(),
        moved: Notify::new(),
        window: config.link_window,
        wire_window: config.wire_window,
        received: (caps & CAP_RECEIVED != 0).then(|| AtomicU64::new(0)),
    });
    // Back channel: acks, fallback requests, the final DONE.
    let back_unacked = unacked.clone();
    let back_flow = flow.clone();
    let back_counters = counters.clone();
    let back = tokio::spawn(async move {
        let outcome = async {
            loop {
                match frames.next(&mut link_rd).await {
                    Ok(Some(LinkFrame::Ack {
                        mapped,
                        credit,
                        received,
                    })) => {
                        let framed = back_flow.framed.load(Ordering::Acquire);
                        if credit > framed {
                            return Err(format!(
                                "target acknowledged {credit} stream bytes; {framed} were sent"
                            ));
                        }
                        match (&back_flow.received, received) {
                            (Some(bytes), Some(r)) => {
                                bytes.fetch_max(r, Ordering::AcqRel);
                            }
                            (None, Some(_)) => {
                                return Err("target reported link bytes read without \
                                            CAP_RECEIVED"
                                    .into())
                            }
                            _ => {}
                        }
                        back_unacked.ack(mapped);
                        back_flow.acked.fetch_max(credit, Ordering::AcqRel);
                        back_flow.moved.notify_waiters();
                    }
                    Ok(Some(LinkFrame::FallbackReq { seq })) => {
                        Counters::add(&back_counters.fallbacks, 1);
                        let Some(page) = back_unacked.get(seq) else {
                            return Err(format!("target asked for unknown page {seq}"));
                        };
                        let frame = LinkFrame::FallbackData { seq, page }.to_bytes();
                        if urgent_tx.send(frame).await.is_err() {
                            return Err("link writer stopped".into());
                        }
                    }
                    Ok(Some(LinkFrame::Done { ok, stats })) => return Ok((ok, stats)),
                    Ok(Some(LinkFrame::Error { message })) => return Err(message),
                    Ok(Some(other)) => {
                        return Err(format!("unexpected frame from target: {other:?}"))
                    }
                    Ok(None) => return Err("target closed the link".into()),
                    Err(e) => return Err(e),
                }
            }
        }
        .await;
        // Ended early: nothing will ack again, so whatever waits for an ack must stop.
        if let Err(why) = &outcome {
            let _ = back_flow.failed.set(why.clone());
            back_flow.moved.notify_waiters();
            back_unacked.close();
        }
        outcome
    });

    let emitter = Emitter {
        cache: ContentCache::new(config.dedup_capacity),
        next_ordinal: 0,
        next_seq: 0,
        compress: match caps & CAP_ZSTD {
            0 => None,
            _ => LinkCompressor::new(config.zstd).map_err(|e| SourceError::Link(e.to_string()))?,
        },
        spare: spare_tx,
        pending: Outgoing::with_capacity(ZSTD_BATCH + 2 * PAGE_SIZE),
        spent: spent_rx,
        out: data_tx,
        unacked,
        flow,
        sent: 0,
        wire_sent: 0,
        wire_acked: 0,
        checkpoints: VecDeque::new(),
        counters: counters.clone(),
        tally: Tally::default(),
        export_ids: scope.iter().map(|(id, _)| *id).collect(),
    };
    // Framing and sending run in their own task, so reading and hashing QEMU's stream go on
    // (on another core, where there is one) while the link is busy; at most EMIT_QUEUE
    // resolved batches wait between the two.
    let (emit_tx, emit_rx) = mpsc::channel::<Batch>(EMIT_QUEUE);
    let emit_task = tokio::spawn(emit_loop(emitter, emit_rx));
    let mut parser = StreamParser::new();
    let mut batches: VecDeque<Batch> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut eof = false;
    let mut record = match &config.record {
        Some(path) => Some(
            tokio::fs::File::create(path)
                .await
                .map_err(SourceError::Qemu)?,
        ),
        None => None,
    };
    let result: Result<(), SourceError> = async {
        loop {
            // Hand every resolved batch at the front to the emitter, in order.
            while batches.front().is_some_and(|b| b.lookup.is_none()) {
                let batch = batches.pop_front().expect("front exists");
                if emit_tx.send(batch).await.is_err() {
                    // Its error is collected below.
                    return Ok(());
                }
            }
            if eof && batches.is_empty() {
                return Ok(());
            }
            let can_read = !eof && in_flight < config.lookup_window && batches.len() < MAX_BATCHES;
            tokio::select! {
                reply = async { index.as_mut().expect("in flight implies a client").recv().await },
                    if in_flight > 0 => {
                    match reply {
                        Ok(frame) => {
                            resolve(&mut batches, frame, &counters)?;
                            in_flight -= 1;
                        }
                        Err(e) => {
                            lose_index(&mut index, &mut batches, &e);
                            counters.lookups.end(in_flight);
                            in_flight = 0;
                        }
                    }
                }
                n = async {
                    let mut input = spare_rx.try_recv().unwrap_or_default();
                    input.clear();
                    input.reserve(READ_SIZE);
                    (qemu.read_buf(&mut input).await, input)
                }, if can_read => {
                    let (n, input) = n;
                    let n = n.map_err(SourceError::Qemu)?;
                    if n == 0 {
                        eof = true;
                        if config.rewrite {
                            // A stream QEMU ended mid-record: what the parser holds of it goes
                            // on too, so the target gets every byte QEMU sent.
                            let mut sink = Collector {
                                items: Vec::new(),
                                side: Vec::new(),
                                counters: &counters,
                                replica: None,
                                remote: false,
                            };
                            parser.finish(&mut sink);
                            if !sink.items.is_empty() {
                                batches.push_back(sink.finish(Vec::new()));
                            }
                        }
                        continue;
                    }
                    Counters::add(&counters.qemu_bytes, n as u64);
                    if let Some(file) = record.as_mut() {
                        file.write_all(&input).await.map_err(SourceError::Qemu)?;
                    }
                    let mut sink = Collector {
                        items: Vec::new(),
                        side: Vec::new(),
                        counters: &counters,
                        replica: config.hot_replica.then_some(&*replica),
                        remote: index.is_some() && !parser.in_final_ram_section(),
                    };
                    if config.rewrite {
                        parser.feed(&input, &mut sink);
                        if parser.switched_over() && !switched_over.swap(true, Ordering::Relaxed) {
                            counters.switched_over();
                        }
                    } else {
                        sink.verbatim(&input);
                    }
                    let mut batch = sink.finish(input);
                    if let Some(client) = index.as_mut() {
                        // One lookup per read: at most ~256 pages, well inside a LOOKUP.
                        let wanted: Vec<usize> = batch.items.iter().enumerate()
                            .filter(|(_, i)| matches!(i, Item::Page { needs_lookup: true, .. }))
                            .map(|(n, _)| n)
                            .collect();
                        if !wanted.is_empty() {
                            let hashes = wanted.iter().map(|&n| match &batch.items[n] {
                                Item::Page { hash, .. } => *hash,
                                Item::Raw(_) => unreachable!("only pages are looked up"),
                            }).collect();
                            match client.send_lookup(hashes).await {
                                Ok(id) => {
                                    batch.lookup = Some((id, wanted));
                                    in_flight += 1;
                                    counters.lookups.begin();
                                }
                                Err(e) => {
                                    lose_index(&mut index, &mut batches, &e);
                                    counters.lookups.end(in_flight);
                                    in_flight = 0;
                                }
                            }
                        }
                    }
                    batches.push_back(batch);
                }
            }
        }
    }
    .await;
    if let Some(t) = hot_task {
        t.abort();
    }
    drop(emit_tx);
    if let Err(e) = result {
        emit_task.abort();
        return Err(e);
    }
    // It ends once the queued batches are sent (or with the error that stopped it).
    let mut emitter = emit_task
        .await
        .map_err(|e| SourceError::Link(format!("emitter task: {e}")))??;
    if let Some(mut file) = record {
        file.flush().await.map_err(SourceError::Qemu)?;
    }
    let mut source = counters.snapshot();
    source.pages_zero = parser.stats().zero_pages;
    if let Some(reason) = parser.passthrough_reason() {
        tracing::info!("stream tail forwarded verbatim: {reason}");
    }
    emitter
        .frame(
            0,
            &LinkFrame::End {
                stats: serde_json::to_string(&source).expect("figures serialise"),
            },
        )
        .await?;
    emitter.flush().await?;
    drop(emitter);
    let (ok, stats) = back
        .await
        .map_err(|e| SourceError::Link(e.to_string()))?
        .map_err(SourceError::Link)?;
    let _ = writer.await;
    let target: Figures = serde_json::from_str(&stats).unwrap_or_default();
    if !ok {
        return Err(SourceError::TargetFailed(stats));
    }
    let mut source = counters.snapshot();
    source.pages_zero = parser.stats().zero_pages;
    Ok(SourceReport {
        source,
        target,
        passthrough_reason: parser.passthrough_reason().map(str::to_string),
    })
}

/// The index service went away: pages still waiting for an answer go in full, and no more
/// lookups are made. Only savings are lost; the stream stays exact.
fn lose_index(
    index: &mut Option<IndexClient>,
    batches: &mut VecDeque<Batch>,
    e: &IndexClientError,
) {
    tracing::warn!("index service lost ({e}); sending the remaining pages in full");
    *index = None;
    for b in batches.iter_mut() {
        b.lookup = None;
    }
}

/// Fills the front-most pending batch with a lookup reply (replies come in request order).
fn resolve(
    batches: &mut VecDeque<Batch>,
    reply: Frame,
    counters: &Counters,
) -> Result<(), SourceError> {
    let Frame::LookupReply { id, found } = reply else {
        return Err(SourceError::Link(format!(
            "unexpected index frame {reply:?}"
        )));
    };
    let batch = batches
        .iter_mut()
        .find(|b| b.lookup.is_some())
        .ok_or_else(|| SourceError::Link("lookup reply without a request".into()))?;
    let (want, indexes) = batch.lookup.take().expect("found above");
    if want != id || indexes.len() != found.len() {
        return Err(SourceError::Link(format!(
            "lookup reply {id} does not match request {want}"
        )));
    }
    counters.lookups.end(1);
    for (n, f) in indexes.into_iter().zip(found) {
        if let Item::Page { found, .. } = &mut batch.items[n] {
            *found = f;
        }
    }
    Ok(())
}

/// Keeps `replica` in step with the hot sets of `exports` until aborted. Failures only cost
/// savings (misses go to batched lookups), so they are logged, not fatal.
async fn follow_hot_set(addr: Endpoint, exports: Vec<String>, replica: Arc<Mutex<HotReplica>>) {
    let mut client = match IndexClient::connect(&addr, &exports).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("hot-set replica unavailable: {e}");
            return;
        }
    };
    if let Err(e) = client.subscribe_hot().await {
        tracing::warn!("hot-set subscription failed: {e}");
        return;
    }
    loop {
        match client.recv().await {
            Ok(frame) => {
                replica
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .apply(&frame);
            }
            Err(e) => {
                tracing::warn!("hot-set stream ended: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_the_links_when_more_is_crossing_than_waiting_at_the_target() {
        const MIB: u64 = 1 << 20;
        // 2 MiB out, the target read 0.5 MiB and delivered all of it: the link is slow.
        assert!(link_holds_up(
            10 * MIB,
            8 * MIB + MIB / 2,
            8 * MIB + MIB / 2
        ));
        // The target read all of it and delivered a quarter: it is slow (its QEMU, the NAS).
        assert!(!link_holds_up(10 * MIB, 10 * MIB, 8 * MIB + MIB / 2));
        // Half and half counts as the link's; stale or odd reports never underflow.
        assert!(link_holds_up(10 * MIB, 9 * MIB, 8 * MIB));
        assert!(link_holds_up(10 * MIB, 0, 8 * MIB));
        assert!(!link_holds_up(10 * MIB, 11 * MIB, 8 * MIB));
    }

    fn read(fill: u8, pages: usize) -> Arc<Vec<u8>> {
        let mut buf = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page.fill(fill.wrapping_add(i as u8));
        }
        Arc::new(buf)
    }

    #[tokio::test]
    async fn unacked_pages_stay_in_their_reads_until_acked() {
        let (spare_tx, mut spare_rx) = mpsc::channel(8);
        let store = Unacked::new(100, spare_tx);
        let (a, b) = (read(10, 3), read(50, 2));
        for (seq, (r, page)) in [(&a, 0), (&a, 2), (&b, 1)].into_iter().enumerate() {
            let kept = Kept::Shared {
                read: r.clone(),
                offset: page * PAGE_SIZE,
            };
            store.keep(seq as u64, kept).await;
        }
        store.keep(3, Kept::Own(Box::new([7; PAGE_SIZE]))).await;
        assert_eq!(store.lock().reads, 2);
        assert_eq!(store.get(1).unwrap()[..], [12; PAGE_SIZE][..]);
        assert_eq!(store.get(2).unwrap()[..], [51; PAGE_SIZE][..]);
        assert_eq!(store.get(3).unwrap()[..], [7; PAGE_SIZE][..]);
        assert!(store.get(4).is_none());

        // The emitter lets go of `a`; the store still holds two of its pages.
        drop(a);
        store.ack(1);
        assert_eq!(store.lock().reads, 2);
        assert!(spare_rx.try_recv().is_err());
        // Its last page acked: `a` goes back to the reader, whole.
        store.ack(2);
        assert_eq!(store.lock().reads, 1);
        let back = spare_rx.try_recv().expect("read buffer recycled");
        assert_eq!(back.len(), 3 * PAGE_SIZE);
        // `b` is still the emitter's: released by the store, not recycled by it.
        store.ack(4);
        assert_eq!(store.lock().reads, 0);
        assert!(store.lock().pages.is_empty());
        assert!(spare_rx.try_recv().is_err());
        assert_eq!(Arc::strong_count(&b), 1);
    }

    #[tokio::test]
    async fn unacked_store_is_bounded_in_reads() {
        let (spare_tx, _spare_rx) = mpsc::channel(8);
        let store = Arc::new(Unacked::new(10 * KEPT_READS, spare_tx));
        for seq in 0..KEPT_READS as u64 {
            let kept = Kept::Shared {
                read: read(1, 1),
                offset: 0,
            };
            store.keep(seq, kept).await;
        }
        let another = Kept::Shared {
            read: read(2, 1),
            offset: 0,
        };
        assert!(store.try_keep(KEPT_READS as u64, another).is_err());
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move {
                let kept = Kept::Shared {
                    read: read(2, 1),
                    offset: 0,
                };
                store.keep(KEPT_READS as u64, kept).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a full store took another read");
        store.ack(1);
        waiting.await.unwrap();
        assert_eq!(store.lock().reads, KEPT_READS);
    }

    /// 16 MiB of distinct pages in QEMU 10's layout.
    fn unique_stream() -> Vec<u8> {
        crate::migration::stream::synthetic::Builder::ram_stream(4096, |i| {
            let mut page = [0x33u8; PAGE_SIZE];
            page[..8].copy_from_slice(&i.to_le_bytes());
            page
        })
    }

    /// Runs the source against a target that greets, takes frames until the source nears its
    /// 2 MiB link window (it then waits for an ACK), sends `frame`, and keeps taking frames as
    /// a live target would. Returns how the source ended.
    async fn source_against(frame: LinkFrame) -> SourceError {
        use tokio::io::AsyncWriteExt;
        let stream = unique_stream();
        let (mut qemu_w, qemu_r) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = qemu_w.write_all(&stream).await;
        });
        let (source_link, target_link) = tokio::io::duplex(1 << 16);
        let config = SourceConfig::new("vm", vec![], "127.0.0.1:1", None);
        let source = tokio::spawn(run_source(
            qemu_r,
            source_link,
            config,
            Arc::new(Counters::default()),
        ));
        let (mut rd, mut wr) = tokio::io::split(target_link);
        let mut frames = FrameReader::new();
        let hello = frames.next(&mut rd).await.unwrap();
        assert!(matches!(hello, Some(LinkFrame::Hello(_))));
        let ack = LinkFrame::HelloAck {
            version: VERSION,
            caps: 0,
        };
        wr.write_all(&ack.to_bytes()).await.unwrap();
        let mut received = 0usize;
        while received < 3 << 19 {
            match frames.next(&mut rd).await.unwrap() {
                Some(LinkFrame::Page(_)) => received += PAGE_SIZE,
                Some(_) => {}
                None => panic!("the source closed the link early"),
            }
        }
        let drain =
            tokio::spawn(async move { while let Ok(Some(_)) = frames.next(&mut rd).await {} });
        tokio::time::sleep(Duration::from_millis(100)).await;
        wr.write_all(&frame.to_bytes()).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), source)
            .await
            .expect("the source stopped waiting for ACKs")
            .unwrap();
        drop(wr);
        drain.abort();
        outcome.expect_err("the session must end with an error")
    }

    #[tokio::test]
    async fn an_ack_beyond_what_was_sent_ends_the_session() {
        let err = source_against(LinkFrame::Ack {
            mapped: 0,
            credit: 1 << 40,
            received: None,
        })
        .await;
        assert!(err.to_string().contains("acknowledged"), "{err}");
    }

    #[tokio::test]
    async fn an_ack_with_a_received_count_nobody_agreed_on_ends_the_session() {
        // The HELLO_ACK above accepted no capability.
        let err = source_against(LinkFrame::Ack {
            mapped: 0,
            credit: 0,
            received: Some(1),
        })
        .await;
        assert!(err.to_string().contains("without CAP_RECEIVED"), "{err}");
    }

    #[tokio::test]
    async fn a_back_channel_failure_ends_a_source_waiting_for_acks() {
        // No page was mapped, so a fallback request is a protocol violation that ends the
        // back channel while the source waits for an ACK that will now never come.
        let err = source_against(LinkFrame::FallbackReq { seq: 999 }).await;
        assert!(err.to_string().contains("unknown page 999"), "{err}");
    }
}
