//! Capacity of the cluster as numbers: what the nodes offer, what sandboxes hold, what they use,
//! per pool and per tenant, and how many nodes, jobs and sandboxes are in each state.
//!
//! One pure function ([`summarize`]) over the applied state and the leader's heartbeat view of
//! usage feeds both the Prometheus collector (`crate::capacity_metrics`) and the console's
//! overview (`crate::ui_api`), so a dashboard and the console never disagree. Label sets are
//! bounded: pools and tenants beyond [`LABELS_MAX`] are folded into [`OTHER`].

use std::collections::BTreeMap;

use serde::Serialize;

use crate::command::Command;
use crate::model::{JobState, NodeState, Resources};
use crate::runs::SandboxState;
use crate::state::ClusterState;

/// Most distinct pools or tenants given their own label value; the rest share [`OTHER`].
pub const LABELS_MAX: usize = 200;
/// The label value of the pools or tenants beyond [`LABELS_MAX`].
pub const OTHER: &str = "_other";

/// Every job state.
pub const JOB_STATES: [JobState; 5] = [
    JobState::Pending,
    JobState::Running,
    JobState::Complete,
    JobState::Failed,
    JobState::Cancelled,
];
/// Every node state.
pub const NODE_STATES: [NodeState; 3] = [NodeState::Ready, NodeState::Down, NodeState::Draining];

/// What a pool (or the whole cluster) offers, holds and uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolCapacity {
    /// Offered by the pool's ready nodes.
    pub allocatable: Resources,
    /// Reserved by active (placed, running, paused) sandboxes, on nodes in any state.
    pub allocated: Resources,
    /// Used, as the nodes' last heartbeats said (the leader's view; zero on a follower).
    pub used: Resources,
    pub nodes: u32,
    pub nodes_ready: u32,
}

impl PoolCapacity {
    fn add(&mut self, o: &PoolCapacity) {
        self.allocatable = self.allocatable.saturating_add(o.allocatable);
        self.allocated = self.allocated.saturating_add(o.allocated);
        self.used = self.used.saturating_add(o.used);
        self.nodes = self.nodes.saturating_add(o.nodes);
        self.nodes_ready = self.nodes_ready.saturating_add(o.nodes_ready);
    }
}

/// A tenant's reservations against its quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TenantUsage {
    pub allocated: Resources,
    /// `None`: no quota set.
    pub quota: Option<Resources>,
    pub sandboxes_active: u64,
    pub sandboxes_pending: u64,
    pub jobs_live: u64,
}

/// The cluster's numbers at one applied index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub cluster: PoolCapacity,
    pub pools: BTreeMap<String, PoolCapacity>,
    pub tenants: BTreeMap<String, TenantUsage>,
    /// Sandbox state (`SandboxState::as_str`) -> count, every state present.
    pub sandboxes: BTreeMap<&'static str, u64>,
    pub jobs: BTreeMap<&'static str, u64>,
    pub nodes: BTreeMap<&'static str, u64>,
}

/// `name` as a label value, or [`OTHER`] once `seen` holds [`LABELS_MAX`] other names.
fn bounded<V: Default>(seen: &mut BTreeMap<String, V>, name: &str) -> String {
    if seen.contains_key(name) || seen.len() < LABELS_MAX {
        name.to_string()
    } else {
        OTHER.to_string()
    }
}

/// The numbers of `s`; `used` is a node's used resources by its id (the leader's heartbeats).
pub fn summarize(s: &ClusterState, used: impl Fn(&str) -> Resources) -> Capacity {
    let mut c = Capacity {
        sandboxes: SandboxState::ALL
            .iter()
            .map(|st| (st.as_str(), 0))
            .collect(),
        jobs: JOB_STATES.iter().map(|st| (st.as_str(), 0)).collect(),
        nodes: NODE_STATES.iter().map(|st| (st.as_str(), 0)).collect(),
        ..Capacity::default()
    };
    let usage = s.node_usage();
    for (id, node) in &s.nodes {
        *c.nodes.entry(node.state.as_str()).or_default() += 1;
        let pool = bounded(&mut c.pools, &node.spec.pool);
        let ready = node.state == NodeState::Ready;
        let p = PoolCapacity {
            allocatable: if ready {
                node.spec.allocatable
            } else {
                Resources::ZERO
            },
            allocated: usage.get(id).map(|u| u.allocated).unwrap_or_default(),
            used: used(id),
            nodes: 1,
            nodes_ready: u32::from(ready),
        };
        c.pools.entry(pool).or_default().add(&p);
        c.cluster.add(&p);
    }
    for (tenant, quota) in &s.quotas {
        let t = bounded(&mut c.tenants, tenant);
        c.tenants.entry(t).or_default().quota = Some(*quota);
    }
    for job in s.jobs.values() {
        *c.jobs.entry(job.state.as_str()).or_default() += 1;
        let live = !job.state.is_terminal();
        let t = if live {
            let name = bounded(&mut c.tenants, &job.spec.tenant);
            let t = c.tenants.entry(name).or_default();
            t.jobs_live += 1;
            Some(t)
        } else {
            None
        };
        let mut t = t;
        for (_, run) in job.runs.iter() {
            let n = u64::from(run.count);
            *c.sandboxes.entry(run.state.as_str()).or_default() += n;
            if let Some(t) = t.as_deref_mut() {
                if run.state.is_active() {
                    t.allocated = t.allocated.saturating_add(run.resources.saturating_mul(n));
                    t.sandboxes_active += n;
                } else if run.state == SandboxState::Pending {
                    t.sandboxes_pending += n;
                }
            }
        }
    }
    c
}

/// One observation of queue wait: `count` sandboxes of a tenant's job at a priority waited
/// `wait_ms` from submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    pub tenant: String,
    pub priority: i32,
    pub wait_ms: u64,
    pub count: u32,
}

/// What a committed command says about queue wait and preemption, read against the state it
/// was proposed on: sandboxes placed (submit -> placed), sandboxes reported running (submit ->
/// running, first run only: a rescheduled sandbox's wait is not the queue's), and preemptions
/// by the victim's tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waits {
    pub placed: Vec<Wait>,
    pub running: Vec<Wait>,
    /// Victim tenant -> sandboxes preempted.
    pub preempted: BTreeMap<String, u64>,
}

/// The waits a command records (pure); `s` is the state before it applies.
pub fn waits_of(s: &ClusterState, command: &Command) -> Waits {
    let mut w = Waits::default();
    let wait = |job: u64, at_ms: u64, count: u32| {
        s.jobs.get(&job).map(|j| Wait {
            tenant: j.spec.tenant.clone(),
            priority: j.spec.priority,
            wait_ms: at_ms.saturating_sub(j.submitted_at_ms),
            count,
        })
    };
    match command {
        Command::ApplyPlan { plan, at_ms, .. } => {
            w.placed = plan
                .placements
                .iter()
                .filter_map(|p| wait(p.job, *at_ms, p.count))
                .collect();
            for p in &plan.preemptions {
                if let Some(j) = s.jobs.get(&p.job) {
                    *w.preempted.entry(j.spec.tenant.clone()).or_default() += u64::from(p.count);
                }
            }
        }
        Command::ReportStatus { reports, at_ms }
        | Command::ReportStatusOutcomes { reports, at_ms, .. } => {
            w.running = reports
                .iter()
                .filter(|r| r.state == SandboxState::Running)
                .filter(|r| {
                    // Only the current run's change from placed, and only a first run (never
                    // restarted or rescheduled): a report repeated, stale or of a rerun is
                    // not a wait in the queue.
                    s.jobs.get(&r.job).is_some_and(|j| {
                        j.runs.get(r.first).is_some_and(|(_, run)| {
                            run.state == SandboxState::Placed
                                && run.generation == r.generation
                                && run.restarts == 0
                                && run.reschedules == 0
                        })
                    })
                })
                .filter_map(|r| wait(r.job, *at_ms, r.count))
                .collect();
        }
        _ => {}
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Response;
    use crate::state::tests::{node, spec};

    fn register_node(s: &mut ClusterState, index: u64, id: &str, pool: &str, r: Resources) {
        let mut n = node(id, 1);
        n.pool = pool.into();
        n.allocatable = r;
        s.apply_command(index, Command::RegisterNode { node: n, at_ms: 0 });
    }

    fn submit_job(
        s: &mut ClusterState,
        index: u64,
        tenant: &str,
        count: u32,
        per: Resources,
    ) -> u64 {
        let mut sp = spec(count, tenant);
        sp.per_sandbox = per;
        let r = s.apply_command(
            index,
            Command::SubmitJob {
                spec: sp,
                idempotency_key: format!("k{index}"),
                at_ms: 1000,
            },
        );
        match r {
            Response::JobSubmitted { job_id, .. } => job_id,
            other => panic!("submit: {other:?}"),
        }
    }

    #[test]
    fn counts_and_reservations_add_up_per_pool_and_tenant() {
        let mut s = ClusterState::default();
        register_node(&mut s, 1, "a", "gpu", Resources::new(8000, 8192));
        register_node(&mut s, 2, "b", "cpu", Resources::new(4000, 4096));
        register_node(&mut s, 3, "c", "cpu", Resources::new(4000, 4096));
        s.nodes.get_mut("c").expect("c").state = NodeState::Down;
        s.quotas.insert("t1".into(), Resources::new(6000, 0));
        let job = submit_job(&mut s, 4, "t1", 3, Resources::new(1000, 512));
        // Two of its three sandboxes on a, running.
        s.jobs.get_mut(&job).expect("job").runs.update(0, 2, |r| {
            r.state = SandboxState::Running;
            r.node = Some("a".into());
        });
        let c = summarize(&s, |n| {
            if n == "a" {
                Resources::new(1500, 100)
            } else {
                Resources::ZERO
            }
        });
        assert_eq!(c.nodes["ready"], 2);
        assert_eq!(c.nodes["down"], 1);
        assert_eq!(c.sandboxes["running"], 2);
        assert_eq!(c.sandboxes["pending"], 1);
        assert_eq!(c.sandboxes["failed"], 0, "every state present");
        assert_eq!(c.pools["gpu"].allocated, Resources::new(2000, 1024));
        assert_eq!(c.pools["gpu"].used, Resources::new(1500, 100));
        // The down node offers nothing; it still counts as a node of its pool.
        assert_eq!(c.pools["cpu"].allocatable, Resources::new(4000, 4096));
        assert_eq!(c.pools["cpu"].nodes, 2);
        assert_eq!(c.pools["cpu"].nodes_ready, 1);
        assert_eq!(c.cluster.allocatable, Resources::new(12000, 12288));
        assert_eq!(c.cluster.allocated, Resources::new(2000, 1024));
        let t = c.tenants["t1"];
        assert_eq!(t.allocated, Resources::new(2000, 1024));
        assert_eq!(t.quota, Some(Resources::new(6000, 0)));
        assert_eq!(
            (t.sandboxes_active, t.sandboxes_pending, t.jobs_live),
            (2, 1, 1)
        );
    }

    #[test]
    fn tenants_beyond_the_label_bound_share_one_value() {
        let mut s = ClusterState::default();
        let n = u64::try_from(LABELS_MAX).expect("small") + 5;
        for i in 0..n {
            submit_job(&mut s, i + 1, &format!("t{i}"), 1, Resources::new(1, 1));
        }
        let c = summarize(&s, |_| Resources::ZERO);
        assert_eq!(c.tenants.len(), LABELS_MAX + 1);
        assert_eq!(c.tenants[OTHER].jobs_live, 5);
        assert_eq!(c.tenants.values().map(|t| t.jobs_live).sum::<u64>(), n);
    }

    #[test]
    fn waits_are_measured_from_submission_and_only_first_runs_count() {
        let mut s = ClusterState::default();
        register_node(&mut s, 1, "a", "p", Resources::new(8000, 8192));
        let job = submit_job(&mut s, 2, "t1", 4, Resources::new(100, 10));
        let submitted = s.jobs[&job].submitted_at_ms;
        let plan = crate::placement::Plan {
            at_index: 2,
            placements: vec![crate::placement::Placement {
                job,
                node: "a".into(),
                first_index: 0,
                count: 4,
            }],
            preemptions: vec![],
            unplaced: vec![],
        };
        let cmd = Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: submitted + 250,
        };
        let w = waits_of(&s, &cmd);
        assert_eq!(w.placed.len(), 1);
        assert_eq!((w.placed[0].wait_ms, w.placed[0].count), (250, 4));
        assert_eq!(w.placed[0].tenant, "t1");
        s.apply_command(3, cmd);
        let report = |generation| Command::ReportStatus {
            reports: vec![crate::command::StatusRange {
                node: "a".into(),
                job,
                first: 0,
                count: 4,
                generation,
                state: SandboxState::Running,
                exit_code: 0,
                resources: None,
            }],
            at_ms: submitted + 900,
        };
        let generation = s.jobs[&job].runs.get(0).expect("run").1.generation;
        let w = waits_of(&s, &report(generation));
        assert_eq!(w.running.len(), 1);
        assert_eq!(w.running[0].wait_ms, 900);
        // The leader's status batches carry outcomes too: the same waits.
        let Command::ReportStatus { reports, at_ms } = report(generation) else {
            unreachable!("built above")
        };
        let batched = Command::ReportStatusOutcomes {
            reports,
            outcomes: vec![],
            at_ms,
        };
        assert_eq!(waits_of(&s, &batched).running, w.running);
        assert!(
            waits_of(&s, &report(generation + 1)).running.is_empty(),
            "another run's report"
        );
        let mut rerun = s.clone();
        rerun
            .jobs
            .get_mut(&job)
            .expect("job")
            .runs
            .update(0, 4, |r| r.reschedules = 1);
        assert!(
            waits_of(&rerun, &report(generation)).running.is_empty(),
            "a rescheduled sandbox's wait is not the queue's"
        );
        s.apply_command(4, report(generation));
        assert!(
            waits_of(&s, &report(generation)).running.is_empty(),
            "already running: not a second wait"
        );
    }
}
