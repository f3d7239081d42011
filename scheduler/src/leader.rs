//! What only the leader does, kept in its memory rather than in the log: node liveness (TTL),
//! coalescing sandbox status reports into few Raft entries, and the scheduling loop.
//!
//! Every replica runs these tasks; they act only while their replica leads. A new leader starts
//! every node's TTL afresh, so a failover never marks healthy nodes down.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, Response, StatusRange};
use crate::model::{JobId, NodeState, Resources};
use crate::outcomes::{OutcomeReport, OUTCOMES_PER_COMMAND_MAX};
use crate::placement::{self, PlacementParams};
use crate::runs::SandboxState;
use crate::service::{now_ms, Replica};
use crate::state::ClusterState;

/// Heartbeat interval the nodes are told to use.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// A node silent this long is marked down and its sandboxes rescheduled (default).
pub const NODE_TTL_MS: u64 = 10_000;
/// Status ranges in one Raft entry, at most.
pub const REPORT_BATCH_MAX: usize = 20_000;
/// How long the batcher waits to fill a batch.
pub const REPORT_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Reports queued for the batcher before nodes are told to retry.
pub const REPORT_QUEUE_MAX: usize = 4_096;
/// The scheduling loop runs at least this often while there is pending work.
pub const SCHEDULE_INTERVAL: Duration = Duration::from_millis(250);
/// ... and at most this often: changes arriving meanwhile are planned together, so a stream of
/// submissions costs a few plans per second, not one plan per submission.
pub const SCHEDULE_INTERVAL_MIN: Duration = Duration::from_millis(20);

/// While a queue cannot be placed and the capacity does not change, every job is planned
/// again this often (a full plan walks every job; between them cycles plan the new ones).
pub const FULL_PLAN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness {
    pub last_seen_ms: u64,
    pub used: Resources,
    pub running: u32,
}

pub struct Metrics {
    pub plans: IntCounter,
    pub placements: IntCounter,
    pub preemptions: IntCounter,
    pub plan_rejections: IntCounter,
    pub plan_seconds: Histogram,
    pub place_seconds: Histogram,
    pub pending_sandboxes: IntGauge,
    pub nodes_ready: IntGauge,
    pub nodes_down: IntGauge,
    pub status_entries: IntCounter,
    pub status_updates: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let buckets = surge_raft::metrics::latency_buckets();
        Ok(Metrics {
            plans: reg(
                r,
                IntCounter::new("surge_scheduler_plans_total", "Plans committed")?,
            )?,
            placements: reg(
                r,
                IntCounter::new("surge_scheduler_placements_total", "Sandboxes placed")?,
            )?,
            preemptions: reg(
                r,
                IntCounter::new("surge_scheduler_preemptions_total", "Sandboxes preempted")?,
            )?,
            plan_rejections: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_plan_rejections_total",
                    "Placements the plan applier refused (stale snapshot)",
                )?,
            )?,
            plan_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "surge_scheduler_plan_duration_seconds",
                        "Snapshot, placement and commit of one plan",
                    )
                    .buckets(buckets.clone()),
                )?,
            )?,
            place_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "surge_scheduler_placement_duration_seconds",
                        "The pure placement function alone",
                    )
                    .buckets(buckets),
                )?,
            )?,
            pending_sandboxes: reg(
                r,
                IntGauge::new(
                    "surge_scheduler_pending_sandboxes",
                    "Sandboxes waiting for a node",
                )?,
            )?,
            nodes_ready: reg(
                r,
                IntGauge::new("surge_scheduler_nodes_ready", "Nodes ready")?,
            )?,
            nodes_down: reg(
                r,
                IntGauge::new("surge_scheduler_nodes_down", "Nodes down")?,
            )?,
            status_entries: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_status_entries_total",
                    "Raft entries of coalesced status reports",
                )?,
            )?,
            status_updates: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_status_ranges_total",
                    "Status ranges committed",
                )?,
            )?,
        })
    }
}

type ReportWaiter = oneshot::Sender<Result<(), String>>;
type QueuedReport = (Vec<StatusRange>, Vec<OutcomeReport>, ReportWaiter);

/// The leader's in-memory side.
pub struct Leader {
    replica: Replica,
    pub node_ttl_ms: u64,
    liveness: Mutex<HashMap<String, Liveness>>,
    reports_tx: mpsc::Sender<QueuedReport>,
    pub metrics: Metrics,
}

impl Leader {
    /// Create the leader side and spawn its tasks (they idle while this replica follows).
    pub fn start(
        replica: Replica,
        node_ttl_ms: u64,
        registry: &Registry,
    ) -> Result<std::sync::Arc<Self>, prometheus::Error> {
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE_MAX);
        let leader = std::sync::Arc::new(Leader {
            replica,
            node_ttl_ms,
            liveness: Mutex::new(HashMap::new()),
            reports_tx,
            metrics: Metrics::new(registry)?,
        });
        tokio::spawn(batch_reports(leader.clone(), reports_rx));
        tokio::spawn(watch_liveness(leader.clone()));
        tokio::spawn(schedule(leader.clone()));
        Ok(leader)
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, HashMap<String, Liveness>> {
        self.liveness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn heartbeat(&self, node: &str, used: Resources, running: u32) {
        self.liveness().insert(
            node.to_string(),
            Liveness {
                last_seen_ms: now_ms(),
                used,
                running,
            },
        );
    }

    pub fn used(&self, node: &str) -> Resources {
        self.liveness()
            .get(node)
            .map(|l| l.used)
            .unwrap_or_default()
    }

    /// Queue reports for the next batch; resolves once they are committed.
    pub async fn report(
        &self,
        ranges: Vec<StatusRange>,
        outcomes: Vec<OutcomeReport>,
    ) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.reports_tx
            .try_send((ranges, outcomes, tx))
            .map_err(|_| "status queue full; retry shortly".to_string())?;
        rx.await.map_err(|_| "status batcher stopped".to_string())?
    }
}

/// Collect queued reports for a short window and commit them as one entry.
async fn batch_reports(leader: std::sync::Arc<Leader>, mut rx: mpsc::Receiver<QueuedReport>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut ranges: usize = batch[0].0.len();
        let deadline = tokio::time::Instant::now() + REPORT_BATCH_WINDOW;
        while ranges < REPORT_BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    ranges += item.0.len();
                    batch.push(item);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut reports: Vec<StatusRange> = Vec::new();
        let mut outcomes: Vec<OutcomeReport> = Vec::new();
        let mut waiters = Vec::with_capacity(batch.len());
        for (r, o, w) in batch {
            reports.extend(r);
            outcomes.extend(o);
            waiters.push(w);
        }
        // Text is best effort: past the per-entry cap it is dropped, the states never are.
        outcomes.truncate(OUTCOMES_PER_COMMAND_MAX);
        let n = reports.len() as u64;
        let command = Command::ReportStatusOutcomes {
            reports,
            outcomes,
            at_ms: now_ms(),
        };
        let result = leader
            .replica
            .propose(command.encode())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if result.is_ok() {
            leader.metrics.status_entries.inc();
            leader.metrics.status_updates.inc_by(n);
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Mark nodes silent past their TTL down (through Raft); only transitions are logged.
async fn watch_liveness(leader: std::sync::Arc<Leader>) {
    let mut was_leader = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let is_leader = leader.replica.is_leader();
        if !is_leader {
            was_leader = false;
            continue;
        }
        let now = now_ms();
        let nodes: Vec<(String, NodeState)> = leader.replica.read(|s, _| {
            s.nodes
                .values()
                .map(|n| (n.spec.id.clone(), n.state))
                .collect()
        });
        if !was_leader {
            // New leader: every node gets a full TTL from now.
            let mut l = leader.liveness();
            for (id, _) in &nodes {
                l.entry(id.clone()).or_default().last_seen_ms = now;
            }
            was_leader = true;
            continue;
        }
        let silent: Vec<String> = {
            let mut l = leader.liveness();
            nodes
                .iter()
                .filter(|(_, st)| *st != NodeState::Down)
                // A node registered through another replica has no entry yet: its TTL starts now.
                .filter(|(id, _)| {
                    let seen = l.entry(id.clone()).or_insert(Liveness {
                        last_seen_ms: now,
                        ..Liveness::default()
                    });
                    now.saturating_sub(seen.last_seen_ms) > leader.node_ttl_ms
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for node in silent {
            tracing::warn!(node = %node, ttl_ms = leader.node_ttl_ms, "node silent past its TTL; marking it down");
            let command = Command::SetNodeState {
                node,
                state: NodeState::Down,
                at_ms: now,
            };
            if let Err(e) = leader.replica.propose(command.encode()).await {
                tracing::warn!(error = %e, "could not mark node down");
            }
        }
        let (ready, down) = leader.replica.read(|s, _| {
            let ready = s
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Ready)
                .count();
            let down = s
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Down)
                .count();
            (ready, down)
        });
        leader.metrics.nodes_ready.set(ready as i64);
        leader.metrics.nodes_down.set(down as i64);
    }
}

/// What a plan that placed and preempted nothing leaves for the next cycles: the capacity it
/// saw, the input it planned from (nodes, allocations, quotas) and the first job id it had not
/// seen. Until the capacity changes, only jobs from that id on can be placeable, and the input
/// still holds: a cycle plans the new jobs without walking every job of the state again.
struct Quiet {
    fingerprint: u64,
    next_job: JobId,
    /// When the last full plan ran: all jobs are planned again at least every
    /// [`FULL_PLAN_INTERVAL`] (index-based rules such as the preemption cool-down change
    /// without a change of capacity).
    since: Instant,
    /// The input planned from; kept without its pending jobs.
    input: placement::PlacementInput,
    /// Pending sandboxes of every job before `next_job` (for the gauge).
    pending: u64,
}

/// One cycle: what it plans from (a [`Quiet`] with this cycle's pending jobs in its input, which
/// is what the cycle leaves if its plan turns out quiet) and the reasons those jobs show now.
struct Cycle {
    planned: Quiet,
    reasons_now: BTreeMap<u64, String>,
}

impl Cycle {
    /// The cycle at `applied`: only the jobs submitted since `quiet` when the capacity is still
    /// the one it saw, else every job.
    fn prepare(s: &ClusterState, applied: u64, quiet: Option<Quiet>, now: Instant) -> Cycle {
        let fingerprint = s.capacity_fingerprint();
        let quiet = quiet.filter(|q| {
            q.fingerprint == fingerprint && now.duration_since(q.since) < FULL_PLAN_INTERVAL
        });
        let (input, since, earlier) = match quiet {
            Some(q) => {
                let mut input = q.input;
                input.at_index = applied;
                input.pending = s.pending_requests(q.next_job);
                input.preempted_at = s.preempted_at.clone();
                (input, q.since, q.pending)
            }
            None => (
                s.placement_input(applied, PlacementParams::default()),
                now,
                0,
            ),
        };
        let reasons_now = reasons_now(s, &input);
        let pending = earlier + input.pending.iter().map(|j| j.pending_count()).sum::<u64>();
        Cycle {
            planned: Quiet {
                fingerprint,
                next_job: s.jobs.keys().next_back().map_or(0, |id| id + 1),
                since,
                input,
                pending,
            },
            reasons_now,
        }
    }

    /// What the cycle leaves when its plan placed and preempted nothing.
    fn into_quiet(self) -> Quiet {
        let mut quiet = self.planned;
        quiet.input.pending = Vec::new();
        quiet
    }
}

/// The scheduling loop: snapshot -> place (pure) -> ApplyPlan through Raft, whenever the state
/// changed and sandboxes are pending. A long queue that cannot be placed (a full cluster, or a
/// stream of submissions with no node to take them) is not re-planned on every change: while
/// nothing that frees or adds capacity happened, a cycle plans only the jobs submitted since.
async fn schedule(leader: std::sync::Arc<Leader>) {
    let mut applied = leader.replica.subscribe_applied();
    let mut last_planned_at = 0u64;
    let mut quiet: Option<Quiet> = None;
    loop {
        // Wake on a change of the state, or periodically.
        let _ = tokio::time::timeout(SCHEDULE_INTERVAL, applied.changed()).await;
        tokio::time::sleep(SCHEDULE_INTERVAL_MIN).await;
        if !leader.replica.is_leader() {
            quiet = None;
            continue;
        }
        let at = leader.replica.applied_index();
        if at == last_planned_at {
            continue;
        }
        let started = Instant::now();
        let earlier = quiet.take();
        let cycle = leader
            .replica
            .read(|s, applied| Cycle::prepare(s, applied, earlier, started));
        leader
            .metrics
            .pending_sandboxes
            .set(cycle.planned.pending as i64);
        last_planned_at = at;
        if cycle.planned.input.pending.is_empty() {
            quiet = Some(cycle.into_quiet());
            continue;
        }
        let input = &cycle.planned.input;
        let reasons_now = &cycle.reasons_now;
        let place_started = Instant::now();
        let plan = tokio::task::block_in_place(|| placement::place(input));
        leader
            .metrics
            .place_seconds
            .observe(place_started.elapsed().as_secs_f64());
        let (plan, changed_reasons) = for_the_log(plan, reasons_now);
        let places_nothing = plan.placements.is_empty() && plan.preemptions.is_empty();
        if places_nothing {
            quiet = Some(cycle.into_quiet());
            if changed_reasons.is_empty() {
                continue;
            }
        }
        let command = Command::ApplyPlan {
            plan,
            reasons: changed_reasons,
            at_ms: now_ms(),
        };
        match leader.replica.propose(command.encode()).await {
            Ok(p) => match Response::decode(&p.reply) {
                Ok(Response::PlanApplied {
                    placed,
                    preempted,
                    rejected,
                }) => {
                    leader.metrics.plans.inc();
                    leader.metrics.placements.inc_by(placed);
                    leader.metrics.preemptions.inc_by(preempted);
                    leader.metrics.plan_rejections.inc_by(rejected);
                    leader
                        .metrics
                        .plan_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if placed > 0 || preempted > 0 {
                        tracing::info!(
                            placed,
                            preempted,
                            rejected,
                            index = p.index,
                            "plan committed"
                        );
                    }
                }
                other => tracing::warn!(?other, "unexpected reply to a plan"),
            },
            Err(e) => tracing::warn!(error = %e, "plan not committed"),
        }
    }
}

/// What one scheduling cycle plans from: the placement input at `applied`, and the pending reason
/// each pending job shows now.
pub fn planning_input(
    s: &ClusterState,
    applied: u64,
) -> (placement::PlacementInput, BTreeMap<u64, String>) {
    let input = s.placement_input(applied, PlacementParams::default());
    let reasons = reasons_now(s, &input);
    (input, reasons)
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

/// The plan as the log takes it. The log needs the decisions, not the explanation: reasons
/// travel beside the plan, and only those that differ from what a job shows now, so an entry
/// stays small however long the queue is.
pub fn for_the_log(
    plan: placement::Plan,
    reasons_now: &BTreeMap<u64, String>,
) -> (placement::Plan, Vec<(u64, String)>) {
    let changed = reasons_of(&plan)
        .into_iter()
        .filter(|(job, r)| reasons_now.get(job) != Some(r))
        .collect();
    let plan = placement::Plan {
        unplaced: Vec::new(),
        ..plan
    };
    (plan, changed)
}

pub fn reasons_of(plan: &placement::Plan) -> Vec<(u64, String)> {
    let mut seen = std::collections::BTreeMap::new();
    for u in &plan.unplaced {
        seen.entry(u.job).or_insert_with(|| u.reason.to_string());
    }
    seen.into_iter().collect()
}

/// Coalesce per-sandbox reports of one node into ranges: consecutive indices of one job with the
/// same generation, state, exit code and reservation become one [`StatusRange`].
pub fn coalesce(
    node: &str,
    mut updates: Vec<(u64, u32, u64, SandboxState, i32, Option<Resources>)>,
) -> Vec<StatusRange> {
    updates.sort_by_key(|a| (a.0, a.2, a.3, a.4, a.5, a.1));
    updates.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let mut out: Vec<StatusRange> = Vec::new();
    for (job, index, generation, state, exit_code, resources) in updates {
        if let Some(last) = out.last_mut() {
            let contiguous = u64::from(last.first) + u64::from(last.count) == u64::from(index);
            if last.job == job
                && contiguous
                && last.generation == generation
                && last.state == state
                && last.exit_code == exit_code
                && last.resources == resources
            {
                last.count += 1;
                continue;
            }
        }
        out.push(StatusRange {
            node: node.to_string(),
            job,
            first: index,
            count: 1,
            generation,
            state,
            exit_code,
            resources,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(s: &mut ClusterState, index: u64) {
        let r = s.apply_command(
            index,
            Command::SubmitJob {
                spec: crate::state::tests::spec(10, "eval"),
                idempotency_key: format!("k{index}"),
                at_ms: 0,
            },
        );
        assert!(matches!(r, Response::JobSubmitted { .. }), "{r:?}");
    }

    fn planned(c: &Cycle) -> Vec<JobId> {
        c.planned.input.pending.iter().map(|j| j.id).collect()
    }

    #[test]
    fn a_quiet_queue_plans_only_new_jobs_until_capacity_changes() {
        let mut s = ClusterState::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        let t0 = Instant::now();
        let full = Cycle::prepare(&s, 2, None, t0);
        assert_eq!(planned(&full), [1, 2]);
        assert_eq!(full.planned.pending, 20);

        // Nothing placed, no capacity change: the next cycle plans the new job only.
        submit(&mut s, 3);
        let ms = Duration::from_millis;
        let new_only = Cycle::prepare(&s, 3, Some(full.into_quiet()), t0 + ms(10));
        assert_eq!(planned(&new_only), [3]);
        assert_eq!(
            new_only.planned.pending, 30,
            "the gauge still counts every job"
        );
        assert_eq!(new_only.planned.input.at_index, 3);

        // Every FULL_PLAN_INTERVAL all jobs are planned again.
        let later = t0 + FULL_PLAN_INTERVAL;
        let again = Cycle::prepare(&s, 3, Some(new_only.into_quiet()), later);
        assert_eq!(planned(&again), [1, 2, 3]);

        // A node joining changes the capacity: all jobs, against the new node.
        let quiet = again.into_quiet();
        s.apply_command(
            4,
            Command::RegisterNode {
                node: crate::state::tests::node("a", 8),
                at_ms: 0,
            },
        );
        let joined = Cycle::prepare(&s, 4, Some(quiet), later + ms(1));
        assert_eq!(planned(&joined), [1, 2, 3]);
        assert_eq!(joined.planned.input.nodes.len(), 1);
        assert!(!placement::place(&joined.planned.input)
            .placements
            .is_empty());
    }

    #[test]
    fn reports_coalesce_into_ranges() {
        let mut updates = Vec::new();
        for i in (0..100).rev() {
            updates.push((7, i, 0, SandboxState::Running, 0, None));
        }
        updates.push((7, 50, 0, SandboxState::Running, 0, None)); // duplicate
        updates.push((7, 200, 0, SandboxState::Failed, 3, None));
        updates.push((8, 0, 1, SandboxState::Running, 0, None));
        let ranges = coalesce("n1", updates);
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        assert_eq!(
            (ranges[0].job, ranges[0].first, ranges[0].count),
            (7, 0, 100)
        );
        assert_eq!(
            (ranges[1].first, ranges[1].state, ranges[1].exit_code),
            (200, SandboxState::Failed, 3)
        );
        assert_eq!((ranges[2].job, ranges[2].generation), (8, 1));
    }

    #[test]
    fn gaps_and_differences_split_ranges() {
        let updates = vec![
            (1, 0, 0, SandboxState::Running, 0, None),
            (1, 2, 0, SandboxState::Running, 0, None),
            (
                1,
                3,
                0,
                SandboxState::Running,
                0,
                Some(Resources::new(1, 1)),
            ),
        ];
        assert_eq!(coalesce("n", updates).len(), 3);
    }
}
