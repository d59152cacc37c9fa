//! The settings and workloads `bench downtime` crosses, and how one cell is judged.
use std::fmt;

use anyhow::bail;

use crate::lab::Load;

/// How the link and QEMU's cap are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// QEMU's default `max-bandwidth`, no relay: what most operators run. The agents take
    /// QEMU's cap for their link until the switchover, as `agent migrate` does by default.
    Cap,
    /// QEMU's cap lifted, the link limited to 1 Gbit/s by a loopback relay.
    Relay,
    /// QEMU's cap lifted, loopback unlimited.
    Unlimited,
}

/// What the source guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// The reference: 200 MiB of its NAS disk read into its page cache.
    Read,
    /// 200 MiB of files read from an ext4 filesystem on its NAS disk (`lab::files_image`).
    Files,
    /// 300 MiB of random data in its tmpfs: anonymous memory no disk holds.
    Anon,
    /// 200 MiB read, then disk blocks rewritten every second through the migration.
    Writes,
}

/// One setting and one workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    pub setting: Setting,
    pub workload: Workload,
}

const SETTINGS: [(&str, Setting); 3] = [
    ("cap", Setting::Cap),
    ("relay", Setting::Relay),
    ("unlimited", Setting::Unlimited),
];
const WORKLOADS: [(&str, Workload); 4] = [
    ("read", Workload::Read),
    ("files", Workload::Files),
    ("anon", Workload::Anon),
    ("writes", Workload::Writes),
];

impl Cell {
    /// Every cell, settings outermost.
    pub fn all() -> Vec<Cell> {
        SETTINGS
            .iter()
            .flat_map(|&(_, setting)| {
                WORKLOADS
                    .iter()
                    .map(move |&(_, workload)| Cell { setting, workload })
            })
            .collect()
    }

    /// `SETTING:WORKLOAD[,...]`, e.g. `cap:read,relay:anon`; `all` for every cell.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Cell>> {
        if list == "all" {
            return Ok(Self::all());
        }
        list.split(',')
            .map(|one| {
                let (s, w) = one.split_once(':').unwrap_or((one, ""));
                let setting = SETTINGS.iter().find(|(n, _)| *n == s).map(|(_, v)| *v);
                let workload = WORKLOADS.iter().find(|(n, _)| *n == w).map(|(_, v)| *v);
                match (setting, workload) {
                    (Some(setting), Some(workload)) => Ok(Cell { setting, workload }),
                    _ => bail!(
                        "unknown cell {one:?}: SETTING:WORKLOAD with SETTING one of cap, \
                         relay, unlimited and WORKLOAD one of read, files, anon, writes"
                    ),
                }
            })
            .collect()
    }

    pub fn load(&self) -> Load {
        match self.workload {
            Workload::Read => Load {
                read_mb: 200,
                ..Load::default()
            },
            Workload::Files => Load {
                fs_read: true,
                ..Load::default()
            },
            Workload::Anon => Load {
                fill_mb: 300,
                ..Load::default()
            },
            Workload::Writes => Load {
                read_mb: 200,
                disk_writes: true,
                ..Load::default()
            },
        }
    }

    /// The lab's export the guest's disk is on.
    pub fn export(&self) -> &'static str {
        match self.workload {
            Workload::Files => crate::lab::FILES_EXPORT,
            _ => "disk",
        }
    }

    /// Whether the link is what limits plain QEMU's final iteration here.
    pub fn link_bound(&self) -> bool {
        self.setting == Setting::Relay
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = SETTINGS.iter().find(|(_, v)| *v == self.setting);
        let w = WORKLOADS.iter().find(|(_, v)| *v == self.workload);
        write!(f, "{}:{}", s.map_or("?", |x| x.0), w.map_or("?", |x| x.0))
    }
}

/// The target for one cell, on the guest's pause in ms: the agents' median at most
/// plain's + 10 ms (and at most 1.1x plain's where the link limits plain QEMU), their 90th
/// percentile at most plain's + 20 ms. `None` when met, else why not.
pub fn judge(cell: &Cell, plain: (u64, u64), agents: (u64, u64)) -> Option<String> {
    let ((pm, p90), (am, a90)) = (plain, agents);
    let mut why = Vec::new();
    if am > pm + 10 {
        why.push(format!("median {am} > {pm} + 10 ms"));
    }
    if cell.link_bound() && am as f64 > 1.1 * pm as f64 {
        why.push(format!("median {am} > 1.1 x {pm} ms"));
    }
    if a90 > p90 + 20 {
        why.push(format!("p90 {a90} > {p90} + 20 ms"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_parse_and_print_back() {
        let cells = Cell::parse_list("cap:read,unlimited:writes").unwrap();
        let names: Vec<String> = cells.iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["cap:read", "unlimited:writes"]);
        assert_eq!(Cell::parse_list("all").unwrap().len(), 12);
        let files = Cell::parse_list("relay:files").unwrap()[0];
        assert_eq!(files.export(), crate::lab::FILES_EXPORT);
        assert_eq!(cells[0].export(), "disk");
        assert!(Cell::parse_list("cap").is_err());
        assert!(Cell::parse_list("fast:read").is_err());
    }

    #[test]
    fn the_target_allows_ten_ms_and_ten_percent_on_a_slow_link() {
        let cap = Cell::parse_list("cap:read").unwrap()[0];
        let relay = Cell::parse_list("relay:read").unwrap()[0];
        assert_eq!(judge(&cap, (20, 30), (30, 50)), None);
        assert!(judge(&cap, (20, 30), (31, 50)).is_some());
        assert!(judge(&cap, (20, 30), (25, 51)).unwrap().contains("p90"));
        // 200 ms plain on the relay: +10 ms is allowed, but not past 1.1x.
        assert_eq!(judge(&relay, (200, 220), (210, 230)), None);
        assert!(judge(&relay, (50, 60), (58, 60)).unwrap().contains("1.1"));
    }
}
