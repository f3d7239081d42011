//! The gRPC services of the scheduler. Requests are validated and converted here; errors become
//! [`tonic::Status`] only in these files.

pub mod batch;
pub mod decode_status;
pub mod error;
pub mod guard;
pub mod hub;
pub mod io_proxy;
pub mod jobs;
pub mod lifetimes;
pub mod nodes;
pub mod template_copy;

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
    answered(proposed.index, Response::decode(&proposed.reply))
}

/// What applying a command at `index` returned; the state machine's refusal is an error.
pub fn answered(
    index: u64,
    response: Result<Response, surge_raft::codec::CodecError>,
) -> Result<(u64, Response), Status> {
    match response {
        Ok(Response::Rejected(r)) => Err(rejection(r)),
        Ok(r) => Ok((index, r)),
        Err(e) => Err(Status::internal(format!(
            "undecodable reply from the state machine: {e}"
        ))),
    }
}
