//! `cargo xtask build-ebpf`: compile `agent-ebpf` for bpfel-unknown-none with nightly.
//!
//! The object lands at `target/bpfel-unknown-none/release/agent-ebpf`, where the agent's build
//! script embeds it.
use std::process::Command;

use crate::sh;

pub const OBJECT: &str = "target/bpfel-unknown-none/release/agent-ebpf";

/// A nightly cargo command for the eBPF crate: `cargo +nightly <subcommand> -p agent-ebpf ...`.
pub fn nightly_cargo(subcommand: &str) -> Command {
    let mut cmd = sh::cargo();
    cmd.args(["+nightly", subcommand, "-p", "agent-ebpf"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .arg("--target-dir")
        .arg(sh::workspace_root().join("target"))
        // BTF in the object lets aya and the verifier name types; the cfg is aya-ebpf's own.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    cmd
}

pub fn build() -> anyhow::Result<()> {
    crate::setup::run()?;
    sh::run(&mut nightly_cargo("build"))?;
    eprintln!(
        "build-ebpf: {} built; `cargo build -p agent` embeds it",
        sh::workspace_root().join(OBJECT).display()
    );
    Ok(())
}
