//! The block index stays exact under concurrent writes, trims and zeroes from several NBD
//! connections (real qemu-io clients): afterwards the in-memory index equals the hashes
//! recomputed from the image file, block for block.
use std::{fs::File, process::Command, thread};

use blockhash::hash_block;
use nas_server::index::build::hash_file;
use testkit::{nbd_fixture::NbdFixture, pattern, require_tool, run_ok, Scratch};

const SIZE: u64 = 8 << 20;

/// A deterministic random qemu-io script: unaligned writes, aligned writes, discards, zeroes.
fn script(seed: u64, ops: usize) -> Vec<String> {
    let r = pattern(seed, ops * 24);
    let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
    (0..ops)
        .map(|i| {
            let (a, b, c) = (word(i * 3), word(i * 3 + 1), word(i * 3 + 2));
            let len = 1 + b % (64 * 1024);
            let off = a % (SIZE - len);
            match c % 8 {
                0 => format!("discard {} {}", off & !4095, (len + 4095) & !4095),
                1 => format!("write -z {off} {len}"),
                2 | 3 => format!(
                    "write -P {} {} {}",
                    c % 251,
                    off & !4095,
                    4096 * (1 + b % 8)
                ),
                _ => format!("write -P {} {off} {len}", c % 251),
            }
        })
        .filter(|cmd| {
            // Keep every command inside the image.
            let nums: Vec<u64> = cmd
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            let (off, len) = (nums[nums.len() - 2], nums[nums.len() - 1]);
            off + len <= SIZE
        })
        .collect()
}

#[test]
fn index_is_exact_after_concurrent_writes_trims_and_zeroes() {
    require_tool("qemu-io");
    let dir = Scratch::new("index-exact");
    let image = dir.path("disk.raw");
    std::fs::write(&image, pattern(1, SIZE as usize)).unwrap();
    let server = NbdFixture::start(&[("d", &image, false)]);
    let uri = server.uri("d");
    let clients: Vec<_> = (0..3u64)
        .map(|c| {
            let uri = uri.clone();
            thread::spawn(move || {
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for op in script(100 + c, 150) {
                    cmd.args(["-c", &op]);
                }
                cmd.arg(&uri);
                let out = run_ok(&mut cmd);
                assert!(!out.contains("failed"), "{out}");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("qemu-io client");
    }
    let file = File::open(&image).unwrap();
    let recomputed = hash_file(&file, SIZE).unwrap();
    let indexed = server.index.table(1).expect("export indexed");
    let stale: Vec<usize> = (0..recomputed.len())
        .filter(|&b| recomputed[b] != indexed[b])
        .collect();
    assert!(
        stale.is_empty(),
        "{} blocks disagree, first {:?}",
        stale.len(),
        &stale[..stale.len().min(8)]
    );
    // Every indexed content is found by lookup, at a block that really holds it.
    let data = std::fs::read(&image).unwrap();
    for (block, hash) in recomputed.iter().enumerate().step_by(97) {
        if let Some(h) = hash {
            let loc = server
                .index
                .lookup(h, &[1])
                .expect("indexed content is found");
            let at = loc.block as usize * 4096;
            assert_eq!(
                hash_block(&data[at..at + 4096]).as_ref(),
                Some(h),
                "block {block}"
            );
        }
    }
}
