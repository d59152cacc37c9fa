//! The agent binary's failure modes say what is wrong.
use std::process::Command;

#[test]
fn telemetry_without_root_says_why() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: run as we are.
        let out = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["telemetry", "--duration", "1"])
            .output()
            .expect("run agent");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
        return;
    }
    // As root, drop to nobody for the child, as an operator's mistake would.
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["telemetry", "--duration", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run agent as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "agent succeeded without root: {stderr}"
    );
    assert!(stderr.contains("needs root"), "unclear error: {stderr}");
}

#[test]
fn missing_object_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "--ebpf-object",
            "/nonexistent/agent-ebpf",
            "telemetry",
            "--duration",
            "1",
        ])
        .output()
        .expect("run agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // As root the object read fails; without root the privilege check comes first.
    assert!(
        stderr.contains("/nonexistent/agent-ebpf") || stderr.contains("needs root"),
        "unclear error: {stderr}"
    );
}
