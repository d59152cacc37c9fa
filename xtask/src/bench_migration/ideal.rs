//! The offline ideal a migration's link bytes are compared with: which pages of a recorded
//! stream are blocks of the disk image, and which repeat earlier content.
use std::{collections::HashSet, path::Path};

use agent::migration::stream::{Sink, StreamParser, PAGE_SIZE};

/// What the offline ideal needs to know of a recorded stream.
pub(super) struct StreamContent {
    pub(super) bytes: u64,
    /// PAGE records whose content is a 4 KiB block of the disk.
    pub(super) on_nas: u64,
    /// PAGE records whose content an earlier PAGE record of the stream already carried.
    pub(super) repeats: u64,
    /// Of those, the ones whose content is not on the disk.
    pub(super) repeats_off_nas: u64,
}

/// Hashes every PAGE record of `stream` against the blocks of `disk` and against the pages
/// before it.
pub(super) fn stream_content(stream: &[u8], disk: &Path) -> anyhow::Result<StreamContent> {
    let disk = std::fs::read(disk)?;
    let blocks: HashSet<[u8; 32]> = disk
        .chunks_exact(PAGE_SIZE)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(blockhash::hash)
        .collect();
    struct Count<'a> {
        blocks: &'a HashSet<[u8; 32]>,
        seen: HashSet<[u8; 32]>,
        content: StreamContent,
    }
    impl Sink for Count<'_> {
        fn verbatim(&mut self, _: &[u8]) {}
        fn page(&mut self, p: &[u8; PAGE_SIZE]) {
            let hash = blockhash::hash(p);
            let on_nas = self.blocks.contains(&hash);
            let repeat = !self.seen.insert(hash);
            let c = &mut self.content;
            c.on_nas += u64::from(on_nas);
            c.repeats += u64::from(repeat);
            c.repeats_off_nas += u64::from(repeat && !on_nas);
        }
    }
    let mut count = Count {
        blocks: &blocks,
        seen: HashSet::new(),
        content: StreamContent {
            bytes: stream.len() as u64,
            on_nas: 0,
            repeats: 0,
            repeats_off_nas: 0,
        },
    };
    StreamParser::new().feed(stream, &mut count);
    Ok(count.content)
}
