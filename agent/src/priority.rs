//! The agent's CPU priority while the guest is paused.
//!
//! Through the agents the final iteration crosses three sockets and four busy processes (the
//! two QEMUs and the two agents) where plain QEMU's crosses one between two; on a busy host each
//! hop also waits for a CPU. While the guest runs, the agent keeps the priority it was started
//! with, so it never takes CPU from guests. From the source QEMU's STOP event until the
//! migration ends the guest's vCPUs are stopped anyway, and `agent migrate` raises every thread
//! of its process to `--pause-nice` (default -10). The target agent cannot see the STOP: `agent
//! serve` raises itself to `--session-nice` (default -10) while it has a session, whose work is
//! in proportion to the stream it receives. docs/benchmarks.md measures what they buy.
//! Linux keeps a nice value per thread: each thread in `/proc/self/task` is raised, and threads
//! started later inherit it from their creator. Nested raises (a daemon running several
//! migrations) count: the first raises, the last puts every thread back.
use std::{io, sync::Mutex};

/// Raised threads and what to put back, and how many migrations hold the raise.
static RAISED: Mutex<(usize, Vec<(libc::id_t, i32)>)> = Mutex::new((0, Vec::new()));

/// Holds the raise until dropped.
#[derive(Debug)]
pub struct Raised(());

/// Raises this process's threads to `nice` (never lowers one already above it).
pub fn raise(nice: i32) -> io::Result<Raised> {
    let mut raised = RAISED.lock().unwrap_or_else(|p| p.into_inner());
    if raised.0 == 0 {
        let mut threads = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::id_t>().ok())
            else {
                continue;
            };
            let Some(old) = get(tid) else { continue };
            if old > nice {
                if let Err(e) = set(tid, nice) {
                    for (tid, old) in threads {
                        let _ = set(tid, old);
                    }
                    return Err(e);
                }
                threads.push((tid, old));
            }
        }
        raised.1 = threads;
    }
    raised.0 += 1;
    Ok(Raised(()))
}

impl Drop for Raised {
    fn drop(&mut self) {
        let mut raised = RAISED.lock().unwrap_or_else(|p| p.into_inner());
        raised.0 -= 1;
        if raised.0 == 0 {
            // A thread that has exited since cannot be put back, and need not be.
            for (tid, old) in raised.1.drain(..) {
                let _ = set(tid, old);
            }
        }
    }
}

/// A thread's nice value; `None` if it is gone.
fn get(tid: libc::id_t) -> Option<i32> {
    // getpriority returns -1 both as a value and as an error: errno tells them apart.
    // SAFETY: errno is this thread's; getpriority reads no memory of ours.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some(v)
    }
}

fn set(tid: libc::id_t, nice: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a thread id; no memory is passed.
    match unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raising needs CAP_SYS_NICE; lowering back does not. Unprivileged, the test checks that
    /// the refusal is reported and nothing is held.
    #[test]
    fn raises_every_thread_and_puts_them_back() {
        let me = || get(unsafe { libc::gettid() } as libc::id_t).expect("this thread exists");
        let before = me();
        let worker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        match raise(before - 3) {
            Ok(held) => {
                assert_eq!(me(), before - 3);
                let nested = raise(before - 3).unwrap();
                drop(held);
                assert_eq!(me(), before - 3, "the second holder keeps it raised");
                drop(nested);
                assert_eq!(me(), before);
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
                assert_eq!(RAISED.lock().unwrap().0, 0);
            }
        }
        worker.join().unwrap();
    }
}
