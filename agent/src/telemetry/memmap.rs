//! The memory-to-disk map of one VM: which guest page holds which disk block, with the BLAKE3
//! of the page as it was when the block arrived.
//!
//! ```text
//! Landed/Stored (disk range <-> host range) -> whole, aligned pages -> read the page from
//!   QEMU's memory (process_vm_readv) -> hash -> entry (RAM block, page) -> (export, block, hash)
//! Changed (a disk range rewritten) -> every entry pointing into it is dropped
//! Discarded (madvise on guest RAM) -> every entry in the range is dropped
//! ```
//! At most one entry per guest page; a reverse index finds the pages of a disk block, so a
//! write to the block invalidates them wherever they are ([`super::map_table`] holds both).
//! An entry is a claim to check, never a fact: the source hashes the page it is about to send
//! and compares, and the target verifies the block it fetches.
use blockhash::{hash_block, Hash, BLOCK};

use super::map_table::MapTable;
pub use super::map_table::{MapEntry, PageKey};

const PAGE: u64 = BLOCK;

/// One RAM block of the guest (a `x-query-ramblock` row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// The block id QEMU's migration stream uses (`pc.ram`).
    pub name: String,
    /// Where the block starts in QEMU's address space.
    pub host: u64,
    /// Bytes in use.
    pub len: u64,
}

/// Reads QEMU's memory.
pub trait PageReader {
    /// Fills `out` from `addr`, or fails.
    fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()>;
}

/// Counts of what the map did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Entries made or replaced.
    pub mapped: u64,
    /// Pages skipped: all zeroes (QEMU sends those as ZERO records anyway).
    pub zero_pages: u64,
    /// Pages skipped: memory and disk offsets not both page-aligned, or not whole.
    pub unaligned: u64,
    /// Host ranges outside every RAM block (a bounce buffer, not guest memory).
    pub outside_ram: u64,
    /// Pages QEMU's memory could not be read for.
    pub unreadable: u64,
    /// Entries dropped by a write, zeroing or trim of their block, or a discard of the page.
    pub invalidated: u64,
    /// Of those, entries dropped because KVM's dirty ring said the guest wrote the page.
    pub dirtied: u64,
}

/// One VM's map.
pub struct MemoryMap {
    blocks: Vec<RamBlock>,
    table: MapTable,
    stats: MapStats,
}

fn table_for(blocks: &[RamBlock]) -> MapTable {
    let pages: Vec<u64> = blocks.iter().map(|b| b.len / PAGE).collect();
    MapTable::new(&pages)
}

impl MemoryMap {
    pub fn new(blocks: Vec<RamBlock>) -> Self {
        Self {
            table: table_for(&blocks),
            blocks,
            stats: MapStats::default(),
        }
    }

    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    pub fn stats(&self) -> MapStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The page at `offset` in RAM block `name`, if the map has it.
    pub fn get(&self, name: &str, offset: u64) -> Option<MapEntry> {
        let block = self.blocks.iter().position(|b| b.name == name)? as u32;
        self.table.get(PageKey {
            block,
            page: offset / PAGE,
        })
    }

    /// The hash the map claims for the page at `offset` in RAM block number `block`.
    pub fn claim_at(&self, block: u32, offset: u64) -> Option<Hash> {
        self.table
            .get(PageKey {
                block,
                page: offset / PAGE,
            })
            .map(|e| e.hash)
    }

    /// Every entry, for reports and tests.
    pub fn entries(&self) -> impl Iterator<Item = (PageKey, MapEntry)> + '_ {
        self.table.entries()
    }

    /// Bytes the map's tables take (capacity, not just length).
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
    }

    /// The RAM block and offset in it of host address `addr`.
    pub fn locate(&self, addr: u64) -> Option<(u32, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            (addr >= b.host && addr < b.host + b.len).then(|| (i as u32, addr - b.host))
        })
    }

    /// A read brought disk bytes `[offset, offset + len)` of `export` into host memory at
    /// `addr`: the pages there hold the disk's content now.
    pub fn landed(
        &mut self,
        export: u32,
        offset: u64,
        addr: u64,
        len: u64,
        reader: &mut impl PageReader,
    ) {
        let Some((block, start, end)) = self.ram_range(addr, len) else {
            return;
        };
        // Every page written to changed, whole or not; whole aligned ones are mapped again.
        self.discard_block_range(block, start, end);
        self.map_range(export, offset, block, start, end, reader);
    }

    /// Host memory at `addr` was written to disk bytes `[offset, offset + len)` of `export`:
    /// what those blocks held before is gone, and the pages now hold what the blocks do.
    pub fn stored(
        &mut self,
        export: u32,
        offset: u64,
        addr: u64,
        len: u64,
        reader: &mut impl PageReader,
    ) {
        self.changed(export, offset, len);
        let Some((block, start, end)) = self.ram_range(addr, len) else {
            return;
        };
        self.map_range(export, offset, block, start, end, reader);
    }

    /// The RAM block and the range in it of host memory `[addr, addr + len)`, cut at the
    /// block's end; `None` (and counted) outside guest RAM.
    fn ram_range(&mut self, addr: u64, len: u64) -> Option<(u32, u64, u64)> {
        let Some((block, start)) = self.locate(addr) else {
            self.stats.outside_ram += 1;
            return None;
        };
        Some((
            block,
            start,
            start + len.min(self.blocks[block as usize].len - start),
        ))
    }

    /// Maps every whole page of `[start, end)` in `block` whose disk offset (`offset` at
    /// `start`) is a block boundary.
    fn map_range(
        &mut self,
        export: u32,
        offset: u64,
        block: u32,
        start: u64,
        end: u64,
        reader: &mut impl PageReader,
    ) {
        let first = start.div_ceil(PAGE) * PAGE;
        let mut buf = [0u8; PAGE as usize];
        let mut at = first;
        while at + PAGE <= end {
            let Some(disk) = offset.checked_add(at - start) else {
                break;
            };
            if !disk.is_multiple_of(PAGE) {
                self.stats.unaligned += 1;
                at += PAGE;
                continue;
            }
            let host = self.blocks[block as usize].host + at;
            if reader.read(host, &mut buf).is_err() {
                self.stats.unreadable += 1;
                at += PAGE;
                continue;
            }
            match hash_block(&buf) {
                None => self.stats.zero_pages += 1,
                Some(hash) => self.insert(
                    PageKey {
                        block,
                        page: at / PAGE,
                    },
                    MapEntry {
                        export,
                        offset: disk,
                        hash,
                    },
                ),
            }
            at += PAGE;
        }
        if first > start || at < end {
            self.stats.unaligned += 1;
        }
    }

    /// Disk bytes `[offset, offset + len)` of `export` changed: entries pointing into them go.
    pub fn changed(&mut self, export: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        // Offsets come from requests QEMU sent: saturate rather than trust them to fit.
        let (first, last) = (offset / PAGE, offset.saturating_add(len - 1) / PAGE);
        self.stats.invalidated += self.table.remove_disk_range(export, first, last);
    }

    /// Host memory `[addr, addr + len)` was discarded (madvise): its entries go.
    pub fn discarded(&mut self, addr: u64, len: u64) {
        if let Some((block, start)) = self.locate(addr) {
            let end = (start + len).min(self.blocks[block as usize].len);
            self.discard_block_range(block, start, end);
        }
    }

    /// The guest wrote the pages at `addrs` (host addresses, from KVM's dirty ring): their
    /// entries are dropped. Returns how many were.
    pub fn dirtied(&mut self, addrs: impl Iterator<Item = u64>) -> u64 {
        let before = self.table.len();
        for addr in addrs {
            if let Some((block, offset)) = self.locate(addr) {
                self.remove(PageKey {
                    block,
                    page: offset / PAGE,
                });
            }
        }
        let dropped = (before - self.table.len()) as u64;
        self.stats.dirtied += dropped;
        dropped
    }

    fn discard_block_range(&mut self, block: u32, start: u64, end: u64) {
        if end <= start {
            return;
        }
        for page in start / PAGE..end.div_ceil(PAGE) {
            self.remove(PageKey { block, page });
        }
    }

    /// The VM's RAM blocks are `blocks` now (a block added, resized or removed): entries
    /// follow their block by name and host address, and go when their block or page is gone,
    /// or when `keep_export` refuses their disk.
    pub fn relayout(&mut self, blocks: Vec<RamBlock>, keep_export: impl Fn(u32) -> bool) {
        let moved: Vec<Option<u32>> = self
            .blocks
            .iter()
            .map(|old| {
                blocks
                    .iter()
                    .position(|b| b.name == old.name && b.host == old.host)
                    .map(|i| i as u32)
            })
            .collect();
        let entries: Vec<(PageKey, MapEntry)> = self.table.entries().collect();
        self.table = table_for(&blocks);
        self.blocks = blocks;
        for (key, entry) in entries {
            let block = moved
                .get(key.block as usize)
                .copied()
                .flatten()
                .filter(|&b| {
                    (key.page + 1) * PAGE <= self.blocks[b as usize].len
                        && keep_export(entry.export)
                });
            let kept = block.is_some_and(|block| self.table.link(PageKey { block, ..key }, entry));
            if !kept {
                self.stats.invalidated += 1;
            }
        }
    }

    fn insert(&mut self, key: PageKey, entry: MapEntry) {
        self.remove(key);
        if self.table.link(key, entry) {
            self.stats.mapped += 1;
        } else {
            // A page or disk offset past what the tables index (a 16 TiB RAM block, a
            // 1 EiB disk): not mapped.
            self.stats.unaligned += 1;
        }
    }

    fn remove(&mut self, key: PageKey) {
        if self.table.remove(key) {
            self.stats.invalidated += 1;
        }
    }
}

/// Reads another process's memory with `process_vm_readv`.
pub struct ProcessMemory {
    pub pid: u32,
}

impl PageReader for ProcessMemory {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
        let local = libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: out.len(),
        };
        // SAFETY: `local` covers exactly `out`, which outlives the call; the kernel checks the
        // remote range against the other process's mappings.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        match usize::try_from(n) {
            Ok(n) if n == out.len() => Ok(()),
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read of QEMU's memory",
            )),
            Err(_) => Err(std::io::Error::last_os_error()),
        }
    }
}

#[cfg(test)]
#[path = "memmap_tests.rs"]
mod tests;
