//! Kernel tests of the dirty-page follower (KVM's dirty ring), on the running kernel:
//!
//! 1. Decoding and counting, with `BPF_PROG_TEST_RUN` on synthetic tracepoint arguments: a slot
//!    declared by a real `KVM_SET_USER_MEMORY_REGION` on a real KVM VM of this process (a
//!    refused one is not kept, a deleted one is gone), pushes placed at their host addresses,
//!    counted per page, the ones outside a known slot counted and not placed, resets and
//!    ring-full exits counted, a process not followed left alone, and a drain that takes every
//!    page once.
//! 2. Invalidation: a page of the memory-to-disk map that the ring says was written drops out.
//! 3. Attach, end to end: a real QEMU under KVM with a dirty ring, followed after it started;
//!    `calc-dirty-rate` in mode `dirty-ring` turns logging on, QEMU declares its slots again,
//!    and the pages KVM pushes land in its RAM blocks, as many as QEMU itself counted.
//! 4. The dirty rate of a KVM guest is measured with KVM's logging: its dirty ring when QEMU has
//!    one, else its dirty bitmap (page sampling is for TCG); never while it is being migrated.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use agent::{
    plan::{
        dirty::{measure_for, DirtyError, DirtyMode},
        QemuView,
    },
    qmp::Qmp,
    telemetry::{
        dirty_ring::DirtyRing,
        loader::load_object,
        memmap::{MemoryMap, ProcessMemory, RamBlock},
        vm::Vm,
        ObjectSource,
    },
};
use agent_common::dirty::{DirtyEvent, Slot, KVM_MEM_LOG_DIRTY_PAGES, KVM_SET_USER_MEMORY_REGION};
use aya::{
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use testkit::{require_root, Running, Scratch};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const KVM_CREATE_VM: u64 = 0xae01;

/// Tests 1 and 2 follow this very process: one at a time, or each would see the other's slots
/// and drain the other's pages.
static SELF_FOLLOWED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SELF_FOLLOWED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Loads the object and attaches the dirty-ring programs.
fn attach() -> (Ebpf, DirtyRing) {
    let mut ebpf = load_object(&ObjectSource::Embedded, &[])
        .unwrap_or_else(|e| panic!("cannot load the eBPF object: {e}"));
    let ring = DirtyRing::attach(&mut ebpf)
        .unwrap_or_else(|e| panic!("cannot attach the dirty-ring programs: {e}"));
    (ebpf, ring)
}

/// Runs raw-tracepoint program `name` once on `args`, as the kernel would call it.
fn run(ebpf: &Ebpf, name: &str, args: &[u64]) {
    let program: &RawTracePoint = ebpf
        .program(name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .try_into()
        .expect("a raw tracepoint program");
    let mut opts = RawTracePointRunOptions::new();
    opts.args[..args.len()].copy_from_slice(args);
    let r = program
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {e}"));
    assert_eq!(r.return_value, 0, "{name} returned {}", r.return_value);
}

/// `kvm_dirty_ring_push(ring, slot, offset)` on synthetic arguments.
fn push(ebpf: &Ebpf, slot: u32, offset: u64) {
    run(ebpf, "dirty_ring_push", &[0, u64::from(slot), offset]);
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    addr: u64,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            addr: p as u64,
            len,
        }
    }

    fn page_mut(&mut self, n: u64) -> &mut [u8] {
        assert!((n + 1) * PAGE <= self.len as u64);
        // SAFETY: the page lies inside this live mapping, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut((self.addr + n * PAGE) as *mut u8, PAGE as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A KVM VM of this process (its fd), or a failure saying why there is none.
fn kvm_vm() -> OwnedFd {
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap_or_else(|e| panic!("/dev/kvm: {e} (these tests need KVM's ioctls, not a guest)"));
    // SAFETY: KVM_CREATE_VM takes a machine type (0) and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    assert!(
        fd >= 0,
        "KVM_CREATE_VM: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the fd was just returned to this process and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `KVM_SET_USER_MEMORY_REGION` on `vm`: the call's result.
fn set_region(vm: &OwnedFd, region: &Slot) -> std::io::Result<()> {
    // SAFETY: the ioctl reads one struct kvm_userspace_memory_region, which Slot lays out.
    let rc = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_SET_USER_MEMORY_REGION as _,
            region as *const Slot,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn pushes_are_decoded_counted_and_placed_through_the_slots_qemu_declares() {
    if !require_root("pushes_are_decoded_counted_and_placed_through_the_slots_qemu_declares") {
        return;
    }
    let _one = one_at_a_time();
    let (ebpf, mut ring) = attach();
    let me = std::process::id();
    let memory = Mapping::new(4 * MIB as usize);
    let vm = kvm_vm();
    let region = Slot {
        slot: 3,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0x10_0000,
        memory_size: 4 * MIB,
        userspace_addr: memory.addr,
    };

    // Not followed yet: neither the slot nor the pushes are seen.
    set_region(&vm, &region).expect("a valid slot");
    push(&ebpf, 3, 5);
    assert_eq!(ring.counts(me).unwrap(), None);
    assert!(ring.slots(me).is_empty());
    assert!(ring.drain().unwrap().is_empty());

    ring.follow(me).unwrap();
    set_region(&vm, &region).expect("the same slot again");
    let refused = Slot {
        slot: 4,
        memory_size: 4097,
        ..region
    };
    assert!(
        set_region(&vm, &refused).is_err(),
        "KVM takes whole pages only"
    );
    assert_eq!(ring.slots(me), vec![region], "only the slot KVM accepted");

    for offset in [5, 5, 5, 1023, 0] {
        push(&ebpf, 3, offset);
    }
    push(&ebpf, 3, 1024); // one past the slot's end
    push(&ebpf, 9, 1); // a slot never declared
    run(&ebpf, "dirty_ring_reset", &[0]);
    run(&ebpf, "dirty_ring_exit", &[0]);
    let c = ring.counts(me).unwrap().expect("followed");
    assert_eq!(c.get(DirtyEvent::Push), 7);
    assert_eq!(c.get(DirtyEvent::OutsideSlot), 1);
    assert_eq!(c.get(DirtyEvent::Unmapped), 1);
    assert_eq!(c.get(DirtyEvent::Reset), 1);
    assert_eq!(c.get(DirtyEvent::FullExit), 1);
    assert_eq!(c.get(DirtyEvent::SlotSet), 1);
    assert_eq!(c.get(DirtyEvent::ChunksFull), 0);

    let hot = ring.hottest(me, 2);
    assert_eq!(
        hot[0],
        (memory.addr + 5 * PAGE, 3),
        "page 5, pushed three times"
    );
    assert_eq!(hot[1].1, 1);

    let sets = ring.drain().unwrap();
    let pages: Vec<u64> = sets[&me].pages().collect();
    let at = |n: u64| memory.addr + n * PAGE;
    assert_eq!(pages, vec![at(0), at(5), at(1023)]);
    assert!(
        ring.drain().unwrap().is_empty(),
        "a drain takes each page once"
    );

    // 600 pages over two chunks, every one kept.
    for offset in 100..700 {
        push(&ebpf, 3, offset);
    }
    let sets = ring.drain().unwrap();
    assert_eq!(sets[&me].len(), 600);
    assert!((100..700).all(|n| sets[&me].contains(at(n))));

    // A deleted slot is forgotten: its pushes are unmapped again.
    set_region(
        &vm,
        &Slot {
            memory_size: 0,
            ..region
        },
    )
    .expect("delete the slot");
    assert!(ring.slots(me).is_empty());
    push(&ebpf, 3, 5);
    assert_eq!(
        ring.counts(me).unwrap().unwrap().get(DirtyEvent::Unmapped),
        2
    );

    ring.unfollow(me).unwrap();
    assert_eq!(ring.counts(me).unwrap(), None);
}

#[test]
fn a_page_the_ring_says_was_written_leaves_the_memory_to_disk_map() {
    if !require_root("a_page_the_ring_says_was_written_leaves_the_memory_to_disk_map") {
        return;
    }
    let _one = one_at_a_time();
    let (ebpf, mut ring) = attach();
    let me = std::process::id();
    let mut memory = Mapping::new(2 * MIB as usize);
    for n in [5, 6] {
        memory.page_mut(n).fill(0x40 + n as u8);
    }
    let vm = kvm_vm();
    ring.follow(me).unwrap();
    set_region(
        &vm,
        &Slot {
            slot: 1,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: 2 * MIB,
            userspace_addr: memory.addr,
        },
    )
    .expect("a valid slot");

    // Pages 5 and 6 of the block arrived from disk blocks 40 and 41.
    let mut map = MemoryMap::new(vec![RamBlock {
        name: "pc.ram".into(),
        host: memory.addr,
        len: 2 * MIB,
    }]);
    let mut reader = ProcessMemory { pid: me };
    map.landed(0, 40 * PAGE, memory.addr + 5 * PAGE, 2 * PAGE, &mut reader);
    assert_eq!(map.len(), 2);

    // The guest writes page 5: the ring pushes it, and its entry goes.
    push(&ebpf, 1, 5);
    let sets = ring.drain().unwrap();
    assert_eq!(map.dirtied(sets[&me].pages()), 1);
    assert!(map.get("pc.ram", 5 * PAGE).is_none());
    assert!(map.get("pc.ram", 6 * PAGE).is_some());
    assert_eq!(map.stats().dirtied, 1);
    ring.unfollow(me).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kvm_guests_dirty_ring_is_followed_from_its_qemu() {
    if !require_root("a_kvm_guests_dirty_ring_is_followed_from_its_qemu") {
        return;
    }
    let dir = Scratch::new("dirty-ring");
    let (_qemu, qmp_path) = kvm_qemu(&dir, "ring", "kvm,dirty-ring-size=4096");
    let mut qmp = connect(&qmp_path).await;
    let vm = Vm::inspect(&mut qmp).await.expect("inspect the VM");
    let (_ebpf, mut ring) = attach();
    ring.follow(vm.pid).unwrap();
    assert!(
        ring.slots(vm.pid).is_empty(),
        "slots are declared at start-up, before the follow"
    );

    let secs = 2;
    qmp.execute(
        "calc-dirty-rate",
        Some(serde_json::json!({"calc-time": secs, "mode": "dirty-ring"})),
    )
    .await
    .expect("calc-dirty-rate in mode dirty-ring (QEMU runs with dirty-ring-size)");
    // QEMU turns logging on from its own thread; the guest runs only once it is on, so no push
    // can come before its slot is known.
    tokio::time::sleep(Duration::from_millis(300)).await;
    qmp.execute("cont", None).await.expect("cont");
    // Drain while QEMU measures: the dirty set is bounded, so it is taken as it fills.
    let mut pages = agent::telemetry::DirtySet::default();
    let mut logging_slots = 0;
    for _ in 0..(secs * 10 + 10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (_, set) in ring.drain().unwrap() {
            for p in set.pages() {
                pages.insert(p);
            }
        }
        logging_slots = logging_slots.max(
            ring.slots(vm.pid)
                .iter()
                .filter(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
                .count(),
        );
    }
    let rate = qmp
        .execute("query-dirty-rate", None)
        .await
        .expect("query-dirty-rate");
    assert_eq!(rate["status"], "measured", "{rate}");
    let c = ring.counts(vm.pid).unwrap().expect("followed");
    eprintln!(
        "QEMU: {} MB/s; followed: {:?} pages distinct, {} slots logging; counts {}",
        rate["dirty-rate"],
        pages.len(),
        logging_slots,
        serde_json::json!(c.named())
    );
    assert!(
        logging_slots > 0,
        "turning logging on declares the slots again"
    );
    assert!(c.get(DirtyEvent::Push) > 0, "the guest ran and wrote");
    assert!(c.get(DirtyEvent::Reset) > 0, "QEMU harvested the rings");
    assert_eq!(c.get(DirtyEvent::Unmapped), 0, "every push had its slot");
    assert_eq!(c.get(DirtyEvent::ChunksFull), 0);
    // Every page lies in a RAM block of the guest.
    let in_ram = |p: u64| vm.blocks.iter().any(|b| p >= b.host && p < b.host + b.len);
    assert!(!pages.is_empty());
    assert!(pages.pages().all(in_ram), "a page outside the guest's RAM");
    // QEMU counts the same pushes per vCPU over its window (MB/s, rounded down); the agent
    // saw at least those.
    let qemu_pages = rate["dirty-rate"].as_u64().unwrap_or(0) * secs as u64 * MIB / PAGE;
    assert!(
        c.get(DirtyEvent::Push) >= qemu_pages,
        "QEMU counted {qemu_pages} pushes, the agent {}",
        c.get(DirtyEvent::Push)
    );
}

/// A KVM QEMU, paused at start, with `accel` options; its monitor's path.
fn kvm_qemu(dir: &Scratch, name: &str, accel: &str) -> (Running, std::path::PathBuf) {
    let qmp = dir.path(&format!("{name}.sock"));
    (testkit::qemu::kvm_qemu(&qmp, accel), qmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kvm_guests_dirty_rate_comes_from_kvms_own_logging() {
    if !require_root("a_kvm_guests_dirty_rate_comes_from_kvms_own_logging") {
        return;
    }
    let dir = Scratch::new("dirty-modes");
    for (accel, want) in [
        ("kvm,dirty-ring-size=4096", DirtyMode::DirtyRing),
        ("kvm", DirtyMode::DirtyBitmap),
    ] {
        let (_qemu, path) = kvm_qemu(&dir, want.qmp_name(), accel);
        let mut qmp = connect(&path).await;
        let view = QemuView::read(&mut qmp).await.expect("QEMU's view");
        assert!(view.kvm, "{accel}: query-kvm says enabled");
        qmp.execute("cont", None).await.expect("cont");
        drop(qmp);
        let sample = measure_for(&path, Duration::from_millis(500), view.kvm)
            .await
            .unwrap_or_else(|e| panic!("{accel}: {e}"));
        assert_eq!(sample.mode, want, "{accel}");
        eprintln!(
            "{accel}: {} B/s in mode {:?}",
            sample.bytes_per_sec, sample.mode
        );

        // While the VM is being migrated, its dirty logging is the migration's: not measured.
        let mut qmp = connect(&path).await;
        qmp.set_migration_parameter("max-bandwidth", 1 << 20)
            .await
            .expect("max-bandwidth");
        qmp.execute(
            "migrate",
            Some(serde_json::json!({"uri": "exec:cat > /dev/null"})),
        )
        .await
        .expect("migrate");
        drop(qmp);
        match measure_for(&path, Duration::from_millis(500), view.kvm).await {
            Err(DirtyError::Migrating(state)) => eprintln!("{accel}: not measured while {state}"),
            other => panic!("{accel}: measured during a migration: {other:?}"),
        }
    }
}

async fn connect(path: &Path) -> Qmp {
    testkit::qemu::qmp_when_up(path)
        .await
        .unwrap_or_else(|e| panic!("QEMU's monitor never came up: {e}"))
}
