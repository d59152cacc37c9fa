//! The memory-to-disk map on real TCG guests, built from QEMU's own syscalls: a guest reads
//! 128 MiB of its disk into its page cache, and the map built while it did must cover at least
//! 90% of the guest pages that the offline ideal finds on the disk (every page of guest RAM
//! whose content equals a 4 KiB-aligned block of the disk), with every entry exact: the page
//! still hashes to what the map recorded, and so does the disk block it names.
//!
//! Six set-ups: (a) the disk on nas-server over QEMU's NBD client, and (a') the same with the
//! disk on an I/O thread, (b) the same image on qemu-nbd, and (b') on qemu-nbd over a unix
//! socket (QEMU's fd matched by the path it is connected to), (c) the image opened by QEMU as a raw
//! file (`aio=threads`), and (c') the same with `aio=native` (io_submit, O_DIRECT: reads are
//! seen at submission and mapped once they have landed).
use std::{
    collections::HashSet,
    path::Path,
    time::{Duration, Instant},
};

use agent::{
    qmp::Qmp,
    telemetry::{
        memmap::{PageReader, ProcessMemory},
        track::VmTrack,
        vm::Vm,
        IoFollower, ObjectSource,
    },
};
use agent_common::syscalls::SyscallDrop;
use blockhash::{hash_block, Hash};
use testkit::{
    nbd_fixture::NbdFixture,
    qemu::{exclusive, Guest, GuestSpec},
    require_root, require_tool, Scratch,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 256 * MIB;
const READ_MB: u32 = 128;
const PAGE: usize = 4096;

struct Coverage {
    ideal: usize,
    mapped_exact: usize,
    covered: usize,
    stale: usize,
    entries: usize,
}

/// How QEMU does the disk's I/O.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    MainLoop,
    IoThread,
    NativeAio,
}

/// Boots a paused guest on `disk_uri`, follows it from before it runs, lets it read, and
/// measures the map against the offline ideal.
fn measure(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    image: &Path,
    disk_uri: &str,
    via: Via,
) -> Coverage {
    let guest = Guest::start(
        dir,
        &GuestSpec {
            name: "mapped",
            mem_mb: 384,
            read_mb: READ_MB,
            disk_uri,
            disk_writes: false,
            incoming: false,
            paused: true,
            prealloc: false,
            qemu: None,
            iothread: via == Via::IoThread,
            fill_mb: 0,
            fill_gate: false,
            dirty_mb: 0,
            native_aio: via == Via::NativeAio,
            fs_read: false,
        },
    );
    let _entered = rt.enter();
    let mut follower = IoFollower::attach(&ObjectSource::Embedded)
        .unwrap_or_else(|e| panic!("cannot attach the syscall tracepoints: {e}"));
    let mut qmp = rt.block_on(Qmp::connect(&guest.qmp_path)).expect("QMP");
    let vm = rt.block_on(Vm::inspect(&mut qmp)).expect("inspect the VM");
    assert_eq!(vm.pid, guest.pid(), "SO_PEERCRED names the QEMU process");
    assert!(
        !vm.fds.is_empty(),
        "no fd of QEMU matched its disk {:?}",
        vm.disks
    );
    let mut track = VmTrack::new(vm);
    for key in track.keys() {
        follower.follow(key).unwrap();
    }
    rt.block_on(qmp.execute("cont", None)).expect("cont");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut events = Vec::new();
    let mut done_at: Option<Instant> = None;
    // Events are taken as they come, so pages are read right after their data landed.
    while done_at.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
        assert!(
            Instant::now() < deadline,
            "the guest never finished reading"
        );
        events.clear();
        let _ = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(200),
                follower.next_events(&mut events),
            )
            .await
        });
        for ev in &events {
            track.event(ev);
        }
        if done_at.is_none() && guest.serial().contains("QEVAL-READ-DONE") {
            done_at = Some(Instant::now());
        }
    }
    rt.block_on(qmp.execute("stop", None)).expect("stop");
    events.clear();
    follower.drain(&mut events);
    for ev in &events {
        track.event(ev);
    }
    // QEMU drained its I/O when it stopped: every read submitted has landed.
    track.settle(None);
    let drops = follower.drops().unwrap();
    assert_eq!(
        drops[SyscallDrop::RingFull as usize],
        0,
        "events were lost: {drops:?}"
    );
    eprintln!(
        "{disk_uri}: {} events, decode {:?}, map {:?}, aio {:?}, drops {drops:?}, {} entries, \
         {} KiB of tables",
        track.events(),
        track.decode_stats(),
        track.map().stats(),
        track.aio_stats(),
        track.map().len(),
        track.map().memory_bytes() >> 10
    );
    assert_eq!(track.decode_stats().desyncs, 0);
    let aio = track.aio_stats();
    assert_eq!(
        aio.submitted > 0,
        via == Via::NativeAio,
        "reads were seen at io_submit exactly when QEMU used aio=native: {aio:?}"
    );
    assert_eq!(aio.pending, 0);
    assert_eq!(drops[SyscallDrop::AioOverflow as usize], 0, "{drops:?}");

    // The offline ideal: every page of guest RAM equal to some aligned block of the disk.
    let disk = std::fs::read(image).expect("read the image");
    let disk_hashes: HashSet<Hash> = disk.chunks_exact(PAGE).filter_map(hash_block).collect();
    let ram = &track.vm().blocks[0];
    assert_eq!(ram.name, "pc.ram");
    let mut memory = ProcessMemory { pid: guest.pid() };
    let mut page_hashes: Vec<Option<Hash>> = Vec::with_capacity((ram.len / PAGE as u64) as usize);
    let mut chunk = vec![0u8; 4 * MIB as usize];
    for start in (0..ram.len).step_by(chunk.len()) {
        let n = (ram.len - start).min(chunk.len() as u64) as usize;
        memory
            .read(ram.host + start, &mut chunk[..n])
            .expect("read guest RAM");
        page_hashes.extend(chunk[..n].chunks_exact(PAGE).map(hash_block));
    }
    let ideal: HashSet<u64> = page_hashes
        .iter()
        .enumerate()
        .filter(|(_, h)| h.is_some_and(|h| disk_hashes.contains(&h)))
        .map(|(i, _)| i as u64)
        .collect();
    let (mut mapped_exact, mut covered, mut stale) = (0, 0, 0usize);
    for (key, entry) in track.map().entries() {
        if key.block != 0 {
            continue;
        }
        let page_now = page_hashes[key.page as usize];
        let at = entry.offset as usize;
        let block = hash_block(&disk[at..at + PAGE]);
        if page_now == Some(entry.hash) && block == Some(entry.hash) {
            mapped_exact += 1;
            if ideal.contains(&key.page) {
                covered += 1;
            }
        } else {
            stale += 1;
            if stale > 10 {
                continue;
            }
            eprintln!(
                "{disk_uri}: stale entry: page {:#x} -> disk {:#x}; the page {}, the block {}",
                key.page * PAGE as u64,
                entry.offset,
                if page_now == Some(entry.hash) {
                    "matches"
                } else {
                    "differs"
                },
                if block == Some(entry.hash) {
                    "matches"
                } else {
                    "differs"
                },
            );
        }
    }
    Coverage {
        ideal: ideal.len(),
        mapped_exact,
        covered,
        stale,
        entries: track.map().len(),
    }
}

fn check(what: &str, c: &Coverage) {
    let pct = 100.0 * c.covered as f64 / c.ideal.max(1) as f64;
    eprintln!(
        "{what}: ideal {} pages, map {} entries ({} exact, {} stale), covers {} = {pct:.1}%",
        c.ideal, c.entries, c.mapped_exact, c.stale, c.covered
    );
    assert!(
        c.ideal as u64 >= u64::from(READ_MB) * MIB / 4096 / 2,
        "{what}: the guest holds too little of its disk ({} pages) to measure",
        c.ideal
    );
    assert!(
        pct >= 90.0,
        "{what}: the map covers {pct:.1}% of the ideal, below 90%"
    );
    // Stale entries are allowed (the source checks each page's hash before it trusts one),
    // but a map mostly stale would be worth nothing.
    assert!(
        c.stale * 20 <= c.entries,
        "{what}: {} of {} entries are stale",
        c.stale,
        c.entries
    );
}

#[test]
fn the_map_covers_a_guests_page_cache_on_nbd_and_on_a_file() {
    if !require_root("the_map_covers_a_guests_page_cache_on_nbd_and_on_a_file") {
        return;
    }
    require_tool("qemu-nbd");
    let _qemu = exclusive();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let dir = Scratch::new("memory-map");
    let image = dir.image("disk.raw", DISK);
    std::fs::write(&image, testkit::pattern(77, DISK as usize)).unwrap();
    std::fs::File::open(&image).unwrap().sync_all().unwrap();

    // (a) nas-server.
    let server = NbdFixture::start(&[("disk", &image, false)]);
    let a = measure(&rt, &dir.0, &image, &server.uri("disk"), Via::MainLoop);
    // (a') the same with the disk on an I/O thread: headers and payloads read by other threads.
    let a_io = measure(&rt, &dir.0, &image, &server.uri("disk"), Via::IoThread);
    drop(server);
    // (b) qemu-nbd, no index anywhere.
    let (nbd, port) = testkit::qemu_nbd(&image, &[]);
    let b = measure(
        &rt,
        &dir.0,
        &image,
        &format!("nbd://127.0.0.1:{port}/disk"),
        Via::MainLoop,
    );
    drop(nbd);
    // (b') qemu-nbd on a unix socket: QEMU's socket is matched by the path it is connected to.
    let socket = dir.path("nbd.sock");
    let nbd = testkit::qemu_nbd_unix(&image, &socket);
    let b_unix = measure(
        &rt,
        &dir.0,
        &image,
        &format!("nbd+unix:///disk?socket={}", socket.display()),
        Via::MainLoop,
    );
    drop(nbd);
    // (c) the raw file.
    let file = image.display().to_string();
    let c = measure(&rt, &dir.0, &image, &file, Via::MainLoop);
    // (c') the raw file with aio=native.
    let c_native = measure(&rt, &dir.0, &image, &file, Via::NativeAio);
    check("nas-server", &a);
    check("nas-server, iothread", &a_io);
    check("qemu-nbd", &b);
    check("qemu-nbd, unix socket", &b_unix);
    check("raw file", &c);
    check("raw file, aio=native", &c_native);
}
