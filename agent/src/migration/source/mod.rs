//! The source side of the hook: QEMU's outgoing stream in, agent-link frames out.
//!
//! ```text
//! QEMU --bytes--> parser --pages--> blake3 --> hot-set replica hit?  -> MAPPED
//!                   |                          miss: batched LOOKUP  -> MAPPED / PAGE
//!                   +--verbatim--------------------------------------> RAW
//!                 (in stream order; DUP when the target's cache holds the content)
//! ```
//! A read's pages are hashed together, several per SIMD pass ([`blockhash::multi::hash_blocks`]).
//! Lookups for misses go out in batches, several batches in flight, so the stream never waits
//! a round trip per page. Pages in the final `ram` END section (sent while the guest is
//! paused) are never looked up remotely: a round trip there would add to downtime. Every
//! mapped page's content is kept (in place, in the read buffer it arrived in) until the target
//! acknowledges it, at most `unacked_pages` pages in at most `KEPT_READS` buffers; past that
//! the source stops reading QEMU (backpressure) until acks arrive. A FALLBACK_REQ is answered
//! from that store, ahead of normal traffic. Once the guest is paused, a read whose link did
//! not hold the stream up in the last [`flow::LINK_HELD_RECENTLY`] goes out as QEMU sent it
//! (its pages neither hashed nor matched): on a link that keeps up, a MAPPED page would only
//! add a NAS fetch to the pause. The link writer paces its writes to the
//! migration's bandwidth cap until the stream reaches the switchover ([`super::pace`]).
//!
//! Stages, each a module owning its channel ends:
//! - the reader (here, [`run_source`]): reads QEMU, feeds the parser, sends lookups;
//! - `collect`: one read's parser output as a batch, its pages hashed together;
//! - `lookup`: batched index lookups and the hot-set follower;
//! - `emit`: resolved batches as link frames, within the windows of `flow`;
//! - `writer`: the paced link writer, fallback answers first;
//! - `back`: ACKs, fallback requests and DONE from the target;
//! - `store`: the unacked pages a fallback may still need.
//!
//! ```text
//! QEMU -> reader -> collect -> lookup -> emit -> writer -> link
//!                                          ^                 |
//!                              flow/store  +------ back <----+
//! ```
mod back;
mod collect;
mod emit;
mod error;
mod flow;
mod lookup;
mod store;
mod window;
mod writer;

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use nas_client::index::{HotReplica, IndexClient};
use nas_client::tls::SharedTls;
use nas_proto::Endpoint;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

pub use self::error::{BackError, LinkFailure, SourceError};
use self::{
    collect::{Batch, Collector, Item},
    emit::{emit_loop, Emitter, Tally, ZSTD_BATCH},
    flow::{Flow, LINK_HELD_RECENTLY},
    lookup::{follow_hot_set, lose_index, resolve},
    store::Unacked,
    window::StreamWindow,
};
use super::{
    compress::{Compression, LinkCompressor},
    dedup::ContentCache,
    link::{Hello, LinkFrame, LinkStats, CAP_RECEIVED, CAP_ZSTD, VERSION},
    moments::Moment,
    outgoing::Outgoing,
    pace::Cap,
    pagemap::SharedMap,
    report::{Counters, Figures},
    savevm,
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
    /// TLS towards the index service, when it requires it.
    pub nas_tls: SharedTls,
    /// When to compress non-mapped data on the link (see [`super::compress`]).
    pub zstd: Compression,
    pub hot_replica: bool,
    /// Lookups in flight at once (each covers one read of up to 1 MiB from QEMU).
    pub lookup_window: usize,
    pub unacked_pages: usize,
    /// Bytes of QEMU's stream allowed in flight ahead of the target's acknowledgement, at
    /// most: the window is sized by time below that (the `window` module).
    pub stream_window_bytes: u64,
    /// Bytes on the agent link allowed in flight ahead of the target's acknowledgement.
    pub link_window_bytes: u64,
    /// Rewrite pages (the product); `false` forwards QEMU's bytes verbatim (`--passthrough`).
    pub rewrite: bool,
    /// Once the guest is paused, forward QEMU's pages as it sent them while the link keeps up
    /// (see the module's doc); `false` deduplicates them always (`--dedup-paused`).
    pub whole_when_paused: bool,
    /// Also write QEMU's exact stream to this file (for verification).
    pub record: Option<std::path::PathBuf>,
    pub dedup_capacity: usize,
    /// The migration's bandwidth cap, paced on the link until the switchover (see
    /// [`super::pace`]); it may change while the migration runs.
    pub link_cap: Arc<Cap>,
    /// The VM's memory-to-disk map, when the host daemon keeps one: pages it places (and
    /// whose hash still matches) go out MAPPED with no index round trip. With no index
    /// service, it is all that maps pages (map-only mode).
    pub page_map: Option<SharedMap>,
}

impl SourceConfig {
    pub fn new(vm: &str, exports: Vec<String>, nas_nbd: &str, nas_index: Option<Endpoint>) -> Self {
        Self {
            vm: vm.to_string(),
            exports,
            nas_nbd: nas_nbd.to_string(),
            nas_index,
            nas_tls: None,
            zstd: Compression::Auto,
            hot_replica: true,
            lookup_window: 8,
            unacked_pages: 16_384,
            stream_window_bytes: 16 << 20,
            link_window_bytes: 2 << 20,
            rewrite: true,
            whole_when_paused: true,
            record: None,
            dedup_capacity: super::dedup::DEFAULT_CAPACITY,
            link_cap: Arc::new(Cap::default()),
            page_map: None,
        }
    }
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

/// Runs the source side: reads `qemu` to its end, drives `link`, and returns once the target
/// reports that it delivered everything.
pub async fn run_source<Q, L>(
    qemu: Q,
    link: L,
    config: SourceConfig,
    counters: Arc<Counters>,
) -> Result<SourceReport, SourceError>
where
    Q: AsyncRead + Unpin,
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    // Nothing goes on to the target agent, not even HELLO, unless this is QEMU's stream.
    let mut qemu = savevm_header(qemu).await?;
    // Index service: the lookup session, and a second one streaming the hot set.
    let mut index = match &config.nas_index {
        Some(addr) => {
            Some(IndexClient::connect_with(addr, &config.exports, config.nas_tls.as_deref()).await?)
        }
        None => None,
    };
    // The exports MAPPED frames may name: the index service's scope; with no index but a
    // memory-to-disk map (map-only mode), the source's own exports, numbered in order.
    let scope: Vec<(u32, String)> = match (&index, &config.page_map) {
        (Some(c), _) => c.scope().iter().map(|e| (e.id, e.name.clone())).collect(),
        (None, Some(_)) => (0u32..).zip(config.exports.iter().cloned()).collect(),
        (None, None) => Vec::new(),
    };
    // The link id of each of the source's exports, for the map's claims.
    let map_ids: Vec<Option<u32>> = config
        .exports
        .iter()
        .map(|name| scope.iter().find(|(_, n)| n == name).map(|(id, _)| *id))
        .collect();
    let page_map = config
        .page_map
        .as_ref()
        .map(|m| (&*m.0, map_ids.as_slice()));
    let replica = Arc::new(Mutex::new(HotReplica::default()));
    let hot_task = match (&config.nas_index, config.hot_replica) {
        (Some(addr), true) => Some(tokio::spawn(follow_hot_set(
            addr.clone(),
            config.exports.clone(),
            replica.clone(),
            config.nas_tls.clone(),
        ))),
        _ => None,
    };

    let (mut link_rd, mut link_wr) = tokio::io::split(link);
    let hello = LinkFrame::Hello(Hello {
        version: VERSION,
        vm: config.vm.clone(),
        exports: scope.clone(),
        nas: config.nas_nbd.clone(),
        // The link bytes the target has read tell a slow link from a slow target: they steer
        // compression and the final iteration's form.
        caps: if config.zstd == Compression::Never {
            CAP_RECEIVED
        } else {
            CAP_ZSTD | CAP_RECEIVED
        },
    });
    link_wr
        .write_all(&hello.to_bytes())
        .await
        .map_err(LinkFailure::Write)?;
    link_wr.flush().await.map_err(LinkFailure::Write)?;
    let mut frames = FrameReader::new();
    let ack = tokio::time::timeout(Duration::from_secs(30), frames.next(&mut link_rd))
        .await
        .map_err(|_| LinkFailure::NoHelloAck)?
        .map_err(LinkFailure::Read)?;
    let caps = match ack {
        Some(LinkFrame::HelloAck { caps, .. }) => caps,
        Some(LinkFrame::Error { message }) => return Err(SourceError::Refused(message)),
        other => return Err(LinkFailure::Unexpected(format!("{other:?}")).into()),
    };

    // Read buffers come back to the reader for reuse, from whoever held them last: the
    // emitter, the link writer or the unacked store.
    let (spare_tx, mut spare_rx) = mpsc::channel::<Vec<u8>>(MAX_BATCHES);
    // Writer: urgent fallback data first, then the stream.
    let (data_tx, data_rx) = mpsc::channel::<Outgoing>(32);
    let (spent_tx, spent_rx) = mpsc::channel::<Outgoing>(32);
    let (urgent_tx, urgent_rx) = mpsc::channel::<Vec<u8>>(64);
    let flow = Arc::new(Flow::new(
        config.link_window_bytes,
        caps & CAP_RECEIVED != 0,
        config.link_cap.clone(),
    ));
    let writer = tokio::spawn(writer::write_loop(writer::Writer {
        link: link_wr,
        urgent: urgent_rx,
        data: data_rx,
        spent: spent_tx,
        spare: spare_tx.clone(),
        flow: flow.clone(),
        counters: counters.clone(),
    }));

    let unacked = Arc::new(Unacked::new(config.unacked_pages, spare_tx.clone()));
    // Back channel: acks, fallback requests, the final DONE.
    let back = tokio::spawn(back::back_channel(
        frames,
        link_rd,
        unacked.clone(),
        flow.clone(),
        counters.clone(),
        urgent_tx,
    ));

    let emitter = Emitter {
        cache: ContentCache::new(config.dedup_capacity),
        next_ordinal: 0,
        next_seq: 0,
        compress: match caps & CAP_ZSTD {
            0 => None,
            _ => LinkCompressor::new(config.zstd).map_err(LinkFailure::Compress)?,
        },
        spare: spare_tx,
        pending: Outgoing::with_capacity(ZSTD_BATCH + 2 * PAGE_SIZE),
        spent: spent_rx,
        out: data_tx,
        unacked,
        flow: flow.clone(),
        sent: 0,
        wire_sent: 0,
        wire_acked: 0,
        checkpoints: VecDeque::new(),
        window: StreamWindow::new(config.stream_window_bytes, std::time::Instant::now()),
        unpaced: false,
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
    let mut switched_over = false;
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
            // While the link is paced, no more read and not yet framed than it drains in a few
            // milliseconds: that backlog crosses at the cap once QEMU stops the guest.
            let paced_room = flow.paced_queue().is_none_or(|q| {
                counters
                    .qemu_bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(flow.framed.load(Ordering::Acquire))
                    < q
            });
            let can_read = !eof
                && paced_room
                && in_flight < config.lookup_window
                && batches.len() < MAX_BATCHES;
            tokio::select! {
                // The emitter stopped (its error is collected below): nothing frames what is
                // read any more, and nothing will wake a reader held to the paced queue.
                () = emit_tx.closed() => return Ok(()),
                () = flow.framed_moved.notified(), if !eof && !paced_room => {}
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
                        counters.marks.mark(Moment::QemuEof);
                        if config.rewrite {
                            // A stream QEMU ended mid-record: what the parser holds of it goes
                            // on too, so the target gets every byte QEMU sent.
                            let mut sink = Collector::new(&counters);
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
                    // The guest is paused: unless the link is what holds the stream up, pages go
                    // out as QEMU sent them (hashing them and fetching MAPPED ones from the NAS
                    // would only add to the pause).
                    let whole = switched_over
                        && config.whole_when_paused
                        && !flow.link_held_within(LINK_HELD_RECENTLY);
                    let mut sink = Collector {
                        replica: config.hot_replica.then_some(&*replica),
                        remote: index.is_some() && !parser.in_final_ram_section(),
                        map: page_map,
                        whole,
                        ..Collector::new(&counters)
                    };
                    if config.rewrite {
                        parser.feed(&input, &mut sink);
                        if let Some(at) = parser.switchover_at().filter(|_| !switched_over) {
                            switched_over = true;
                            counters.switched_over(at);
                            config.link_cap.lift();
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
    let mut emitter = emit_task.await.map_err(LinkFailure::EmitterTask)??;
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
                stats: LinkStats::from(&source),
            },
        )
        .await?;
    emitter.flush().await?;
    drop(emitter);
    let outcome = back
        .await
        .map_err(LinkFailure::BackTask)?
        .map_err(LinkFailure::Back)?;
    let _ = writer.await;
    let target = Figures::from(outcome.map_err(SourceError::TargetFailed)?);
    let mut source = counters.snapshot();
    source.pages_zero = parser.stats().zero_pages;
    Ok(SourceReport {
        source,
        target,
        passthrough_reason: parser.passthrough_reason().map(str::to_string),
    })
}

/// Reads and checks the stream's savevm header; returns the stream, header included.
async fn savevm_header<Q: AsyncRead + Unpin>(
    mut qemu: Q,
) -> Result<impl AsyncRead + Unpin, SourceError> {
    let mut header = [0u8; savevm::HEADER];
    let mut got = 0;
    while got < header.len() {
        let n = tokio::time::timeout(Duration::from_secs(30), qemu.read(&mut header[got..]))
            .await
            .map_err(|_| SourceError::NoHeader)?
            .map_err(SourceError::Qemu)?;
        if n == 0 {
            savevm::check(&header[..got])?;
            return Err(SourceError::NoHeader);
        }
        got += n;
        // Refused as soon as it is wrong, without waiting for the rest.
        savevm::check(&header[..got])?;
    }
    Ok(std::io::Cursor::new(header).chain(qemu))
}

#[cfg(test)]
mod tests;
