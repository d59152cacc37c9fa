//! Flow control shared by the emitter and the back channel: what the target acknowledged,
//! how much may be in flight, and whether the link or the target holds the stream up.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::error::BackError;
use crate::migration::pace::Cap;

/// While the link is paced, how long what waits ahead of the pacer may take to cross it. When
/// QEMU stops the guest, the stream it already wrote crosses at the cap until the reader reaches
/// the switchover and lifts it: that backlog is paid inside the guest's pause, so it is sized by
/// time, not bytes.
pub(super) const PACED_QUEUE_MS: u64 = 4;
/// ... but never less than one read or one batch of frames, or the stream could not move.
pub(super) const MIN_PACED_QUEUE: u64 = 512 << 10;
/// Once the guest is paused, a read of QEMU's stream goes out as QEMU sent it (no hashing, no
/// MAPPED page the target must fetch from the NAS inside the pause) unless the unpaced link
/// held the stream up this recently: then deduplication saves link time again.
pub(super) const LINK_HELD_RECENTLY: Duration = Duration::from_millis(100);

/// Link flow control. Everything in flight is backlog the source QEMU's final iteration (its
/// downtime) waits behind, so it is bounded twice: at most the stream window (sized by time,
/// [`super::window`], at most `SourceConfig::stream_window_bytes`) of QEMU's stream ahead of
/// what the target has delivered to its QEMU (a 57-byte MAPPED frame still costs the target a
/// 4 KiB fetch, and its QEMU the page's load), and at most `link_window_bytes` bytes of link
/// frames (a backlog of whole pages costs link time). ACKs carry stream credit; the emitter
/// maps it to link bytes through its flush checkpoints.
pub(super) struct Flow {
    pub(super) acked: AtomicU64,
    /// Stream bytes framed so far: no honest ACK carries more credit.
    pub(super) framed: AtomicU64,
    /// Why the back channel ended early, if it did: no ACK will come any more.
    pub(super) failed: OnceLock<Arc<BackError>>,
    pub(super) moved: Notify,
    pub(super) link_window_bytes: u64,
    /// Link bytes the target has read, as its latest ACK says, when it reports them
    /// ([`CAP_RECEIVED`]); advisory: it only steers compression and the final iteration's
    /// form.
    pub(super) received: Option<AtomicU64>,
    /// The link bytes written when that latest ACK arrived.
    pub(super) written_at_ack: AtomicU64,
    /// The migration's cap (lifted at the switchover).
    pub(super) cap: Arc<Cap>,
    /// Notified (one permit, for the reader) when the emitter has framed more of the stream.
    pub(super) framed_moved: Notify,
    /// What `link_held_us` counts from.
    pub(super) epoch: Instant,
    /// When the link last held the stream up while unpaced: microseconds since `epoch`, plus
    /// one; 0: never.
    pub(super) link_held_us: AtomicU64,
}

impl Flow {
    /// Nothing acknowledged, framed or held up yet; `received`: the target reports the link
    /// bytes it has read ([`CAP_RECEIVED`]).
    pub(super) fn new(link_window_bytes: u64, received: bool, cap: Arc<Cap>) -> Self {
        Flow {
            acked: AtomicU64::new(0),
            framed: AtomicU64::new(0),
            failed: OnceLock::new(),
            moved: Notify::new(),
            link_window_bytes,
            received: received.then(|| AtomicU64::new(0)),
            written_at_ack: AtomicU64::new(0),
            cap,
            framed_moved: Notify::new(),
            epoch: Instant::now(),
            link_held_us: AtomicU64::new(0),
        }
    }

    /// While the link is paced: the bytes that may wait ahead of the pacer, at each of the two
    /// places they wait (read and not yet framed; framed and not yet written). `None`: not
    /// paced, only the windows bound them.
    pub(super) fn paced_queue(&self) -> Option<u64> {
        let rate = self.cap.pacing()?;
        Some((rate.saturating_mul(PACED_QUEUE_MS) / 1000).max(MIN_PACED_QUEUE))
    }

    /// Records that the link holds the stream up now. Not while a cap paces it: the cap,
    /// not the link, is what holds it up then, and it comes off when the guest stops.
    pub(super) fn link_held(&self) {
        if self.cap.pacing().is_none() {
            let us = self.epoch.elapsed().as_micros() as u64 + 1;
            self.link_held_us.fetch_max(us, Ordering::Relaxed);
        }
    }

    /// Whether the unpaced link held the stream up within `recently`.
    pub(super) fn link_held_within(&self, recently: Duration) -> bool {
        match self.link_held_us.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let now = self.epoch.elapsed().as_micros() as u64 + 1;
                now.saturating_sub(at) <= recently.as_micros() as u64
            }
        }
    }
}

/// Whether the link holds the stream up, rather than the target: of the link bytes sent and
/// not yet delivered to the target QEMU (`sent - delivered`), at least as many are still on
/// their way (`sent - received`) as wait at the target (`received - delivered`).
pub(super) fn link_holds_up(sent: u64, received: u64, delivered: u64) -> bool {
    sent.saturating_sub(received) >= received.saturating_sub(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(rate: u64) -> Flow {
        Flow::new(2 << 20, false, Arc::new(Cap::new(Some(rate))))
    }

    #[test]
    fn a_paced_queue_drains_in_a_few_milliseconds() {
        let flow = capped(1_000_000_000);
        // 1 GB/s: 4 ms is 4 MB.
        assert_eq!(flow.paced_queue(), Some(4_000_000));
        // 100 MB/s: 400 kB, under the floor of one batch.
        flow.cap.set(Some(100_000_000));
        assert_eq!(flow.paced_queue(), Some(MIN_PACED_QUEUE));
        flow.cap.set(None);
        assert_eq!(flow.paced_queue(), None);
        flow.cap.set(Some(100_000_000));
        flow.cap.lift();
        assert_eq!(flow.paced_queue(), None);
    }

    #[test]
    fn a_hold_up_counts_only_once_the_cap_is_off() {
        let flow = capped(100_000_000);
        assert!(!flow.link_held_within(LINK_HELD_RECENTLY));
        // The pacer holds the stream up, not the link.
        flow.link_held();
        assert!(!flow.link_held_within(LINK_HELD_RECENTLY));
        flow.cap.lift();
        flow.link_held();
        assert!(flow.link_held_within(LINK_HELD_RECENTLY));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!flow.link_held_within(Duration::from_millis(10)));
        assert!(flow.link_held_within(LINK_HELD_RECENTLY));
    }

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
}
