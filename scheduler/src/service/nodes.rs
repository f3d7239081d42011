//! `surge.node.NodeApi`: how node daemons register, stay alive, learn their sandboxes and
//! report them; plus listing and draining nodes.
//!
//! Any replica serves any call. Watches are served from the replica's own applied state;
//! heartbeats and status reports belong to the leader's memory and batcher, so a follower
//! forwards them to the leader.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use surge_proto::node as pn;
use surge_proto::node::node_api_client::NodeApiClient;
use surge_proto::node::node_api_server::{NodeApi, NodeApiServer};
use tonic::{Request, Response, Status};

use super::hub::AssignmentHub;
use super::{invalid, now_ms, propose, Replica};
use crate::command::Command;
use crate::convert;
use crate::leader::{self, Leader};
use crate::model::{NodeState, Resources};
use crate::outcomes::{self, OutcomeReport};
use crate::runs::SandboxState;
use crate::state::ClusterState;
use crate::validate;

/// Sandbox updates one ReportStatus may carry.
pub const REPORT_UPDATES_MAX: usize = 100_000;
/// Heartbeats one HeartbeatBatch may carry.
pub const HEARTBEAT_BATCH_MAX: usize = 10_000;
/// Assignment messages buffered per watching node.
pub const WATCH_BUFFER: usize = 4;
/// Longest a forwarded call to the leader may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NodesService {
    replica: Replica,
    leader: Arc<Leader>,
    hub: Arc<AssignmentHub>,
}

impl NodesService {
    /// Must be called inside the runtime: it starts the replica's assignment fan-out.
    pub fn new(replica: Replica, leader: Arc<Leader>) -> Self {
        let hub = AssignmentHub::start(replica.clone());
        NodesService {
            replica,
            leader,
            hub,
        }
    }

    pub fn into_server(self) -> NodeApiServer<Self> {
        NodeApiServer::new(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }

    /// A client of the leader's NodeApi, for forwarding.
    async fn to_leader(&self) -> Result<NodeApiClient<tonic::transport::Channel>, Status> {
        let (_, addr) = self.replica.wait_leader().await?;
        let channel = self
            .replica
            .peers()
            .channel(&addr)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(NodeApiClient::new(channel)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
    }
}

/// Whether heartbeats of `node` count: a node the state holds as ready or draining. Any other
/// (unknown, down) must register again.
fn is_live(s: &ClusterState, node: &str) -> bool {
    let state = s.nodes.get(node).map(|n| n.state);
    matches!(state, Some(NodeState::Ready | NodeState::Draining))
}

impl NodesService {
    /// Records one heartbeat of a live node in the leader's liveness table.
    fn beat(&self, b: &pn::HeartbeatRequest) {
        self.leader.heartbeat(
            &b.node_id,
            resources(b.used).unwrap_or_default(),
            b.sandboxes_running,
        );
    }
}

async fn forwarded<T>(
    fut: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    match tokio::time::timeout(FORWARD_TIMEOUT, fut).await {
        Err(_) => Err(Status::unavailable("the leader did not answer; retry")),
        Ok(r) => r,
    }
}

fn resources(r: Option<pn::Resources>) -> Option<Resources> {
    r.map(|r| Resources::new(r.cpu_millis, r.memory_mib))
}

fn state_of(s: i32) -> Result<SandboxState, Status> {
    match convert::sandbox_state_from_pb(s) {
        Some(st @ (SandboxState::Running
        | SandboxState::Paused
        | SandboxState::Succeeded
        | SandboxState::Failed
        | SandboxState::OomKilled
        | SandboxState::Lost
        | SandboxState::Stopped
        | SandboxState::Checkpointed)) => Ok(st),
        _ => Err(Status::invalid_argument(format!(
            "updates: sandbox state {s} is not one a node reports; use RUNNING, PAUSED, SUCCEEDED, FAILED, OOM_KILLED, LOST, STOPPED or CHECKPOINTED"
        ))),
    }
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<pn::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl NodeApi for NodesService {
    async fn register_node(
        &self,
        req: Request<pn::RegisterNodeRequest>,
    ) -> Result<Response<pn::RegisterNodeReply>, Status> {
        let node = convert::node_spec_from_pb(req.into_inner()).map_err(invalid)?;
        let id = node.id.clone();
        let (index, _) = propose(
            &self.replica,
            Command::RegisterNode {
                node,
                at_ms: now_ms(),
            },
        )
        .await?;
        self.leader.heartbeat(&id, Resources::default(), 0);
        Ok(Response::new(pn::RegisterNodeReply {
            index,
            heartbeat_interval_ms: leader::HEARTBEAT_INTERVAL_MS,
            ttl_ms: self.leader.node_ttl_ms,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pn::HeartbeatRequest>,
    ) -> Result<Response<pn::HeartbeatReply>, Status> {
        if !self.replica.is_leader() {
            let mut c = self.to_leader().await?;
            return forwarded(c.heartbeat(req.into_inner())).await;
        }
        let req = req.into_inner();
        validate::name("node_id", &req.node_id).map_err(invalid)?;
        let known = self.replica.read(|s, _| is_live(s, &req.node_id));
        if known {
            self.beat(&req);
        }
        Ok(Response::new(pn::HeartbeatReply { known }))
    }

    async fn heartbeat_batch(
        &self,
        req: Request<pn::HeartbeatBatchRequest>,
    ) -> Result<Response<pn::HeartbeatBatchReply>, Status> {
        if !self.replica.is_leader() {
            let mut c = self.to_leader().await?;
            return forwarded(c.heartbeat_batch(req.into_inner())).await;
        }
        let req = req.into_inner();
        if req.beats.len() > HEARTBEAT_BATCH_MAX {
            return Err(Status::resource_exhausted(format!(
                "{} heartbeats in one batch; at most {HEARTBEAT_BATCH_MAX}",
                req.beats.len()
            )));
        }
        // All or nothing: one bad node id refuses the batch before any heartbeat counts.
        for b in &req.beats {
            validate::name("node_id", &b.node_id).map_err(invalid)?;
        }
        // Who is live is read under the state's lock; the liveness table is written after it is
        // released (the two locks are never held together).
        let live: Vec<bool> = self
            .replica
            .read(|s, _| req.beats.iter().map(|b| is_live(s, &b.node_id)).collect());
        let mut replies = Vec::with_capacity(live.len());
        for (b, known) in req.beats.iter().zip(live) {
            if known {
                self.beat(b);
            }
            replies.push(pn::HeartbeatReply { known });
        }
        Ok(Response::new(pn::HeartbeatBatchReply { replies }))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<pn::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let req = req.into_inner();
        validate::name("node_id", &req.node_id).map_err(invalid)?;
        let node = req.node_id;
        if !self.replica.read(|s, _| s.nodes.contains_key(&node)) {
            return Err(Status::not_found(format!(
                "node {node} is not registered; register first"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let replica = self.replica.clone();
        let hub = self.hub.clone();
        // Woken only when this node's assignments change, not on every applied entry.
        let mut changed = self.hub.subscribe(&node);
        // Resuming from the revision the node already has: nothing to send until it changes.
        let mut sent_revision = req.from_revision;
        let mut first = req.from_revision == 0;
        // The revision the hub last woke this stream with (none yet: the first round reads the
        // state, whatever the hub may have left for an earlier stream of the node).
        let mut woken: Option<u64> = None;
        tokio::spawn(async move {
            loop {
                // What the hub built for this wake-up, if it did (many nodes moved at once).
                let prebuilt = woken
                    .and_then(|r| hub.take_prebuilt(&node, r))
                    .filter(|m| m.revision != sent_revision);
                let message = match prebuilt {
                    Some(m) => Some(Some(m)),
                    None => replica.read(|s, _| {
                        let revision = s.nodes.get(&node).map(|n| n.revision)?;
                        if !first && revision == sent_revision {
                            return Some(None);
                        }
                        Some(Some(convert::assignments_to_pb(s, &node, revision)))
                    }),
                };
                match message {
                    None => return, // the node was removed
                    Some(None) => {}
                    Some(Some(m)) => {
                        sent_revision = m.revision;
                        first = false;
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    moved = changed.changed() => if moved.is_err() { return },
                    _ = tx.closed() => return,
                }
                woken = Some(*changed.borrow_and_update());
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_status(
        &self,
        req: Request<pn::ReportStatusRequest>,
    ) -> Result<Response<pn::ReportStatusReply>, Status> {
        if !self.replica.is_leader() {
            let mut c = self.to_leader().await?;
            return forwarded(c.report_status(req.into_inner())).await;
        }
        let req = req.into_inner();
        validate::name("node_id", &req.node_id).map_err(invalid)?;
        if req.updates.len() > REPORT_UPDATES_MAX {
            return Err(Status::resource_exhausted(format!(
                "{} updates in one report; at most {REPORT_UPDATES_MAX}",
                req.updates.len()
            )));
        }
        if req.active.len() > crate::lifetime::TOUCH_RANGES_MAX {
            return Err(Status::resource_exhausted(format!(
                "{} active sandboxes in one report; at most {}",
                req.active.len(),
                crate::lifetime::TOUCH_RANGES_MAX
            )));
        }
        if !req.active.is_empty() {
            // A node vouches for activity on the sandboxes it holds only.
            let held: Vec<(u64, u32)> = self.replica.read(|s, _| {
                req.active
                    .iter()
                    .filter(|a| {
                        s.jobs.get(&a.job_id).is_some_and(|j| {
                            j.runs.get(a.index).is_some_and(|(_, r)| {
                                r.node.as_deref() == Some(req.node_id.as_str())
                            })
                        })
                    })
                    .map(|a| (a.job_id, a.index))
                    .collect()
            });
            self.leader.touch(held);
        }
        let mut updates = Vec::with_capacity(req.updates.len());
        let mut outcomes = Vec::new();
        for u in &req.updates {
            let state = state_of(u.state)?;
            let exit_code = if u.start_failed {
                crate::runs::EXIT_NOT_RUN
            } else if state == SandboxState::Checkpointed {
                crate::command::image_kib_code(u.image_bytes)
            } else {
                u.exit_code
            };
            // A live sandbox's message is a note (its checkpoint failed), kept on the run.
            let live_note = !state.is_terminal()
                && state != SandboxState::Checkpointed
                && !u.message.is_empty();
            if live_note || state.is_terminal() && (!u.log_tail.is_empty() || !u.message.is_empty())
            {
                outcomes.push(OutcomeReport {
                    node: req.node_id.clone(),
                    job: u.job_id,
                    index: u.index,
                    generation: u.generation,
                    state,
                    exit_code,
                    message: outcomes::head(&u.message, outcomes::MESSAGE_BYTES_MAX).to_owned(),
                    log_tail: outcomes::tail(&u.log_tail, outcomes::TAIL_BYTES_MAX).to_owned(),
                });
            }
            updates.push((
                u.job_id,
                u.index,
                u.generation,
                state,
                exit_code,
                resources(u.resources),
            ));
        }
        // At most REPORT_UPDATES_MAX (checked above), far below u32::MAX.
        let accepted = u32::try_from(updates.len()).unwrap_or(u32::MAX);
        let ranges = leader::coalesce(&req.node_id, updates);
        // Text the job would not keep (its slots hold failures already) never enters the log.
        if !outcomes.is_empty() {
            self.replica.read(|s, _| {
                outcomes.retain(|o| {
                    s.jobs.get(&o.job).is_some_and(|j| {
                        !o.state.is_terminal() || j.outcomes.would_keep(o.index, o.state)
                    })
                })
            });
        }
        if !ranges.is_empty() {
            self.leader
                .report(ranges, outcomes)
                .await
                .map_err(Status::unavailable)?;
        }
        Ok(Response::new(pn::ReportStatusReply { accepted }))
    }

    async fn list_nodes(
        &self,
        req: Request<pn::ListNodesRequest>,
    ) -> Result<Response<pn::ListNodesReply>, Status> {
        if !self.replica.is_leader() {
            // Usage lives in the leader's memory.
            if let Ok(mut c) = self.to_leader().await {
                if let Ok(r) = forwarded(c.list_nodes(req.into_inner())).await {
                    return Ok(r);
                }
            }
        }
        self.replica.linearizable_read().await?;
        let nodes = self.replica.read(|s, _| {
            let usage = s.node_usage();
            s.nodes
                .values()
                .map(|n| {
                    convert::node_to_pb(
                        n,
                        usage.get(&n.spec.id).copied().unwrap_or_default(),
                        self.leader.used(&n.spec.id),
                    )
                })
                .collect()
        });
        Ok(Response::new(pn::ListNodesReply { nodes }))
    }

    async fn drain_node(
        &self,
        req: Request<pn::DrainNodeRequest>,
    ) -> Result<Response<pn::NodeInfo>, Status> {
        let node = req.into_inner().node_id;
        validate::name("node_id", &node).map_err(invalid)?;
        propose(
            &self.replica,
            Command::SetNodeState {
                node: node.clone(),
                state: NodeState::Draining,
                at_ms: now_ms(),
            },
        )
        .await?;
        self.replica
            .read(|s, _| {
                s.nodes.get(&node).map(|n| {
                    convert::node_to_pb(
                        n,
                        s.node_usage().get(&node).copied().unwrap_or_default(),
                        Resources::default(),
                    )
                })
            })
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no node {node}")))
    }
}
