//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Order: setup, the guest image, the eBPF object, rustfmt, the module-cycle check, clippy over
//! user space, clippy over the eBPF crate
//! for its own target (two passes, so the no_std crate is never unified with std deps), then
//! every unit, integration and kernel test, then a short smoke run of every fuzz target (built
//! unoptimised and without AddressSanitizer, which a 10-second run does not repay). Kernel and
//! QEMU tests need root; run without it, they fail and say why.
use std::{
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::{bail, Context};

use crate::{ebpf, fuzz, guest, setup, sh};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each fuzz target runs at the end of the suite.
    #[arg(long, default_value_t = 10)]
    fuzz_seconds: u64,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    guest::build()?;
    guest::qemu72()?;
    sh::run(&mut ebpf::nightly_cargo("build"))?;
    sh::run(sh::cargo().args(["fmt", "--all", "--check"]))?;
    for fuzz in ["nas-server/fuzz/Cargo.toml", "agent/fuzz/Cargo.toml"] {
        sh::run(sh::cargo().args(["fmt", "--check", "--manifest-path", fuzz]))?;
    }
    crate::modules::run()?;
    sh::run(sh::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh::run(ebpf::nightly_cargo("clippy").args(["--", "-D", "warnings"]))?;
    let totals = cargo_test(&args.cargo_test_args)?;
    // A short fuzz run on freshly recorded sessions; longer runs: `cargo xtask fuzz`.
    fuzz::run(fuzz::Args {
        seconds: args.fuzz_seconds,
        sanitizer: "none".into(),
        dev: true,
    })?;
    // One plain closing line for the whole suite, after cargo's per-binary lines.
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test`, echoing its output, and sums the per-binary result lines.
fn cargo_test(extra: &[String]) -> anyhow::Result<Totals> {
    let mut cmd = sh::cargo();
    cmd.arg("test").args(extra).stdout(Stdio::piped());
    eprintln!("+ {}", sh::describe(&cmd));
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_result_line(&line) {
            totals.passed += t.passed;
            totals.failed += t.failed;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {} passed, {} failed", totals.passed, totals.failed);
        bail!("cargo test failed with {status}");
    }
    Ok(totals)
}

/// `test result: ok. 8 passed; 1 failed; ...` -> Totals { 8, 1 }.
fn parse_result_line(line: &str) -> Option<Totals> {
    let rest = line.trim().strip_prefix("test result:")?;
    let mut totals = Totals::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(label), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        match (label, n.parse::<u64>()) {
            ("passed", Ok(n)) => totals.passed = n,
            ("failed", Ok(n)) => totals.failed = n,
            _ => {}
        }
    }
    Some(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_result_lines() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; \
                 finished in 0.00s"
            ),
            Some(Totals {
                passed: 8,
                failed: 1
            })
        );
        assert_eq!(parse_result_line("running 8 tests"), None);
    }
}
