//! Block device identities: user-space `st_dev` to the kernel's `dev_t`, partitions to disks.
//!
//! `block:block_rq_issue` reports the whole disk's `dev_t` in the kernel encoding
//! (major << 20 | minor), while `stat()` returns the partition in glibc's encoding. These pure
//! conversions, plus a sysfs walk for the partition's parent, let callers match the two.
use std::{fs, io, path::Path};

use agent_common::{kernel_dev, split_kernel_dev};

/// Converts a user-space `st_dev` into the kernel's `dev_t` encoding.
pub fn kernel_dev_from_st_dev(st_dev: u64) -> u32 {
    kernel_dev(libc::major(st_dev), libc::minor(st_dev))
}

/// `major:minor` of a kernel-encoded `dev_t`.
pub fn display(dev: u32) -> String {
    let (major, minor) = split_kernel_dev(dev);
    format!("{major}:{minor}")
}

/// The whole disk holding `dev`: itself when it is not a partition.
pub fn whole_disk(dev: u32) -> io::Result<u32> {
    whole_disk_in(Path::new("/sys/dev/block"), dev)
}

fn whole_disk_in(sys_dev_block: &Path, dev: u32) -> io::Result<u32> {
    let node = sys_dev_block.join(display(dev)).canonicalize()?;
    if !node.join("partition").exists() {
        return Ok(dev);
    }
    let parent = node
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "partition without a parent"))?;
    parse_major_minor(fs::read_to_string(parent.join("dev"))?.trim())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed sysfs dev file"))
}

/// Kernel name of a device, such as `vda`, or `major:minor` when sysfs does not know it.
pub fn name(dev: u32) -> String {
    Path::new("/sys/dev/block")
        .join(display(dev))
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| display(dev))
}

/// Parses sysfs's `254:0`.
pub fn parse_major_minor(s: &str) -> Option<u32> {
    let (major, minor) = s.split_once(':')?;
    Some(kernel_dev(major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn st_dev_converts_to_kernel_encoding() {
        // glibc puts minor's low byte in bits 0..8 and major in bits 8..20 for small numbers.
        assert_eq!(
            kernel_dev_from_st_dev(libc::makedev(254, 1)),
            (254 << 20) | 1
        );
        assert_eq!(
            kernel_dev_from_st_dev(libc::makedev(259, 300)),
            (259 << 20) | 300
        );
    }

    #[test]
    fn parses_sysfs_dev() {
        assert_eq!(parse_major_minor("254:0"), Some(254 << 20));
        assert_eq!(parse_major_minor("254"), None);
        assert_eq!(display(kernel_dev(7, 3)), "7:3");
    }

    #[test]
    fn partition_resolves_to_its_disk() {
        let tmp = std::env::temp_dir().join(format!("agent-sysfs-{}", std::process::id()));
        let disk = tmp.join("devices/vdb");
        fs::create_dir_all(disk.join("vdb1")).unwrap();
        fs::write(disk.join("dev"), "252:16\n").unwrap();
        fs::write(disk.join("vdb1/partition"), "1\n").unwrap();
        let links = tmp.join("dev-block");
        fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(disk.join("vdb1"), links.join("252:17")).unwrap();
        std::os::unix::fs::symlink(&disk, links.join("252:16")).unwrap();
        assert_eq!(
            whole_disk_in(&links, kernel_dev(252, 17)).unwrap(),
            kernel_dev(252, 16)
        );
        assert_eq!(
            whole_disk_in(&links, kernel_dev(252, 16)).unwrap(),
            kernel_dev(252, 16)
        );
        fs::remove_dir_all(tmp).unwrap();
    }
}
