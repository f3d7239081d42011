//! The simulated run's tasks: node daemons, the sampler and the workload clients.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use surge_scheduler::command::{Command, Response};
use surge_scheduler::leader::coalesce;
use surge_scheduler::model::{JobSpec, NodeState, Resources, RestartPolicy, Strategy};
use surge_scheduler::runs::SandboxState;
use surge_scheduler::ClusterState;

use super::{lock, node_spec, samples, ProposeError, Sim, ATTEMPTS_MAX, NODE_TICK_MS, SAMPLE_TICK};
use crate::history::{EventType, Op, Process, SandboxHolders};

/// A node daemon on the `sim` runtime: heartbeats, registers (again after being marked down),
/// runs what it is assigned for a seeded while, and reports Running, then Succeeded or Failed.
pub(super) async fn daemon(sim: Arc<Sim>, node: String) {
    let mut registered = false;
    loop {
        let tick = sim.rng(|r| r.range(NODE_TICK_MS.0, NODE_TICK_MS.1));
        tokio::time::sleep(Duration::from_millis(tick)).await;
        let now = sim.world.now_ms();
        {
            let mut d = lock(&sim.daemons);
            let Some(me) = d.get_mut(&node) else { return };
            if !me.up {
                registered = false;
                continue;
            }
        }
        sim.heartbeat(&node);
        let Some(leader) = sim.leader() else { continue };
        let Some((state, assigned)) = sim.read(leader, |s, _| {
            (s.nodes.get(&node).map(|n| n.state), s.assignments_of(&node))
        }) else {
            continue;
        };
        if !registered || state.is_none() || state == Some(NodeState::Down) {
            let c = Command::RegisterNode {
                node: node_spec(&node),
                at_ms: now,
            };
            let via = sim.random_replica();
            registered = matches!(sim.propose(via, &c).await, Ok(Response::NodeRegistered));
            continue;
        }
        let mut updates = Vec::new();
        {
            let mut d = lock(&sim.daemons);
            let Some(me) = d.get_mut(&node) else { return };
            let wanted: std::collections::BTreeSet<(u64, u32, u64)> = assigned
                .iter()
                .map(|a| (a.job, a.index, a.generation))
                .collect();
            me.running.retain(|k, _| wanted.contains(k));
            for a in &assigned {
                let key = (a.job, a.index, a.generation);
                match me.running.get(&key) {
                    None => {
                        let lasts = sim.world.rng(|r| r.range(500, 4_000));
                        me.running.insert(key, now + lasts);
                        updates.push((
                            a.job,
                            a.index,
                            a.generation,
                            SandboxState::Running,
                            0,
                            None,
                        ));
                    }
                    Some(&ends) if ends <= now => {
                        let failed = sim.world.rng(|r| r.chance(100));
                        let (st, code) = if failed {
                            (SandboxState::Failed, 1)
                        } else {
                            (SandboxState::Succeeded, 0)
                        };
                        updates.push((a.job, a.index, a.generation, st, code, None));
                    }
                    Some(_) => {}
                }
            }
        }
        if updates.is_empty() {
            continue;
        }
        // Through the leader's report batcher, as `Nodes.ReportStatus` does.
        let batcher = lock(&sim.replicas).get(&leader).map(|r| r.leader.clone());
        if let Some(batcher) = batcher {
            let _ = batcher.report(coalesce(&node, updates), Vec::new()).await;
        }
    }
}

/// Every 250 ms: one replica's nodes and jobs (for the overcommit and gang checkers), and every
/// running replica's applied index and state hash (two replicas at the same index must agree:
/// the `converged` checker's check of deterministic apply, during the run, not only at its end).
pub(super) async fn sampler(sim: Arc<Sim>) {
    loop {
        tokio::time::sleep(SAMPLE_TICK).await;
        for replica in sim.world.running() {
            if let Some((applied_index, state_hash)) = sim.read(replica, |s, a| (a, s.hash())) {
                sim.record(
                    Process::Sampler,
                    EventType::Ok,
                    Op::ReplicaStatus {
                        replica,
                        applied_index,
                        state_hash,
                    },
                );
            }
        }
        let id = sim.random_replica();
        if let Some((checked, doubles)) = sim.read(id, |s, _| live_holders(s)) {
            sim.record(
                Process::Sampler,
                EventType::Ok,
                Op::ReadAssignments {
                    replica: id,
                    checked,
                    running: 0,
                    doubles,
                    stale: Vec::new(),
                },
            );
        }
        if let Some((jobs, nodes)) = sim.read(id, |s, _| samples(s)) {
            sim.record(
                Process::Sampler,
                EventType::Ok,
                Op::ReadJobs { replica: id, jobs },
            );
            sim.record(
                Process::Sampler,
                EventType::Ok,
                Op::ReadNodes { replica: id, nodes },
            );
        }
    }
}

/// How many (live node, sandbox) assignments `s` holds, and every sandbox assigned to more than
/// one live node (ready or draining).
fn live_holders(s: &ClusterState) -> (u64, Vec<SandboxHolders>) {
    let mut holders: BTreeMap<(u64, u32), Vec<String>> = BTreeMap::new();
    let mut checked = 0u64;
    for (id, node) in &s.nodes {
        if !matches!(node.state, NodeState::Ready | NodeState::Draining) {
            continue;
        }
        for a in s.assignments_of(id) {
            checked += 1;
            holders
                .entry((a.job, a.index))
                .or_default()
                .push(id.clone());
        }
    }
    let doubles = holders
        .into_iter()
        .filter(|(_, nodes)| nodes.len() > 1)
        .map(|((job, index), nodes)| SandboxHolders { job, index, nodes })
        .collect();
    (checked, doubles)
}

/// A workload client: submissions under idempotency keys, retried as a real client retries
/// (same key), and some cancels of acknowledged jobs.
pub(super) async fn client(sim: Arc<Sim>, c: u32) {
    let p = Process::Client(c);
    for i in 0..sim.cfg.jobs_per_client {
        let pause = sim.rng(|r| r.range(100, 1_500));
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if sim.world.now_ms() >= sim.cfg.fault_phase_ms {
            return;
        }
        let key = format!("c{c}-{i}");
        let spec = sim.rng(|r| {
            let gang = r.chance(250);
            JobSpec {
                name: key.clone(),
                // Gangs up to 8 wide: some fill the cluster, so placement must wait or preempt.
                count: u32::try_from(r.range(1, if gang { 9 } else { 5 })).unwrap_or(1),
                per_sandbox: Resources::new(
                    r.pick(&[250, 500, 1_000, 2_000]).unwrap_or(500),
                    r.pick(&[256, 512, 1_024]).unwrap_or(256),
                ),
                template: "busybox".into(),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                // Mixed priorities, so the planner preempts (and must keep gangs whole doing so).
                priority: r.pick(&[0, 0, 5, 10]).unwrap_or(0),
                tenant: "sim".into(),
                gang,
                strategy: if r.chance(300) {
                    Strategy::Spread
                } else {
                    Strategy::Binpack
                },
                constraints: vec![],
                restart: if r.chance(250) {
                    RestartPolicy::OnFailure { max_restarts: 2 }
                } else {
                    RestartPolicy::Never
                },
            }
        });
        let mut acked = None;
        for _attempt in 0..ATTEMPTS_MAX {
            let via = sim.random_replica();
            sim.record(
                p,
                EventType::Invoke,
                Op::Submit {
                    key: key.clone(),
                    replica: via,
                    gang: spec.gang,
                    count: spec.count,
                    cpu_millis: spec.per_sandbox.cpu_millis,
                    memory_mib: spec.per_sandbox.memory_mib,
                },
            );
            let cmd = Command::SubmitJob {
                spec: spec.clone(),
                idempotency_key: key.clone(),
                at_ms: sim.world.now_ms(),
            };
            let error = |kind, error: String| {
                sim.record(
                    p,
                    kind,
                    Op::Error {
                        about: key.clone(),
                        error,
                    },
                )
            };
            match sim.propose(via, &cmd).await {
                Ok(Response::JobSubmitted { job_id, created }) => {
                    sim.record(
                        p,
                        EventType::Ok,
                        Op::Submitted {
                            key: key.clone(),
                            job_id,
                            created,
                        },
                    );
                    acked = Some(job_id);
                    break;
                }
                Ok(other) => {
                    error(EventType::Fail, format!("refused: {other:?}"));
                    break;
                }
                Err(ProposeError::Refused(e)) => error(EventType::Fail, e),
                Err(ProposeError::Unknown(e)) => error(EventType::Info, e),
            }
            let backoff = sim.rng(|r| r.range(100, 600));
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        let Some(job_id) = acked else { continue };
        lock(&sim.acked).push(job_id);
        if !sim.rng(|r| r.chance(250)) {
            continue;
        }
        let pause = sim.rng(|r| r.range(0, 1_500));
        tokio::time::sleep(Duration::from_millis(pause)).await;
        for _attempt in 0..ATTEMPTS_MAX {
            let via = sim.random_replica();
            sim.record(
                p,
                EventType::Invoke,
                Op::Cancel {
                    job_id,
                    replica: via,
                },
            );
            let cmd = Command::CancelJob {
                job_id,
                at_ms: sim.world.now_ms(),
            };
            let about = format!("job {job_id}");
            match sim.propose(via, &cmd).await {
                Ok(Response::JobCancelled { job }) => {
                    sim.record(
                        p,
                        EventType::Ok,
                        Op::Cancelled {
                            job_id,
                            state: job.state.as_str().to_string(),
                        },
                    );
                    break;
                }
                Ok(other) => {
                    sim.record(
                        p,
                        EventType::Fail,
                        Op::Error {
                            about,
                            error: format!("refused: {other:?}"),
                        },
                    );
                    break;
                }
                Err(ProposeError::Refused(error)) => {
                    sim.record(p, EventType::Fail, Op::Error { about, error })
                }
                Err(ProposeError::Unknown(error)) => {
                    sim.record(p, EventType::Info, Op::Error { about, error })
                }
            }
            let backoff = sim.rng(|r| r.range(100, 600));
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
    }
}
