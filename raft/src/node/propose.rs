//! Proposals forwarded to the leader, and linearizable reads through the leader's read index.

use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use surge_proto::cluster::{ProposeRequest, ReadIndexRequest};
use tonic::transport::Channel;

use super::{
    cluster_client, ClusterError, Proposed, RaftNode, COMMAND_BYTES_MAX, FORWARD_HOPS_MAX,
    LEADER_WAIT, PROPOSE_TIMEOUT, READ_TIMEOUT,
};
use crate::types::{Command, NodeId, StateMachine};

impl<S: StateMachine> RaftNode<S> {
    /// Propose an application command through whichever replica leads; returns once it is
    /// committed and applied on the leader. Retries across leader changes, so commands must be
    /// idempotent under retry (the scheduler's are: submissions carry idempotency keys).
    pub async fn propose(&self, command: Vec<u8>) -> Result<Proposed, ClusterError> {
        let started = Instant::now();
        let result = self.propose_with_hops(command, 0).await;
        self.metrics
            .proposal_seconds
            .observe(started.elapsed().as_secs_f64());
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.proposals.with_label_values(&[label]).inc();
        result
    }

    /// [`RaftNode::propose`] for a command another replica forwarded `hops` times.
    pub async fn propose_with_hops(
        &self,
        command: Vec<u8>,
        hops: u32,
    ) -> Result<Proposed, ClusterError> {
        if command.len() > COMMAND_BYTES_MAX {
            return Err(ClusterError::TooLarge(command.len()));
        }
        if hops > FORWARD_HOPS_MAX {
            return Err(ClusterError::ForwardLoop(hops));
        }
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut backoff = Duration::from_millis(10);
        loop {
            // A stopping leader takes no new entries while it hands over: its successor must
            // hold its whole log to win. The proposal waits and then goes to the successor.
            let written = if self.is_handing_over() {
                Err(None)
            } else {
                self.raft
                    .client_write(Command(command.clone()))
                    .await
                    .map_err(Some)
            };
            let attempt = match written {
                Err(None) => Err(ClusterError::NoLeader),
                Ok(resp) => {
                    return Ok(Proposed {
                        index: resp.log_id.index,
                        reply: resp.data.0,
                    })
                }
                Err(Some(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    match f.leader_node {
                        Some(node) => self.forward(&node.addr, &command, hops).await,
                        None => Err(ClusterError::NoLeader),
                    }
                }
                Err(Some(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                    Err(ClusterError::Rejected(e.to_string()))
                }
                Err(Some(RaftError::Fatal(_))) => return Err(ClusterError::ShuttingDown),
            };
            match attempt {
                Ok(p) => return Ok(p),
                Err(
                    e @ (ClusterError::TooLarge(_)
                    | ClusterError::Rejected(_)
                    | ClusterError::ForwardLoop(_)),
                ) => return Err(e),
                Err(e) => {
                    if Instant::now() + backoff > deadline {
                        tracing::warn!(error = %e, "proposal gave up");
                        return Err(ClusterError::Timeout(PROPOSE_TIMEOUT));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    async fn forward(
        &self,
        addr: &str,
        command: &[u8],
        hops: u32,
    ) -> Result<Proposed, ClusterError> {
        let channel = self
            .peers
            .channel(addr)
            .map_err(|e| ClusterError::Rejected(e.to_string()))?;
        let req = ProposeRequest {
            cluster_id: self.cluster_id.clone(),
            command: command.to_vec(),
            hops: hops + 1,
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT, cluster_client(channel).propose(req)).await {
            Err(_) => Err(ClusterError::Timeout(PROPOSE_TIMEOUT)),
            Ok(Ok(reply)) => {
                let r = reply.into_inner();
                Ok(Proposed {
                    index: r.index,
                    reply: r.response,
                })
            }
            Ok(Err(status)) => match status.code() {
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted => {
                    Err(ClusterError::Rejected(status.message().to_string()))
                }
                _ => Err(ClusterError::Remote {
                    addr: addr.to_string(),
                    status,
                }),
            },
        }
    }

    /// The index a linearizable read on the leader must see; only the leader answers.
    pub async fn leader_read_index(&self) -> Result<u64, ClusterError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(_)) => Err(ClusterError::NoLeader),
            Err(RaftError::Fatal(_)) => Err(ClusterError::ShuttingDown),
        }
    }

    /// Wait until this replica has applied everything committed before the call: afterwards
    /// [`RaftNode::read`] sees every write acknowledged before it (read index, as etcd does).
    pub async fn linearizable_read(&self) -> Result<u64, ClusterError> {
        let index = match self.leader_read_index().await {
            Ok(i) => i,
            Err(ClusterError::NoLeader) => {
                let (_, addr) = self.wait_leader().await?;
                let channel = self
                    .peers
                    .channel(&addr)
                    .map_err(|e| ClusterError::Rejected(e.to_string()))?;
                let req = ReadIndexRequest {
                    cluster_id: self.cluster_id.clone(),
                };
                match tokio::time::timeout(READ_TIMEOUT, cluster_client(channel).read_index(req))
                    .await
                {
                    Err(_) => return Err(ClusterError::Timeout(READ_TIMEOUT)),
                    Ok(Err(status)) => return Err(ClusterError::Remote { addr, status }),
                    Ok(Ok(r)) => r.into_inner().index,
                }
            }
            Err(e) => return Err(e),
        };
        self.wait_applied(index, READ_TIMEOUT).await?;
        Ok(index)
    }

    /// Wait until the applied index reaches `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ClusterError> {
        let mut rx = self.applied_rx.clone();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|applied| *applied >= index).await.map(|_| ())
        })
        .await;
        match waited {
            Err(_) => Err(ClusterError::Timeout(timeout)),
            Ok(Err(_)) => Err(ClusterError::ShuttingDown),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The leader, waiting up to [`LEADER_WAIT`] for an election to finish.
    pub async fn wait_leader(&self) -> Result<(NodeId, String), ClusterError> {
        if let Some(l) = self.leader() {
            return Ok(l);
        }
        let _ = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        self.leader().ok_or(ClusterError::NoLeader)
    }

    pub(super) async fn leader_channel(&self) -> Result<(String, Channel), ClusterError> {
        let (_, addr) = self.wait_leader().await?;
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| ClusterError::Rejected(e.to_string()))?;
        Ok((addr, channel))
    }
}
