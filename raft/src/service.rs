//! The gRPC services every replica serves: the Raft transport and the cluster API.
//! This is the only place where [`ClusterError`] becomes a [`tonic::Status`].

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use surge_proto::cluster::cluster_server::{Cluster, ClusterServer};
use surge_proto::cluster::{
    AddMemberRequest, MembershipReply, PingReply, PingRequest, ProposeReply, ProposeRequest,
    ReadIndexReply, ReadIndexRequest, RemoveMemberRequest, StatusReply, StatusRequest,
};
use surge_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use surge_proto::raft::{RaftReply, RaftRequest};
use tonic::{Request, Response, Status};

use crate::codec;
use crate::node::{ClusterError, RaftNode};
use crate::types::{StateMachine, TypeConfig};

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        let msg = e.to_string();
        match e {
            ClusterError::NoLeader | ClusterError::ShuttingDown => Status::unavailable(msg),
            ClusterError::Timeout(_) => Status::deadline_exceeded(msg),
            ClusterError::TooLarge(_) => Status::resource_exhausted(msg),
            ClusterError::WrongCluster { .. } | ClusterError::ForwardLoop(_) => {
                Status::failed_precondition(msg)
            }
            ClusterError::Rejected(_) => Status::failed_precondition(msg),
            ClusterError::Remote { status, .. } => status,
        }
    }
}

/// Serves openraft's RPCs to the other replicas.
pub struct RaftTransportService<S: StateMachine> {
    node: Arc<RaftNode<S>>,
}

impl<S: StateMachine> RaftTransportService<S> {
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<T, Status> {
        let req = req.into_inner();
        self.node.check_cluster(&req.cluster_id)?;
        if !self.node.accepts_raft_traffic() {
            return Err(Status::unavailable(
                "this replica is empty and waiting to be added to the cluster",
            ));
        }
        codec::from_bytes(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
    }
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply {
        payload: codec::to_bytes(value),
    }))
}

#[tonic::async_trait]
impl<S: StateMachine> RaftTransport for RaftTransportService<S> {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.decode(req)?;
        self.node.heard_leader();
        let answer = self.node.raft().append_entries(rpc).await;
        self.node.appended();
        reply(&answer)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<u64> = self.decode(req)?;
        reply(&self.node.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self.decode(req)?;
        reply(&self.node.raft().install_snapshot(rpc).await)
    }

    async fn timeout_now(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: crate::node::TimeoutNow = self.decode(req)?;
        reply(&self.node.timeout_now(&rpc).await)
    }
}

/// Serves status, membership and the replicas' internal forwarding calls.
pub struct ClusterService<S: StateMachine> {
    node: Arc<RaftNode<S>>,
}

impl<S: StateMachine> ClusterService<S> {
    /// An empty replica waiting to be (re-)added knows no leader and no state: calls that need
    /// the cluster are refused at once, so a peer that still takes it for the leader (it may be
    /// a wiped leader restarted at the same address) retries elsewhere instead of waiting here.
    fn check_serving(&self) -> Result<(), Status> {
        if self.node.accepts_raft_traffic() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this replica is empty and waiting to be added to the cluster",
            ))
        }
    }
}

#[tonic::async_trait]
impl<S: StateMachine> Cluster for ClusterService<S> {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(self.node.status().await))
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let (last_log_term, last_log_index) = self.node.last_log();
        Ok(Response::new(PingReply {
            last_log_term,
            last_log_index,
            id: self.node.id(),
            cluster_id: self.node.cluster_id().to_string(),
            applied_index: self.node.applied_index(),
        }))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.check_serving()?;
        let req = req.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("replica ids start at 1"));
        }
        validate_address(&req.address)?;
        Ok(Response::new(
            self.node.add_member(req.id, req.address, req.voter).await?,
        ))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.check_serving()?;
        Ok(Response::new(
            self.node.remove_member(req.into_inner().id).await?,
        ))
    }

    async fn propose(
        &self,
        req: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        self.check_serving()?;
        let req = req.into_inner();
        self.node.check_cluster(&req.cluster_id)?;
        let p = self.node.propose_with_hops(req.command, req.hops).await?;
        Ok(Response::new(ProposeReply {
            response: p.reply,
            index: p.index,
        }))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        self.check_serving()?;
        self.node.check_cluster(&req.into_inner().cluster_id)?;
        Ok(Response::new(ReadIndexReply {
            index: self.node.leader_read_index().await?,
        }))
    }
}

/// A replica address is `host:port`.
pub fn validate_address(addr: &str) -> Result<(), Status> {
    let ok = addr.len() <= 256
        && addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "bad replica address {addr:?}: expected HOST:PORT"
        )))
    }
}

/// The tonic services of a replica, ready to add to a server.
pub fn services<S: StateMachine>(
    node: Arc<RaftNode<S>>,
) -> (
    RaftTransportServer<RaftTransportService<S>>,
    ClusterServer<ClusterService<S>>,
) {
    let transport = RaftTransportServer::new(RaftTransportService { node: node.clone() })
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX);
    let cluster = ClusterServer::new(ClusterService { node })
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX);
    (transport, cluster)
}
