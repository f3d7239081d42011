//! The domain: resources, nodes, jobs (arrays of identical sandboxes) and their states.
//! Plain data; everything here is serialized into the replicated state and its snapshots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::runs::SandboxState;

pub type JobId = u64;

pub use crate::placement::{Attribute, Constraint, Operator, Strategy};

/// CPU and memory. CPU in thousandths of a core, memory in MiB.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mib: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources {
        cpu_millis: 0,
        memory_mib: 0,
    };

    pub const fn new(cpu_millis: u64, memory_mib: u64) -> Self {
        Resources {
            cpu_millis,
            memory_mib,
        }
    }

    pub const fn is_zero(&self) -> bool {
        self.cpu_millis == 0 && self.memory_mib == 0
    }

    pub const fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }

    pub const fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
        }
    }

    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millis: self.cpu_millis.checked_add(other.cpu_millis)?,
            memory_mib: self.memory_mib.checked_add(other.memory_mib)?,
        })
    }

    pub fn checked_sub(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millis: self.cpu_millis.checked_sub(other.cpu_millis)?,
            memory_mib: self.memory_mib.checked_sub(other.memory_mib)?,
        })
    }

    /// `self * n` per dimension, saturating.
    pub const fn saturating_mul(self, n: u64) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_mul(n),
            memory_mib: self.memory_mib.saturating_mul(n),
        }
    }

    /// True when `self` fits inside `capacity` in every dimension.
    pub const fn fits_in(&self, capacity: &Resources) -> bool {
        self.cpu_millis <= capacity.cpu_millis && self.memory_mib <= capacity.memory_mib
    }

    /// How many copies of `per` fit in `self`. A zero dimension of `per` does not limit; if `per` is zero
    /// in both dimensions the answer is `u64::MAX` (callers bound it by caps or reject such requests).
    pub const fn count_fitting(&self, per: &Resources) -> u64 {
        let by_cpu = match self.cpu_millis.checked_div(per.cpu_millis) {
            Some(n) => n,
            None => u64::MAX,
        };
        let by_mem = match self.memory_mib.checked_div(per.memory_mib) {
            Some(n) => n,
            None => u64::MAX,
        };
        if by_cpu < by_mem {
            by_cpu
        } else {
            by_mem
        }
    }
}

/// `1500` -> `"1.5"`, `500` -> `"0.5"`, `2000` -> `"2"`.
pub fn format_cpu(cpu_millis: u64) -> String {
    let whole = cpu_millis / 1000;
    let frac = cpu_millis % 1000;
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{frac:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// What a node daemon declares when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: String,
    pub address: String,
    pub allocatable: Resources,
    pub labels: BTreeMap<String, String>,
    pub os: String,
    pub arch: String,
    pub pool: String,
    pub templates: Vec<String>,
    /// At most this many sandboxes at once (0: no cap); macOS hosts advertise 2.
    pub max_sandboxes: u32,
    pub runtime: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    Down,
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
            NodeState::Draining => "draining",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub spec: NodeSpec,
    pub state: NodeState,
    pub registered_at_ms: u64,
    pub registered_index: u64,
    /// Raft index of the last change to this node's desired set of sandboxes.
    pub revision: u64,
}

/// A constraint from its user-facing parts: `os`, `arch`, `pool` or a label key; `=` or `!=`.
pub fn constraint(key: &str, not_equal: bool, value: &str) -> Constraint {
    let attribute = match key {
        "os" => Attribute::Os,
        "arch" => Attribute::Arch,
        "pool" => Attribute::Pool,
        other => Attribute::Label(other.to_string()),
    };
    if not_equal {
        Constraint::not_equal(attribute, value)
    } else {
        Constraint::equal(attribute, value)
    }
}

/// The key a constraint is written with.
pub fn constraint_key(c: &Constraint) -> &str {
    match &c.attribute {
        Attribute::Os => "os",
        Attribute::Arch => "arch",
        Attribute::Pool => "pool",
        Attribute::Label(k) => k,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Never,
    OnFailure {
        max_restarts: u32,
    },
}

/// A job: `count` identical sandboxes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub count: u32,
    pub per_sandbox: Resources,
    pub template: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub priority: i32,
    pub tenant: String,
    pub gang: bool,
    pub strategy: Strategy,
    pub constraints: Vec<Constraint>,
    pub restart: RestartPolicy,
    /// `key=value` labels that select the job for bulk actions (`surge cancel --label`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// TTL, idle timeout and owner lease of its sandboxes (all 0: none).
    #[serde(default)]
    pub lifetime: crate::lifetime::Lifetime,
    /// "" (the node's sandbox user) or "root" (uid 0, no capabilities, no_new_privs).
    #[serde(default)]
    pub user: String,
    /// A fork job's origin (`surge fork`, see `state::fork`): its sandboxes are restored from a
    /// checkpoint of this sandbox, on its node. Never set by a submission.
    #[serde(default)]
    pub fork_of: Option<ForkOf>,
}

/// The sandbox a fork job was forked from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOf {
    pub job_id: JobId,
    pub index: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Complete => "complete",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "complete" => JobState::Complete,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Complete | JobState::Failed | JobState::Cancelled
        )
    }
}

/// How many of a job's sandboxes are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: u32,
    pub placed: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub lost: u32,
    /// Cumulative: sandboxes preempted so far (each went back to pending).
    pub preempted: u32,
    pub cancelled: u32,
    pub paused: u32,
    pub oom_killed: u32,
    /// Stopped at a user's request (`surge stop`).
    pub stopped: u32,
    /// Saved to their nodes' disks (not ended, holding no resources).
    #[serde(default)]
    pub checkpointed: u32,
}

impl Counts {
    /// Count `n` more sandboxes in `state`.
    pub fn add(&mut self, state: SandboxState, n: u32) {
        let slot = match state {
            SandboxState::Pending => &mut self.pending,
            SandboxState::Placed => &mut self.placed,
            SandboxState::Running => &mut self.running,
            SandboxState::Paused => &mut self.paused,
            SandboxState::Succeeded => &mut self.succeeded,
            SandboxState::Failed => &mut self.failed,
            SandboxState::OomKilled => &mut self.oom_killed,
            SandboxState::Lost => &mut self.lost,
            SandboxState::Cancelled => &mut self.cancelled,
            SandboxState::Stopped => &mut self.stopped,
            SandboxState::Checkpointed => &mut self.checkpointed,
        };
        *slot = slot.saturating_add(n);
    }

    /// Sandboxes holding resources on a node: placed, running or paused.
    pub fn active(&self) -> u32 {
        self.placed
            .saturating_add(self.running)
            .saturating_add(self.paused)
    }

    /// Sandboxes that ended and will not run again: every terminal state of
    /// [`SandboxState::is_terminal`] (succeeded, failed, oom_killed, lost, cancelled, stopped).
    /// `preempted` is not among them: it is cumulative, and a preempted sandbox went back to
    /// pending, where it is counted again.
    pub fn finished(&self) -> u32 {
        [
            self.succeeded,
            self.failed,
            self.oom_killed,
            self.lost,
            self.cancelled,
            self.stopped,
        ]
        .into_iter()
        .fold(0, u32::saturating_add)
    }

    /// Sandboxes that ended badly: exited non-zero (the `failed` field), were OOM-killed, or were
    /// lost with their node. Cancelled and stopped sandboxes ended at a user's request and are
    /// not failures. A job with any of these ends `failed` rather than `complete`.
    pub fn failed(&self) -> u32 {
        self.failed
            .saturating_add(self.oom_killed)
            .saturating_add(self.lost)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub idempotency_key: String,
    pub state: JobState,
    pub counts: Counts,
    pub pending_reason: String,
    pub submitted_at_ms: u64,
    pub submitted_index: u64,
    pub finished_at_ms: u64,
    /// Where every sandbox is and in what state, run-length encoded.
    pub runs: crate::runs::Runs,
    pub cancelled: bool,
    /// Messages and output tails of ended sandboxes, bounded (see `outcomes`).
    pub outcomes: crate::outcomes::Outcomes,
    /// The owner's lease runs out at this time of the leader's clock (0: the job has no lease).
    #[serde(default)]
    pub lease_expires_ms: u64,
}

/// A CPU amount that does not parse; the message names it and the accepted forms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad CPU amount {0:?}: use cores (2, 0.5) or millicores (500m)")]
pub struct BadCpu(pub String);

/// Parse a CPU amount: `"2"`, `"0.5"`, `"1.25"` (cores) or `"500m"` (millicores).
pub fn parse_cpu(s: &str) -> Result<u64, BadCpu> {
    let s = s.trim();
    let bad = || BadCpu(s.to_string());
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || (whole.is_empty() && frac.is_empty()) {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_millis: u64 = if frac.is_empty() {
        0
    } else {
        let digits: u64 = frac.parse().map_err(|_| bad())?;
        // 1..=3 decimals (checked above): tenths, hundredths or thousandths of a core.
        digits * [0, 100, 10, 1][frac.len()]
    };
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(frac_millis))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_amounts() {
        assert_eq!(parse_cpu("1"), Ok(1000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu(".25"), Ok(250));
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("2.125"), Ok(2125));
        assert!(parse_cpu("0.0001").is_err());
        assert!(parse_cpu("abc").is_err());
        assert!(parse_cpu("").is_err());
        assert!(parse_cpu("99999999999999999999").is_err());
        assert_eq!(format_cpu(1500), "1.5");
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(250), "0.25");
    }

    #[test]
    fn finished_counts_every_terminal_state_and_failed_only_the_bad_ends() {
        let states = SandboxState::ALL;
        for (i, state) in states.into_iter().enumerate() {
            let mut c = Counts {
                preempted: 100,
                ..Counts::default()
            };
            let n = u32::try_from(i).expect("eleven states") + 1;
            c.add(state, n);
            let finished = if state.is_terminal() { n } else { 0 };
            assert_eq!(c.finished(), finished, "{state:?}");
            let bad = matches!(
                state,
                SandboxState::Failed | SandboxState::OomKilled | SandboxState::Lost
            );
            assert_eq!(c.failed(), if bad { n } else { 0 }, "{state:?}");
            assert_eq!(
                c.active(),
                if state.is_active() { n } else { 0 },
                "{state:?}"
            );
        }
    }
}
