//! Map-only against a shared image file (set-up (c) of the telemetry issue): the guest's disk
//! is a raw file QEMU opens itself (`aio=threads`), which both hosts see. `agent daemon`
//! follows the source QEMU's preads from before its guest runs; the migration names the export
//! by the image's path, with no index anywhere; the target agent, allowed that directory with
//! `--image-dir`, reads each mapped page from the file and verifies it; the guest carries on.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::qmp::Qmp;
use serde_json::Value;
use testkit::{
    free_port,
    qemu::{agent_qmp_dir, carried_on, exclusive, Guest, GuestSpec},
    require_root, Running, Scratch,
};

const MEM_MB: u32 = 384;
const READ_MB: u32 = 128;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.env("RUST_LOG", "info");
    cmd
}

fn json_of(cmd: &mut Command) -> Value {
    let out = cmd.stderr(Stdio::inherit()).output().expect("run agent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd:?} printed no JSON ({e}): {text}"))
}

fn guest(dir: &Path, name: &str, image: &Path, incoming: bool) -> Guest {
    Guest::start(
        dir,
        &GuestSpec {
            name,
            mem_mb: MEM_MB,
            read_mb: READ_MB,
            disk_uri: image.to_str().unwrap(),
            disk_writes: false,
            incoming,
            // The source starts paused, to be followed before its guest reads anything.
            paused: !incoming,
            prealloc: false,
            qemu: None,
            iothread: false,
            fill_mb: 0,
        },
    )
}

#[test]
fn a_map_only_migration_reads_mapped_pages_from_a_shared_image_file() {
    if !require_root("a_map_only_migration_reads_mapped_pages_from_a_shared_image_file") {
        return;
    }
    let _qemu = exclusive();
    let dir = Scratch::new("daemon-map-file");
    let shared = dir.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let image = shared.join("vm1.raw");
    std::fs::write(&image, testkit::pattern(33, 256 << 20)).unwrap();
    std::fs::File::open(&image).unwrap().sync_all().unwrap();
    let (control, link) = (dir.path("control.sock"), free_port());
    let _daemon = Running(
        agent()
            .args(["daemon", "--insecure"])
            .arg("--control")
            .arg(&control)
            .args(["--link-listen", &format!("127.0.0.1:{link}")])
            .arg("--qmp-dir")
            .arg(agent_qmp_dir(&dir.0))
            .arg("--image-dir")
            .arg(&shared)
            .stdout(Stdio::null())
            .spawn()
            .expect("start agent daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !control.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }

    let source = guest(&dir.0, "source", &image, false);
    let followed = json_of(
        agent()
            .args(["follow", "--qmp"])
            .arg(&source.qmp_path)
            .arg("--control")
            .arg(&control),
    );
    assert_eq!(followed["disks"][0]["followed"], true, "{followed}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut q = Qmp::connect(&source.qmp_path).await.expect("QMP");
        q.execute("cont", None).await.expect("cont");
    });
    source.wait_line("QEVAL-READY", 0, Duration::from_secs(180));
    let blob = source.blob_sums()[0].clone();

    let target = guest(&dir.0, "target", &image, true);
    let export = image.to_str().unwrap();
    let report = json_of(
        agent()
            .arg("migrate")
            .arg("--control")
            .arg(&control)
            .arg("--source-qmp")
            .arg(&source.qmp_path)
            .arg("--target-qmp")
            .arg(&target.qmp_path)
            .args(["--target-agent", &format!("127.0.0.1:{link}")])
            .args(["--export", export, "--no-index", "--json", "--insecure"])
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
    assert_eq!(report["pages_mapped"], report["pages_map"], "no index was asked");
    // Every mapped page was read from the image and verified; none had to be asked again.
    assert_eq!(report["nas_bytes"].as_u64(), Some(mapped * 4096), "{report}");
    assert_eq!(report["pages_fallback"], 0, "{report}");
    carried_on(&source, &target, &blob).unwrap_or_else(|e| panic!("{e}"));
}
