//! Stopping a replica without costing the cluster an election.
//!
//! openraft 0.9 has no leadership transfer (0.10 adds one), and a replica that stops the naive
//! way — drain its gRPC and HTTP servers, then stop Raft — spends the drain (up to two seconds)
//! receiving no heartbeats, stands for election with its current log, wins, and exits as the
//! leader: one rolling restart of three replicas cost five leader changes. [`RaftNode::step_aside`]
//! runs before any server stops, and:
//!
//! 1. turns its own elections off (`runtime_config().elect(false)`): a stopping replica never
//!    stands, whatever it hears or stops hearing from now on;
//! 2. if it leads, hands leadership over the way the Raft thesis (§3.10) does: it stops
//!    accepting proposals (they wait and then go to the new leader), waits until the most
//!    up-to-date voter has its whole log, and sends that voter a `TimeoutNow`; the voter stands
//!    at once. The old leader grants the vote (openraft's lease check only protects a vote less
//!    than `election_timeout_max` old, and this leader's own vote is older than that), which
//!    with the candidate's own makes a majority of three; the leader then steps down on the
//!    higher term. One leader change, about one round trip plus a blank entry.
//!
//! If the handover does not finish within [`HANDOVER_WAIT`] (no caught-up voter, a candidate
//! that lost), the replica stops anyway and the others elect after their timeout, as after a
//! crash: never worse than before.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use surge_proto::raft::raft_transport_client::RaftTransportClient;
use surge_proto::raft::RaftRequest;

use super::RaftNode;
use crate::codec;
use crate::types::{NodeId, StateMachine};

/// Longest a stopping leader waits for a voter to catch up with its log.
pub const CATCH_UP_WAIT: Duration = Duration::from_millis(1_000);
/// Longest a stopping leader waits for the voter it chose to take over.
pub const HANDOVER_WAIT: Duration = Duration::from_millis(1_500);
/// Longest the `TimeoutNow` call to the chosen voter may take.
pub const TIMEOUT_NOW_RPC: Duration = Duration::from_millis(500);

/// Sent by a stopping leader to the voter it hands leadership to: "stand now".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutNow {
    /// The leader handing over.
    pub leader: NodeId,
    pub term: u64,
    /// The leader's last log index: the voter must hold at least this much, or it would lose.
    pub last_log_index: u64,
}

/// What the voter that receives a [`TimeoutNow`] knows about itself.
#[derive(Clone, Debug)]
pub struct VoterView {
    pub id: NodeId,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub is_voter: bool,
    pub stopping: bool,
}

/// Why a voter refuses to stand on a [`TimeoutNow`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error("replica {0} is stopping too")]
    Stopping(NodeId),
    #[error("replica {0} is not a voter")]
    NotVoter(NodeId),
    #[error("replica {me} follows leader {follows:?} in term {term}, not replica {asked} in term {asked_term}")]
    NotMyLeader {
        me: NodeId,
        follows: Option<NodeId>,
        term: u64,
        asked: NodeId,
        asked_term: u64,
    },
    #[error("replica {me} holds the log up to {have}, the leader's goes to {need}")]
    Behind { me: NodeId, have: u64, need: u64 },
}

/// May this voter stand on `req`? Only for the leader it follows, in the same term, with the
/// leader's whole log, and while it is not stopping itself.
pub fn accept_timeout_now(req: &TimeoutNow, me: &VoterView) -> Result<(), Refusal> {
    if me.stopping {
        return Err(Refusal::Stopping(me.id));
    }
    if !me.is_voter {
        return Err(Refusal::NotVoter(me.id));
    }
    if me.leader != Some(req.leader) || me.term != req.term {
        return Err(Refusal::NotMyLeader {
            me: me.id,
            follows: me.leader,
            term: me.term,
            asked: req.leader,
            asked_term: req.term,
        });
    }
    if me.last_log_index < req.last_log_index {
        return Err(Refusal::Behind {
            me: me.id,
            have: me.last_log_index,
            need: req.last_log_index,
        });
    }
    Ok(())
}

/// The voter a stopping leader hands over to: the one that has replicated the most of its log
/// (ties to the lowest id, so the choice is deterministic). `None` without another voter.
pub fn handover_target(
    me: NodeId,
    voters: &[NodeId],
    matched: &BTreeMap<NodeId, Option<u64>>,
) -> Option<(NodeId, u64)> {
    voters
        .iter()
        .filter(|id| **id != me)
        .map(|id| (*id, matched.get(id).copied().flatten().unwrap_or(0)))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
}

impl<S: StateMachine> RaftNode<S> {
    /// True once [`RaftNode::step_aside`] ran: the replica is on its way out.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// True while a stopping leader hands over: proposals wait instead of entering its log.
    pub(super) fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Call first when the replica is asked to stop, before its servers drain: it will not stand
    /// for election again, and if it leads it hands leadership to the most up-to-date voter.
    /// Returns the leader the cluster has afterwards as this replica sees it.
    pub async fn step_aside(&self) -> Option<NodeId> {
        self.stopping.store(true, Ordering::Release);
        self.raft.runtime_config().elect(false);
        if self.is_leader() {
            self.handing_over.store(true, Ordering::Release);
            match self.hand_over().await {
                Ok(to) => tracing::info!(to, "leadership handed over"),
                Err(e) => {
                    tracing::warn!(error = %e, "leadership not handed over; the others will elect after their timeout")
                }
            }
            self.handing_over.store(false, Ordering::Release);
        }
        self.raft.metrics().borrow().current_leader
    }

    async fn hand_over(&self) -> Result<NodeId, String> {
        let deadline = Instant::now() + CATCH_UP_WAIT;
        let mut rx = self.raft.metrics();
        // Wait until a voter holds the whole log (proposals no longer enter it).
        let (target, req) = loop {
            let m = rx.borrow_and_update().clone();
            if m.state != ServerState::Leader {
                return Err("no longer the leader".into());
            }
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let matched: BTreeMap<NodeId, Option<u64>> = m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default();
            let last = m.last_log_index.unwrap_or(0);
            if let Some((target, have)) = handover_target(self.id, &voters, &matched) {
                if have >= last {
                    break (
                        target,
                        TimeoutNow {
                            leader: self.id,
                            term: m.current_term,
                            last_log_index: last,
                        },
                    );
                }
            } else {
                return Err("no other voter to hand over to".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no voter caught up within {CATCH_UP_WAIT:?}"));
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        };
        let addr = m_addr(&self.raft, target).ok_or("the chosen voter has no address")?;
        self.send_timeout_now(&addr, &req).await?;
        let waited = self
            .raft
            .wait(Some(HANDOVER_WAIT))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != self.id),
                "another leader",
            )
            .await;
        match waited {
            Ok(m) => Ok(m.current_leader.unwrap_or(target)),
            Err(e) => Err(format!("replica {target} did not take over: {e}")),
        }
    }

    async fn send_timeout_now(&self, addr: &str, req: &TimeoutNow) -> Result<(), String> {
        let channel = self.peers.channel(addr).map_err(|e| e.to_string())?;
        let mut client = RaftTransportClient::new(channel);
        let call = client.timeout_now(RaftRequest {
            cluster_id: self.cluster_id.clone(),
            payload: codec::to_bytes(req),
        });
        let reply = match tokio::time::timeout(TIMEOUT_NOW_RPC, call).await {
            Err(_) => return Err(format!("{addr} did not answer TimeoutNow")),
            Ok(Err(status)) => return Err(format!("{addr}: {}", status.message())),
            Ok(Ok(r)) => r.into_inner(),
        };
        let answer: Result<(), Refusal> =
            codec::from_bytes(&reply.payload).map_err(|e| e.to_string())?;
        answer.map_err(|r| r.to_string())
    }

    /// A stopping leader asks this replica to stand now (see the module doc).
    pub async fn timeout_now(&self, req: &TimeoutNow) -> Result<(), Refusal> {
        let m = self.raft.metrics().borrow().clone();
        let me = VoterView {
            id: self.id,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            is_voter: m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id),
            stopping: self.is_stopping(),
        };
        accept_timeout_now(req, &me)?;
        tracing::info!(
            leader = req.leader,
            term = req.term,
            "leader hands over: standing now"
        );
        // Errors only when Raft is shutting down, and then there is nothing to stand for.
        let _ = self.raft.trigger().elect().await;
        Ok(())
    }
}

pub(super) fn m_addr(raft: &crate::types::Raft, id: NodeId) -> Option<String> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> VoterView {
        VoterView {
            id: 2,
            term: 7,
            leader: Some(1),
            last_log_index: 100,
            is_voter: true,
            stopping: false,
        }
    }

    fn req() -> TimeoutNow {
        TimeoutNow {
            leader: 1,
            term: 7,
            last_log_index: 100,
        }
    }

    #[test]
    fn a_caught_up_follower_of_that_leader_stands() {
        assert_eq!(accept_timeout_now(&req(), &view()), Ok(()));
        let ahead = VoterView {
            last_log_index: 101,
            ..view()
        };
        assert_eq!(accept_timeout_now(&req(), &ahead), Ok(()));
    }

    #[test]
    fn refusals() {
        let behind = VoterView {
            last_log_index: 99,
            ..view()
        };
        assert!(matches!(
            accept_timeout_now(&req(), &behind),
            Err(Refusal::Behind {
                have: 99,
                need: 100,
                ..
            })
        ));
        let stopping = VoterView {
            stopping: true,
            ..view()
        };
        assert_eq!(
            accept_timeout_now(&req(), &stopping),
            Err(Refusal::Stopping(2))
        );
        let learner = VoterView {
            is_voter: false,
            ..view()
        };
        assert_eq!(
            accept_timeout_now(&req(), &learner),
            Err(Refusal::NotVoter(2))
        );
        // A stale leader (another term, or not the one this replica follows) is not obeyed.
        for other in [
            VoterView { term: 8, ..view() },
            VoterView {
                leader: Some(3),
                ..view()
            },
            VoterView {
                leader: None,
                ..view()
            },
        ] {
            assert!(matches!(
                accept_timeout_now(&req(), &other),
                Err(Refusal::NotMyLeader { .. })
            ));
        }
    }

    #[test]
    fn the_most_caught_up_voter_is_chosen() {
        let matched = BTreeMap::from([(2, Some(90)), (3, Some(100)), (4, None)]);
        assert_eq!(handover_target(1, &[1, 2, 3, 4], &matched), Some((3, 100)));
        // Ties go to the lowest id; a voter with no replication record counts as 0.
        let tied = BTreeMap::from([(2, Some(100)), (3, Some(100))]);
        assert_eq!(handover_target(1, &[1, 2, 3], &tied), Some((2, 100)));
        assert_eq!(handover_target(1, &[1, 5], &BTreeMap::new()), Some((5, 0)));
        // Learners are not in `voters`; the leader alone has nobody to hand over to.
        assert_eq!(handover_target(1, &[1], &matched), None);
    }
}
