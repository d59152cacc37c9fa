//! The unacked store: mapped pages the target may still ask for (FALLBACK_REQ), kept in
//! place in the read buffers they arrived in until the target acknowledges them.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use tokio::sync::{mpsc, Notify};

use crate::migration::stream::PAGE_SIZE;

/// Mapped pages awaiting the target's acknowledgement, bounded. Sequence numbers are given
/// out in order and acknowledged as a prefix, so a queue ordered by them is enough. A page is
/// kept without a copy, as a share of the read buffer it arrived in; a buffer goes back to the
/// reader once neither the emitter nor this store holds it. Bounded twice: in pages
/// (`unacked_pages`) and in read buffers held ([`KEPT_READS`]).
pub(super) struct Unacked {
    pub(super) store: Mutex<Store>,
    pub(super) freed: Notify,
    pub(super) capacity: usize,
    pub(super) spare: mpsc::Sender<Vec<u8>>,
    /// No ACK will come any more: a full store stops waiting (the session is failing).
    pub(super) closed: AtomicBool,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) pages: VecDeque<(u64, Kept)>,
    /// Distinct read buffers the pages share. The pages of one buffer are adjacent in the
    /// queue (they are emitted read by read).
    pub(super) reads: usize,
}

/// A kept page.
pub(super) enum Kept {
    /// In a read buffer, at an offset.
    Shared { read: Arc<Vec<u8>>, offset: usize },
    /// Copied: a page that straddled two reads.
    Own(Box<[u8; PAGE_SIZE]>),
}

impl Kept {
    pub(super) fn read(&self) -> Option<&Arc<Vec<u8>>> {
        match self {
            Kept::Shared { read, .. } => Some(read),
            Kept::Own(_) => None,
        }
    }

    pub(super) fn bytes(&self) -> &[u8; PAGE_SIZE] {
        match self {
            Kept::Shared { read, offset } => read[*offset..*offset + PAGE_SIZE]
                .try_into()
                .expect("a page is PAGE_SIZE bytes"),
            Kept::Own(page) => page,
        }
    }
}

/// Read buffers (of up to [`READ_SIZE`] and a page) the store may hold at once: 64 MiB.
pub(super) const KEPT_READS: usize = 256;

/// Hands a read buffer back to the reader if nobody else holds it.
pub(super) fn recycle(read: Arc<Vec<u8>>, spare: &mpsc::Sender<Vec<u8>>) {
    if let Ok(buf) = Arc::try_unwrap(read) {
        let _ = spare.try_send(buf);
    }
}

pub(super) fn same_read(a: Option<&Arc<Vec<u8>>>, b: Option<&Arc<Vec<u8>>>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
}

impl Unacked {
    pub(super) fn new(capacity: usize, spare: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            store: Mutex::new(Store::default()),
            freed: Notify::new(),
            capacity: capacity.max(1),
            spare,
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps page `seq`, waiting while the store is full (unless it is closed).
    pub(super) async fn keep(&self, seq: u64, mut page: Kept) {
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
    pub(super) fn try_keep(&self, seq: u64, page: Kept) -> Result<(), Kept> {
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
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.freed.notify_waiters();
    }

    /// The target holds the first `mapped` pages: let them go.
    pub(super) fn ack(&self, mapped: u64) {
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

    pub(super) fn get(&self, seq: u64) -> Option<Box<[u8; PAGE_SIZE]>> {
        let store = self.lock();
        let i = store.pages.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(Box::new(*store.pages[i].1.bytes()))
    }
}

impl Store {
    pub(super) fn full(&self, capacity: usize) -> bool {
        self.pages.len() >= capacity || self.reads >= KEPT_READS
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
}
