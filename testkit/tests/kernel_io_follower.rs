//! Kernel tests of the I/O follower: every syscall tracepoint loads and attaches on the
//! running kernel; followed calls become events with the right kind, length, offset, iovecs
//! and copied headers; calls not followed make none; and a real NBD client (qemu-io, QEMU's own
//! NBD code) reading from nas-server and from qemu-nbd is decoded back into the disk ranges it
//! read, landed in its memory. Fallocates: `kernel_fallocate.rs`.
use std::{io::Write, os::fd::AsRawFd};

use agent::telemetry::{
    nbd_decode::{Decoder, Observed},
    IoFollower,
};
use agent_common::syscalls::{FdKey, IoEvent, IoKind, SyscallDrop, FD_MEMORY};
use testkit::{
    follower::{attach, qemu_io_events, recvmsg, sendmsg, wait_for},
    nbd_fixture::NbdFixture,
    require_root, require_tool, Scratch,
};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followed_calls_become_events_with_their_memory_and_headers() {
    if !require_root("followed_calls_become_events_with_their_memory_and_headers") {
        return;
    }
    let mut f = attach();
    let me = std::process::id();
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let dir = Scratch::new("follower");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path("data"))
        .expect("scratch file");
    file.set_len(MIB).expect("size the file");
    f.follow(FdKey {
        tgid: me,
        fd: b.as_raw_fd() as u32,
    })
    .unwrap();
    f.follow(FdKey {
        tgid: me,
        fd: file.as_raw_fd() as u32,
    })
    .unwrap();
    f.follow(FdKey {
        tgid: me,
        fd: FD_MEMORY,
    })
    .unwrap();

    // A 28-byte NBD request header, sent on the unfollowed end and received on the followed one
    // into a buffer of exactly that size, then a 4 KiB payload into two iovecs.
    let header: Vec<u8> = (0u8..28).collect();
    (&a).write_all(&header).unwrap();
    let mut head_buf = [0u8; 28];
    let mut iov = [libc::iovec {
        iov_base: head_buf.as_mut_ptr().cast(),
        iov_len: 28,
    }];
    assert_eq!(recvmsg(&b, &mut iov), 28);
    (&a).write_all(&[0x5a; 4096]).unwrap();
    let mut p1 = vec![0u8; 1024];
    let mut p2 = vec![0u8; 3072];
    let mut iov2 = [
        libc::iovec {
            iov_base: p1.as_mut_ptr().cast(),
            iov_len: 1024,
        },
        libc::iovec {
            iov_base: p2.as_mut_ptr().cast(),
            iov_len: 3072,
        },
    ];
    let mut got = 0;
    while got < 4096 {
        got += recvmsg(&b, &mut iov2[..]);
        if got < 4096 {
            // A short read: the rest into the rest of the buffers (rare on a socketpair).
            break;
        }
    }
    // Sent on the followed end: a sendmsg of its own.
    let out = [7u8; 12];
    let iov3 = [libc::iovec {
        iov_base: out.as_ptr() as *mut _,
        iov_len: 12,
    }];
    assert_eq!(sendmsg(&b, &iov3), 12);
    // pread64 and pwritev at offsets.
    let mut buf = vec![0u8; 8192];
    // SAFETY: the buffer is valid for 8192 bytes and the fd is open.
    let n = unsafe { libc::pread64(file.as_raw_fd(), buf.as_mut_ptr().cast(), 8192, 65536) };
    assert_eq!(n, 8192);
    let wv = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 4096,
    }];
    // SAFETY: one valid iovec.
    let n = unsafe { libc::pwritev(file.as_raw_fd(), wv.as_ptr(), 1, 131072) };
    assert_eq!(n, 4096);
    // madvise(DONTNEED) on an anonymous mapping.
    // SAFETY: a fresh private anonymous mapping of 64 KiB, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the range is the mapping made above.
    assert_eq!(unsafe { libc::madvise(map, 65536, libc::MADV_DONTNEED) }, 0);
    // A call on an unfollowed fd makes no event.
    (&b).write_all(b"x").unwrap();
    let mut x = [0u8; 1];
    let mut iov4 = [libc::iovec {
        iov_base: x.as_mut_ptr().cast(),
        iov_len: 1,
    }];
    assert_eq!(recvmsg(&a, &mut iov4), 1);

    let mut seen = Vec::new();
    let all = wait_for(&mut f, &mut seen, |s| {
        s.iter().any(|e| e.kind == IoKind::Discard as u32)
    })
    .await;
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(map, 65536) };
    let mine: Vec<&IoEvent> = seen.iter().filter(|e| e.tgid == me).collect();
    assert!(all, "no madvise event among {mine:#?}");

    let recv: Vec<&&IoEvent> = mine
        .iter()
        .filter(|e| e.kind == IoKind::Recv as u32)
        .collect();
    assert_eq!(recv.len(), 2, "{recv:#?}");
    assert_eq!(recv[0].ret, 28);
    assert_eq!(recv[0].head(), &header[..], "the header is copied whole");
    assert_eq!(recv[0].iovecs()[0].base, head_buf.as_ptr() as u64);
    assert_eq!(recv[1].ret, 4096);
    assert_eq!(
        recv[1].head(),
        &[] as &[u8],
        "a payload is located, not copied"
    );
    assert_eq!(recv[1].iov_total, 2);
    assert_eq!(
        recv[1]
            .iovecs()
            .iter()
            .map(|v| (v.base, v.len))
            .collect::<Vec<_>>(),
        vec![(p1.as_ptr() as u64, 1024), (p2.as_ptr() as u64, 3072)]
    );
    let send: Vec<&&IoEvent> = mine
        .iter()
        .filter(|e| e.kind == IoKind::Send as u32)
        .collect();
    assert_eq!(send.len(), 1, "only the followed end's send: {send:#?}");
    assert_eq!(send[0].head(), &out[..]);
    let reads: Vec<&&IoEvent> = mine
        .iter()
        .filter(|e| e.kind == IoKind::Read as u32)
        .collect();
    assert_eq!(reads.len(), 1, "{reads:#?}");
    assert_eq!((reads[0].ret, reads[0].offset), (8192, 65536));
    assert_eq!(reads[0].iovecs()[0].base, buf.as_ptr() as u64);
    let writes: Vec<&&IoEvent> = mine
        .iter()
        .filter(|e| e.kind == IoKind::Write as u32)
        .collect();
    assert_eq!(writes.len(), 1, "{writes:#?}");
    assert_eq!((writes[0].ret, writes[0].offset), (4096, 131072));
    let discard = mine
        .iter()
        .find(|e| e.kind == IoKind::Discard as u32)
        .expect("checked above");
    assert_eq!(discard.iovecs()[0].base, map as u64);
    assert_eq!(discard.iovecs()[0].len, 65536);
    assert!(
        !mine.iter().any(|e| e.fd == a.as_raw_fd() as u32),
        "an unfollowed fd made events"
    );
    let drops = f.drops().unwrap();
    assert_eq!(drops[SyscallDrop::RingFull as usize], 0);
    assert_eq!(drops[SyscallDrop::ReadArgs as usize], 0);
}

/// Runs qemu-io's `commands` against `uri`, following the process from before its first
/// syscall (it waits on stdin until followed), and decodes its NBD conversation.
async fn qemu_io_decoded(f: &mut IoFollower, uri: &str, commands: &[&str]) -> Vec<Observed> {
    let mut args = vec!["-r", "-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let events = qemu_io_events(f, &args).await;
    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    for ev in &events {
        decoder.event(ev, &mut seen);
    }
    let stats = decoder.stats();
    eprintln!("{uri}: {} events, {stats:?}", events.len());
    assert_eq!(
        stats.desyncs, 0,
        "the conversation lost its place: {stats:?}"
    );
    assert_eq!(stats.unknown_cookies, 0, "{stats:?}");
    seen
}

/// The disk ranges that landed, merged.
fn landed_ranges(seen: &[Observed]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = seen
        .iter()
        .filter_map(|o| match o {
            Observed::Landed { offset, len, .. } => Some((*offset, offset + len)),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[test]
fn qemu_nbd_reads_are_decoded_against_nas_server_and_qemu_nbd() {
    if !require_root("qemu_nbd_reads_are_decoded_against_nas_server_and_qemu_nbd") {
        return;
    }
    require_tool("qemu-io");
    require_tool("qemu-nbd");
    // The fixture runs its own runtime; the follower gets this one.
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let _entered = rt.enter();
    let mut f = attach();
    let dir = Scratch::new("follower-nbd");
    let image = dir.image("disk.raw", 16 * MIB);
    std::fs::write(&image, testkit::pattern(5, (16 * MIB) as usize)).unwrap();
    let commands = ["read 0 64k", "read 1M 8k", "read 5M 4k"];
    let want = vec![(0, 65536), (MIB, MIB + 8192), (5 * MIB, 5 * MIB + 4096)];

    // nas-server: structured replies.
    let server = NbdFixture::start(&[("disk", &image, false)]);
    let seen = rt.block_on(qemu_io_decoded(&mut f, &server.uri("disk"), &commands));
    assert_eq!(landed_ranges(&seen), want, "nas-server: {seen:#?}");

    // qemu-nbd: QEMU 10 on both ends negotiates extended headers.
    let (_nbd, port) = testkit::qemu_nbd(&image, &["-r"]);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let seen = rt.block_on(qemu_io_decoded(&mut f, &uri, &commands));
    assert_eq!(landed_ranges(&seen), want, "qemu-nbd: {seen:#?}");
    let drops = f.drops().unwrap();
    assert_eq!(drops[SyscallDrop::RingFull as usize], 0);
}
