//! `surge.node.NodeApi`: node registration and listing.
//!
//! Heartbeats, assignment watches, status reports and drain belong to the scheduling loop and the
//! node daemon (their own issues); until those land these calls answer `Unimplemented` and say so.

use std::pin::Pin;

use futures::Stream;
use surge_proto::node as pn;
use surge_proto::node::node_api_server::{NodeApi, NodeApiServer};
use tonic::{Request, Response, Status};

use super::{invalid, now_ms, propose, Replica};
use crate::command::Command;
use crate::convert;

pub struct NodesService {
    replica: Replica,
}

impl NodesService {
    pub fn new(replica: Replica) -> Self {
        NodesService { replica }
    }

    pub fn into_server(self) -> NodeApiServer<Self> {
        NodeApiServer::new(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not available in this version of surge"))
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<pn::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl NodeApi for NodesService {
    async fn register_node(
        &self,
        req: Request<pn::RegisterNodeRequest>,
    ) -> Result<Response<pn::RegisterNodeReply>, Status> {
        let node = convert::node_spec_from_pb(req.into_inner()).map_err(invalid)?;
        let (index, _) = propose(
            &self.replica,
            Command::RegisterNode {
                node,
                at_ms: now_ms(),
            },
        )
        .await?;
        Ok(Response::new(pn::RegisterNodeReply {
            index,
            heartbeat_interval_ms: 1_000,
            ttl_ms: 10_000,
        }))
    }

    async fn heartbeat(
        &self,
        _req: Request<pn::HeartbeatRequest>,
    ) -> Result<Response<pn::HeartbeatReply>, Status> {
        Err(not_yet("Heartbeat"))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        _req: Request<pn::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        Err(not_yet("WatchAssignments"))
    }

    async fn report_status(
        &self,
        _req: Request<pn::ReportStatusRequest>,
    ) -> Result<Response<pn::ReportStatusReply>, Status> {
        Err(not_yet("ReportStatus"))
    }

    async fn list_nodes(
        &self,
        _req: Request<pn::ListNodesRequest>,
    ) -> Result<Response<pn::ListNodesReply>, Status> {
        self.replica.linearizable_read().await?;
        let nodes = self
            .replica
            .read(|s, _| s.nodes.values().map(convert::node_to_pb).collect());
        Ok(Response::new(pn::ListNodesReply { nodes }))
    }

    async fn drain_node(
        &self,
        _req: Request<pn::DrainNodeRequest>,
    ) -> Result<Response<pn::NodeInfo>, Status> {
        Err(not_yet("DrainNode"))
    }
}
