//! CPU time, for the benchmarks: of the calling thread, of a running process (from /proc), and
//! of the children this process has reaped.
use std::time::Duration;

/// User and system (kernel) CPU time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user: Duration,
    pub system: Duration,
}

impl Cpu {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(start.user),
            system: self.system.saturating_sub(start.system),
        }
    }
}

fn rusage(who: libc::c_int) -> Cpu {
    // SAFETY: getrusage fills one rusage through a valid pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Cpu {
        user: d(ru.ru_utime),
        system: d(ru.ru_stime),
    }
}

/// CPU time of the calling thread from the moment it is started.
pub struct ThreadCpu(Cpu);

impl ThreadCpu {
    pub fn start() -> Self {
        Self(rusage(libc::RUSAGE_THREAD))
    }

    pub fn elapsed(&self) -> Cpu {
        rusage(libc::RUSAGE_THREAD).since(self.0)
    }
}

/// CPU time of the children reaped from the moment it is started.
pub struct ChildrenCpu(Cpu);

impl ChildrenCpu {
    pub fn start() -> Self {
        Self(rusage(libc::RUSAGE_CHILDREN))
    }

    pub fn elapsed(&self) -> Duration {
        rusage(libc::RUSAGE_CHILDREN).since(self.0).total()
    }
}

/// User plus system CPU time of a running process, from /proc.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}
