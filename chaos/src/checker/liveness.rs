//! `liveness`: after the faults heal, every placeable pending job is placed within the bound;
//! and what "placeable" means for a sample of jobs and nodes.

use serde_json::{json, Value};

use super::{ev, fold, Checker, FinalReads, Found, Violation};
use crate::history::{Event, EventType, History, JobSample, NodeSample, Op, Process};

/// Whether node `n`'s labels satisfy every constraint (`KEY=VALUE`, `KEY!=VALUE`) as placement
/// judges them: `!=` on an absent label holds, `=` does not. The node attributes `os`, `arch` and
/// `pool` are not in a sample: constraints on them are taken as satisfied (the workload uses
/// labels only).
pub fn satisfies_all(n: &NodeSample, constraints: &[String]) -> bool {
    constraints.iter().all(|c| {
        let (key, not_equal, value) = match c.split_once("!=") {
            Some((k, v)) => (k, true, v),
            None => match c.split_once('=') {
                Some((k, v)) => (k, false, v),
                None => return true,
            },
        };
        if matches!(key, "os" | "arch" | "pool") {
            return true;
        }
        let equal = n.labels.get(key).map(String::as_str) == Some(value);
        equal != not_equal
    })
}

/// Free capacity of the ready nodes that satisfy the job's constraints, and whether `j`'s pending sandboxes could be placed on it
/// (one of a plain job on some node; the whole rest of a gang across nodes).
pub fn placeable(j: &JobSample, nodes: &[NodeSample]) -> bool {
    if j.pending == 0 || matches!(j.state.as_str(), "cancelled" | "complete" | "failed") {
        return false;
    }
    let fits = |n: &NodeSample| -> u64 {
        let cpu = n
            .allocatable_cpu_millis
            .saturating_sub(n.allocated_cpu_millis);
        let mem = n
            .allocatable_memory_mib
            .saturating_sub(n.allocated_memory_mib);
        let by_cpu = cpu.checked_div(j.cpu_millis).unwrap_or(u64::MAX);
        let by_mem = mem.checked_div(j.memory_mib).unwrap_or(u64::MAX);
        by_cpu.min(by_mem)
    };
    let ready = nodes
        .iter()
        .filter(|n| n.state == "ready" && satisfies_all(n, &j.constraints));
    if j.gang {
        ready.map(fits).fold(0u64, u64::saturating_add) >= u64::from(j.pending)
    } else {
        ready.map(fits).any(|k| k >= 1)
    }
}

/// Where the liveness observations stand.
#[derive(Default)]
pub(super) struct Liveness {
    /// The `Healed` event and the bound it set.
    healed: Option<(Event, u64)>,
    /// The liveness process's last jobs read, waiting for its nodes read.
    last_jobs: Option<Event>,
    /// The last observation (jobs read, nodes read) with a placeable pending job, and that job.
    last_stuck: Option<(Event, Event, JobSample)>,
    observations: u64,
    /// An observation within the bound showed nothing placeable pending.
    passed: bool,
    /// An observation began after the bound: later ones do not count.
    past_bound: bool,
}

impl Checker for Liveness {
    fn observe(&mut self, e: &Event) {
        if self.passed || self.past_bound {
            return;
        }
        let Some((healed, bound_ms)) = &self.healed else {
            if let Op::Healed { liveness_bound_ms } = e.op {
                self.healed = Some((e.clone(), liveness_bound_ms));
            }
            return;
        };
        if e.process != Process::Liveness || e.kind != EventType::Ok {
            return;
        }
        let deadline_ms = healed.time_ms.saturating_add(*bound_ms);
        match &e.op {
            Op::ReadJobs { .. } => self.last_jobs = Some(e.clone()),
            Op::ReadNodes { nodes, .. } => {
                let Some(jobs_event) = self.last_jobs.take() else {
                    return;
                };
                let Op::ReadJobs { jobs, .. } = &jobs_event.op else {
                    return;
                };
                if jobs_event.time_ms > deadline_ms {
                    self.past_bound = true;
                    return;
                }
                self.observations += 1;
                match jobs.iter().find(|j| placeable(j, nodes)) {
                    None => {
                        self.passed = true;
                        self.last_stuck = None;
                    }
                    Some(j) => {
                        let j = j.clone();
                        self.last_stuck = Some((jobs_event, e.clone(), j));
                    }
                }
            }
            _ => {}
        }
    }

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        let mut found = Found::new("liveness");
        if self.passed {
            return None;
        }
        let observations = self.observations;
        let Some((healed, bound_ms)) = &self.healed else {
            found.add(
                || "the faults never healed: liveness cannot be checked".to_string(),
                || Value::Null,
            );
            return found.finish();
        };
        match &self.last_stuck {
            None => found.add(
                || {
                    format!(
                        "no observation of jobs and nodes within {bound_ms} ms after the faults healed"
                    )
                },
                || json!({ "healed": ev(healed) }),
            ),
            Some((jobs_event, nodes_event, j)) => {
                let stuck = match (&jobs_event.op, &nodes_event.op) {
                    (Op::ReadJobs { jobs, .. }, Op::ReadNodes { nodes, .. }) => {
                        jobs.iter().filter(|x| placeable(x, nodes)).count()
                    }
                    _ => 0,
                };
                found.add(
                    || {
                        format!(
                            "job {} ({} of {} sandboxes pending, reason {:?}) was still placeable and pending {} ms after the faults healed ({} placeable jobs pending, {observations} observations)",
                            j.id,
                            j.pending,
                            j.count,
                            j.pending_reason,
                            jobs_event.time_ms.saturating_sub(healed.time_ms),
                            stuck
                        )
                    },
                    || {
                        let free: Vec<Value> = match &nodes_event.op {
                            Op::ReadNodes { nodes, .. } => nodes
                                .iter()
                                .map(|n| json!({
                                    "id": n.id,
                                    "state": n.state,
                                    "free_cpu_millis": n.allocatable_cpu_millis.saturating_sub(n.allocated_cpu_millis),
                                    "free_memory_mib": n.allocatable_memory_mib.saturating_sub(n.allocated_memory_mib),
                                }))
                                .collect(),
                            _ => Vec::new(),
                        };
                        json!({ "job": j, "healed_at_ms": healed.time_ms, "observed_at_ms": jobs_event.time_ms, "free_capacity": free })
                    },
                );
            }
        }
        found.finish()
    }
}

/// After the faults healed (the `Healed` event), some observation within the bound shows no
/// placeable pending job.
pub fn liveness(h: &History) -> Option<Violation> {
    fold::<Liveness>(h)
}
