//! The link writer: urgent fallback answers first, then the stream's batches, paced to the
//! migration's bandwidth cap until the switchover.
use std::{io, sync::Arc};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use super::{flow::Flow, store::recycle};
use crate::migration::{moments::Moment, outgoing::Outgoing, pace::Pacer, report::Counters};

/// The writer's channel ends and settings.
pub(super) struct Writer<W> {
    pub(super) link: W,
    /// FALLBACK_DATA frames, sent ahead of everything else.
    pub(super) urgent: mpsc::Receiver<Vec<u8>>,
    /// The emitter's batches, in stream order; closed when the stream is done.
    pub(super) data: mpsc::Receiver<Outgoing>,
    /// Sent batches, back to the emitter for reuse.
    pub(super) spent: mpsc::Sender<Outgoing>,
    /// Where read buffers go back to the reader once a sent batch lets go of them.
    pub(super) spare: mpsc::Sender<Vec<u8>>,
    /// The migration's cap (`flow.cap`), and told of every paced write: the emitter keeps
    /// only a few milliseconds queued ahead of the pacer.
    pub(super) flow: Arc<Flow>,
    pub(super) counters: Arc<Counters>,
}

/// Writes until the emitter closes its channel and every fallback answer is out, then hands
/// the link's write half back.
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(mut w: Writer<W>) -> io::Result<W> {
    let mut pacer = Pacer::default();
    loop {
        let mut batch = tokio::select! {
            biased;
            Some(b) = w.urgent.recv() => Outgoing::from(b),
            b = w.data.recv() => match b {
                Some(b) => b,
                None => {
                    // The stream is out, END last.
                    w.link.flush().await?;
                    w.counters.marks.mark(Moment::End);
                    break;
                }
            },
        };
        pacer.pace(batch.len(), &w.flow.cap).await;
        Counters::add(&w.counters.link_bytes, batch.len() as u64);
        // An emitter held to the paced queue waits for this write (also once the cap was
        // lifted: it may have been waiting since before).
        if w.flow.cap.get().is_some() {
            w.flow.moved.notify_waiters();
        }
        batch.write_to(&mut w.link).await?;
        // With nothing more queued, push it out: over TLS a write may leave records in the
        // session's buffer (when the socket was full) until the next write or a flush; on
        // plain TCP this does nothing.
        if w.data.is_empty() && w.urgent.is_empty() {
            w.link.flush().await?;
        }
        batch.clear(|read| recycle(read, &w.spare));
        let _ = w.spent.try_send(batch);
    }
    // Fallback answers may still be needed after the stream ended.
    while let Some(b) = w.urgent.recv().await {
        Counters::add(&w.counters.link_bytes, b.len() as u64);
        w.link.write_all(&b).await?;
        if w.urgent.is_empty() {
            w.link.flush().await?;
        }
    }
    w.link.flush().await?;
    Ok(w.link)
}
