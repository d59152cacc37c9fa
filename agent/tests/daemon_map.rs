//! The host daemon end to end, with the real binaries and real TCG guests that keep writing
//! their disks, during the migrations too.
//!
//! 1. Map-only, against storage that indexes nothing: the disk on qemu-nbd, `agent daemon`
//!    following the source QEMU from before its guest runs, `agent status` showing the RAM
//!    mirrored on storage, and `agent migrate --no-index` handed to the daemon: pages go out
//!    MAPPED from the map alone, and the guest carries on.
//! 3. Stale pages: once the map shows its read, the guest drops its page cache and fills the
//!    memory with random data; the map's claims for those pages are counted stale, never
//!    sent, and the guest carries on.
//! 4. Followed late: a guest that read its disk before the follow has almost nothing placed
//!    by the map; the savings of both runs are printed (the price of a late follow).
//! 2. The daemon killed: its map is lost, and `agent migrate` (same flags, the index path on
//!    nas-server) still migrates from its own process. Its savings and the map-only run's are
//!    within 3 points of each other.
//!
//! And map-only against a shared image file (set-up (c) of the telemetry issue): the guest's
//! disk is a raw file QEMU opens itself (`aio=threads`, and again with `aio=native`, whose
//! reads the daemon sees at io_submit and maps once landed), which both hosts see; the
//! migration names the export by the image's path, with no index anywhere, and the target
//! agent, allowed that directory with `--image-dir`, reads each mapped page from the file and
//! verifies it.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use support::{
    agent, follow_and_cont, follow_and_run, json_of, migrate_via, start_daemon, vm_status, wait_for,
};
use testkit::{
    free_port,
    qemu::{agent_qmp_dir, carried_on, exclusive, Guest, GuestSpec, Pair},
    require_root, require_tool, Running, Scratch,
};

mod support;

const MEM_MB: u32 = 384;
const READ_MB: u32 = 128;

/// How a guest's disk is: written during the migration too (the map must drop what the
/// writes make stale), or only read.
#[derive(Clone, Copy)]
enum Writes {
    Yes,
    No,
}

fn guest(dir: &Path, name: &str, uri: &str, incoming: bool, paused: bool, fill_mb: u32) -> Guest {
    guest_writing(dir, name, uri, (incoming, paused), fill_mb, Writes::Yes)
}

fn guest_writing(
    dir: &Path,
    name: &str,
    uri: &str,
    (incoming, paused): (bool, bool),
    fill_mb: u32,
    writes: Writes,
) -> Guest {
    Guest::start(
        dir,
        &GuestSpec {
            name,
            mem_mb: MEM_MB,
            read_mb: READ_MB,
            disk_uri: uri,
            disk_writes: matches!(writes, Writes::Yes),
            incoming,
            paused,
            prealloc: false,
            qemu: None,
            iothread: false,
            fill_mb,
            // The fill waits until the test saw the map built: "stale" means the memory was
            // reused after the daemon recorded it.
            fill_gate: fill_mb > 0,
            dirty_mb: 0,
            native_aio: false,
            fs_read: false,
        },
    )
}

/// A guest on `uri`, followed by the daemon from before it runs, past its first RAM checksum.
/// With `fill_mb`, its memory is reused only once the daemon's map shows its read.
fn followed_guest(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    name: &str,
    uri: &str,
    control: &Path,
    (fill_mb, writes): (u32, Writes),
) -> Guest {
    let g = guest_writing(dir, name, uri, (false, true), fill_mb, writes);
    if fill_mb == 0 {
        follow_and_run(rt, &g, control);
        return g;
    }
    follow_and_cont(rt, &g, control);
    g.wait_line("QEVAL-FILL-WAIT", 0, Duration::from_secs(240));
    // The guest is idle now: once two looks half a second apart agree, the daemon has taken
    // in every reply of the read.
    let mut last = u64::MAX;
    wait_for(
        "the map of the guest's read",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let mirrored = vm_status(control, &g.qmp_path)["mirrored_bytes"]
                .as_u64()
                .unwrap_or(0);
            let settled = mirrored == last && mirrored >= (u64::from(READ_MB) << 20) * 9 / 10;
            last = mirrored;
            settled
        },
    );
    g.release_fill();
    g.wait_line("QEVAL-READY", 0, Duration::from_secs(240));
    g
}

fn migrate(control: &Path, source: &Guest, target: &Guest, link: u16, nas: &str) -> Command {
    let mut cmd = migrate_via(control, source, target, link);
    cmd.args(["--export", "disk", "--nas-nbd", nas])
        // Savings here compare what the map and the index place: compression, which the
        // source turns on and off with the link's timing, would add several points of noise
        // to either side (62-72% over four runs of the same set-up).
        .args(["--zstd", "never"]);
    cmd
}

/// `agent migrate --no-index` through the daemon, against qemu-nbd on `nbd_port`: its report.
fn map_only_via(
    control: &Path,
    source: &Guest,
    target: &Guest,
    link: u16,
    nbd_port: u16,
) -> serde_json::Value {
    json_of(
        migrate(
            control,
            source,
            target,
            link,
            &format!("127.0.0.1:{nbd_port}"),
        )
        .arg("--no-index"),
    )
}

#[test]
fn the_daemons_map_migrates_against_qemu_nbd_and_its_loss_costs_no_correctness() {
    if !require_root("the_daemons_map_migrates_against_qemu_nbd_and_its_loss_costs_no_correctness")
    {
        return;
    }
    require_tool("qemu-nbd");
    let _qemu = exclusive();
    let dir = Scratch::new("daemon-map");
    let image = dir.image("disk.raw", 256 << 20);
    std::fs::write(&image, testkit::pattern(21, 256 << 20)).unwrap();
    std::fs::File::open(&image).unwrap().sync_all().unwrap();
    // Up to 32 clients: both guests and the target agent's fetchers.
    let (_nbd, nbd_port) = testkit::qemu_nbd(&image, &["-e", "32"]);
    let (control, link, daemon) = start_daemon(&dir, &[]);

    // 1. Followed from before the guest runs; the map built while it reads.
    let uri = format!("nbd://127.0.0.1:{nbd_port}/disk");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = followed_guest(&rt, &dir.0, "source", &uri, &control, (0, Writes::Yes));
    let blob = source.blob_sums()[0].clone();
    let status = json_of(
        agent()
            .args(["status", "--json", "--control"])
            .arg(&control),
    );
    let vm = &status["vms"][0];
    let mirrored = vm["mirrored_bytes"].as_u64().unwrap_or(0);
    eprintln!("status: {status:#}");
    assert!(
        mirrored >= (u64::from(READ_MB) << 20) * 9 / 10,
        "the map mirrors {mirrored} bytes; the guest read {READ_MB} MiB"
    );
    assert_eq!(status["drops"]["ring_full"], 0);
    let target = guest(&dir.0, "target", &uri, true, false, 0);
    let map_only = map_only_via(&control, &source, &target, link, nbd_port);
    eprintln!("map only: {map_only:#}");
    assert_eq!(map_only["ok"], true, "{map_only}");
    let pages_map = map_only["pages_map"].as_u64().unwrap_or(0);
    let read_pages = (u64::from(READ_MB) << 20) / 4096;
    assert!(
        pages_map >= read_pages * 9 / 10,
        "{pages_map} pages mapped from the map, of {read_pages} read"
    );
    assert_eq!(
        map_only["pages_mapped"], map_only["pages_map"],
        "no index was asked"
    );
    carried_on(&source, &target, &blob).unwrap_or_else(|e| panic!("map only: {e}"));
    drop((source, target));

    // 3. Stale pages are never announced: the guest drops its page cache and fills that memory
    //    with random data after the map was built; the map's claims for those pages no longer
    //    match, nothing is fetched for them, and the guest carries on.
    let source = followed_guest(&rt, &dir.0, "stale", &uri, &control, (160, Writes::Yes));
    let blob = source.blob_sums()[0].clone();
    // Started as its source was: the fill's gate is a serial port, a device in the stream.
    let target = guest(&dir.0, "stale-target", &uri, true, false, 160);
    let stale = map_only_via(&control, &source, &target, link, nbd_port);
    eprintln!("stale: {stale:#}");
    assert_eq!(stale["ok"], true, "{stale}");
    assert!(
        stale["pages_map_stale"].as_u64().unwrap_or(0) > 0,
        "no claim went stale: {stale}"
    );
    assert_eq!(
        stale["nas_bytes"].as_u64(),
        stale["pages_mapped"].as_u64().map(|p| p * 4096),
        "only pages sent MAPPED are fetched"
    );
    assert_eq!(stale["pages_fallback"], 0, "a stale page was announced");
    carried_on(&source, &target, &blob).unwrap_or_else(|e| panic!("stale: {e}"));
    drop((source, target));

    // 4. Followed late: the guest read its disk before the daemon followed it, so the map holds
    //    only what it wrote since, and the same map-only migration places almost nothing: the
    //    price of a late follow (README, Limitations), measured against step 1.
    let source = guest(&dir.0, "late", &uri, false, false, 0);
    source.wait_line("QEVAL-READY", 0, Duration::from_secs(240));
    let followed = support::follow(&control, &source.qmp_path);
    assert_eq!(followed["disks"][0]["followed"], true, "{followed}");
    let blob = source.blob_sums()[0].clone();
    let target = guest(&dir.0, "late-target", &uri, true, false, 0);
    let late = map_only_via(&control, &source, &target, link, nbd_port);
    eprintln!("followed late: {late:#}");
    assert_eq!(late["ok"], true, "{late}");
    let late_map = late["pages_map"].as_u64().unwrap_or(0);
    assert!(
        late_map < read_pages / 10,
        "{late_map} pages placed after a late follow, of {read_pages} read before it"
    );
    carried_on(&source, &target, &blob).unwrap_or_else(|e| panic!("late: {e}"));
    eprintln!(
        "map-only savings: followed from boot {:.1}% ({pages_map} pages placed), followed after \
         the read {:.1}% ({late_map})",
        map_only["savings_pct"].as_f64().unwrap_or(0.0),
        late["savings_pct"].as_f64().unwrap_or(0.0),
    );
    drop((source, target));

    // 2. The daemon dies; the same command migrates through the index path on its own.
    drop(daemon);
    assert!(control.exists(), "a killed daemon leaves its socket behind");
    let pair = Pair::start("daemon-gone", MEM_MB, READ_MB, true, false);
    let serve_port = free_port();
    let _serve = Running(
        agent()
            .args([
                "serve",
                "--insecure",
                "--link-listen",
                &format!("127.0.0.1:{serve_port}"),
            ])
            .arg("--qmp-dir")
            .arg(agent_qmp_dir(&pair.dir.0))
            .stdout(Stdio::null())
            .spawn()
            .expect("start agent serve"),
    );
    let server = pair.server.as_ref().expect("server running");
    let index = json_of(
        migrate(
            &control,
            &pair.source,
            &pair.target,
            serve_port,
            &server.addr.to_string(),
        )
        .args(["--nas-index", &server.index_addr.to_string()]),
    );
    eprintln!("index path, daemon gone: {index:#}");
    assert_eq!(index["ok"], true, "{index}");
    assert_eq!(index["pages_map"], 0);
    carried_on(&pair.source, &pair.target, &pair.blob).unwrap_or_else(|e| panic!("index: {e}"));
    let (a, b) = (
        map_only["savings_pct"].as_f64().unwrap(),
        index["savings_pct"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 3.0,
        "map-only saved {a:.1}%, the index path {b:.1}%: more than 3 points apart"
    );
}

#[test]
fn a_map_only_migration_reads_mapped_pages_from_a_shared_image_file() {
    if !require_root("a_map_only_migration_reads_mapped_pages_from_a_shared_image_file") {
        return;
    }
    shared_image_file(false);
}

#[test]
fn a_map_only_migration_reads_mapped_pages_from_a_shared_image_file_with_native_aio() {
    if !require_root(
        "a_map_only_migration_reads_mapped_pages_from_a_shared_image_file_with_native_aio",
    ) {
        return;
    }
    shared_image_file(true);
}

/// The source's disk is a raw file, opened with `aio=native` or QEMU's thread pool.
fn shared_image_file(native_aio: bool) {
    let _qemu = exclusive();
    let dir = Scratch::new("daemon-map-file");
    let shared = dir.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let image = shared.join("vm1.raw");
    std::fs::write(&image, testkit::pattern(33, 256 << 20)).unwrap();
    std::fs::File::open(&image).unwrap().sync_all().unwrap();
    let (control, link, _daemon) = start_daemon(&dir, &["--image-dir".as_ref(), shared.as_ref()]);
    let export = image.to_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Read-only guests: the file is both hosts' disk.
    let source = Guest::start(
        &dir.0,
        &GuestSpec {
            name: "source",
            mem_mb: MEM_MB,
            read_mb: READ_MB,
            disk_uri: export,
            paused: true,
            native_aio,
            ..GuestSpec::default()
        },
    );
    follow_and_run(&rt, &source, &control);
    if native_aio {
        let aio = vm_status(&control, &source.qmp_path)["aio"].clone();
        assert!(
            aio["submitted"].as_u64().is_some_and(|n| n > 0),
            "the daemon saw the reads at io_submit: {aio}"
        );
    }
    let blob = source.blob_sums()[0].clone();
    let target = guest_writing(&dir.0, "target", export, (true, false), 0, Writes::No);
    let report = json_of(
        migrate_via(&control, &source, &target, link)
            .args(["--export", export, "--no-index"])
            .args(["--zstd", "never"]),
    );
    eprintln!("map only, shared file: {report:#}");
    assert_eq!(report["ok"], true, "{report}");
    let read_pages = (u64::from(READ_MB) << 20) / 4096;
    let mapped = report["pages_map"].as_u64().unwrap_or(0);
    assert!(
        mapped >= read_pages * 9 / 10,
        "{mapped} pages mapped from the map, of {read_pages} read"
    );
    assert_eq!(
        report["pages_mapped"], report["pages_map"],
        "no index was asked"
    );
    // Every mapped page was read from the image and verified, or failed its verification and
    // was asked of the source again.
    let fallback = report["pages_fallback"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        report["nas_bytes"].as_u64(),
        Some((mapped - fallback) * 4096),
        "{report}"
    );
    if native_aio {
        // With aio=native no syscall says when a read landed: the daemon maps a read's pages
        // 5-10 ms after its submission (telemetry::aio). A page the guest freed and reused
        // within that time (its boot-time partition scan's, seen: 0 or 1 a run) pairs its
        // new content with the block and costs one fetch for nothing; at most one in 1000.
        assert!(fallback * 1000 <= mapped, "{report}");
    } else {
        // Pages are read as their pread returns: none had to be asked again.
        assert_eq!(fallback, 0, "{report}");
    }
    carried_on(&source, &target, &blob).unwrap_or_else(|e| panic!("{e}"));
}
