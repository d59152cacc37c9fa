//! The daemon's dirty-rate figures when a VM's monitor misbehaves, with a real TCG guest: a
//! monitor another client holds shows as busy, its last figure kept with a growing age; a
//! monitor socket gone shows as unreachable; a plan for a socket that does not exist fails
//! with the reason; the daemon keeps answering throughout. And `agent plan --rank` lists the
//! followed VM with its plan.
use std::{path::Path, process::Stdio, time::Duration};

use agent::qmp::Qmp;
use serde_json::Value;
use support::{agent, follow_and_run, json_of, start_daemon, vm_status as vm};
use testkit::{
    qemu::{exclusive, Guest, GuestSpec},
    require_root, Scratch,
};

mod support;

/// Polls the VM's status until `cond` holds (at most 30 s); the status that satisfied it.
fn until(control: &Path, qmp: &Path, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..150 {
        let v = vm(control, qmp);
        if cond(&v) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} within 30 s: {:#}", vm(control, qmp));
}

#[test]
fn a_busy_or_vanished_monitor_shows_as_such_and_no_stale_figure_passes_for_fresh() {
    if !require_root(
        "a_busy_or_vanished_monitor_shows_as_such_and_no_stale_figure_passes_for_fresh",
    ) {
        return;
    }
    let _qemu = exclusive();
    let dir = Scratch::new("plan-faults");
    let image = dir.image("disk.raw", 64 << 20);
    let schedule =
        ["--dirty-interval", "0.2", "--dirty-window-ms", "300"].map(std::ffi::OsStr::new);
    let (control, _link, _daemon) = start_daemon(&dir, &schedule);
    let g = Guest::start(
        &dir.0,
        &GuestSpec {
            name: "faults",
            mem_mb: 256,
            read_mb: 0,
            disk_uri: image.to_str().unwrap(),
            disk_writes: false,
            incoming: false,
            paused: true,
            prealloc: false,
            qemu: None,
            iothread: false,
            fill_mb: 0,
            fill_gate: false,
            dirty_mb: 0,
            native_aio: false,
            fs_read: false,
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    follow_and_run(&rt, &g, &control);
    let measured = until(&control, &g.qmp_path, "two dirty-rate samples", |v| {
        v["dirty"]["samples"].as_u64().unwrap_or(0) >= 2
    });
    assert!(measured["dirty"]["error"].is_null(), "{measured:#}");
    // A TCG guest: sampled, not logged, and the dirty-ring programs stay detached.
    assert_eq!(measured["dirty"]["mode"], "page-sampling", "{measured:#}");
    assert!(
        support::dirty_ring_idle(&control),
        "a TCG guest needs no dirty ring"
    );

    // Ranked: every followed VM (this one) with its plan.
    let ranked = json_of(
        agent()
            .args(["plan", "--rank", "--json", "--control"])
            .arg(&control),
    );
    let plans = ranked["plans"].as_array().cloned().unwrap_or_default();
    assert_eq!(plans.len(), 1, "{ranked:#}");
    assert_eq!(plans[0]["qmp"].as_str(), g.qmp_path.to_str(), "{ranked:#}");
    assert!(
        plans[0]["plan"]["agents"]["converges"] == true,
        "{ranked:#}"
    );

    // Another client holds the monitor: busy, the last figure kept, its age growing.
    let held = rt
        .block_on(Qmp::connect(&g.qmp_path))
        .expect("hold the monitor");
    let busy = until(&control, &g.qmp_path, "the monitor reported busy", |v| {
        v["dirty"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("busy"))
            && v["dirty"]["age_s"].as_f64().unwrap_or(0.0) > 2.0
    });
    assert!(busy["dirty"]["bytes_per_sec"].is_number(), "{busy:#}");
    let text = String::from_utf8(
        agent()
            .args(["status", "--control"])
            .arg(&control)
            .stderr(Stdio::inherit())
            .output()
            .expect("agent status")
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains("latest attempt failed") && text.contains("busy"),
        "{text}"
    );
    assert!(text.contains(" s old"), "the figure's age is shown: {text}");

    // Released: measured again, the failure cleared.
    drop(held);
    until(
        &control,
        &g.qmp_path,
        "a fresh sample after the release",
        |v| v["dirty"]["error"].is_null() && v["dirty"]["age_s"].as_f64().unwrap_or(99.0) < 2.0,
    );

    // The socket gone (QEMU still running): unreachable.
    let moved = dir.path("moved.qmp");
    std::fs::rename(&g.qmp_path, &moved).unwrap();
    let gone = until(
        &control,
        &g.qmp_path,
        "the monitor reported unreachable",
        |v| {
            v["dirty"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("unreachable"))
        },
    );
    eprintln!("socket gone: {gone:#}");

    // A plan for a socket that does not exist: an error with the reason, and the daemon on.
    let out = agent()
        .arg("plan")
        .arg(dir.path("nothing.qmp"))
        .arg("--control")
        .arg(&control)
        .output()
        .expect("agent plan");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing.qmp"), "{err}");
    json_of(
        agent()
            .args(["status", "--json", "--control"])
            .arg(&control),
    );
    std::fs::rename(&moved, &g.qmp_path).unwrap();
}
