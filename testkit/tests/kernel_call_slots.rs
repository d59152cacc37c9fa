//! Kernel test of the I/O follower's per-thread call slots: a followed call's arguments wait
//! from its entry to its exit in the slot of its thread id modulo `CALL_SLOTS`. Two threads
//! whose ids share a slot, both inside followed calls at once, must never read each other's
//! arguments: the second is refused at entry and counted (`calls_full`), and the first still
//! becomes its own event.
//!
//! Thread ids share a slot only `CALL_SLOTS` (65,536) apart. This machine's `pid_max` is 32,768,
//! so they never do here; production hosts run 4,194,304 (systemd's default on 64-bit). The test
//! raises `pid_max` while it runs and puts it back after.
use std::{
    io::Write,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::syscalls::{FdKey, IoKind, SyscallDrop, CALL_SLOTS};
use testkit::{
    follower::{attach, recvmsg, sendmsg, wait_for},
    require_root,
};

const PID_MAX: &str = "/proc/sys/kernel/pid_max";

/// `pid_max` raised for the test's life, restored on drop.
struct PidMax(u32);

impl PidMax {
    fn at_least(n: u32) -> Self {
        let now: u32 = std::fs::read_to_string(PID_MAX)
            .expect("read pid_max")
            .trim()
            .parse()
            .expect("pid_max is a number");
        if now < n {
            std::fs::write(PID_MAX, n.to_string()).expect("raise pid_max");
        }
        PidMax(now)
    }
}

impl Drop for PidMax {
    fn drop(&mut self) {
        let _ = std::fs::write(PID_MAX, self.0.to_string());
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// Waits until thread `tid` of this process sits in syscall `nr`.
fn wait_in_syscall(tid: u32, nr: i64) {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.split_whitespace().next() == Some(nr.to_string().as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never entered syscall {nr}: {now}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_sharing_a_call_slot_never_read_each_others_calls() {
    if !require_root("threads_sharing_a_call_slot_never_read_each_others_calls") {
        return;
    }
    let _pid_max = PidMax::at_least(4 * CALL_SLOTS);
    let mut f = attach();
    let me = std::process::id();
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let (a, b) = (Arc::new(a), Arc::new(b));
    f.follow(FdKey {
        tgid: me,
        fd: b.as_raw_fd() as u32,
    })
    .unwrap();
    let calls_full =
        |f: &agent::telemetry::IoFollower| f.drops().unwrap()[SyscallDrop::CallsFull as usize];
    let before = calls_full(&f);

    // Thread A blocks in a followed recvmsg: its call holds its slot.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let reader = {
        let b = Arc::clone(&b);
        std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let mut buf = [0u8; 16];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            let n = recvmsg(&b, &mut iov);
            // A's slot was freed at the call's exit: its next followed call is an event too.
            let out = [9u8; 4];
            let iov = [libc::iovec {
                iov_base: out.as_ptr() as *mut _,
                iov_len: out.len(),
            }];
            assert_eq!(sendmsg(&b, &iov), 4);
            (n, buf, buf.as_ptr() as u64)
        })
    };
    let tid_a = tid_rx.recv().unwrap();
    wait_in_syscall(tid_a, libc::SYS_recvmsg);

    // Threads come and go until one has A's slot; that one makes a followed sendmsg while A
    // still waits.
    let mut spawned = 0u32;
    let tid_b = loop {
        let b = Arc::clone(&b);
        let slot = tid_a % CALL_SLOTS;
        let sent = std::thread::spawn(move || {
            let tid = gettid();
            (tid % CALL_SLOTS == slot).then(|| {
                let out = [0xb0u8; 8];
                let iov = [libc::iovec {
                    iov_base: out.as_ptr() as *mut _,
                    iov_len: out.len(),
                }];
                assert_eq!(sendmsg(&b, &iov), 8);
                tid
            })
        })
        .join()
        .unwrap();
        if let Some(tid) = sent {
            break tid;
        }
        spawned += 1;
        assert!(
            spawned < 3 * CALL_SLOTS,
            "no thread id shared thread {tid_a}'s slot after {spawned} threads"
        );
    };
    assert_ne!(tid_b, tid_a);
    assert_eq!(
        calls_full(&f) - before,
        1,
        "thread {tid_b}'s call, refused at entry, is counted"
    );

    // A's call completes with its own arguments.
    let data: Vec<u8> = (1u8..=16).collect();
    (&*a).write_all(&data).unwrap();
    let (n, got, buf_at) = reader.join().unwrap();
    assert_eq!((n, &got[..]), (16, &data[..]));
    let mut seen = Vec::new();
    let came = wait_for(&mut f, &mut seen, |s| {
        s.iter().filter(|e| e.tgid == me && e.tid == tid_a).count() == 2
    })
    .await;
    let mine: Vec<_> = seen.iter().filter(|e| e.tgid == me).collect();
    assert!(
        came,
        "thread {tid_a}'s two calls did not both make events: {mine:#?}"
    );
    assert_eq!(mine.len(), 2, "only A's calls are events: {mine:#?}");
    let (recv, send) = (mine[0], mine[1]);
    assert_eq!((recv.kind, recv.tid), (IoKind::Recv as u32, tid_a));
    assert_eq!(recv.fd, b.as_raw_fd() as u32);
    assert_eq!(recv.ret, 16);
    assert_eq!(recv.head(), &data[..], "A's data, not B's");
    assert_eq!(recv.iovecs()[0].base, buf_at, "A's buffer, not B's");
    assert_eq!(
        (send.kind, send.tid, send.ret),
        (IoKind::Send as u32, tid_a, 4)
    );
    assert_eq!(send.head(), &[9u8; 4]);
    assert_eq!(calls_full(&f) - before, 1);
}
