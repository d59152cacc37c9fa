//! The emit stage: resolved batches become link frames, in stream order (RAW, PAGE,
//! MAPPED, DUP, optionally zstd-compressed), within the stream and link windows.
use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use nas_proto::index::Found;
use tokio::sync::mpsc;

use super::{
    collect::{At, Batch, Item},
    flow::{link_holds_up, Flow},
    store::{recycle, Kept, Unacked},
    window::StreamWindow,
    LinkFailure, SourceError,
};
use crate::migration::{
    compress::LinkCompressor,
    dedup::ContentCache,
    link::{self, Hash, LinkFrame},
    outgoing::Outgoing,
    report::Counters,
    stream::PAGE_SIZE,
};

/// Turns resolved items into link frames, in order.
pub(super) struct Emitter {
    /// Content already sent, by hash: the ordinal of the frame that carried it.
    pub(super) cache: ContentCache<Hash, u64>,
    pub(super) next_ordinal: u64,
    pub(super) next_seq: u64,
    /// `None` when nothing is compressed.
    pub(super) compress: Option<LinkCompressor>,
    /// Where read buffers go back to the reader, when a batch lets go of its pages.
    pub(super) spare: mpsc::Sender<Vec<u8>>,
    /// Frames not yet handed to the writer; whole pages in them are shares of read buffers.
    pub(super) pending: Outgoing,
    /// Batches the writer has sent, back for reuse.
    pub(super) spent: mpsc::Receiver<Outgoing>,
    pub(super) out: mpsc::Sender<Outgoing>,
    pub(super) unacked: Arc<Unacked>,
    pub(super) flow: Arc<Flow>,
    /// Stream bytes framed so far.
    pub(super) sent: u64,
    /// Link bytes handed to the writer so far.
    pub(super) wire_sent: u64,
    /// Link bytes the target has consumed, as far as its ACKs tell.
    pub(super) wire_acked: u64,
    /// Per flush not yet acknowledged: (stream bytes, link bytes) sent up to and with it, and
    /// when.
    pub(super) checkpoints: VecDeque<(u64, u64, Instant)>,
    /// How much of the stream may be ahead of the target's acknowledgement.
    pub(super) window: StreamWindow,
    /// Whether the emitter has seen the link's cap off (or never on).
    pub(super) unpaced: bool,
    pub(super) counters: Arc<Counters>,
    /// Pages of the read being emitted, by kind, not yet added to `counters`.
    pub(super) tally: Tally,
    pub(super) export_ids: Vec<u32>,
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) dup: u64,
    pub(super) mapped: u64,
    pub(super) sent: u64,
    pub(super) map: u64,
}

pub(super) const ZSTD_BATCH: usize = 256 << 10;
/// Flush checkpoints kept for mapping ACK credit to link bytes.
pub(super) const MAX_CHECKPOINTS: usize = 4096;

impl Emitter {
    /// Emits every item of `batch`, in order.
    pub(super) async fn batch(&mut self, batch: &Batch) -> Result<(), SourceError> {
        for item in &batch.items {
            match item {
                Item::Raw(range) => {
                    self.wait_window().await?;
                    let raw = &batch.side[range.clone()];
                    self.encoded(raw.len(), |out| link::encode_raw(out, raw))
                        .await?;
                }
                Item::Page {
                    hash,
                    at,
                    found,
                    from_map,
                    ..
                } => self.page(hash, batch, *at, *found, *from_map).await?,
            }
        }
        // Counted per read, not per page: the counters are shared atomics.
        let tally = std::mem::take(&mut self.tally);
        Counters::add(&self.counters.pages_dup, tally.dup);
        Counters::add(&self.counters.pages_mapped, tally.mapped);
        Counters::add(&self.counters.pages_map, tally.map);
        Counters::add(&self.counters.pages_sent, tally.sent);
        Ok(())
    }

    pub(super) async fn page(
        &mut self,
        hash: &Hash,
        batch: &Batch,
        at: At,
        found: Option<Found>,
        from_map: bool,
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
                self.tally.map += u64::from(from_map);
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
    pub(super) async fn wait_window(&mut self) -> Result<(), SourceError> {
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
    /// it, and the reader keeps deduplicating the final iteration ([`Flow::link_held`]). Not
    /// when the bytes waited on had already crossed and wait at the target (for its QEMU or
    /// the NAS): compressing or deduplicating would not make them go faster.
    pub(super) fn held_up_since(&mut self, held: Instant) {
        self.take_acks();
        let crossing = match &self.flow.received {
            // No report yet (a report counts at least the HELLO): unknown, so not banked.
            Some(received) => match received.load(Ordering::Acquire) {
                0 => false,
                // Not yet at the target: what had been written when the report came and it
                // had not read (bytes written since say nothing of where the earlier ones
                // were), and what still waits here for the link (its pacer or its socket).
                r => {
                    let at_ack = self.flow.written_at_ack.load(Ordering::Acquire).max(r);
                    let written = self.counters.link_bytes.load(Ordering::Relaxed);
                    let queued = self.wire_sent.saturating_sub(written);
                    link_holds_up(at_ack + queued, r, self.wire_acked)
                }
            },
            // An older target does not say: take the wait as the link's.
            None => true,
        };
        if !crossing {
            return;
        }
        self.flow.link_held();
        if let Some(c) = &mut self.compress {
            c.held_up(held.elapsed());
        }
    }

    /// Takes in the ACKs that arrived: moves `wire_acked` up to the newest checkpoint they
    /// cover. Returns the stream bytes acknowledged.
    pub(super) fn take_acks(&mut self) -> u64 {
        let acked = self.flow.acked.load(Ordering::Acquire);
        let now = Instant::now();
        while let Some(&(stream, wire, sent)) = self.checkpoints.front() {
            if stream > acked {
                break;
            }
            self.wire_acked = wire;
            self.window.delay(sent, now);
            self.checkpoints.pop_front();
        }
        self.window.acked(now, acked);
        acked
    }

    /// Takes in the ACKs that arrived; whether another frame fits the link window now.
    pub(super) fn window_open(&mut self) -> Result<bool, SourceError> {
        if let Some(why) = self.flow.failed.get() {
            return Err(LinkFailure::Back(why.clone()).into());
        }
        let acked = self.take_acks();
        let flow = &*self.flow;
        // Never more than sent: the back channel refuses such an ACK.
        let stream_ahead = self.sent.saturating_sub(acked);
        let wire_ahead = self.wire_sent + self.pending.len() as u64 - self.wire_acked;
        // While paced: no more framed and not yet written than the pacer lets out in a few
        // milliseconds (the writer wakes this after each paced write).
        let paced = flow.paced_queue().is_none_or(|q| {
            let written = self.counters.link_bytes.load(Ordering::Relaxed);
            (self.wire_sent + self.pending.len() as u64).saturating_sub(written) <= q
        });
        // Below two ACK steps of stream the target may not ack again: never wait there.
        Ok(paced
            && stream_ahead <= self.window.bytes()
            && (wire_ahead <= flow.link_window_bytes || stream_ahead < 2 * link::ACK_STEP))
    }

    /// Appends one frame written by `encode`, which stands for `stream_bytes` of QEMU's
    /// stream: those count against the window.
    pub(super) async fn encoded(
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

    pub(super) async fn frame(
        &mut self,
        stream_bytes: usize,
        frame: &LinkFrame,
    ) -> Result<(), SourceError> {
        self.wait_window().await?;
        self.encoded(stream_bytes, |out| frame.encode(out)).await
    }

    pub(super) async fn flush(&mut self) -> Result<(), SourceError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // The next batch goes into a buffer the writer has finished with, if there is one.
        let next = self
            .spent
            .try_recv()
            .unwrap_or_else(|_| Outgoing::with_capacity(ZSTD_BATCH + 2 * PAGE_SIZE));
        let mut bytes = std::mem::replace(&mut self.pending, next);
        if !self.unpaced && self.flow.cap.pacing().is_none() {
            // The time the cap held the link up bought compression while it paced; with the
            // cap off (the guest stopped), only the link's own hold-ups count.
            self.unpaced = true;
            if let Some(c) = &mut self.compress {
                c.forget_held_up();
            }
        }
        if let Some(compress) = &mut self.compress {
            let spare = &self.spare;
            let raw = bytes.len() as u64;
            if compress
                .apply(&mut bytes, |read| recycle(read, spare))
                .map_err(LinkFailure::Compress)?
            {
                Counters::add(&self.counters.zstd_in_bytes, raw);
                Counters::add(&self.counters.zstd_out_bytes, bytes.len() as u64);
            }
        }
        self.wire_sent += bytes.len() as u64;
        // The reader, held to a few milliseconds ahead of a paced link, may read on.
        self.flow.framed_moved.notify_one();
        let point = (self.sent, self.wire_sent, Instant::now());
        if self.checkpoints.len() >= MAX_CHECKPOINTS {
            // Bounded: past the cap a flush joins the newest checkpoint (acked a little later).
            *self.checkpoints.back_mut().expect("at the cap, not empty") = point;
        } else {
            self.checkpoints.push_back(point);
        }
        let stopped = || SourceError::Link(LinkFailure::WriterStopped);
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
pub(super) async fn emit_loop(
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
