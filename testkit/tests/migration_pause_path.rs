//! The pause path stays byte-identical: a stream whose final iteration (the `ram` END
//! section, sent while the guest is paused) is large, through both agents' pipelines, with
//! the link paced to a cap that is lifted at a random moment (as `agent migrate` lifts it on
//! the source QEMU's STOP event) or only when the source reaches the switchover, QEMU's stream
//! split into reads at pseudo-random points, and the link's buffer small or large. Every
//! variation must deliver exactly the bytes QEMU sent. The final iteration goes out as QEMU
//! sent it while the link keeps up, deduplicated once the link holds the stream up (a slow
//! link), and always deduplicated when so configured: each form, and the switch between them,
//! must rebuild the same bytes.
use std::{sync::Arc, time::Duration};

use agent::migration::{
    pace::Cap,
    source::SourceConfig,
    stream::{synthetic::Builder, PAGE_SIZE},
    target::TargetConfig,
};
use testkit::{
    nbd_fixture::NbdFixture,
    pattern,
    roundtrip::{round_trip, Link},
    Scratch,
};

const DISK: usize = 32 << 20;
const PRECOPY_PAGES: u64 = 2048;
const FINAL_PAGES: u64 = 4096;

/// Page `i` of a mix: disk blocks (the NAS holds them: MAPPED), repeats (DUP), content no one
/// holds (PAGE), and zero pages (QEMU's ZERO records).
fn content(disk: &[u8], i: u64, salt: u64) -> Option<[u8; PAGE_SIZE]> {
    let mut page = [0u8; PAGE_SIZE];
    match i % 5 {
        0 | 1 => {
            let block = ((i * 7919) % (DISK / PAGE_SIZE) as u64) as usize * PAGE_SIZE;
            page.copy_from_slice(&disk[block..block + PAGE_SIZE]);
        }
        2 => page[..8].copy_from_slice(&(i % 13).to_le_bytes()),
        3 => {
            page[..8].copy_from_slice(&i.to_le_bytes());
            page[8..16].copy_from_slice(&salt.to_le_bytes());
            page[100] = 0x5a;
        }
        _ => return None,
    }
    Some(page)
}

/// One pre-copy pass over `PRECOPY_PAGES`, then a final iteration of `FINAL_PAGES` (the guest
/// rewrote them while paused, as far as the stream is concerned), device state and EOF.
fn stream(disk: &[u8]) -> Vec<u8> {
    let pages = PRECOPY_PAGES + FINAL_PAGES;
    let mut b = Builder::new();
    b.ram_start(&[("pc.ram", pages * PAGE_SIZE as u64)]);
    // Pre-copy: PART sections of 256 pages, as QEMU sends them while the guest runs.
    for i in 0..PRECOPY_PAGES {
        if i % 256 == 0 {
            if i > 0 {
                b.eos_footer();
            }
            b.ram_part(false);
        }
        page(&mut b, disk, i, (i % 256 == 0).then_some("pc.ram"), 1);
    }
    b.eos_footer();
    // The final iteration: one END section, as QEMU's completion writes it.
    b.ram_part(true);
    for i in 0..FINAL_PAGES {
        page(&mut b, disk, i, (i == 0).then_some("pc.ram"), 2);
    }
    b.eos_footer();
    b.devices_and_eof();
    b.bytes
}

fn page(b: &mut Builder, disk: &[u8], i: u64, block: Option<&str>, salt: u64) {
    let addr = i * PAGE_SIZE as u64;
    match content(disk, i, salt) {
        Some(payload) => b.page(block, addr, &payload),
        None => b.zero(block, addr),
    }
}

#[test]
fn a_large_final_iteration_rebuilds_byte_for_byte() {
    let dir = Scratch::new("pause-path");
    let disk_path = dir.path("disk.raw");
    let disk = pattern(31, DISK);
    std::fs::write(&disk_path, &disk).unwrap();
    let server = NbdFixture::start(&[("disk", &disk_path, false)]);
    let stream = Arc::new(stream(&disk));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The final iteration's form: whole while the link keeps up, or always deduplicated.
    #[derive(PartialEq)]
    enum Final {
        Whole,
        Slow,
        Dedup,
    }
    let cases = [
        // (seed, link buffer, ms after which the cap is lifted from outside, form)
        (1, 1 << 16, Some(0), Final::Whole),
        (2, 997, Some(40), Final::Whole),
        (3, 1 << 20, Some(90), Final::Whole),
        (4, 1 << 16, None, Final::Whole),
        (5, 4093, Some(15), Final::Whole),
        (6, 1 << 16, Some(0), Final::Dedup),
        (7, 1 << 16, None, Final::Slow),
    ];
    for (seed, buf, lift_after, form) in cases {
        let mut source = SourceConfig::new(
            "vm",
            vec!["disk".into()],
            &server.addr.to_string(),
            Some(server.index_addr.clone()),
        );
        // 80 MB/s: the ~25 MiB stream takes a few hundred ms, so the lift lands mid-stream.
        let cap = Arc::new(Cap::new(Some(80_000_000)));
        source.link_cap = cap.clone();
        source.whole_when_paused = form != Final::Dedup;
        let link = Link {
            buf,
            // Slower than the final iteration's pages whole (16 MiB): the link holds it up.
            rate: (form == Final::Slow).then_some(40_000_000),
            qemu_rate: None,
            seed,
        };
        let run = rt.block_on(async {
            let lifter = lift_after.map(|ms| {
                let cap = cap.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    cap.lift();
                })
            });
            let run = round_trip(stream.clone(), source, TargetConfig::default(), link).await;
            if let Some(l) = lifter {
                l.await.unwrap();
            }
            run
        });
        assert!(
            run.out == *stream,
            "seed {seed}: the target delivered {} bytes that differ from the {} QEMU sent",
            run.out.len(),
            stream.len()
        );
        let f = &run.source;
        assert!(f.pages_mapped > 0, "seed {seed}: nothing mapped: {f:?}");
        assert!(f.pages_dup > 0 && f.pages_sent > 0, "seed {seed}: {f:?}");
        assert!(
            f.paused_qemu_bytes >= FINAL_PAGES * PAGE_SIZE as u64 / 2,
            "seed {seed}: the switchover was not seen before the final iteration: {f:?}"
        );
        assert!(
            cap.pacing().is_none(),
            "seed {seed}: the cap was not lifted"
        );
        assert_eq!(run.target.fallbacks, 0, "seed {seed}");
        eprintln!(
            "seed {seed}: {} of the final iteration's {FINAL_PAGES} pages went whole",
            f.pages_verbatim
        );
        match form {
            // The in-process link keeps up with anything: most go whole (the first reads after
            // the switchover may still find a hold-up the backlog met).
            Final::Whole => assert!(f.pages_verbatim > 0, "seed {seed}: {f:?}"),
            // At 40 MB/s the link window fills within ~50 ms of the switchover: from then on,
            // deduplicated.
            Final::Slow => assert!(
                f.pages_verbatim < FINAL_PAGES / 2,
                "seed {seed}: the slow link did not bring deduplication back: {f:?}"
            ),
            Final::Dedup => assert_eq!(f.pages_verbatim, 0, "seed {seed}"),
        }
    }
}
