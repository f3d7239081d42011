//! The commands the replicated state machine applies, and what applying them returns.
//!
//! Commands are the only way the state changes. They carry everything nondeterministic that
//! apply needs (the proposer's clock reading `at_ms`); ids are derived from the log index.
//! New commands are only ever appended to the enum: an older replica that meets one it cannot
//! decode rejects it the same way on every replica, leaving its state unchanged.

use serde::{Deserialize, Serialize};

use crate::model::{Job, JobId, JobSpec, NodeSpec};

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
}

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
    /// The command was refused; the state is unchanged.
    Rejected(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no job {0}")]
    NoSuchJob(JobId),
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
