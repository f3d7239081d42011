//! A leader whose process is gone: stand as soon as the survivors' leases allow, not after a
//! whole election timeout on top.
//!
//! openraft 0.9 makes a follower wait its leader lease (`election_timeout_max`) plus its own
//! election timeout after the last heartbeat before it stands, and a voter refuses every vote
//! while its own lease runs. After a crash that is 450–600 ms of silence, and when both
//! survivors stand, the one with the shorter log (under write load one often is) loses and
//! waits twice `election_timeout_max` more, and a split vote costs another timeout: the kill -9
//! failover measured 1.1–1.2 s p50 on a loaded host.
//!
//! A follower that has heard nothing from its leader for [`SUSPECT_AFTER`] tries to open a TCP
//! connection to the leader's address. Only a refused connection counts — the process is gone
//! and its port closed; a slow, starved or partitioned leader (connection accepted or timing
//! out) changes nothing, so a busy machine causes no election here. The followers then agree
//! without talking about it who stands: each asks the other voters their last log id
//! ([`first_to_stand`]: the longest log, ties to the lowest id, so it wins the vote), and only
//! that one stands, at the moment the others' leases run out (its own last heartbeat plus the
//! lease plus [`LEASE_MARGIN`]; the leader sent all of them the same heartbeat). Everything
//! else is left to openraft's own timers, which still cover every case this one does not
//! (the chosen follower died too, a vote refused): never slower than before.

use std::sync::Weak;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::RaftNode;
use crate::types::{NodeId, StateMachine};

/// Silence from the leader after which a follower checks whether its process is still there
/// (two heartbeats missed).
pub const SUSPECT_AFTER: Duration = Duration::from_millis(100);
/// How often a follower looks at its leader's silence.
pub const WATCH_TICK: Duration = Duration::from_millis(20);
/// Longest the TCP connect to a silent leader may take; no answer is not "gone".
pub const CONNECT_PROBE: Duration = Duration::from_millis(100);
/// Stand this long after the other voters' leases run out, for their clocks and scheduling.
pub const LEASE_MARGIN: Duration = Duration::from_millis(25);

/// A voter's last log id, `(term, index)`; compared as Raft's vote compares logs.
pub type LogPos = (u64, u64);

/// Whether `me`, holding `mine`, is the survivor that stands once the leader is gone: no other
/// voter that answered holds a longer log, and none with an equal log has a lower id. Voters
/// that did not answer (`None`) are left out: they cannot vote either.
pub fn first_to_stand(me: NodeId, mine: LogPos, others: &[(NodeId, Option<LogPos>)]) -> bool {
    others.iter().all(|(id, pos)| match pos {
        None => true,
        Some(pos) => *pos < mine || (*pos == mine && me < *id),
    })
}

/// When the survivor that stands should do so: when the last heartbeat the others received
/// (about when it received its own) is older than their lease.
pub fn stand_at(last_heartbeat: Instant, lease: Duration) -> Instant {
    last_heartbeat + lease + LEASE_MARGIN
}

/// True when a TCP connection to `addr` is refused: nothing listens there any more.
async fn refused(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(CONNECT_PROBE, tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

impl<S: StateMachine> RaftNode<S> {
    /// This replica's last log id.
    pub fn last_log(&self) -> LogPos {
        self.raft
            .data_metrics()
            .borrow()
            .last_log
            .map_or((0, 0), |l| (l.leader_id.term, l.index))
    }

    /// The leader this follower hears from and when it last did, if it is a follower that may
    /// stand (not stopping, not a learner).
    fn silent_leader(&self) -> Option<(NodeId, Instant)> {
        if self.is_stopping() {
            return None;
        }
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader.filter(|l| *l != self.id)?;
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id);
        (m.state == ServerState::Follower && voter).then_some(())?;
        Some((leader, self.last_append()?))
    }

    /// One look at the leader's silence; stands if the leader is gone and this replica is the
    /// one to stand.
    async fn check_leader(&self, w: &mut Watch) {
        let Some((leader, heard)) = self.silent_leader() else {
            return;
        };
        let now = Instant::now();
        if w.acted_on == Some(heard) || now < heard + SUSPECT_AFTER || now < w.next_probe {
            return;
        }
        let Some(addr) = super::stop::m_addr(&self.raft, leader) else {
            return;
        };
        if !refused(&addr).await {
            // Alive but slow, or unreachable: openraft's own timers decide. Look again after
            // another SUSPECT_AFTER, so a starved leader is not probed every tick.
            w.next_probe = Instant::now() + SUSPECT_AFTER;
            return;
        }
        w.acted_on = Some(heard);
        let voters: Vec<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id && *v != leader)
            .collect();
        let mut others = Vec::with_capacity(voters.len());
        for id in voters {
            let pos = match super::stop::m_addr(&self.raft, id) {
                Some(a) => super::ping(&self.peers, &a)
                    .await
                    .ok()
                    .map(|r| (r.last_log_term, r.last_log_index)),
                None => None,
            };
            others.push((id, pos));
        }
        let mine = self.last_log();
        if !first_to_stand(self.id, mine, &others) {
            tracing::info!(
                leader,
                ?mine,
                ?others,
                "the leader's port is closed; another voter stands first"
            );
            return;
        }
        tokio::time::sleep_until(stand_at(heard, self.lease).into()).await;
        if self.silent_leader() != Some((leader, heard)) {
            return;
        }
        tracing::info!(leader, %addr, ?mine, "the leader's port is closed; standing as the others' leases end");
        // Errors only when Raft is shutting down, and then there is nothing to stand for.
        let _ = self.raft.trigger().elect().await;
    }
}

/// What the watch remembers between looks.
struct Watch {
    /// The last heartbeat time it acted on: one attempt per silence.
    acted_on: Option<Instant>,
    /// No TCP probe before this.
    next_probe: Instant,
}

/// Watch the leader's silence until the node is dropped (see the module doc).
pub(super) async fn watch_leader<S: StateMachine>(node: Weak<RaftNode<S>>) {
    let mut w = Watch {
        acted_on: None,
        next_probe: Instant::now(),
    };
    loop {
        tokio::time::sleep(WATCH_TICK).await;
        let Some(n) = node.upgrade() else { return };
        if n.raft.metrics().borrow().running_state.is_err() {
            return;
        }
        n.check_leader(&mut w).await;
        drop(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_log_stands_ties_to_the_lowest_id() {
        // Equal logs: the lower id stands, the other does not.
        assert!(first_to_stand(2, (3, 10), &[(3, Some((3, 10)))]));
        assert!(!first_to_stand(3, (3, 10), &[(2, Some((3, 10)))]));
        // A longer log stands whatever its id; a later term beats a longer index.
        assert!(first_to_stand(3, (3, 11), &[(2, Some((3, 10)))]));
        assert!(!first_to_stand(2, (3, 10), &[(3, Some((3, 11)))]));
        assert!(first_to_stand(3, (4, 5), &[(2, Some((3, 10)))]));
        // A voter that did not answer cannot vote and is not waited for.
        assert!(first_to_stand(3, (3, 10), &[(2, None), (4, Some((3, 9)))]));
        assert!(!first_to_stand(
            3,
            (3, 10),
            &[(2, None), (4, Some((3, 12)))]
        ));
    }

    #[test]
    fn stands_after_the_lease_and_margin() {
        let t = Instant::now();
        let lease = Duration::from_millis(300);
        assert_eq!(stand_at(t, lease), t + lease + LEASE_MARGIN);
    }

    #[tokio::test]
    async fn only_a_closed_port_counts_as_gone() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = open.local_addr().expect("addr").to_string();
        assert!(!refused(&addr).await, "a listening port is not gone");
        drop(open);
        assert!(refused(&addr).await, "a closed port is gone");
    }
}
