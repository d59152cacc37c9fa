//! The back channel: what the target sends the source. ACKs move the windows and release
//! unacked pages, FALLBACK_REQ is answered from the unacked store ahead of normal traffic, and
//! DONE ends the session.
use std::sync::{atomic::Ordering, Arc};

use tokio::{io::AsyncRead, sync::mpsc};

use super::{error::BackError, flow::Flow, store::Unacked};
use crate::migration::{
    link::{LinkFrame, LinkStats},
    report::Counters,
    wire::FrameReader,
};

/// Reads the target's frames until DONE: the target's figures, or why it failed. On any other
/// end it marks the flow failed, so whatever waits for an ACK stops, and says why.
pub(super) async fn back_channel<R: AsyncRead + Unpin>(
    mut frames: FrameReader,
    mut link: R,
    unacked: Arc<Unacked>,
    flow: Arc<Flow>,
    counters: Arc<Counters>,
    urgent: mpsc::Sender<Vec<u8>>,
) -> Result<Result<LinkStats, String>, Arc<BackError>> {
    let outcome = async {
        loop {
            match frames.next(&mut link).await {
                Ok(Some(LinkFrame::Ack {
                    mapped,
                    credit,
                    received,
                })) => {
                    let framed = flow.framed.load(Ordering::Acquire);
                    if credit > framed {
                        return Err(BackError::OverAcked { credit, framed });
                    }
                    match (&flow.received, received) {
                        (Some(bytes), Some(r)) => {
                            // What had been written by now: the link bytes the target had not
                            // read yet were still crossing when it sent this.
                            flow.written_at_ack.store(
                                counters.link_bytes.load(Ordering::Relaxed),
                                Ordering::Release,
                            );
                            bytes.fetch_max(r, Ordering::AcqRel);
                        }
                        (None, Some(_)) => return Err(BackError::ReceivedWithoutCap),
                        _ => {}
                    }
                    unacked.ack(mapped);
                    flow.acked.fetch_max(credit, Ordering::AcqRel);
                    flow.moved.notify_waiters();
                }
                Ok(Some(LinkFrame::FallbackReq { seq })) => {
                    Counters::add(&counters.fallbacks, 1);
                    let Some(page) = unacked.get(seq) else {
                        return Err(BackError::UnknownPage(seq));
                    };
                    let frame = LinkFrame::FallbackData { seq, page }.to_bytes();
                    if urgent.send(frame).await.is_err() {
                        return Err(BackError::WriterStopped);
                    }
                }
                Ok(Some(LinkFrame::Done { outcome })) => return Ok(outcome),
                Ok(Some(LinkFrame::Error { message })) => return Err(BackError::Peer(message)),
                Ok(Some(other)) => return Err(BackError::Unexpected(format!("{other:?}"))),
                Ok(None) => return Err(BackError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }
    .await
    .map_err(Arc::new);
    // Ended early: nothing will ack again, so whatever waits for an ack must stop.
    if let Err(why) = &outcome {
        let _ = flow.failed.set(why.clone());
        flow.moved.notify_waiters();
        unacked.close();
    }
    outcome
}
