//! Where a burst's CPU went: the replicas, the simulated nodes, or everything else on the
//! machine (other work beside the bench, the bench itself). Read from `/proc` before and after
//! a phase; a busy machine shows up as "other", a starved replica as a small share of a long
//! wall time.

use serde_json::json;

/// CPU seconds used so far, split by who used them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSample {
    pub replicas_s: f64,
    pub nodes_s: f64,
    /// Busy time of the whole machine (all cores, `/proc/stat`).
    pub machine_s: f64,
}

/// CPU seconds spent during a phase.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSplit {
    pub wall_s: f64,
    pub replicas_s: f64,
    pub nodes_s: f64,
    /// The machine's busy time that neither the replicas nor the simulated nodes used.
    pub other_s: f64,
}

impl CpuSample {
    /// What was used between `self` and the later sample `after`, over `wall_s` seconds.
    pub fn until(&self, after: &CpuSample, wall_s: f64) -> CpuSplit {
        let replicas_s = (after.replicas_s - self.replicas_s).max(0.0);
        let nodes_s = (after.nodes_s - self.nodes_s).max(0.0);
        let machine_s = (after.machine_s - self.machine_s).max(0.0);
        CpuSplit {
            wall_s,
            replicas_s,
            nodes_s,
            other_s: (machine_s - replicas_s - nodes_s).max(0.0),
        }
    }
}

impl CpuSplit {
    pub fn json(&self) -> serde_json::Value {
        json!({"wall_s": self.wall_s, "replicas_s": self.replicas_s,
               "nodes_s": self.nodes_s, "other_s": self.other_s})
    }

    /// One line for the progress output.
    pub fn line(&self) -> String {
        format!(
            "cpu over {:.1} s: replicas {:.1} s, simulated nodes {:.1} s, other work {:.1} s",
            self.wall_s, self.replicas_s, self.nodes_s, self.other_s
        )
    }
}

/// Clock ticks per second of the `/proc` counters.
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in ticks; `None` once it is gone.
fn process_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of all cores from the first line of `/proc/stat` (everything but idle and iowait).
fn machine_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    Some(busy)
}

fn pids_s(pids: &[u32], per_s: f64) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| process_ticks(&s))
        .map(|t| t as f64 / per_s)
        .sum()
}

/// The CPU time used so far by the replicas, the node processes and the machine.
pub fn sample(replicas: &[u32], nodes: &[u32]) -> CpuSample {
    let per_s = ticks_per_s();
    let machine_s = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s))
        .map_or(0.0, |t| t as f64 / per_s);
    CpuSample {
        replicas_s: pids_s(replicas, per_s),
        nodes_s: pids_s(nodes, per_s),
        machine_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_name_with_spaces() {
        let stat = "1234 (surge node) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(process_ticks(stat), Some(300));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 10 50 1000 40 5 5 2 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(machine_ticks(stat), Some(100 + 10 + 50 + 5 + 5 + 2));
    }

    #[test]
    fn a_split_attributes_the_rest_to_other_work() {
        let before = CpuSample {
            replicas_s: 1.0,
            nodes_s: 2.0,
            machine_s: 10.0,
        };
        let after = CpuSample {
            replicas_s: 3.0,
            nodes_s: 5.0,
            machine_s: 20.0,
        };
        let s = before.until(&after, 6.0);
        assert_eq!((s.replicas_s, s.nodes_s, s.other_s), (2.0, 3.0, 5.0));
        assert_eq!(s.wall_s, 6.0);
        // Our own sample of the processes can run ahead of the machine's counter: never negative.
        let odd = before.until(
            &CpuSample {
                machine_s: 11.0,
                ..after
            },
            1.0,
        );
        assert_eq!(odd.other_s, 0.0);
    }
}
