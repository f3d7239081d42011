//! A running replica: openraft on RocksDB, plus the cluster-level operations the application
//! needs — propose a command from any replica, read linearizably from any replica, change
//! membership, report status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use surge_proto::cluster::cluster_client::ClusterClient;
use surge_proto::cluster::{
    AddMemberRequest, Member, MembershipReply, PingRequest, ProposeRequest, ReadIndexRequest,
    RemoveMemberRequest, StatusReply,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::metrics::{as_gauge, RaftMetrics};
use crate::network::{Network, Peers};
use crate::store::{Applied, Identity, LogStore, OpenError, StateMachineStore, Storage};
use crate::types::{Command, NodeId, Raft, StateMachine};

/// Longest a proposal may take, forwarding and leader changes included.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Replicas a forwarded proposal may pass through before it is refused (stops forwarding loops).
pub const FORWARD_HOPS_MAX: u32 = 3;
/// Longest a linearizable read waits for its read index to be applied.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a call that needs the leader waits for an election to finish.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Longest a reachability probe of one peer waits.
pub const PING_TIMEOUT: Duration = Duration::from_millis(400);
/// Longest adding a member may take (the learner must catch up first).
pub const ADD_MEMBER_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest command a client may propose.
pub const COMMAND_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The leader's heartbeat to followers.
pub const HEARTBEAT_INTERVAL_MS: u64 = 50;
/// A follower's election timeout is drawn once from `[min, max)`. openraft 0.9 waits the
/// leader lease (`max`) plus that timeout after the last heartbeat before a follower stands,
/// and refuses votes while its own lease runs: the first candidate wins at about
/// `max + min..max` = 450..600 ms after the leader's last heartbeat, a failover well under
/// etcd's 1 s election timeout, and a leader must miss nine heartbeats in a row (a stall of
/// 450 ms on a loaded host) before a follower stands against it.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 150;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;

/// How a replica takes its place in a cluster at start.
#[derive(Clone, Debug)]
pub enum Start {
    /// Form a new cluster of these replicas (a no-op when the data dir already holds one).
    Bootstrap(BTreeMap<NodeId, String>),
    /// Join the running cluster that the replica at this address belongs to.
    Join(String),
    /// Restart from the data dir.
    Resume,
}

/// Tuning of the replicated log.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: NodeId,
    /// The address other replicas and clients reach this one at.
    pub address: String,
    pub data_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot (for slow followers, before they need the snapshot).
    pub logs_to_keep: u64,
    /// Mutual TLS to the other replicas (this replica's certificate, the cluster CA), or none.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl RaftConfig {
    pub fn new(id: NodeId, address: String, data_dir: PathBuf) -> Self {
        RaftConfig {
            id,
            address,
            data_dir,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS,
            snapshot_every_entries: 10_000,
            logs_to_keep: 1_000,
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("data dir {path} belongs to replica {stored}, not replica {given}; give --id {stored} or another data dir")]
    IdMismatch {
        path: String,
        stored: NodeId,
        given: NodeId,
    },
    #[error("data dir {path} belongs to cluster {stored}; {what} is cluster {given}. Use a fresh data dir to start another cluster")]
    ForeignCluster {
        path: String,
        stored: String,
        given: String,
        what: &'static str,
    },
    #[error("--bootstrap does not name this replica's id {id}; list it as {id}={address}")]
    NotInBootstrap { id: NodeId, address: String },
    #[error("id clash: --bootstrap names replica {id} at {listed}, but this replica's address is {address}")]
    BootstrapAddress {
        id: NodeId,
        listed: String,
        address: String,
    },
    #[error("--bootstrap lists address {address} for replicas {a} and {b}")]
    DuplicateAddress {
        address: String,
        a: NodeId,
        b: NodeId,
    },
    #[error("data dir {path} holds no cluster: start with --bootstrap (a new cluster) or --join ADDR (an existing one)")]
    NoCluster { path: String },
    #[error("cannot reach {seed} to join its cluster: {reason}")]
    Seed { seed: String, reason: String },
    #[error("joining through {seed} failed: {reason}")]
    Join { seed: String, reason: String },
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why a proposal, read or membership change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is elected yet; try again shortly")]
    NoLeader,
    #[error("timed out after {0:?} waiting for the cluster")]
    Timeout(Duration),
    #[error("this replica is shutting down")]
    ShuttingDown,
    #[error("command is {0} bytes; the limit is {COMMAND_BYTES_MAX}")]
    TooLarge(usize),
    #[error("request is for cluster {got}, this replica belongs to cluster {ours}")]
    WrongCluster { ours: String, got: String },
    #[error("forwarded through {0} replicas without reaching the leader")]
    ForwardLoop(u32),
    #[error("{0}")]
    Rejected(String),
    #[error("replica at {addr} failed: {status}")]
    Remote { addr: String, status: tonic::Status },
}

impl ClusterError {
    /// True for failures a retry can cure: no leader yet, or the leader we tried went away.
    pub fn is_transient(&self) -> bool {
        match self {
            ClusterError::NoLeader => true,
            ClusterError::Remote { status, .. } => {
                matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                )
            }
            _ => false,
        }
    }
}

/// A committed proposal: where it landed in the log and what applying it returned.
#[derive(Clone, Debug)]
pub struct Proposed {
    pub index: u64,
    pub reply: Vec<u8>,
}

/// One replica of the replicated state machine `S`.
pub struct RaftNode<S: StateMachine> {
    id: NodeId,
    address: String,
    cluster_id: String,
    raft: Raft,
    state: Arc<RwLock<Applied<S>>>,
    applied_rx: watch::Receiver<u64>,
    committed: Arc<AtomicU64>,
    peers: Peers,
    metrics: Arc<RaftMetrics>,
    storage: Storage,
    data_dir: PathBuf,
    start: Start,
    gate_open: std::sync::atomic::AtomicBool,
}

/// The id of the cluster a `--bootstrap` list forms: a digest of its sorted `id=address` pairs,
/// so every replica given the same list derives the same id without talking to the others.
pub fn cluster_id_of(members: &BTreeMap<NodeId, String>) -> String {
    // FNV-1a, 64 bit: stable across versions and platforms, no dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, addr) in members {
        for b in format!("{id}={addr};").bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("c-{hash:016x}")
}

fn cluster_client(channel: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(channel)
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
}

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
        });
        tokio::spawn(publish_metrics(Arc::downgrade(&node)));
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
        let join_err = |reason: String| StartError::Join {
            seed: seed.to_string(),
            reason,
        };
        let deadline = Instant::now() + ADD_MEMBER_TIMEOUT;
        let status = loop {
            let channel = self
                .peers
                .channel(seed)
                .map_err(|e| join_err(e.to_string()))?;
            match cluster_client(channel)
                .status(surge_proto::cluster::StatusRequest {})
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(status) if Instant::now() < deadline => {
                    tracing::debug!(%status, "seed status");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => return Err(join_err(status.message().to_string())),
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
    async fn retry_at_seed<F, Fut>(&self, seed: &str, deadline: Instant, f: F) -> Result<(), String>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        loop {
            let channel = self.peers.channel(seed).map_err(|e| e.to_string())?;
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
                Err(status) => return Err(status.message().to_string()),
            }
        }
    }

    fn open_gate(&self) {
        self.gate_open.store(true, Ordering::Release);
    }

    /// False while an empty replica waits to be (re-)added: it must not answer Raft RPCs yet.
    pub fn accepts_raft_traffic(&self) -> bool {
        self.gate_open.load(Ordering::Acquire)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Check that a request from another replica is for this cluster.
    pub fn check_cluster(&self, got: &str) -> Result<(), ClusterError> {
        if got == self.cluster_id {
            Ok(())
        } else {
            Err(ClusterError::WrongCluster {
                ours: self.cluster_id.clone(),
                got: got.to_string(),
            })
        }
    }

    /// Read the applied state. `f` runs under a read lock: keep it short, never await in it.
    pub fn read<R>(&self, f: impl FnOnce(&S, u64) -> R) -> R {
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let applied = state.last_applied.map(|l| l.index).unwrap_or(0);
        f(&state.app, applied)
    }

    /// Notified with the applied index after every batch of applied entries.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_rx.clone()
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied_rx.borrow()
    }

    /// The leader this replica knows of: `(id, address)`.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

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
            let attempt = match self.raft.client_write(Command(command.clone())).await {
                Ok(resp) => {
                    return Ok(Proposed {
                        index: resp.log_id.index,
                        reply: resp.data.0,
                    })
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) => self.forward(&node.addr, &command, hops).await,
                        None => Err(ClusterError::NoLeader),
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    Err(ClusterError::Rejected(e.to_string()))
                }
                Err(RaftError::Fatal(_)) => return Err(ClusterError::ShuttingDown),
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

    async fn leader_channel(&self) -> Result<(String, Channel), ClusterError> {
        let (_, addr) = self.wait_leader().await?;
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| ClusterError::Rejected(e.to_string()))?;
        Ok((addr, channel))
    }

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

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
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
async fn ping_seed(peers: &Peers, seed: &str) -> Result<surge_proto::cluster::PingReply, String> {
    let deadline = Instant::now() + SEED_WAIT;
    loop {
        match ping(peers, seed).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("{e} (tried for {SEED_WAIT:?})"))
            }
            Err(e) => {
                tracing::info!(seed, error = %e, "seed not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Identity and progress of the replica at `addr`, or why it cannot be reached.
pub async fn ping(peers: &Peers, addr: &str) -> Result<surge_proto::cluster::PingReply, String> {
    let channel = peers.channel(addr).map_err(|e| e.to_string())?;
    match tokio::time::timeout(PING_TIMEOUT, cluster_client(channel).ping(PingRequest {})).await {
        Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
        Ok(Err(status)) => Err(status.message().to_string()),
        Ok(Ok(r)) => Ok(r.into_inner()),
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
