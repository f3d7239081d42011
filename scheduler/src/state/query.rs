//! Reads of the state: usage per node, the placement input, the nodes' desired sets.

use std::collections::BTreeMap;

use crate::model::{Job, JobId, NodeState, Resources};
use crate::placement::{
    Allocation, IndexRun, JobRequest, NodeView, PlacementInput, PlacementParams, TenantQuota,
};
use crate::runs::SandboxState;

use super::{Assignment, ClusterState, NodeUsage};

/// A job's pending sandboxes as placement's request, if it has any.
pub(super) fn job_request(job: &Job) -> Option<JobRequest> {
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

impl ClusterState {
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
                // A checkpointed sandbox stays in its node's desired set: the node keeps its image.
                // A fork not yet placed has nothing on its node yet (`fork`).
                let held = run.state.is_active()
                    || (run.state == SandboxState::Checkpointed && !run.forking);
                let Some(node) = run.node.as_deref().filter(|_| held) else {
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
                        checkpoint: run.checkpoint,
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
}
