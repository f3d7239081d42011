//! One simulated run: replicas, scheduler, node daemons, clients and the fault schedule, all
//! tasks of one current-thread runtime on the paused clock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use surge_raft::metrics::RaftMetrics;
use surge_raft::store::{Applied, LogStore, StateMachineStore, Storage};
use surge_raft::types::{Command as RaftCommand, NodeId, Raft};
use surge_scheduler::command::{Command, Response};
use surge_scheduler::leader::{self, CoreConfig, Leader, PlantedBug};
use surge_scheduler::model::{NodeSpec, Resources};
use surge_scheduler::ClusterState;
use tokio::task::JoinHandle;

mod faults;
mod tasks;

use self::tasks::{client, daemon, sampler};
use super::net::{SimNetwork, World};
use super::{InjectedBug, SimConfig, SimError};
use crate::history::{EventType, JobSample, NodeSample, Op, Process};

/// How long a client or node waits for one proposal before calling its outcome unknown.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node daemon heartbeats, reads its assignments and reports.
const NODE_TICK_MS: (u64, u64) = (200, 300);
/// How often the sampler reads one replica's nodes and jobs.
const SAMPLE_TICK: Duration = Duration::from_millis(250);
/// Submissions one client retries before it gives an operation up.
const ATTEMPTS_MAX: u32 = 8;
/// Longest the end of a run waits for every replica to apply the same log.
const CONVERGE_WAIT_MS: u64 = 20_000;

pub(super) type Recorded = (u64, Process, EventType, Op);

/// Why a proposal did not produce a reply.
enum ProposeError {
    /// It certainly did not take effect (refused before it reached a log).
    Refused(String),
    /// It may or may not have taken effect (timed out, leader lost mid-way).
    Unknown(String),
}

struct Replica {
    raft: Raft,
    state: Arc<RwLock<Applied<ClusterState>>>,
    /// The production leader shell and core, driven through [`SimHost`].
    leader: Arc<Leader<SimHost>>,
}

/// One simulated replica as the leader's shell sees it: the simulated Raft, its applied state,
/// proposals through [`Sim::propose`] and the simulated clock.
struct SimHost {
    sim: Arc<Sim>,
    id: NodeId,
    state: Arc<RwLock<Applied<ClusterState>>>,
    applied: tokio::sync::watch::Receiver<u64>,
}

impl leader::Host for SimHost {
    fn is_leader(&self) -> bool {
        self.sim.is_leader(self.id)
    }

    fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.clone()
    }

    fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    fn read<R>(&self, f: impl FnOnce(&ClusterState, u64) -> R) -> R {
        let guard = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let applied = guard.last_applied.map(|l| l.index).unwrap_or(0);
        f(&guard.app, applied)
    }

    async fn propose(&self, command: &Command) -> Result<(u64, Response), leader::ProposeError> {
        match self.sim.propose(self.id, command).await {
            // The simulated proposal does not return the index; the shell only logs it.
            Ok(r) => Ok((0, r)),
            Err(ProposeError::Refused(e) | ProposeError::Unknown(e)) => {
                Err(leader::ProposeError::NotCommitted(e))
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.sim.world.now_ms()
    }
}

struct Daemon {
    up: bool,
    /// Sandboxes the daemon's node core holds alive (what its heartbeat says).
    sandboxes: u32,
}

pub(super) struct Sim {
    pub cfg: SimConfig,
    pub world: Arc<World>,
    dir: PathBuf,
    election_timeout_ms: BTreeMap<NodeId, u64>,
    replicas: Mutex<BTreeMap<NodeId, Replica>>,
    daemons: Mutex<BTreeMap<String, Daemon>>,
    events: Mutex<Vec<Recorded>>,
    /// Job ids clients saw acknowledged (for the injected bug).
    acked: Mutex<Vec<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn node_id(i: u32) -> String {
    format!("n{i}")
}

fn node_spec(id: &str) -> NodeSpec {
    NodeSpec {
        id: id.to_string(),
        address: String::new(),
        allocatable: Resources::new(4_000, 8_192),
        labels: BTreeMap::new(),
        os: "linux".into(),
        arch: "x86_64".into(),
        pool: "default".into(),
        templates: vec![],
        max_sandboxes: 0,
        runtime: "sim".into(),
    }
}

pub(super) fn job_sample(j: &surge_scheduler::model::Job) -> JobSample {
    let c = j.counts;
    JobSample {
        id: j.id,
        key: j.idempotency_key.clone(),
        gang: j.spec.gang,
        count: j.spec.count,
        cpu_millis: j.spec.per_sandbox.cpu_millis,
        memory_mib: j.spec.per_sandbox.memory_mib,
        state: j.state.as_str().to_string(),
        pending: c.pending,
        placed: c.placed,
        running: c.running,
        paused: c.paused,
        succeeded: c.succeeded,
        failed: c.failed + c.oom_killed,
        lost: c.lost,
        cancelled: c.cancelled,
        preempted: c.preempted,
        submitted_index: j.submitted_index,
        pending_reason: j.pending_reason.clone(),
        // The simulator's workload has no constraints and its nodes no labels.
        constraints: Vec::new(),
    }
}

pub(super) fn samples(s: &ClusterState) -> (Vec<JobSample>, Vec<NodeSample>) {
    let jobs = s.jobs.values().map(job_sample).collect();
    let usage = s.node_usage();
    let nodes = s
        .nodes
        .values()
        .map(|n| {
            let u = usage.get(&n.spec.id).copied().unwrap_or_default();
            NodeSample {
                id: n.spec.id.clone(),
                state: n.state.as_str().to_string(),
                allocatable_cpu_millis: n.spec.allocatable.cpu_millis,
                allocatable_memory_mib: n.spec.allocatable.memory_mib,
                allocated_cpu_millis: u.allocated.cpu_millis,
                allocated_memory_mib: u.allocated.memory_mib,
                sandboxes: u.sandboxes,
                labels: Default::default(),
            }
        })
        .collect();
    (jobs, nodes)
}

impl Sim {
    pub fn new(cfg: SimConfig, seed: u64, dir: PathBuf) -> Arc<Self> {
        let world = Arc::new(World::new(seed));
        // Each replica keeps one election timeout for the whole run, drawn from the seed:
        // openraft draws it from `thread_rng` in [min, max), so max = min + 1 pins it.
        let election_timeout_ms = (1..=cfg.replicas)
            .map(|id| (id, world.rng(|r| r.range(150, 300))))
            .collect();
        let daemons = (0..cfg.nodes)
            .map(|i| {
                (
                    node_id(i),
                    Daemon {
                        up: true,
                        sandboxes: 0,
                    },
                )
            })
            .collect();
        Arc::new(Sim {
            cfg,
            world,
            dir,
            election_timeout_ms,
            replicas: Mutex::new(BTreeMap::new()),
            daemons: Mutex::new(daemons),
            events: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
        })
    }

    pub fn record(&self, process: Process, kind: EventType, op: Op) {
        let now = self.world.now_ms();
        lock(&self.events).push((now, process, kind, op));
    }

    pub fn take_events(&self) -> Vec<Recorded> {
        std::mem::take(&mut *lock(&self.events))
    }

    fn rng<T>(&self, f: impl FnOnce(&mut super::rng::SimRng) -> T) -> T {
        self.world.rng(f)
    }

    /// Read one running replica's applied state.
    fn read<T>(&self, id: NodeId, f: impl FnOnce(&ClusterState, u64) -> T) -> Option<T> {
        let state = lock(&self.replicas).get(&id).map(|r| r.state.clone())?;
        let guard = state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let applied = guard.last_applied.map(|l| l.index).unwrap_or(0);
        Some(f(&guard.app, applied))
    }

    fn is_leader(&self, id: NodeId) -> bool {
        self.world.raft(id).is_some_and(|r| {
            let m = r.metrics().borrow().clone();
            m.state == ServerState::Leader && m.current_leader == Some(id)
        })
    }

    /// The running replica that leads in the highest term, if any.
    fn leader(&self) -> Option<NodeId> {
        self.world
            .running()
            .into_iter()
            .filter_map(|id| {
                let r = self.world.raft(id)?;
                let m = r.metrics().borrow().clone();
                (m.state == ServerState::Leader).then_some((m.current_term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    async fn open_replica(self: &Arc<Self>, id: NodeId) -> Result<(), SimError> {
        let dir = self.dir.join(format!("replica-{id}"));
        // A crashed replica's last tasks may still hold the database for a moment (an RPC in
        // flight): retry, in simulated time, until RocksDB's lock is free.
        let mut attempts = 0;
        let storage = loop {
            match Storage::open(&dir) {
                Ok(s) => break s,
                Err(e) if attempts < 100 => {
                    attempts += 1;
                    tracing::debug!(id, error = %e, "replica storage busy; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(SimError::Storage(e.to_string())),
            }
        };
        let registry = prometheus::Registry::new();
        let metrics =
            Arc::new(RaftMetrics::new(&registry).map_err(|e| SimError::Storage(e.to_string()))?);
        let log = LogStore::new(storage.clone());
        let (sm, state, applied) =
            StateMachineStore::open(storage, ClusterState::default(), metrics)
                .map_err(|e| SimError::Storage(e.to_string()))?;
        let timeout = self.election_timeout_ms.get(&id).copied().unwrap_or(200);
        let config = Config {
            cluster_name: "sim".into(),
            heartbeat_interval: 50,
            election_timeout_min: timeout,
            election_timeout_max: timeout + 1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.cfg.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.cfg.logs_to_keep,
            snapshot_max_chunk_size: 64 * 1024,
            max_payload_entries: 64,
            install_snapshot_timeout: 2_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| SimError::Config(e.to_string()))?;
        let network = SimNetwork {
            from: id,
            world: self.world.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| SimError::Storage(e.to_string()))?;
        self.world.set_running(id, raft.clone());
        let host = SimHost {
            sim: self.clone(),
            id,
            state: state.clone(),
            applied,
        };
        let core = CoreConfig {
            planted: match self.cfg.inject {
                Some(InjectedBug::StaleQuietPlanner) => Some(PlantedBug::StaleQuiet),
                _ => None,
            },
            ..CoreConfig::new(self.cfg.node_ttl_ms)
        };
        let leader = Leader::start_with(host, core, &registry)
            .map_err(|e| SimError::Storage(e.to_string()))?;
        lock(&self.replicas).insert(
            id,
            Replica {
                raft,
                state,
                leader,
            },
        );
        self.world.trace(&format!("open replica {id}"));
        Ok(())
    }

    async fn crash_replica(&self, id: NodeId) {
        self.world.set_crashed(id);
        let replica = lock(&self.replicas).remove(&id);
        if let Some(r) = replica {
            r.leader.stop();
            if let Err(e) = r.raft.shutdown().await {
                tracing::debug!(id, error = %e, "shutdown of a crashed replica");
            }
        }
        self.world.trace(&format!("crash replica {id}"));
    }

    /// Propose through replica `via`, forwarded once to the leader it names (as
    /// `RaftNode::propose` forwards over `Cluster.Propose`).
    async fn propose(&self, via: NodeId, command: &Command) -> Result<Response, ProposeError> {
        let bytes = command.encode();
        let mut target = via;
        for _hop in 0..2 {
            let Some(raft) = self.world.raft(target) else {
                return Err(ProposeError::Refused(format!("replica {target} is down")));
            };
            let write = raft.client_write(RaftCommand(bytes.clone()));
            match tokio::time::timeout(PROPOSE_TIMEOUT, write).await {
                Err(_) => {
                    return Err(ProposeError::Unknown(format!(
                        "no commit within {PROPOSE_TIMEOUT:?}"
                    )))
                }
                Ok(Ok(reply)) => {
                    return Response::decode(&reply.data.0)
                        .map_err(|e| ProposeError::Unknown(format!("bad reply: {e}")))
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    match f.leader_id {
                        Some(l) if l != target && self.world.reachable(target, l) => {
                            self.world.forward_delay().await;
                            target = l;
                        }
                        _ => return Err(ProposeError::Refused("no leader".into())),
                    }
                }
                Ok(Err(e)) => return Err(ProposeError::Unknown(e.to_string())),
            }
        }
        Err(ProposeError::Refused(
            "forwarded without reaching the leader".into(),
        ))
    }

    /// A node's heartbeat reaches the leader side of every running replica (a real one reaches
    /// one replica, which forwards it to the leader; recording it everywhere is the simpler
    /// equivalent: only the leader acts on it).
    fn heartbeat(&self, node: &str) {
        let running = lock(&self.daemons).get(node).map_or(0, |d| d.sandboxes);
        let leaders: Vec<Arc<Leader<SimHost>>> = lock(&self.replicas)
            .values()
            .map(|r| r.leader.clone())
            .collect();
        for l in leaders {
            l.heartbeat(node, Resources::default(), running);
        }
    }

    fn random_replica(&self) -> NodeId {
        let n = self.cfg.replicas;
        self.rng(|r| r.range(1, n + 1))
    }

    // -----------------------------------------------------------------------------------------
    // The run

    pub async fn run(self: &Arc<Self>) -> Result<(), SimError> {
        for id in 1..=self.cfg.replicas {
            self.open_replica(id).await?;
        }
        let members: BTreeMap<NodeId, BasicNode> = (1..=self.cfg.replicas)
            .map(|id| (id, BasicNode::new(format!("sim-{id}"))))
            .collect();
        if let Some(raft) = self.world.raft(1) {
            raft.initialize(members)
                .await
                .map_err(|e| SimError::Storage(e.to_string()))?;
        }

        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for i in 0..self.cfg.nodes {
            tasks.push(tokio::spawn(daemon(self.clone(), node_id(i))));
        }
        tasks.push(tokio::spawn(sampler(self.clone())));
        let mut clients = Vec::new();
        for c in 0..self.cfg.clients {
            clients.push(tokio::spawn(client(self.clone(), c)));
        }

        let wall = std::time::Instant::now();
        self.faults().await?;
        tracing::debug!(wall = ?wall.elapsed(), "faults done");
        self.heal().await?;
        for c in clients {
            let _ = c.await;
        }
        self.record(
            Process::Faults,
            EventType::Info,
            Op::Healed {
                liveness_bound_ms: self.cfg.liveness_bound_ms,
            },
        );
        tracing::debug!(wall = ?wall.elapsed(), "healed");
        self.observe_liveness().await;
        tracing::debug!(wall = ?wall.elapsed(), now_ms = self.world.now_ms(), "liveness observed");
        for t in tasks {
            t.abort();
        }
        for r in lock(&self.replicas).values() {
            r.leader.stop();
        }
        self.converge().await;
        if let Some(bug) = self.cfg.inject {
            self.inject(bug);
        }
        tracing::debug!(wall = ?wall.elapsed(), now_ms = self.world.now_ms(), "converged");
        self.final_reads();
        for id in 1..=self.cfg.replicas {
            self.crash_replica(id).await;
        }
        Ok(())
    }

    /// After the heal: observe the leader's jobs and nodes until nothing placeable is pending,
    /// or the liveness bound (plus a margin, so the checker sees the late observation) passes.
    async fn observe_liveness(&self) {
        let started = self.world.now_ms();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(leader) = self.leader() else {
                if self.world.now_ms() > started + self.cfg.liveness_bound_ms + 1_000 {
                    return;
                }
                continue;
            };
            let Some((jobs, nodes)) = self.read(leader, |s, _| samples(s)) else {
                continue;
            };
            let stuck = jobs.iter().any(|j| crate::checker::placeable(j, &nodes));
            self.record(
                Process::Liveness,
                EventType::Ok,
                Op::ReadJobs {
                    replica: leader,
                    jobs,
                },
            );
            self.record(
                Process::Liveness,
                EventType::Ok,
                Op::ReadNodes {
                    replica: leader,
                    nodes,
                },
            );
            if !stuck || self.world.now_ms() > started + self.cfg.liveness_bound_ms + 1_000 {
                return;
            }
        }
    }

    /// Wait until every replica applied the same log (the scheduler and nodes are stopped).
    async fn converge(&self) {
        let started = self.world.now_ms();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let applied: Vec<Option<u64>> = (1..=self.cfg.replicas)
                .map(|id| self.read(id, |_, a| a))
                .collect();
            let last_log = self.leader().and_then(|l| {
                self.world
                    .raft(l)
                    .and_then(|r| r.metrics().borrow().last_log_index)
            });
            let first = applied.first().copied().flatten();
            let same = applied.iter().all(|a| *a == first);
            if (same && first.is_some() && first == last_log)
                || self.world.now_ms() > started + CONVERGE_WAIT_MS
            {
                return;
            }
        }
    }

    fn inject(&self, bug: InjectedBug) {
        match bug {
            // Planted in the leader's core at start (`CoreConfig::planted`).
            InjectedBug::StaleQuietPlanner | InjectedBug::NodeOversizedStarts => {}
            InjectedBug::LoseAcknowledgedJob => {
                // Corrupt replica 2's state behind Raft's back: drop the first acknowledged job.
                let Some(job) = lock(&self.acked).first().copied() else {
                    return;
                };
                let state = lock(&self.replicas).get(&2).map(|r| r.state.clone());
                if let Some(state) = state {
                    let mut g = state
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    g.app.jobs.remove(&job);
                }
                self.world.trace(&format!("injected: lost job {job}"));
            }
        }
    }

    fn final_reads(&self) {
        for id in 1..=self.cfg.replicas {
            let read = self.read(id, |s, applied| (samples(s).0, applied, s.hash()));
            match read {
                Some((jobs, applied_index, state_hash)) => {
                    self.world
                        .trace(&format!("final {id} {applied_index} {state_hash}"));
                    self.record(
                        Process::Final,
                        EventType::Ok,
                        Op::ReadJobs { replica: id, jobs },
                    );
                    self.record(
                        Process::Final,
                        EventType::Ok,
                        Op::ReplicaStatus {
                            replica: id,
                            applied_index,
                            state_hash,
                        },
                    );
                }
                None => {
                    let op = Op::ReplicaStatus {
                        replica: id,
                        applied_index: 0,
                        state_hash: String::new(),
                    };
                    self.record(Process::Final, EventType::Fail, op);
                }
            }
        }
    }
}
