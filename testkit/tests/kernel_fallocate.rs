//! Kernel tests of the fallocates the I/O follower follows: QEMU's write-zeroes and discards on
//! an image file (qemu-io, QEMU's own block layer) become Fallocate events with their ranges
//! and modes; a zeroed, punched or collapsed range of a followed image, or guest RAM punched
//! out of its memfd, drops exactly the map's entries it touches; and a QEMU whose RAM is a
//! memfd has that file found by the registry. On a host block device (a loop device) QEMU's
//! discards and zero-outs are ioctls, followed as BlockDiscard events.
use std::{collections::HashMap, os::fd::AsRawFd, process::Stdio};

use agent::telemetry::{
    memmap::RamBlock,
    ram_files::{match_ram_fds, RamFile},
    track::VmTrack,
    vm::{Disk, DiskPath, Vm},
};
use agent_common::syscalls::{
    IoEvent, IoKind, BLKDISCARD, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
};
use testkit::{
    follower::{attach, qemu_io_events, wait_for},
    require_root, require_tool, Scratch,
};

const MIB: u64 = 1 << 20;

/// `FALLOC_FL_KEEP_SIZE`: allocate (or punch) without changing the file's size.
const KEEP_SIZE: u64 = 0x01;

/// QEMU's write-zeroes and discard on an image file are fallocate calls, not writes: run by
/// QEMU's own block layer (qemu-io), they become Fallocate events with their ranges and modes.
#[test]
fn qemu_zeroing_and_discarding_an_image_file_become_fallocate_events() {
    if !require_root("qemu_zeroing_and_discarding_an_image_file_become_fallocate_events") {
        return;
    }
    require_tool("qemu-io");
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let _entered = rt.enter();
    let mut f = attach();
    let dir = Scratch::new("follower-fallocate");
    let image = dir.image("disk.raw", 16 * MIB);
    std::fs::write(&image, testkit::pattern(6, (16 * MIB) as usize)).unwrap();
    let events = zero_and_discard(&rt, &mut f, image.to_str().unwrap());
    let calls = ranges(&events, &[IoKind::Fallocate]);
    assert_eq!(
        calls,
        vec![
            (0, 65536, FALLOC_FL_ZERO_RANGE),
            (MIB, 65536, FALLOC_FL_PUNCH_HOLE | KEEP_SIZE),
            (2 * MIB, 131072, FALLOC_FL_PUNCH_HOLE | KEEP_SIZE),
        ],
        "QEMU's write-zeroes, write-zeroes with unmap, discard"
    );
}

/// qemu-io on `target` (an image or a block device): write-zeroes at 0, write-zeroes with unmap
/// at 1 MiB, a discard at 2 MiB (`-d unmap`: discards reach the disk; QEMU drops them by
/// default). Its events.
fn zero_and_discard(
    rt: &tokio::runtime::Runtime,
    f: &mut agent::telemetry::IoFollower,
    target: &str,
) -> Vec<IoEvent> {
    rt.block_on(qemu_io_events(
        f,
        &[
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z -u 1M 64k",
            "-c",
            "discard 2M 128k",
            target,
        ],
    ))
}

/// (offset, length, mode or ioctl command) of the events of these kinds.
fn ranges(events: &[IoEvent], kinds: &[IoKind]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .filter(|e| kinds.iter().any(|&k| e.kind == k as u32))
        .map(|e| (e.offset, e.iovecs()[0].len, e.iovecs()[0].base))
        .collect()
}

/// A loop device set up over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn over(file: &std::path::Path) -> Self {
        require_tool("losetup");
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        Self(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// On a host block device QEMU discards with the BLKDISCARD ioctl (and zeroes with fallocate or
/// BLKZEROOUT): run by QEMU's own block layer (qemu-io on a loop device), the ioctl becomes a
/// BlockDiscard event with its range and command, and a followed disk's map drops exactly the
/// entries those ranges touch.
#[test]
fn qemu_discarding_and_zeroing_a_block_device_become_block_discard_events() {
    if !require_root("qemu_discarding_and_zeroing_a_block_device_become_block_discard_events") {
        return;
    }
    require_tool("qemu-io");
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let _entered = rt.enter();
    let mut f = attach();
    let dir = Scratch::new("follower-blkdev");
    let image = dir.image("disk.raw", 16 * MIB);
    std::fs::write(&image, testkit::pattern(8, (16 * MIB) as usize)).unwrap();
    let dev = Loop::over(&image);
    let events = zero_and_discard(&rt, &mut f, &dev.0);
    let calls = ranges(&events, &[IoKind::Fallocate, IoKind::BlockDiscard]);
    eprintln!("{}: {calls:x?}", dev.0);
    // QEMU 10 on a loop device: write-zeroes without unmap is a write of zeroes, with unmap a
    // fallocate that punches, a discard the BLKDISCARD ioctl. (BLKZEROOUT, followed too, is
    // what it uses on devices that advertise a zeroing write; a loop device does not.)
    assert!(
        events
            .iter()
            .any(|e| e.kind == IoKind::Write as u32 && e.offset == 0),
        "QEMU's write-zeroes: a write"
    );
    assert_eq!(
        calls,
        vec![
            (MIB, 65536, FALLOC_FL_PUNCH_HOLE | KEEP_SIZE),
            (2 * MIB, 131072, BLKDISCARD),
        ],
        "QEMU's write-zeroes with unmap, discard"
    );

    // Those events, on a followed disk whose pages 0-3 hold disk blocks 0x100-0x103 (1 MiB on)
    // and 0x200 (2 MiB): the blocks the ioctls changed leave the map; block 0x110 stays.
    let ram = vec![0x5au8; 6 * 4096];
    let host = (ram.as_ptr() as u64).div_ceil(4096) * 4096;
    let mut t = VmTrack::new(Vm {
        pid: std::process::id(),
        blocks: vec![RamBlock {
            name: "pc.ram".into(),
            host,
            len: 5 * 4096,
        }],
        disks: vec![Disk {
            device: "vda".into(),
            path: DiskPath::File {
                path: dev.0.clone().into(),
            },
        }],
        fds: [(7, 0)].into_iter().collect(),
        ram_fds: HashMap::new(),
        kvm: false,
    });
    for (page, block) in [(0u64, 0x100u64), (1, 0x103), (2, 0x110), (3, 0x200)] {
        t.event(&read_event(7, host + page * 4096, block * 4096));
    }
    assert_eq!(t.map().len(), 4);
    let changes = [IoKind::BlockDiscard as u32, IoKind::Fallocate as u32];
    for e in events.iter().filter(|e| changes.contains(&e.kind)) {
        t.event(&IoEvent {
            tgid: std::process::id(),
            fd: 7,
            ..*e
        });
    }
    let left: Vec<u64> = t.map().entries().map(|(_, e)| e.offset / 4096).collect();
    assert_eq!(left, vec![0x110]);
    drop(ram);
}

/// A pread of one page at disk offset `offset` on `fd` into `addr`, by this process.
fn read_event(fd: u32, addr: u64, offset: u64) -> IoEvent {
    let mut ev = IoEvent {
        kind: IoKind::Read as u32,
        tgid: std::process::id(),
        fd,
        ret: 4096,
        offset,
        iov_total: 1,
        iov_count: 1,
        ..IoEvent::default()
    };
    ev.iov[0].base = addr;
    ev.iov[0].len = 4096;
    ev
}

/// A range of a followed image that is zeroed, punched or collapsed drops the map's entries
/// pointing into it (a collapse: every later block too); a plain allocation drops nothing; and
/// guest RAM that is a file (a memfd, as `memory-backend-memfd`) punched out drops the entries
/// of those pages. This process stands in for QEMU: a memfd mapping of its own is the guest's
/// RAM, found in /proc as the daemon finds QEMU's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_punched_or_collapsed_image_ranges_and_punched_ram_leave_the_map() {
    if !require_root("zeroed_punched_or_collapsed_image_ranges_and_punched_ram_leave_the_map") {
        return;
    }
    let mut f = attach();
    let dir = Scratch::new("follower-fallocate-map");
    let path = dir.path("disk.raw");
    std::fs::write(&path, testkit::pattern(7, MIB as usize)).unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let fd = file.as_raw_fd();
    const RAM: usize = 65536;
    // SAFETY: a plain syscall with a NUL-terminated name.
    let memfd = unsafe { libc::memfd_create(c"pc.ram".as_ptr(), 0) };
    assert!(
        memfd >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sizing the memfd made above.
    assert_eq!(unsafe { libc::ftruncate(memfd, RAM as i64) }, 0);
    // SAFETY: a fresh shared mapping of the whole memfd, unmapped at the end.
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd,
            0,
        )
    };
    assert_ne!(ram, libc::MAP_FAILED);
    let blocks = vec![RamBlock {
        name: "pc.ram".into(),
        host: ram as u64,
        len: RAM as u64,
    }];
    let ram_fds = match_ram_fds(std::path::Path::new("/proc/self"), &blocks);
    assert_eq!(
        ram_fds.get(&(memfd as u32)),
        Some(&vec![RamFile {
            block: 0,
            file_offset: 0
        }]),
        "the memfd found as the RAM's file: {ram_fds:?}"
    );
    let vm = Vm {
        pid: std::process::id(),
        blocks,
        disks: vec![Disk {
            device: "virtio0".into(),
            path: DiskPath::File { path: path.clone() },
        }],
        fds: HashMap::from([(fd as u32, 0)]),
        ram_fds,
        kvm: false,
    };
    let mut track = VmTrack::new(vm);
    for key in track.keys() {
        f.follow(key).unwrap();
    }
    // SAFETY: the mapping is RAM bytes long and the fd is open.
    assert_eq!(unsafe { libc::pread64(fd, ram, RAM, 0) }, RAM as isize);
    // The read is taken in before anything changes the pages (the map reads them when it takes
    // the event).
    let me = std::process::id();
    let mut seen = Vec::new();
    let read = wait_for(&mut f, &mut seen, |s| {
        s.iter()
            .any(|e| e.tgid == me && e.kind == IoKind::Read as u32)
    })
    .await;
    assert!(read, "no read event: {seen:#?}");
    for ev in seen.drain(..) {
        track.event(&ev);
    }
    assert_eq!(track.map().len(), 16, "the read mapped every page");
    let falloc = |mode: u64, offset: u64, len: u64| {
        // SAFETY: a plain syscall on an open fd.
        let rc = unsafe { libc::fallocate(fd, mode as i32, offset as i64, len as i64) };
        assert_eq!(
            rc,
            0,
            "fallocate mode {mode:#x}: {} (the scratch file system must support it)",
            std::io::Error::last_os_error()
        );
    };
    falloc(KEEP_SIZE, 0, 4096);
    falloc(FALLOC_FL_ZERO_RANGE, 4096, 8192);
    falloc(FALLOC_FL_PUNCH_HOLE | KEEP_SIZE, 8 * 4096, 4096);
    falloc(FALLOC_FL_COLLAPSE_RANGE, 12 * 4096, 4096);
    // The RAM's pages 4 and 5 (disk blocks 4 and 5) punched out of its file.
    // SAFETY: a plain syscall on the memfd.
    let rc = unsafe {
        libc::fallocate(
            memfd,
            (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) as i32,
            4 * 4096,
            2 * 4096,
        )
    };
    assert_eq!(
        rc,
        0,
        "punch the memfd: {}",
        std::io::Error::last_os_error()
    );
    let complete = wait_for(&mut f, &mut seen, |s| {
        s.iter()
            .filter(|e| e.tgid == me && e.kind == IoKind::Fallocate as u32)
            .count()
            >= 4
    })
    .await;
    for key in track.keys() {
        f.unfollow(key).unwrap();
    }
    assert!(complete, "four fallocate events: {seen:#?}");
    for ev in &seen {
        track.event(ev);
    }
    // SAFETY: the mapping and the memfd made above, no longer used.
    unsafe {
        libc::munmap(ram, RAM);
        libc::close(memfd);
    }
    let falloc_events: Vec<u64> = seen
        .iter()
        .filter(|e| e.tgid == me && e.kind == IoKind::Fallocate as u32)
        .map(|e| e.iovecs()[0].base)
        .collect();
    assert!(
        !falloc_events.contains(&KEEP_SIZE),
        "a plain allocation made an event: {falloc_events:x?}"
    );
    let mut left: Vec<u64> = track
        .map()
        .entries()
        .map(|(_, e)| e.offset / 4096)
        .collect();
    left.sort_unstable();
    assert_eq!(
        left,
        vec![0, 3, 6, 7, 9, 10, 11],
        "image: zeroed 1-2, punched 8, collapsed from 12 on; RAM: pages 4-5 punched"
    );
}

/// QEMU with its RAM in a memfd (`memory-backend-memfd`, as vhost-user set-ups run it): the
/// registry finds the fd QEMU holds on that file and where the RAM block sits in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_whose_ram_is_a_memfd_has_that_file_found() {
    if !require_root("a_qemu_whose_ram_is_a_memfd_has_that_file_found") {
        return;
    }
    let dir = Scratch::new("ram-memfd");
    let qmp = dir.path("qemu.qmp");
    let _qemu = testkit::Running(
        testkit::qemu::qemu_command(None)
            .args([
                "-accel",
                "tcg",
                "-m",
                "64",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .args(["-object", "memory-backend-memfd,id=ram0,size=64M,share=on"])
            .args(["-machine", "pc,memory-backend=ram0", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64"),
    );
    let mut q = testkit::qemu::qmp_when_up(&qmp).await.expect("QMP");
    let vm = Vm::inspect(&mut q).await.expect("inspect the VM");
    let ram = vm
        .blocks
        .iter()
        .position(|b| b.len == 64 * MIB)
        .unwrap_or_else(|| panic!("no 64 MiB RAM block: {:?}", vm.blocks));
    let found: Vec<(&u32, &Vec<RamFile>)> = vm
        .ram_fds
        .iter()
        .filter(|(_, files)| files.iter().any(|f| f.block == ram))
        .collect();
    assert_eq!(found.len(), 1, "one fd on the RAM's file: {:?}", vm.ram_fds);
    let (fd, files) = found[0];
    assert_eq!(
        files,
        &vec![RamFile {
            block: ram,
            file_offset: 0
        }]
    );
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", vm.pid)).unwrap();
    assert!(
        link.to_string_lossy().starts_with("/memfd:"),
        "fd {fd} is {}",
        link.display()
    );
}
