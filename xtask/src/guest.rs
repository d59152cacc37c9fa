//! `cargo xtask guest-image`: the test guest, built from Debian packages only.
//!
//! The kernel is Debian's `linux-image-amd64` target package, unpacked privately with
//! `apt-get download` + `dpkg -x`; the userland is busybox-static in a gzip'd cpio initramfs
//! with the virtio modules the kernel needs for its NBD-backed disk. The guest's /init:
//! - loads virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci,
//!   virtio_blk (that order; there is no modprobe);
//! - reads `readmb=` MiB of /dev/vda and keeps it open, so the page cache stays;
//! - with `fsread=1` instead, loads ext4 (crc16, crc32c_generic, mbcache, jbd2, ext4),
//!   mounts /dev/vda read-only and reads every `file-*` at its top: files in a filesystem's
//!   page cache;
//! - with `fillmb=N`, then drops its page cache and fills N MiB of memory with random data,
//!   with `fillgate=1` only once a line arrives on its second serial port (`/dev/ttyS1`);
//! - fills a 16 MiB RAM blob and prints its md5 (`QEVAL-BLOB`) with every 5th heartbeat;
//! - with `diskwrite=1`, rewrites disk blocks every second (for migration fault tests);
//! - with `dirtymb=N` (N <= 48), dirties about N MiB of memory a second with fresh content;
//! - prints `QEVAL-HEARTBEAT n` every second.
//!
//! Output: `target/guest/{vmlinuz,initramfs.cpio.gz}`. Rebuilt only when the init script or
//! the kernel version changes.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::sh;

/// Under the kernel package's `lib/modules/VERSION/kernel`.
const MODULES: [&str; 11] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "lib/crc16",
    "crypto/crc32c_generic",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
];

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /mods/$m.ko || echo "QEVAL-ERROR insmod $m"
done
READMB=0; DISKWRITE=0; FILLMB=0; FILLGATE=0; DIRTYMB=0; FSREAD=0
for a in $(cat /proc/cmdline); do
  case "$a" in readmb=*) READMB="${a#readmb=}";; diskwrite=*) DISKWRITE="${a#diskwrite=}";; fillmb=*) FILLMB="${a#fillmb=}";; fillgate=*) FILLGATE="${a#fillgate=}";; dirtymb=*) DIRTYMB="${a#dirtymb=}";; fsread=*) FSREAD="${a#fsread=}";; esac
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
  # Held open for ever: the kernel drops a block device's page cache on last close.
  exec 3< /dev/vda
  if [ "$FSREAD" = 1 ]; then
    for m in crc16 crc32c_generic mbcache jbd2 ext4; do
      insmod /mods/$m.ko || echo "QEVAL-ERROR insmod $m"
    done
    # Mounted for ever, so the files' page cache stays.
    if mount -t ext4 -o ro /dev/vda /mnt; then
      cat /mnt/file-* > /dev/null
      echo "QEVAL-FILES-READ $(ls /mnt | grep -c '^file-')"
    else
      echo "QEVAL-ERROR mount ext4"
    fi
  elif [ "$READMB" -gt 0 ]; then
    dd if=/dev/vda of=/dev/null bs=1M count=$READMB 2>/dev/null
  fi
  echo "QEVAL-READ-DONE $READMB"
  if [ "$FILLMB" -gt 0 ]; then
    if [ "$FILLGATE" = 1 ]; then
      # Held until the host sends a line on the second serial port (after it saw the
      # host-side map of the read built).
      echo "QEVAL-FILL-WAIT"
      read -r _ < /dev/ttyS1
    fi
    # The page cache dropped, and its memory taken by random data: what a host-side map
    # recorded of those pages is stale now.
    sync; echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/urandom of=/tmp/fill bs=1M count=$FILLMB 2>/dev/null
    echo "QEVAL-FILLED $FILLMB"
  fi
else
  echo "QEVAL-ERROR no /dev/vda"
fi
dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
echo "QEVAL-BLOB $(md5sum /tmp/blob | cut -d' ' -f1)"
if [ "$DIRTYMB" -gt 0 ] && [ "$DIRTYMB" -le 48 ]; then
  # About DIRTYMB MiB of memory dirtied each second, an eighth every 125 ms, into a 96 MiB
  # ring in tmpfs. Fresh content each time (a page-aligned copy of other guest pages would go
  # out as duplicates, and /dev/urandom is too slow under TCG): copied from a random source
  # at a byte offset that is never page-aligned.
  dd if=/dev/urandom of=/tmp/src bs=1M count=24 2>/dev/null
  # The ring starts full of such content, so the guest's memory is in its steady state once
  # it is ready (a ring filling up from zero pages would change what a migration moves).
  i=0; while [ $i -lt 8 ]; do
    dd if=/tmp/src of=/tmp/dirty bs=64k count=192 iflag=skip_bytes skip=$(( i * 4099 + 1 )) \
      seek=$(( i * 192 )) conv=notrunc 2>/dev/null
    i=$((i+1))
  done
  ( k=0; q=$(( DIRTYMB * 2 )); while true; do
      dd if=/tmp/src of=/tmp/dirty bs=64k count=$q iflag=skip_bytes \
        skip=$(( (k * 4099) % 8388608 )) seek=$(( (k * q) % (1536 - q + 1) )) conv=notrunc \
        2>/dev/null
      k=$((k+1)); sleep 0.125
    done ) &
  echo "QEVAL-DIRTYING $DIRTYMB"
fi
echo "QEVAL-READY"
n=0
while true; do
  echo "QEVAL-HEARTBEAT $n"
  if [ $((n % 5)) -eq 0 ]; then echo "QEVAL-BLOB $(md5sum /tmp/blob | cut -d' ' -f1)"; fi
  if [ "$DISKWRITE" = 1 ]; then
    dd if=/dev/urandom of=/dev/vda bs=4k count=64 seek=$(( (n * 64) % 8192 )) conv=fsync 2>/dev/null
  fi
  n=$((n+1))
  sleep 1
done
"#;

/// Where the guest's files land.
pub fn dir() -> PathBuf {
    sh::workspace_root().join("target/guest")
}

pub fn build() -> anyhow::Result<()> {
    let out = dir();
    fs::create_dir_all(&out)?;
    let package = kernel_package()?;
    let stamp = format!(
        "{package}\n{}",
        blockhash::hex(&blockhash::hash(INIT.as_bytes()))
    );
    let stamp_file = out.join("stamp");
    if fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
        && out.join("vmlinuz").is_file()
        && out.join("initramfs.cpio.gz").is_file()
    {
        eprintln!("guest-image: up to date ({package})");
        return Ok(());
    }
    let work = out.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    sh::run(
        Command::new("apt-get")
            .current_dir(&work)
            .args(["download", &package]),
    )
    .with_context(|| format!("cannot download {package}"))?;
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let kroot = work.join("kroot");
    sh::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&kroot))?;
    let version = package
        .strip_prefix("linux-image-")
        .context("unexpected kernel package name")?;
    let modules = kroot.join("lib/modules").join(version).join("kernel");
    let root = work.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "mods", "mnt"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("busybox-static is missing: run `cargo xtask setup`")?;
    for applet in [
        "sh", "mount", "echo", "cat", "dd", "sleep", "insmod", "ls", "grep", "sed", "test", "cut",
        "tr", "md5sum", "uname", "head",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    for m in MODULES {
        let name = m.rsplit('/').next().expect("module path has a name");
        let src = modules.join(format!("{m}.ko"));
        if !src.is_file() {
            bail!("{} not found in {package}", src.display());
        }
        fs::copy(&src, root.join("mods").join(format!("{name}.ko")))?;
    }
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cpio = out.join("initramfs.cpio.gz");
    sh::run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . -print0 | cpio --null -o -H newc --quiet | gzip -6 > {}",
        cpio.display()
    )))?;
    fs::copy(
        kroot.join("boot").join(format!("vmlinuz-{version}")),
        out.join("vmlinuz"),
    )?;
    fs::write(&stamp_file, stamp)?;
    fs::remove_dir_all(&work).ok();
    eprintln!("guest-image: built {} from {package}", out.display());
    Ok(())
}

/// Where `qemu72` unpacks Debian bookworm's QEMU 7.2.
pub fn qemu72_root() -> PathBuf {
    sh::workspace_root().join("target/qemu-7.2")
}

/// Unpacks bookworm's own qemu-system-x86 (7.2) privately, so tests can check that streams
/// from it are parsed too. It shares the installed QEMU 10's firmware and libraries.
pub fn qemu72() -> anyhow::Result<()> {
    let root = qemu72_root();
    let binary = root.join("usr/bin/qemu-system-x86_64");
    if binary.is_file() {
        eprintln!("qemu-7.2: present");
        return Ok(());
    }
    let work = root.join("download");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&work)?;
    // The binary, and the package with its accelerator modules (loaded at run time).
    let mut version = String::new();
    for package in ["qemu-system-x86", "qemu-system-common"] {
        let policy = sh::stdout(Command::new("apt-cache").args(["policy", package]))?;
        version = policy
            .split_whitespace()
            .find(|w| w.starts_with("1:7.2"))
            .with_context(|| format!("Debian offers no {package} 7.2 (bookworm) version"))?
            .to_string();
        sh::run(
            Command::new("apt-get")
                .current_dir(&work)
                .args(["download", &format!("{package}={version}")]),
        )?;
    }
    for deb in fs::read_dir(&work)?.flatten().map(|e| e.path()) {
        if deb.extension().is_some_and(|e| e == "deb") {
            sh::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        }
    }
    fs::remove_dir_all(&work).ok();
    if !sh::succeeds(Command::new(&binary).arg("--version")) {
        bail!(
            "QEMU 7.2 does not run here (its libraries do not resolve); run `ldd {}`",
            binary.display()
        );
    }
    eprintln!("qemu-7.2: unpacked {version} into {}", root.display());
    Ok(())
}

/// The kernel package Debian's `linux-image-amd64` points at (e.g. linux-image-6.1.0-56-amd64).
fn kernel_package() -> anyhow::Result<String> {
    let deps = sh::stdout(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("apt-cache cannot resolve linux-image-amd64 (run apt-get update)")?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .context("linux-image-amd64 depends on no linux-image-*-amd64 package")
}
