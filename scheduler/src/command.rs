//! The commands the replicated state machine applies, and what applying them returns.
//!
//! Commands are the only way the state changes. They carry everything nondeterministic that
//! apply needs (the proposer's clock reading `at_ms`); ids are derived from the log index.
//! New commands are only ever appended to the enum: an older replica that meets one it cannot
//! decode rejects it the same way on every replica, leaving its state unchanged.

use serde::{Deserialize, Serialize};

use crate::model::{Job, JobId, JobSpec, NodeSpec, NodeState, Resources};
use crate::outcomes::OutcomeReport;
use crate::placement::Plan;
use crate::runs::SandboxState;

/// A node's report about a range of one job's sandboxes (the leader coalesces per-sandbox
/// reports into ranges before proposing them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRange {
    pub node: String,
    pub job: JobId,
    pub first: u32,
    pub count: u32,
    pub generation: u64,
    pub state: SandboxState,
    pub exit_code: i32,
    /// A new reservation per sandbox (the node grew it to prevent an OOM).
    pub resources: Option<Resources>,
}

/// In a [`StatusRange`] with state `Checkpointed`, `exit_code` carries the image's size in KiB
/// (no process exited; the range keeps its old layout in the log).
pub fn image_kib_code(image_bytes: u64) -> i32 {
    i32::try_from(image_bytes.div_ceil(1024)).unwrap_or(i32::MAX)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register a node, or update a registered node's declaration (same id).
    RegisterNode {
        node: NodeSpec,
        at_ms: u64,
    },
    /// Submit a job; `(tenant, idempotency_key)` identifies it across retries.
    SubmitJob {
        spec: JobSpec,
        idempotency_key: String,
        at_ms: u64,
    },
    CancelJob {
        job_id: JobId,
        at_ms: u64,
    },
    /// A plan the leader computed at `plan.at_index`; apply re-checks it against the state at
    /// its own index and commits only what still fits. `reasons` are the pending reasons of jobs
    /// the plan could not (fully) place.
    ApplyPlan {
        plan: Plan,
        reasons: Vec<(JobId, String)>,
        at_ms: u64,
    },
    /// Batched sandbox state changes from nodes.
    ReportStatus {
        reports: Vec<StatusRange>,
        at_ms: u64,
    },
    /// A liveness transition (the leader's TTL) or an operator's drain.
    SetNodeState {
        node: String,
        state: NodeState,
        at_ms: u64,
    },
    /// Set (`Some`) or clear (`None`) a tenant's quota.
    SetQuota {
        tenant: String,
        max: Option<Resources>,
    },
    /// Pause/resume or resize sandboxes `first..first+count` of a job.
    SetSandboxes {
        job_id: JobId,
        first: u32,
        count: u32,
        paused: Option<bool>,
        resources: Option<Resources>,
    },
    /// Stop sandboxes `first..first+count` of a job (`surge stop`): their nodes stop them
    /// gracefully (SIGTERM, grace, SIGKILL) and they end `Stopped`, not `Failed`.
    StopSandboxes {
        job_id: JobId,
        first: u32,
        count: u32,
        at_ms: u64,
    },
    /// `ReportStatus` plus how sandboxes ended in words (messages and output tails, bounded:
    /// see `outcomes`). Leaders of this version propose this one; `ReportStatus` stays for
    /// entries written before it.
    ReportStatusOutcomes {
        reports: Vec<StatusRange>,
        outcomes: Vec<OutcomeReport>,
        at_ms: u64,
    },
    /// Several encoded commands in one log entry (group commit of the job API, see
    /// `service::batch`). Each is applied as if it were its own entry at this index, with its
    /// own reply; a batch inside a batch, or more than [`BATCH_COMMANDS_MAX`] commands, is
    /// refused whole.
    Batch {
        commands: Vec<Vec<u8>>,
    },
    /// Exec or file calls on these sandboxes, as nodes reported them: their idle clocks restart
    /// at `at_ms` (the leader's clock; it proposes one such entry per
    /// [`TOUCH_INTERVAL_MS`](crate::lifetime::TOUCH_INTERVAL_MS) at most). Ranges are
    /// `(job, first, count)`.
    Touch {
        ranges: Vec<(JobId, u32, u32)>,
        at_ms: u64,
    },
    /// The owner is alive: renew the job's lease, and when `ttl_ms` is given, let sandboxes
    /// `first..first+count` live `ttl_ms` from `at_ms`.
    Keepalive {
        job_id: JobId,
        first: u32,
        count: u32,
        ttl_ms: Option<u64>,
        at_ms: u64,
    },
    /// The leader found these deadlines passed at `at_ms`: stop the sandboxes (as `surge stop`
    /// does), recording why. Apply checks each deadline again at `at_ms`, so one moved by a
    /// keepalive committed in between is not stopped.
    Expire {
        expiries: Vec<crate::lifetime::Expiry>,
        at_ms: u64,
    },
    /// Cancel every job not yet ended whose labels match `selector` (not empty), of `tenant`
    /// only when given (a tenant's token cancels its own jobs only).
    CancelJobs {
        tenant: Option<String>,
        selector: std::collections::BTreeMap<String, String>,
        at_ms: u64,
    },
    /// `surge pause --checkpoint`: the running or paused sandboxes `first..first+count` are
    /// dumped to their nodes' disks and stop holding resources (see `state::checkpoint`).
    Checkpoint {
        job_id: JobId,
        first: u32,
        count: u32,
        at_ms: u64,
    },
    /// `surge resume` of checkpointed sandboxes: restore them on their nodes (paused when
    /// `paused`), now or when there is room.
    Restore {
        job_id: JobId,
        first: u32,
        count: u32,
        paused: bool,
        at_ms: u64,
    },
    /// `surge fork`: a new job of `count` sandboxes restored side by side from a checkpoint of
    /// the running sandbox `index` of `job_id`, on its node (see `state::fork`). `tenant`: the
    /// caller's (`None`: an admin), who must own the source.
    Fork {
        job_id: JobId,
        index: u32,
        count: u32,
        tenant: Option<String>,
        idempotency_key: String,
        at_ms: u64,
    },
    /// A [`Command::Fork`] whose job also gets the caller's `labels` and owner lease (the SDK's
    /// owner label and lease: a crashed client's forks end `lease-lost`). Its own variant, last,
    /// so that `Fork` entries already in a log still decode.
    ForkOwned {
        job_id: JobId,
        index: u32,
        count: u32,
        tenant: Option<String>,
        idempotency_key: String,
        labels: std::collections::BTreeMap<String, String>,
        lease_ms: u64,
        at_ms: u64,
    },
}

/// Commands in one [`Command::Batch`], at most.
pub const BATCH_COMMANDS_MAX: usize = 1_024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    NodeRegistered,
    /// `created` is false when the idempotency key matched an existing job.
    JobSubmitted {
        job_id: JobId,
        created: bool,
    },
    JobCancelled {
        job: Box<Job>,
    },
    PlanApplied {
        placed: u64,
        preempted: u64,
        rejected: u64,
    },
    StatusApplied {
        applied: u64,
        ignored: u64,
    },
    Done,
    /// The command was refused; the state is unchanged.
    Rejected(Rejection),
    /// One reply per command of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
    /// The jobs a [`Command::CancelJobs`] cancelled (the first
    /// [`CANCELLED_IDS_MAX`] ids; `count` is all of them).
    JobsCancelled {
        count: u64,
        job_ids: Vec<JobId>,
    },
    /// Sandboxes an [`Command::Expire`] asked to stop.
    Expired {
        stopped: u64,
    },
}

/// Job ids listed in one [`Response::JobsCancelled`], at most.
pub const CANCELLED_IDS_MAX: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no job {0}")]
    NoSuchJob(JobId),
    #[error("no node {0}")]
    NoSuchNode(String),
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("this replica cannot decode the command (written by a newer surge?): {0}")]
    Undecodable(String),
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        surge_raft::codec::to_bytes(self)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        surge_raft::codec::to_bytes(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, surge_raft::codec::CodecError> {
        surge_raft::codec::from_bytes(bytes)
    }
}
