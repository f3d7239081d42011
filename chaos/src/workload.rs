//! The workload: concurrent clients that submit jobs (plain and gang) under idempotency keys and
//! cancel some of them, retrying as a real client does, and a sampler that reads every node and
//! job while the faults go on. Everything they send and receive goes into the history.
//!
//! A client keeps at most `live_jobs_max` of its jobs uncancelled, so the cluster's capacity is
//! busy but not exhausted: pending jobs are then a sign of a fault, not of a full cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use surge_proto::jobs as pb;
use surge_proto::node::ListNodesRequest;

use crate::faults::Rng;
use crate::history::{
    in_flight, EventType, HostCopy, JobSample, NodeSample, Op, Process, Recorder,
};
use crate::holdings;
pub use crate::lid::lid_op;
use surge_client::open as client;
use surge_harness::containers::{self, ContainerDaemon};

/// Longest one attempt waits for its reply; then it counts as indeterminate and is retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client keeps retrying one operation before it gives up on it.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// Most jobs one read of the sampler pages through.
pub const SAMPLE_JOBS_MAX: usize = 100_000;
/// Most gang jobs watched at once. A watcher lives until its job ends, which is when a client
/// cancels it, and a cancel can give up: a gang beyond this is judged by the sampler alone.
pub const WATCHES_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub clients: u32,
    /// Replica id and gRPC address of every replica: each attempt picks one.
    pub replicas: Vec<(u64, String)>,
    pub tenant: String,
    /// Operations started after this are not started.
    pub deadline: Instant,
    /// Most operations one client starts.
    pub ops_max: u64,
    /// Most uncancelled jobs a client keeps.
    pub live_jobs_max: usize,
    /// Set when the gang watchers should stop.
    pub stop_watches: Arc<AtomicBool>,
    /// Whether container nodes run: then some jobs are small real ones for them.
    pub container_jobs: bool,
    /// Whether the container nodes can checkpoint: then some container jobs are long counters
    /// the clients checkpoint, resume and fork (see [`lid_op`]).
    pub lid_ops: bool,
}

/// The node label that keeps simulated and real work apart: simulated nodes carry
/// `chaos=sim`, container daemons `chaos=container`, and every job is constrained to one class,
/// so real commands never land on a simulated node nor hour-long simulated sandboxes on the two
/// small container nodes.
pub const CLASS_LABEL: &str = "chaos";
pub const SIM_CLASS: &str = "sim";
pub const CONTAINER_CLASS: &str = "container";
/// Share of submissions (percent) that are container jobs when container nodes run.
pub const CONTAINER_JOBS_PERCENT: u64 = 20;
/// Share of container jobs (percent) that are checkpointable counters, when the container
/// nodes can checkpoint.
pub const LID_JOBS_PERCENT: u64 = 40;
/// Share of a client's turns (percent) spent on a checkpoint, resume or fork of one of its
/// counters, when it has one.
pub const LID_OPS_PERCENT: u64 = 25;
/// Most forks one fork operation asks for (the container nodes are small).
pub const LID_FORKS_MAX: u32 = 2;

mod asks;
use asks::{ask, container_ask, lid_ask, Ask};

/// An error is definite (the request was refused before it could take effect) only for a
/// rejection of the request itself; a timeout, a lost leader or a dropped connection leave the
/// outcome unknown.
pub(crate) fn completion_of(status: &tonic::Status) -> EventType {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => EventType::Fail,
        _ => EventType::Info,
    }
}

/// Run the clients until the deadline (or `ops_max`); returns when all are done.
pub async fn run(cfg: WorkloadConfig, recorder: Recorder) {
    let cfg = Arc::new(cfg);
    let watches = Arc::new(tokio::sync::Semaphore::new(WATCHES_MAX));
    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let cfg = cfg.clone();
        let recorder = recorder.clone();
        let watches = watches.clone();
        tasks.push(tokio::spawn(async move {
            client_loop(&cfg, c, &recorder, &watches).await
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            recorder.record(
                Process::Final,
                EventType::Info,
                Op::Note {
                    text: format!("a client task ended abnormally: {e}"),
                },
            );
        }
    }
}

async fn client_loop(
    cfg: &WorkloadConfig,
    me: u32,
    recorder: &Recorder,
    watches: &Arc<tokio::sync::Semaphore>,
) {
    let mut rng = Rng::fork(cfg.seed, 0xC11E_0000 + u64::from(me));
    // This client's jobs that are not cancelled yet, oldest first.
    let mut live: Vec<u64> = Vec::new();
    // Of those, its checkpointable counters.
    let mut lids: Vec<u64> = Vec::new();
    let mut n = 0u64;
    while Instant::now() < cfg.deadline && n < cfg.ops_max {
        n += 1;
        // No draw at all without checkpointing container nodes: a seed names the same workload.
        if cfg.lid_ops && !lids.is_empty() && rng.chance(LID_OPS_PERCENT) {
            let job = lids[rng.index(lids.len())];
            if let Some(fork) = lid_op(cfg, me, &mut rng, recorder, job, n).await {
                live.push(fork);
            }
            tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
            continue;
        }
        let cancel = !live.is_empty() && (live.len() >= cfg.live_jobs_max || rng.chance(15));
        if cancel {
            let job = live.remove(rng.index(live.len()));
            lids.retain(|j| *j != job);
            cancel_job(cfg, me, &mut rng, recorder, job).await;
        } else {
            let key = format!("c{me}-{n}");
            // No draw at all without container nodes: a seed names the same workload as before.
            let a = if cfg.container_jobs && rng.chance(CONTAINER_JOBS_PERCENT) {
                if cfg.lid_ops && rng.chance(LID_JOBS_PERCENT) {
                    lid_ask()
                } else {
                    container_ask(&mut rng)
                }
            } else {
                ask(&mut rng)
            };
            if let Some(id) = submit(cfg, me, &mut rng, recorder, &key, &a).await {
                live.push(id);
                if a.lid {
                    lids.push(id);
                }
                if a.gang {
                    // Drawn whether or not a watcher starts: a seed names one workload.
                    let first = rng.next_u64();
                    if let Ok(permit) = watches.clone().try_acquire_owned() {
                        let replicas = cfg.replicas.clone();
                        let stop = cfg.stop_watches.clone();
                        let recorder = recorder.clone();
                        tokio::spawn(async move {
                            watch_gang(id, first, replicas, stop, recorder).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
    }
}

pub(crate) fn pick(cfg: &WorkloadConfig, rng: &mut Rng) -> (u64, String) {
    cfg.replicas[rng.index(cfg.replicas.len())].clone()
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100 * u64::from(attempt)).min(1000))
}

/// Submit under `key` until acknowledged, refused, or `RETRY_FOR` passes.
async fn submit(
    cfg: &WorkloadConfig,
    me: u32,
    rng: &mut Rng,
    recorder: &Recorder,
    key: &str,
    a: &Ask,
) -> Option<u64> {
    let process = Process::Client(me);
    let started = Instant::now();
    let mut attempt = 0;
    while started.elapsed() < RETRY_FOR {
        attempt += 1;
        let (replica, addr) = pick(cfg, rng);
        recorder.record(
            process,
            EventType::Invoke,
            Op::Submit {
                key: key.to_string(),
                replica,
                gang: a.gang,
                count: a.count,
                cpu_millis: a.cpu_millis,
                memory_mib: a.memory_mib,
            },
        );
        let req = pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                count: a.count,
                cpu_millis: a.cpu_millis,
                memory_mib: a.memory_mib,
                template: "busybox".into(),
                command: a.command.clone(),
                tenant: cfg.tenant.clone(),
                gang: a.gang,
                name: key.to_string(),
                user: a.user.to_string(),
                constraints: vec![pb::Constraint {
                    key: CLASS_LABEL.into(),
                    op: "=".into(),
                    value: a.class.into(),
                }],
                ..Default::default()
            }),
            idempotency_key: key.to_string(),
        };
        let reply = match client::jobs(&addr) {
            Ok(mut c) => tokio::time::timeout(ATTEMPT_TIMEOUT, c.submit_job(req))
                .await
                .map_err(|_| {
                    tonic::Status::deadline_exceeded("no reply within the attempt timeout")
                })
                .and_then(|r| r),
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        };
        match reply {
            Ok(r) => {
                let r = r.into_inner();
                recorder.record(
                    process,
                    EventType::Ok,
                    Op::Submitted {
                        key: key.to_string(),
                        job_id: r.job_id,
                        created: r.created,
                    },
                );
                return Some(r.job_id);
            }
            Err(s) => {
                let kind = completion_of(&s);
                recorder.record(
                    process,
                    kind,
                    Op::Error {
                        about: key.to_string(),
                        error: format!("{:?}: {}", s.code(), s.message()),
                    },
                );
                if kind == EventType::Fail {
                    return None;
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
    None
}

/// Cancel `job` until acknowledged, refused, or `RETRY_FOR` passes.
async fn cancel_job(cfg: &WorkloadConfig, me: u32, rng: &mut Rng, recorder: &Recorder, job: u64) {
    let process = Process::Client(me);
    let started = Instant::now();
    let mut attempt = 0;
    while started.elapsed() < RETRY_FOR {
        attempt += 1;
        let (replica, addr) = pick(cfg, rng);
        recorder.record(
            process,
            EventType::Invoke,
            Op::Cancel {
                job_id: job,
                replica,
            },
        );
        let reply = match client::jobs(&addr) {
            Ok(mut c) => tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                c.cancel_job(pb::CancelJobRequest { job_id: job }),
            )
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no reply within the attempt timeout"))
            .and_then(|r| r),
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        };
        match reply {
            Ok(r) => {
                recorder.record(
                    process,
                    EventType::Ok,
                    Op::Cancelled {
                        job_id: job,
                        state: r.into_inner().state().name().to_string(),
                    },
                );
                return;
            }
            Err(s) => {
                let kind = completion_of(&s);
                recorder.record(
                    process,
                    kind,
                    Op::Error {
                        about: format!("job {job}"),
                        error: format!("{:?}: {}", s.code(), s.message()),
                    },
                );
                if kind == EventType::Fail {
                    return;
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Follow every committed change of gang job `job` (`WatchJob`), reconnecting to the next replica
/// when a stream breaks, until the job ends or `stop` is set. Each change is recorded as a read of
/// that one job, which the gang checker judges like any sample.
async fn watch_gang(
    job: u64,
    first: u64,
    replicas: Vec<(u64, String)>,
    stop: Arc<AtomicBool>,
    recorder: Recorder,
) {
    // `first % len` then onwards: the same turns as counting from `first`.
    let mut turn = crate::faults::index_of(first, replicas.len());
    while !stop.load(Ordering::Relaxed) && !replicas.is_empty() {
        let (replica, addr) = &replicas[turn % replicas.len()];
        turn += 1;
        let Ok(mut c) = client::jobs(addr) else {
            return;
        };
        let opened = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            c.watch_job(pb::GetJobRequest { job_id: job }),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                // Quiet: check the stop flag and keep waiting.
                Err(_) => continue,
                Ok(Ok(Some(j))) => {
                    let sample = job_sample(&j);
                    let done = matches!(sample.state.as_str(), "cancelled" | "complete" | "failed");
                    recorder.record(
                        Process::Watch,
                        EventType::Ok,
                        Op::ReadJobs {
                            replica: *replica,
                            jobs: vec![sample],
                        },
                    );
                    if done {
                        return;
                    }
                }
                // The stream broke (replica killed or paused): watch from the next one.
                Ok(Ok(None)) | Ok(Err(_)) => break,
            }
        }
    }
}

pub fn job_sample(j: &pb::Job) -> JobSample {
    let spec = j.spec.clone().unwrap_or_default();
    let c = j.counts.unwrap_or_default();
    JobSample {
        id: j.id,
        key: j.idempotency_key.clone(),
        gang: spec.gang,
        count: spec.count,
        cpu_millis: spec.cpu_millis,
        memory_mib: spec.memory_mib,
        state: j.state().name().to_string(),
        pending: c.pending,
        placed: c.placed,
        running: c.running,
        paused: c.paused,
        succeeded: c.succeeded,
        failed: c.failed,
        lost: c.lost,
        cancelled: c.cancelled,
        preempted: c.preempted,
        submitted_index: j.submitted_index,
        pending_reason: j.pending_reason.clone(),
        constraints: spec
            .constraints
            .iter()
            .map(|c| {
                let op = if c.op == "!=" { "!=" } else { "=" };
                format!("{}{op}{}", c.key, c.value)
            })
            .collect(),
    }
}

/// Every job of `tenant` as replica `addr` sees it (a linearizable read there), page by page.
pub async fn read_jobs(addr: &str, tenant: &str) -> Result<Vec<JobSample>, String> {
    let mut c = client::jobs(addr).map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    let mut before_id = 0;
    while all.len() < SAMPLE_JOBS_MAX {
        let req = pb::ListJobsRequest {
            tenant: tenant.to_string(),
            state: pb::JobState::Unspecified as i32,
            limit: 10_000,
            before_id,
            labels: Default::default(),
        };
        let page = match tokio::time::timeout(ATTEMPT_TIMEOUT, c.list_jobs(req)).await {
            Err(_) => return Err("no reply to ListJobs within the attempt timeout".into()),
            Ok(Err(s)) => return Err(format!("{:?}: {}", s.code(), s.message())),
            Ok(Ok(r)) => r.into_inner().jobs,
        };
        let Some(last) = page.last() else { break };
        before_id = last.id;
        all.extend(page.iter().map(job_sample));
    }
    Ok(all)
}

/// Sandbox `job`.`index` as replica `addr` tells it (state, node, exit code, message, output).
pub async fn sandbox_info(addr: &str, job: u64, index: u32) -> Result<pb::SandboxInfo, String> {
    let mut c = client::jobs(addr).map_err(|e| e.to_string())?;
    let req = pb::GetSandboxRequest { job_id: job, index };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, c.get_sandbox(req)).await {
        Err(_) => Err("no reply to GetSandbox within the attempt timeout".into()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Every node as replica `addr` sees it.
pub async fn read_nodes(addr: &str) -> Result<Vec<NodeSample>, String> {
    let mut c = client::nodes(addr).map_err(|e| e.to_string())?;
    let nodes = match tokio::time::timeout(ATTEMPT_TIMEOUT, c.list_nodes(ListNodesRequest {})).await
    {
        Err(_) => return Err("no reply to ListNodes within the attempt timeout".into()),
        Ok(Err(s)) => return Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(Ok(r)) => r.into_inner().nodes,
    };
    Ok(nodes
        .into_iter()
        .map(|n| {
            let a = n.allocatable.unwrap_or_default();
            let b = n.allocated.unwrap_or_default();
            let state = n.state().name().to_string();
            NodeSample {
                id: n.node_id,
                state,
                allocatable_cpu_millis: a.cpu_millis,
                allocatable_memory_mib: a.memory_mib,
                allocated_cpu_millis: b.cpu_millis,
                allocated_memory_mib: b.memory_mib,
                sandboxes: n.sandboxes,
                labels: n.labels.into_iter().collect(),
            }
        })
        .collect())
}

/// One read of jobs and one of nodes from `replica`, recorded as `process`'s operations. Returns
/// whether both succeeded.
pub async fn observe(
    recorder: &Recorder,
    process: Process,
    replica: u64,
    addr: &str,
    tenant: &str,
) -> Option<(Vec<JobSample>, Vec<NodeSample>)> {
    let jobs = match read_jobs(addr, tenant).await {
        Ok(j) => j,
        Err(e) => {
            recorder.record(
                process,
                EventType::Info,
                Op::Note {
                    text: format!("read of replica {replica}'s jobs failed: {e}"),
                },
            );
            return None;
        }
    };
    // Only the jobs in flight go into the history: see `Op::ReadJobs`.
    recorder.record(
        process,
        EventType::Ok,
        Op::ReadJobs {
            replica,
            jobs: jobs.iter().filter(|j| in_flight(j)).cloned().collect(),
        },
    );
    let nodes = match read_nodes(addr).await {
        Ok(n) => n,
        Err(e) => {
            recorder.record(
                process,
                EventType::Info,
                Op::Note {
                    text: format!("read of replica {replica}'s nodes failed: {e}"),
                },
            );
            return None;
        }
    };
    recorder.record(
        process,
        EventType::Ok,
        Op::ReadNodes {
            replica,
            nodes: nodes.clone(),
        },
    );
    Some((jobs, nodes))
}

/// Sample nodes and jobs from the replicas in turn every `every` until `stop` is set; after each
/// read of the nodes, which live node holds which sandbox (see [`crate::holdings`]), from the
/// same replica and from the container daemons' hosts.
pub async fn sample(
    replicas: Vec<(u64, String)>,
    tenant: String,
    every: Duration,
    daemons: Vec<ContainerDaemon>,
    stop: Arc<AtomicBool>,
    recorder: Recorder,
) {
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) && !replicas.is_empty() {
        let (id, addr) = &replicas[turn % replicas.len()];
        turn += 1;
        let began = Instant::now();
        if let Some((_, nodes)) = observe(&recorder, Process::Sampler, *id, addr, &tenant).await {
            sample_holdings(&recorder, *id, addr, &nodes, &daemons).await;
        }
        // One sample every `every` while reads are quick; back to back when they are not.
        tokio::time::sleep(every.saturating_sub(began.elapsed())).await;
    }
}

/// One `ReadAssignments` sample: the live nodes of `nodes` (just read from replica `replica`),
/// their desired sets from that replica, and what the container daemons' hosts run. A sample
/// with a failed read is not recorded (a partial view proves nothing either way).
pub async fn sample_holdings(
    recorder: &Recorder,
    replica: u64,
    addr: &str,
    nodes: &[NodeSample],
    daemons: &[ContainerDaemon],
) {
    let live = holdings::live_nodes(nodes);
    let note = |text: String| {
        recorder.record(Process::Sampler, EventType::Info, Op::Note { text });
    };
    let mut all = match holdings::assigned(addr, &live).await {
        Ok(a) => a,
        Err(e) => {
            return note(format!(
                "read of replica {replica}'s assignments failed: {e}"
            ))
        }
    };
    let daemons_empty = daemons.is_empty();
    let daemons = daemons.to_vec();
    let copies = tokio::task::spawn_blocking(move || {
        daemons
            .iter()
            .map(|d| {
                let copies = containers::running_copies(d)?;
                Ok(copies
                    .into_iter()
                    .map(|c| holdings::Holding {
                        node: d.node.clone(),
                        job: c.job,
                        index: c.index,
                        generation: c.generation,
                        running: true,
                    })
                    .collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .await;
    match copies {
        Ok(Ok(c)) => {
            let c: Vec<holdings::Holding> = c.into_iter().flatten().collect();
            if !daemons_empty {
                recorder.record(
                    Process::Sampler,
                    EventType::Ok,
                    Op::ReadHosts {
                        copies: c
                            .iter()
                            .map(|h| HostCopy {
                                node: h.node.clone(),
                                job: h.job,
                                index: h.index,
                                generation: h.generation,
                            })
                            .collect(),
                    },
                );
            }
            all.extend(c);
        }
        Ok(Err(e)) => return note(format!("read of the container daemons' state failed: {e}")),
        Err(e) => return note(format!("read of the container daemons' state failed: {e}")),
    }
    let h = holdings::live_holders(&live, &all);
    recorder.record(
        Process::Sampler,
        EventType::Ok,
        Op::ReadAssignments {
            replica,
            checked: h.checked,
            running: h.running,
            doubles: h.doubles,
            stale: h.stale,
        },
    );
}
