//! Reads submitted with `io_submit` (`aio=native`), waiting to land.
//!
//! QEMU's linux-aio reaps completions from a ring in its own memory, so no syscall says when a
//! read's data is in guest RAM. A read is recorded at submission; its pages lose their entries
//! at once (they are being overwritten) and are mapped [`LANDING`] later, when the read has
//! completed in all but pathological cases. An entry's hash is of the page as the map reads it
//! then: if the read had not landed yet, the entry names content the disk does not hold, and
//! the source's hash check or the target's verification turns it into a page sent whole (the
//! map is never trusted, docs/design/memory-map.md).
//!
//! ```text
//! AioRead event -> map.discarded(pages) -> Landings::push -> (LANDING later) -> map.landed
//! a later write/discard/read of the same disk range or memory -> the pending landing is cancelled
//! ```
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// How long after its submission a read is taken to have landed. Too early, and the entry
/// holds the page's old content (the source's check finds it stale: the page goes whole); too
/// late, and a page the guest freed and reused meanwhile (the kernel's partition scan at boot
/// does that within milliseconds) pairs its new content with the block (the target's check
/// fails: a fetch for nothing). A local O_DIRECT read lands within a millisecond or two.
pub const LANDING: Duration = Duration::from_millis(5);
/// Reads waiting at once; beyond it a read is not mapped (and counted).
pub const CAPACITY: usize = 65_536;

/// One submitted read: disk bytes `[offset, offset + len)` of `export` into host memory `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landing {
    pub due: Instant,
    pub export: u32,
    pub offset: u64,
    pub addr: u64,
    pub len: u64,
}

/// What became of the reads submitted with `io_submit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AioStats {
    /// Reads (iovecs) recorded at submission.
    pub submitted: u64,
    /// Waiting to land now.
    pub pending: u64,
    /// Not mapped: the queue was full.
    pub overflowed: u64,
    /// Not mapped: their memory or disk range changed before they were due.
    pub cancelled: u64,
}

/// The reads waiting, oldest first.
#[derive(Debug, Default)]
pub struct Landings {
    queue: VecDeque<Landing>,
    /// Counts so far (`pending` is the queue's length, filled in by [`Landings::stats`]).
    counts: AioStats,
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl Landings {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn stats(&self) -> AioStats {
        AioStats {
            pending: self.queue.len() as u64,
            ..self.counts
        }
    }

    /// Keeps a read submitted at `now`; `false` when the queue is full.
    pub fn push(&mut self, now: Instant, export: u32, offset: u64, addr: u64, len: u64) -> bool {
        if self.queue.len() >= CAPACITY {
            self.counts.overflowed += 1;
            return false;
        }
        self.counts.submitted += 1;
        self.queue.push_back(Landing {
            due: now + LANDING,
            export,
            offset,
            addr,
            len,
        });
        true
    }

    /// Takes the next read due by `now` (all of them with `now` = `None`).
    pub fn pop_due(&mut self, now: Option<Instant>) -> Option<Landing> {
        let front = self.queue.front()?;
        if now.is_some_and(|now| front.due > now) {
            return None;
        }
        self.queue.pop_front()
    }

    /// Drops the reads into host memory `[addr, addr + len)`: it is written or discarded again.
    pub fn cancel_memory(&mut self, addr: u64, len: u64) {
        self.cancel(|l| overlaps(l.addr, l.len, addr, len));
    }

    /// Drops the reads of disk bytes `[offset, offset + len)` of `export`: they change.
    pub fn cancel_disk(&mut self, export: u32, offset: u64, len: u64) {
        self.cancel(|l| l.export == export && overlaps(l.offset, l.len, offset, len));
    }

    fn cancel(&mut self, hit: impl Fn(&Landing) -> bool) {
        if self.queue.is_empty() {
            return;
        }
        let before = self.queue.len();
        self.queue.retain(|l| !hit(l));
        self.counts.cancelled += (before - self.queue.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_come_due_in_order_and_overlapping_changes_cancel_them() {
        let t0 = Instant::now();
        let mut l = Landings::default();
        assert!(l.push(t0, 0, 0, 0x1000, 0x2000));
        assert!(l.push(t0 + Duration::from_millis(5), 0, 0x10000, 0x8000, 0x1000));
        assert!(l.push(t0 + Duration::from_millis(6), 1, 0, 0x20000, 0x1000));
        assert_eq!(l.pop_due(Some(t0)), None, "nothing is due at once");
        let first = l.pop_due(Some(t0 + LANDING)).unwrap();
        assert_eq!((first.addr, first.len), (0x1000, 0x2000));
        assert_eq!(
            l.pop_due(Some(t0 + LANDING)),
            None,
            "the next is 5 ms later"
        );

        // A write to export 0's bytes 0x10800.. cancels the read of 0x10000..0x11000, not the
        // read of the same offset on export 1; a discard of memory 0x20000 cancels that one.
        l.cancel_disk(0, 0x10800, 0x100);
        assert_eq!(l.len(), 1);
        assert_eq!(l.pop_due(None).map(|r| r.export), Some(1));
        assert!(l.push(t0, 1, 0, 0x20000, 0x1000));
        l.cancel_memory(0x1f000, 0x1001);
        assert!(l.is_empty());
        assert_eq!(l.stats().cancelled, 2);
        // Adjacent ranges do not overlap.
        assert!(l.push(t0, 1, 0, 0x20000, 0x1000));
        l.cancel_memory(0x21000, 0x1000);
        l.cancel_disk(1, 0x1000, 0x1000);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn the_queue_is_bounded() {
        let t0 = Instant::now();
        let mut l = Landings::default();
        for i in 0..CAPACITY as u64 {
            assert!(l.push(t0, 0, i << 12, i << 12, 4096));
        }
        assert!(!l.push(t0, 0, 0, 0, 4096));
        let s = l.stats();
        assert_eq!((s.pending, s.overflowed), (CAPACITY as u64, 1));
        assert_eq!(s.submitted, CAPACITY as u64);
        let mut n = 0;
        while l.pop_due(None).is_some() {
            n += 1;
        }
        assert_eq!(n, CAPACITY);
    }
}
