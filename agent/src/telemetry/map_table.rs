//! The map's tables, laid out for size: a host follows every guest page of every VM it runs.
//!
//! ```text
//! index[RAM block][page] -> slot + 1 (0: none)        4 bytes per guest page
//! slots[slot] = { hash, disk offset, export, RAM block, page, next }   56 bytes per entry
//! by_disk[export << 48 | disk block] -> first slot     the rest chain through `next`
//! ```
//! A page has at most one entry; a disk block may be held by several pages (a chain, almost
//! always of one). Freed slots are reused before the slab grows.
use std::collections::HashMap;

use blockhash::Hash;

/// A guest page: its RAM block (index into the VM's blocks) and page number in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    pub block: u32,
    pub page: u64,
}

/// Where a page's content sits on the disks, and what it hashed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// The export (disk) number the VM's registry gave it.
    pub export: u32,
    /// 4 KiB-aligned byte offset on that disk.
    pub offset: u64,
    pub hash: Hash,
}

const NONE: u32 = u32::MAX;
/// Disk blocks per export that the reverse index can name (2^48 4 KiB blocks: 1 EiB).
const DISK_BITS: u32 = 48;

#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: Hash,
    offset: u64,
    export: u32,
    block: u32,
    page: u32,
    /// The next slot holding the same disk block, or [`NONE`].
    next: u32,
}

/// The reverse index's key of disk block `block` of `export`, when it fits.
fn disk_key(export: u32, block: u64) -> Option<u64> {
    (export < 1 << (64 - DISK_BITS) && block < 1 << DISK_BITS)
        .then(|| u64::from(export) << DISK_BITS | block)
}

/// The export and disk block of a reverse-index key.
fn disk_of(key: u64) -> (u32, u64) {
    ((key >> DISK_BITS) as u32, key & ((1 << DISK_BITS) - 1))
}

/// Entries by guest page, and the pages of each disk block.
#[derive(Debug, Default)]
pub struct MapTable {
    /// Per RAM block: page -> slot + 1; allocated for the block's pages on its first entry.
    index: Vec<Vec<u32>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_disk: HashMap<u64, u32>,
    /// Pages in each RAM block.
    pages: Vec<u64>,
    len: usize,
}

impl MapTable {
    /// Tables for RAM blocks of these many pages each.
    pub fn new(block_pages: &[u64]) -> Self {
        Self {
            index: vec![Vec::new(); block_pages.len()],
            pages: block_pages.to_vec(),
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, key: PageKey) -> Option<u32> {
        let s = *self.index.get(key.block as usize)?.get(key.page as usize)?;
        (s != 0).then(|| s - 1)
    }

    pub fn get(&self, key: PageKey) -> Option<MapEntry> {
        let s = &self.slots[self.slot_of(key)? as usize];
        Some(MapEntry {
            export: s.export,
            offset: s.offset,
            hash: s.hash,
        })
    }

    /// Maps `key`, which has no entry; `false` (nothing kept) when it cannot be indexed.
    pub fn link(&mut self, key: PageKey, entry: MapEntry) -> bool {
        let (Some(disk), Ok(page), Some(&pages)) = (
            disk_key(entry.export, entry.offset / blockhash::BLOCK),
            u32::try_from(key.page),
            self.pages.get(key.block as usize),
        ) else {
            return false;
        };
        if key.page >= pages {
            return false;
        }
        let index = &mut self.index[key.block as usize];
        if index.is_empty() {
            index.resize(pages as usize, 0);
        }
        let next = self.by_disk.get(&disk).copied().unwrap_or(NONE);
        let slot = Slot {
            hash: entry.hash,
            offset: entry.offset,
            export: entry.export,
            block: key.block,
            page,
            next,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        index[key.page as usize] = id + 1;
        self.by_disk.insert(disk, id);
        self.len += 1;
        true
    }

    /// Drops `key`'s entry; returns whether it had one.
    pub fn remove(&mut self, key: PageKey) -> bool {
        let Some(id) = self.slot_of(key) else {
            return false;
        };
        let s = self.slots[id as usize];
        self.index[key.block as usize][key.page as usize] = 0;
        if let Some(disk) = disk_key(s.export, s.offset / blockhash::BLOCK) {
            self.unchain(disk, id, s.next);
        }
        self.release(id);
        true
    }

    /// Takes slot `id` (followed by `next`) out of disk block `disk`'s chain.
    fn unchain(&mut self, disk: u64, id: u32, next: u32) {
        let Some(&head) = self.by_disk.get(&disk) else {
            return;
        };
        if head == id {
            if next == NONE {
                self.by_disk.remove(&disk);
            } else {
                self.by_disk.insert(disk, next);
            }
            return;
        }
        let mut at = head;
        while at != NONE {
            let after = self.slots[at as usize].next;
            if after == id {
                self.slots[at as usize].next = next;
                return;
            }
            at = after;
        }
    }

    fn release(&mut self, id: u32) {
        self.slots[id as usize].next = NONE;
        self.free.push(id);
        self.len -= 1;
    }

    /// Drops every entry of disk blocks `first..=last` of `export`; returns how many.
    pub fn remove_disk_range(&mut self, export: u32, first: u64, last: u64) -> u64 {
        if last - first + 1 > self.by_disk.len() as u64 {
            // A large range (a TRIM of the whole disk): walk the index, not the range.
            let hit: Vec<u64> = self
                .by_disk
                .keys()
                .copied()
                .filter(|&k| {
                    let (e, b) = disk_of(k);
                    e == export && (first..=last).contains(&b)
                })
                .collect();
            hit.into_iter().map(|k| self.remove_disk(k)).sum()
        } else {
            (first..=last)
                .filter_map(|b| disk_key(export, b))
                .map(|k| self.remove_disk(k))
                .sum()
        }
    }

    /// Drops every entry of disk block `disk` (a [`disk_key`]); returns how many.
    fn remove_disk(&mut self, disk: u64) -> u64 {
        let Some(mut at) = self.by_disk.remove(&disk) else {
            return 0;
        };
        let mut n = 0;
        while at != NONE {
            let s = self.slots[at as usize];
            self.index[s.block as usize][s.page as usize] = 0;
            self.release(at);
            n += 1;
            at = s.next;
        }
        n
    }

    /// Every entry, by RAM block and page.
    pub fn entries(&self) -> impl Iterator<Item = (PageKey, MapEntry)> + '_ {
        self.index.iter().enumerate().flat_map(move |(b, pages)| {
            pages
                .iter()
                .enumerate()
                .filter(|(_, &s)| s != 0)
                .map(move |(p, &s)| {
                    let s = &self.slots[s as usize - 1];
                    (
                        PageKey {
                            block: b as u32,
                            page: p as u64,
                        },
                        MapEntry {
                            export: s.export,
                            offset: s.offset,
                            hash: s.hash,
                        },
                    )
                })
        })
    }

    /// Bytes the tables take (capacity, not just length).
    pub fn memory_bytes(&self) -> usize {
        let index: usize = self.index.iter().map(|v| v.capacity() * 4).sum();
        // hashbrown: key, value and one control byte per bucket, buckets at most 7/8 full.
        let disk = self.by_disk.capacity() * 8 / 7 * (size_of::<(u64, u32)>() + 1);
        index + self.slots.capacity() * size_of::<Slot>() + self.free.capacity() * 4 + disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(export: u32, block: u64, tag: u8) -> MapEntry {
        MapEntry {
            export,
            offset: block * blockhash::BLOCK,
            hash: [tag; 32],
        }
    }

    fn key(block: u32, page: u64) -> PageKey {
        PageKey { block, page }
    }

    #[test]
    fn pages_sharing_a_disk_block_chain_and_leave_the_chain_from_anywhere() {
        let mut t = MapTable::new(&[16, 8]);
        assert!(t.link(key(0, 1), entry(0, 7, 1)));
        assert!(t.link(key(0, 2), entry(0, 7, 1)));
        assert!(t.link(key(1, 3), entry(0, 7, 1)));
        assert!(t.link(key(0, 4), entry(1, 7, 2)));
        assert_eq!((t.len(), t.by_disk.len()), (4, 2));
        // Out of the middle of the chain, then its head.
        assert!(t.remove(key(0, 2)));
        assert!(!t.remove(key(0, 2)), "gone already");
        assert!(t.remove(key(1, 3)));
        assert_eq!(t.get(key(0, 1)).map(|e| e.offset), Some(7 * 4096));
        // The rest of block 7 of export 0 goes with one write; export 1's block 7 stays.
        assert_eq!(t.remove_disk_range(0, 7, 7), 1);
        assert_eq!(t.len(), 1);
        assert!(t.get(key(0, 1)).is_none());
        assert_eq!(t.get(key(0, 4)).map(|e| e.hash), Some([2; 32]));
        // Freed slots are reused: three more entries fit in the slab already there.
        let slab = t.slots.len();
        for p in 5..8 {
            assert!(t.link(key(0, p), entry(0, p, 3)));
        }
        assert_eq!(t.slots.len(), slab);
        let all: Vec<_> = t
            .entries()
            .map(|(k, e)| (k.page, e.offset / 4096))
            .collect();
        assert_eq!(all, vec![(4, 7), (5, 5), (6, 6), (7, 7)]);
    }

    #[test]
    fn what_the_tables_cannot_index_is_refused() {
        let mut t = MapTable::new(&[4]);
        assert!(!t.link(key(0, 4), entry(0, 1, 1)), "past the block's end");
        assert!(!t.link(key(1, 0), entry(0, 1, 1)), "no such block");
        assert!(!t.link(key(0, 0), entry(1 << 16, 1, 1)), "export too large");
        assert!(
            !t.link(key(0, 0), entry(0, 1 << 48, 1)),
            "disk block too large"
        );
        assert_eq!(t.len(), 0);
        assert_eq!(
            disk_of(disk_key(65_535, (1 << 48) - 1).unwrap()),
            (65_535, (1 << 48) - 1)
        );
    }

    #[test]
    fn a_fully_mapped_gib_takes_about_a_fortieth_of_it() {
        let pages = 1u64 << 18;
        let mut t = MapTable::new(&[pages]);
        for p in 0..pages {
            assert!(t.link(key(0, p), entry(0, p, 1)));
        }
        let per_gib = t.memory_bytes() as f64 / f64::from(1 << 20);
        // 56-byte slots, 4 bytes of index a page, the reverse index's buckets.
        eprintln!("{per_gib:.1} MiB of tables per fully mapped GiB");
        assert!(per_gib < 26.0, "{per_gib:.1} MiB of tables per mapped GiB");
    }
}
