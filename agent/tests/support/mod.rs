//! Helpers the daemon tests share: the agent binary, its JSON output, a running daemon, and
//! guests it follows from before they run.
#![allow(dead_code)]
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::qmp::Qmp;
use serde_json::Value;
use testkit::{
    free_port,
    qemu::{agent_qmp_dir, Guest},
    Running, Scratch,
};

pub fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.env("RUST_LOG", "info");
    cmd
}

pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs an agent command to its end; its stdout as JSON.
pub fn json_of(cmd: &mut Command) -> Value {
    let out = cmd.stderr(Stdio::inherit()).output().expect("run agent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd:?} printed no JSON ({e}): {text}"))
}

/// `agent daemon` with `extra` flags, its target side finding QEMUs in the directory's agent
/// QMP directory; its control socket, link port and process.
pub fn start_daemon(dir: &Scratch, extra: &[&std::ffi::OsStr]) -> (PathBuf, u16, Running) {
    let (control, link) = (dir.path("control.sock"), free_port());
    let daemon = Running(
        agent()
            .args(["daemon", "--insecure"])
            .arg("--control")
            .arg(&control)
            .args(["--link-listen", &format!("127.0.0.1:{link}")])
            .arg("--qmp-dir")
            .arg(agent_qmp_dir(&dir.0))
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start agent daemon"),
    );
    wait_for("the control socket", Duration::from_secs(30), || {
        control.exists()
    });
    (control, link, daemon)
}

/// `agent follow` of the QEMU behind `qmp`: what the daemon found of it.
pub fn follow(control: &Path, qmp: &Path) -> Value {
    json_of(
        agent()
            .arg("follow")
            .arg("--qmp")
            .arg(qmp)
            .arg("--control")
            .arg(control),
    )
}

/// The VM behind `qmp` as `agent status --json` shows it (`null` if the daemon lists none).
/// `agent status --json` of the daemon at `control`.
pub fn status(control: &Path) -> Value {
    json_of(agent().args(["status", "--json", "--control"]).arg(control))
}

/// Whether the daemon at `control` left the dirty-ring programs detached (no KVM VM followed).
pub fn dirty_ring_idle(control: &Path) -> bool {
    status(control)["dirty_ring"]
        .as_str()
        .is_some_and(|s| s.starts_with("idle"))
}

pub fn vm_status(control: &Path, qmp: &Path) -> Value {
    let s = status(control);
    let vms = s["vms"].as_array().cloned().unwrap_or_default();
    vms.into_iter()
        .find(|v| v["qmp"].as_str() == qmp.to_str())
        .unwrap_or(Value::Null)
}

/// Has the daemon follow the paused guest `g`, lets it run, and waits until it is ready (its
/// disk read, its memory filled as asked).
pub fn follow_and_run(rt: &tokio::runtime::Runtime, g: &Guest, control: &Path) {
    follow_and_cont(rt, g, control);
    g.wait_line("QEVAL-READY", 0, Duration::from_secs(240));
}

/// Has the daemon follow the paused guest `g` and lets it run.
pub fn follow_and_cont(rt: &tokio::runtime::Runtime, g: &Guest, control: &Path) {
    let followed = follow(control, &g.qmp_path);
    assert_eq!(followed["disks"][0]["followed"], true, "{followed}");
    rt.block_on(async {
        let mut q = Qmp::connect(&g.qmp_path).await.expect("QMP");
        q.execute("cont", None).await.expect("cont");
    });
}

/// `agent migrate` through the daemon at `control`, from `source` to `target` through the
/// target agent on loopback port `link`, printing JSON over a plaintext link; callers add the
/// storage flags.
pub fn migrate_via(control: &Path, source: &Guest, target: &Guest, link: u16) -> Command {
    let mut cmd = agent();
    cmd.arg("migrate")
        .arg("--control")
        .arg(control)
        .arg("--source-qmp")
        .arg(&source.qmp_path)
        .arg("--target-qmp")
        .arg(&target.qmp_path)
        .args(["--target-agent", &format!("127.0.0.1:{link}")])
        .args(["--json", "--insecure"]);
    cmd
}
