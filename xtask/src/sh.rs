//! Running commands: echo them, run them, and turn failures into errors that name the command.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context};

/// The workspace root (the parent of xtask's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `cargo` from rustup's proxy, without the variables the outer `cargo run` set, so that a
/// `+toolchain` argument and the child's own target dir take effect.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio; fails if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs `cmd` and returns its stdout as text; fails on a non-zero exit.
pub fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `cmd` runs and exits 0 (its output is discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    output(cmd).is_ok_and(|o| o.status.success())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    stdout(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}
