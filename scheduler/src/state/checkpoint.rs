//! Checkpoint and restore in the books ("close the lid" for real).
//!
//! ```text
//!  Running|Paused --Checkpoint cmd--> (checkpoint=true; node dumps) --node: checkpointed-->
//!  Checkpointed (holds nothing; pinned to its node) --resume--> restore=true
//!     --try_restores: node up and room--> Placed (books it again; node restores) --> Running
//!     --node down or gone--> Lost (node-lost)
//!     --no room--> preempts strictly lower priority work there (`restore_room`), else waits,
//!                  `note` says why
//!  a failed dump: the node says so (an outcome note); checkpoint=false, it keeps running
//! ```
//!
//! A checkpointed sandbox is never `Pending`, so placement never moves it: its image lives on
//! one node, and restoring it is a decision made here, against that node only. Restores that
//! wait are retried after every command that may free room (`try_restores`), over the jobs in
//! `ClusterState::restores` only.

use std::collections::BTreeSet;

use crate::command::{Rejection, Response};
use crate::model::{JobId, NodeState};
use crate::runs::{Run, SandboxState};

use super::ClusterState;

/// Why a node cannot checkpoint, from what it registered.
pub(super) fn cannot_checkpoint(node: &crate::model::Node) -> Option<String> {
    if node
        .spec
        .labels
        .get("checkpoint")
        .is_some_and(|v| v == "true")
    {
        return None;
    }
    Some(match node.spec.runtime.as_str() {
        "krun" => format!(
            "node {} cannot checkpoint: krun microVMs have no snapshots (libkrun has no snapshot API and CRIU cannot dump a KVM process); plain `surge pause` works",
            node.spec.id
        ),
        "sim" => format!("node {} cannot checkpoint: it runs simulated sandboxes", node.spec.id),
        _ => format!(
            "node {} cannot checkpoint: no usable CRIU there (run scripts/setup-criu on it; `surge nodes` shows which nodes can); plain `surge pause` works",
            node.spec.id
        ),
    })
}

impl ClusterState {
    /// `surge pause --checkpoint`: ask the nodes of the running or paused sandboxes
    /// `first..first+count` to dump them. Refused whole, with the reason, when one of their
    /// nodes cannot checkpoint or none of them runs.
    pub(super) fn checkpoint_sandboxes(
        &mut self,
        index: u64,
        job_id: JobId,
        first: u32,
        count: u32,
    ) -> Response {
        let Some(job) = self.jobs.get(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if let Some(refusal) = super::apply::out_of_range(job, first, count) {
            return refusal;
        }
        let end = u64::from(first) + u64::from(count);
        let mut nodes = BTreeSet::new();
        for (f, run) in job.runs.iter() {
            let hi = u64::from(f) + u64::from(run.count);
            if hi <= u64::from(first) || u64::from(f) >= end {
                continue;
            }
            let live = matches!(run.state, SandboxState::Running | SandboxState::Paused);
            if let (true, false, Some(n)) = (live, run.stop, &run.node) {
                nodes.insert(n.clone());
            }
        }
        if nodes.is_empty() {
            return Response::Rejected(Rejection::Invalid(format!(
                "no sandbox of job {job_id} in {first}..{end} is running or paused; only those can be checkpointed"
            )));
        }
        if let Some(why) = self.forks_to_make(job_id, first, end) {
            return Response::Rejected(Rejection::Invalid(why));
        }
        for n in &nodes {
            let why = match self.nodes.get(n) {
                Some(node) => cannot_checkpoint(node),
                None => Some(format!("node {n} is not registered")),
            };
            if let Some(why) = why {
                return Response::Rejected(Rejection::Invalid(why));
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        job.runs.update(first, count, |run| {
            if matches!(run.state, SandboxState::Running | SandboxState::Paused) && !run.stop {
                run.checkpoint = true;
                run.restore = false;
                run.note.clear();
                run.revision = index;
            }
        });
        for n in nodes {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        Response::Done
    }

    /// Why sandboxes `first..end` of `job_id` cannot be checkpointed yet: forks of one of them
    /// are not made (waiting for room, or booked and not running yet). The node makes a fork
    /// from a checkpoint of its *running* source when it starts it; a source dumped and stopped
    /// before that leaves the fork nothing to fork. Scans the live fork jobs (rare: forks and
    /// checkpoints are operator commands).
    fn forks_to_make(&self, job_id: JobId, first: u32, end: u64) -> Option<String> {
        for fork in self.jobs.values() {
            let Some(of) = fork
                .spec
                .fork_of
                .filter(|o| o.job_id == job_id && o.index >= first && u64::from(o.index) < end)
            else {
                continue;
            };
            if fork.state.is_terminal() {
                continue;
            }
            let unmade: u32 = fork
                .runs
                .iter()
                .filter(|(_, r)| {
                    !r.stop
                        && (r.state == SandboxState::Placed
                            || (r.state == SandboxState::Checkpointed && r.forking))
                })
                .map(|(_, r)| r.count)
                .sum();
            if unmade > 0 {
                return Some(format!(
                    "checkpoint of {job_id}.{}: {unmade} of its forks (job {}) are not made yet, and each is made from the running sandbox; checkpoint it once they run, or stop them",
                    of.index, fork.id
                ));
            }
        }
        None
    }

    /// `surge resume` of checkpointed sandboxes: restore them where their images are, now or
    /// as soon as there is room. `paused`: restore them paused.
    pub(super) fn request_restores(
        &mut self,
        index: u64,
        job_id: JobId,
        first: u32,
        count: u32,
        paused: bool,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let mut any = false;
        job.runs.update(first, count, |run| {
            if run.state == SandboxState::Checkpointed && !run.restore {
                run.restore = true;
                run.paused = paused;
                run.revision = index;
                any = true;
            }
        });
        if any {
            self.restores.insert(job_id);
        }
    }

    /// Restore the waiting checkpointed sandboxes whose nodes have room, as many of each range
    /// as fit (a range is split: the first ones go, the others wait); end those whose node is
    /// gone (`node-lost`); the others keep waiting with a reason.
    pub(super) fn try_restores(&mut self, index: u64, at_ms: u64) {
        if self.restores.is_empty() {
            return;
        }
        // A full node makes room by preempting lower priority work (`restore_room`).
        self.preempt_for_restores(index, at_ms, crate::placement::PlacementParams::default());
        let mut usage = self.node_usage();
        let jobs: Vec<JobId> = self.restores.iter().copied().collect();
        let mut touched = BTreeSet::new();
        for job_id in jobs {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                self.restores.remove(&job_id);
                continue;
            };
            let waiting_runs: Vec<(u32, Run)> = job
                .runs
                .iter()
                .filter(|(_, r)| r.state == SandboxState::Checkpointed && r.restore)
                .map(|(f, r)| (f, r.clone()))
                .collect();
            let mut waiting = false;
            for (first, run) in waiting_runs {
                let Some(name) = run.node.clone() else {
                    job.runs.update(first, run.count, |r| {
                        r.state = SandboxState::Lost;
                        r.revision = index;
                    });
                    continue;
                };
                let node = self.nodes.get(&name).filter(|n| n.state != NodeState::Down);
                let Some(node) = node else {
                    // Its image is on a node that is gone: nothing can bring it back.
                    job.runs.update(first, run.count, |r| {
                        r.state = SandboxState::Lost;
                        r.note = format!(
                            "node-lost: its checkpoint was on node {name}, which is down or gone"
                        );
                        r.revision = index;
                    });
                    touched.insert(name);
                    continue;
                };
                let u = usage.entry(name.clone()).or_default();
                let cap = node.spec.allocatable;
                let free = cap.saturating_sub(u.allocated);
                let mut fit = free.count_fitting(&run.resources).min(u64::from(run.count));
                if node.spec.max_sandboxes > 0 {
                    let slots = node.spec.max_sandboxes.saturating_sub(u.sandboxes);
                    fit = fit.min(u64::from(slots));
                }
                let fit = u32::try_from(fit).expect("at most run.count");
                if fit > 0 {
                    u.allocated = u
                        .allocated
                        .saturating_add(run.resources.saturating_mul(u64::from(fit)));
                    u.sandboxes = u.sandboxes.saturating_add(fit);
                    job.runs.update(first, fit, |r| {
                        r.state = SandboxState::Placed;
                        r.checkpoint = false;
                        r.restore = false;
                        r.forking = false;
                        r.note.clear();
                        r.revision = index;
                    });
                    touched.insert(name.clone());
                }
                if fit < run.count {
                    let note = format!(
                        "waiting for room on node {name} (its checkpoint is there): needs {} each, {} free",
                        run.resources,
                        cap.saturating_sub(u.allocated)
                    );
                    job.runs.update(first + fit, run.count - fit, |r| {
                        if r.note != note {
                            r.note.clone_from(&note);
                            r.revision = index;
                        }
                    });
                    waiting = true;
                }
            }
            job.refresh(index, at_ms);
            if !waiting {
                self.restores.remove(&job_id);
            }
        }
        for n in touched {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
    }
}
