//! Starting a replica: open the data dir, check its identity, bootstrap or join the cluster,
//! and reach a seed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::RaftError;
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use surge_proto::cluster::cluster_client::ClusterClient;
use surge_proto::cluster::{AddMemberRequest, PingRequest, RemoveMemberRequest};
use tonic::transport::Channel;

use super::{
    cluster_client, cluster_id_of, PeerError, RaftConfig, RaftNode, Start, StartError,
    ADD_MEMBER_TIMEOUT, PING_TIMEOUT,
};
use crate::metrics::{as_gauge, RaftMetrics};
use crate::network::{Network, Peers};
use crate::store::{Identity, LogStore, StateMachineStore, Storage};
use crate::types::{NodeId, Raft, StateMachine};

impl<S: StateMachine> RaftNode<S> {
    /// Open the data dir, check it belongs to this replica and cluster, and start Raft.
    /// The gRPC services must be served before [`RaftNode::join_cluster`] is called.
    pub async fn open(
        config: RaftConfig,
        start: Start,
        app: S,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, StartError> {
        let raft_dir = config.data_dir.join("raft");
        let shown = raft_dir.display().to_string();
        let storage = Storage::open(&raft_dir)?;
        let stored = storage
            .identity()
            .map_err(|e| StartError::Storage(e.to_string()))?;
        if let Some(s) = &stored {
            if s.node_id != config.id {
                return Err(StartError::IdMismatch {
                    path: shown,
                    stored: s.node_id,
                    given: config.id,
                });
            }
        }
        let peers = Peers::new(config.tls.clone());
        let cluster_id = match (&start, &stored) {
            (Start::Bootstrap(members), _) => {
                check_bootstrap(config.id, &config.address, members)?;
                let derived = cluster_id_of(members);
                if let Some(s) = &stored {
                    if s.cluster_id != derived {
                        return Err(StartError::ForeignCluster {
                            path: shown,
                            stored: s.cluster_id.clone(),
                            given: derived,
                            what: "--bootstrap",
                        });
                    }
                }
                derived
            }
            (Start::Join(seed), stored) => {
                let remote = ping_seed(&peers, seed)
                    .await
                    .map_err(|reason| StartError::Seed {
                        seed: seed.clone(),
                        reason,
                    })?;
                if let Some(s) = stored {
                    if s.cluster_id != remote.cluster_id {
                        return Err(StartError::ForeignCluster {
                            path: shown,
                            stored: s.cluster_id.clone(),
                            given: remote.cluster_id,
                            what: "the replica at --join",
                        });
                    }
                }
                remote.cluster_id
            }
            (Start::Resume, Some(s)) => s.cluster_id.clone(),
            (Start::Resume, None) => return Err(StartError::NoCluster { path: shown }),
        };
        if stored.is_none() {
            storage
                .set_identity(&Identity {
                    cluster_id: cluster_id.clone(),
                    node_id: config.id,
                })
                .map_err(|e| StartError::Storage(e.to_string()))?;
        }

        let pristine = storage
            .is_pristine()
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let metrics = Arc::new(RaftMetrics::new(registry)?);
        let raft_config = Config {
            cluster_name: cluster_id.clone(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.logs_to_keep,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            max_payload_entries: 2_000,
            install_snapshot_timeout: 2_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;

        let log_store = LogStore::with_background_flush(storage.clone())
            .map_err(|e| StartError::Storage(format!("starting the log flusher: {e}")))?;
        let committed = log_store.committed_index();
        let (sm_store, state, applied_rx) =
            StateMachineStore::open(storage.clone(), app, metrics.clone())?;
        let network = Network {
            cluster_id: Arc::new(Mutex::new(cluster_id.clone())),
            peers: peers.clone(),
        };
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network,
            log_store,
            sm_store,
        )
        .await
        .map_err(|e| StartError::Storage(e.to_string()))?;

        let node = Arc::new(RaftNode {
            id: config.id,
            address: config.address,
            cluster_id,
            raft,
            state,
            applied_rx,
            committed,
            peers,
            metrics,
            storage,
            data_dir: config.data_dir,
            start,
            gate_open: std::sync::atomic::AtomicBool::new(!pristine),
            stopping: std::sync::atomic::AtomicBool::new(false),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            heard_leader: std::sync::atomic::AtomicBool::new(false),
            lease: Duration::from_millis(config.election_timeout_max_ms),
            born: Instant::now(),
            last_append_us: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(super::gone::watch_leader(Arc::downgrade(&node)));
        tokio::spawn(publish_metrics(Arc::downgrade(&node)));
        if !pristine {
            node.raft.runtime_config().elect(false);
            tokio::spawn(release_elections(Arc::downgrade(&node)));
        }
        Ok(node)
    }

    /// Take this replica's place in the cluster: initialize a new cluster, or ask the leader to
    /// add it. Call once the gRPC services are being served.
    pub async fn join_cluster(&self) -> Result<(), StartError> {
        let pristine = self
            .storage
            .is_pristine()
            .map_err(|e| StartError::Storage(e.to_string()))?;
        match self.start.clone() {
            Start::Resume => Ok(()),
            Start::Bootstrap(_) | Start::Join(_) if !pristine => {
                // Restarted on its own data dir: the cluster already knows it.
                self.open_gate();
                Ok(())
            }
            Start::Bootstrap(members) => {
                // A wiped replica restarted with its old --bootstrap must not start a new log
                // while its peers run the cluster: it rejoins them instead.
                for (id, addr) in &members {
                    if *id == self.id {
                        continue;
                    }
                    if let Ok(p) = ping(&self.peers, addr).await {
                        if p.cluster_id == self.cluster_id && p.applied_index > 0 {
                            tracing::info!(peer = id, "cluster already formed; rejoining it");
                            return self.rejoin(addr).await;
                        }
                    }
                }
                self.open_gate();
                let nodes: BTreeMap<NodeId, BasicNode> = members
                    .into_iter()
                    .map(|(id, addr)| (id, BasicNode::new(addr)))
                    .collect();
                match self.raft.initialize(nodes).await {
                    Ok(()) => Ok(()),
                    // Another replica initialized first, or we already did: the goal is met.
                    Err(RaftError::APIError(_)) => Ok(()),
                    Err(e) => Err(StartError::Storage(e.to_string())),
                }
            }
            Start::Join(seed) => self.rejoin(&seed).await,
        }
    }

    /// Join as a new member through `seed`. A replica whose id is still a member (its data dir
    /// was wiped) is removed first and added back: the leader remembers how far it had
    /// replicated to it, and a follower whose log went backwards is a safety violation Raft
    /// must not paper over. Until then the gate keeps Raft traffic away from this empty replica.
    async fn rejoin(&self, seed: &str) -> Result<(), StartError> {
        let join_err = |reason: PeerError| StartError::Join {
            seed: seed.to_string(),
            reason,
        };
        let deadline = Instant::now() + ADD_MEMBER_TIMEOUT;
        let status = loop {
            let channel = self.peers.channel(seed).map_err(|e| join_err(e.into()))?;
            match cluster_client(channel)
                .status(surge_proto::cluster::StatusRequest {})
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(status) if Instant::now() < deadline => {
                    tracing::debug!(%status, "seed status");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => return Err(join_err(PeerError::Status(status))),
            }
        };
        if status.members.iter().any(|m| m.id == self.id) {
            tracing::info!(
                id = self.id,
                "this id is still a member with a lost log; removing it before re-adding"
            );
            self.retry_at_seed(seed, deadline, |mut c| async move {
                c.remove_member(RemoveMemberRequest { id: self.id })
                    .await
                    .map(|_| ())
            })
            .await
            .map_err(join_err)?;
        }
        self.open_gate();
        let req = AddMemberRequest {
            id: self.id,
            address: self.address.clone(),
            voter: true,
        };
        self.retry_at_seed(seed, deadline, |mut c| {
            let req = req.clone();
            async move { c.add_member(req).await.map(|_| ()) }
        })
        .await
        .map_err(join_err)
    }

    /// Call `f` on the seed until it succeeds, fails for good, or `deadline` passes; retries
    /// while the cluster has no leader.
    async fn retry_at_seed<F, Fut>(
        &self,
        seed: &str,
        deadline: Instant,
        f: F,
    ) -> Result<(), PeerError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        loop {
            let channel = self.peers.channel(seed)?;
            match f(cluster_client(channel)).await {
                Ok(()) => return Ok(()),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => return Err(PeerError::Status(status)),
            }
        }
    }
}

fn check_bootstrap(
    id: NodeId,
    address: &str,
    members: &BTreeMap<NodeId, String>,
) -> Result<(), StartError> {
    match members.get(&id) {
        None => {
            return Err(StartError::NotInBootstrap {
                id,
                address: address.to_string(),
            })
        }
        Some(listed) if listed != address => {
            return Err(StartError::BootstrapAddress {
                id,
                listed: listed.clone(),
                address: address.to_string(),
            })
        }
        Some(_) => {}
    }
    let mut seen: BTreeMap<&str, NodeId> = BTreeMap::new();
    for (nid, addr) in members {
        if let Some(a) = seen.insert(addr.as_str(), *nid) {
            return Err(StartError::DuplicateAddress {
                address: addr.clone(),
                a,
                b: *nid,
            });
        }
    }
    Ok(())
}

/// Longest a joining replica keeps trying to reach its seed (it may be restarting).
pub const SEED_WAIT: Duration = Duration::from_secs(60);

/// Ping the seed until it answers or [`SEED_WAIT`] passes.
async fn ping_seed(
    peers: &Peers,
    seed: &str,
) -> Result<surge_proto::cluster::PingReply, PeerError> {
    let deadline = Instant::now() + SEED_WAIT;
    loop {
        match ping(peers, seed).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => {
                return Err(PeerError::GaveUp {
                    last: Box::new(e),
                    waited: SEED_WAIT,
                })
            }
            Err(e) => {
                tracing::info!(seed, error = %e, "seed not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Identity and progress of the replica at `addr`, or why it cannot be reached.
pub async fn ping(peers: &Peers, addr: &str) -> Result<surge_proto::cluster::PingReply, PeerError> {
    let channel = peers.channel(addr)?;
    match tokio::time::timeout(PING_TIMEOUT, cluster_client(channel).ping(PingRequest {})).await {
        Err(_) => Err(PeerError::Timeout(PING_TIMEOUT)),
        Ok(Err(status)) => Err(PeerError::Status(status)),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Turn a restarted replica's elections back on once it heard a leader, or after
/// [`super::RESTART_ELECTION_HOLD`] (see there), unless it is stopping by then.
async fn release_elections<S: StateMachine>(node: std::sync::Weak<RaftNode<S>>) {
    let until = Instant::now() + super::RESTART_ELECTION_HOLD;
    loop {
        let Some(n) = node.upgrade() else { return };
        if n.heard_leader.load(Ordering::Relaxed) || Instant::now() >= until {
            if !n.is_stopping() {
                n.raft.runtime_config().elect(true);
            }
            return;
        }
        drop(n);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mirror openraft's metrics into Prometheus until the node is dropped.
async fn publish_metrics<S: StateMachine>(node: std::sync::Weak<RaftNode<S>>) {
    let mut rx = match node.upgrade() {
        Some(n) => n.raft.metrics(),
        None => return,
    };
    loop {
        let Some(n) = node.upgrade() else { return };
        {
            let m = rx.borrow_and_update().clone();
            let metrics = &n.metrics;
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let committed = n.committed.load(Ordering::Relaxed).max(applied);
            metrics.term.set(as_gauge(m.current_term));
            metrics
                .leader_id
                .set(as_gauge(m.current_leader.unwrap_or(0)));
            metrics
                .is_leader
                .set(i64::from(m.state == ServerState::Leader));
            metrics.commit_index.set(as_gauge(committed));
            metrics.applied_index.set(as_gauge(applied));
            metrics
                .last_log_index
                .set(as_gauge(m.last_log_index.unwrap_or(0)));
            metrics
                .apply_lag
                .set(as_gauge(committed.saturating_sub(applied)));
            if m.running_state.is_err() {
                return;
            }
        }
        drop(n);
        // Wake on a change, or at least every second so the commit index stays fresh.
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await {
            return;
        }
    }
}
