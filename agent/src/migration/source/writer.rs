//! The link writer: urgent fallback answers first, then the stream's batches, paced to the
//! migration's bandwidth cap until the switchover.
use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use super::store::recycle;
use crate::migration::{
    outgoing::Outgoing,
    pace::{Cap, Pacer},
    report::Counters,
};

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
    pub(super) cap: Arc<Cap>,
    /// Set by the reader once the stream reaches the switchover: the cap no longer applies.
    pub(super) switched_over: Arc<AtomicBool>,
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
            b = w.data.recv() => match b { Some(b) => b, None => break },
        };
        let cap = w
            .cap
            .get()
            .filter(|_| !w.switched_over.load(Ordering::Relaxed));
        pacer.pace(batch.len(), cap).await;
        Counters::add(&w.counters.link_bytes, batch.len() as u64);
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
