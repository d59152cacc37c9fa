//! The host daemon follows a KVM guest's dirty ring, end to end with the real binary and a real
//! KVM QEMU (its firmware runs; a full guest cannot boot on this machine's nested KVM):
//! the ring's programs are attached only once a KVM VM is followed; followed after it started,
//! the VM shows the ring quiet while dirty logging is off; a
//! `calc-dirty-rate` in mode `dirty-ring` turns logging on, and `agent status` shows it on, the
//! slots QEMU declared again with logging, pushes per second and the hottest pages placed in
//! the VM's RAM blocks; once the window ends it shows logging off again. `agent plan` on the same
//! VM measures its dirty rate with the ring, not by sampling.
use std::{path::Path, time::Duration};

use agent::qmp::Qmp;
use serde_json::{json, Value};
use support::{agent, follow, json_of, start_daemon, vm_status};
use testkit::{require_root, Scratch};

mod support;

/// Polls the VM's status until `cond` holds (at most `secs`); the status that satisfied it.
fn until(
    control: &Path,
    qmp: &Path,
    secs: u64,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..secs * 10 {
        let v = vm_status(control, qmp);
        if cond(&v) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} within {secs} s: {:#}", vm_status(control, qmp));
}

fn qmp(rt: &tokio::runtime::Runtime, path: &Path, command: &str, args: Option<Value>) -> Value {
    rt.block_on(async {
        let mut q = Qmp::connect(path).await.expect("QMP");
        q.execute(command, args)
            .await
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    })
}

#[test]
fn the_daemon_shows_a_kvm_guests_dirty_ring_while_logging_is_on() {
    if !require_root("the_daemon_shows_a_kvm_guests_dirty_ring_while_logging_is_on") {
        return;
    }
    let dir = Scratch::new("daemon-ring");
    let (control, _link, _daemon) =
        start_daemon(&dir, &["--dirty-interval", "0"].map(std::ffi::OsStr::new));
    let qmp_path = dir.path("kvm.qmp");
    let _qemu = testkit::qemu::kvm_qemu(&qmp_path, "kvm,dirty-ring-size=4096");
    support::wait_for("QEMU's monitor", Duration::from_secs(10), || {
        qmp_path.exists()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // No KVM VM followed yet: no ioctl of the host pays for the slot programs.
    assert!(support::dirty_ring_idle(&control), "no KVM VM followed yet");
    let vm = follow(&control, &qmp_path);
    assert_eq!(vm["kvm"], true, "{vm:#}");
    let status = support::status(&control);
    assert_eq!(status["dirty_ring"], "on", "{status:#}");
    qmp(&rt, &qmp_path, "cont", None);

    // Logging off: the ring says nothing, and the report says logging is off.
    let quiet = until(&control, &qmp_path, 5, "a first report", |v| {
        v["dirty_ring"].is_object()
    });
    assert_eq!(quiet["dirty_ring"]["logging"], false, "{quiet:#}");
    assert_eq!(quiet["dirty_ring"]["counts"]["pushes"], 0, "{quiet:#}");

    qmp(
        &rt,
        &qmp_path,
        "calc-dirty-rate",
        Some(json!({"calc-time": 4, "mode": "dirty-ring"})),
    );
    let on = until(&control, &qmp_path, 4, "logging on", |v| {
        v["dirty_ring"]["logging"] == true
    });
    let r = &on["dirty_ring"];
    eprintln!("the dirty ring while logging: {r}");
    assert!(r["slots_logging"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["bytes_per_sec"].as_f64().unwrap() > 0.0, "{r:#}");
    assert_eq!(r["counts"]["unmapped"], 0, "{r:#}");
    let hot = r["hot"].as_array().unwrap();
    assert!(!hot.is_empty(), "{r:#}");
    assert!(
        hot.iter().all(|p| p["block"].is_string()),
        "every hot page lies in a RAM block: {r:#}"
    );
    let human = agent()
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("dirty ring: logging"), "{human}");

    let off = until(
        &control,
        &qmp_path,
        8,
        "logging off after the window",
        |v| v["dirty_ring"]["logging"] == false && v["dirty_ring"]["slots_logging"] == 0,
    );
    assert!(
        off["dirty_ring"]["counts"]["pushes"].as_u64().unwrap() > 0,
        "{off:#}"
    );

    let plan = json_of(
        agent()
            .args(["plan", "--json", "--window-ms", "500", "--control"])
            .arg(&control)
            .arg(&qmp_path),
    );
    let dirty = &plan["plans"][0]["plan"]["dirty"];
    assert_eq!(dirty["mode"], "dirty-ring", "{plan:#}");
}
