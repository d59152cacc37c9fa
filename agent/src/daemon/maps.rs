//! The daemon's followed VMs, each with its memory-to-disk map, and the view of one map that a
//! migration's source side asks ([`VmPageMap`]).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use crate::{
    migration::pagemap::{Claim, PageMap},
    plan::observed::Observed,
    telemetry::{
        dirty_ring::RingView,
        track::VmTrack,
        vm::{Disk, DiskPath},
    },
};

/// One followed VM. A std Mutex, not a tokio one: nothing awaits while holding it, and the
/// source's per-page lookups and the follower's per-event updates are short.
pub struct Followed {
    pub qmp: PathBuf,
    pub track: Mutex<VmTrack>,
    /// Its dirty rate and sampled RAM (see [`super::figures`]).
    pub figures: Mutex<Observed>,
    /// Held while its dirty rate is measured: QEMU runs one `calc-dirty-rate` at a time.
    pub measuring: tokio::sync::Mutex<()>,
    /// What KVM's dirty ring reported of it (see [`super::ring`]).
    pub ring: Mutex<RingView>,
}

impl Followed {
    pub fn track(&self) -> std::sync::MutexGuard<'_, VmTrack> {
        self.track.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn figures(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.figures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn ring(&self) -> std::sync::MutexGuard<'_, RingView> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every followed VM, by QEMU pid.
#[derive(Default)]
pub struct Registry {
    vms: Mutex<HashMap<u32, Arc<Followed>>>,
}

impl Registry {
    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Followed>>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds (or replaces) the VM of `track`.
    pub fn add(&self, qmp: PathBuf, track: VmTrack) -> Arc<Followed> {
        let pid = track.vm().pid;
        let vm = Arc::new(Followed {
            qmp,
            track: Mutex::new(track),
            figures: Mutex::default(),
            measuring: tokio::sync::Mutex::new(()),
            ring: Mutex::default(),
        });
        self.vms().insert(pid, vm.clone());
        vm
    }

    pub fn remove_qmp(&self, qmp: &Path) -> Option<Arc<Followed>> {
        let mut vms = self.vms();
        let pid = *vms.iter().find(|(_, v)| v.qmp == qmp)?.0;
        vms.remove(&pid)
    }

    pub fn by_qmp(&self, qmp: &Path) -> Option<Arc<Followed>> {
        self.vms().values().find(|v| v.qmp == qmp).cloned()
    }

    pub fn by_pid(&self, pid: u32) -> Option<Arc<Followed>> {
        self.vms().get(&pid).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Followed>> {
        let mut all: Vec<_> = self.vms().values().cloned().collect();
        all.sort_by(|a, b| a.qmp.cmp(&b.qmp));
        all
    }
}

/// The name a migration uses for a disk: the NBD export name, or the image's path.
pub fn export_name(disk: &Disk) -> Option<String> {
    match &disk.path {
        DiskPath::Nbd { export, .. } => Some(export.clone()),
        DiskPath::File { path } => Some(path.display().to_string()),
        DiskPath::Unfollowable { .. } => None,
    }
}

/// One VM's map, in terms of a migration's exports.
pub struct VmPageMap {
    vm: Arc<Followed>,
    /// Disk number -> index into the migration's exports.
    exports: Vec<Option<usize>>,
}

impl VmPageMap {
    /// The map of `vm` for a migration whose exports are `exports`; disks the migration does
    /// not name are never claimed.
    pub fn new(vm: Arc<Followed>, exports: &[String]) -> Self {
        let exports = vm
            .track()
            .vm()
            .disks
            .iter()
            .map(|d| export_name(d).and_then(|n| exports.iter().position(|e| *e == n)))
            .collect();
        Self { vm, exports }
    }

    /// Whether any of the VM's disks is one of the migration's exports.
    pub fn names_any(&self) -> bool {
        self.exports.iter().any(Option::is_some)
    }
}

impl PageMap for VmPageMap {
    fn claim(&self, block: &str, offset: u64) -> Option<Claim> {
        let track = self.vm.track();
        let entry = track.map().get(block, offset)?;
        let export = self.exports.get(entry.export as usize).copied().flatten()?;
        Some(Claim {
            export,
            offset: entry.offset,
            hash: entry.hash,
        })
    }
}
