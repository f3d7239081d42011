//! A running replica: openraft on RocksDB, plus the cluster-level operations the application
//! needs — propose a command from any replica, read linearizably from any replica, change
//! membership, report status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use surge_proto::cluster::cluster_client::ClusterClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::metrics::RaftMetrics;
use crate::network::Peers;
use crate::store::{Applied, OpenError, Storage};
use crate::types::{NodeId, Raft, StateMachine};

mod gone;
mod membership;
mod propose;
mod start;
mod stop;

pub use gone::{first_to_stand, LogPos};
pub use start::{ping, SEED_WAIT};
pub use stop::{accept_timeout_now, handover_target, Refusal, TimeoutNow, VoterView};

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

/// A replica restarting on its data dir holds its elections until it has heard from a leader,
/// or this long. Without pre-vote (openraft 0.9 has none) a restarted replica that stands before
/// the leader's first AppendEntries reaches it — a slow process start on a loaded host — deposes
/// a healthy leader with its higher term even though its log is too short to win: two leader
/// changes for a follower's restart. If every replica restarts at once, nobody hears a leader
/// and they all stand after the hold.
pub const RESTART_ELECTION_HOLD: Duration = Duration::from_secs(2);

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
    Seed {
        seed: String,
        #[source]
        reason: PeerError,
    },
    #[error("joining through {seed} failed: {reason}")]
    Join {
        seed: String,
        #[source]
        reason: PeerError,
    },
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

/// Why a call to another replica (a ping, or a join step at the seed) failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    BadAddress(#[from] crate::network::BadAddress),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The replica answered with an error; shown as its message.
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// The seed did not answer before the wait for it ran out.
    #[error("{last} (tried for {waited:?})")]
    GaveUp {
        #[source]
        last: Box<PeerError>,
        waited: Duration,
    },
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
    /// Set by [`RaftNode::step_aside`]: this replica never stands for election again.
    stopping: std::sync::atomic::AtomicBool,
    /// Set while a stopping leader hands over: proposals wait for the next leader.
    handing_over: std::sync::atomic::AtomicBool,
    /// An AppendEntries arrived since start (see [`RESTART_ELECTION_HOLD`]).
    heard_leader: std::sync::atomic::AtomicBool,
    /// openraft's leader lease (`election_timeout_max`): how long a voter refuses votes after
    /// its last heartbeat.
    lease: Duration,
    /// When the replica started: the origin of `last_append_us`.
    born: Instant,
    /// Microseconds after `born` when the last AppendEntries was handled (0: none yet).
    last_append_us: AtomicU64,
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

    /// Called by the transport for every AppendEntries.
    pub fn heard_leader(&self) {
        self.heard_leader.store(true, Ordering::Relaxed);
    }

    /// Called by the transport after each AppendEntries was handled: the leader was heard.
    pub fn appended(&self) {
        let us = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_append_us.store(us.max(1), Ordering::Relaxed);
    }

    /// When the last AppendEntries was handled, if any was.
    fn last_append(&self) -> Option<Instant> {
        match self.last_append_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.born + Duration::from_micros(us)),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
