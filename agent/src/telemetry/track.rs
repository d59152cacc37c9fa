//! One VM followed: its events, routed by fd, become its memory-to-disk map.
//!
//! ```text
//! IoEvent on an NBD fd  -> nbd_decode -> Landed / Stored / Changed -> memmap
//! IoEvent on an image fd (pread/pwrite at an offset)  ---------------> memmap
//! IoEvent AioRead on an image fd (io_submit)  -> aio::Landings -> (5 ms) -> memmap
//! IoEvent AioWrite on an image fd (io_submit)  ----------------------> memmap
//! IoEvent Fallocate on an image fd (zeroed, punched, shifted)  -------> memmap (changed)
//! IoEvent BlockDiscard on a block device fd (discard, zero-out)  -----> memmap (changed)
//! IoEvent Discard (madvise on guest RAM)  ---------------------------> memmap
//! IoEvent Fallocate on a RAM file's fd (memfd, hugetlbfs)  -----------> memmap (discarded)
//! DirtySet (pages KVM's dirty ring saw written)  --------------------> memmap
//! ```
//! Disks are numbered as the VM's registry lists them; that number is the map's export.
use std::time::Instant;

use agent_common::syscalls::{FdKey, IoEvent, IoKind, FALLOC_SHIFTS, FD_MEMORY};

use super::{
    aio::{AioStats, Landings},
    dirty_ring::DirtySet,
    memmap::{MemoryMap, ProcessMemory},
    nbd_decode::{DecodeStats, Decoder, Observed},
    vm::{DiskPath, Vm},
};

/// A followed VM and its map.
pub struct VmTrack {
    vm: Vm,
    map: MemoryMap,
    decoder: Decoder,
    memory: ProcessMemory,
    observed: Vec<Observed>,
    landings: Landings,
    events: u64,
}

impl VmTrack {
    pub fn new(vm: Vm) -> Self {
        let map = MemoryMap::new(vm.blocks.clone());
        let memory = ProcessMemory { pid: vm.pid };
        Self {
            vm,
            map,
            decoder: Decoder::new(),
            memory,
            observed: Vec::new(),
            landings: Landings::default(),
            events: 0,
        }
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    pub fn decode_stats(&self) -> DecodeStats {
        self.decoder.stats()
    }

    pub fn aio_stats(&self) -> AioStats {
        self.landings.stats()
    }

    /// Maps the reads submitted with `io_submit` that are due by `now` (every one with `None`,
    /// once QEMU has drained its I/O: a stopped VM).
    pub fn settle(&mut self, now: Option<Instant>) {
        while let Some(l) = self.landings.pop_due(now) {
            self.map
                .landed(l.export, l.offset, l.addr, l.len, &mut self.memory);
        }
    }

    /// Events taken so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// What the follower must follow for this VM: every disk fd, and its memory events.
    pub fn keys(&self) -> Vec<FdKey> {
        let tgid = self.vm.pid;
        let mut keys: Vec<FdKey> = self
            .vm
            .fds
            .keys()
            .chain(self.vm.ram_fds.keys())
            .map(|&fd| FdKey { tgid, fd })
            .collect();
        keys.push(FdKey {
            tgid,
            fd: FD_MEMORY,
        });
        keys.sort_unstable();
        keys
    }

    /// Takes the VM's layout as QEMU reports it now (`vm`, inspected again: RAM blocks, disks
    /// and the fds that carry them), if it changed; returns whether it did. Disk numbers (the
    /// map's exports) stay stable: a disk still there keeps its number, a new one gets the
    /// next, a removed one stays listed as removed and its entries go.
    pub fn relayout(&mut self, vm: Vm) -> bool {
        if vm.pid != self.vm.pid {
            return false;
        }
        let mut disks = self.vm.disks.clone();
        let number: Vec<usize> = vm
            .disks
            .iter()
            .map(|d| {
                disks.iter().position(|o| o == d).unwrap_or_else(|| {
                    disks.push(d.clone());
                    disks.len() - 1
                })
            })
            .collect();
        for (i, d) in disks.iter_mut().enumerate() {
            if !number.contains(&i) && !matches!(&d.path, DiskPath::Unfollowable { .. }) {
                d.path = DiskPath::Unfollowable {
                    reason: "removed from the VM".into(),
                };
            }
        }
        let fds = vm
            .fds
            .iter()
            .filter_map(|(&fd, &d)| number.get(d).map(|&n| (fd, n)))
            .collect();
        let next = Vm { disks, fds, ..vm };
        let same = next.blocks == self.vm.blocks
            && next.disks == self.vm.disks
            && next.fds == self.vm.fds
            && next.ram_fds == self.vm.ram_fds;
        if same {
            return false;
        }
        let kept: Vec<bool> = next
            .disks
            .iter()
            .map(|d| !matches!(d.path, DiskPath::Unfollowable { .. }))
            .collect();
        self.map.relayout(next.blocks.clone(), |export| {
            kept.get(export as usize).copied().unwrap_or(false)
        });
        self.vm = next;
        true
    }

    /// The guest wrote these pages (KVM's dirty ring): the map drops their entries.
    pub fn dirtied(&mut self, pages: &DirtySet) -> u64 {
        self.map.dirtied(pages.pages())
    }

    /// Takes one event (events of other processes are ignored).
    pub fn event(&mut self, ev: &IoEvent) {
        if ev.tgid != self.vm.pid {
            return;
        }
        self.events += 1;
        if !self.landings.is_empty() {
            self.settle(Some(Instant::now()));
        }
        let kind = IoKind::from_u32(ev.kind);
        if kind == Some(IoKind::Discard) {
            if let Some(range) = ev.iovecs().first() {
                self.discarded(range.base, range.len);
            }
            return;
        }
        if let (Some(IoKind::Fallocate), Some(files)) = (kind, self.vm.ram_fds.get(&ev.fd)) {
            // Guest RAM punched out of its file: the pages there read as zeroes now.
            let len = ev.iovecs().first().map_or(0, |c| c.len);
            let ranges: Vec<(u64, u64)> = files
                .iter()
                .filter_map(|f| f.host_range(self.vm.blocks.get(f.block)?, ev.offset, len))
                .collect();
            for (addr, len) in ranges {
                self.discarded(addr, len);
            }
            return;
        }
        let Some(&disk) = self.vm.fds.get(&ev.fd) else {
            return;
        };
        let export = disk as u32;
        match (&self.vm.disks[disk].path, kind) {
            (DiskPath::Nbd { .. }, Some(IoKind::Recv | IoKind::Send)) => {
                self.decoder.event(ev, &mut self.observed);
                for o in std::mem::take(&mut self.observed) {
                    match o {
                        Observed::Landed {
                            offset, addr, len, ..
                        } => self.landed(export, offset, addr, len),
                        Observed::Stored {
                            offset, addr, len, ..
                        } => self.stored(export, offset, addr, len),
                        Observed::Changed { offset, len, .. } => self.changed(export, offset, len),
                    }
                }
            }
            (DiskPath::File { .. }, Some(k @ (IoKind::Read | IoKind::Write))) => {
                let read = k == IoKind::Read;
                let (end, left) = pieces(ev, ev.ret.max(0) as u64, |offset, addr, n| {
                    if read {
                        self.landed(export, offset, addr, n);
                    } else {
                        self.stored(export, offset, addr, n);
                    }
                });
                // Bytes beyond the recorded iovecs: the disk range is known, the memory not.
                if left > 0 && !read {
                    self.changed(export, end, left);
                }
            }
            (DiskPath::File { .. }, Some(k @ (IoKind::AioRead | IoKind::AioWrite))) => {
                self.submitted(ev, export, k == IoKind::AioRead);
            }
            (DiskPath::File { .. }, Some(IoKind::BlockDiscard)) => {
                if let Some(call) = ev.iovecs().first() {
                    self.changed(export, ev.offset, call.len);
                }
            }
            (DiskPath::File { .. }, Some(IoKind::Fallocate)) => {
                if let Some(call) = ev.iovecs().first() {
                    // A shift moves every block after the range: all of them changed.
                    let len = if call.base & FALLOC_SHIFTS != 0 {
                        u64::MAX - ev.offset
                    } else {
                        call.len
                    };
                    self.changed(export, ev.offset, len);
                }
            }
            _ => {}
        }
    }

    /// One iocb of an `io_submit`: a read's pages are overwritten (mapped once it lands), a
    /// write's pages hold what its blocks will.
    fn submitted(&mut self, ev: &IoEvent, export: u32, read: bool) {
        let iovecs = ev.iovecs();
        // A one-buffer request gives its length; an iovec array is as long as its iovecs.
        let bytes = if ev.ret >= 0 {
            ev.ret as u64
        } else {
            iovecs.iter().map(|v| v.len).sum()
        };
        let now = Instant::now();
        let (end, _) = pieces(ev, bytes, |offset, addr, n| {
            if read {
                self.discarded(addr, n);
                self.landings.push(now, export, offset, addr, n);
            } else {
                self.stored(export, offset, addr, n);
            }
        });
        // iovecs beyond those recorded (counted as iov_overflow): their lengths are unknown.
        // A write's are taken as long as its longest recorded one; an entry a longer one
        // should have dropped costs a fallback at migration, never a wrong page.
        let unrecorded = u64::from(ev.iov_total.saturating_sub(ev.iov_count));
        if !read && ev.ret < 0 && unrecorded > 0 {
            let longest = iovecs.iter().map(|v| v.len).max().unwrap_or(4096);
            self.changed(export, end, unrecorded.saturating_mul(longest));
        }
    }

    fn landed(&mut self, export: u32, offset: u64, addr: u64, len: u64) {
        self.landings.cancel_memory(addr, len);
        self.map.landed(export, offset, addr, len, &mut self.memory);
    }

    fn stored(&mut self, export: u32, offset: u64, addr: u64, len: u64) {
        self.landings.cancel_memory(addr, len);
        self.landings.cancel_disk(export, offset, len);
        self.map.stored(export, offset, addr, len, &mut self.memory);
    }

    fn changed(&mut self, export: u32, offset: u64, len: u64) {
        self.landings.cancel_disk(export, offset, len);
        self.map.changed(export, offset, len);
    }

    fn discarded(&mut self, addr: u64, len: u64) {
        self.landings.cancel_memory(addr, len);
        self.map.discarded(addr, len);
    }
}

/// Walks the first `bytes` of a file call's transfer over its recorded iovecs from its disk
/// offset, handing each piece to `f` as (disk offset, host address, length); returns where
/// the recorded pieces end on disk and how many of the `bytes` they did not cover.
fn pieces(ev: &IoEvent, bytes: u64, mut f: impl FnMut(u64, u64, u64)) -> (u64, u64) {
    let (mut offset, mut left) = (ev.offset, bytes);
    for v in ev.iovecs() {
        let n = v.len.min(left);
        if n == 0 {
            break;
        }
        f(offset, v.base, n);
        offset = offset.saturating_add(n);
        left -= n;
    }
    (offset, left)
}

#[cfg(test)]
mod tests {
    use agent_common::syscalls::IoVec;

    use super::*;
    use crate::telemetry::{memmap::RamBlock, vm::Disk};

    fn file(path: &str) -> Disk {
        Disk {
            device: path.into(),
            path: DiskPath::File { path: path.into() },
        }
    }

    fn vm(host: u64, disks: Vec<Disk>, fds: &[(u32, usize)]) -> Vm {
        Vm {
            pid: std::process::id(),
            blocks: vec![RamBlock {
                name: "pc.ram".into(),
                host,
                len: 2 * 4096,
            }],
            disks,
            fds: fds.iter().copied().collect(),
            ram_fds: Default::default(),
            kvm: false,
        }
    }

    /// A pread of one page at disk offset 0 on `fd` into `addr`.
    fn read(fd: u32, addr: u64) -> IoEvent {
        let mut ev = IoEvent {
            kind: IoKind::Read as u32,
            tgid: std::process::id(),
            fd,
            ret: 4096,
            iov_total: 1,
            iov_count: 1,
            ..IoEvent::default()
        };
        ev.iov[0] = IoVec {
            base: addr,
            len: 4096,
        };
        ev
    }

    #[test]
    fn an_io_submit_read_is_mapped_once_it_has_landed_and_a_write_at_once() {
        let mut ram = vec![0x11u8; 4 * 4096];
        let host = (ram.as_ptr() as u64).div_ceil(4096) * 4096;
        let at = (host - ram.as_ptr() as u64) as usize;
        let mut t = VmTrack::new(vm(host, vec![file("/a")], &[(10, 0)]));
        t.event(&read(10, host));
        assert_eq!(t.map().len(), 1);
        // An aio read into the same page: its entry goes at once (the page is being written),
        // and the page is mapped to the new block only once the read is due.
        let mut aio = read(10, host);
        aio.kind = IoKind::AioRead as u32;
        aio.offset = 8 * 4096;
        t.event(&aio);
        assert_eq!(t.map().len(), 0);
        assert_eq!(t.aio_stats().pending, 1);
        ram[at..at + 4096].fill(0x22);
        t.settle(None);
        let e = t.map().get("pc.ram", 0).expect("mapped once landed");
        assert_eq!(
            (e.offset, e.hash),
            (8 * 4096, blockhash::hash(&ram[at..at + 4096]))
        );
        // A vectored aio read (`ret` -1: the iovecs give its length) cancelled by a write to
        // the same block before it was due maps nothing; the write maps its own page.
        let mut aio = read(10, host);
        aio.kind = IoKind::AioRead as u32;
        aio.ret = -1;
        t.event(&aio);
        let mut write = read(10, host + 4096);
        write.kind = IoKind::AioWrite as u32;
        t.event(&write);
        t.settle(None);
        let s = t.aio_stats();
        assert_eq!((s.submitted, s.pending, s.cancelled), (2, 0, 1));
        assert!(t.map().get("pc.ram", 0).is_none());
        assert_eq!(t.map().get("pc.ram", 4096).map(|e| e.offset), Some(0));
        drop(ram);
    }

    #[test]
    fn disks_keep_their_numbers_across_layouts_and_a_removed_ones_entries_go() {
        // Two pages of this process stand in for guest RAM (the map reads them back).
        let ram = vec![0x5au8; 3 * 4096];
        let host = (ram.as_ptr() as u64).div_ceil(4096) * 4096;
        let mut t = VmTrack::new(vm(host, vec![file("/a"), file("/b")], &[(10, 0), (11, 1)]));
        t.event(&read(10, host));
        t.event(&read(11, host + 4096));
        assert_eq!(t.map().len(), 2);

        // /a unplugged, /c plugged in: QEMU lists [/b, /c].
        let next = vm(host, vec![file("/b"), file("/c")], &[(11, 0), (12, 1)]);
        assert!(t.relayout(next.clone()));
        let disks = &t.vm().disks;
        assert_eq!(disks[1], file("/b"), "/b keeps number 1");
        assert_eq!(disks[2], file("/c"), "/c gets the next");
        assert!(matches!(
            &disks[0].path,
            DiskPath::Unfollowable { reason } if reason == "removed from the VM"
        ));
        assert_eq!(t.vm().fds, [(11, 1), (12, 2)].into_iter().collect());
        let fds: Vec<u32> = t.keys().iter().map(|k| k.fd).collect();
        assert_eq!(fds, vec![11, 12, FD_MEMORY]);
        assert_eq!(t.map().len(), 1, "/a's entry went");
        assert_eq!(t.map().get("pc.ram", 4096).map(|e| e.export), Some(1));
        assert!(!t.relayout(next), "the same layout again changes nothing");
        drop(ram);
    }
}
