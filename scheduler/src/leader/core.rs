//! The leader's decisions, pure: each takes the applied state, the time (`now_ms`, read by the
//! shell from its host's clock) and the events since the last call, and returns what to propose.
//! No clock, lock, channel or runtime in here; the shell (`shell.rs`) and the simulator drive it.
//!
//! - [`Heartbeats`]: heartbeats in, `SetNodeState Down` for nodes silent past their TTL out.
//! - [`Planner`]: the applied index in, an `ApplyPlan` out when a plan would change anything. It
//!   keeps the incremental state ([`Quiet`]) between cycles.
//! - [`ReportBatch`]: status reports in, one `ReportStatusOutcomes` out per batch.
//! - [`Lifetimes`]: nodes' activity and the deadline index in, `Touch` and `Expire` out.

use std::collections::{BTreeMap, HashMap};

use crate::command::{Command, StatusRange};
use crate::model::{JobId, NodeState, Resources};
use crate::outcomes::{OutcomeReport, OUTCOMES_PER_COMMAND_MAX};
use crate::placement::{self, PlacementParams};
use crate::state::ClusterState;

use super::{for_the_log, FULL_PLAN_INTERVAL, REPORT_BATCH_MAX};

/// [`FULL_PLAN_INTERVAL`] on the core's millisecond clock.
#[allow(
    clippy::cast_possible_truncation,
    reason = "a constant of a few seconds; try_from is not const"
)]
const FULL_PLAN_INTERVAL_MS: u64 = FULL_PLAN_INTERVAL.as_millis() as u64;

/// A bug planted in the core on purpose, so that the simulator can prove its checkers catch a
/// broken planner. Only the simulator sets one; production always runs with none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// A quiet queue stays quiet: a cycle keeps planning only the jobs submitted since, against
    /// the nodes and allocations it kept, after the capacity changed and past
    /// [`FULL_PLAN_INTERVAL`]. Jobs that waited for capacity then wait forever.
    StaleQuiet,
}

/// How the core decides.
#[derive(Clone, Copy, Debug)]
pub struct CoreConfig {
    /// A node silent this long is marked down.
    pub node_ttl_ms: u64,
    /// Simulation only: see [`PlantedBug`].
    pub planted: Option<PlantedBug>,
}

impl CoreConfig {
    pub fn new(node_ttl_ms: u64) -> Self {
        CoreConfig {
            node_ttl_ms,
            planted: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Liveness

/// What the leader last heard from one node.
#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness {
    pub last_seen_ms: u64,
    pub used: Resources,
    pub running: u32,
}

/// Node liveness in the leader's memory: heartbeats refresh a TTL, and a node silent past it is
/// marked down through the log. Only transitions are proposed.
#[derive(Debug)]
pub struct Heartbeats {
    ttl_ms: u64,
    seen: HashMap<String, Liveness>,
    /// Whether the last check ran while this replica led.
    leading: bool,
}

impl Heartbeats {
    pub fn new(ttl_ms: u64) -> Self {
        Heartbeats {
            ttl_ms,
            seen: HashMap::new(),
            leading: false,
        }
    }

    /// Event: `node` was heard from at `now_ms`.
    pub fn heartbeat(&mut self, node: &str, used: Resources, running: u32, now_ms: u64) {
        self.seen.insert(
            node.to_string(),
            Liveness {
                last_seen_ms: now_ms,
                used,
                running,
            },
        );
    }

    /// What `node` last said it uses.
    pub fn used(&self, node: &str) -> Resources {
        self.seen.get(node).map(|l| l.used).unwrap_or_default()
    }

    /// One liveness check at `now_ms`: the commands that mark the nodes silent past their TTL
    /// down, or `None` when this replica does not lead or has just taken over (then every node
    /// gets a full TTL from now, so a failover never marks a healthy node down).
    pub fn check(&mut self, s: &ClusterState, leading: bool, now_ms: u64) -> Option<Vec<Command>> {
        let took_over = leading && !self.leading;
        self.leading = leading;
        if !leading {
            return None;
        }
        if took_over {
            for id in s.nodes.keys() {
                self.seen.entry(id.clone()).or_default().last_seen_ms = now_ms;
            }
            return None;
        }
        let ttl_ms = self.ttl_ms;
        let down = s
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Down)
            // A node registered through another replica has no entry yet: its TTL starts now.
            .filter(|n| {
                let seen = self.seen.entry(n.spec.id.clone()).or_insert(Liveness {
                    last_seen_ms: now_ms,
                    ..Liveness::default()
                });
                now_ms.saturating_sub(seen.last_seen_ms) > ttl_ms
            })
            .map(|n| Command::SetNodeState {
                node: n.spec.id.clone(),
                state: NodeState::Down,
                at_ms: now_ms,
            })
            .collect();
        Some(down)
    }
}

/// Nodes ready and nodes down (for the gauges).
pub fn node_counts(s: &ClusterState) -> (usize, usize) {
    let count = |st: NodeState| s.nodes.values().filter(|n| n.state == st).count();
    (count(NodeState::Ready), count(NodeState::Down))
}

// ---------------------------------------------------------------------------------------------
// Planning

/// What a plan that placed and preempted nothing leaves for the next cycles: the capacity it
/// saw, the input it planned from (nodes, allocations, quotas) and the first job id it had not
/// seen. Until the capacity changes, only jobs from that id on can be placeable, and the input
/// still holds: a cycle plans the new jobs without walking every job of the state again.
#[derive(Debug)]
struct Quiet {
    fingerprint: u64,
    next_job: JobId,
    /// When the last full plan ran: all jobs are planned again at least every
    /// [`FULL_PLAN_INTERVAL`] (index-based rules such as the preemption cool-down change
    /// without a change of capacity).
    since_ms: u64,
    /// The input planned from; kept without its pending jobs.
    input: placement::PlacementInput,
    /// Pending sandboxes of every job before `next_job` (for the gauge).
    pending: u64,
}

/// One cycle: what it plans from (a [`Quiet`] with this cycle's pending jobs in its input, which
/// is what the cycle leaves if its plan turns out quiet) and the reasons those jobs show now.
#[derive(Debug)]
pub struct Cycle {
    planned: Quiet,
    reasons_now: BTreeMap<u64, String>,
}

impl Cycle {
    /// The placement input, when any job is pending (else there is nothing to place).
    pub fn input(&self) -> Option<&placement::PlacementInput> {
        (!self.planned.input.pending.is_empty()).then_some(&self.planned.input)
    }

    /// Sandboxes pending in the whole state (for the gauge), not only those this cycle plans.
    pub fn pending(&self) -> u64 {
        self.planned.pending
    }

    /// Jobs this cycle plans.
    pub fn jobs(&self) -> Vec<JobId> {
        self.planned.input.pending.iter().map(|j| j.id).collect()
    }

    /// What the cycle leaves when its plan placed and preempted nothing.
    fn into_quiet(self) -> Quiet {
        let mut quiet = self.planned;
        quiet.input.pending = Vec::new();
        quiet
    }
}

/// The scheduling loop's decisions: snapshot -> place (pure) -> ApplyPlan, whenever the state
/// changed and sandboxes are pending. A long queue that cannot be placed (a full cluster, or a
/// stream of submissions with no node to take them) is not re-planned on every change: while
/// nothing that frees or adds capacity happened, a cycle plans only the jobs submitted since.
#[derive(Debug, Default)]
pub struct Planner {
    planted: Option<PlantedBug>,
    /// The applied index the last cycle planned at.
    planned_at: u64,
    quiet: Option<Quiet>,
}

impl Planner {
    pub fn new(config: &CoreConfig) -> Self {
        Planner {
            planted: config.planted,
            ..Planner::default()
        }
    }

    /// Event: this replica does not lead; what it kept may be stale when it leads again.
    pub fn step_down(&mut self) {
        self.quiet = None;
    }

    /// Whether the last cycle already planned at `applied` (nothing changed since).
    pub fn is_current(&self, applied: u64) -> bool {
        applied == self.planned_at
    }

    /// The cycle at `applied` (run under the state's read lock): only the jobs submitted since
    /// the last quiet plan when the capacity is still the one it saw, else every job.
    pub fn prepare(&mut self, s: &ClusterState, applied: u64, now_ms: u64) -> Cycle {
        self.planned_at = applied;
        let fingerprint = s.capacity_fingerprint();
        let stale = self.planted == Some(PlantedBug::StaleQuiet);
        let quiet = self.quiet.take().filter(|q| {
            stale
                || (q.fingerprint == fingerprint
                    && now_ms.saturating_sub(q.since_ms) < FULL_PLAN_INTERVAL_MS)
        });
        let (input, since_ms, earlier) = match quiet {
            Some(q) => {
                let mut input = q.input;
                input.at_index = applied;
                input.pending = s.pending_requests(q.next_job);
                input.preempted_at = s.preempted_at.clone();
                (input, q.since_ms, q.pending)
            }
            None => (
                s.placement_input(applied, PlacementParams::default()),
                now_ms,
                0,
            ),
        };
        let reasons_now = reasons_now(s, &input);
        let pending = earlier + input.pending.iter().map(|j| j.pending_count()).sum::<u64>();
        Cycle {
            planned: Quiet {
                fingerprint,
                next_job: s.jobs.keys().next_back().map_or(0, |id| id + 1),
                since_ms,
                input,
                pending,
            },
            reasons_now,
        }
    }

    /// The cycle's effect, given the plan placement made of [`Cycle::input`] (`None` when there
    /// was nothing to place): the `ApplyPlan` to propose, when it places, preempts or changes a
    /// job's reason. A cycle that placed and preempted nothing leaves its input for the next.
    pub fn finish(
        &mut self,
        cycle: Cycle,
        plan: Option<placement::Plan>,
        now_ms: u64,
    ) -> Option<Command> {
        let Some(plan) = plan else {
            self.quiet = Some(cycle.into_quiet());
            return None;
        };
        let (plan, reasons) = for_the_log(plan, &cycle.reasons_now);
        if plan.placements.is_empty() && plan.preemptions.is_empty() {
            self.quiet = Some(cycle.into_quiet());
            if reasons.is_empty() {
                return None;
            }
        }
        Some(Command::ApplyPlan {
            plan,
            reasons,
            at_ms: now_ms,
        })
    }

    /// One whole cycle in one call (prepare, place, finish), for callers that need no lock
    /// between the steps.
    pub fn cycle(&mut self, s: &ClusterState, applied: u64, now_ms: u64) -> Option<Command> {
        let cycle = self.prepare(s, applied, now_ms);
        let plan = cycle.input().map(placement::place);
        self.finish(cycle, plan, now_ms)
    }
}

/// The pending reason each job of `input` shows now.
fn reasons_now(s: &ClusterState, input: &placement::PlacementInput) -> BTreeMap<u64, String> {
    input
        .pending
        .iter()
        .filter_map(|j| {
            s.jobs
                .get(&j.id)
                .map(|job| (j.id, job.pending_reason.clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Status reports

/// Status reports gathered for one Raft entry.
#[derive(Debug, Default)]
pub struct ReportBatch {
    reports: Vec<StatusRange>,
    outcomes: Vec<OutcomeReport>,
}

impl ReportBatch {
    /// Event: one node's reports.
    pub fn add(&mut self, reports: Vec<StatusRange>, outcomes: Vec<OutcomeReport>) {
        self.reports.extend(reports);
        self.outcomes.extend(outcomes);
    }

    /// Whether the batch should leave now rather than wait out its window.
    pub fn is_full(&self) -> bool {
        self.reports.len() >= REPORT_BATCH_MAX
    }

    /// The command that commits the batch, and how many status ranges it carries.
    pub fn flush(self, now_ms: u64) -> (Command, u64) {
        let ReportBatch {
            reports,
            mut outcomes,
        } = self;
        // Text is best effort: past the per-entry cap it is dropped, the states never are.
        outcomes.truncate(OUTCOMES_PER_COMMAND_MAX);
        let n = reports.len() as u64;
        let command = Command::ReportStatusOutcomes {
            reports,
            outcomes,
            at_ms: now_ms,
        };
        (command, n)
    }
}

// ---------------------------------------------------------------------------------------------
// Lifetimes

/// Sandboxes with activity remembered between two `Touch` entries, at most (past this, touches
/// wait for the next entry; that only delays an idle clock's reset by a second).
pub const TOUCHED_MAX: usize = 1_000_000;

/// Deadlines and activity: nodes' activity in, at most one `Touch` per
/// [`TOUCH_INTERVAL_MS`](crate::lifetime::TOUCH_INTERVAL_MS) out (the time recorded is the
/// leader's clock, never a node's), and an `Expire` for the deadlines that passed. Only the jobs
/// of the state's deadline index are looked at.
#[derive(Debug, Default)]
pub struct Lifetimes {
    touched: std::collections::BTreeSet<(JobId, u32)>,
    last_touch_ms: u64,
}

impl Lifetimes {
    /// Event: a node reported these sandboxes used.
    pub fn touch(&mut self, ids: impl IntoIterator<Item = (JobId, u32)>) {
        for id in ids {
            if self.touched.len() >= TOUCHED_MAX {
                break;
            }
            self.touched.insert(id);
        }
    }

    /// Event: this replica does not lead; activity gathered while it led is dropped (the new
    /// leader hears the nodes' next reports).
    pub fn step_down(&mut self) {
        self.touched.clear();
    }

    /// One check at `now_ms`: the `Touch` to propose (when a second has passed since the last
    /// one and anything was used), then the `Expire` for deadlines passed. Nothing while this
    /// replica does not lead (what it gathered is dropped: nodes report to the leader).
    pub fn check(&mut self, s: &ClusterState, leading: bool, now_ms: u64) -> Vec<Command> {
        use crate::lifetime::{TOUCH_INTERVAL_MS, TOUCH_RANGES_MAX};
        if !leading {
            self.step_down();
            return Vec::new();
        }
        let mut out = Vec::new();
        if !self.touched.is_empty()
            && now_ms.saturating_sub(self.last_touch_ms) >= TOUCH_INTERVAL_MS
        {
            let mut ranges: Vec<(JobId, u32, u32)> = Vec::new();
            for (job, index) in std::mem::take(&mut self.touched) {
                if !crate::state::tracks_idle(s, job) {
                    continue;
                }
                match ranges.last_mut() {
                    Some((j, first, count))
                        if *j == job
                            && u64::from(*first) + u64::from(*count) == u64::from(index) =>
                    {
                        *count += 1;
                    }
                    _ => ranges.push((job, index, 1)),
                }
            }
            ranges.truncate(TOUCH_RANGES_MAX);
            if !ranges.is_empty() {
                self.last_touch_ms = now_ms;
                out.push(Command::Touch {
                    ranges,
                    at_ms: now_ms,
                });
            }
        }
        let expiries = crate::state::expiries(s, now_ms);
        if !expiries.is_empty() {
            out.push(Command::Expire {
                expiries,
                at_ms: now_ms,
            });
        }
        out
    }
}
