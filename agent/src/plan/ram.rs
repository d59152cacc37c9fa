//! What a VM's RAM holds, by sampling it: the share of pages that are all zero (QEMU sends
//! those as 9-byte records), the share that repeat the content of a page sampled before them
//! (the agents send those as DUP frames: a guest holds some contents hundreds of times), the
//! share the memory-to-disk map places on storage *and* whose content still hashes to the
//! map's claim (those go out MAPPED), and how well the rest compresses. The same pass times
//! the source agent's per-page work on this host (BLAKE3 of a page, zstd of a page), the
//! model's cost figures.
//!
//! ```text
//! RAM blocks -> N pages spread evenly -> process_vm_readv
//!   -> zero? | BLAKE3 sampled before? | map claim == BLAKE3? | zstd
//!   -> RamProfile {zero, repeated, mirrored, compress ratio, ns per hash, ns per zstd page}
//! ```
use std::{collections::HashSet, time::Instant};

use blockhash::{is_zero, Hash};
use serde::{Deserialize, Serialize};

use crate::telemetry::memmap::{PageReader, RamBlock};

const PAGE: u64 = 4096;
/// Pages sampled unless told otherwise: a share's standard error is at most 0.8 points.
pub const DEFAULT_SAMPLES: u64 = 4096;
/// A batch compressing to more than this share of its size is sent as it is (the agent's
/// compressor keeps only batches that shrink to 14/16 or less).
const POOR: f64 = 14.0 / 16.0;

/// The sampled make-up of a VM's RAM.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RamProfile {
    /// Bytes of guest RAM (writable RAM blocks).
    pub ram_bytes: u64,
    pub sampled: u64,
    /// Shares of pages, each 0..=1.
    pub zero: f64,
    /// Pages whose content a page sampled before (in RAM order, the order a pass sends them)
    /// already had: a content the guest holds `m` times is sampled about `m x n / N` times,
    /// and all but the first count, so a content held hundreds of times is seen at its share
    /// while pairs are mostly missed (an under-estimate).
    #[serde(default)]
    pub repeated: f64,
    pub mirrored: f64,
    /// Pages the map claimed whose content no longer matches (counted in neither share).
    pub stale_claims: f64,
    /// zstd output over input for pages neither zero nor mirrored (1.0: incompressible).
    pub compress_ratio: f64,
    /// Nanoseconds per page for BLAKE3, and for zstd level 1, on this host.
    pub hash_ns: f64,
    pub zstd_ns: f64,
    /// Sampled pages that could not be read (counted as neither zero nor mirrored).
    pub unreadable: u64,
    /// How much memory the guest rewrites over a long stretch (see [`WorkingSet`]); `None`
    /// until two samples far enough apart were compared.
    #[serde(default)]
    pub working_set: Option<WorkingSet>,
}

/// Unique bytes of RAM whose content changed between two samples `over_s` seconds apart. A
/// guest that keeps rewriting the same memory changes no more than that however long a
/// pre-copy pass lasts; one that writes everywhere changes its dirty rate times the time.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkingSet {
    pub bytes: f64,
    pub over_s: f64,
}

/// What one sampled page was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Unreadable,
    Zero,
    Mirrored(Hash),
    /// The content of a page sampled before it.
    Repeat(Hash),
    Other(Hash),
}

impl Seen {
    /// A short fingerprint of the content (0: zero page; `u64::MAX`: unreadable), for
    /// comparing samples taken apart in time.
    pub fn fingerprint(&self) -> u64 {
        match self {
            Self::Unreadable => u64::MAX,
            Self::Zero => 0,
            Self::Mirrored(h) | Self::Repeat(h) | Self::Other(h) => {
                u64::from_le_bytes(h[..8].try_into().expect("8 bytes")).max(1)
            }
        }
    }
}

/// Fingerprints of a sample, in RAM order.
pub fn fingerprints(seen: &[Seen]) -> Vec<u64> {
    seen.iter().map(Seen::fingerprint).collect()
}

/// The share of pages whose content differs between two samples of the same pages (pages
/// unreadable in either are left out); `None` if they are not of the same pages.
pub fn changed_share(before: &[u64], after: &[u64]) -> Option<f64> {
    if before.len() != after.len() || before.is_empty() {
        return None;
    }
    let (mut n, mut changed) = (0u64, 0u64);
    for (a, b) in before.iter().zip(after) {
        if *a != u64::MAX && *b != u64::MAX {
            n += 1;
            changed += u64::from(a != b);
        }
    }
    (n > 0).then(|| changed as f64 / n as f64)
}

/// Samples `samples` pages of `blocks`; `claim(block, offset)` is the map's hash for a page.
pub fn sample(
    reader: &mut dyn PageReader,
    blocks: &[RamBlock],
    samples: u64,
    claim: impl FnMut(u32, u64) -> Option<Hash>,
) -> RamProfile {
    let mut s = sample_pages(reader, blocks, samples, claim);
    s.finish();
    s.profile
}

/// A sample in progress: what each page was, in RAM order, and the content of those neither
/// zero nor placed yet (an index may still place some, see [`Sampled::place`]), until
/// [`Sampled::finish`] measures how the rest compresses.
pub struct Sampled {
    pub profile: RamProfile,
    pub seen: Vec<Seen>,
    content: Vec<Option<Vec<u8>>>,
}

impl Sampled {
    /// Sampled page `i` is on storage after all (an index found it).
    pub fn place(&mut self, i: usize) {
        if let Seen::Other(h) = self.seen[i] {
            self.seen[i] = Seen::Mirrored(h);
            self.content[i] = None;
            self.profile.mirrored += 1.0 / self.profile.sampled.max(1) as f64;
        }
    }

    /// How the pages left to send in full compress: in batches of [`BATCH`] pages, as the
    /// agents compress runs of frames (a page alone compresses worse than in company).
    pub fn finish(&mut self) {
        let rest: Vec<&Vec<u8>> = self.content.iter().flatten().collect();
        if rest.is_empty() {
            return;
        }
        let Ok(mut zstd) = zstd::bulk::Compressor::new(1) else {
            return;
        };
        let (mut packed, mut raw) = (0f64, 0f64);
        let t = Instant::now();
        for batch in rest.chunks(BATCH) {
            let joined: Vec<u8> = batch.iter().flat_map(|p| p.iter().copied()).collect();
            let size = zstd.compress(&joined).map_or(joined.len(), |c| c.len()) as f64;
            let len = joined.len() as f64;
            packed += if size / len > POOR { len } else { size };
            raw += len;
        }
        self.profile.zstd_ns = t.elapsed().as_secs_f64() * 1e9 / rest.len() as f64;
        self.profile.compress_ratio = packed / raw;
        self.content.clear();
    }
}

/// Pages compressed together when measuring compressibility (256 KiB, the agents' batch).
const BATCH: usize = 64;

/// [`sample`], unfinished: the index may place more pages before compression is measured.
pub fn sample_pages(
    reader: &mut dyn PageReader,
    blocks: &[RamBlock],
    samples: u64,
    mut claim: impl FnMut(u32, u64) -> Option<Hash>,
) -> Sampled {
    let pages: Vec<u64> = blocks.iter().map(|b| b.len / PAGE).collect();
    let total: u64 = pages.iter().sum();
    let mut p = RamProfile {
        ram_bytes: total * PAGE,
        compress_ratio: 1.0,
        ..RamProfile::default()
    };
    let (mut seen, mut content) = (Vec::new(), Vec::new());
    if total == 0 {
        return Sampled {
            profile: p,
            seen,
            content,
        };
    }
    let n = samples.clamp(1, total);
    let mut buf = vec![0u8; PAGE as usize];
    let (mut zero, mut mirrored, mut stale, mut repeated) = (0u64, 0u64, 0u64, 0u64);
    let mut contents = HashSet::new();
    let (mut hashed, mut hash_time) = (0u64, 0f64);
    for i in 0..n {
        // One page in each of `n` equal strides, at a fixed pseudo-random place in it: evenly
        // spaced pages would alias with the guest's power-of-two allocation patterns, and
        // the same `i` must give the same page in every sample (changes are compared).
        let (start, end) = (i * total / n, (i + 1) * total / n);
        let global = start + jitter(i) % (end - start).max(1);
        let (block, page) = locate(&pages, global);
        let b = &blocks[block];
        let kept = if reader.read(b.host + page * PAGE, &mut buf).is_err() {
            p.unreadable += 1;
            Seen::Unreadable
        } else if is_zero(&buf) {
            zero += 1;
            Seen::Zero
        } else {
            let t = Instant::now();
            let hash = blockhash::hash(&buf);
            hash_time += t.elapsed().as_secs_f64();
            hashed += 1;
            let claimed = claim(block as u32, page * PAGE);
            stale += u64::from(claimed.is_some_and(|h| h != hash));
            if !contents.insert(hash) {
                // The agents' content cache holds what they sent recently: a repeat goes as a
                // DUP frame whether or not the map also places it.
                repeated += 1;
                Seen::Repeat(hash)
            } else if claimed == Some(hash) {
                mirrored += 1;
                Seen::Mirrored(hash)
            } else {
                Seen::Other(hash)
            }
        };
        content.push(matches!(kept, Seen::Other(_)).then(|| buf.clone()));
        seen.push(kept);
    }
    p.sampled = n - p.unreadable;
    let s = p.sampled.max(1) as f64;
    p.zero = zero as f64 / s;
    p.repeated = repeated as f64 / s;
    p.mirrored = mirrored as f64 / s;
    p.stale_claims = stale as f64 / s;
    if hashed > 0 {
        p.hash_ns = hash_time * 1e9 / hashed as f64;
    }
    Sampled {
        profile: p,
        seen,
        content,
    }
}

/// A fixed pseudo-random number for sample `i` (splitmix64).
fn jitter(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The block and page of the `global`-th page of all blocks.
fn locate(pages: &[u64], mut global: u64) -> (usize, u64) {
    for (i, &n) in pages.iter().enumerate() {
        if global < n {
            return (i, global);
        }
        global -= n;
    }
    (pages.len() - 1, pages[pages.len() - 1].saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake process memory: block 0 of 1024 pages, the first quarter zero, the second
    /// random, then 384 pages of a pattern that compresses well (each page its own), then 128
    /// copies of one page.
    struct Fake(Vec<u8>);

    impl PageReader for Fake {
        fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
            let a = addr as usize - 0x1000_0000;
            out.copy_from_slice(&self.0[a..a + out.len()]);
            Ok(())
        }
    }

    #[test]
    fn shares_match_what_the_memory_holds_and_only_verified_claims_count_as_mirrored() {
        let mut mem = vec![0u8; 1024 * 4096];
        let mut x = 0x1234_5678_u32;
        for b in &mut mem[256 * 4096..512 * 4096] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for (i, b) in mem[512 * 4096..896 * 4096].iter_mut().enumerate() {
            *b = (i % 7) as u8 + 1;
        }
        for page in 512..896 {
            mem[page * 4096..page * 4096 + 8].copy_from_slice(&(page as u64).to_le_bytes());
        }
        mem[896 * 4096..].fill(0xff);
        let blocks = [RamBlock {
            name: "pc.ram".into(),
            host: 0x1000_0000,
            len: 1024 * 4096,
        }];
        // The map claims the random quarter: the first half of it truly, the second half with
        // a wrong hash (a page the guest has since overwritten).
        let truth = mem.clone();
        let claim = |_block: u32, off: u64| {
            let page = off / 4096;
            (256..384)
                .contains(&page)
                .then(|| blockhash::hash(&truth[off as usize..off as usize + 4096]))
                .or_else(|| (384..512).contains(&page).then_some([7u8; 32]))
        };
        let p = sample(&mut Fake(mem), &blocks, 512, claim);
        assert_eq!(p.ram_bytes, 1024 * 4096);
        assert_eq!(p.sampled, 512);
        assert!((p.zero - 0.25).abs() < 0.01, "{p:?}");
        assert!((p.mirrored - 0.125).abs() < 0.01, "{p:?}");
        assert!((p.stale_claims - 0.125).abs() < 0.01, "{p:?}");
        // The 128 copies: all but the first sampled one repeat it.
        assert!((p.repeated - 0.125).abs() < 0.01, "{p:?}");
        // The rest, sent in full: the stale-claimed random pages (a quarter) and the patterned
        // ones (three quarters, tiny), in batches of both.
        assert!(p.compress_ratio > 0.2 && p.compress_ratio < 0.4, "{p:?}");
        assert!(p.hash_ns > 0.0 && p.zstd_ns > 0.0);
    }

    #[test]
    fn a_changed_share_counts_content_changes_and_leaves_out_unreadable_pages() {
        let z = Seen::Zero;
        let o = |b: u8| Seen::Other([b; 32]);
        let before = fingerprints(&[o(1), o(2), z, z, Seen::Unreadable]);
        let after = fingerprints(&[o(1), o(3), o(4), z, o(5)]);
        assert_eq!(changed_share(&before, &after), Some(0.5));
        assert_eq!(changed_share(&before, &after[..4]), None);
    }
}
