//! BLAKE3 of many 4 KiB blocks at once: the same digests as `blake3::hash`, eight blocks per
//! SIMD pass with AVX2 (sixteen with AVX-512).
//!
//! `blake3::hash` on one 4 KiB input compresses its four 1 KiB chunks side by side, which fills
//! only half of AVX2's eight lanes (a quarter of AVX-512's sixteen), then hashes the two parent
//! nodes and the root one at a time. Every page of a migration and every block of an image is
//! such an input, so hashing them one by one leaves half the vector unit idle. Here the tree of
//! each block is walked level by level across a whole group of blocks: chunk `c` of every block
//! in one pass (all at chunk counter `c`), then the two parents of every block, then every
//! root. The gain over hashing the blocks singly is measured in docs/benchmarks.md.
//!
//! The passes go through `blake3::platform::Platform::hash_many`, the crate's own SIMD kernel,
//! which the crate marks as unstable; that is why the blake3 version is pinned exactly in this
//! crate's manifest, and why the tests compare every result with `blake3::hash`.
use blake3::{platform::Platform, IncrementCounter};

use crate::{is_zero, Hash, BLOCK};

/// Bytes in a block.
pub const BLOCK_BYTES: usize = BLOCK as usize;
const CHUNK: usize = 1024;
const CHUNKS: usize = BLOCK_BYTES / CHUNK;
/// Blocks per group: a multiple of every SIMD degree the crate has (4, 8 or 16).
const GROUP: usize = 16;
/// BLAKE3's IV (the BLAKE3 specification, section 2.2).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Domain flags (the BLAKE3 specification, table 3).
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;

/// Appends the BLAKE3 digest of each block to `out`, in order.
pub fn hash_blocks(blocks: &[&[u8; BLOCK_BYTES]], out: &mut Vec<Hash>) {
    let platform = Platform::detect();
    out.reserve(blocks.len());
    for group in blocks.chunks(GROUP) {
        hash_group(platform, group, out);
    }
}

/// Appends, for each entry, the digest of its block (hashed together with the others), or
/// `None` where there is no block.
pub fn hash_present(blocks: &[Option<&[u8; BLOCK_BYTES]>], out: &mut Vec<Option<Hash>>) {
    let present: Vec<&[u8; BLOCK_BYTES]> = blocks.iter().flatten().copied().collect();
    let mut hashes = Vec::with_capacity(present.len());
    hash_blocks(&present, &mut hashes);
    let mut hashes = hashes.into_iter();
    out.extend(blocks.iter().map(|b| b.and_then(|_| hashes.next())));
}

/// Like [`crate::hash_block`] for each full block of `data`: the digest, or `None` for an
/// all-zero block. A short tail is ignored.
pub fn hash_block_run(data: &[u8], out: &mut Vec<Option<Hash>>) {
    let blocks: Vec<Option<&[u8; BLOCK_BYTES]>> = data
        .chunks_exact(BLOCK_BYTES)
        .map(|b| b.try_into().expect("chunks_exact yields whole blocks"))
        .map(|b: &[u8; BLOCK_BYTES]| (!is_zero(b)).then_some(b))
        .collect();
    hash_present(&blocks, out);
}

fn hash_group(platform: Platform, group: &[&[u8; BLOCK_BYTES]], out: &mut Vec<Hash>) {
    let n = group.len();
    debug_assert!(n > 0 && n <= GROUP);
    // Chaining values of every block's chunks, block-major: [cv0 cv1 cv2 cv3] per block.
    let mut chunk_cvs = [[0u8; 32 * CHUNKS]; GROUP];
    let mut pass = [0u8; 32 * GROUP];
    for c in 0..CHUNKS {
        let inputs: [&[u8; CHUNK]; GROUP] = std::array::from_fn(|i| {
            group[i.min(n - 1)][c * CHUNK..(c + 1) * CHUNK]
                .try_into()
                .expect("a chunk is CHUNK bytes")
        });
        platform.hash_many(
            &inputs[..n],
            &IV,
            c as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut pass[..32 * n],
        );
        for (cvs, cv) in chunk_cvs[..n].iter_mut().zip(pass.chunks_exact(32)) {
            cvs[c * 32..(c + 1) * 32].copy_from_slice(cv);
        }
    }
    // Two parents per block: (cv0, cv1) and (cv2, cv3). Their outputs, side by side, are the
    // root node's input.
    let parents: [&[u8; 64]; 2 * GROUP] = std::array::from_fn(|j| {
        let half = (j % 2) * 64;
        chunk_cvs[(j / 2).min(n - 1)][half..half + 64]
            .try_into()
            .expect("two chaining values")
    });
    let mut roots_in = [0u8; 64 * GROUP];
    platform.hash_many(
        &parents[..2 * n],
        &IV,
        0,
        IncrementCounter::No,
        PARENT,
        0,
        0,
        &mut roots_in[..64 * n],
    );
    let roots: [&[u8; 64]; GROUP] = std::array::from_fn(|i| {
        let i = i.min(n - 1);
        roots_in[i * 64..(i + 1) * 64]
            .try_into()
            .expect("a root node is one block")
    });
    platform.hash_many(
        &roots[..n],
        &IV,
        0,
        IncrementCounter::No,
        PARENT | ROOT,
        0,
        0,
        &mut pass[..32 * n],
    );
    out.extend(
        pass[..32 * n]
            .chunks_exact(32)
            .map(|h| Hash::try_from(h).expect("a digest is 32 bytes")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(count: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut data = vec![0u8; count * BLOCK_BYTES];
        for w in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        data
    }

    #[test]
    fn every_group_size_matches_blake3() {
        let data = blocks(2 * GROUP + 3, 7);
        let all: Vec<&[u8; BLOCK_BYTES]> = data
            .chunks_exact(BLOCK_BYTES)
            .map(|b| b.try_into().unwrap())
            .collect();
        for count in 0..=all.len() {
            let mut out = Vec::new();
            hash_blocks(&all[..count], &mut out);
            assert_eq!(out.len(), count);
            for (block, hash) in all.iter().zip(&out) {
                assert_eq!(blake3::hash(&block[..]).as_bytes(), hash, "count {count}");
            }
        }
    }

    #[test]
    fn structured_contents_match_blake3() {
        // Blocks that differ in one chunk only, or only in the last byte, must still differ.
        let mut data = vec![0x5au8; 6 * BLOCK_BYTES];
        data[BLOCK_BYTES + 3 * CHUNK] = 1;
        data[3 * BLOCK_BYTES - 1] = 2;
        data[3 * BLOCK_BYTES..4 * BLOCK_BYTES].fill(0xff);
        let all: Vec<&[u8; BLOCK_BYTES]> = data
            .chunks_exact(BLOCK_BYTES)
            .map(|b| b.try_into().unwrap())
            .collect();
        let mut out = Vec::new();
        hash_blocks(&all, &mut out);
        for (block, hash) in all.iter().zip(&out) {
            assert_eq!(blake3::hash(&block[..]).as_bytes(), hash);
        }
        assert_eq!(out[0], out[4]);
        assert_ne!(out[0], out[1]);
        assert_ne!(out[0], out[2]);
    }

    #[test]
    fn block_run_skips_zero_blocks_like_hash_block() {
        let mut data = blocks(5, 3);
        data[BLOCK_BYTES..2 * BLOCK_BYTES].fill(0);
        data[4 * BLOCK_BYTES..].fill(0);
        data.extend_from_slice(&[9; 100]);
        let mut out = Vec::new();
        hash_block_run(&data, &mut out);
        let want: Vec<Option<Hash>> = data
            .chunks_exact(BLOCK_BYTES)
            .map(crate::hash_block)
            .collect();
        assert_eq!(out, want);
        assert_eq!(out[1], None);
        assert_eq!(out[4], None);
    }
}
