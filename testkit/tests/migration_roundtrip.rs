//! Source agent then target agent rebuild a real QEMU migration stream byte for byte: with the
//! NAS present, absent, serving changed blocks, with the link and QEMU's stream split at
//! arbitrary points, and from a stream QEMU ended mid-record. The stream is recorded from a real TCG guest booted on the NAS export.
use std::sync::Arc;

use agent::migration::{
    compress::Compression,
    pace::{Cap, BURST},
    pagemap::{Claim, PageMap, SharedMap},
    source::SourceConfig,
    stream::{Sink, StreamParser, PAGE_SIZE},
    target::TargetConfig,
};
use nas_proto::Endpoint;
use testkit::{
    nbd_fixture::NbdFixture,
    pattern,
    qemu::record_stream,
    require_root,
    roundtrip::{round_trip, Link, Run},
    Scratch,
};

const DISK: usize = 128 << 20;

/// The round trips check deduplication in every section, the final iteration included: it
/// is deduplicated even when the link keeps up (`migration_pause_path` covers the other form).
fn source_config(server: &NbdFixture) -> SourceConfig {
    let mut config = SourceConfig::new(
        "vm",
        vec!["disk".into()],
        &server.addr.to_string(),
        Some(server.index_addr.clone()),
    );
    config.whole_when_paused = false;
    config
}

fn recorded(
    dir: &Scratch,
    server: &NbdFixture,
    mem_mb: u32,
    read_mb: u32,
    qemu: Option<&std::path::Path>,
) -> Arc<Vec<u8>> {
    let path = dir.path("stream.bin");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(record_stream(
            &dir.0,
            &server.uri("disk"),
            mem_mb,
            read_mb,
            &path,
            qemu,
        ));
    Arc::new(std::fs::read(&path).unwrap())
}

/// An offset inside the payload of the first PAGE record at or after `from`.
fn inside_a_page(stream: &[u8], from: usize) -> usize {
    struct Payloads {
        at: usize,
        starts: Vec<usize>,
    }
    impl Sink for Payloads {
        fn verbatim(&mut self, bytes: &[u8]) {
            self.at += bytes.len();
        }
        fn page(&mut self, _: &[u8; PAGE_SIZE]) {
            self.starts.push(self.at);
            self.at += PAGE_SIZE;
        }
    }
    let mut p = Payloads {
        at: 0,
        starts: Vec::new(),
    };
    StreamParser::new().feed(stream, &mut p);
    let start = p
        .starts
        .into_iter()
        .find(|&s| s >= from)
        .expect("a page after the middle of the stream");
    start + 1234
}

/// A memory-to-disk map made offline from a stream and its disk: a claim for every page whose
/// content is a block of the disk, some made stale and some pointed at the wrong block.
struct ClaimMap {
    claims: std::collections::HashMap<(String, u64), Claim>,
    /// Distinct pages whose claim was made stale, or pointed at the wrong block.
    stale: u64,
    wrong_block: u64,
}

impl ClaimMap {
    fn from_stream(stream: &[u8], disk: &[u8]) -> Self {
        let blocks: std::collections::HashMap<[u8; 32], u64> = disk
            .chunks_exact(4096)
            .enumerate()
            .filter_map(|(i, b)| blockhash::hash_block(b).map(|h| (h, i as u64 * 4096)))
            .collect();
        struct Pages<'a> {
            at: Option<(String, u64)>,
            blocks: &'a std::collections::HashMap<[u8; 32], u64>,
            map: ClaimMap,
        }
        impl Sink for Pages<'_> {
            fn verbatim(&mut self, _: &[u8]) {}
            fn page_at(&mut self, block: &str, offset: u64) {
                self.at = Some((block.to_string(), offset));
            }
            fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
                let at = self.at.take().expect("page_at before page");
                let hash = blockhash::hash(payload);
                let Some(&offset) = self.blocks.get(&hash) else {
                    return;
                };
                // Spoiled by where the page sits, so a page seen twice is spoiled both times.
                let mut claim = Claim {
                    export: 0,
                    offset,
                    hash,
                };
                match (at.1 / 4096) % 10 {
                    3 => claim.hash[0] ^= 1,
                    7 => claim.offset = (offset + 4096) % (128 << 20),
                    _ => {}
                }
                self.map.claims.insert(at, claim);
            }
        }
        let mut pages = Pages {
            at: None,
            blocks: &blocks,
            map: ClaimMap {
                claims: std::collections::HashMap::new(),
                stale: 0,
                wrong_block: 0,
            },
        };
        StreamParser::new().feed(stream, &mut pages);
        let mut map = pages.map;
        for (_, offset) in map.claims.keys() {
            match (offset / 4096) % 10 {
                3 => map.stale += 1,
                7 => map.wrong_block += 1,
                _ => {}
            }
        }
        map
    }

    fn len(&self) -> usize {
        self.claims.len()
    }
}

impl PageMap for ClaimMap {
    fn claim(&self, block: &str, offset: u64) -> Option<Claim> {
        self.claims.get(&(block.to_string(), offset)).copied()
    }
}

fn check(run: &Run, stream: &[u8], what: &str) {
    eprintln!("{what}: {:?}", run.source);
    assert_eq!(run.out.len(), stream.len(), "{what}: length differs");
    assert!(
        run.out == stream,
        "{what}: rebuilt stream differs from QEMU's"
    );
}

#[test]
fn real_streams_rebuild_byte_for_byte() {
    if !require_root("real_streams_rebuild_byte_for_byte") {
        return;
    }
    let _qemu = testkit::qemu::exclusive();
    let dir = Scratch::new("roundtrip");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, pattern(11, DISK)).unwrap();
    let server = NbdFixture::start(&[("disk", &disk, false)]);
    let stream = recorded(&dir, &server, 192, 48, None);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. NAS present: most page-cache pages travel as mappings.
    let run = rt.block_on(round_trip(
        stream.clone(),
        source_config(&server),
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "NAS present");
    eprintln!(
        "NAS present: source {:?}\ntarget {:?}",
        run.source, run.target
    );
    // The guest read 48 MiB of its disk: nearly all of that page cache must be mapped.
    let read_pages = (48u64 << 20) / 4096;
    assert!(
        run.source.pages_mapped >= read_pages * 95 / 100,
        "only {} pages mapped of {read_pages} read",
        run.source.pages_mapped
    );
    assert_eq!(run.target.fallbacks, 0);
    assert_eq!(run.target.nas_bytes, run.source.pages_mapped * 4096);
    // Each mapped page saves its 4 KiB minus the 53-byte MAPPED frame.
    let saved = run.source.qemu_bytes - run.source.link_bytes;
    assert!(
        saved >= run.source.pages_mapped * (4096 - 64),
        "link {} of {} QEMU bytes for {} mapped pages",
        run.source.link_bytes,
        run.source.qemu_bytes,
        run.source.pages_mapped
    );

    // 2. NAS unreachable from the target: every mapped page comes back from the source.
    let gone = TargetConfig {
        nas_override: Some(Endpoint::Tcp("127.0.0.1:1".parse().unwrap())),
        ..TargetConfig::default()
    };
    let run = rt.block_on(round_trip(
        stream.clone(),
        source_config(&server),
        gone,
        1 << 16,
    ));
    check(&run, &stream, "NAS absent");
    assert!(run.source.pages_mapped > 0);
    assert_eq!(run.target.fallbacks, run.source.pages_mapped);

    // 3. Blocks changed between lookup and fetch: the target reads a NAS whose first 8 MiB
    //    differ, detects the mismatch by hash, and falls back for exactly those pages.
    let stale = dir.path("stale.raw");
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[..8 << 20].copy_from_slice(&pattern(12, 8 << 20));
    std::fs::write(&stale, &bytes).unwrap();
    let stale_server = NbdFixture::start(&[("disk", &stale, false)]);
    let changed = TargetConfig {
        nas_override: Some(stale_server.listen()),
        ..TargetConfig::default()
    };
    let run = rt.block_on(round_trip(
        stream.clone(),
        source_config(&server),
        changed,
        1 << 16,
    ));
    check(&run, &stream, "blocks overwritten");
    assert!(run.target.fallbacks > 0, "no page was in the changed range");
    assert!(run.target.fallbacks < run.source.pages_mapped);

    // 4. A link that splits writes at odd points (997-byte pipe), and zstd on every batch
    //    (those that would not shrink go as they are).
    let mut zstd = source_config(&server);
    zstd.zstd = Compression::Always;
    let run = rt.block_on(round_trip(
        stream.clone(),
        zstd,
        TargetConfig::default(),
        997,
    ));
    check(&run, &stream, "small link buffer + zstd");
    let f = &run.source;
    assert!(
        f.zstd_in_bytes > 0 && f.zstd_out_bytes < f.zstd_in_bytes,
        "compressed {} into {}",
        f.zstd_in_bytes,
        f.zstd_out_bytes
    );

    // 5. Tight flow control: the link-byte window binds on nearly every frame and the stream
    //    window often; the transfer must neither stall nor change a byte.
    let mut tight = source_config(&server);
    tight.link_window_bytes = 16 << 10;
    tight.stream_window_bytes = 3 << 20;
    let run = rt.block_on(round_trip(
        stream.clone(),
        tight,
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "tight windows");
    assert_eq!(run.target.fallbacks, 0);

    // 6. A slow link (40 MB/s): the stream waits for it, so the default `auto` compresses.
    let slow = Link {
        buf: 1 << 16,
        rate: Some(40_000_000),
        qemu_rate: None,
        seed: 7,
    };
    let auto = source_config(&server);
    assert_eq!(auto.zstd, Compression::Auto);
    let run = rt.block_on(round_trip(
        stream.clone(),
        auto,
        TargetConfig::default(),
        slow,
    ));
    check(&run, &stream, "slow link, zstd auto");
    let f = &run.source;
    assert!(
        f.zstd_in_bytes > 0 && f.zstd_out_bytes < f.zstd_in_bytes,
        "auto on a slow link compressed {} into {}",
        f.zstd_in_bytes,
        f.zstd_out_bytes
    );

    // 6b. A slow target QEMU (40 MB/s) behind a fast link: the stream waits for the target,
    //     where the bytes have already arrived, so compressing would gain nothing and `auto`
    //     does not.
    let slow_target = Link {
        buf: 1 << 16,
        rate: None,
        qemu_rate: Some(40_000_000),
        seed: 7,
    };
    let run = rt.block_on(round_trip(
        stream.clone(),
        source_config(&server),
        TargetConfig::default(),
        slow_target,
    ));
    check(&run, &stream, "slow target QEMU, zstd auto");
    assert_eq!(
        (run.source.zstd_in_bytes, run.source.zstd_out_bytes),
        (0, 0),
        "auto compressed behind a slow target"
    );

    // 7. Compression off: nothing compressed, even behind a tight window.
    let mut never = source_config(&server);
    never.link_window_bytes = 16 << 10;
    never.zstd = Compression::Never;
    let run = rt.block_on(round_trip(
        stream.clone(),
        never,
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "zstd never");
    assert_eq!(
        (run.source.zstd_in_bytes, run.source.zstd_out_bytes),
        (0, 0)
    );

    // 8. No index service at all: everything goes in full, still identical.
    let plain = SourceConfig::new("vm", vec![], &server.addr.to_string(), None);
    let run = rt.block_on(round_trip(
        stream.clone(),
        plain,
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "no index");
    assert_eq!(run.source.pages_mapped, 0);

    // 8a. Map-only: no index service, a memory-to-disk map's claims for every page whose
    //     content is on the disk. Every tenth claim is stale (its hash is not the page's):
    //     those pages go in full and are counted. Every tenth other claim names the right
    //     hash but a block that holds something else (overwritten since): the target's check
    //     fails and the source sends those pages as fallbacks. The stream stays identical.
    let claims = ClaimMap::from_stream(&stream, &std::fs::read(&disk).unwrap());
    let (claimed, stale, wrong_block) = (claims.len(), claims.stale, claims.wrong_block);
    let mut map_only = source_config(&server);
    map_only.nas_index = None;
    map_only.page_map = Some(SharedMap(Arc::new(claims)));
    let run = rt.block_on(round_trip(
        stream.clone(),
        map_only,
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "map only");
    eprintln!(
        "map only: {claimed} claims ({stale} stale, {wrong_block} to the wrong block): \
         source {:?}\ntarget {:?}",
        run.source, run.target
    );
    assert!(run.source.pages_map > 0);
    assert_eq!(
        run.source.pages_map, run.source.pages_mapped,
        "no index was asked"
    );
    assert!(run.source.pages_map_stale >= stale, "{:?}", run.source);
    assert!(
        run.target.fallbacks >= wrong_block.min(1),
        "{:?}",
        run.target
    );
    assert!(
        run.source.pages_map + run.source.pages_dup + run.source.pages_map_stale
            >= (claimed as u64) * 9 / 10,
        "claims for {claimed} pages, {:?}",
        run.source
    );

    // 8b. A stream QEMU ended mid-record (as a failed migration's ends): every byte it sent
    //     still arrives, the record cut short included. The cut lands inside a page payload.
    let cut = Arc::new(stream[..inside_a_page(&stream, stream.len() / 2)].to_vec());
    let run = rt.block_on(round_trip(
        cut.clone(),
        source_config(&server),
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &cut, "stream cut mid-record");

    // 9. A bandwidth cap holds the link to it: forwarded verbatim (so the cap holds to the
    //    end; with pages rewritten it is lifted at the switchover), the stream cannot cross
    //    faster than the cap allows, give or take one burst and one batch.
    const CAP: u64 = 40_000_000;
    let mut capped = source_config(&server);
    capped.rewrite = false;
    capped.link_cap = Arc::new(Cap::new(Some(CAP)));
    let start = std::time::Instant::now();
    let run = rt.block_on(round_trip(
        stream.clone(),
        capped,
        TargetConfig::default(),
        1 << 16,
    ));
    let took = start.elapsed();
    check(&run, &stream, "link capped");
    let slack = (1 << 20) as f64 + CAP as f64 * BURST.as_secs_f64();
    let fastest = (run.source.link_bytes as f64 - slack) / CAP as f64;
    assert!(
        took.as_secs_f64() >= fastest,
        "{} link bytes crossed in {took:?}: faster than {CAP} bytes/s",
        run.source.link_bytes
    );
}

/// Debian bookworm's QEMU 7.2 writes the same layout: its streams are parsed and rebuilt too.
#[test]
fn qemu_7_2_streams_rebuild_byte_for_byte() {
    if !require_root("qemu_7_2_streams_rebuild_byte_for_byte") {
        return;
    }
    let _qemu = testkit::qemu::exclusive();
    let dir = Scratch::new("roundtrip-7.2");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, pattern(13, 64 << 20)).unwrap();
    let server = NbdFixture::start(&[("disk", &disk, false)]);
    let binary = testkit::qemu::qemu72_binary();
    let stream = recorded(&dir, &server, 128, 16, Some(&binary));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let run = rt.block_on(round_trip(
        stream.clone(),
        source_config(&server),
        TargetConfig::default(),
        1 << 16,
    ));
    check(&run, &stream, "QEMU 7.2");
    let read_pages = (16u64 << 20) / 4096;
    assert!(
        run.source.pages_mapped >= read_pages * 95 / 100,
        "QEMU 7.2 stream: only {} pages mapped of {read_pages} read",
        run.source.pages_mapped
    );
}
