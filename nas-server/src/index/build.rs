//! Building an export's table: every 4 KiB block hashed, in parallel across cores.
//!
//! Each thread takes a contiguous share of the image, reads it in 1 MiB positioned reads and
//! hashes each read several blocks per SIMD pass ([`blockhash::multi`]); holes come back as zeroes
//! and are skipped like any all-zero block.
use std::{fs::File, io, os::unix::fs::FileExt, thread, time::Instant};

use super::{Hash, BLOCK};
use blockhash::multi::hash_block_run;

const READ_CHUNK: u64 = 1 << 20;

/// Hashes every full block of `file` (`size` bytes). A short tail block is not indexed.
pub fn hash_file(file: &File, size: u64) -> io::Result<Vec<Option<Hash>>> {
    let blocks = size / BLOCK;
    let threads = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per_thread = blocks.div_ceil(threads.max(1)).max(1);
    let started = Instant::now();
    let parts: Vec<io::Result<Vec<Option<Hash>>>> = thread::scope(|s| {
        let handles: Vec<_> = (0..blocks)
            .step_by(per_thread as usize)
            .map(|first| {
                let last = (first + per_thread).min(blocks);
                s.spawn(move || hash_range(file, first, last))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("hash thread panicked")))
            })
            .collect()
    });
    let mut table = Vec::with_capacity(blocks as usize);
    for part in parts {
        table.extend(part?);
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        blocks,
        rate_mb_s = format!("{:.0}", (blocks * BLOCK) as f64 / secs.max(1e-9) / 1e6),
        "index built in {secs:.2}s"
    );
    Ok(table)
}

/// Hashes blocks `[first, last)`.
pub fn hash_range(file: &File, first: u64, last: u64) -> io::Result<Vec<Option<Hash>>> {
    let mut out = Vec::with_capacity((last - first) as usize);
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let mut block = first;
    while block < last {
        let n = ((last - block) * BLOCK).min(READ_CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], block * BLOCK)?;
        hash_block_run(&buf[..n], &mut out);
        block += (n as u64) / BLOCK;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::hash_block;

    #[test]
    fn hashes_every_full_block() {
        let path = std::env::temp_dir().join(format!("nas-build-{}", std::process::id()));
        let mut data = vec![0u8; (3 * BLOCK + 100) as usize];
        data[..4096].fill(1);
        data[8192..12288].fill(2);
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let table = hash_file(&file, data.len() as u64).unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(table[0], hash_block(&data[..4096]));
        assert_eq!(table[1], None);
        assert_eq!(table[2], hash_block(&data[8192..12288]));
        std::fs::remove_file(path).unwrap();
    }
}
