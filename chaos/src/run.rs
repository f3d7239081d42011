//! One chaos run, start to end:
//!
//! ```text
//!  start replicas + node groups ──> workload clients ─┐
//!                                   sampler ──────────┤  (all recording into one history)
//!                                   fault injector ───┘
//!  deadline ──> heal everything ──> clients finish ──> liveness wait ──> convergence
//!           ──> final reads of every replica ──> checkers ──> report
//! ```
//!
//! Every step records what it saw in the [`History`]; the checkers then judge the history alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::checker::{self, Violation};
use crate::cluster::{ClusterError, LocalCluster};
use crate::faults::{self, FaultKind, Injector, NodeGroup};
use crate::history::{EventType, History, Op, Process, Recorder};
use crate::netns::Net;
use crate::workload::{self, WorkloadConfig};

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
            node_cpus: 16,
            node_memory_mib: 65_536,
            clients: 4,
            ops_max_per_client: 100_000,
            live_jobs_max_per_client: 20,
            node_ttl_ms: NODE_TTL_MS_DEFAULT,
            liveness_bound: Duration::from_secs(30),
            sample_every: Duration::from_millis(500),
            dir: None,
            keep: false,
        }
    }
}

/// Every fault kind; partitions only where the harness can create network namespaces (root).
pub fn default_faults() -> Vec<FaultKind> {
    let root = crate::netns::available();
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
    #[error("cannot create the run directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Operations {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    pub submissions_acknowledged: u64,
    pub keys_submitted: u64,
    pub cancels_acknowledged: u64,
    pub samples: u64,
    pub events: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_ms: u64,
    pub elapsed_ms: u64,
    pub faults: BTreeMap<String, u64>,
    pub faults_total: u64,
    pub operations: Operations,
    pub checkers: Vec<String>,
    pub violations: Vec<Violation>,
    /// "pass" or "fail".
    pub verdict: String,
    /// Where the data dirs and logs are, when kept.
    pub data_dir: Option<PathBuf>,
}

impl Report {
    pub fn from_history(
        cfg: &ChaosConfig,
        h: &History,
        elapsed: Duration,
        data_dir: Option<PathBuf>,
    ) -> Self {
        let violations = checker::check_all(h);
        let (ok, fail, info) = h.client_outcomes();
        let mut keys = std::collections::BTreeSet::new();
        let mut acked = std::collections::BTreeSet::new();
        let mut cancels = 0;
        let mut samples = 0;
        for e in &h.events {
            match (&e.op, e.kind) {
                (Op::Submit { key, .. }, EventType::Invoke) => {
                    keys.insert(key.clone());
                }
                (Op::Submitted { key, .. }, EventType::Ok) => {
                    acked.insert(key.clone());
                }
                (Op::Cancelled { .. }, EventType::Ok) => cancels += 1,
                (Op::ReadJobs { .. } | Op::ReadNodes { .. }, EventType::Ok) => samples += 1,
                _ => {}
            }
        }
        let faults = h.faults_by_kind();
        Report {
            seed: cfg.seed,
            duration_ms: u64::try_from(cfg.duration.as_millis()).unwrap_or(u64::MAX),
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            faults_total: faults.values().sum(),
            faults,
            operations: Operations {
                ok,
                fail,
                info,
                submissions_acknowledged: acked.len() as u64,
                keys_submitted: keys.len() as u64,
                cancels_acknowledged: cancels,
                samples,
                events: h.events.len() as u64,
            },
            checkers: checker::CHECKERS
                .iter()
                .map(|(n, _)| n.to_string())
                .collect(),
            verdict: if violations.is_empty() {
                "pass"
            } else {
                "fail"
            }
            .to_string(),
            violations,
            data_dir,
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

/// Start the cluster, run workload and faults, heal, check. Returns the report and the history.
/// Must be called from a long-lived thread (the replicas die with the thread that started them).
pub async fn run(cfg: &ChaosConfig) -> Result<(Report, History), ChaosError> {
    let started = Instant::now();
    let mut tmp = None;
    let root = match &cfg.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
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
        cluster.start_sim_nodes(&g.name, g.count, &args)?;
    }
    let replicas: Vec<(u64, String)> = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.addr(id).ok().map(|a| (id, a)))
        .collect();
    wait_nodes_ready(&cluster.addr(leader)?, cfg.nodes as usize).await?;
    tracing::info!(nodes = cfg.nodes, groups = groups.len(), "nodes ready");

    let recorder = Recorder::new();
    let deadline = Instant::now() + cfg.duration;
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
        },
        recorder.clone(),
    ));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(workload::sample(
        replicas.clone(),
        TENANT.to_string(),
        cfg.sample_every,
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
            Ok(jobs) => recorder.record(
                Process::Final,
                EventType::Ok,
                Op::ReadJobs { replica: *id, jobs },
            ),
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
    let history = recorder.history();
    let mut report = Report::from_history(cfg, &history, started.elapsed(), None);
    // A failed run keeps its data dirs and logs: the post-mortem needs them, and a replay is not
    // exact (the schedule is, the timing of the processes is not).
    let keep = cfg.keep || cfg.dir.is_some() || !report.violations.is_empty();
    if keep {
        if let Some(t) = &mut tmp {
            t.disable_cleanup(true);
        }
        report.data_dir = Some(root.clone());
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
    drop(tmp);
    Ok((report, history))
}

/// The nodes split as evenly as possible over the groups (`g0`, `g1`, ...).
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
    ];
    (0..n)
        .map(|i| NodeGroup {
            name: format!("g{i}"),
            count: cfg.nodes / n + u32::from(i < cfg.nodes % n),
            args: args.clone(),
        })
        .filter(|g| g.count > 0)
        .collect()
}
