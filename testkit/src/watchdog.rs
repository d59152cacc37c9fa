//! A hung test fails in bounded time and says what it was waiting on, instead of holding the
//! suite until CI's own limit, which reports neither which test hung nor why.
//!
//! [`Watchdog::arm`] starts a thread that waits for the watchdog to be dropped. If the limit
//! passes first, it writes the test's name, this process's threads and every child process
//! (state, kernel wait channel, command line) to stderr, kills the children (QEMU guests must not
//! outlive the test binary and slow the tests after it), and aborts the binary, which cargo
//! reports as a failed test. It writes to stderr directly: the test harness captures `eprintln!`
//! and would drop it with the aborted process.
use std::{
    fs,
    io::Write,
    sync::mpsc,
    time::{Duration, Instant},
};

/// The variable that overrides [`DEFAULT_LIMIT`], in seconds (for a much slower machine).
pub const LIMIT_VAR: &str = "AGENT_TEST_WATCHDOG_SECS";
/// Far above the longest guest test (about four minutes on two cores).
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Aborts the test binary unless dropped within its limit.
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    /// Arms a watchdog for the calling test, with [`DEFAULT_LIMIT`] or [`LIMIT_VAR`].
    pub fn arm() -> Self {
        let limit = std::env::var(LIMIT_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(DEFAULT_LIMIT, Duration::from_secs);
        Self::arm_for(limit)
    }

    pub fn arm_for(limit: Duration) -> Self {
        let test = std::thread::current()
            .name()
            .unwrap_or("an unnamed test")
            .to_string();
        let (disarm, disarmed) = mpsc::channel::<()>();
        let started = Instant::now();
        std::thread::spawn(move || {
            if disarmed.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            let mut report = format!(
                "\nWATCHDOG: {test} still runs after {:?} (limit {limit:?}, {LIMIT_VAR}): hung.\n",
                started.elapsed()
            );
            report.push_str(&describe());
            let children = children();
            for &(pid, _) in &children {
                // SAFETY: a plain syscall on a pid read from /proc.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            report.push_str(&format!(
                "killed {} child processes; aborting the test binary\n",
                children.len()
            ));
            let _ = std::io::stderr().write_all(report.as_bytes());
            std::process::abort();
        });
        Self { _disarm: disarm }
    }
}

/// This process's threads and its children, one line each.
fn describe() -> String {
    let mut out = String::from("threads of this process:\n");
    if let Ok(tasks) = fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let dir = task.path();
            out.push_str(&format!(
                "  {} {} wchan={}\n",
                task.file_name().to_string_lossy(),
                read_trim(&dir.join("comm")),
                read_trim(&dir.join("wchan")),
            ));
        }
    }
    out.push_str("child processes:\n");
    for (pid, state) in children() {
        let dir = format!("/proc/{pid}");
        let mut cmdline = fs::read(format!("{dir}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        cmdline.truncate(300);
        out.push_str(&format!(
            "  {pid} {state} wchan={} {cmdline}\n",
            read_trim(std::path::Path::new(&format!("{dir}/wchan")))
        ));
    }
    out
}

/// This process's children and their states, from /proc.
fn children() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let stat = read_trim(&entry.path().join("stat"));
        // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&me.as_str()) {
            found.push((pid, fields[0].to_string()));
        }
    }
    found
}

fn read_trim(path: &std::path::Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_sees_its_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(children().iter().any(|(p, _)| *p == pid));
        assert!(describe().contains("sleep 5"));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    #[ignore = "run by a_hung_test_is_aborted_with_a_report, in a child process"]
    fn hangs() {
        let _dog = Watchdog::arm_for(Duration::from_millis(200));
        let _sleeper = std::process::Command::new("sleep").arg("30").spawn();
        std::thread::sleep(Duration::from_secs(30));
    }

    #[test]
    fn a_hung_test_is_aborted_with_a_report() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "watchdog::tests::hangs",
                "--ignored",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{err}");
        assert!(err.contains("WATCHDOG: watchdog::tests::hangs"), "{err}");
        assert!(err.contains("sleep 30"), "the child is listed: {err}");
        assert!(err.contains("killed 1 child"), "{err}");
    }

    #[test]
    fn a_watchdog_dropped_in_time_does_nothing() {
        let dog = Watchdog::arm_for(Duration::from_millis(200));
        drop(dog);
        std::thread::sleep(Duration::from_millis(400));
    }
}
