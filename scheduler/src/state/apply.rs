//! Applying commands: one handler per `Command`, each pure over the state, the entry's index
//! and what the command carries.

use std::collections::BTreeMap;

use crate::command::{Command, Rejection, Response, BATCH_COMMANDS_MAX};
use crate::model::{
    Counts, ForkOf, Job, JobId, JobSpec, JobState, Node, NodeSpec, NodeState, Resources,
    RestartPolicy,
};
use crate::outcomes::Outcomes;
use crate::placement::{self, PlacementParams, Plan};
use crate::runs::{Run, Runs, SandboxState};
use crate::validate;

use super::{ClusterState, RESCHEDULES_MAX};

pub(super) fn is_restartable(policy: RestartPolicy, restarts: u32) -> bool {
    matches!(policy, RestartPolicy::OnFailure { max_restarts } if restarts < max_restarts)
}

/// Send a sandbox back to the queue as a new generation (or give up after too many reschedules).
///
/// A fork (`fork_of` of its job) is never sent back: it exists only as a restore of its source's
/// checkpoint on its source's node, and any other node would fail to fork it (or start a cold
/// copy that is no fork at all). It ends `Lost` (node-lost) with the reason instead.
pub(super) fn reschedule(
    run: &mut Run,
    per_sandbox: Resources,
    index: u64,
    fork_of: Option<ForkOf>,
) {
    if run.stop {
        // Asked to stop and its node is gone: nothing left to stop, nothing to run again.
        run.state = SandboxState::Stopped;
    } else if let Some(source) = fork_of {
        run.state = SandboxState::Lost;
        run.note = format!(
            "node-lost: a fork of {}.{} lives only on node {}, where its source's checkpoint was made; it lost its place there and is not moved to another node",
            source.job_id,
            source.index,
            run.node.as_deref().unwrap_or("(none)")
        );
        run.restore = false;
        run.forking = false;
    } else if run.reschedules >= RESCHEDULES_MAX {
        run.state = SandboxState::Lost;
    } else {
        run.state = SandboxState::Pending;
        run.node = None;
        run.generation += 1;
        run.reschedules += 1;
        run.resources = per_sandbox;
        run.paused = false;
        // A new run: its TTL and idle clock start when it runs again.
        run.expires_ms = 0;
        run.active_ms = 0;
    }
    run.revision = index;
}

/// `Some(refusal)` when `first..first+count` is empty or not within the job's sandboxes.
pub(super) fn out_of_range(job: &Job, first: u32, count: u32) -> Option<Response> {
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
            let fork_of = self.spec.fork_of;
            self.runs.update(0, total, |run| {
                if run.state.is_active() {
                    reschedule(run, per, index, fork_of);
                }
            });
        }
    }

    /// Recompute counts and the job state from the runs.
    pub(super) fn refresh(&mut self, index: u64, at_ms: u64) {
        self.keep_gang_whole(index);
        let mut c = Counts {
            preempted: self.counts.preempted,
            ..Counts::default()
        };
        for (_, run) in self.runs.iter() {
            c.add(run.state, run.count);
        }
        let state = if self.cancelled {
            JobState::Cancelled
        } else if c.pending == 0 && c.active() == 0 && c.checkpointed == 0 {
            if c.failed() == 0 {
                JobState::Complete
            } else {
                JobState::Failed
            }
        } else if c.active() > 0 || c.checkpointed > 0 {
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
        // Commands that may free room on a node give waiting restores a chance (`checkpoint`).
        let frees_room = match &command {
            Command::ReportStatus { at_ms, .. }
            | Command::ReportStatusOutcomes { at_ms, .. }
            | Command::CancelJob { at_ms, .. }
            | Command::CancelJobs { at_ms, .. }
            | Command::StopSandboxes { at_ms, .. }
            | Command::Expire { at_ms, .. }
            | Command::Restore { at_ms, .. }
            | Command::Fork { at_ms, .. }
            | Command::ForkOwned { at_ms, .. }
            | Command::Checkpoint { at_ms, .. } => Some(*at_ms),
            _ => None,
        };
        let reply = self.apply_one(index, command);
        if let Some(at_ms) = frees_room {
            self.try_restores(index, at_ms);
        }
        reply
    }

    fn apply_one(&mut self, index: u64, command: Command) -> Response {
        match command {
            Command::RegisterNode { node, at_ms } => self.register_node(index, node, at_ms),
            Command::SubmitJob { ref spec, .. } if spec.fork_of.is_some() => {
                Response::Rejected(Rejection::Invalid(
                    "a submission cannot name a fork origin; use `surge fork`".into(),
                ))
            }
            Command::SubmitJob {
                spec,
                idempotency_key,
                at_ms,
            } => self.submit_job(index, spec, idempotency_key, at_ms),
            Command::CancelJob { job_id, at_ms } => {
                let reply = self.cancel_job(index, job_id, at_ms);
                self.prune_lifetimes();
                reply
            }
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
            Command::Touch { ranges, at_ms } => self.touch(ranges, at_ms),
            Command::Keepalive {
                job_id,
                first,
                count,
                ttl_ms,
                at_ms,
            } => self.keepalive(job_id, first, count, ttl_ms, at_ms),
            Command::Expire { expiries, at_ms } => self.expire(index, expiries, at_ms),
            Command::CancelJobs {
                tenant,
                selector,
                at_ms,
            } => self.cancel_jobs(index, tenant.as_deref(), &selector, at_ms),
            Command::Checkpoint {
                job_id,
                first,
                count,
                at_ms: _,
            } => self.checkpoint_sandboxes(index, job_id, first, count),
            Command::Restore {
                job_id,
                first,
                count,
                paused,
                at_ms: _,
            } => {
                if let Some(job) = self.jobs.get(&job_id) {
                    if let Some(refused) = out_of_range(job, first, count) {
                        return refused;
                    }
                }
                self.request_restores(index, job_id, first, count, paused);
                Response::Done
            }
            // A fork without labels or a lease of its own (the CLI's, and entries from before
            // `ForkOwned`).
            Command::Fork {
                job_id,
                index: source_index,
                count,
                tenant,
                idempotency_key,
                at_ms,
            } => self.apply_one(
                index,
                Command::ForkOwned {
                    job_id,
                    index: source_index,
                    count,
                    tenant,
                    idempotency_key,
                    labels: Default::default(),
                    lease_ms: 0,
                    at_ms,
                },
            ),
            Command::ForkOwned {
                job_id,
                index: source_index,
                count,
                tenant,
                idempotency_key,
                labels,
                lease_ms,
                at_ms,
            } => self.fork_sandbox(
                index,
                super::fork::ForkRequest {
                    job_id,
                    index: source_index,
                    count,
                    tenant,
                    idempotency_key,
                    labels,
                    lease_ms,
                },
                at_ms,
            ),
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

    pub(super) fn submit_job(
        &mut self,
        index: u64,
        spec: JobSpec,
        key: String,
        at_ms: u64,
    ) -> Response {
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
            lease_expires_ms: 0,
        };
        if job.spec.lifetime.lease_ms > 0 {
            job.lease_expires_ms = at_ms.saturating_add(job.spec.lifetime.lease_ms);
        }
        if !job.spec.lifetime.is_unbounded() {
            self.lifetimes.insert(job_id);
        }
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

    pub(super) fn cancel_job(&mut self, index: u64, job_id: JobId, at_ms: u64) -> Response {
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
            let fork_of = job.spec.fork_of;
            let mut n = 0u32;
            job.runs.update(p.first_index, p.count, |run| {
                if run.state.is_active() && run.node.as_deref() == Some(p.node.as_str()) {
                    n += run.count;
                    reschedule(run, per, index, fork_of);
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
                let fork_of = job.spec.fork_of;
                let mut moved = false;
                job.runs.update(0, total, |run| {
                    if run.state.is_active() && run.node.as_deref() == Some(node_id) {
                        reschedule(run, per, index, fork_of);
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
            // A resize changes sandboxes that hold a node, the ones the fit check above
            // counted. A pending sandbox is placed (and verified) at the job's size: resizing it
            // here would book more than placement planned for and overcommit its node (found by
            // `rejected_commands_change_nothing_and_invariants_hold`).
            if let Some(r) = resources.filter(|_| run.state.is_active()) {
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
            SandboxState::Pending | SandboxState::Placed | SandboxState::Checkpointed => {
                if let Some(n) = &run.node {
                    nodes.insert(n.clone());
                }
                run.state = SandboxState::Stopped;
                run.revision = index;
            }
            SandboxState::Running | SandboxState::Paused if !run.stop => {
                run.stop = true;
                run.stop_cause = crate::lifetime::StopCause::User;
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
}
