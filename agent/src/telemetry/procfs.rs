//! What `/proc/PID` says of a QEMU process that the registry and the RAM-file matching both
//! read.
use std::{fs, path::Path, path::PathBuf};

/// The process's open fds, each with its `/proc/PID/fd/N` link (nothing if the directory
/// cannot be read).
pub fn open_fds(proc_dir: &Path) -> impl Iterator<Item = (u32, PathBuf)> {
    fs::read_dir(proc_dir.join("fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((fd, entry.path()))
        })
}
