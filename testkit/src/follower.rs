//! The I/O follower for the kernel tests: attached from the embedded object, and its events
//! collected until the test sees what it waits for.
use std::time::{Duration, Instant};

use agent::telemetry::{IoFollower, ObjectSource};
use agent_common::syscalls::IoEvent;

/// The follower with every syscall tracepoint attached (panics with the reason otherwise).
pub fn attach() -> IoFollower {
    IoFollower::attach(&ObjectSource::Embedded)
        .unwrap_or_else(|e| panic!("cannot attach the syscall tracepoints: {e}"))
}

/// Waits up to 2 s for events matching `pred`, collecting everything seen; whether they came.
pub async fn wait_for(
    f: &mut IoFollower,
    seen: &mut Vec<IoEvent>,
    pred: impl Fn(&[IoEvent]) -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pred(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = tokio::time::timeout(left, f.next_events(seen)).await;
    }
    true
}

/// Runs `qemu-io` with `args` (options, `-c` commands, the image last), followed on every fd
/// from before its first syscall (a shell waits on stdin until the follow is in place), and
/// returns its events once it exited. Panics if it fails or reports a failed command.
pub async fn qemu_io_events(f: &mut IoFollower, args: &[&str]) -> Vec<IoEvent> {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };

    use agent_common::syscalls::{FdKey, FD_ANY};
    let mut script = String::from("read _ && exec qemu-io");
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    let tgid = child.id();
    let key = FdKey { tgid, fd: FD_ANY };
    f.follow(key).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().expect("qemu-io runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {out:?}"
    );
    let mut events = Vec::new();
    // Every event is in the ring by the time the process has exited.
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.drain(&mut events);
    f.unfollow(key).unwrap();
    events.retain(|e| e.tgid == tgid);
    events
}

/// `recvmsg` into `iov` on `s`: the bytes received (panics on an error).
pub fn recvmsg(s: &std::os::unix::net::UnixStream, iov: &mut [libc::iovec]) -> usize {
    // SAFETY: a zeroed msghdr is valid; it points at iovecs that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    // SAFETY: msg and its iovecs are valid for the call.
    let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(s), &mut msg, 0) };
    usize::try_from(n).expect("recvmsg")
}

/// `sendmsg` of `iov` on `s`: the bytes sent (panics on an error).
pub fn sendmsg(s: &std::os::unix::net::UnixStream, iov: &[libc::iovec]) -> usize {
    // SAFETY: as in recvmsg; sendmsg only reads the iovecs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut _;
    msg.msg_iovlen = iov.len();
    // SAFETY: msg and its iovecs are valid for the call.
    let n = unsafe { libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(s), &msg, 0) };
    usize::try_from(n).expect("sendmsg")
}
