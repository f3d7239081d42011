//! Membership changes (forwarded to the leader, retried across leader changes) and status.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use surge_proto::cluster::{
    AddMemberRequest, Member, MembershipReply, RemoveMemberRequest, StatusReply,
};

use super::{cluster_client, ping, ClusterError, RaftNode, ADD_MEMBER_TIMEOUT};
use crate::types::{NodeId, StateMachine};

impl<S: StateMachine> RaftNode<S> {
    /// Add a replica (learner first; voter once caught up when `voter`). Forwarded to the leader;
    /// retried across leader changes.
    pub async fn add_member(
        &self,
        id: NodeId,
        address: String,
        voter: bool,
    ) -> Result<MembershipReply, ClusterError> {
        retry_leader_changes(|| self.add_member_once(id, address.clone(), voter)).await
    }

    /// Remove a replica (voter or learner). Forwarded to the leader; retried across leader changes.
    pub async fn remove_member(&self, id: NodeId) -> Result<MembershipReply, ClusterError> {
        retry_leader_changes(|| self.remove_member_once(id)).await
    }

    async fn add_member_once(
        &self,
        id: NodeId,
        address: String,
        voter: bool,
    ) -> Result<MembershipReply, ClusterError> {
        if !self.is_leader() {
            let (addr, channel) = self.leader_channel().await?;
            let req = AddMemberRequest { id, address, voter };
            return match tokio::time::timeout(
                ADD_MEMBER_TIMEOUT,
                cluster_client(channel).add_member(req),
            )
            .await
            {
                Err(_) => Err(ClusterError::Timeout(ADD_MEMBER_TIMEOUT)),
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(status)) => Err(ClusterError::Remote { addr, status }),
            };
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        if let Some(node) = m.get_node(&id) {
            if node.addr != address {
                return Err(ClusterError::Rejected(format!(
                    "id clash: replica {id} is already a member at {}; remove it first or pick another id",
                    node.addr
                )));
            }
        }
        if let Some((other, _)) = m.nodes().find(|(nid, n)| **nid != id && n.addr == address) {
            return Err(ClusterError::Rejected(format!(
                "address {address} already belongs to replica {other}"
            )));
        }
        let is_voter = m.voter_ids().any(|v| v == id);
        let known = m.get_node(&id).is_some();
        let change = async {
            if !known {
                membership_change(|| {
                    self.raft
                        .add_learner(id, BasicNode::new(address.clone()), true)
                })
                .await?;
            }
            if voter && !is_voter {
                membership_change(|| {
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                })
                .await?;
            }
            Ok::<(), ClusterError>(())
        };
        match tokio::time::timeout(ADD_MEMBER_TIMEOUT, change).await {
            Err(_) => return Err(ClusterError::Timeout(ADD_MEMBER_TIMEOUT)),
            Ok(r) => r?,
        }
        Ok(self.membership_reply().await)
    }

    async fn remove_member_once(&self, id: NodeId) -> Result<MembershipReply, ClusterError> {
        if !self.is_leader() {
            let (addr, channel) = self.leader_channel().await?;
            return match tokio::time::timeout(
                ADD_MEMBER_TIMEOUT,
                cluster_client(channel).remove_member(RemoveMemberRequest { id }),
            )
            .await
            {
                Err(_) => Err(ClusterError::Timeout(ADD_MEMBER_TIMEOUT)),
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(status)) => Err(ClusterError::Remote { addr, status }),
            };
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        if m.get_node(&id).is_none() {
            return Err(ClusterError::Rejected(format!(
                "replica {id} is not a member"
            )));
        }
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ClusterError::Rejected(format!(
                    "replica {id} is the last voter; add another before removing it"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let removal = membership_change(|| self.raft.change_membership(change.clone(), false));
        match tokio::time::timeout(ADD_MEMBER_TIMEOUT, removal).await {
            Err(_) => return Err(ClusterError::Timeout(ADD_MEMBER_TIMEOUT)),
            Ok(r) => r?,
        }
        Ok(self.membership_reply().await)
    }

    async fn membership_reply(&self) -> MembershipReply {
        MembershipReply {
            cluster_id: self.cluster_id.clone(),
            members: self.members(false).await,
        }
    }

    /// The members this replica knows, with reachability probed from here when `probe`.
    pub async fn members(&self, probe: bool) -> Vec<Member> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        let nodes: Vec<(NodeId, String)> = m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let probes = nodes.iter().map(|(id, addr)| {
            let me = *id == self.id;
            async move {
                if me {
                    true
                } else if probe {
                    ping(&self.peers, addr).await.is_ok()
                } else {
                    false
                }
            }
        });
        let reachable = futures::future::join_all(probes).await;
        nodes
            .into_iter()
            .zip(reachable)
            .map(|((id, address), reachable)| Member {
                id,
                address,
                voter: voters.contains(&id),
                reachable,
            })
            .collect()
    }

    /// This replica's view of the cluster.
    pub async fn status(&self) -> StatusReply {
        let m = self.raft.metrics().borrow().clone();
        let leader = self.leader();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let (state_hash, applied_index) = self.read(|app, applied| (app.state_hash(), applied));
        StatusReply {
            id: self.id,
            address: self.address.clone(),
            cluster_id: self.cluster_id.clone(),
            leader_id: leader.as_ref().map(|l| l.0).unwrap_or(0),
            leader_address: leader.map(|l| l.1).unwrap_or_default(),
            term: m.current_term,
            commit_index: self.committed.load(Ordering::Relaxed).max(applied_index),
            applied_index,
            last_log_index: m.last_log_index.unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            members: self.members(true).await,
            role: role.to_string(),
            state_hash,
        }
    }
}

/// Retry `op` while the cluster is between leaders, up to [`ADD_MEMBER_TIMEOUT`].
async fn retry_leader_changes<T, F, Fut>(op: F) -> Result<T, ClusterError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let deadline = Instant::now() + ADD_MEMBER_TIMEOUT;
    loop {
        match op().await {
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

type ChangeResult = Result<
    openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
    RaftError<NodeId, ClientWriteError<NodeId, crate::types::Node>>,
>;

/// Run a membership change, waiting out another change still in progress (openraft allows one
/// at a time; two replicas joining at once is normal).
async fn membership_change<F, Fut>(mut change: F) -> Result<(), ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ChangeResult>,
{
    loop {
        match change().await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(_),
            ))) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                return Err(ClusterError::NoLeader)
            }
            Err(e) => return Err(ClusterError::Rejected(e.to_string())),
        }
    }
}
