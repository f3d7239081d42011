//! Fork in the books (`surge fork JOB.INDEX --count N`): prepare once, roll out N times.
//!
//! ```text
//!  Fork cmd --checks--> new job (source's spec, count N, label surge-fork-of=JOB.INDEX,
//!     fork_of = the source), its sandboxes Checkpointed + restore + forking, pinned to the
//!     source's node --try_restores: room--> Placed (booked; the node forks them) --> Running
//!                                 --no room--> they wait there, `note` says why
//! ```
//!
//! A waiting fork is a checkpointed sandbox whose image is not made yet: the restore machinery
//! (`checkpoint`) pins it to its node, books it as soon as there is room and ends it `node-lost`
//! if the node goes. The node makes the checkpoint when it starts the first fork (the source
//! keeps running). Refused with one line: a count of 0 or over [`FORK_COUNT_MAX`], a source that
//! is not running, another tenant's source (as "no job", like every read), a node that cannot
//! checkpoint, and forks that could never fit on that node all together.

use crate::command::{Rejection, Response};
use crate::model::{ForkOf, JobId, NodeState};
use crate::runs::SandboxState;

use super::ClusterState;

/// Sandboxes one fork makes, at most.
pub const FORK_COUNT_MAX: u32 = 64;
/// The label naming a fork job's origin (`JOB.INDEX`).
pub const FORK_LABEL: &str = "surge-fork-of";

/// What a `Command::Fork` asks for.
pub struct ForkRequest {
    pub job_id: JobId,
    pub index: u32,
    pub count: u32,
    pub tenant: Option<String>,
    pub idempotency_key: String,
    /// Added to the source's labels (`surge-fork-of` wins).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The fork job's owner lease (0: none).
    pub lease_ms: u64,
}

impl ClusterState {
    /// Check a fork, then submit its job and ask for its restores (see the module docs).
    pub(super) fn fork_sandbox(&mut self, index: u64, req: ForkRequest, at_ms: u64) -> Response {
        let refuse = |why: String| Response::Rejected(Rejection::Invalid(why));
        let source = format!("{}.{}", req.job_id, req.index);
        if req.count == 0 || req.count > FORK_COUNT_MAX {
            return refuse(format!(
                "fork of {source}: {} forks; one fork makes 1 to {FORK_COUNT_MAX}",
                req.count
            ));
        }
        let Some(job) = self
            .jobs
            .get(&req.job_id)
            .filter(|j| req.tenant.as_ref().is_none_or(|t| *t == j.spec.tenant))
        else {
            return Response::Rejected(Rejection::NoSuchJob(req.job_id));
        };
        let Some((_, run)) = job.runs.get(req.index) else {
            return refuse(format!(
                "fork of {source}: job {} has sandboxes 0..{}",
                req.job_id, job.spec.count
            ));
        };
        let Some(node_id) = run
            .node
            .clone()
            .filter(|_| run.state == SandboxState::Running && !run.stop && !run.checkpoint)
        else {
            return refuse(format!(
                "fork of {source}: it is {}; only a running sandbox can be forked",
                run.state.as_str()
            ));
        };
        let Some(node) = self.nodes.get(&node_id) else {
            return refuse(format!(
                "fork of {source}: node {node_id} is not registered"
            ));
        };
        if let Some(why) = super::checkpoint::cannot_checkpoint(node) {
            return refuse(format!("fork of {source}: {why}"));
        }
        if node.state == NodeState::Down {
            return refuse(format!("fork of {source}: its node {node_id} is down"));
        }
        let per = run.resources;
        let all = per.saturating_mul(u64::from(req.count));
        let cap = node.spec.allocatable;
        let max = node.spec.max_sandboxes;
        if !all.fits_in(&cap) || (max > 0 && req.count > max) {
            return refuse(format!(
                "fork of {source}: {} forks can never fit on node {node_id} (they need {all}; it has {cap}{}); ask for fewer",
                req.count,
                if max > 0 { format!(", at most {max} sandboxes") } else { String::new() }
            ));
        }
        let mut spec = job.spec.clone();
        spec.count = req.count;
        spec.per_sandbox = per;
        spec.name = format!("fork-of-{}-{}", req.job_id, req.index);
        spec.gang = false;
        spec.restart = crate::model::RestartPolicy::default();
        spec.lifetime.lease_ms = req.lease_ms;
        spec.labels.extend(req.labels);
        spec.labels.insert(FORK_LABEL.to_owned(), source.clone());
        if let Err(e) = crate::validate::labels(&spec.labels)
            .and_then(|()| crate::validate::lifetime(&spec.lifetime))
        {
            return refuse(format!("fork of {source}: {e}"));
        }
        spec.fork_of = Some(ForkOf {
            job_id: req.job_id,
            index: req.index,
        });
        let reply = self.submit_job(index, spec, req.idempotency_key, at_ms);
        let Response::JobSubmitted {
            job_id,
            created: true,
        } = reply
        else {
            return reply;
        };
        if let Some(fork) = self.jobs.get_mut(&job_id) {
            let total = fork.spec.count;
            fork.runs.update(0, total, |run| {
                run.state = SandboxState::Checkpointed;
                run.node = Some(node_id.clone());
                run.checkpoint = true;
                run.restore = true;
                run.forking = true;
                run.revision = index;
            });
            fork.refresh(index, at_ms);
            self.restores.insert(job_id);
        }
        reply
    }
}
