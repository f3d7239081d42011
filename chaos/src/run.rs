//! One chaos run, start to end:
//!
//! ```text
//!  start replicas + node daemons ──> workload clients ─┐
//!  (simulated, and container         sampler ──────────┤  (all recording into one history)
//!   nodes on crun)                   fault injector ───┘
//!  deadline ──> heal everything ──> clients finish ──> liveness wait ──> convergence
//!           ──> final reads of every replica ──> checkers ──> report
//!           ──> stop everything ──> remove the container nodes' containers, mounts, cgroups
//! ```
//!
//! Every step records what it saw in the history; the checkers judge the history alone. The
//! history is not kept in memory: the [`Recorder`] streams it to `history.jsonl` in the run's
//! directory (or the file [`ChaosConfig::history`] names) and folds the checkers and the report's
//! counts over it as it goes ([`RunFold`]), so a run of hours holds what the checkers keep, not
//! every sample. The last step is judged apart: anything of the container nodes still on the host
//! after it is a `containers_cleaned_up` violation.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checker::{self, Violation};
use crate::faults::{self, FaultKind, GroupKind, Injector, NodeGroup};
use crate::history::{EventType, Op, Process, Recorder};
use crate::memory::{MemoryFigures, MemoryWatch};
use crate::report::FAILURE_NOTE;
pub use crate::report::{
    is_container_job, ContainerFigures, Operations, Report, RunFacts, RunFold,
    CONTAINER_FAILURES_MAX,
};
use crate::workload::{self, WorkloadConfig, CLASS_LABEL, CONTAINER_CLASS, SIM_CLASS};
use surge_harness::cluster::{ClusterError, LocalCluster};
use surge_harness::containers::{self, ContainerDaemon};
use surge_harness::netns::Net;

/// The tenant every job of a run belongs to.
pub const TENANT: &str = "chaos";
/// How long the replicas may take to reach one applied index and state hash at the end.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the final read of one replica's jobs is retried before it counts as unanswered.
pub const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long node daemons may take to register at the start.
pub const NODES_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Node TTL the replicas run with unless told otherwise: `surge server`'s own default.
pub const NODE_TTL_MS_DEFAULT: u64 = 10_000;
/// Most node groups (node daemon processes) one run starts.
pub const NODE_GROUPS_MAX: u32 = 64;
/// The check, after the run, that the container nodes left nothing on the host.
pub const LEFTOVERS_CHECKER: &str = "containers_cleaned_up";
/// Most idempotency keys one run's workload may use (clients x operations per client). The
/// checkers keep a few events per key (`acknowledged_once`), so this bounds their memory: at the
/// default (4 clients x 100,000) a few hundred MB at most; the workload of an hour uses ~60,000.
pub const KEYS_MAX: u64 = 1_000_000;
/// The history file in the run's directory, unless [`ChaosConfig::history`] names another.
pub const HISTORY_FILE: &str = "history.jsonl";
/// Most container node daemons one run starts.
pub const CONTAINER_NODES_MAX: u32 = 8;
/// What each container node offers: small, like the jobs meant for it.
pub const CONTAINER_NODE_CPUS: u32 = 2;
pub const CONTAINER_NODE_MEMORY_MIB: u64 = 2048;

#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// The `surge` binary that runs replicas and node daemons.
    pub bin: PathBuf,
    pub seed: u64,
    pub duration: Duration,
    pub faults: Vec<FaultKind>,
    pub replicas: u64,
    pub nodes: u32,
    /// Node daemon processes the nodes are split over (the unit of the `nodes` fault).
    pub node_groups: u32,
    /// Real node daemons on the container runtime, besides the simulated nodes (each also a
    /// unit of the `nodes` fault). Needs root and crun: see [`surge_harness::containers::usable`].
    pub container_nodes: u32,
    /// Container nodes run with `--checkpoint` and the workload checkpoints, resumes and forks
    /// some of their sandboxes (`checkpoint_restored_once`). Default: when the CRIU kit of
    /// `scripts/setup-criu` is usable here ([`checkpoint_kit_usable`]).
    pub container_checkpoint: bool,
    pub node_cpus: u32,
    pub node_memory_mib: u64,
    pub clients: u32,
    pub ops_max_per_client: u64,
    pub live_jobs_max_per_client: usize,
    pub node_ttl_ms: u64,
    /// After the faults heal, every placeable pending job is placed within this.
    pub liveness_bound: Duration,
    pub sample_every: Duration,
    /// Where the cluster's data dirs and logs go (a temp dir when `None`, removed at the end
    /// unless `keep`).
    pub dir: Option<PathBuf>,
    pub keep: bool,
    /// Where the history goes, as JSON lines (default: [`HISTORY_FILE`] in the run's directory,
    /// removed with it).
    pub history: Option<PathBuf>,
}

impl ChaosConfig {
    pub fn new(bin: PathBuf, seed: u64) -> Self {
        ChaosConfig {
            bin,
            seed,
            duration: Duration::from_secs(60),
            faults: default_faults(),
            replicas: 3,
            nodes: 20,
            node_groups: 4,
            container_nodes: 0,
            container_checkpoint: checkpoint_kit_usable().is_ok(),
            node_cpus: 16,
            node_memory_mib: 65_536,
            clients: 4,
            ops_max_per_client: 100_000,
            live_jobs_max_per_client: 20,
            node_ttl_ms: NODE_TTL_MS_DEFAULT,
            liveness_bound: Duration::from_secs(30),
            sample_every: Duration::from_millis(400),
            dir: None,
            keep: false,
            history: None,
        }
    }
}

/// Whether the CRIU kit a `surge node --checkpoint` uses is installed and passes its probe (at
/// `$SURGE_CRIU_PREFIX`, default `/opt/surge-crun-criu`); why not, when it is not.
pub fn checkpoint_kit_usable() -> Result<(), String> {
    use surge_node::runtime::container::checkpoint::{CriuKit, KIT_PREFIX_DEFAULT};
    let prefix = std::env::var_os("SURGE_CRIU_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KIT_PREFIX_DEFAULT));
    CriuKit::probe(&prefix).map(|_| ())
}

/// Every fault kind; partitions only where the harness can create network namespaces (root).
pub fn default_faults() -> Vec<FaultKind> {
    let root = surge_harness::netns::available();
    faults::FAULT_KINDS
        .iter()
        .copied()
        .filter(|k| root || *k != FaultKind::Partition)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("cannot set up the cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("cannot create the run directory or the history file: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// Removes the container nodes' work from the host when dropped (after the daemons are dead:
/// declare it before the cluster, so that it drops after it), whatever way the run ends.
struct ContainerCleanup {
    daemons: Vec<ContainerDaemon>,
    root: PathBuf,
}

impl ContainerCleanup {
    /// Clean up now; what is still left.
    fn finish(&mut self) -> Vec<String> {
        let daemons = std::mem::take(&mut self.daemons);
        if daemons.is_empty() {
            return Vec::new();
        }
        containers::cleanup(&daemons, &self.root);
        containers::leftovers(&daemons, &self.root)
    }
}

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        let left = self.finish();
        if !left.is_empty() {
            tracing::warn!(?left, "container nodes left work behind");
        }
    }
}

/// Wait until `n` nodes are ready as replica `addr` sees them.
async fn wait_nodes_ready(addr: &str, n: usize) -> Result<(), ChaosError> {
    let deadline = Instant::now() + NODES_READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match workload::read_nodes(addr).await {
            Ok(nodes) => {
                let ready = nodes.iter().filter(|x| x.state == "ready").count();
                if ready >= n {
                    return Ok(());
                }
                last = format!("{ready} of {n} nodes ready");
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(ChaosError::Setup(format!(
        "node daemons did not register within {NODES_READY_TIMEOUT:?}: {last}"
    )))
}

/// Start the cluster, run workload and faults, heal, check. Returns the report (which says where
/// the history is, when kept). Must be called from a long-lived thread (the replicas die with the
/// thread that started them).
pub async fn run(cfg: &ChaosConfig) -> Result<Report, ChaosError> {
    let started = Instant::now();
    if cfg.container_nodes > CONTAINER_NODES_MAX {
        return Err(ChaosError::Setup(format!(
            "{} container nodes; at most {CONTAINER_NODES_MAX}",
            cfg.container_nodes
        )));
    }
    if u64::from(cfg.clients).saturating_mul(cfg.ops_max_per_client) > KEYS_MAX {
        return Err(ChaosError::Setup(format!(
            "{} clients x {} operations: at most {KEYS_MAX} keys in one run",
            cfg.clients, cfg.ops_max_per_client
        )));
    }
    let mut tmp = None;
    let root = match &cfg.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            // Absolute: a container node's data dir must be (overlay mount options).
            std::fs::canonicalize(d)?
        }
        None => {
            let t = tempfile::Builder::new().prefix("surge-chaos-").tempdir()?;
            let p = t.path().to_path_buf();
            tmp = Some(t);
            p
        }
    };
    if cfg.keep {
        if let Some(t) = &mut tmp {
            t.disable_cleanup(true);
        }
    }
    // Declared before the cluster so that it drops after it: the daemons die first.
    let mut cleanup = ContainerCleanup {
        daemons: Vec::new(),
        root: root.clone(),
    };
    let ttl = cfg.node_ttl_ms.to_string();
    let mut cluster =
        LocalCluster::new(&cfg.bin, &root, cfg.replicas, None)?.with_args(&["--node-ttl-ms", &ttl]);
    if cfg.faults.contains(&FaultKind::Partition) {
        // Partitions cut links between replicas: each needs its own network host.
        let net = Net::create(&cluster.ids()).map_err(|e| {
            ChaosError::Setup(format!(
                "partition faults need the replicas on network namespaces: {e}"
            ))
        })?;
        cluster = cluster.with_netns(net)?;
    }
    cluster.start_all()?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    tracing::info!(leader, dir = %root.display(), "cluster up");

    let groups = node_groups(cfg);
    for g in &groups {
        let args: Vec<&str> = g.args.iter().map(String::as_str).collect();
        match g.kind {
            GroupKind::Sim => cluster.start_sim_nodes(&g.name, g.count, &args)?,
            GroupKind::Container => {
                cleanup.daemons.push(ContainerDaemon {
                    node: g.name.clone(),
                    data_dir: cluster.container_node_dir(&g.name),
                });
                cluster.start_container_node(&g.name, &args)?
            }
        }
    }
    let daemons = cleanup.daemons.clone();
    let replicas: Vec<(u64, String)> = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.addr(id).ok().map(|a| (id, a)))
        .collect();
    wait_nodes_ready(
        &cluster.addr(leader)?,
        (cfg.nodes + cfg.container_nodes) as usize,
    )
    .await?;
    tracing::info!(
        nodes = cfg.nodes,
        container_nodes = cfg.container_nodes,
        groups = groups.len(),
        "nodes ready"
    );

    let history_path = cfg
        .history
        .clone()
        .unwrap_or_else(|| root.join(HISTORY_FILE));
    let (recorder, recording) = Recorder::start(Some(&history_path), RunFold::default())?;
    let deadline = Instant::now() + cfg.duration;
    let (stop_memory, memory) = watch_memory(Instant::now());
    let stop_watches = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(workload::run(
        WorkloadConfig {
            seed: cfg.seed,
            clients: cfg.clients,
            replicas: replicas.clone(),
            tenant: TENANT.to_string(),
            deadline,
            ops_max: cfg.ops_max_per_client,
            live_jobs_max: cfg.live_jobs_max_per_client,
            stop_watches: stop_watches.clone(),
            container_jobs: !daemons.is_empty(),
            lid_ops: !daemons.is_empty() && cfg.container_checkpoint,
        },
        recorder.clone(),
    ));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(workload::sample(
        replicas.clone(),
        TENANT.to_string(),
        cfg.sample_every,
        daemons.clone(),
        stop_sampler.clone(),
        recorder.clone(),
    ));

    // The injector runs on this task: it owns the cluster, whose processes must be started from
    // this (long-lived) thread.
    let plan = faults::schedule(
        cfg.seed,
        &cfg.faults,
        u64::try_from(cfg.duration.as_millis()).unwrap_or(u64::MAX),
        cfg.node_ttl_ms,
    );
    {
        let mut injector = Injector {
            cluster: &mut cluster,
            groups: groups.clone(),
            recorder: recorder.clone(),
        };
        injector.run(&plan, deadline).await;
    }
    recorder.record(
        Process::Faults,
        EventType::Info,
        Op::Healed {
            liveness_bound_ms: u64::try_from(cfg.liveness_bound.as_millis()).unwrap_or(u64::MAX),
        },
    );
    tracing::info!("faults healed; waiting for the clients to finish");
    if let Err(e) = work.await {
        recorder.record(
            Process::Final,
            EventType::Info,
            Op::Note {
                text: format!("workload ended abnormally: {e}"),
            },
        );
    }
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = sampler.await;

    // Liveness: observe from the leader until nothing placeable is pending, or the bound.
    let until = Instant::now() + cfg.liveness_bound;
    loop {
        let (id, addr) = match cluster.wait_leader(Duration::from_secs(5)).await {
            Ok(l) => (l, cluster.addr(l)?),
            Err(_) => replicas[0].clone(),
        };
        if let Some((jobs, nodes)) =
            workload::observe(&recorder, Process::Liveness, id, &addr, TENANT).await
        {
            if !jobs.iter().any(|j| checker::placeable(j, &nodes)) {
                break;
            }
        }
        if Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    stop_watches.store(true, Ordering::Relaxed);

    // Convergence: every replica at one applied index and state hash.
    let ids = cluster.ids();
    match cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await {
        Ok(s) => {
            for id in &ids {
                recorder.record(
                    Process::Final,
                    EventType::Ok,
                    Op::ReplicaStatus {
                        replica: *id,
                        applied_index: s.applied_index,
                        state_hash: s.state_hash.clone(),
                    },
                );
            }
        }
        Err(e) => {
            // Record what each replica says now: the checker shows where they differ.
            recorder.record(
                Process::Final,
                EventType::Info,
                Op::Note {
                    text: e.to_string(),
                },
            );
            for id in &ids {
                match cluster.status(*id).await {
                    Ok(s) => recorder.record(
                        Process::Final,
                        EventType::Ok,
                        Op::ReplicaStatus {
                            replica: *id,
                            applied_index: s.applied_index,
                            state_hash: s.state_hash,
                        },
                    ),
                    Err(e) => {
                        recorder.record(
                            Process::Final,
                            EventType::Fail,
                            Op::ReplicaStatus {
                                replica: *id,
                                applied_index: 0,
                                state_hash: String::new(),
                            },
                        );
                        recorder.record(Process::Final, EventType::Info, Op::Note { text: e });
                    }
                }
            }
        }
    }

    // Final reads: every job on every replica. A read may meet a replica that is still catching
    // up or an election after the last heal; like a client, the harness retries it for a while,
    // and only a replica that never answers counts against the run.
    let mut failed_container_jobs: Option<Vec<(u64, u32)>> = None;
    for (id, addr) in &replicas {
        let until = Instant::now() + FINAL_READ_TIMEOUT;
        let read = loop {
            match workload::read_jobs(addr, TENANT).await {
                Ok(jobs) => break Ok(jobs),
                Err(e) if Instant::now() >= until => break Err(e),
                Err(e) => {
                    recorder.record(
                        Process::Final,
                        EventType::Info,
                        Op::Note {
                            text: format!("final read of replica {id} failed, retrying: {e}"),
                        },
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        match read {
            Ok(jobs) => {
                if failed_container_jobs.is_none() {
                    failed_container_jobs = Some(
                        jobs.iter()
                            .filter(|j| is_container_job(j) && j.failed > 0)
                            .map(|j| (j.id, j.count))
                            .collect::<Vec<_>>(),
                    );
                }
                recorder.record(
                    Process::Final,
                    EventType::Ok,
                    Op::ReadJobs { replica: *id, jobs },
                )
            }
            Err(e) => {
                recorder.record(
                    Process::Final,
                    EventType::Fail,
                    Op::ReadJobs {
                        replica: *id,
                        jobs: Vec::new(),
                    },
                );
                recorder.record(Process::Final, EventType::Info, Op::Note { text: e });
            }
        }
    }
    // Why container sandboxes failed, when some did: not a property the checkers judge (a start
    // can fail on a loaded host), but the report says it.
    if let Some((_, addr)) = replicas.first() {
        let failed: Vec<(u64, u32)> = failed_container_jobs
            .iter()
            .flatten()
            .flat_map(|&(job, count)| (0..count).map(move |i| (job, i)))
            .take(CONTAINER_FAILURES_MAX * 4)
            .collect();
        let mut told = 0;
        for (job, index) in failed {
            if told >= CONTAINER_FAILURES_MAX {
                break;
            }
            if let Ok(s) = workload::sandbox_info(addr, job, index).await {
                if matches!(s.state().name(), "failed" | "oom-killed") {
                    told += 1;
                    let tail: String = {
                        let chars: Vec<char> = s.log_tail.chars().collect();
                        chars[chars.len().saturating_sub(200)..].iter().collect()
                    };
                    let text = format!(
                        "{FAILURE_NOTE}{job}.{index} {} on node {} (generation {}): exit code {}, message {:?}, output tail {:?}",
                        s.state().name(), s.node, s.generation, s.exit_code, s.message, tail
                    );
                    recorder.record(Process::Final, EventType::Info, Op::Note { text });
                }
            }
        }
    }
    // The children still run: their peaks are read now.
    let _ = stop_memory.send(());
    let memory = match memory.await {
        Ok(watch) => watch.finish(),
        Err(e) => {
            tracing::warn!("the memory sampler ended abnormally: {e}");
            MemoryFigures::default()
        }
    };
    let recorded = recording.finish();
    if let Some(e) = &recorded.write_error {
        // The checkers saw every event; only the file is incomplete.
        tracing::warn!(
            "the history file {} is incomplete: {e}",
            history_path.display()
        );
    }
    let facts = RunFacts {
        seed: cfg.seed,
        duration: cfg.duration,
        elapsed: started.elapsed(),
        container_nodes: cfg.container_nodes,
        memory,
    };
    let mut report = Report::new(facts, &recorded.fold);
    drop(recorded);
    // A failed run keeps its data dirs and logs: the post-mortem needs them, and a replay is not
    // exact (the schedule is, the timing of the processes is not).
    let keep = cfg.keep || cfg.dir.is_some() || !report.violations.is_empty();
    if keep {
        if let Some(t) = &mut tmp {
            t.disable_cleanup(true);
        }
        report.data_dir = Some(root.clone());
    }
    if keep || cfg.history.is_some() {
        report.history = Some(history_path);
    }
    if !report.violations.is_empty() {
        for id in cluster.ids() {
            tracing::warn!(
                "--- replica {id} log tail ---\n{}",
                cluster.log_tail(id, 20)
            );
        }
    }
    cluster.stop_all(Duration::from_secs(2));
    drop(cluster);
    let left = cleanup.finish();
    if !left.is_empty() {
        report.violations.push(Violation {
            checker: LEFTOVERS_CHECKER.to_string(),
            count: left.len() as u64,
            message: format!(
                "{} thing(s) of the container nodes left on the host after the run, first: {}",
                left.len(),
                left[0]
            ),
            counterexample: serde_json::json!({ "leftovers": left }),
        });
        report.verdict = "fail".to_string();
    }
    report.containers.leftovers = left;
    drop(cleanup);
    drop(tmp);
    Ok(report)
}

/// Sample the run's memory (see [`crate::memory`]) until told to stop; the task returns the
/// watch, whose `finish` takes a last sample.
fn watch_memory(
    started: Instant,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<MemoryWatch>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut watch = MemoryWatch::new(started);
        loop {
            watch.sample();
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(watch.every()) => {}
            }
        }
        watch
    });
    (stop, task)
}

/// The simulated nodes split as evenly as possible over the groups (`g0`, `g1`, ...), then one
/// group per container node (`ctr-PID-0`, ...: the harness's pid keeps the container nodes'
/// cgroups (`/surge/NODE`) apart from those of another run on the same host).
pub fn node_groups(cfg: &ChaosConfig) -> Vec<NodeGroup> {
    let n = cfg
        .node_groups
        .clamp(1, NODE_GROUPS_MAX)
        .min(cfg.nodes.max(1));
    let args = vec![
        "--cpus".to_string(),
        cfg.node_cpus.to_string(),
        "--memory-mib".to_string(),
        cfg.node_memory_mib.to_string(),
        // Sandboxes outlive the run: a gang whose sandboxes finish one by one is not partial.
        "--sim-duration-ms".to_string(),
        "3600000".to_string(),
        "--label".to_string(),
        format!("{CLASS_LABEL}={SIM_CLASS}"),
    ];
    let sim = (0..n)
        .map(|i| NodeGroup {
            name: format!("g{i}"),
            count: cfg.nodes / n + u32::from(i < cfg.nodes % n),
            args: args.clone(),
            kind: GroupKind::Sim,
        })
        .filter(|g| g.count > 0);
    let mut container_args = vec![
        "--cpus".to_string(),
        CONTAINER_NODE_CPUS.to_string(),
        "--memory-mib".to_string(),
        CONTAINER_NODE_MEMORY_MIB.to_string(),
        "--label".to_string(),
        format!("{CLASS_LABEL}={CONTAINER_CLASS}"),
    ];
    if cfg.container_checkpoint {
        container_args.push("--checkpoint".to_string());
    }
    let pid = std::process::id();
    let containers = (0..cfg.container_nodes.min(CONTAINER_NODES_MAX)).map(|i| NodeGroup {
        name: format!("ctr-{pid}-{i}"),
        count: 1,
        args: container_args.clone(),
        kind: GroupKind::Container,
    });
    sim.chain(containers).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_nodes_get_their_own_groups_and_labels() {
        let mut cfg = ChaosConfig::new(PathBuf::from("surge"), 1);
        cfg.container_nodes = 2;
        let groups = node_groups(&cfg);
        let ctr: Vec<&NodeGroup> = groups
            .iter()
            .filter(|g| g.kind == GroupKind::Container)
            .collect();
        assert_eq!(ctr.len(), 2);
        assert!(ctr.iter().all(|g| g.count == 1
            && g.name.starts_with("ctr-")
            && g.args.iter().any(|a| a == "chaos=container")));
        let sim: u32 = groups
            .iter()
            .filter(|g| g.kind == GroupKind::Sim)
            .map(|g| g.count)
            .sum();
        assert_eq!(sim, cfg.nodes);
        assert!(groups
            .iter()
            .filter(|g| g.kind == GroupKind::Sim)
            .all(|g| g.args.iter().any(|a| a == "chaos=sim")));
    }
}
