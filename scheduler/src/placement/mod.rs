//! Placement: the pure core of the scheduler.
//!
//! [`place`] turns an immutable snapshot of the cluster ([`PlacementInput`]) into a [`Plan`]; [`verify`]
//! re-checks a plan computed at an older snapshot against the newest state before it goes through Raft.
//! Both are plain functions over plain data: no clock, no I/O, no RNG, no threads, and every decision is
//! taken while iterating sorted vectors or `BTree*` collections, so the same input always yields the same
//! plan.
//!
//! ```text
//!  PlacementInput (snapshot at Raft index i)
//!        |
//!        v
//!  order jobs: priority desc -> DRF between tenants -> FIFO within a tenant      (fairshare.rs)
//!        |  for each job:
//!        v
//!  quota  -> feasibility class (schedulable, os/arch/pool/labels, caps)          (feasible.rs)
//!        -> pick nodes from a free-capacity index, score a bounded candidate set  (rank.rs)
//!           and place a whole run per node: min(free / per_sandbox, cap slots)
//!        -> if short: evict strictly lower-priority work, bounded per plan       (preempt.rs)
//!        -> gang: commit only if all of it fits, else roll back (undo log)        (engine.rs)
//!        v
//!  Plan { at_index: i, placements (run-length), preemptions, unplaced + reason }
//!        |
//!        v   leader, newest state at index j >= i
//!  verify(plan, newest) -> accepted plan + rejected placements                    (verify.rs)
//! ```
//!
//! Placements are run-length `(job, node, first_index, count)`: 100,000 sandboxes on 1,000 nodes is
//! about 1,000 rows. The algorithm never loops per sandbox; it loops per node run.
//!
//! Not fitting is a normal outcome: every sandbox that is not placed appears in [`Plan::unplaced`] with a
//! [`Reason`] whose `Display` is meant for the user ("needs 4,000 more CPUs").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

mod engine;
mod fairshare;
mod feasible;
mod preempt;
mod rank;
mod verify;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use engine::place;
pub use verify::{verify, RejectReason, Rejected, Verified};

pub use crate::model::Resources;

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} / {}",
            fmt_cpus(self.cpu_millis),
            fmt_memory(self.memory_mib)
        )
    }
}

/// One node as the scheduler sees it in a snapshot.
///
/// `allocated` and `sandbox_count` are authoritative for fit: they include everything running on the node
/// (the [`Allocation`] rows are used for tenant usage and to choose preemption victims). A node whose
/// `allocated` already exceeds `allocatable` simply has no free capacity.
///
/// Per-node caps: `max_sandboxes` caps the number of sandboxes on the host, whatever their size. A host
/// runs one OS, so "at most 2 macOS VMs per host" (the Apple licence limit) is a macOS node advertising
/// `max_sandboxes: Some(2)`. This is simpler than a per-OS cap map and covers every cap we know of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub allocatable: Resources,
    pub allocated: Resources,
    pub os: String,
    pub arch: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    /// Templates (snapshots) already present on the node.
    pub templates: BTreeSet<String>,
    /// False when the node is down or draining.
    pub schedulable: bool,
    pub max_sandboxes: Option<u32>,
    pub sandbox_count: u32,
}

impl NodeView {
    pub fn free(&self) -> Resources {
        self.allocatable.saturating_sub(self.allocated)
    }

    /// Sandboxes the cap still allows on this node (`u32::MAX` without a cap).
    pub fn free_slots(&self) -> u32 {
        match self.max_sandboxes {
            Some(max) => max.saturating_sub(self.sandbox_count),
            None => u32::MAX,
        }
    }
}

/// A contiguous run of sandbox indices of one job: `first_index .. first_index + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IndexRun {
    pub first_index: u32,
    pub count: u32,
}

impl IndexRun {
    pub const fn new(first_index: u32, count: u32) -> Self {
        IndexRun { first_index, count }
    }

    /// One past the last index, widened so that it cannot overflow.
    pub const fn end(&self) -> u64 {
        self.first_index as u64 + self.count as u64
    }
}

/// Sandboxes of one job running (or assigned) on one node: a run of indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub job: u64,
    pub node: String,
    pub first_index: u32,
    pub count: u32,
    pub per_sandbox: Resources,
    pub priority: i32,
    pub tenant: String,
    /// Gang jobs are evicted whole or not at all: evicting part of a gang would leave a partial gang
    /// running, which the mission forbids.
    pub gang: bool,
    /// False for work that must never be evicted (system sandboxes).
    pub preemptible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Attribute {
    Os,
    Arch,
    Pool,
    Label(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operator {
    Equal,
    /// Also satisfied when a label is absent.
    NotEqual,
}

/// `attribute (=|!=) value`, e.g. `os=macos`, `gpu!=none`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Constraint {
    pub attribute: Attribute,
    pub operator: Operator,
    pub value: String,
}

impl Constraint {
    pub fn equal(attribute: Attribute, value: impl Into<String>) -> Self {
        Constraint {
            attribute,
            operator: Operator::Equal,
            value: value.into(),
        }
    }

    pub fn not_equal(attribute: Attribute, value: impl Into<String>) -> Self {
        Constraint {
            attribute,
            operator: Operator::NotEqual,
            value: value.into(),
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.operator {
            Operator::Equal => "=",
            Operator::NotEqual => "!=",
        };
        match &self.attribute {
            Attribute::Os => write!(f, "os{op}{}", self.value),
            Attribute::Arch => write!(f, "arch{op}{}", self.value),
            Attribute::Pool => write!(f, "pool{op}{}", self.value),
            Attribute::Label(key) => write!(f, "{key}{op}{}", self.value),
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Strategy {
    /// Best fit: prefer the node that ends fullest (Nomad `ScoreFitBinPack`).
    #[default]
    Binpack,
    /// Worst fit: prefer the emptiest nodes and share the job round-robin across them.
    Spread,
}

/// A job with sandboxes still to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub id: u64,
    pub tenant: String,
    pub priority: i32,
    /// Indices still to place. Runs need not be contiguous (after losses and rescheduling); overlapping
    /// runs are merged, and indices already present in [`PlacementInput::allocations`] are never placed.
    pub pending: Vec<IndexRun>,
    pub per_sandbox: Resources,
    /// Template (snapshot) the sandboxes boot from; nodes holding it get a locality bonus.
    pub template: String,
    pub gang: bool,
    pub strategy: Strategy,
    pub constraints: Vec<Constraint>,
    /// Raft index of the submission: FIFO order within a tenant.
    pub submitted_index: u64,
}

impl JobRequest {
    /// Number of sandboxes in `pending` (runs counted as given).
    pub fn pending_count(&self) -> u64 {
        self.pending.iter().map(|r| u64::from(r.count)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantQuota {
    pub max: Resources,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementParams {
    /// Sandboxes evicted per plan, at most.
    pub max_preemptions_per_cycle: u32,
    /// A job preempted at Raft index `p` cannot be preempted again while `at_index < p + cooldown`.
    pub preemption_cooldown_entries: u64,
}

impl Default for PlacementParams {
    fn default() -> Self {
        PlacementParams {
            max_preemptions_per_cycle: 1_000,
            preemption_cooldown_entries: 10_000,
        }
    }
}

/// Immutable snapshot handed to [`place`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementInput {
    /// Raft applied index the snapshot was taken at; recorded in the plan.
    pub at_index: u64,
    pub nodes: Vec<NodeView>,
    pub allocations: Vec<Allocation>,
    pub pending: Vec<JobRequest>,
    /// Absent tenant = unlimited.
    pub quotas: BTreeMap<String, TenantQuota>,
    /// Job id -> Raft index at which the job was last preempted (for the cool-down).
    pub preempted_at: BTreeMap<u64, u64>,
    pub params: PlacementParams,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Placement {
    pub job: u64,
    pub node: String,
    pub first_index: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Preemption {
    /// The victim job.
    pub job: u64,
    pub node: String,
    pub first_index: u32,
    pub count: u32,
    /// The job that needs the capacity.
    pub by_job: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub job: u64,
    /// Sandboxes of the job this reason applies to.
    pub count: u64,
    pub reason: Reason,
}

/// Output of [`place`]. Placements and preemptions are grouped by job, in scheduling order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub at_index: u64,
    pub placements: Vec<Placement>,
    pub preemptions: Vec<Preemption>,
    pub unplaced: Vec<Unplaced>,
}

/// Why sandboxes were not placed. `Display` is the text shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// No schedulable node satisfies `constraint` (or, if `None`, no node is schedulable at all).
    NoNodeWith { constraint: Option<Constraint> },
    /// Each constraint alone is satisfiable, their conjunction is not.
    NoNodeWithAll { constraints: Vec<Constraint> },
    /// Feasible nodes exist but all are at their sandbox cap.
    NodeCap { os: String, max: u32 },
    /// No feasible node is large enough for even one sandbox.
    TooLarge {
        per_sandbox: Resources,
        largest: Resources,
    },
    /// `unplaced` of `wanted` sandboxes do not fit; `needs` is the extra capacity the feasible nodes would
    /// need (zero in a dimension that is not short). Both zero means the free capacity is fragmented.
    Insufficient {
        unplaced: u64,
        wanted: u64,
        needs: Resources,
    },
    /// The tenant's quota holds `held` sandboxes back.
    Quota {
        tenant: String,
        used: Resources,
        max: Resources,
        held: u64,
    },
    /// All-or-nothing gang: only `placeable` of `count` could be placed, so none were.
    GangDoesNotFit { count: u64, placeable: u64 },
    /// The request cannot be scheduled as written.
    Invalid { why: String },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoNodeWith {
                constraint: Some(c),
            } => write!(f, "no node with {c}"),
            Reason::NoNodeWith { constraint: None } => {
                write!(f, "no schedulable node (all nodes are down or draining)")
            }
            Reason::NoNodeWithAll { constraints } => {
                let list: Vec<String> = constraints.iter().map(ToString::to_string).collect();
                write!(f, "no node satisfies all of {}", list.join(", "))
            }
            Reason::NodeCap { os, max } => {
                write!(f, "node cap: at most {max} {os} sandboxes per host")
            }
            Reason::TooLarge {
                per_sandbox,
                largest,
            } => write!(
                f,
                "no feasible node is large enough: job asks {per_sandbox} per sandbox, \
                 largest node has {largest}"
            ),
            Reason::Insufficient {
                unplaced,
                wanted,
                needs,
            } => {
                let mut parts = Vec::new();
                if needs.cpu_millis > 0 {
                    let unit = if needs.cpu_millis == 1000 {
                        "CPU"
                    } else {
                        "CPUs"
                    };
                    parts.push(format!(
                        "{} more {unit}",
                        fmt_number_millis(needs.cpu_millis)
                    ));
                }
                if needs.memory_mib > 0 {
                    parts.push(format!("{} more memory", fmt_memory(needs.memory_mib)));
                }
                if parts.is_empty() {
                    write!(
                        f,
                        "free capacity is fragmented: {} of {} sandboxes fit on no feasible node",
                        thousands(*unplaced),
                        thousands(*wanted)
                    )
                } else {
                    write!(
                        f,
                        "needs {} ({} of {} sandboxes unplaced)",
                        parts.join(" and "),
                        thousands(*unplaced),
                        thousands(*wanted)
                    )
                }
            }
            Reason::Quota {
                tenant,
                used,
                max,
                held,
            } => {
                // Name the exhausted dimension(s); if neither is fully used (the next sandbox simply does
                // not fit in what is left) name both.
                let cpu_full = used.cpu_millis >= max.cpu_millis;
                let mem_full = used.memory_mib >= max.memory_mib;
                let both = !cpu_full && !mem_full;
                let mut parts = Vec::new();
                if cpu_full || both {
                    parts.push(format!(
                        "cpu {}/{}",
                        fmt_number_millis(used.cpu_millis),
                        fmt_number_millis(max.cpu_millis)
                    ));
                }
                if mem_full || both {
                    parts.push(format!(
                        "memory {}/{}",
                        fmt_memory(used.memory_mib),
                        fmt_memory(max.memory_mib)
                    ));
                }
                write!(
                    f,
                    "tenant {tenant} at quota ({}): {} sandboxes held back",
                    parts.join(", "),
                    thousands(*held)
                )
            }
            Reason::GangDoesNotFit { count, placeable } => write!(
                f,
                "gang of {} does not fit: {} of {} placeable",
                thousands(*count),
                thousands(*placeable),
                thousands(*count)
            ),
            Reason::Invalid { why } => write!(f, "invalid request: {why}"),
        }
    }
}

/// `1234567` -> `"1,234,567"`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Millis as a plain number of units: 4_000_000 -> "4,000", 1_500 -> "1.5".
fn fmt_number_millis(millis: u64) -> String {
    let whole = thousands(millis / 1000);
    let frac = millis % 1000;
    if frac == 0 {
        whole
    } else {
        let frac = format!("{frac:03}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
}

fn fmt_cpus(millis: u64) -> String {
    let unit = if millis == 1000 { "CPU" } else { "CPUs" };
    format!("{} {unit}", fmt_number_millis(millis))
}

fn fmt_memory(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", thousands(mib / 1024))
    } else {
        format!("{} MiB", thousands(mib))
    }
}
