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
use crate::runs::SandboxState;

use super::ClusterState;

/// Why a node cannot checkpoint, from what it registered.
fn cannot_checkpoint(node: &crate::model::Node) -> Option<String> {
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

    /// Restore the waiting checkpointed sandboxes whose nodes have room; end those whose node
    /// is gone (`node-lost`); the others keep waiting with a reason.
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
            let total = job.spec.count;
            let mut waiting = false;
            let nodes = &self.nodes;
            job.runs.update(0, total, |run| {
                if run.state != SandboxState::Checkpointed || !run.restore {
                    return;
                }
                let Some(name) = run.node.clone() else {
                    run.state = SandboxState::Lost;
                    run.revision = index;
                    return;
                };
                let node = nodes.get(&name).filter(|n| n.state != NodeState::Down);
                let Some(node) = node else {
                    // Its image is on a node that is gone: nothing can bring it back.
                    run.state = SandboxState::Lost;
                    run.note = format!("node-lost: its checkpoint was on node {name}, which is down or gone");
                    run.revision = index;
                    touched.insert(name);
                    return;
                };
                let want = run.resources.saturating_mul(u64::from(run.count));
                let u = usage.entry(name.clone()).or_default();
                let cap = node.spec.allocatable;
                let fits = u.allocated.saturating_add(want).fits_in(&cap)
                    && (node.spec.max_sandboxes == 0
                        || u.sandboxes.saturating_add(run.count) <= node.spec.max_sandboxes);
                if fits {
                    u.allocated = u.allocated.saturating_add(want);
                    u.sandboxes = u.sandboxes.saturating_add(run.count);
                    run.state = SandboxState::Placed;
                    run.checkpoint = false;
                    run.restore = false;
                    run.note.clear();
                    run.revision = index;
                    touched.insert(name);
                } else {
                    let note = format!(
                        "waiting for room on node {name} (its checkpoint is there): needs {want}, {} free",
                        cap.saturating_sub(u.allocated)
                    );
                    if run.note != note {
                        run.note = note;
                        run.revision = index;
                    }
                    waiting = true;
                }
            });
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
