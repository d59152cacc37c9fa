//! One VM followed: its events, routed by fd, become its memory-to-disk map.
//!
//! ```text
//! IoEvent on an NBD fd  -> nbd_decode -> Landed / Stored / Changed -> memmap
//! IoEvent on an image fd (pread/pwrite at an offset)  ---------------> memmap
//! IoEvent Discard (madvise on guest RAM)  ---------------------------> memmap
//! DirtySet (pages KVM's dirty ring saw written)  --------------------> memmap
//! ```
//! Disks are numbered as the VM's registry lists them; that number is the map's export.
use agent_common::syscalls::{FdKey, IoEvent, IoKind, FD_MEMORY};

use super::{
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

    /// Events taken so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// What the follower must follow for this VM: every disk fd, and its memory events.
    pub fn keys(&self) -> Vec<FdKey> {
        let tgid = self.vm.pid;
        let mut keys: Vec<FdKey> = self.vm.fds.keys().map(|&fd| FdKey { tgid, fd }).collect();
        keys.push(FdKey {
            tgid,
            fd: FD_MEMORY,
        });
        keys.sort_unstable();
        keys
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
        let kind = IoKind::from_u32(ev.kind);
        if kind == Some(IoKind::Discard) {
            if let Some(range) = ev.iovecs().first() {
                self.map.discarded(range.base, range.len);
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
                        } => self.map.landed(export, offset, addr, len, &mut self.memory),
                        Observed::Stored {
                            offset, addr, len, ..
                        } => self.map.stored(export, offset, addr, len, &mut self.memory),
                        Observed::Changed { offset, len, .. } => {
                            self.map.changed(export, offset, len)
                        }
                    }
                }
            }
            (DiskPath::File { .. }, Some(k @ (IoKind::Read | IoKind::Write))) => {
                let mut left = ev.ret.max(0) as u64;
                let mut offset = ev.offset;
                for v in ev.iovecs() {
                    let n = v.len.min(left);
                    if n == 0 {
                        break;
                    }
                    if k == IoKind::Read {
                        self.map.landed(export, offset, v.base, n, &mut self.memory);
                    } else {
                        self.map.stored(export, offset, v.base, n, &mut self.memory);
                    }
                    offset = offset.saturating_add(n);
                    left -= n;
                }
                // Bytes beyond the recorded iovecs: the disk range is known, the memory not.
                if left > 0 && k == IoKind::Write {
                    self.map.changed(export, offset, left);
                }
            }
            _ => {}
        }
    }
}
