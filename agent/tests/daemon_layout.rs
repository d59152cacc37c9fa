//! The host daemon keeps a followed VM's layout current, end to end with the real binary and a
//! real QEMU (no guest needed: the plugging is QEMU's): memory plugged in (a `pc-dimm` on a
//! new RAM backend) and a disk plugged in (an image file on `virtio-blk-pci`) after the follow
//! show in `agent status` within a look or two (every 10 s), the new disk followed on the fd
//! QEMU opened for it.
use std::{path::Path, time::Duration};

use serde_json::{json, Value};
use support::{follow, start_daemon, vm_status};
use testkit::{qemu::qmp_when_up, require_root, Running, Scratch};

mod support;

const MIB: u64 = 1 << 20;

#[test]
fn memory_and_a_disk_plugged_in_after_the_follow_are_followed() {
    if !require_root("memory_and_a_disk_plugged_in_after_the_follow_are_followed") {
        return;
    }
    let dir = Scratch::new("daemon-layout");
    let (control, _link, _daemon) =
        start_daemon(&dir, &["--dirty-interval", "0"].map(std::ffi::OsStr::new));
    let image = dir.image("hot.raw", 16 * MIB);
    let qmp_path = dir.path("vm.qmp");
    let _qemu = Running(
        testkit::qemu::qemu_command(None)
            .args(["-accel", "tcg", "-m", "128,slots=2,maxmem=512M"])
            .args(["-nodefaults", "-display", "none", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(qmp_when_up(&qmp_path)).expect("QMP");
    let vm = follow(&control, &qmp_path);
    let ram = |v: &Value| v["ram_bytes"].as_u64().unwrap_or(0);
    let before = ram(&vm);
    assert!(before >= 128 * MIB, "{vm:#}");
    assert_eq!(vm["disks"], json!([]), "{vm:#}");

    let commands = [
        (
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": 128 * MIB}),
        ),
        (
            "device_add",
            json!({"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "hot0",
                   "file": {"driver": "file", "filename": image.to_str().unwrap()}}),
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "vd1", "drive": "hot0"}),
        ),
    ];
    rt.block_on(async {
        // The daemon may hold the monitor for a look: wait for it.
        let mut q = qmp_when_up(&qmp_path).await.expect("QMP");
        for (command, args) in commands {
            q.execute(command, Some(args))
                .await
                .unwrap_or_else(|e| panic!("{command}: {e}"));
        }
    });
    let seen = until(&control, &qmp_path, 30, |v| {
        ram(v) == before + 128 * MIB && v["disks"].as_array().is_some_and(|d| d.len() == 1)
    });
    let disk = &seen["disks"][0];
    assert_eq!(disk["followed"], true, "{seen:#}");
    assert_eq!(disk["export"], image.to_str().unwrap(), "{seen:#}");
}

/// Polls the VM's status until `cond` holds (at most `secs`).
fn until(control: &Path, qmp: &Path, secs: u64, cond: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..secs * 5 {
        let v = vm_status(control, qmp);
        if cond(&v) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the new layout within {secs} s: {:#}",
        vm_status(control, qmp)
    );
}
