//! The replicated cluster state and its deterministic `apply`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::{Command, Rejection, Response, StatusRange, BATCH_COMMANDS_MAX};
use crate::model::{
    Counts, Job, JobId, JobSpec, JobState, Node, NodeSpec, NodeState, Resources, RestartPolicy,
};
use crate::outcomes::{Outcome, OutcomeReport, Outcomes, OUTCOMES_PER_COMMAND_MAX};
use crate::placement::{
    self, Allocation, IndexRun, JobRequest, NodeView, PlacementInput, PlacementParams, Plan,
    TenantQuota,
};
use crate::runs::{Run, Runs, SandboxState};
use crate::validate;

/// A sandbox is rescheduled after node loss, drain or preemption at most this many times.
pub const RESCHEDULES_MAX: u32 = 10;
/// Status ranges one `ReportStatus` command may carry.
pub const STATUS_RANGES_MAX: usize = 100_000;

/// Everything the scheduler replicates. Maps are ordered so the encoding — and so the state
/// hash — is canonical: two replicas that applied the same log prefix encode to the same bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub jobs: BTreeMap<JobId, Job>,
    /// `(tenant, idempotency key)` -> the job it created.
    pub idempotency: BTreeMap<(String, String), JobId>,
    pub quotas: BTreeMap<String, Resources>,
    /// Job -> Raft index of its last preemption (the cool-down that prevents preemption storms).
    pub preempted_at: BTreeMap<JobId, u64>,
}

/// What a node holds: reservations and sandbox count of its active (placed, running, paused)
/// sandboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub allocated: Resources,
    pub sandboxes: u32,
}

/// One sandbox a node should run (its desired set is what the node reconciles against).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    pub index: u32,
    pub generation: u64,
    pub revision: u64,
    pub paused: bool,
    /// The user asked for it to stop (`surge stop`).
    pub stop: bool,
    pub resources: Resources,
}

/// A job's pending sandboxes as placement's request, if it has any.
fn job_request(job: &Job) -> Option<JobRequest> {
    let pending: Vec<IndexRun> = job
        .runs
        .iter()
        .filter(|(_, run)| run.state == SandboxState::Pending)
        .map(|(first, run)| IndexRun::new(first, run.count))
        .collect();
    (!pending.is_empty()).then(|| JobRequest {
        id: job.id,
        tenant: job.spec.tenant.clone(),
        priority: job.spec.priority,
        pending,
        per_sandbox: job.spec.per_sandbox,
        template: job.spec.template.clone(),
        gang: job.spec.gang,
        strategy: job.spec.strategy,
        constraints: job.spec.constraints.clone(),
        submitted_index: job.submitted_index,
    })
}

fn is_restartable(policy: RestartPolicy, restarts: u32) -> bool {
    matches!(policy, RestartPolicy::OnFailure { max_restarts } if restarts < max_restarts)
}

/// Send a sandbox back to the queue as a new generation (or give up after too many reschedules).
fn reschedule(run: &mut Run, per_sandbox: Resources, index: u64) {
    if run.stop {
        // Asked to stop and its node is gone: nothing left to stop, nothing to run again.
        run.state = SandboxState::Stopped;
    } else if run.reschedules >= RESCHEDULES_MAX {
        run.state = SandboxState::Lost;
    } else {
        run.state = SandboxState::Pending;
        run.node = None;
        run.generation += 1;
        run.reschedules += 1;
        run.resources = per_sandbox;
        run.paused = false;
    }
    run.revision = index;
}

/// `Some(refusal)` when `first..first+count` is empty or not within the job's sandboxes.
fn out_of_range(job: &Job, first: u32, count: u32) -> Option<Response> {
    let end = u64::from(first) + u64::from(count);
    (end > u64::from(job.spec.count) || count == 0).then(|| {
        Response::Rejected(Rejection::Invalid(format!(
            "job {} has sandboxes 0..{}; {first}..{end} is out of range",
            job.id, job.spec.count
        )))
    })
}

impl Job {
    /// Keep a gang whole: once any of its sandboxes is waiting again (its node died, it failed
    /// and restarts, ...), the ones still holding nodes go back to the queue too, and the gang
    /// is placed again all together. A partly running gang is never left behind.
    fn keep_gang_whole(&mut self, index: u64) {
        if !self.spec.gang || self.cancelled {
            return;
        }
        let runs = || self.runs.iter().map(|(_, r)| r);
        let waiting = runs().any(|r| r.state == SandboxState::Pending);
        let holding = runs().any(|r| r.state.is_active());
        if waiting && holding {
            let per = self.spec.per_sandbox;
            let total = self.spec.count;
            self.runs.update(0, total, |run| {
                if run.state.is_active() {
                    reschedule(run, per, index);
                }
            });
        }
    }

    /// Recompute counts and the job state from the runs.
    fn refresh(&mut self, index: u64, at_ms: u64) {
        self.keep_gang_whole(index);
        let mut c = Counts {
            preempted: self.counts.preempted,
            ..Counts::default()
        };
        for (_, run) in self.runs.iter() {
            let slot = match run.state {
                SandboxState::Pending => &mut c.pending,
                SandboxState::Placed => &mut c.placed,
                SandboxState::Running => &mut c.running,
                SandboxState::Paused => &mut c.paused,
                SandboxState::Succeeded => &mut c.succeeded,
                SandboxState::Failed => &mut c.failed,
                SandboxState::OomKilled => &mut c.oom_killed,
                SandboxState::Lost => &mut c.lost,
                SandboxState::Cancelled => &mut c.cancelled,
                SandboxState::Stopped => &mut c.stopped,
            };
            *slot += run.count;
        }
        let active = c.placed + c.running + c.paused;
        let state = if self.cancelled {
            JobState::Cancelled
        } else if c.pending == 0 && active == 0 {
            if c.failed + c.oom_killed + c.lost == 0 {
                JobState::Complete
            } else {
                JobState::Failed
            }
        } else if active > 0 {
            JobState::Running
        } else {
            JobState::Pending
        };
        if state.is_terminal() && !self.state.is_terminal() {
            self.finished_at_ms = at_ms;
            self.pending_reason.clear();
        }
        if c.pending == 0 {
            self.pending_reason.clear();
        }
        self.counts = c;
        self.state = state;
    }
}

impl ClusterState {
    /// Apply one command at log `index`. Pure: same state, index and command, same result.
    pub fn apply_command(&mut self, index: u64, command: Command) -> Response {
        match command {
            Command::RegisterNode { node, at_ms } => self.register_node(index, node, at_ms),
            Command::SubmitJob {
                spec,
                idempotency_key,
                at_ms,
            } => self.submit_job(index, spec, idempotency_key, at_ms),
            Command::CancelJob { job_id, at_ms } => self.cancel_job(index, job_id, at_ms),
            Command::ApplyPlan {
                plan,
                reasons,
                at_ms,
            } => self.apply_plan(index, plan, reasons, at_ms),
            Command::ReportStatus { reports, at_ms } => {
                self.report_status(index, reports, Vec::new(), at_ms)
            }
            Command::ReportStatusOutcomes {
                reports,
                outcomes,
                at_ms,
            } => self.report_status(index, reports, outcomes, at_ms),
            Command::StopSandboxes {
                job_id,
                first,
                count,
                at_ms,
            } => self.stop_sandboxes(index, job_id, first, count, at_ms),
            Command::SetNodeState { node, state, at_ms } => {
                self.set_node_state(index, &node, state, at_ms)
            }
            Command::SetQuota { tenant, max } => self.set_quota(tenant, max),
            Command::SetSandboxes {
                job_id,
                first,
                count,
                paused,
                resources,
            } => self.set_sandboxes(index, job_id, first, count, paused, resources),
            Command::Batch { commands } => self.apply_batch(index, &commands),
        }
    }

    /// Every command of a batch in order, each as if it were its own entry at `index`.
    fn apply_batch(&mut self, index: u64, commands: &[Vec<u8>]) -> Response {
        if commands.len() > BATCH_COMMANDS_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} commands in one batch; at most {BATCH_COMMANDS_MAX}",
                commands.len()
            )));
        }
        let decoded: Vec<Result<Command, String>> = commands
            .iter()
            .map(|c| surge_raft::codec::from_bytes::<Command>(c).map_err(|e| e.to_string()))
            .collect();
        if decoded
            .iter()
            .any(|c| matches!(c, Ok(Command::Batch { .. })))
        {
            return Response::Rejected(Rejection::Invalid("a batch inside a batch".into()));
        }
        Response::Batch(
            decoded
                .into_iter()
                .map(|c| match c {
                    Ok(c) => self.apply_command(index, c),
                    Err(e) => Response::Rejected(Rejection::Undecodable(e)),
                })
                .collect(),
        )
    }

    fn register_node(&mut self, index: u64, spec: NodeSpec, at_ms: u64) -> Response {
        if let Err(e) = validate::node_spec(&spec) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        match self.nodes.get_mut(&spec.id) {
            Some(node) => {
                node.spec = spec;
                if node.state == NodeState::Down {
                    node.state = NodeState::Ready;
                }
                node.revision = index;
            }
            None => {
                self.nodes.insert(
                    spec.id.clone(),
                    Node {
                        spec,
                        state: NodeState::Ready,
                        registered_at_ms: at_ms,
                        registered_index: index,
                        revision: index,
                    },
                );
            }
        }
        Response::NodeRegistered
    }

    fn submit_job(&mut self, index: u64, spec: JobSpec, key: String, at_ms: u64) -> Response {
        if let Err(e) = validate::job_spec(&spec).and_then(|()| validate::idempotency_key(&key)) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        let dedup_key = (spec.tenant.clone(), key);
        if let Some(&job_id) = self.idempotency.get(&dedup_key) {
            return Response::JobSubmitted {
                job_id,
                created: false,
            };
        }
        // The log index is unique and increasing: a deterministic id every replica agrees on.
        // Submissions batched into one entry share its index and take the ids after it (jobs
        // are never removed, so the newest id is the largest key).
        let job_id = self
            .jobs
            .keys()
            .next_back()
            .map_or(index, |newest| index.max(newest + 1));
        let mut job = Job {
            id: job_id,
            runs: Runs::new(spec.count, spec.per_sandbox),
            spec,
            idempotency_key: dedup_key.1.clone(),
            state: JobState::Pending,
            counts: Counts::default(),
            pending_reason: "waiting for the scheduler".to_string(),
            submitted_at_ms: at_ms,
            submitted_index: index,
            finished_at_ms: 0,
            cancelled: false,
            outcomes: Outcomes::default(),
        };
        job.refresh(index, at_ms);
        self.jobs.insert(job_id, job);
        self.idempotency.insert(dedup_key, job_id);
        Response::JobSubmitted {
            job_id,
            created: true,
        }
    }

    /// Mark the desired sets of the nodes holding `job`'s sandboxes as changed.
    fn touch_nodes_of(&mut self, job_id: JobId, index: u64) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let nodes: std::collections::BTreeSet<&String> = job
            .runs
            .iter()
            .filter_map(|(_, r)| r.node.as_ref())
            .collect();
        for n in nodes {
            if let Some(node) = self.nodes.get_mut(n) {
                node.revision = index;
            }
        }
    }

    fn cancel_job(&mut self, index: u64, job_id: JobId, at_ms: u64) -> Response {
        self.touch_nodes_of(job_id, index);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if !job.state.is_terminal() {
            let total = job.spec.count;
            job.runs.update(0, total, |run| {
                if !run.state.is_terminal() {
                    run.state = SandboxState::Cancelled;
                    run.revision = index;
                }
            });
            job.cancelled = true;
            job.refresh(index, at_ms);
        }
        Response::JobCancelled {
            job: Box::new(job.clone()),
        }
    }

    fn apply_plan(
        &mut self,
        index: u64,
        plan: Plan,
        reasons: Vec<(JobId, String)>,
        at_ms: u64,
    ) -> Response {
        // A plan that only updates pending reasons needs no fit check.
        let (accepted, rejected) = if plan.placements.is_empty() && plan.preemptions.is_empty() {
            (plan, 0)
        } else {
            let current = self.placement_input(index, PlacementParams::default());
            let verified = placement::verify(&plan, &current);
            (verified.accepted, verified.rejected.len() as u64)
        };
        // Jobs are refreshed once, after the whole plan: a gang placed across several nodes is
        // complete only when all its rows are in.
        let mut touched = std::collections::BTreeSet::new();
        let mut preempted = 0u64;
        for p in &accepted.preemptions {
            let Some(job) = self.jobs.get_mut(&p.job) else {
                continue;
            };
            let per = job.spec.per_sandbox;
            let mut n = 0u32;
            job.runs.update(p.first_index, p.count, |run| {
                if run.state.is_active() && run.node.as_deref() == Some(p.node.as_str()) {
                    n += run.count;
                    reschedule(run, per, index);
                }
            });
            job.counts.preempted = job.counts.preempted.saturating_add(n);
            preempted += u64::from(n);
            touched.insert(job.id);
            self.preempted_at.insert(p.job, index);
            if let Some(node) = self.nodes.get_mut(&p.node) {
                node.revision = index;
            }
        }
        let mut placed = 0u64;
        for p in &accepted.placements {
            let Some(job) = self.jobs.get_mut(&p.job) else {
                continue;
            };
            job.runs.update(p.first_index, p.count, |run| {
                if run.state == SandboxState::Pending {
                    run.state = SandboxState::Placed;
                    run.node = Some(p.node.clone());
                    run.revision = index;
                    placed += u64::from(run.count);
                }
            });
            touched.insert(job.id);
            if let Some(node) = self.nodes.get_mut(&p.node) {
                node.revision = index;
            }
        }
        for job_id in touched {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.refresh(index, at_ms);
            }
        }
        for (job_id, reason) in reasons {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                if job.counts.pending > 0 {
                    job.pending_reason = reason;
                }
            }
        }
        // verify() makes this impossible; if it ever happens, say so loudly but never panic
        // inside apply (every replica would crash on the same entry). Only a placement can
        // overcommit, and the check walks every job: reason-only plans skip it.
        let overcommitted = (placed > 0).then(|| self.overcommitted()).flatten();
        if let Some((node, held, offers)) = overcommitted {
            tracing::error!(%node, %held, %offers, index, "BUG: node overcommitted after a plan");
        }
        Response::PlanApplied {
            placed,
            preempted,
            rejected,
        }
    }

    /// Keep what nodes said about how sandboxes ended, for the current run of each only (a
    /// stale node's words about a sandbox it no longer holds are dropped like its status).
    /// Runs before the status ranges are applied, while the runs are still active.
    fn record_outcomes(&mut self, outcomes: Vec<OutcomeReport>, at_ms: u64) {
        for o in outcomes {
            let Some(job) = self.jobs.get_mut(&o.job) else {
                continue;
            };
            let Some((_, run)) = job.runs.get(o.index) else {
                continue;
            };
            let current = run.generation == o.generation
                && run.node.as_deref() == Some(o.node.as_str())
                && run.state.is_active()
                && o.state.is_terminal();
            if !current {
                continue;
            }
            let state = if run.stop {
                SandboxState::Stopped
            } else {
                o.state
            };
            job.outcomes.record(
                o.index,
                Outcome {
                    generation: o.generation,
                    node: o.node,
                    state,
                    exit_code: o.exit_code,
                    message: o.message,
                    log_tail: o.log_tail,
                    at_ms,
                },
            );
        }
    }

    fn report_status(
        &mut self,
        index: u64,
        reports: Vec<StatusRange>,
        outcomes: Vec<OutcomeReport>,
        at_ms: u64,
    ) -> Response {
        if reports.len() > STATUS_RANGES_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} status ranges in one command; at most {STATUS_RANGES_MAX}",
                reports.len()
            )));
        }
        if outcomes.len() > OUTCOMES_PER_COMMAND_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} sandbox outcomes in one command; at most {OUTCOMES_PER_COMMAND_MAX}",
                outcomes.len()
            )));
        }
        self.record_outcomes(outcomes, at_ms);
        let mut applied = 0u64;
        let mut ignored = 0u64;
        let mut touched = std::collections::BTreeSet::new();
        // Counts and job states are recomputed once per job after all its ranges, not once per
        // range: a refresh walks every run of the job, and one entry carries the reports of
        // hundreds of nodes about the same job (20,000 ranges x 20,000 runs at 1M sandboxes).
        let mut jobs_touched = std::collections::BTreeSet::new();
        for r in reports {
            let Some(job) = self.jobs.get_mut(&r.job) else {
                ignored += u64::from(r.count);
                continue;
            };
            let policy = job.spec.restart;
            let per = job.spec.per_sandbox;
            let mut node_changed = false;
            job.runs.update(r.first, r.count, |run| {
                // Only the current run of a sandbox on the node it was placed on may report;
                // reports about earlier generations or from elsewhere are stale.
                let current = run.generation == r.generation
                    && run.node.as_deref() == Some(r.node.as_str())
                    && run.state.is_active();
                if !current {
                    ignored += u64::from(run.count);
                    return;
                }
                applied += u64::from(run.count);
                if run.stop && r.state.is_terminal() {
                    // However it ended after the user asked it to stop, it was stopped.
                    run.state = SandboxState::Stopped;
                    run.exit_code = r.exit_code;
                    node_changed = true;
                    return;
                }
                match r.state {
                    SandboxState::Running | SandboxState::Paused => {
                        run.state = r.state;
                        if let Some(res) = r.resources {
                            if res != run.resources {
                                run.resources = res;
                                run.revision = index;
                                node_changed = true;
                            }
                        }
                    }
                    SandboxState::Succeeded => {
                        run.state = SandboxState::Succeeded;
                        run.exit_code = r.exit_code;
                        node_changed = true;
                    }
                    SandboxState::Failed | SandboxState::OomKilled => {
                        run.exit_code = r.exit_code;
                        if is_restartable(policy, run.restarts) {
                            run.state = SandboxState::Pending;
                            run.node = None;
                            run.generation += 1;
                            run.restarts += 1;
                            run.resources = per;
                            run.paused = false;
                            run.revision = index;
                        } else {
                            run.state = r.state;
                        }
                        node_changed = true;
                    }
                    SandboxState::Lost => {
                        reschedule(run, per, index);
                        node_changed = true;
                    }
                    SandboxState::Stopped => {
                        run.state = SandboxState::Stopped;
                        run.exit_code = r.exit_code;
                        node_changed = true;
                    }
                    SandboxState::Pending | SandboxState::Placed | SandboxState::Cancelled => {
                        applied -= u64::from(run.count);
                        ignored += u64::from(run.count);
                    }
                }
            });
            jobs_touched.insert(r.job);
            if node_changed {
                touched.insert(r.node);
            }
        }
        for job_id in jobs_touched {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.refresh(index, at_ms);
            }
        }
        for n in touched {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        Response::StatusApplied { applied, ignored }
    }

    fn set_node_state(
        &mut self,
        index: u64,
        node_id: &str,
        state: NodeState,
        at_ms: u64,
    ) -> Response {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Response::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        node.state = state;
        node.revision = index;
        if state != NodeState::Ready {
            // Down: its sandboxes are lost and go back to the queue. Draining: they are moved.
            for job in self.jobs.values_mut() {
                let per = job.spec.per_sandbox;
                let total = job.spec.count;
                let mut moved = false;
                job.runs.update(0, total, |run| {
                    if run.state.is_active() && run.node.as_deref() == Some(node_id) {
                        reschedule(run, per, index);
                        moved = true;
                    }
                });
                if moved {
                    job.refresh(index, at_ms);
                }
            }
        }
        Response::Done
    }

    fn set_quota(&mut self, tenant: String, max: Option<Resources>) -> Response {
        if let Err(e) = validate::name("tenant", &tenant) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        match max {
            Some(m) => {
                self.quotas.insert(tenant, m);
            }
            None => {
                self.quotas.remove(&tenant);
            }
        }
        Response::Done
    }

    fn set_sandboxes(
        &mut self,
        index: u64,
        job_id: JobId,
        first: u32,
        count: u32,
        paused: Option<bool>,
        resources: Option<Resources>,
    ) -> Response {
        let usage = self.node_usage();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if let Some(refused) = out_of_range(job, first, count) {
            return refused;
        }
        if let Some(new) = resources {
            // Growing must fit on each node: never overcommit, even for a resize.
            let mut extra: BTreeMap<String, Resources> = BTreeMap::new();
            for (f, run) in job.runs.iter() {
                let lo = f.max(first);
                let hi =
                    (u64::from(f) + u64::from(run.count)).min(u64::from(first) + u64::from(count));
                if u64::from(lo) >= hi || !run.state.is_active() {
                    continue;
                }
                if let Some(n) = &run.node {
                    let delta = new
                        .saturating_sub(run.resources)
                        .saturating_mul(hi - u64::from(lo));
                    let e = extra.entry(n.clone()).or_default();
                    *e = e.saturating_add(delta);
                }
            }
            for (n, delta) in &extra {
                let alloc = usage.get(n).map(|u| u.allocated).unwrap_or_default();
                let cap = self
                    .nodes
                    .get(n)
                    .map(|x| x.spec.allocatable)
                    .unwrap_or_default();
                if !alloc.saturating_add(*delta).fits_in(&cap) {
                    return Response::Rejected(Rejection::Invalid(format!(
                        "node {n} has {} free; the resize needs {delta} more",
                        cap.saturating_sub(alloc)
                    )));
                }
            }
        }
        let mut nodes = std::collections::BTreeSet::new();
        job.runs.update(first, count, |run| {
            if run.state.is_terminal() {
                return;
            }
            if let Some(p) = paused {
                run.paused = p;
            }
            if let Some(r) = resources {
                run.resources = r;
            }
            run.revision = index;
            if let Some(n) = &run.node {
                nodes.insert(n.clone());
            }
        });
        for n in nodes {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        Response::Done
    }

    fn stop_sandboxes(
        &mut self,
        index: u64,
        job_id: JobId,
        first: u32,
        count: u32,
        at_ms: u64,
    ) -> Response {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if let Some(refused) = out_of_range(job, first, count) {
            return refused;
        }
        let mut nodes = std::collections::BTreeSet::new();
        job.runs.update(first, count, |run| match run.state {
            // Nothing runs yet: stopped at once. A placed sandbox may be starting on its node;
            // it is no longer assigned there, so the node stops it as foreign.
            SandboxState::Pending | SandboxState::Placed => {
                if let Some(n) = &run.node {
                    nodes.insert(n.clone());
                }
                run.state = SandboxState::Stopped;
                run.revision = index;
            }
            SandboxState::Running | SandboxState::Paused if !run.stop => {
                run.stop = true;
                run.revision = index;
                if let Some(n) = &run.node {
                    nodes.insert(n.clone());
                }
            }
            _ => {}
        });
        job.refresh(index, at_ms);
        for n in nodes {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        Response::Done
    }

    /// Reservations and sandbox counts per node, from the active runs.
    pub fn node_usage(&self) -> BTreeMap<String, NodeUsage> {
        let mut usage: BTreeMap<String, NodeUsage> = BTreeMap::new();
        for job in self.jobs.values() {
            if job.state.is_terminal() {
                continue;
            }
            for (_, run) in job.runs.iter() {
                if let (true, Some(n)) = (run.state.is_active(), &run.node) {
                    let u = usage.entry(n.clone()).or_default();
                    u.allocated = u
                        .allocated
                        .saturating_add(run.resources.saturating_mul(u64::from(run.count)));
                    u.sandboxes = u.sandboxes.saturating_add(run.count);
                }
            }
        }
        usage
    }

    /// The first node whose reservations exceed what it offers, if any (must never happen).
    pub fn overcommitted(&self) -> Option<(String, Resources, Resources)> {
        self.node_usage().into_iter().find_map(|(n, u)| {
            let cap = self
                .nodes
                .get(&n)
                .map(|x| x.spec.allocatable)
                .unwrap_or_default();
            (!u.allocated.fits_in(&cap)).then_some((n, u.allocated, cap))
        })
    }

    /// What placing pending work depends on besides the pending jobs themselves: every node's
    /// state and revision (a node's revision moves whenever a sandbox is placed on it, leaves it,
    /// ends on it or is resized there) and the tenants' quotas. While it stays the same, jobs
    /// that could not be placed still cannot (see [`Self::pending_requests`]).
    pub fn capacity_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (id, n) in &self.nodes {
            id.hash(&mut h);
            n.revision.hash(&mut h);
            (n.state as u8).hash(&mut h);
        }
        self.quotas.hash(&mut h);
        h.finish()
    }

    /// The pending work of the jobs from id `first_job` on. While the capacity fingerprint stays
    /// what a plan that placed nothing saw, that plan's nodes and allocations still hold, and
    /// the scheduling loop plans just the jobs submitted since with them.
    pub fn pending_requests(&self, first_job: JobId) -> Vec<JobRequest> {
        self.jobs
            .range(first_job..)
            .filter(|(_, job)| !job.state.is_terminal())
            .filter_map(|(_, job)| job_request(job))
            .collect()
    }

    /// The snapshot the placement function works on.
    pub fn placement_input(&self, at_index: u64, params: PlacementParams) -> PlacementInput {
        let usage = self.node_usage();
        let nodes = self
            .nodes
            .values()
            .map(|n| {
                let u = usage.get(&n.spec.id).copied().unwrap_or_default();
                NodeView {
                    id: n.spec.id.clone(),
                    allocatable: n.spec.allocatable,
                    allocated: u.allocated,
                    os: n.spec.os.clone(),
                    arch: n.spec.arch.clone(),
                    pool: n.spec.pool.clone(),
                    labels: n.spec.labels.clone(),
                    templates: n.spec.templates.iter().cloned().collect(),
                    schedulable: n.state == NodeState::Ready,
                    max_sandboxes: (n.spec.max_sandboxes > 0).then_some(n.spec.max_sandboxes),
                    sandbox_count: u.sandboxes,
                }
            })
            .collect();
        let mut allocations = Vec::new();
        let mut pending = Vec::new();
        for job in self.jobs.values() {
            if job.state.is_terminal() {
                continue;
            }
            for (first, run) in job.runs.iter() {
                if let (true, Some(n)) = (run.state.is_active(), &run.node) {
                    allocations.push(Allocation {
                        job: job.id,
                        node: n.clone(),
                        first_index: first,
                        count: run.count,
                        per_sandbox: run.resources,
                        priority: job.spec.priority,
                        tenant: job.spec.tenant.clone(),
                        gang: job.spec.gang,
                        preemptible: true,
                    });
                }
            }
            pending.extend(job_request(job));
        }
        PlacementInput {
            at_index,
            nodes,
            allocations,
            pending,
            quotas: self
                .quotas
                .iter()
                .map(|(t, m)| (t.clone(), TenantQuota { max: *m }))
                .collect(),
            preempted_at: self.preempted_at.clone(),
            params,
        }
    }

    /// Call `f(node, assignment)` for every sandbox a node should run (`only`: one node's).
    fn each_assignment(&self, only: Option<&str>, mut f: impl FnMut(&str, Assignment)) {
        for job in self.jobs.values() {
            if job.state.is_terminal() {
                continue;
            }
            for (first, run) in job.runs.iter() {
                let Some(node) = run.node.as_deref().filter(|_| run.state.is_active()) else {
                    continue;
                };
                if only.is_some_and(|o| o != node) {
                    continue;
                }
                for index in first..first + run.count {
                    let a = Assignment {
                        job: job.id,
                        index,
                        generation: run.generation,
                        revision: run.revision,
                        paused: run.paused,
                        stop: run.stop,
                        resources: run.resources,
                    };
                    f(node, a);
                }
            }
        }
    }

    /// The desired sandboxes of every node, grouped by node.
    pub fn assignments(&self) -> BTreeMap<String, Vec<Assignment>> {
        let mut out: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        self.each_assignment(None, |node, a| {
            out.entry(node.to_string()).or_default().push(a)
        });
        out
    }

    /// The desired sandboxes of one node.
    pub fn assignments_of(&self, node: &str) -> Vec<Assignment> {
        let mut list = Vec::new();
        self.each_assignment(Some(node), |_, a| list.push(a));
        list
    }

    /// Canonical encoding of the whole state (snapshot payload).
    pub fn encode(&self) -> Vec<u8> {
        surge_raft::codec::to_bytes(self)
    }

    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.encode());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl surge_raft::StateMachine for ClusterState {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let response = match surge_raft::codec::from_bytes::<Command>(command) {
            Ok(c) => self.apply_command(index, c),
            Err(e) => Response::Rejected(Rejection::Undecodable(e.to_string())),
        };
        response.encode()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.encode()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = surge_raft::codec::from_bytes(snapshot)
            .map_err(|e| format!("scheduler state does not decode: {e}"))?;
        Ok(())
    }

    fn state_hash(&self) -> String {
        self.hash()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Resources, RestartPolicy, Strategy};
    use crate::placement::{self, PlacementParams, Plan};
    use proptest::prelude::*;
    use proptest::strategy::Strategy as _;
    use surge_raft::StateMachine;

    pub(crate) fn spec(count: u32, tenant: &str) -> JobSpec {
        JobSpec {
            name: String::new(),
            count,
            per_sandbox: Resources::new(1000, 2048),
            template: "busybox".into(),
            command: vec!["true".into()],
            env: Default::default(),
            priority: 0,
            tenant: tenant.into(),
            gang: false,
            strategy: Strategy::Binpack,
            constraints: vec![],
            restart: RestartPolicy::Never,
        }
    }

    fn submit(s: &mut ClusterState, index: u64, key: &str) -> Response {
        s.apply_command(
            index,
            Command::SubmitJob {
                spec: spec(10, "eval"),
                idempotency_key: key.into(),
                at_ms: 1000,
            },
        )
    }

    #[test]
    fn same_key_twice_gives_the_first_job() {
        let mut s = ClusterState::default();
        assert_eq!(
            submit(&mut s, 5, "k1"),
            Response::JobSubmitted {
                job_id: 5,
                created: true
            }
        );
        assert_eq!(
            submit(&mut s, 9, "k1"),
            Response::JobSubmitted {
                job_id: 5,
                created: false
            }
        );
        assert_eq!(s.jobs.len(), 1);
        // the same key in another tenant is another job
        let other = s.apply_command(
            11,
            Command::SubmitJob {
                spec: spec(1, "train"),
                idempotency_key: "k1".into(),
                at_ms: 0,
            },
        );
        assert_eq!(
            other,
            Response::JobSubmitted {
                job_id: 11,
                created: true
            }
        );
    }

    #[test]
    fn invalid_submission_is_rejected_and_changes_nothing() {
        let mut s = ClusterState::default();
        let before = s.hash();
        let r = s.apply_command(
            1,
            Command::SubmitJob {
                spec: spec(0, "eval"),
                idempotency_key: "k".into(),
                at_ms: 0,
            },
        );
        assert!(
            matches!(r, Response::Rejected(Rejection::Invalid(_))),
            "{r:?}"
        );
        assert_eq!(s.hash(), before);
    }

    #[test]
    fn undecodable_command_is_rejected_without_change() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "a");
        let before = s.hash();
        // variant 200 does not exist: a command from a newer version
        let reply = s.apply(2, &[200, 0, 0, 0, 1, 2, 3]);
        let r = Response::decode(&reply).expect("reply decodes");
        assert!(
            matches!(r, Response::Rejected(Rejection::Undecodable(_))),
            "{r:?}"
        );
        assert_eq!(s.hash(), before);
    }

    #[test]
    fn cancel_moves_unfinished_sandboxes_to_cancelled() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "a");
        let r = s.apply_command(
            2,
            Command::CancelJob {
                job_id: 1,
                at_ms: 7,
            },
        );
        let Response::JobCancelled { job } = r else {
            panic!("{r:?}")
        };
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.counts.cancelled, 10);
        assert_eq!(job.counts.pending, 0);
        assert_eq!(job.finished_at_ms, 7);
        assert_eq!(
            s.apply_command(
                3,
                Command::CancelJob {
                    job_id: 99,
                    at_ms: 7
                }
            ),
            Response::Rejected(Rejection::NoSuchJob(99))
        );
    }

    #[test]
    fn snapshot_restores_an_identical_state() {
        let mut s = ClusterState::default();
        for i in 1..50 {
            submit(&mut s, i, &format!("k{}", i % 17));
        }
        let mut t = ClusterState::default();
        t.restore(&s.snapshot()).expect("restore");
        assert_eq!(t, s);
        assert_eq!(t.hash(), s.hash());
        assert!(t.restore(&[1, 2, 3]).is_err());
    }

    pub(crate) fn node(id: &str, cpus: u64) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            address: String::new(),
            allocatable: Resources::new(cpus * 1000, cpus * 4096),
            labels: Default::default(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pool: "default".into(),
            templates: vec![],
            max_sandboxes: 0,
            runtime: "sim".into(),
        }
    }

    fn plan_for(s: &ClusterState, index: u64) -> Plan {
        placement::place(&s.placement_input(index, PlacementParams::default()))
    }

    fn apply(s: &mut ClusterState, index: u64, c: Command) -> Response {
        s.apply_command(index, c)
    }

    /// Plan every pending job on the state as of `index - 1` and apply the plan at `index`.
    fn place_pending(s: &mut ClusterState, index: u64) -> Response {
        let plan = plan_for(s, index - 1);
        apply(
            s,
            index,
            Command::ApplyPlan {
                plan,
                reasons: vec![],
                at_ms: 0,
            },
        )
    }

    #[test]
    fn plan_places_and_status_runs_to_completion() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 8),
                at_ms: 0,
            },
        );
        apply(
            &mut s,
            2,
            Command::RegisterNode {
                node: node("b", 8),
                at_ms: 0,
            },
        );
        submit(&mut s, 3, "k"); // 10 sandboxes of 1 CPU
        let plan = plan_for(&s, 3);
        let r = apply(
            &mut s,
            4,
            Command::ApplyPlan {
                plan,
                reasons: vec![],
                at_ms: 5,
            },
        );
        assert_eq!(
            r,
            Response::PlanApplied {
                placed: 10,
                preempted: 0,
                rejected: 0
            }
        );
        assert_eq!(s.jobs[&3].counts.placed, 10);
        assert_eq!(s.jobs[&3].state, JobState::Running);
        assert!(s.overcommitted().is_none());
        let usage = s.node_usage();
        assert_eq!(usage["a"].sandboxes + usage["b"].sandboxes, 10);
        // every node reports its sandboxes running, then succeeded
        for (n, list) in s.assignments() {
            let reports = list
                .iter()
                .map(|a| StatusRange {
                    node: n.clone(),
                    job: a.job,
                    first: a.index,
                    count: 1,
                    generation: a.generation,
                    state: SandboxState::Succeeded,
                    exit_code: 0,
                    resources: None,
                })
                .collect();
            apply(&mut s, 5, Command::ReportStatus { reports, at_ms: 9 });
        }
        let job = &s.jobs[&3];
        assert_eq!(job.counts.succeeded, 10);
        assert_eq!(job.state, JobState::Complete);
        assert_eq!(job.finished_at_ms, 9);
        assert!(s.assignments().is_empty());
    }

    #[test]
    fn a_batch_applies_each_command_as_its_own_with_its_own_reply() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "before");
        let sub = |key: &str| {
            Command::SubmitJob {
                spec: spec(2, "eval"),
                idempotency_key: key.into(),
                at_ms: 7,
            }
            .encode()
        };
        let batch = Command::Batch {
            commands: vec![
                sub("a"),
                sub("b"),
                sub("a"), // a retry of "a" in the same entry: the same job
                Command::CancelJob {
                    job_id: 99,
                    at_ms: 7,
                }
                .encode(),
                vec![0xff, 0x00, 0x13],
            ],
        };
        let r = apply(&mut s, 2, batch);
        let Response::Batch(replies) = r else {
            panic!("{r:?}")
        };
        let ids: Vec<_> = replies
            .iter()
            .filter_map(|r| match r {
                Response::JobSubmitted { job_id, .. } => Some(*job_id),
                _ => None,
            })
            .collect();
        // Jobs in one entry share its index and take the ids after it.
        assert_eq!(ids, [2, 3, 2]);
        assert_eq!(
            replies[2],
            Response::JobSubmitted {
                job_id: 2,
                created: false
            }
        );
        assert_eq!(replies[3], Response::Rejected(Rejection::NoSuchJob(99)));
        assert!(matches!(
            replies[4],
            Response::Rejected(Rejection::Undecodable(_))
        ));
        assert_eq!(s.jobs.len(), 3);
        // The next entry's index is taken already: its job gets the next free id.
        submit(&mut s, 3, "after");
        assert_eq!(s.jobs.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
        submit(&mut s, 9, "later");
        assert!(s.jobs.contains_key(&9), "ids follow the index again");

        // Refused whole, state unchanged: a batch in a batch, or too many commands.
        let before = s.state_hash();
        let nested = Command::Batch {
            commands: vec![
                sub("c"),
                Command::Batch {
                    commands: vec![sub("d")],
                }
                .encode(),
            ],
        };
        assert!(matches!(
            apply(&mut s, 10, nested),
            Response::Rejected(Rejection::Invalid(_))
        ));
        let huge = Command::Batch {
            commands: vec![sub("e"); BATCH_COMMANDS_MAX + 1],
        };
        assert!(matches!(
            apply(&mut s, 11, huge),
            Response::Rejected(Rejection::Invalid(_))
        ));
        assert_eq!(s.state_hash(), before);
    }

    #[test]
    fn capacity_fingerprint_moves_with_capacity_not_with_submissions() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        submit(&mut s, 2, "fills"); // 10 x 1 CPU: fills node a
        place_pending(&mut s, 3);
        let full = s.capacity_fingerprint();
        submit(&mut s, 4, "waits");
        submit(&mut s, 5, "new");
        assert_eq!(
            s.capacity_fingerprint(),
            full,
            "a submission changes no capacity"
        );

        // Only the jobs from the given id on are pending work; allocations all count.
        let all = s.placement_input(5, PlacementParams::default());
        assert_eq!(all.pending.iter().map(|j| j.id).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(all.pending, s.pending_requests(0));
        let new = placement::PlacementInput {
            pending: s.pending_requests(5),
            ..all
        };
        assert_eq!(new.pending.iter().map(|j| j.id).collect::<Vec<_>>(), [5]);
        assert!(placement::place(&new).placements.is_empty());

        // A sandbox ending frees capacity: the fingerprint moves and everything is re-planned.
        let a = s.assignments()["a"][0].clone();
        let ended = StatusRange {
            node: "a".into(),
            job: a.job,
            first: a.index,
            count: 1,
            generation: a.generation,
            state: SandboxState::Succeeded,
            exit_code: 0,
            resources: None,
        };
        apply(
            &mut s,
            6,
            Command::ReportStatus {
                reports: vec![ended],
                at_ms: 1,
            },
        );
        let freed = s.capacity_fingerprint();
        assert_ne!(freed, full);
        let others = [
            Command::SetQuota {
                tenant: "eval".into(),
                max: Some(Resources::new(1000, 1024)),
            },
            Command::RegisterNode {
                node: node("b", 4),
                at_ms: 2,
            },
            Command::SetNodeState {
                node: "b".into(),
                state: NodeState::Down,
                at_ms: 3,
            },
        ];
        let mut seen = vec![freed];
        for (i, c) in others.into_iter().enumerate() {
            apply(&mut s, 7 + i as u64, c);
            let now = s.capacity_fingerprint();
            assert!(!seen.contains(&now), "command {i} left the fingerprint");
            seen.push(now);
        }
    }

    #[test]
    fn stale_plan_is_partly_rejected_never_overcommits() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        submit(&mut s, 2, "k1"); // 10 x 1 CPU: fills node a exactly
        let plan1 = plan_for(&s, 2);
        submit(&mut s, 3, "k2");
        let plan2 = plan_for(&s, 3); // computed on the same old state: places k1's job again + k2
        apply(
            &mut s,
            4,
            Command::ApplyPlan {
                plan: plan1,
                reasons: vec![],
                at_ms: 0,
            },
        );
        let r = apply(
            &mut s,
            5,
            Command::ApplyPlan {
                plan: plan2,
                reasons: vec![],
                at_ms: 0,
            },
        );
        let Response::PlanApplied {
            placed, rejected, ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(placed, 0, "the stale plan placed on a full node");
        assert!(rejected > 0);
        assert!(s.overcommitted().is_none());
        assert_eq!(s.jobs[&3].counts.pending, 10);
    }

    #[test]
    fn node_down_reschedules_and_stale_reports_are_ignored() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        apply(
            &mut s,
            2,
            Command::RegisterNode {
                node: node("b", 10),
                at_ms: 0,
            },
        );
        submit(&mut s, 3, "k");
        place_pending(&mut s, 4);
        let (victim, list) = s.assignments().into_iter().next().expect("placed");
        let before = list.len() as u32;
        apply(
            &mut s,
            5,
            Command::SetNodeState {
                node: victim.clone(),
                state: NodeState::Down,
                at_ms: 0,
            },
        );
        let job = &s.jobs[&3];
        assert_eq!(
            job.counts.pending, before,
            "lost sandboxes go back to the queue"
        );
        assert!(s.assignments_of(&victim).is_empty());
        // the old node's late report about generation 0 changes nothing
        let stale = StatusRange {
            node: victim.clone(),
            job: 3,
            first: list[0].index,
            count: 1,
            generation: 0,
            state: SandboxState::Running,
            exit_code: 0,
            resources: None,
        };
        let r = apply(
            &mut s,
            6,
            Command::ReportStatus {
                reports: vec![stale],
                at_ms: 0,
            },
        );
        assert_eq!(
            r,
            Response::StatusApplied {
                applied: 0,
                ignored: 1
            }
        );
        // rescheduled onto the other node with a new generation
        place_pending(&mut s, 7);
        assert_eq!(s.jobs[&3].counts.placed, 10);
        assert!(s.assignments_of(&victim).is_empty());
        assert!(s
            .assignments()
            .values()
            .flatten()
            .all(|a| a.generation <= 1));
    }

    #[test]
    fn failure_restarts_by_policy() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        let mut sp = spec(1, "t");
        sp.restart = RestartPolicy::OnFailure { max_restarts: 1 };
        apply(
            &mut s,
            2,
            Command::SubmitJob {
                spec: sp,
                idempotency_key: "r".into(),
                at_ms: 0,
            },
        );
        for (index, generation, expect) in [(3, 0, JobState::Pending), (5, 1, JobState::Failed)] {
            let plan = plan_for(&s, index);
            apply(
                &mut s,
                index,
                Command::ApplyPlan {
                    plan,
                    reasons: vec![],
                    at_ms: 0,
                },
            );
            let fail = StatusRange {
                node: "a".into(),
                job: 2,
                first: 0,
                count: 1,
                generation,
                state: SandboxState::Failed,
                exit_code: 3,
                resources: None,
            };
            apply(
                &mut s,
                index + 1,
                Command::ReportStatus {
                    reports: vec![fail],
                    at_ms: 0,
                },
            );
            assert_eq!(s.jobs[&2].state, expect);
        }
        assert_eq!(s.jobs[&2].counts.failed, 1);
    }

    #[test]
    fn resize_never_overcommits() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        submit(&mut s, 2, "k"); // 10 x 1 CPU on a 10-CPU node
        place_pending(&mut s, 3);
        let grow = Command::SetSandboxes {
            job_id: 2,
            first: 0,
            count: 1,
            paused: None,
            resources: Some(Resources::new(2000, 2048)),
        };
        assert!(matches!(apply(&mut s, 4, grow), Response::Rejected(_)));
        let pause = Command::SetSandboxes {
            job_id: 2,
            first: 0,
            count: 3,
            paused: Some(true),
            resources: None,
        };
        assert_eq!(apply(&mut s, 5, pause), Response::Done);
        assert_eq!(s.assignments_of("a").iter().filter(|a| a.paused).count(), 3);
        assert!(s.nodes["a"].revision == 5);
    }

    #[test]
    fn gang_losing_a_node_is_requeued_whole() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::RegisterNode {
                node: node("a", 4),
                at_ms: 0,
            },
        );
        apply(
            &mut s,
            2,
            Command::RegisterNode {
                node: node("b", 4),
                at_ms: 0,
            },
        );
        let mut sp = spec(8, "t");
        sp.gang = true;
        apply(
            &mut s,
            3,
            Command::SubmitJob {
                spec: sp,
                idempotency_key: "g".into(),
                at_ms: 0,
            },
        );
        let plan = plan_for(&s, 3);
        let shown = format!("{plan:?}");
        apply(
            &mut s,
            4,
            Command::ApplyPlan {
                plan,
                reasons: vec![],
                at_ms: 0,
            },
        );
        assert_eq!(s.jobs[&3].counts.placed, 8, "{shown}");
        apply(
            &mut s,
            5,
            Command::SetNodeState {
                node: "a".into(),
                state: NodeState::Down,
                at_ms: 0,
            },
        );
        let c = s.jobs[&3].counts;
        assert_eq!(
            (c.pending, c.placed, c.running),
            (8, 0, 0),
            "a partial gang was left: {c:?}"
        );
        assert!(s.assignments_of("b").is_empty());
    }

    fn placed_on_a(s: &mut ClusterState, count: u32) -> JobId {
        apply(
            s,
            1,
            Command::RegisterNode {
                node: node("a", 10),
                at_ms: 0,
            },
        );
        apply(
            s,
            2,
            Command::SubmitJob {
                spec: spec(count, "t"),
                idempotency_key: "k".into(),
                at_ms: 0,
            },
        );
        let plan = plan_for(s, 2);
        apply(
            s,
            3,
            Command::ApplyPlan {
                plan,
                reasons: vec![],
                at_ms: 0,
            },
        );
        2
    }

    fn range(first: u32, count: u32, state: SandboxState, exit_code: i32) -> StatusRange {
        StatusRange {
            node: "a".into(),
            job: 2,
            first,
            count,
            generation: 0,
            state,
            exit_code,
            resources: None,
        }
    }

    #[test]
    fn one_entry_of_many_ranges_counts_each_once() {
        let mut s = ClusterState::default();
        let job = placed_on_a(&mut s, 10);
        let reports = vec![
            range(0, 4, SandboxState::Running, 0),
            range(4, 3, SandboxState::Running, 0),
            range(7, 2, SandboxState::Succeeded, 0),
            range(9, 1, SandboxState::Failed, 2),
            range(0, 2, SandboxState::Succeeded, 0), // later in the entry: wins
        ];
        let r = apply(&mut s, 4, Command::ReportStatus { reports, at_ms: 5 });
        assert_eq!(
            r,
            Response::StatusApplied {
                applied: 12,
                ignored: 0
            }
        );
        let j = &s.jobs[&job];
        let c = j.counts;
        assert_eq!(
            (c.running, c.succeeded, c.failed, c.placed),
            (5, 4, 1, 0),
            "{c:?}"
        );
        assert_eq!(j.state, JobState::Running);
        // The rest ends: the job's state follows in the same entry.
        let reports = vec![range(2, 5, SandboxState::Succeeded, 0)];
        apply(&mut s, 5, Command::ReportStatus { reports, at_ms: 6 });
        assert_eq!(s.jobs[&job].state, JobState::Failed, "one sandbox failed");
        assert_eq!(s.jobs[&job].finished_at_ms, 6);
    }

    #[test]
    fn stop_asks_the_node_then_ends_stopped_not_failed() {
        let mut s = ClusterState::default();
        let job = placed_on_a(&mut s, 3);
        let running = vec![range(0, 3, SandboxState::Running, 0)];
        apply(
            &mut s,
            4,
            Command::ReportStatus {
                reports: running,
                at_ms: 0,
            },
        );
        let stop = |first, count| Command::StopSandboxes {
            job_id: job,
            first,
            count,
            at_ms: 5,
        };
        assert!(matches!(
            apply(&mut s, 5, stop(2, 5)),
            Response::Rejected(_)
        ));
        assert_eq!(apply(&mut s, 6, stop(0, 2)), Response::Done);
        let desired = s.assignments_of("a");
        assert_eq!(desired.iter().filter(|a| a.stop).count(), 2);
        assert_eq!(s.nodes["a"].revision, 6, "the node is told");
        // The node stops them; SIGTERM makes one exit 143. Both end `stopped`, with the code.
        let ended = vec![
            range(0, 1, SandboxState::Stopped, 143),
            range(1, 1, SandboxState::Failed, 143),
        ];
        let tail = |i: u32| OutcomeReport {
            node: "a".into(),
            job,
            index: i,
            generation: 0,
            state: SandboxState::Stopped,
            exit_code: 143,
            message: "stopped by the node at the scheduler's request".into(),
            log_tail: format!("bye from {i}\n"),
        };
        apply(
            &mut s,
            7,
            Command::ReportStatusOutcomes {
                reports: ended,
                outcomes: vec![tail(0), tail(1)],
                at_ms: 70,
            },
        );
        let j = &s.jobs[&job];
        assert_eq!(
            (j.counts.stopped, j.counts.failed, j.counts.running),
            (2, 0, 1)
        );
        assert_eq!(j.runs.get(0).map(|(_, r)| r.exit_code), Some(143));
        let kept = j.outcomes.get(1).expect("outcome kept");
        assert_eq!((kept.state, kept.at_ms), (SandboxState::Stopped, 70));
        assert_eq!(kept.log_tail, "bye from 1\n");
        // A stopped sandbox is not restarted and not asked for again.
        assert_eq!(s.assignments_of("a").len(), 1);
        // A stale outcome (older generation) is dropped.
        let mut stale = tail(2);
        stale.generation = 9;
        apply(
            &mut s,
            8,
            Command::ReportStatusOutcomes {
                reports: vec![],
                outcomes: vec![stale],
                at_ms: 0,
            },
        );
        assert!(s.jobs[&job].outcomes.get(2).is_none());
        // Stopping a sandbox whose node goes down ends it stopped, not rescheduled.
        apply(&mut s, 9, stop(2, 1));
        apply(
            &mut s,
            10,
            Command::SetNodeState {
                node: "a".into(),
                state: NodeState::Down,
                at_ms: 0,
            },
        );
        let j = &s.jobs[&job];
        assert_eq!((j.counts.stopped, j.counts.pending), (3, 0));
        assert_eq!(j.state, JobState::Complete);
    }

    #[test]
    fn stopping_a_pending_sandbox_ends_it_at_once() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "k");
        let r = apply(
            &mut s,
            2,
            Command::StopSandboxes {
                job_id: 1,
                first: 0,
                count: 10,
                at_ms: 0,
            },
        );
        assert_eq!(r, Response::Done);
        assert_eq!(s.jobs[&1].counts.stopped, 10);
        assert!(s.jobs[&1].state.is_terminal());
    }

    fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
        prop_oneof![
            (0u32..5, "[a-c]{1,2}", 0u64..1000).prop_map(|(count, key, at_ms)| {
                Command::SubmitJob {
                    spec: spec(count, "t"),
                    idempotency_key: key,
                    at_ms,
                }
            }),
            (0u64..40, 0u64..1000).prop_map(|(job_id, at_ms)| Command::CancelJob { job_id, at_ms }),
        ]
    }

    proptest! {
        /// Apply is deterministic: two replicas applying the same log agree byte for byte, and
        /// arbitrary bytes never panic.
        #[test]
        fn apply_is_deterministic(commands in proptest::collection::vec(arb_command(), 0..40),
                                  junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut a = ClusterState::default();
            let mut b = ClusterState::default();
            for (i, c) in commands.iter().enumerate() {
                let ra = a.apply(i as u64 + 1, &c.encode());
                let rb = b.apply(i as u64 + 1, &c.encode());
                prop_assert_eq!(ra, rb);
            }
            let ra = a.apply(1000, &junk);
            let rb = b.apply(1000, &junk);
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(a.hash(), b.hash());
            // every idempotency entry points at a job with that key
            for ((tenant, key), id) in &a.idempotency {
                let job = &a.jobs[id];
                prop_assert_eq!(&job.spec.tenant, tenant);
                prop_assert_eq!(&job.idempotency_key, key);
            }
        }
    }
}
