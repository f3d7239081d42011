//! The simulated run's tasks: node daemons, the sampler and the workload clients.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use surge_node::agent::node_core::{NodeCore, NodePlantedBug};
use surge_node::agent::report::{Outbox, ReportEvent, REPORT_BATCH_MAX};
use surge_node::agent::{AgentError, NodeConfig, NodeMetrics};
use surge_node::runtime::sim::{SimProfile, SimRuntime};
use surge_proto::node as pn;
use surge_scheduler::command::{Command, Response};
use surge_scheduler::convert::assignments_to_pb;
use surge_scheduler::leader::coalesce;
use surge_scheduler::model::{JobSpec, NodeState, Resources, RestartPolicy, Strategy};
use surge_scheduler::runs::SandboxState;
use surge_scheduler::ClusterState;
use tokio::time::Instant;

use super::{lock, node_spec, samples, ProposeError, Sim, ATTEMPTS_MAX, NODE_TICK_MS, SAMPLE_TICK};
use crate::history::{EventType, Op, Process, SandboxHolders};
use crate::sim::InjectedBug;

/// How long a simulated sandbox runs by itself (simulated milliseconds, drawn per start).
const SANDBOX_RUN_MS: (u64, u64) = (500, 4_000);
/// Simulated sandboxes that end failed, per mille.
const SANDBOX_FAIL_PER_MILLE: u64 = 100;

/// One sandbox's status as the leader's report batcher takes it.
type StatusUpdate = (u64, u32, u64, SandboxState, i32, Option<Resources>);

/// A node daemon: heartbeats, registers (again after being marked down), and runs the real
/// node core (`surge_node::agent::node_core::NodeCore` over the simulated fleet and runtime)
/// on the assignments its leader's applied state holds; the core's status reports go through
/// the real reporter outbox to the leader's report batcher, as `Nodes.ReportStatus` does.
pub(super) async fn daemon(sim: Arc<Sim>, node: String) {
    let mut registered = false;
    // The daemon's host: `None` while it is down (a host that died takes its sandboxes along).
    let mut host: Option<SimNode> = None;
    loop {
        let tick = sim.rng(|r| r.range(NODE_TICK_MS.0, NODE_TICK_MS.1));
        tokio::time::sleep(Duration::from_millis(tick)).await;
        let now_ms = sim.world.now_ms();
        let up = match lock(&sim.daemons).get(&node) {
            Some(me) => me.up,
            None => return,
        };
        if !up {
            registered = false;
            host = None;
            continue;
        }
        sim.heartbeat(&node);
        let Some(leader) = sim.leader() else { continue };
        let Some((state, assigned)) = sim.read(leader, |s, applied| {
            (
                s.nodes.get(&node).map(|n| n.state),
                assignments_to_pb(s, &node, applied),
            )
        }) else {
            continue;
        };
        if !registered || state.is_none() || state == Some(NodeState::Down) {
            let c = Command::RegisterNode {
                node: node_spec(&node),
                at_ms: now_ms,
            };
            let via = sim.random_replica();
            registered = matches!(sim.propose(via, &c).await, Ok(Response::NodeRegistered));
            continue;
        }
        if host.is_none() {
            match SimNode::new(&sim, &node) {
                Ok(h) => host = Some(h),
                Err(e) => {
                    sim.world.trace(&format!("node {node} cannot start: {e}"));
                    return;
                }
            }
        }
        let Some(h) = host.as_mut() else { continue };
        let batch = h.step(&assigned);
        if let Some(d) = lock(&sim.daemons).get_mut(&node) {
            d.sandboxes = h.sandboxes();
        }
        if batch.is_empty() {
            continue;
        }
        let updates = batch.iter().filter_map(update_of).collect();
        // Through the leader's report batcher, as `Nodes.ReportStatus` does; what it did not
        // take goes back into the outbox for the next tick, as the real reporter retries.
        let batcher = lock(&sim.replicas).get(&leader).map(|r| r.leader.clone());
        let sent = match batcher {
            Some(b) => b.report(coalesce(&node, updates), Vec::new()).await.is_ok(),
            None => false,
        };
        let accepted = if sent { batch.len() } else { 0 };
        h.outbox.settle(batch, accepted);
    }
}

/// One simulated node host: the real node core over the simulated fleet and runtime, and the
/// real reporter's outbox.
struct SimNode {
    core: NodeCore<SimRuntime>,
    outbox: Outbox,
}

impl SimNode {
    fn new(sim: &Arc<Sim>, node: &str) -> Result<SimNode, AgentError> {
        let world = sim.world.clone();
        // Each sandbox runs a seeded while, and one in ten fails: drawn when it starts.
        let runtime = SimRuntime::with_profiles(move |_| {
            world.rng(|r| SimProfile {
                run_for: Duration::from_millis(r.range(SANDBOX_RUN_MS.0, SANDBOX_RUN_MS.1)),
                exit_code: i32::from(r.chance(SANDBOX_FAIL_PER_MILLE)),
                ..SimProfile::default()
            })
        });
        let spec = node_spec(node);
        let allocatable = surge_node::reconcile::Resources {
            cpu_millis: spec.allocatable.cpu_millis,
            memory_mib: spec.allocatable.memory_mib,
        };
        let config = NodeConfig::new(node, allocatable);
        let metrics = Arc::new(NodeMetrics::new()?);
        let mut core = NodeCore::simulated(config, Arc::new(runtime), metrics);
        if sim.cfg.inject == Some(InjectedBug::NodeOversizedStarts) {
            core.plant(NodePlantedBug::OversizedStarts);
        }
        Ok(SimNode {
            core,
            outbox: Outbox::default(),
        })
    }

    /// One daemon tick at the paused clock's `now`: the full desired set in, ends that came
    /// due, one reconcile pass; returns the next batch of status reports to send.
    fn step(&mut self, assigned: &pn::Assignments) -> Vec<pn::SandboxStatus> {
        let now = Instant::now();
        self.core.apply(assigned);
        self.core.tick(now);
        if self.core.is_complete() {
            self.core.pass(now);
        }
        for event in self.core.take_events() {
            match event {
                ReportEvent::Status(s) => self.outbox.record(s),
                ReportEvent::Forget { id, generation } => self.outbox.forget(id, generation),
            }
        }
        self.outbox.take_batch(REPORT_BATCH_MAX)
    }

    /// Sandboxes the node holds alive (what its heartbeat says).
    fn sandboxes(&self) -> u32 {
        let live = self.core.view().live().len();
        u32::try_from(live).unwrap_or(u32::MAX)
    }
}

/// A node's status report as the leader takes it (what `Nodes.ReportStatus` does with each
/// update); a state the leader does not know is dropped, as the service refuses it.
fn update_of(u: &pn::SandboxStatus) -> Option<StatusUpdate> {
    let state = surge_scheduler::convert::sandbox_state_from_pb(u.state)?;
    let resources = u
        .resources
        .as_ref()
        .map(|r| Resources::new(r.cpu_millis, r.memory_mib));
    Some((
        u.job_id,
        u.index,
        u.generation,
        state,
        u.exit_code,
        resources,
    ))
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
                labels: Default::default(),
                lifetime: Default::default(),
                user: String::new(),
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::sim::SimConfig;

    fn assignments(revision: u64, sandboxes: Vec<pn::Sandbox>) -> pn::Assignments {
        pn::Assignments {
            revision,
            full: true,
            sandboxes,
            removed: Vec::new(),
        }
    }

    fn states(batch: &[pn::SandboxStatus]) -> Vec<(u64, u32, u64, &str)> {
        batch
            .iter()
            .map(|s| (s.job_id, s.index, s.generation, s.state().name()))
            .collect()
    }

    /// The simulator's daemon is the real node core on the simulated fleet: an assignment is
    /// started through the reconciler and reported running, its end comes from the fleet's
    /// timer queue on the paused clock, and an unassigned sandbox is released.
    #[tokio::test(start_paused = true)]
    async fn a_sim_daemon_runs_the_real_node_core_and_fleet() {
        let sim = Sim::new(SimConfig::default(), 7, PathBuf::new());
        let mut node = SimNode::new(&sim, "n0").expect("node metrics register");
        // The very type the real agent loop (`surge_node::agent::NodeAgent::run`) drives.
        let _: &NodeCore<SimRuntime> = &node.core;
        let sandbox = pn::Sandbox {
            job_id: 1,
            index: 0,
            desired_state: surge_proto::jobs::SandboxState::Running as i32,
            resources: Some(pn::Resources {
                cpu_millis: 500,
                memory_mib: 256,
            }),
            template: "busybox".into(),
            command: vec!["true".into()],
            env: Default::default(),
            generation: 1,
            revision: 1,
            user: String::new(),
        };
        let wanted = assignments(1, vec![sandbox]);

        let started = node.step(&wanted);
        assert_eq!(states(&started), [(1, 0, 1, "running")]);
        assert_eq!(node.sandboxes(), 1);
        assert!(node.step(&wanted).is_empty(), "nothing new to report");

        tokio::time::advance(Duration::from_millis(SANDBOX_RUN_MS.1)).await;
        let ended = node.step(&wanted);
        let ended = states(&ended);
        assert!(
            matches!(ended.as_slice(), [(1, 0, 1, "succeeded" | "failed")]),
            "{ended:?}"
        );
        assert_eq!(node.sandboxes(), 0);

        // Unassigned: the core forgets it, and there is nothing more to say.
        assert!(node.step(&assignments(2, Vec::new())).is_empty());
        assert!(node
            .core
            .view()
            .get(surge_node::reconcile::SandboxId::new(1, 0))
            .is_none());
    }
}
