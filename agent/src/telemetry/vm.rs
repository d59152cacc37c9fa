//! What the agent knows of one QEMU process: its RAM blocks (from `x-query-ramblock`), its
//! disks (from `query-block`), and which of its file descriptors carry each disk's I/O (from
//! `/proc`). Disks whose I/O cannot be followed are listed with the reason.
//!
//! ```text
//! QMP x-query-ramblock -> RamBlock {name, host address, length}
//! QMP query-block      -> Disk {device, NBD endpoint + export | image path | why not}
//! /proc/PID/fd + /proc/PID/net/tcp{,6} -> fd -> disk (several fds per disk with multi-conn)
//! unix sockets: the peer's path (unix_peer) -> fd -> nbd+unix disk
//! ```
use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{
    memmap::RamBlock,
    procfs::open_fds,
    ram_files::{match_ram_fds, RamFile},
};
use crate::qmp::{Qmp, QmpError};

/// Where QEMU's NBD client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdServer {
    Tcp(SocketAddr),
    /// A unix socket's path, as QEMU was given it.
    Unix(PathBuf),
}

/// How a disk's I/O leaves QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskPath {
    /// QEMU's NBD client over TCP or a unix socket.
    Nbd { server: NbdServer, export: String },
    /// An image file QEMU reads with pread/preadv (`aio=threads`, the default).
    File { path: PathBuf },
    /// Not followed, and why (TLS, io_uring, another driver).
    Unfollowable { reason: String },
}

/// One disk of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The block device's QOM name (`virtio0`), or its node name.
    pub device: String,
    pub path: DiskPath,
}

/// Errors reading a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("x-query-ramblock gave no RAM block this agent can read: {0:?}")]
    NoRamBlocks(String),
    #[error("the QMP socket's peer process is unknown (SO_PEERCRED gave no pid)")]
    NoPid,
}

/// A QEMU process as the telemetry sees it.
#[derive(Clone, Debug)]
pub struct Vm {
    pub pid: u32,
    pub blocks: Vec<RamBlock>,
    pub disks: Vec<Disk>,
    /// File descriptor -> index into `disks`.
    pub fds: HashMap<u32, usize>,
    /// File descriptor -> the RAM blocks in that file, when guest RAM is a file (memfd,
    /// hugetlbfs): QEMU discards such RAM with fallocate on these fds.
    pub ram_fds: HashMap<u32, Vec<RamFile>>,
    /// The VM runs under KVM (`query-kvm`): its dirty pages can come from KVM's dirty ring.
    pub kvm: bool,
}

impl Vm {
    /// Reads the VM behind `qmp`: its RAM blocks, disks and their fds.
    pub async fn inspect(qmp: &mut Qmp) -> Result<Self, VmError> {
        let pid = qmp.peer_pid.ok_or(VmError::NoPid)?;
        let text = qmp.execute("x-query-ramblock", None).await?;
        let text = text["human-readable-text"].as_str().unwrap_or("");
        let blocks = parse_ramblocks(text);
        if blocks.is_empty() {
            return Err(VmError::NoRamBlocks(text.to_string()));
        }
        let disks = parse_disks(&qmp.execute("query-block", None).await?);
        let proc_dir = format!("/proc/{pid}");
        let process = super::unix_peer::Process::open(pid)
            .inspect_err(|e| tracing::debug!(pid, "cannot open the process for its sockets: {e}"))
            .ok();
        let fds = match_fds(Path::new(&proc_dir), &disks, |fd| {
            process.as_ref()?.peer_path(fd).unwrap_or_else(|e| {
                tracing::debug!(pid, fd, "cannot read the socket's peer: {e}");
                None
            })
        });
        let ram_fds = match_ram_fds(Path::new(&proc_dir), &blocks);
        let kvm = qmp.execute("query-kvm", None).await?["enabled"] == true;
        Ok(Self {
            pid,
            blocks,
            disks,
            fds,
            ram_fds,
            kvm,
        })
    }
}

/// Rows of `x-query-ramblock`'s table: `name  psize unit  offset  used  total  hva  ro`. Only
/// writable blocks are kept (ROMs are device state, not guest memory a disk read lands in).
pub fn parse_ramblocks(text: &str) -> Vec<RamBlock> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[f.len() - 1] != "rw" {
                return None;
            }
            let n = f.len();
            Some(RamBlock {
                name: f[..n - 7].join(" "),
                host: hex(f[n - 2])?,
                len: hex(f[n - 4])?,
            })
        })
        .collect()
}

/// The disks of a `query-block` reply, each with how its I/O can be followed.
pub fn parse_disks(reply: &Value) -> Vec<Disk> {
    let Some(list) = reply.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|d| {
            let inserted = d.get("inserted")?;
            let device = d["device"]
                .as_str()
                .filter(|s| !s.is_empty())
                .or_else(|| inserted["node-name"].as_str())
                .unwrap_or("?")
                .to_string();
            let file = inserted["file"].as_str().unwrap_or("");
            Some(Disk {
                device,
                path: disk_path(file, inserted),
            })
        })
        .collect()
}

fn disk_path(file: &str, inserted: &Value) -> DiskPath {
    let not = |reason: &str| DiskPath::Unfollowable {
        reason: reason.to_string(),
    };
    if let Some(spec) = file.strip_prefix("json:") {
        let Ok(v) = serde_json::from_str::<Value>(spec) else {
            return not("unreadable json: filename");
        };
        let v = if v["driver"] == "raw" { &v["file"] } else { &v };
        if v["driver"] != "nbd" {
            return not("a block driver the follower does not know");
        }
        if v.get("tls-creds").is_some() {
            return not("NBD over TLS: payloads are decrypted inside QEMU");
        }
        let server = &v["server"];
        let export = v["export"].as_str().unwrap_or("").to_string();
        if server["type"] == "unix" {
            return match server["path"].as_str() {
                Some(path) => DiskPath::Nbd {
                    server: NbdServer::Unix(path.into()),
                    export,
                },
                None => not("NBD unix socket without a path"),
            };
        }
        if server["type"] != "inet" {
            return not("NBD over a socket type the follower does not know");
        }
        let addr = format!(
            "{}:{}",
            server["host"].as_str().unwrap_or(""),
            server["port"].as_str().unwrap_or("")
        );
        return match resolve(&addr) {
            Some(server) => DiskPath::Nbd {
                server: NbdServer::Tcp(server),
                export,
            },
            None => not("NBD server address not understood"),
        };
    }
    if let Some(rest) = file.strip_prefix("nbd://") {
        let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
        return match resolve(host) {
            Some(server) => DiskPath::Nbd {
                server: NbdServer::Tcp(server),
                export: export.to_string(),
            },
            None => not("NBD server address not understood"),
        };
    }
    // QEMU names a unix-socket NBD disk `nbd+unix:///EXPORT?socket=PATH`.
    if let Some(rest) = file.strip_prefix("nbd+unix://") {
        let (export, query) = rest.split_once('?').unwrap_or((rest, ""));
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="));
        return match socket {
            Some(path) if !path.is_empty() => DiskPath::Nbd {
                server: NbdServer::Unix(path.into()),
                export: export.trim_start_matches('/').to_string(),
            },
            _ => not("NBD unix socket without a path"),
        };
    }
    if file.starts_with("nbds") || file.starts_with("nbd+tls") {
        return not("NBD over TLS: payloads are decrypted inside QEMU");
    }
    if inserted["drv"] == "raw" && file.starts_with('/') {
        if inserted["aio"] == "io_uring" {
            return not("io_uring: no syscall per request");
        }
        return DiskPath::File { path: file.into() };
    }
    not("a block driver the follower does not know")
}

fn resolve(host_port: &str) -> Option<SocketAddr> {
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().ok().or_else(|| {
        let (h, p) = host_port.rsplit_once(':')?;
        Some(SocketAddr::new(h.parse().ok()?, p.parse().ok()?))
    })
}

/// Which of the process's fds carry each disk: image files by path, NBD sockets by their TCP
/// peer address or, over unix sockets, by the path `unix_peer` says the fd is connected to.
pub fn match_fds(
    proc_dir: &Path,
    disks: &[Disk],
    unix_peer: impl Fn(u32) -> Option<PathBuf>,
) -> HashMap<u32, usize> {
    let mut out = HashMap::new();
    let peers = tcp_peers(proc_dir);
    let any_unix = disks.iter().any(|d| {
        matches!(
            &d.path,
            DiskPath::Nbd {
                server: NbdServer::Unix(_),
                ..
            }
        )
    });
    for (fd, link) in open_fds(proc_dir) {
        let Ok(target) = fs::read_link(link) else {
            continue;
        };
        let target = target.to_string_lossy();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        let peer = match inode {
            Some(inode) => match peers.get(&inode) {
                Some(addr) => Some(NbdServer::Tcp(*addr)),
                None if any_unix => unix_peer(fd).map(NbdServer::Unix),
                None => None,
            },
            None => None,
        };
        for (i, disk) in disks.iter().enumerate() {
            let hit = match (&disk.path, &peer) {
                (DiskPath::Nbd { server, .. }, Some(p)) => same_server(server, p),
                (DiskPath::File { path }, None) => Path::new(target.as_ref()) == path,
                _ => false,
            };
            if hit {
                out.insert(fd, i);
            }
        }
    }
    out
}

/// Whether QEMU's configured server and an fd's peer are the same: equal addresses, or unix
/// paths equal as given or, both absolute, once symlinks are resolved.
fn same_server(configured: &NbdServer, peer: &NbdServer) -> bool {
    match (configured, peer) {
        (NbdServer::Tcp(a), NbdServer::Tcp(b)) => a == b,
        (NbdServer::Unix(a), NbdServer::Unix(b)) => {
            a == b
                || (a.is_absolute()
                    && b.is_absolute()
                    && matches!(
                        (fs::canonicalize(a), fs::canonicalize(b)),
                        (Ok(x), Ok(y)) if x == y
                    ))
        }
        _ => false,
    }
}

/// Socket inode -> remote address, from the process's view of `/proc/net/tcp{,6}`.
fn tcp_peers(proc_dir: &Path) -> HashMap<u64, SocketAddr> {
    let mut out = HashMap::new();
    for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
        let Ok(text) = fs::read_to_string(proc_dir.join(file)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if let (Some(addr), Ok(inode)) = (parse_proc_addr(f[2], v6), f[9].parse::<u64>()) {
                out.insert(inode, addr);
            }
        }
    }
    out
}

/// `0100007F:2A29` (IPv4, host byte order words) or the 32-hex-digit IPv6 form.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = if v6 {
        let mut b = [0u8; 16];
        for (i, word) in b.chunks_exact_mut(4).enumerate() {
            let w = u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok()?;
            word.copy_from_slice(&w.to_le_bytes());
        }
        let v6 = Ipv6Addr::from(b);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        ))
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
