//! Guest RAM that is a file: `memory-backend-memfd`, `memory-backend-file` (hugetlbfs,
//! `/dev/shm`), as vhost-user and shared-memory set-ups need. QEMU discards such RAM (virtio-
//! balloon, virtio-mem, postcopy) by punching holes into the file with `fallocate`, not with
//! `madvise`, so the map must follow the fds QEMU holds on those files too.
//!
//! ```text
//! /proc/PID/maps: the mapping at each RAM block's host address -> (device, inode, file offset)
//! /proc/PID/fd:   each fd's (device, inode) -> the fds on a RAM file, with where each block
//!                 sits in it
//! ```
use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::Path};

use super::{memmap::RamBlock, procfs::open_fds};

/// A RAM block inside a file QEMU holds an fd on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamFile {
    /// Index into the VM's RAM blocks.
    pub block: usize,
    /// The file offset of the block's first byte.
    pub file_offset: u64,
}

impl RamFile {
    /// The host range of `block` that file bytes `[offset, offset + len)` back, if any.
    pub fn host_range(&self, block: &RamBlock, offset: u64, len: u64) -> Option<(u64, u64)> {
        let start = offset.max(self.file_offset);
        let end = offset
            .saturating_add(len)
            .min(self.file_offset.saturating_add(block.len));
        (start < end).then(|| (block.host + (start - self.file_offset), end - start))
    }
}

/// The fds of the process at `proc_dir` on files that back RAM blocks in `blocks`.
pub fn match_ram_fds(proc_dir: &Path, blocks: &[RamBlock]) -> HashMap<u32, Vec<RamFile>> {
    let mut out: HashMap<u32, Vec<RamFile>> = HashMap::new();
    let Ok(maps) = fs::read_to_string(proc_dir.join("maps")) else {
        return out;
    };
    // (device, inode) -> the blocks in that file.
    let mut files: HashMap<(u64, u64), Vec<RamFile>> = HashMap::new();
    for (i, b) in blocks.iter().enumerate() {
        if let Some((dev, inode, file_offset)) = backing(&maps, b.host) {
            files.entry((dev, inode)).or_default().push(RamFile {
                block: i,
                file_offset,
            });
        }
    }
    if files.is_empty() {
        return out;
    }
    for (fd, link) in open_fds(proc_dir) {
        // Through the link: the open file's own device and inode.
        let Ok(meta) = fs::metadata(link) else {
            continue;
        };
        let dev = (u64::from(libc::major(meta.dev())) << 32) | u64::from(libc::minor(meta.dev()));
        if let Some(blocks) = files.get(&(dev, meta.ino())) {
            out.insert(fd, blocks.clone());
        }
    }
    out
}

/// The file behind the mapping that holds `addr`: (major << 32 | minor, inode, file offset of
/// `addr`); `None` for anonymous memory.
fn backing(maps: &str, addr: u64) -> Option<(u64, u64, u64)> {
    maps.lines().find_map(|line| {
        // start-end perms offset major:minor inode [path]
        let mut f = line.split_whitespace();
        let (range, _perms, offset, dev, inode) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        let (start, end) = range.split_once('-')?;
        let (start, end) = (hex(start)?, hex(end)?);
        if addr < start || addr >= end {
            return None;
        }
        let inode: u64 = inode.parse().ok()?;
        if inode == 0 {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        Some((
            (hex(major)? << 32) | hex(minor)?,
            inode,
            hex(offset)? + (addr - start),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_placed_in_the_file_of_its_mapping() {
        let maps = "\
7f0000000000-7f0004000000 rw-s 00000000 00:01 4242 /memfd:pc.ram (deleted)
7f0004000000-7f0004001000 rw-p 00000000 00:00 0 
7f0005000000-7f0006000000 rw-s 00200000 fd:02 77 /dev/hugepages/vm1
";
        assert_eq!(backing(maps, 0x7f0000001000), Some((1, 4242, 0x1000)));
        assert_eq!(backing(maps, 0x7f0004000000), None, "anonymous");
        assert_eq!(
            backing(maps, 0x7f0005000000),
            Some(((0xfd << 32) | 2, 77, 0x200000))
        );
        assert_eq!(backing(maps, 0x1000), None, "not mapped");
    }

    #[test]
    fn file_ranges_become_host_ranges_of_the_block() {
        let block = RamBlock {
            name: "pc.ram".into(),
            host: 0x10000,
            len: 0x4000,
        };
        let f = RamFile {
            block: 0,
            file_offset: 0x1000,
        };
        assert_eq!(
            f.host_range(&block, 0x2000, 0x1000),
            Some((0x11000, 0x1000))
        );
        assert_eq!(
            f.host_range(&block, 0, 0x2000),
            Some((0x10000, 0x1000)),
            "cut at start"
        );
        assert_eq!(
            f.host_range(&block, 0x4000, u64::MAX),
            Some((0x13000, 0x1000)),
            "cut at the block's end"
        );
        assert_eq!(f.host_range(&block, 0x5000, 0x1000), None, "past the block");
        assert_eq!(f.host_range(&block, 0, 0x1000), None, "before the block");
    }
}
