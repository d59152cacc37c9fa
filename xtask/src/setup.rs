//! `cargo xtask setup`: bring a fresh machine of this kind (Debian bookworm, rustup with stable
//! and nightly) to everything the project needs. Every step checks first and acts only when
//! something is missing, so running it twice does nothing the second time.
use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context};

use crate::sh;

/// Debian packages and why they are needed. qemu-* come from bookworm-backports (QEMU 10).
const PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "guests for the end-to-end tests and the demo",
    ),
    (
        "qemu-utils",
        "qemu-img and qemu-io, NBD peers in tests and benchmarks",
    ),
    ("busybox-static", "the test guest's userland"),
    ("cpio", "packing the test guest's initramfs"),
    (
        "e2fsprogs",
        "mkfs.ext4, the files-on-ext4 disk of bench downtime",
    ),
    ("nbdkit", "the reference NBD server in benchmarks"),
    ("libnbd-bin", "nbdinfo and nbdcopy, NBD peers in tests"),
    ("python3-libnbd", "nbdsh, an NBD peer in tests"),
];
/// Packages that must come from backports, with the minimum upstream major version.
const BACKPORTED: &[(&str, u32)] = &[("qemu-system-x86", 10), ("qemu-utils", 10)];
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    if !sh::is_root() {
        bail!("setup installs Debian packages and must run as root (it runs `apt-get install`)");
    }
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(name, _)| !package_ok(name))
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
        return Ok(());
    }
    for (name, why) in PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("setup: installing {name} ({why})");
    }
    ensure_backports_source()?;
    sh::run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: is the package mirror reachable?")?;
    let (backported, plain): (Vec<&str>, Vec<&str>) = missing
        .iter()
        .partition(|name| BACKPORTED.iter().any(|(b, _)| b == *name));
    if !backported.is_empty() {
        apt_install(&["-t", "bookworm-backports"], &backported)?;
    }
    if !plain.is_empty() {
        apt_install(&[], &plain)?;
    }
    let still: Vec<&str> = missing.into_iter().filter(|n| !package_ok(n)).collect();
    if !still.is_empty() {
        bail!("after apt-get install these packages are still missing or too old: {still:?}");
    }
    Ok(())
}

fn apt_install(extra: &[&str], packages: &[&str]) -> anyhow::Result<()> {
    sh::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(extra)
            .args(packages),
    )
    .with_context(|| format!("cannot install {packages:?} from Debian's packages"))
}

/// Installed, and new enough where a minimum version applies.
fn package_ok(name: &str) -> bool {
    let Ok(out) =
        sh::stdout(Command::new("dpkg-query").args(["-W", "-f=${Status}\t${Version}", name]))
    else {
        return false;
    };
    let Some((status, version)) = out.split_once('\t') else {
        return false;
    };
    if status != "install ok installed" {
        return false;
    }
    match BACKPORTED.iter().find(|(b, _)| *b == name) {
        Some((_, min_major)) => upstream_major(version).is_some_and(|m| m >= *min_major),
        None => true,
    }
}

/// `1:10.0.2+ds-2+deb13u1~bpo12+1` -> 10.
fn upstream_major(version: &str) -> Option<u32> {
    let without_epoch = version.split_once(':').map_or(version, |(_, v)| v);
    without_epoch.split('.').next()?.parse().ok()
}

/// Adds a bookworm-backports entry modelled on the machine's existing bookworm entry (same
/// mirror, same keyring), unless one exists already.
fn ensure_backports_source() -> anyhow::Result<()> {
    let mut existing = String::new();
    for path in apt_source_files() {
        existing.push_str(&fs::read_to_string(&path).unwrap_or_default());
        existing.push('\n');
    }
    if existing.contains("bookworm-backports") {
        return Ok(());
    }
    let entry = backports_entry(&existing).context(
        "no deb822 apt entry for Debian bookworm was found under /etc/apt to model the \
         bookworm-backports entry on; add one that names bookworm-backports by hand",
    )?;
    eprintln!("setup: adding {BACKPORTS_LIST}");
    fs::write(BACKPORTS_LIST, entry).with_context(|| format!("cannot write {BACKPORTS_LIST}"))
}

fn apt_source_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list")),
        );
    }
    files
}

/// From deb822 text, the first stanza whose Suites include `bookworm`, rewritten to
/// `Suites: bookworm-backports`.
fn backports_entry(sources: &str) -> Option<String> {
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        let suites = field("Suites")?;
        if !suites.split_whitespace().any(|s| s == "bookworm") {
            continue;
        }
        let mut out = format!(
            "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: {}\n",
            field("URIs")?,
            field("Components").unwrap_or("main")
        );
        if let Some(key) = field("Signed-By") {
            out.push_str(&format!("Signed-By: {key}\n"));
        }
        return Some(out);
    }
    None
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = sh::stdout(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the nightly Rust toolchain is missing; eBPF builds need it (-Z build-std) and this \
             machine cannot download toolchains. Machines of this kind ship it preinstalled."
        );
    }
    let installed = sh::stdout(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    sh::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src to the nightly toolchain")
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (there is no system LLVM).
fn bpf_linker() -> anyhow::Result<()> {
    // rustup puts the toolchain's lib dir on the loader path, where libLLVM lives.
    if sh::succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    let verbose = sh::stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major =
        llvm_major(&verbose).context("`rustc +nightly -vV` does not report an LLVM version")?;
    let sysroot = sh::stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let prefix_lib = format!("libLLVM.so.{major}.");
    let libllvm = fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix_lib) && n.contains("-rust-"))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.{major}.*-rust-* in {}; the nightly toolchain lacks its LLVM",
                libdir.display()
            )
        })?;
    // bpf-linker's build only checks that llvm-config exists and links against lib/libLLVM.so.
    let prefix = sh::workspace_root().join("target/xtask/llvm-prefix");
    fs::create_dir_all(prefix.join("bin"))?;
    fs::create_dir_all(prefix.join("lib"))?;
    let llvm_config = prefix.join("bin/llvm-config");
    fs::write(&llvm_config, "#!/bin/sh\nexit 0\n")?;
    set_executable(&llvm_config)?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} ({})",
        libllvm.display()
    );
    sh::run(
        sh::cargo()
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
    )
    .context("cannot build bpf-linker")?;
    if !sh::succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        bail!("bpf-linker was built but does not run under the nightly toolchain");
    }
    Ok(())
}

/// cargo-fuzz, for the fuzz targets under nas-server/fuzz.
fn cargo_fuzz() -> anyhow::Result<()> {
    if sh::succeeds(sh::cargo().args(["fuzz", "--version"])) {
        eprintln!("setup: cargo-fuzz present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    sh::run(sh::cargo().args(["install", "--locked", "cargo-fuzz"]))
        .context("cannot build cargo-fuzz")
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `LLVM version: 22.1.4` -> 22.
fn llvm_major(rustc_verbose: &str) -> Option<u32> {
    rustc_verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(upstream_major("1:10.0.2+ds-2+deb13u1~bpo12+1"), Some(10));
        assert_eq!(upstream_major("1:7.2+dfsg-7+deb12u13"), Some(7));
        assert_eq!(upstream_major("1.35.0-4+b3"), Some(1));
        assert_eq!(
            llvm_major("rustc 1.97.0-nightly\nLLVM version: 22.1.4\n"),
            Some(22)
        );
        assert_eq!(llvm_major("rustc 1.97.0-nightly\n"), None);
    }

    #[test]
    fn models_backports_on_the_bookworm_stanza() {
        let sources =
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\nTypes: deb\nURIs: http://sec.example\n\
Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            backports_entry(sources).unwrap(),
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\n\
Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n"
        );
        assert_eq!(backports_entry("Types: deb\nSuites: trixie\n"), None);
    }
}
