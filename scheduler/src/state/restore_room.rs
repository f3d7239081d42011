//! Room for a restore. A checkpointed sandbox comes back only on the node that holds its image,
//! so placement cannot move it elsewhere; when that node is full, strictly lower-priority work
//! there is preempted for it, under the planner's bounds (`placement::preempt`):
//!
//! - only sandboxes of jobs of *strictly* lower priority, not gangs (a gang is evicted whole or
//!   not at all, across nodes: the planner's business), not in their preemption cool-down, and
//!   not being stopped or checkpointed;
//! - victims lowest priority first, then the largest sandboxes (fewest evictions), then the
//!   newest job;
//! - nothing is evicted unless the evictions make the restore fit (no damage for nothing);
//! - at most `max_preemptions_per_cycle` sandboxes per call.
//!
//! Victims go back to the queue as a new generation (counted in `preempted`), exactly as the
//! planner's preemptions do; the planner places them elsewhere. Pure: decided from the applied
//! state and the Raft index, so every replica evicts the same sandboxes.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::model::{JobId, NodeState, Resources};
use crate::placement::PlacementParams;
use crate::runs::SandboxState;

use super::apply::reschedule;
use super::ClusterState;

/// Evictable sandboxes of one run on the node.
#[derive(Clone, Debug)]
struct Victim {
    job: JobId,
    first: u32,
    count: u32,
    per: Resources,
    priority: i32,
}

/// A restore that waits for room: `count` sandboxes of `job` needing `want` on `node`.
struct Want {
    node: String,
    priority: i32,
    want: Resources,
    count: u32,
}

impl ClusterState {
    /// Preempt for the waiting restores whose nodes lack room (see the module docs). Returns
    /// how many sandboxes were evicted. Called by `try_restores` before it books restores.
    pub(super) fn preempt_for_restores(
        &mut self,
        index: u64,
        at_ms: u64,
        params: PlacementParams,
    ) -> u32 {
        let wants = self.waiting_restores();
        if wants.is_empty() {
            return 0;
        }
        let mut usage = self.node_usage();
        let mut victims: BTreeMap<String, Vec<Victim>> = BTreeMap::new();
        let mut budget = params.max_preemptions_per_cycle;
        let mut evicted = 0u32;
        for w in wants {
            let Some(node) = self.nodes.get(&w.node) else {
                continue;
            };
            let (cap, max_sandboxes) = (node.spec.allocatable, node.spec.max_sandboxes);
            let u = usage.entry(w.node.clone()).or_default();
            let fits = |allocated: Resources, sandboxes: u32| {
                allocated.saturating_add(w.want).fits_in(&cap)
                    && (max_sandboxes == 0 || sandboxes.saturating_add(w.count) <= max_sandboxes)
            };
            if fits(u.allocated, u.sandboxes) {
                // Books it here as try_restores will, so later restores see the room it takes.
                u.allocated = u.allocated.saturating_add(w.want);
                u.sandboxes = u.sandboxes.saturating_add(w.count);
                continue;
            }
            if budget == 0 {
                break;
            }
            let on_node = victims
                .entry(w.node.clone())
                .or_insert_with(|| self.victims_on(&w.node, index, params));
            // Take victims in order, sandbox by sandbox, until the restore fits.
            let (mut allocated, mut sandboxes) = (u.allocated, u.sandboxes);
            let mut chosen: Vec<(usize, u32)> = Vec::new();
            let mut taken = 0u32;
            for (i, v) in on_node.iter().enumerate() {
                if v.priority >= w.priority || fits(allocated, sandboxes) {
                    continue;
                }
                let mut k = 0;
                while k < v.count && taken < budget && !fits(allocated, sandboxes) {
                    allocated = allocated.saturating_sub(v.per);
                    sandboxes = sandboxes.saturating_sub(1);
                    k += 1;
                    taken += 1;
                }
                if k > 0 {
                    chosen.push((i, k));
                }
            }
            if !fits(allocated, sandboxes) {
                continue;
            }
            for &(i, k) in &chosen {
                let v = &mut on_node[i];
                // The last k sandboxes of the run.
                let first = v.first + (v.count - k);
                v.count -= k;
                if let Some(job) = self.jobs.get_mut(&v.job) {
                    let per = job.spec.per_sandbox;
                    let fork_of = job.spec.fork_of;
                    let mut n = 0u32;
                    job.runs.update(first, k, |run| {
                        if run.state.is_active() && run.node.as_deref() == Some(w.node.as_str()) {
                            n += run.count;
                            reschedule(run, per, index, fork_of);
                        }
                    });
                    job.counts.preempted = job.counts.preempted.saturating_add(n);
                    job.refresh(index, at_ms);
                    evicted = evicted.saturating_add(n);
                }
                self.preempted_at.insert(v.job, index);
            }
            on_node.retain(|v| v.count > 0);
            budget = budget.saturating_sub(taken);
            let u = usage.entry(w.node.clone()).or_default();
            u.allocated = allocated.saturating_add(w.want);
            u.sandboxes = sandboxes.saturating_add(w.count);
            if let Some(node) = self.nodes.get_mut(&w.node) {
                node.revision = index;
            }
        }
        evicted
    }

    /// The checkpointed sandboxes asked to resume, run by run, whose node is up.
    fn waiting_restores(&self) -> Vec<Want> {
        let mut wants = Vec::new();
        for job_id in &self.restores {
            let Some(job) = self.jobs.get(job_id) else {
                continue;
            };
            for (_, run) in job.runs.iter() {
                if run.state != SandboxState::Checkpointed || !run.restore {
                    continue;
                }
                let Some(node) = &run.node else { continue };
                if self
                    .nodes
                    .get(node)
                    .is_none_or(|n| n.state == NodeState::Down)
                {
                    continue;
                }
                wants.push(Want {
                    node: node.clone(),
                    priority: job.spec.priority,
                    want: run.resources.saturating_mul(u64::from(run.count)),
                    count: run.count,
                });
            }
        }
        wants
    }

    /// What could be evicted on `node`, in victim order.
    fn victims_on(&self, node: &str, index: u64, params: PlacementParams) -> Vec<Victim> {
        let cooling = |job: JobId| {
            self.preempted_at
                .get(&job)
                .is_some_and(|&at| index < at.saturating_add(params.preemption_cooldown_entries))
        };
        let mut out = Vec::new();
        for job in self.jobs.values() {
            if job.state.is_terminal() || job.spec.gang || cooling(job.id) {
                continue;
            }
            for (first, run) in job.runs.iter() {
                let evictable = run.state.is_active()
                    && !run.stop
                    && !run.checkpoint
                    && run.node.as_deref() == Some(node);
                if evictable {
                    out.push(Victim {
                        job: job.id,
                        first,
                        count: run.count,
                        per: run.resources,
                        priority: job.spec.priority,
                    });
                }
            }
        }
        out.sort_by_key(|v| {
            (
                v.priority,
                Reverse(v.per.cpu_millis.max(v.per.memory_mib)),
                Reverse(v.job),
                Reverse(v.first),
            )
        });
        out
    }
}
