//! The hot set: the blocks an export read or wrote most recently, as a bounded LRU, with a
//! change stream so a source agent can keep a replica of it.
//!
//! Each touch moves blocks to the front with their current hash; the least recently touched
//! block leaves when the set is full, and leaving is an event too. Changes go out on a bounded
//! broadcast channel; a subscriber that falls behind is told to reset and gets a fresh
//! snapshot, so its replica is never silently wrong.
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use super::{ExportId, Hash};
use lockstep_lru::Lru;

/// One change: `block` of `export` holds `hash`, or left the set (`None`); `was` is what it
/// held in the set before (`None` if it was not in the set, and in snapshots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotChange {
    pub export: ExportId,
    pub block: u64,
    pub hash: Option<Hash>,
    pub was: Option<Hash>,
}

/// Batches of changes queued per subscriber before it counts as lagging.
const EVENT_QUEUE: usize = 4096;

/// The hot set of one export.
pub struct HotSet {
    export: ExportId,
    capacity: usize,
    // A std Mutex: held only for in-memory updates, never across an await.
    lru: Mutex<Lru<u64, Hash>>,
    events: broadcast::Sender<Arc<Vec<HotChange>>>,
}

impl HotSet {
    /// A hot set holding at most `capacity` blocks.
    pub fn new(export: ExportId, capacity: usize) -> Self {
        Self {
            export,
            capacity,
            lru: Mutex::new(Lru::new(capacity)),
            events: broadcast::channel(EVENT_QUEUE).0,
        }
    }

    /// Records that `blocks` were just read or written, with their current hashes (`None` for
    /// all-zero blocks, which leave the set).
    pub fn touch(&self, blocks: impl IntoIterator<Item = (u64, Option<Hash>)>) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changes = Vec::new();
        for (block, hash) in blocks {
            match hash {
                Some(h) => {
                    // Refreshed either way; announced only when new or changed.
                    let was = lru.touch(&block).copied();
                    if was == Some(h) {
                        continue;
                    }
                    let evicted = lru.insert(block, h);
                    changes.push(HotChange {
                        export: self.export,
                        block,
                        hash: Some(h),
                        was,
                    });
                    if let Some((evicted, old)) = evicted {
                        changes.push(HotChange {
                            export: self.export,
                            block: evicted,
                            hash: None,
                            was: Some(old),
                        });
                    }
                }
                None => {
                    if let Some(old) = lru.remove(&block) {
                        changes.push(HotChange {
                            export: self.export,
                            block,
                            hash: None,
                            was: Some(old),
                        });
                    }
                }
            }
        }
        if !changes.is_empty() {
            // Sent under the lock, so a subscriber's snapshot and its stream never overlap or
            // leave a gap. No receiver is not an error.
            let _ = self.events.send(Arc::new(changes));
        }
    }

    /// The current contents, and a stream of every change after them.
    pub fn subscribe(&self) -> (Vec<HotChange>, broadcast::Receiver<Arc<Vec<HotChange>>>) {
        let lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = lru
            .iter_oldest_first()
            .map(|(block, hash)| HotChange {
                export: self.export,
                block: *block,
                hash: Some(*hash),
                was: None,
            })
            .collect();
        (snapshot, self.events.subscribe())
    }

    /// Blocks currently in the set.
    pub fn len(&self) -> usize {
        self.lru
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn export(&self) -> ExportId {
        self.export
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_blocks_and_reports_changes() {
        let hot = HotSet::new(1, 2);
        let (snap, mut rx) = hot.subscribe();
        assert!(snap.is_empty());
        hot.touch([(10, Some([1; 32])), (11, Some([2; 32]))]);
        hot.touch([(10, Some([1; 32]))]); // refresh, no content change
        hot.touch([(12, Some([3; 32]))]); // evicts 11, the least recent
        hot.touch([(12, Some([4; 32]))]); // rewritten
        hot.touch([(10, None)]); // zeroed: leaves
        let mut seen = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            seen.extend(batch.iter().map(|c| (c.block, c.hash, c.was)));
        }
        let h = |b| Some([b; 32]);
        assert_eq!(
            seen,
            vec![
                (10, h(1), None),
                (11, h(2), None),
                (12, h(3), None),
                (11, None, h(2)),
                (12, h(4), h(3)),
                (10, None, h(1)),
            ]
        );
        let (snap, _) = hot.subscribe();
        assert_eq!(
            snap,
            vec![HotChange {
                export: 1,
                block: 12,
                hash: Some([4; 32]),
                was: None,
            }]
        );
        assert_eq!(hot.len(), 1);
    }
}
