//! Flow control shared by the emitter and the back channel: what the target acknowledged,
//! how much may be in flight, and whether the link or the target holds the stream up.
use std::sync::{atomic::AtomicU64, Arc, OnceLock};

use tokio::sync::Notify;

use super::error::BackError;

/// Link flow control. Everything in flight is backlog the source QEMU's final iteration (its
/// downtime) waits behind, so it is bounded twice: at most `stream_window_bytes` bytes of QEMU's stream
/// ahead of what the target has delivered to its QEMU (a 57-byte MAPPED frame still costs the
/// target a 4 KiB fetch), and at most `link_window_bytes` bytes of link frames (a backlog of whole
/// pages costs link time). ACKs carry stream credit; the emitter maps it to link bytes through
/// its flush checkpoints.
pub(super) struct Flow {
    pub(super) acked: AtomicU64,
    /// Stream bytes framed so far: no honest ACK carries more credit.
    pub(super) framed: AtomicU64,
    /// Why the back channel ended early, if it did: no ACK will come any more.
    pub(super) failed: OnceLock<Arc<BackError>>,
    pub(super) moved: Notify,
    pub(super) stream_window_bytes: u64,
    pub(super) link_window_bytes: u64,
    /// Link bytes the target has read, as its latest ACK says, when it reports them
    /// ([`CAP_RECEIVED`]); advisory: it only steers compression.
    pub(super) received: Option<AtomicU64>,
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
