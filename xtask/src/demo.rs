//! `cargo xtask demo`: the main job end to end on embedded defaults.
//!
//! Until the migration hook lands it demonstrates the telemetry half: it builds the eBPF object
//! and the agent, starts `agent telemetry`, issues real O_DIRECT writes to a scratch file on the
//! root filesystem, and prints what the kernel probe counted for that disk and process.
use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context};

use crate::{ebpf, sh};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// O_DIRECT writes of 4 KiB to issue while the probe watches.
    #[arg(long, default_value_t = 256)]
    writes: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ebpf::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent"]))?;
    if !sh::is_root() {
        bail!("the demo loads eBPF programs and must run as root");
    }
    let agent = sh::workspace_root().join("target/release/agent");
    let mut child = Command::new(&agent)
        .args(["telemetry", "--duration", "4", "--interval", "1"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", agent.display()))?;
    // Give the agent time to load and attach before the I/O starts.
    thread::sleep(Duration::from_millis(1500));
    let scratch = sh::workspace_root().join("target/xtask/demo-scratch.bin");
    std::fs::create_dir_all(scratch.parent().expect("scratch has a parent"))?;
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc_o_direct())
        .open(&scratch)
        .with_context(|| format!("cannot open {} with O_DIRECT", scratch.display()))?;
    let block = AlignedBlock::new();
    for _ in 0..args.writes {
        file.write_all(block.as_slice())
            .context("O_DIRECT write failed")?;
    }
    file.sync_all()?;
    eprintln!(
        "demo: issued {} O_DIRECT writes of 4 KiB from pid {} to {}",
        args.writes,
        std::process::id(),
        scratch.display()
    );
    let status = child.wait()?;
    std::fs::remove_file(&scratch).ok();
    if !status.success() {
        bail!("agent telemetry exited with {status}");
    }
    Ok(())
}

/// O_DIRECT on x86_64 Linux (xtask avoids a libc dependency for one constant).
const fn libc_o_direct() -> i32 {
    0o40000
}

/// A 4 KiB buffer aligned to 4 KiB, as O_DIRECT requires.
struct AlignedBlock(Box<Aligned>);

#[repr(C, align(4096))]
struct Aligned([u8; 4096]);

impl AlignedBlock {
    fn new() -> Self {
        Self(Box::new(Aligned([0x5a; 4096])))
    }

    fn as_slice(&self) -> &[u8] {
        &self.0 .0
    }
}
