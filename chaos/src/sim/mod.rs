//! Deterministic simulation of the replicated core: one seed, one run, exactly reproducible.
//!
//! ```text
//!   one current-thread tokio runtime, clock paused (time jumps to the next timer when idle)
//!   ┌──────────────────────────────────────────────────────────────────────────────────┐
//!   │ replica 1..3: openraft::Raft + surge_raft::store (RocksDB on tmpfs)              │
//!   │               + surge_scheduler::ClusterState       ◄── net::SimNetwork ──►      │
//!   │               + surge_scheduler::leader::Leader (the production shell and core)  │
//!   │ node daemons: surge_node NodeCore + Fleet           clients (submit, cancel)     │
//!   │ fault schedule (crash/restart, partitions, loss, daemons leaving)   sampler      │
//!   └──────────────────── every decision drawn from World's one SimRng ────────────────┘
//!        history ──► crate::checker::check_all        network + final states ──► digest
//! ```
//!
//! [`run_seed`] builds the world from a seed and returns the verdict of the same checkers the
//! real-process harness uses, plus a digest of everything that happened (every message hop with
//! its simulated time and fate, every fault, every history event, the final state hashes): the
//! same seed gives the same digest, which is what `tests/t72_sim.rs` asserts.
//!
//! **The leader is production code.** Each replica runs `surge_scheduler::leader::Leader`, the
//! same async shell and pure core a real replica runs (TTLs, the incremental planner, report
//! batching), through a `leader::Host` over the simulated replica whose clock is the paused
//! tokio clock. Bugs planted in that core (`InjectedBug::StaleQuietPlanner`) are thus bugs of
//! the code that ships.
//!
//! **So are the node daemons.** Each runs `surge_node::agent::node_core::NodeCore`, the part of
//! the real node agent that turns the desired set into reconciler actions, over the simulated
//! fleet and runtime (`scenario/tasks.rs`, `SimNode`): the assignments come from the leader's
//! applied state as `WatchAssignments` would send them, sandbox ends from the fleet's timer
//! queue on the paused clock, status reports through the real reporter's `Outbox` to the
//! leader's report batcher. How long a sandbox runs and whether it fails are drawn from the
//! seed when it starts. A bug planted in that core (`InjectedBug::NodeOversizedStarts`) is a
//! bug of the shipped node code.
//!
//! **Sources of nondeterminism and what is done about each.**
//! - Time: only tokio's clock is read, and it is paused; surge code under test takes its clock
//!   from the commands (`at_ms`), which the simulator fills from the simulated clock.
//! - openraft's election timeout comes from `thread_rng` in `[min, max)`: each replica gets
//!   `max = min + 1` with `min` drawn from the seed, so the draw is always `min`.
//! - `tokio::select!` without `biased;` polls its branches in an order drawn from a per-runtime
//!   RNG that only `--cfg tokio_unstable` (`Builder::rng_seed`) can seed. Building the whole
//!   workspace with that flag is not worth it: openraft's core loop is `biased`, and its only
//!   unbiased `select!` on our path is the replication backoff, which runs only after an
//!   `Unreachable` error — the simulated network reports every failure as `Network` instead, so
//!   that loop never runs. The same-seed-twice test is the measurement: any leak shows up as a
//!   different digest.
//! - Hash maps: the simulator keeps everything in `BTreeMap`s; the state machine does too (its
//!   hash would differ between replicas otherwise, which the `converged` checker would catch).
//! - Task order: a current-thread runtime runs ready tasks in FIFO order; no task is spawned on
//!   another thread (RocksDB's background threads do not change what reads return).
//!
//! **What is not simulated.** The gRPC transport and the `RaftNode` wrapper (proposal
//! forwarding, read index): proposals go straight to `Raft::client_write`, forwarded once to
//! the leader a follower names, as `RaftNode::propose` does. Disk faults (torn writes, lost
//! fsyncs): a crash keeps everything RocksDB wrote, like a killed process on a live kernel.
//! Membership changes (wiping a replica and re-adding it).

mod net;
mod rng;
mod scenario;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checker::{self, Violation};
use crate::history::History;
pub use net::NetStats;
pub use rng::SimRng;

/// Replicas a simulation runs at most.
pub const REPLICAS_MAX: u64 = 7;
/// Node daemons a simulation runs at most.
pub const NODES_MAX: u32 = 64;
/// Clients a simulation runs at most.
pub const CLIENTS_MAX: u32 = 64;
/// Seeds one sweep runs at most.
pub const SEEDS_MAX: u64 = 10_000_000;

/// A bug planted on purpose, to prove the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InjectedBug {
    /// Before the final reads, replica 2 silently forgets the first acknowledged job.
    LoseAcknowledgedJob,
    /// The leader's planner (the production core, `surge_scheduler::leader::core`) keeps a
    /// quiet queue quiet after the capacity changed: jobs that waited stay pending.
    StaleQuietPlanner,
    /// The node core (the production `surge_node::agent::node_core`) starts sandboxes with twice
    /// the resources assigned, and reports them: nodes end up allocated beyond what they offer.
    NodeOversizedStarts,
}

impl InjectedBug {
    /// Every bug, for `--inject`.
    pub const ALL: [InjectedBug; 3] = [
        InjectedBug::LoseAcknowledgedJob,
        InjectedBug::StaleQuietPlanner,
        InjectedBug::NodeOversizedStarts,
    ];

    /// The name `--inject` takes.
    pub fn name(self) -> &'static str {
        match self {
            InjectedBug::LoseAcknowledgedJob => "lose-acknowledged-job",
            InjectedBug::StaleQuietPlanner => "stale-quiet-planner",
            InjectedBug::NodeOversizedStarts => "node-oversized-starts",
        }
    }
}

impl std::str::FromStr for InjectedBug {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InjectedBug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = InjectedBug::ALL.iter().map(|b| b.name()).collect();
                SimError::Config(format!("no bug named {s}; known: {}", names.join(", ")))
            })
    }
}

/// The shape of one simulated run; the seed decides everything else.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub replicas: u64,
    pub nodes: u32,
    pub clients: u32,
    pub jobs_per_client: u32,
    /// Simulated milliseconds of faults and workload.
    pub fault_phase_ms: u64,
    /// After the heal, every placeable pending job must be placed within this.
    pub liveness_bound_ms: u64,
    /// The leader marks a node down after this much silence.
    pub node_ttl_ms: u64,
    /// Snapshot after this many entries (small, so snapshots and their install are exercised).
    pub snapshot_every_entries: u64,
    pub logs_to_keep: u64,
    pub inject: Option<InjectedBug>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            replicas: 3,
            nodes: 4,
            clients: 3,
            jobs_per_client: 5,
            fault_phase_ms: 10_000,
            liveness_bound_ms: 20_000,
            node_ttl_ms: 3_000,
            snapshot_every_entries: 20,
            logs_to_keep: 5,
            inject: None,
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |s: String| Err(SimError::Config(s));
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return bad(format!(
                "replicas {}: between 1 and {REPLICAS_MAX}",
                self.replicas
            ));
        }
        if self.nodes == 0 || self.nodes > NODES_MAX {
            return bad(format!("nodes {}: between 1 and {NODES_MAX}", self.nodes));
        }
        if self.clients > CLIENTS_MAX {
            return bad(format!("clients {}: at most {CLIENTS_MAX}", self.clients));
        }
        if self.snapshot_every_entries == 0 {
            return bad("snapshot_every_entries must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulation config: {0}")]
    Config(String),
    #[error("simulated replica storage: {0}")]
    Storage(String),
    #[error("simulation runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("seed {seed} (replay: {replay}): {source}")]
    Seed {
        seed: u64,
        replay: String,
        source: Box<SimError>,
    },
}

/// The verdict and fingerprint of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SimOutcome {
    pub seed: u64,
    /// SHA-256 over the network trace and the history: equal seeds, equal digests.
    pub digest: String,
    pub violations: Vec<Violation>,
    pub faults: BTreeMap<String, u64>,
    /// Client operations completed: acknowledged, refused, unknown.
    pub ops_ok: u64,
    pub ops_fail: u64,
    pub ops_info: u64,
    pub network: NetStats,
    /// Simulated milliseconds the run lasted.
    pub simulated_ms: u64,
    /// The command that replays this seed.
    pub replay: String,
    #[serde(skip)]
    pub history: History,
}

/// The command line that replays `seed` under `cfg`.
pub fn replay_command(seed: u64, cfg: &SimConfig) -> String {
    let d = SimConfig::default();
    let mut cmd = format!("surge chaos sim --seeds {seed}..{}", seed.saturating_add(1));
    if cfg.replicas != d.replicas {
        cmd.push_str(&format!(" --replicas {}", cfg.replicas));
    }
    if cfg.nodes != d.nodes {
        cmd.push_str(&format!(" --nodes {}", cfg.nodes));
    }
    if cfg.fault_phase_ms != d.fault_phase_ms {
        cmd.push_str(&format!(" --fault-ms {}", cfg.fault_phase_ms));
    }
    if let Some(bug) = cfg.inject {
        cmd.push_str(&format!(" --inject {}", bug.name()));
    }
    cmd
}

fn sim_dir() -> std::io::Result<tempfile::TempDir> {
    // tmpfs makes RocksDB's synced writes cheap; the simulation does not depend on where.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("surge-sim-")
            .tempdir_in(shm)
        {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix("surge-sim-").tempdir()
}

/// Run one seed on a fresh current-thread runtime with a paused clock.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<SimOutcome, SimError> {
    cfg.validate()?;
    let dir = sim_dir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    let path: PathBuf = dir.path().to_path_buf();
    let (sim, result, simulated_ms) = runtime.block_on(async {
        let sim = scenario::Sim::new(cfg.clone(), seed, path);
        let result = sim.run().await;
        let simulated_ms = sim.world.now_ms();
        (sim, result, simulated_ms)
    });
    result?;
    // Dropping the runtime ends every task still holding a replica's database before the
    // temp dir goes.
    drop(runtime);
    let history = History::from_events(sim.take_events());
    let violations = checker::check_all(&history);
    let mut digest = Sha256::new();
    digest.update(sim.world.trace_digest().as_bytes());
    for e in &history.events {
        digest.update(serde_json::to_vec(e).unwrap_or_default());
    }
    let digest: String = digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (ops_ok, ops_fail, ops_info) = history.client_outcomes();
    let outcome = SimOutcome {
        seed,
        digest,
        violations,
        faults: history.faults_by_kind(),
        ops_ok,
        ops_fail,
        ops_info,
        network: sim.world.stats(),
        simulated_ms,
        replay: replay_command(seed, cfg),
        history,
    };
    drop(dir);
    Ok(outcome)
}

/// Run every seed of `seeds` in order, calling `each` after each one; stops early at the first
/// failing seed when `fail_fast`.
pub fn sweep(
    seeds: std::ops::Range<u64>,
    cfg: &SimConfig,
    fail_fast: bool,
    mut each: impl FnMut(&SimOutcome),
) -> Result<SweepReport, SimError> {
    if seeds.end.saturating_sub(seeds.start) > SEEDS_MAX {
        return Err(SimError::Config(format!(
            "{} seeds in one sweep; the limit is {SEEDS_MAX}",
            seeds.end - seeds.start
        )));
    }
    let mut report = SweepReport::default();
    for seed in seeds {
        let o = run_seed(seed, cfg).map_err(|e| SimError::Seed {
            seed,
            replay: replay_command(seed, cfg),
            source: Box::new(e),
        })?;
        each(&o);
        report.add(&o);
        if fail_fast && !o.violations.is_empty() {
            break;
        }
    }
    Ok(report)
}

/// Totals of a sweep.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepReport {
    pub seeds: u64,
    /// Chained SHA-256 of every seed's digest, in order: two sweeps of the same seeds agree on
    /// it exactly when every seed replayed identically.
    pub digest: String,
    pub failed_seeds: Vec<u64>,
    /// The first failing seed's violations, in full.
    pub first_failure: Option<SimOutcomeSummary>,
    pub faults: BTreeMap<String, u64>,
    pub ops_ok: u64,
    pub ops_fail: u64,
    pub ops_info: u64,
    pub messages: u64,
    pub simulated_ms: u64,
}

/// A failing seed as a sweep reports it.
#[derive(Clone, Debug, Serialize)]
pub struct SimOutcomeSummary {
    pub seed: u64,
    pub replay: String,
    pub digest: String,
    pub violations: Vec<Violation>,
}

impl SweepReport {
    pub fn add(&mut self, o: &SimOutcome) {
        self.seeds += 1;
        let mut chain = Sha256::new();
        chain.update(self.digest.as_bytes());
        chain.update(o.digest.as_bytes());
        self.digest = chain
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (k, n) in &o.faults {
            *self.faults.entry(k.clone()).or_insert(0) += n;
        }
        self.ops_ok += o.ops_ok;
        self.ops_fail += o.ops_fail;
        self.ops_info += o.ops_info;
        self.messages += o.network.messages;
        self.simulated_ms += o.simulated_ms;
        if !o.violations.is_empty() {
            self.failed_seeds.push(o.seed);
            if self.first_failure.is_none() {
                self.first_failure = Some(SimOutcomeSummary {
                    seed: o.seed,
                    replay: o.replay.clone(),
                    digest: o.digest.clone(),
                    violations: o.violations.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
