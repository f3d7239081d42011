//! The simulated network: openraft's RPCs delivered in memory with seeded delays, losses and
//! partitions, on the paused tokio clock.
//!
//! The simulator implements openraft's `RaftNetworkFactory` itself instead of running the gRPC
//! transport (`surge_raft::network`) over a simulated socket layer: the transport is being
//! reworked (TLS) and its codec is covered by its own tests, while what the simulator must
//! exercise is the replicated core — openraft, surge's RocksDB storage and the scheduler's state
//! machine — under every ordering of messages a seed can produce.
//!
//! A call is two hops, each with its own delay and its own chance of loss: the request (checked
//! against the partition when it arrives) and the reply (checked again when it arrives). Delays
//! are drawn per message, so concurrent messages overtake each other. Failures are reported as
//! `RPCError::Network`, never `Unreachable`: openraft answers `Unreachable` with a backoff whose
//! loop is an unbiased `tokio::select!`, and tokio seeds that fairness RNG from the OS unless it
//! is built with `--cfg tokio_unstable` (see the module docs of [`crate::sim`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use sha2::{Digest, Sha256};
use surge_raft::types::{Node, NodeId, Raft, TypeConfig};

use super::rng::SimRng;

/// What the network does to messages right now (the fault schedule changes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conditions {
    /// Each hop of a message is lost with this probability, in thousandths.
    pub loss_per_mille: u64,
    /// Each hop takes between these many milliseconds (inclusive low, exclusive high).
    pub delay_ms: (u64, u64),
    /// Replicas on different sides cannot talk; replicas absent from the map are on side 0.
    pub sides: BTreeMap<NodeId, u8>,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            loss_per_mille: 0,
            delay_ms: (1, 5),
            sides: BTreeMap::new(),
        }
    }
}

impl Conditions {
    pub fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let side = |id| self.sides.get(&id).copied().unwrap_or(0);
        side(a) == side(b)
    }
}

/// Counters of what the network did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    pub messages: u64,
    pub lost: u64,
    pub refused: u64,
    /// Snapshot chunks delivered (a follower too far behind the purged log catches up so).
    pub snapshot_chunks: u64,
}

struct WorldState {
    rng: SimRng,
    conditions: Conditions,
    /// Running replicas; a crashed replica is absent.
    rafts: BTreeMap<NodeId, Raft>,
    /// Every network event, hashed in order: the run's fingerprint.
    trace: Sha256,
    stats: NetStats,
}

/// Everything the simulated replicas share: the RNG, the network and the clock's origin.
pub struct World {
    started: tokio::time::Instant,
    state: Mutex<WorldState>,
}

#[derive(Clone, Copy, Debug)]
enum Hop {
    Request,
    Reply,
}

#[derive(Debug, thiserror::Error)]
#[error("simulated network: {0}")]
struct SimNetError(String);

impl World {
    pub fn new(seed: u64) -> Self {
        World {
            started: tokio::time::Instant::now(),
            state: Mutex::new(WorldState {
                rng: SimRng::new(seed),
                conditions: Conditions::default(),
                rafts: BTreeMap::new(),
                trace: Sha256::new(),
                stats: NetStats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Milliseconds of simulated time since the world was created.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Run `f` with the one RNG of the run.
    pub fn rng<T>(&self, f: impl FnOnce(&mut SimRng) -> T) -> T {
        f(&mut self.lock().rng)
    }

    /// Fold an event into the run's fingerprint.
    pub fn trace(&self, event: &str) {
        let now = self.now_ms();
        let mut s = self.lock();
        s.trace.update(now.to_le_bytes());
        s.trace.update(event.as_bytes());
        s.trace.update([0]);
    }

    pub fn trace_digest(&self) -> String {
        let digest = self.lock().trace.clone().finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    pub fn conditions(&self) -> Conditions {
        self.lock().conditions.clone()
    }

    pub fn set_conditions(&self, c: Conditions) {
        self.lock().conditions = c;
    }

    pub fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        self.lock().conditions.reachable(a, b)
    }

    pub fn set_running(&self, id: NodeId, raft: Raft) {
        self.lock().rafts.insert(id, raft);
    }

    pub fn set_crashed(&self, id: NodeId) -> Option<Raft> {
        self.lock().rafts.remove(&id)
    }

    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        self.lock().rafts.get(&id).cloned()
    }

    pub fn running(&self) -> BTreeSet<NodeId> {
        self.lock().rafts.keys().copied().collect()
    }

    /// One hop of a message: wait its delay, then deliver it unless it is lost, the two ends
    /// are partitioned, or either end crashed meanwhile. Returns the receiver's Raft handle
    /// (the receiver is `to` for a request, `from`'s peer for a reply).
    async fn hop(&self, kind: &str, hop: Hop, from: NodeId, to: NodeId) -> Result<Raft, String> {
        let (delay, lost) = {
            let mut s = self.lock();
            let (lo, hi) = s.conditions.delay_ms;
            let loss = s.conditions.loss_per_mille;
            let delay = s.rng.range(lo, hi.max(lo + 1));
            let lost = loss > 0 && s.rng.chance(loss);
            (delay, lost)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let now = self.now_ms();
        let mut s = self.lock();
        s.stats.messages += 1;
        let (sender, receiver) = match hop {
            Hop::Request => (from, to),
            Hop::Reply => (to, from),
        };
        let outcome = if lost {
            s.stats.lost += 1;
            Err("lost".to_string())
        } else if !s.conditions.reachable(sender, receiver) {
            s.stats.refused += 1;
            Err(format!(
                "replica {sender} cannot reach replica {receiver} (partition)"
            ))
        } else if !s.rafts.contains_key(&sender) {
            s.stats.refused += 1;
            Err(format!("replica {sender} crashed"))
        } else {
            match s.rafts.get(&receiver).cloned() {
                Some(r) => {
                    if kind == "snapshot" && matches!(hop, Hop::Request) {
                        s.stats.snapshot_chunks += 1;
                    }
                    Ok(r)
                }
                None => {
                    s.stats.refused += 1;
                    Err(format!("replica {receiver} is down"))
                }
            }
        };
        let line = format!(
            "{kind} {hop:?} {sender}->{receiver} {}",
            match &outcome {
                Ok(_) => "delivered",
                Err(e) => e.as_str(),
            }
        );
        s.trace.update(now.to_le_bytes());
        s.trace.update(line.as_bytes());
        s.trace.update([0]);
        outcome
    }

    /// Network delay between two replicas for a forwarded proposal (no loss: the forwarding
    /// path is a gRPC call the real proposer retries).
    pub async fn forward_delay(&self) {
        let delay = {
            let mut s = self.lock();
            let (lo, hi) = s.conditions.delay_ms;
            s.rng.range(lo, hi.max(lo + 1))
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

fn net_err<E: std::error::Error>(reason: String) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&SimNetError(reason)))
}

/// openraft's network factory for one simulated replica.
#[derive(Clone)]
pub struct SimNetwork {
    pub from: NodeId,
    pub world: Arc<World>,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimPeer;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> Self::Network {
        SimPeer {
            from: self.from,
            to: target,
            world: self.world.clone(),
        }
    }
}

/// One replication stream, `from` -> `to`.
pub struct SimPeer {
    from: NodeId,
    to: NodeId,
    world: Arc<World>,
}

impl SimPeer {
    /// Request hop, the receiver's handler, reply hop, all within openraft's deadline.
    async fn call<T, E, F, Fut>(
        &self,
        kind: &str,
        option: &RPCOption,
        handle: F,
    ) -> Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        E: std::error::Error,
        F: FnOnce(Raft) -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError<NodeId, E>>>,
    {
        let ttl = option.hard_ttl();
        // A message that is lost, or meets a partition or a crashed peer, is a black hole: the
        // sender learns nothing until its deadline, as with a real dropped packet. (Failing
        // fast instead would make a partitioned leader retry in a hot loop.)
        let exchange = async {
            let Ok(target) = self.world.hop(kind, Hop::Request, self.from, self.to).await else {
                return std::future::pending().await;
            };
            let result = handle(target).await;
            if self
                .world
                .hop(kind, Hop::Reply, self.from, self.to)
                .await
                .is_err()
            {
                return std::future::pending().await;
            }
            result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(net_err(format!(
                "{kind} {}->{}: no reply within {ttl:?}",
                self.from, self.to
            ))),
        }
    }
}

impl RaftNetwork<TypeConfig> for SimPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("append", &option, |raft| async move {
            raft.append_entries(rpc).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &option, |raft| async move {
            raft.install_snapshot(rpc).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("vote", &option, |raft| async move { raft.vote(rpc).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_decide_reachability() {
        let mut c = Conditions::default();
        assert!(c.reachable(1, 2));
        c.sides.insert(1, 1);
        assert!(!c.reachable(1, 2));
        assert!(c.reachable(2, 3));
        c.sides.insert(2, 1);
        assert!(c.reachable(1, 2));
        assert!(!c.reachable(2, 3));
    }
}
