//! A layer that keeps the block index exact under writes.
//!
//! Every mutating call (write, trim, write-zeroes) takes the lock stripes of the blocks it
//! touches, performs the inner operation, recomputes those blocks' hashes and records them in
//! the index, all before returning, so before the reply is sent. Holding the stripes across
//! the write and the rehash means two overlapping writes cannot interleave their rehashes and
//! leave an older content's hash behind. Fully written blocks are hashed from the request's own
//! bytes; partially written ones are read back; zeroed ones need no hashing at all.
use std::{
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use super::{Export, Extent};
use crate::index::{hash_block, hot::HotSet, journal::Journal, BlockIndex, ExportId, Hash, BLOCK};

/// Lock stripes per export: blocks map to stripe `block % STRIPES`.
const STRIPES: u64 = 256;

/// An export whose every change is reflected in a [`BlockIndex`] before it is acknowledged.
pub struct HashingExport<E> {
    inner: E,
    index: Arc<BlockIndex>,
    id: ExportId,
    stripes: Vec<Mutex<()>>,
    /// Where changed regions are recorded before they change, when the index is persisted.
    journal: Option<Journal>,
    /// Recently read or written blocks, streamed to agents.
    hot: Option<Arc<HotSet>>,
}

impl<E: Export> HashingExport<E> {
    /// Wraps `inner`; the index must already hold a table for `id` (see
    /// [`crate::index::build`]).
    pub fn new(inner: E, index: Arc<BlockIndex>, id: ExportId) -> Self {
        Self {
            inner,
            index,
            id,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            journal: None,
            hot: None,
        }
    }

    /// Records every read and write in `hot`.
    pub fn with_hot_set(mut self, hot: Arc<HotSet>) -> Self {
        self.hot = Some(hot);
        self
    }

    /// Marks the full blocks overlapping a read as hot, with their indexed hashes.
    fn touch_read(&self, offset: u64, len: u64) {
        let (Some(hot), Some((first, last))) = (&self.hot, self.blocks(offset, len)) else {
            return;
        };
        let hashes = self.index.block_hashes(self.id, first, last - first + 1);
        hot.touch((first..).zip(hashes));
    }

    /// Records every change in `journal` before making it (see [`crate::index::store`]).
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    pub fn id(&self) -> ExportId {
        self.id
    }

    /// Locks every stripe that blocks `[first, last]` map to, in stripe order.
    fn lock(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let stripes: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            let mut s: Vec<u64> = (first..=last).map(|b| b % STRIPES).collect();
            s.sort_unstable();
            s
        };
        stripes
            .into_iter()
            .map(|s| {
                self.stripes[s as usize]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect()
    }

    /// Full blocks overlapping `[offset, offset + len)`; `None` when it touches none.
    fn blocks(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let full = self.inner.size() / BLOCK;
        let first = offset / BLOCK;
        let last = ((offset + len).div_ceil(BLOCK)).min(full);
        (len > 0 && first < last).then(|| (first, last - 1))
    }

    fn read_block(&self, block: u64) -> io::Result<Option<Hash>> {
        let mut buf = vec![0u8; BLOCK as usize];
        self.inner.read_at(&mut buf, block * BLOCK)?;
        Ok(hash_block(&buf))
    }

    /// Runs `op` under the stripes of the range, then records the new hashes. `known` gives
    /// the new content of a block the operation covered entirely, when the caller knows it.
    fn mutate(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> io::Result<()>,
        known: impl Fn(u64) -> Option<Option<Hash>>,
    ) -> io::Result<()> {
        if let Some(journal) = &self.journal {
            journal.mark(offset, len)?;
        }
        let Some((first, last)) = self.blocks(offset, len) else {
            return op();
        };
        let _guards = self.lock(first, last);
        let result = op();
        // Rehash even when the operation failed part-way: the blocks may have changed.
        let mut changes = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            let start = block * BLOCK;
            let covered = start >= offset && start + BLOCK <= offset + len;
            let hash = match (covered && result.is_ok()).then(|| known(block)).flatten() {
                Some(h) => h,
                None => self.read_block(block)?,
            };
            changes.push((block, hash));
        }
        self.index.update(self.id, &changes);
        if let Some(hot) = &self.hot {
            hot.touch(changes.iter().copied());
        }
        result
    }
}

impl<E: Export> Export for HashingExport<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        self.touch_read(offset, buf.len() as u64);
        Ok(())
    }

    fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let done = self.inner.try_read_cached(buf, offset)?;
        if done {
            self.touch_read(offset, buf.len() as u64);
        }
        Ok(done)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.mutate(
            offset,
            data.len() as u64,
            || self.inner.write_at(data, offset, fua),
            |block| {
                let at = (block * BLOCK - offset) as usize;
                Some(hash_block(&data[at..at + BLOCK as usize]))
            },
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.mutate(
            offset,
            length,
            || self.inner.trim(offset, length, fua),
            |_| Some(None),
        )
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_punch: bool, fua: bool) -> io::Result<()> {
        self.mutate(
            offset,
            length,
            || self.inner.write_zeroes(offset, length, may_punch, fua),
            |_| Some(None),
        )
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{export::file::FileExport, index::build::hash_file};

    #[test]
    fn index_follows_writes_trims_and_zeroes() {
        let path = std::env::temp_dir().join(format!("nas-hashing-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 64 * 1024 + 100]).unwrap();
        let file = FileExport::open(&path, false).unwrap();
        let index = Arc::new(BlockIndex::new());
        index.install(1, hash_file(file.file(), file.size()).unwrap());
        let e = HashingExport::new(file, index.clone(), 1);
        let sevens = hash_block(&[7u8; 4096]).unwrap();
        assert_eq!(index.block_hash(1, 3), Some(sevens));
        // Unaligned write across blocks 0 and 1.
        e.write_at(&[9u8; 5000], 100, false).unwrap();
        // Aligned write of block 4.
        e.write_at(&[5u8; 4096], 4 * 4096, false).unwrap();
        e.trim(8 * 4096, 2 * 4096, false).unwrap();
        e.write_zeroes(10 * 4096 + 1, 4096, false, false).unwrap();
        // Writing into the short tail touches no full block.
        e.write_at(&[1u8; 50], 64 * 1024 + 10, false).unwrap();
        let recomputed = hash_file(e.inner().file(), e.size()).unwrap();
        assert_eq!(index.table(1).unwrap(), recomputed);
        assert_eq!(
            index
                .lookup(&hash_block(&[5u8; 4096]).unwrap(), &[1])
                .unwrap()
                .block,
            4
        );
        std::fs::remove_file(path).unwrap();
    }
}
