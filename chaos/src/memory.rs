//! How much memory a chaos run's processes hold: the harness itself, and its child processes
//! (replicas, node daemons), read from `/proc`.
//!
//! The kernel keeps each process's peak resident set (`VmHWM` in `/proc/PID/status`), so a
//! sample every second or so misses few peaks of a process that is still alive when sampled. The
//! kernel updates that mark lazily (memory given back with `madvise` can lower the resident set
//! without raising it first), so a peak here is the highest of every `VmHWM` and `VmRSS` read. A
//! replica that is killed and restarted is several processes: its peak is the highest of them
//! (up to the last sample before each died). The harness's own resident set (`VmRSS`) is also
//! kept as a series, thinned to at most [`RSS_SAMPLES_MAX`] evenly spaced points however long the
//! run, so a soak shows whether the harness's memory stays flat.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most points of the harness's resident-set series. When full, every other point goes and the
/// interval doubles.
pub const RSS_SAMPLES_MAX: usize = 512;
/// Interval of the series at the start of a run.
pub const RSS_SAMPLE_INTERVAL_START: Duration = Duration::from_secs(1);

/// The harness's resident set at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssSample {
    /// Milliseconds since the run's workload started.
    pub time_ms: u64,
    pub rss_kib: u64,
}

/// Peak memory of a run's processes, in KiB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFigures {
    /// The harness's peak resident set (its `VmHWM` at the end of the run, or a higher sample).
    pub harness_peak_rss_kib: u64,
    /// Each replica's peak resident set, over all the processes it was.
    pub replica_peak_rss_kib: BTreeMap<u64, u64>,
    /// Each node daemon's (by group name) peak resident set, over all the processes it was.
    pub node_daemon_peak_rss_kib: BTreeMap<String, u64>,
    /// The harness's resident set over the run.
    pub harness_rss_kib: Vec<RssSample>,
}

/// What a child process of the harness is, from its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Replica(u64),
    NodeDaemon(String),
}

/// The role of a process whose arguments (`/proc/PID/cmdline`, split at NULs) are `args`: `surge
/// server --id N ...` (possibly behind `ip netns exec NS`, which execs it) or `surge node
/// --node-id G ...`.
pub fn role_of(args: &[&str]) -> Option<Role> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if args.contains(&"server") {
        value("--id")?.parse().ok().map(Role::Replica)
    } else if args.contains(&"node") {
        value("--node-id").map(|g| Role::NodeDaemon(g.to_string()))
    } else {
        None
    }
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of a `/proc/PID/status` text.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The parent pid in a `/proc/PID/stat` text (the command name may hold spaces and parentheses:
/// the fields after it start after its last `)`).
pub fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The higher of `VmHWM` and `VmRSS` in a status text (see the module doc).
fn peak_kib(status: &str) -> u64 {
    let hwm = status_kib(status, "VmHWM:").unwrap_or(0);
    hwm.max(status_kib(status, "VmRSS:").unwrap_or(0))
}

fn read_status(pid: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// The harness's child processes with a role, and their peak resident sets.
fn children_peaks() -> Vec<(Role, u64)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if parent_of(&stat) != Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let args: Vec<&str> = cmdline.split('\0').filter(|a| !a.is_empty()).collect();
        let (Some(role), Some(status)) = (role_of(&args), read_status(pid)) else {
            continue;
        };
        out.push((role, peak_kib(&status)));
    }
    out
}

/// Samples the run's memory; see the module doc.
pub struct MemoryWatch {
    started: Instant,
    every: Duration,
    figures: MemoryFigures,
}

impl MemoryWatch {
    /// Times of the series count from `started` (the start of the workload).
    pub fn new(started: Instant) -> Self {
        MemoryWatch {
            started,
            every: RSS_SAMPLE_INTERVAL_START,
            figures: MemoryFigures::default(),
        }
    }

    /// How long to wait before the next sample.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Read the harness's resident set and every child's peak now.
    pub fn sample(&mut self) {
        let time_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(status) = read_status("self") {
            let peak = &mut self.figures.harness_peak_rss_kib;
            *peak = (*peak).max(peak_kib(&status));
            if let Some(rss_kib) = status_kib(&status, "VmRSS:") {
                self.push(RssSample { time_ms, rss_kib });
            }
        }
        for (role, peak) in children_peaks() {
            let slot = match role {
                Role::Replica(id) => self.figures.replica_peak_rss_kib.entry(id).or_default(),
                Role::NodeDaemon(g) => self.figures.node_daemon_peak_rss_kib.entry(g).or_default(),
            };
            *slot = (*slot).max(peak);
        }
    }

    fn push(&mut self, s: RssSample) {
        let series = &mut self.figures.harness_rss_kib;
        if series.len() >= RSS_SAMPLES_MAX {
            let mut i = 0;
            series.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.every = self.every.saturating_mul(2);
        }
        series.push(s);
    }

    /// A last sample (call it while the children still run), and the figures.
    pub fn finish(mut self) -> MemoryFigures {
        self.sample();
        self.figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_command_line() {
        let replica = ["/x/surge", "server", "--id", "2", "--listen", "127.0.0.1:1"];
        assert_eq!(role_of(&replica), Some(Role::Replica(2)));
        let netns = [
            "ip", "netns", "exec", "surge-3", "/x/surge", "server", "--id", "3",
        ];
        assert_eq!(role_of(&netns), Some(Role::Replica(3)));
        let node = ["/x/surge", "node", "--server", "a,b", "--node-id", "g1"];
        assert_eq!(role_of(&node), Some(Role::NodeDaemon("g1".into())));
        assert_eq!(role_of(&["/bin/crun", "run"]), None);
    }

    #[test]
    fn proc_texts_parse() {
        let status = "Name:\tsurge\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(123_456));
        assert_eq!(status_kib(status, "VmRSS:"), Some(65_432));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(parent_of("4242 (a) b (c)) S 77 4242 0"), Some(77));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn the_series_stays_bounded_and_spans_the_run() {
        let mut w = MemoryWatch::new(Instant::now());
        for t in 0..(RSS_SAMPLES_MAX as u64 * 5) {
            w.push(RssSample {
                time_ms: t,
                rss_kib: t,
            });
        }
        let s = &w.figures.harness_rss_kib;
        assert!(s.len() <= RSS_SAMPLES_MAX && s.len() > RSS_SAMPLES_MAX / 2);
        assert_eq!(s[0].time_ms, 0, "the start of the run is kept");
        assert!(s
            .last()
            .is_some_and(|l| l.time_ms == RSS_SAMPLES_MAX as u64 * 5 - 1));
        assert!(s.windows(2).all(|w| w[0].time_ms < w[1].time_ms));
        assert!(w.every() > RSS_SAMPLE_INTERVAL_START);
    }

    #[test]
    fn this_process_is_measured() {
        let mut w = MemoryWatch::new(Instant::now());
        w.sample();
        let f = w.finish();
        assert_eq!(f.harness_rss_kib.len(), 2);
        assert!(f.harness_rss_kib.iter().all(|s| s.rss_kib > 0));
        assert!(f
            .harness_rss_kib
            .iter()
            .all(|s| f.harness_peak_rss_kib >= s.rss_kib));
    }
}
