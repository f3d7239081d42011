//! The gRPC services of the scheduler. Requests are validated and converted here; errors become
//! [`tonic::Status`] only in these files.

pub mod decode_status;
pub mod guard;
pub mod hub;
pub mod jobs;
pub mod nodes;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use surge_raft::RaftNode;
use tonic::Status;

use crate::command::{Command, Rejection, Response};
use crate::state::ClusterState;
use crate::validate::Invalid;

pub type Replica = Arc<RaftNode<ClusterState>>;

/// The proposer's clock reading; it travels inside the command (apply never reads a clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn invalid(e: Invalid) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn rejection(r: Rejection) -> Status {
    match r {
        Rejection::NoSuchJob(_) | Rejection::NoSuchNode(_) => Status::not_found(r.to_string()),
        Rejection::Invalid(_) => Status::invalid_argument(r.to_string()),
        Rejection::Undecodable(_) => Status::failed_precondition(r.to_string()),
    }
}

/// Propose a command through the replicated log and decode what applying it returned.
pub async fn propose(replica: &Replica, command: Command) -> Result<(u64, Response), Status> {
    let proposed = replica.propose(command.encode()).await?;
    let response = Response::decode(&proposed.reply)
        .map_err(|e| Status::internal(format!("undecodable reply from the state machine: {e}")))?;
    match response {
        Response::Rejected(r) => Err(rejection(r)),
        r => Ok((proposed.index, r)),
    }
}
