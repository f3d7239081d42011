//! The replicated cluster state and its deterministic `apply`.
//!
//! `apply.rs` applies each command (`ClusterState::apply_command`, pure: the same state, index
//! and command give the same result on every replica), `report.rs` the node daemons' status
//! reports, and `query.rs` answers the reads the leader and the services make of it (placement
//! input, nodes' desired sets, usage).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::{Command, Rejection, Response};
use crate::model::{Job, JobId, Node, Resources};

mod apply;
mod checkpoint;
mod lifetime;
pub use lifetime::{expiries, tracks_idle};
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod lifetime_tests;
mod query;
mod report;
mod restore_room;
#[cfg(test)]
mod restore_room_tests;
#[cfg(test)]
pub(crate) mod tests;

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
    /// Jobs not yet ended that have a lifetime (TTL, idle timeout or lease) or a TTL set by a
    /// keepalive: the only jobs the leader looks at for deadlines, so a cycle never walks every
    /// job (see `lifetime`).
    #[serde(default)]
    pub lifetimes: std::collections::BTreeSet<JobId>,
    /// Jobs with a checkpointed sandbox waiting to be restored (room on its node): the only
    /// jobs `try_restores` looks at (see `checkpoint`).
    #[serde(default)]
    pub restores: std::collections::BTreeSet<JobId>,
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
    /// Checkpoint it to disk (or keep its checkpoint: it is saved and not to be restored yet).
    pub checkpoint: bool,
    pub resources: Resources,
}

impl ClusterState {
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

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), surge_raft::RestoreError> {
        *self =
            surge_raft::codec::from_bytes(snapshot).map_err(|source| surge_raft::RestoreError {
                what: "scheduler state",
                source,
            })?;
        Ok(())
    }

    fn state_hash(&self) -> String {
        self.hash()
    }
}
