//! The deliver stage: slots in stream order to the target QEMU. A slot is verbatim bytes or
//! a page's [`Cell`], which the fetcher or a fallback fills; the writer waits for each cell,
//! so nothing reaches QEMU out of order or unverified, and acknowledges delivered mapped pages.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, OnceLock,
};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt, BufWriter},
    sync::{mpsc, Notify},
};

use super::TargetError;
use crate::migration::{
    link::{LinkFrame, ACK_MAPPED, ACK_STEP},
    moments::Moment,
    report::Counters,
    savevm::Gate,
    stream::PAGE_SIZE,
};

/// A page's content, filled once by the fetcher or by a fallback.
#[derive(Default)]
pub(super) struct Cell {
    pub(super) value: OnceLock<Box<[u8; PAGE_SIZE]>>,
    pub(super) ready: Notify,
}

impl Cell {
    pub(super) fn ready(page: Box<[u8; PAGE_SIZE]>) -> Arc<Self> {
        let c = Arc::new(Self::default());
        c.set(page);
        c
    }

    pub(super) fn set(&self, page: Box<[u8; PAGE_SIZE]>) {
        if self.value.set(page).is_ok() {
            self.ready.notify_waiters();
        }
    }

    pub(super) async fn get(&self) -> &[u8; PAGE_SIZE] {
        loop {
            let notified = self.ready.notified();
            if let Some(v) = self.value.get() {
                return v;
            }
            notified.await;
        }
    }
}

pub(super) enum Slot {
    Bytes(Vec<u8>),
    Content { cell: Arc<Cell>, seq: Option<u64> },
}

/// Delivers slots to QEMU in order and acknowledges delivered mapped pages.
pub(super) async fn write_loop<Q: AsyncWrite + Unpin>(
    mut slots: mpsc::UnboundedReceiver<Vec<Slot>>,
    qemu: Q,
    mut record: Option<tokio::fs::File>,
    back: mpsc::Sender<LinkFrame>,
    counters: Arc<Counters>,
    received: Option<Arc<AtomicU64>>,
) -> Result<(), TargetError> {
    let mut out = BufWriter::with_capacity(1 << 20, qemu);
    // Nothing reaches QEMU before the stream is known to begin as QEMU's own.
    let mut gate = Gate::default();
    // Delivered so far: MAPPED pages and stream bytes (the credit); and what was last
    // acknowledged.
    let (mut mapped, mut credit) = (0u64, 0u64);
    let (mut acked_mapped, mut acked_credit) = (0u64, 0u64);
    while let Some(batch) = slots.recv().await {
        let mut delivered = 0u64;
        for slot in batch {
            let n = match slot {
                Slot::Bytes(b) => {
                    let pass = gate.pass(&b)?;
                    out.write_all(&pass).await.map_err(TargetError::Qemu)?;
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
                    let pass = gate.pass(page)?;
                    out.write_all(&pass).await.map_err(TargetError::Qemu)?;
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
    counters.marks.mark(Moment::Delivered);
    out.shutdown().await.map_err(TargetError::Qemu)?;
    if let Some(mut f) = record {
        f.flush().await.map_err(TargetError::Qemu)?;
    }
    Ok(())
}
