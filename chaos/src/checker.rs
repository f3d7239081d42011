//! Checkers: one per property, each a pure function over a [`History`].
//!
//! The harness records everything a checker needs in the history: client operations and their
//! replies, samples of nodes and jobs taken while faults were active, the reads after the faults
//! healed, and every replica's final status. A checker returns the number of instances of its
//! violation and the first counter-example in full (the events that show it), so a report can be
//! understood without the run.
//!
//! | checker                     | property                                                      |
//! |-----------------------------|---------------------------------------------------------------|
//! | `acknowledged_once`         | every acknowledged submission exists exactly once, with its   |
//! |                             | id, on every replica; no key is ever applied twice; no        |
//! |                             | phantom job                                                   |
//! | `cancels_durable`           | an acknowledged cancel is never undone                        |
//! | `no_overcommit`             | no node is ever allocated more than it offers                 |
//! | `one_live_node_per_sandbox` | no two live nodes hold one sandbox's newest run; a live node  |
//! |                             | stops an older run it still has within a grace                |
//! | `gang_all_or_nothing`       | no gang job ever has sandboxes active while others wait       |
//! | `converged`                 | every replica ends at the same applied index and state hash;  |
//! |                             | replicas at one applied index never disagree on the hash      |
//! | `liveness`                  | after the faults heal, every placeable pending job is placed  |
//! |                             | within the bound                                              |
//!
//! The real-process harness adds `containers_cleaned_up` after the run (`crate::run`): nothing
//! of its container nodes is left on the host.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Event, EventType, History, JobSample, NodeSample, Op, Process};

/// A broken property and its first counter-example.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Violation {
    pub checker: String,
    /// How many instances the checker found.
    pub count: u64,
    /// The first instance, in words.
    pub message: String,
    /// The first instance in full: the events and states that show it.
    pub counterexample: Value,
}

type Check = fn(&History) -> Option<Violation>;

/// Every checker, by name.
pub const CHECKERS: &[(&str, Check)] = &[
    ("acknowledged_once", acknowledged_once),
    ("cancels_durable", cancels_durable),
    ("no_overcommit", no_overcommit),
    ("one_live_node_per_sandbox", one_live_node_per_sandbox),
    ("gang_all_or_nothing", gang_all_or_nothing),
    ("converged", converged),
    ("liveness", liveness),
];

/// Run every checker; the violations found, in checker order.
pub fn check_all(h: &History) -> Vec<Violation> {
    CHECKERS.iter().filter_map(|(_, check)| check(h)).collect()
}

/// Collects instances of one violation, keeping the first in full.
struct Found {
    checker: &'static str,
    count: u64,
    first: Option<(String, Value)>,
}

impl Found {
    fn new(checker: &'static str) -> Self {
        Found {
            checker,
            count: 0,
            first: None,
        }
    }

    fn add(&mut self, message: impl FnOnce() -> String, counterexample: impl FnOnce() -> Value) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some((message(), counterexample()));
        }
    }

    fn finish(self) -> Option<Violation> {
        self.first.map(|(message, counterexample)| Violation {
            checker: self.checker.to_string(),
            count: self.count,
            message,
            counterexample,
        })
    }
}

fn ev(e: &Event) -> Value {
    serde_json::to_value(e).unwrap_or(Value::Null)
}

/// The final per-replica reads of every job: replica -> Ok(jobs) or Err(the failed event).
fn final_job_reads(h: &History) -> BTreeMap<u64, Result<(&Event, &[JobSample]), &Event>> {
    let mut reads = BTreeMap::new();
    for e in &h.events {
        if e.process != Process::Final {
            continue;
        }
        if let Op::ReadJobs { replica, jobs } = &e.op {
            match e.kind {
                EventType::Ok => {
                    reads.insert(*replica, Ok((e, jobs.as_slice())));
                }
                EventType::Fail | EventType::Info => {
                    reads.entry(*replica).or_insert(Err(e));
                }
                EventType::Invoke => {}
            }
        }
    }
    reads
}

/// Every acknowledged submission exists exactly once (by key) with its acknowledged id on every
/// replica; two acknowledgements of one key name one job; no key is applied twice; no job exists
/// whose key no client ever sent.
pub fn acknowledged_once(h: &History) -> Option<Violation> {
    let mut found = Found::new("acknowledged_once");
    // key -> (first ack event, job id)
    let mut acked: BTreeMap<&str, (&Event, u64)> = BTreeMap::new();
    let mut invoked: BTreeSet<&str> = BTreeSet::new();
    for e in &h.events {
        match (&e.op, e.kind) {
            (Op::Submit { key, .. }, EventType::Invoke) => {
                invoked.insert(key);
            }
            (Op::Submitted { key, job_id, .. }, EventType::Ok) => match acked.get(key.as_str()) {
                Some((first, id)) if id != job_id => found.add(
                    || format!("key {key:?} acknowledged as job {id} and later as job {job_id}"),
                    || json!({ "first_ack": ev(first), "second_ack": ev(e) }),
                ),
                Some(_) => {}
                None => {
                    acked.insert(key, (e, *job_id));
                }
            },
            _ => {}
        }
    }
    let reads = final_job_reads(h);
    if reads.is_empty() {
        found.add(
            || "no final read of any replica's jobs: nothing can be checked".to_string(),
            || Value::Null,
        );
    }
    for (replica, read) in &reads {
        let (read_event, jobs) = match read {
            Ok(r) => *r,
            Err(e) => {
                found.add(
                    || format!("replica {replica} did not answer the final read of its jobs"),
                    || json!({ "read": ev(e) }),
                );
                continue;
            }
        };
        let mut by_key: BTreeMap<&str, Vec<&JobSample>> = BTreeMap::new();
        for j in jobs {
            by_key.entry(j.key.as_str()).or_default().push(j);
        }
        for (key, js) in &by_key {
            if js.len() > 1 {
                found.add(
                    || {
                        format!(
                            "replica {replica}: key {key:?} applied {} times (jobs {:?})",
                            js.len(),
                            js.iter().map(|j| j.id).collect::<Vec<_>>()
                        )
                    },
                    || json!({ "replica": replica, "jobs": js, "ack": acked.get(key).map(|(e, _)| ev(e)) }),
                );
            }
            if !invoked.contains(key) {
                found.add(
                    || {
                        format!(
                            "replica {replica}: job {} has key {key:?}, which no client sent",
                            js[0].id
                        )
                    },
                    || json!({ "replica": replica, "jobs": js }),
                );
            }
        }
        for (key, (ack, id)) in &acked {
            let present = by_key
                .get(key)
                .map(|js| js.iter().map(|j| j.id).collect::<Vec<_>>());
            if present.as_deref() != Some(&[*id][..])
                && present.as_ref().is_none_or(|p| p.len() < 2)
            {
                found.add(
                    || match &present {
                        None => format!(
                            "acknowledged submission {key:?} (job {id}) is missing on replica {replica}"
                        ),
                        Some(p) => format!(
                            "acknowledged submission {key:?} was job {id}; replica {replica} has it as job(s) {p:?}"
                        ),
                    },
                    || {
                        let key_events: Vec<Value> = h
                            .events
                            .iter()
                            .filter(|e| match &e.op {
                                Op::Submit { key: k, .. }
                                | Op::Submitted { key: k, .. }
                                | Op::Error { about: k, .. } => k == key,
                                _ => false,
                            })
                            .map(ev)
                            .collect();
                        json!({
                            "replica": replica,
                            "ack": ev(ack),
                            "operations_on_key": key_events,
                            "final_read_at_ms": read_event.time_ms,
                            "jobs_on_replica": jobs.len(),
                        })
                    },
                );
            }
        }
    }
    found.finish()
}

/// A cancel the cluster acknowledged (reply state "cancelled") stays cancelled on every replica.
pub fn cancels_durable(h: &History) -> Option<Violation> {
    let mut found = Found::new("cancels_durable");
    let reads = final_job_reads(h);
    for e in &h.events {
        let (EventType::Ok, Op::Cancelled { job_id, state }) = (e.kind, &e.op) else {
            continue;
        };
        if state != "cancelled" {
            continue;
        }
        for (replica, read) in &reads {
            let Ok((_, jobs)) = read else { continue };
            let job = jobs.iter().find(|j| j.id == *job_id);
            if job.is_none_or(|j| j.state != "cancelled") {
                found.add(
                    || match job {
                        None => format!("cancelled job {job_id} is missing on replica {replica}"),
                        Some(j) => format!(
                            "job {job_id} was acknowledged cancelled but is {:?} on replica {replica}",
                            j.state
                        ),
                    },
                    || json!({ "cancel_ack": ev(e), "replica": replica, "job": job }),
                );
            }
        }
    }
    found.finish()
}

/// No node, in any sample, is allocated more CPU or memory than it offers.
pub fn no_overcommit(h: &History) -> Option<Violation> {
    let mut found = Found::new("no_overcommit");
    for e in &h.events {
        let (EventType::Ok, Op::ReadNodes { replica, nodes }) = (e.kind, &e.op) else {
            continue;
        };
        for n in nodes {
            if n.allocated_cpu_millis > n.allocatable_cpu_millis
                || n.allocated_memory_mib > n.allocatable_memory_mib
            {
                found.add(
                    || {
                        format!(
                            "node {} allocated {} mCPU / {} MiB of {} mCPU / {} MiB (seen on replica {replica} at {} ms)",
                            n.id,
                            n.allocated_cpu_millis,
                            n.allocated_memory_mib,
                            n.allocatable_cpu_millis,
                            n.allocatable_memory_mib,
                            e.time_ms
                        )
                    },
                    || json!({ "node": n, "sample_index": e.index, "time_ms": e.time_ms, "replica": replica }),
                );
            }
        }
    }
    found.finish()
}

/// How long a live node may go on running an older run of a sandbox whose newer run another
/// live node holds. A node cut off past the TTL comes back (re-registers: live again) still
/// running its copy; it stops it once its watch shows the sandbox is no longer its own: a
/// reconnect, a reconcile pass and at most the node's SIGTERM-to-SIGKILL grace (10 s). Three
/// times that is "never stopped", not "slow".
pub const STALE_COPY_GRACE_MS: u64 = 30_000;

/// No sandbox, in any sample, is held by two live nodes at once: no two live nodes hold its
/// newest run (`doubles`), and no live node keeps running an older run for longer than
/// [`STALE_COPY_GRACE_MS`] while another live node holds a newer one (`stale`, judged across
/// samples). The simulator's samples read every node's assignments in its state; the
/// real-process harness reads them from a replica and adds what the container daemons really run
/// (see `crate::holdings`).
pub fn one_live_node_per_sandbox(h: &History) -> Option<Violation> {
    let mut found = Found::new("one_live_node_per_sandbox");
    // A stale copy -> the sample that first showed it.
    let mut first_seen: BTreeMap<&crate::history::StaleCopy, &Event> = BTreeMap::new();
    let mut reported: BTreeSet<&crate::history::StaleCopy> = BTreeSet::new();
    for e in &h.events {
        let (
            EventType::Ok,
            Op::ReadAssignments {
                replica,
                doubles,
                stale,
                ..
            },
        ) = (e.kind, &e.op)
        else {
            continue;
        };
        for d in doubles {
            found.add(
                || {
                    format!(
                        "sandbox {}.{} assigned to live nodes {:?} at once (seen on replica {replica} at {} ms)",
                        d.job, d.index, d.nodes, e.time_ms
                    )
                },
                || json!({ "sandbox": d, "sample_index": e.index, "time_ms": e.time_ms, "replica": replica }),
            );
        }
        for copy in stale {
            let first = *first_seen.entry(copy).or_insert(e);
            let held_ms = e.time_ms.saturating_sub(first.time_ms);
            if held_ms > STALE_COPY_GRACE_MS && reported.insert(copy) {
                found.add(
                    || {
                        format!(
                            "live node {} still ran sandbox {}.{} generation {} {held_ms} ms after a newer run was on another live node (seen on replica {replica} at {} ms)",
                            copy.node, copy.job, copy.index, copy.generation, e.time_ms
                        )
                    },
                    || json!({ "copy": copy, "first_sample": ev(first), "last_sample": ev(e) }),
                );
            }
        }
    }
    found.finish()
}

/// Sandboxes of a gang holding a node (placed, running or paused).
fn active(j: &JobSample) -> u32 {
    j.placed + j.running + j.paused
}

/// No gang job, in any sample, has sandboxes active while others of it wait to be placed.
pub fn gang_all_or_nothing(h: &History) -> Option<Violation> {
    let mut found = Found::new("gang_all_or_nothing");
    // Report each job once, at its first partial sample.
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    for e in &h.events {
        let (EventType::Ok, Op::ReadJobs { replica, jobs }) = (e.kind, &e.op) else {
            continue;
        };
        for j in jobs {
            if j.gang && active(j) > 0 && j.pending > 0 && seen.insert(j.id) {
                found.add(
                    || {
                        format!(
                            "gang job {} ({} sandboxes): {} active and {} pending at once (seen on replica {replica} at {} ms)",
                            j.id,
                            j.count,
                            active(j),
                            j.pending,
                            e.time_ms
                        )
                    },
                    || {
                        let faults: Vec<Value> = h
                            .events
                            .iter()
                            .filter(|f| {
                                matches!(f.op, Op::Fault { .. }) && f.time_ms <= e.time_ms
                            })
                            .rev()
                            .take(4)
                            .map(ev)
                            .collect();
                        json!({ "job": j, "sample_index": e.index, "time_ms": e.time_ms, "replica": replica, "recent_faults": faults })
                    },
                );
            }
        }
    }
    found.finish()
}

/// Every replica ends at the same applied index with the same state hash; and no two statuses at
/// the same applied index, at any time, disagree on the hash (apply is deterministic).
pub fn converged(h: &History) -> Option<Violation> {
    let mut found = Found::new("converged");
    let mut at_index: BTreeMap<u64, &Event> = BTreeMap::new();
    let mut last: BTreeMap<u64, &Event> = BTreeMap::new();
    for e in &h.events {
        let Op::ReplicaStatus {
            replica,
            applied_index,
            state_hash,
        } = &e.op
        else {
            continue;
        };
        if e.kind == EventType::Invoke {
            continue;
        }
        if e.process == Process::Final {
            last.insert(*replica, e);
        }
        if e.kind != EventType::Ok {
            continue;
        }
        match at_index.get(applied_index) {
            Some(other) => {
                if let Op::ReplicaStatus {
                    state_hash: h2,
                    replica: r2,
                    ..
                } = &other.op
                {
                    if h2 != state_hash {
                        found.add(
                            || format!("replicas {r2} and {replica} applied up to index {applied_index} but their state hashes differ"),
                            || json!({ "first": ev(other), "second": ev(e) }),
                        );
                    }
                }
            }
            None => {
                at_index.insert(*applied_index, e);
            }
        }
    }
    if last.is_empty() {
        found.add(
            || "no final status of any replica".to_string(),
            || Value::Null,
        );
    }
    let finals: Vec<&Event> = last.values().copied().collect();
    let agreed = finals.windows(2).all(|w| match (&w[0].op, &w[1].op) {
        (
            Op::ReplicaStatus {
                applied_index: a,
                state_hash: x,
                ..
            },
            Op::ReplicaStatus {
                applied_index: b,
                state_hash: y,
                ..
            },
        ) => a == b && x == y,
        _ => false,
    });
    if finals.iter().any(|e| e.kind != EventType::Ok) || !agreed {
        found.add(
            || {
                let parts: Vec<String> = finals
                    .iter()
                    .map(|e| match &e.op {
                        Op::ReplicaStatus {
                            replica,
                            applied_index,
                            state_hash,
                        } if e.kind == EventType::Ok => {
                            format!("{replica}: applied {applied_index} hash {:.12}", state_hash)
                        }
                        Op::ReplicaStatus { replica, .. } => format!("{replica}: no answer"),
                        _ => String::new(),
                    })
                    .collect();
                format!("replicas did not converge: {}", parts.join("; "))
            },
            || json!({ "final_statuses": finals.iter().map(|e| ev(e)).collect::<Vec<_>>() }),
        );
    }
    found.finish()
}

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

/// After the faults healed (the `Healed` event), some observation within the bound shows no
/// placeable pending job.
pub fn liveness(h: &History) -> Option<Violation> {
    let mut found = Found::new("liveness");
    let Some((healed, bound_ms)) = h.events.iter().find_map(|e| match e.op {
        Op::Healed { liveness_bound_ms } => Some((e, liveness_bound_ms)),
        _ => None,
    }) else {
        found.add(
            || "the faults never healed: liveness cannot be checked".to_string(),
            || Value::Null,
        );
        return found.finish();
    };
    let deadline_ms = healed.time_ms.saturating_add(bound_ms);
    // Observations: a jobs read followed by a nodes read of the liveness process.
    let mut last_jobs: Option<&Event> = None;
    let mut last_stuck: Option<(&Event, &Event, &JobSample)> = None;
    let mut observations = 0;
    for e in &h.events {
        if e.process != Process::Liveness || e.kind != EventType::Ok || e.index < healed.index {
            continue;
        }
        match &e.op {
            Op::ReadJobs { .. } => last_jobs = Some(e),
            Op::ReadNodes { nodes, .. } => {
                let Some(jobs_event) = last_jobs.take() else {
                    continue;
                };
                let Op::ReadJobs { jobs, .. } = &jobs_event.op else {
                    continue;
                };
                if jobs_event.time_ms > deadline_ms {
                    break;
                }
                observations += 1;
                match jobs.iter().find(|j| placeable(j, nodes)) {
                    None => return None,
                    Some(j) => last_stuck = Some((jobs_event, e, j)),
                }
            }
            _ => {}
        }
    }
    match last_stuck {
        None => found.add(
            || {
                format!(
                    "no observation of jobs and nodes within {bound_ms} ms after the faults healed"
                )
            },
            || json!({ "healed": ev(healed) }),
        ),
        Some((jobs_event, nodes_event, j)) => {
            let stuck = match &jobs_event.op {
                Op::ReadJobs { jobs, .. } => jobs
                    .iter()
                    .filter(|x| match &nodes_event.op {
                        Op::ReadNodes { nodes, .. } => placeable(x, nodes),
                        _ => false,
                    })
                    .count(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{EventType as T, Process as P, SandboxHolders};

    fn submit(key: &str) -> Op {
        Op::Submit {
            key: key.into(),
            replica: 1,
            gang: false,
            count: 1,
            cpu_millis: 500,
            memory_mib: 256,
        }
    }

    fn acked(key: &str, job_id: u64) -> Op {
        Op::Submitted {
            key: key.into(),
            job_id,
            created: true,
        }
    }

    fn job(id: u64, key: &str) -> JobSample {
        JobSample {
            id,
            key: key.into(),
            count: 1,
            cpu_millis: 500,
            memory_mib: 256,
            state: "running".into(),
            running: 1,
            ..JobSample::default()
        }
    }

    fn gang(id: u64, count: u32, active: u32, pending: u32) -> JobSample {
        JobSample {
            id,
            key: format!("g{id}"),
            gang: true,
            count,
            cpu_millis: 1000,
            memory_mib: 512,
            state: if active > 0 { "running" } else { "pending" }.into(),
            running: active,
            pending,
            ..JobSample::default()
        }
    }

    fn node(id: &str, allocated_cpu: u64) -> NodeSample {
        NodeSample {
            id: id.into(),
            state: "ready".into(),
            allocatable_cpu_millis: 4000,
            allocatable_memory_mib: 8192,
            allocated_cpu_millis: allocated_cpu,
            allocated_memory_mib: 0,
            sandboxes: 0,
            labels: BTreeMap::new(),
        }
    }

    fn labelled(id: &str, allocated_cpu: u64, class: &str) -> NodeSample {
        NodeSample {
            labels: [("chaos".to_string(), class.to_string())].into(),
            ..node(id, allocated_cpu)
        }
    }

    fn reads(jobs: &[JobSample]) -> Vec<(u64, P, T, Op)> {
        (1..=3)
            .map(|r| {
                (
                    100,
                    P::Final,
                    T::Ok,
                    Op::ReadJobs {
                        replica: r,
                        jobs: jobs.to_vec(),
                    },
                )
            })
            .collect()
    }

    fn healthy(mut events: Vec<(u64, P, T, Op)>, finals: &[JobSample]) -> History {
        events.extend(reads(finals));
        History::from_events(events)
    }

    fn checked(h: &History, name: &str) -> Option<Violation> {
        let (_, check) = CHECKERS.iter().find(|(n, _)| *n == name).expect("checker");
        check(h)
    }

    #[test]
    fn a_sandbox_on_two_live_nodes_is_a_violation() {
        let sample = |doubles| Op::ReadAssignments {
            replica: 1,
            checked: 40,
            running: 0,
            doubles,
            stale: vec![],
        };
        let clean = healthy(vec![(1, P::Sampler, T::Ok, sample(vec![]))], &[]);
        assert_eq!(checked(&clean, "one_live_node_per_sandbox"), None);
        let double = SandboxHolders {
            job: 7,
            index: 3,
            nodes: vec!["n1".into(), "n2".into()],
        };
        let bad = healthy(
            vec![
                (1, P::Sampler, T::Ok, sample(vec![])),
                (2, P::Sampler, T::Ok, sample(vec![double])),
            ],
            &[],
        );
        let v = checked(&bad, "one_live_node_per_sandbox").expect("a violation");
        assert_eq!(v.count, 1);
        assert!(v.message.contains("7.3"), "{}", v.message);
    }

    #[test]
    fn acknowledged_once_passes_a_clean_history_with_retries() {
        let h = healthy(
            vec![
                (1, P::Client(0), T::Invoke, submit("a")),
                (
                    2,
                    P::Client(0),
                    T::Info,
                    Op::Error {
                        about: "a".into(),
                        error: "timeout".into(),
                    },
                ),
                (3, P::Client(0), T::Invoke, submit("a")),
                (4, P::Client(0), T::Ok, acked("a", 7)),
                // Unknown outcome, never acknowledged, and not applied: allowed.
                (5, P::Client(1), T::Invoke, submit("b")),
                (
                    6,
                    P::Client(1),
                    T::Info,
                    Op::Error {
                        about: "b".into(),
                        error: "timeout".into(),
                    },
                ),
            ],
            &[job(7, "a")],
        );
        assert_eq!(acknowledged_once(&h), None);
    }

    #[test]
    fn acknowledged_once_finds_a_lost_submission() {
        let h = healthy(
            vec![
                (1, P::Client(0), T::Invoke, submit("a")),
                (2, P::Client(0), T::Ok, acked("a", 7)),
                (3, P::Client(0), T::Invoke, submit("b")),
                (4, P::Client(0), T::Ok, acked("b", 9)),
            ],
            &[job(7, "a")],
        );
        let v = acknowledged_once(&h).expect("violation");
        assert_eq!(v.count, 3, "missing on each of 3 replicas: {v:?}");
        assert!(
            v.message.contains("\"b\"") && v.message.contains("missing"),
            "{}",
            v.message
        );
        assert_eq!(v.counterexample["ack"]["job_id"], 9);
    }

    #[test]
    fn acknowledged_once_finds_a_duplicate_and_a_changed_id() {
        let h = healthy(
            vec![
                (1, P::Client(0), T::Invoke, submit("a")),
                (2, P::Client(0), T::Ok, acked("a", 7)),
                (3, P::Client(0), T::Invoke, submit("a")),
                (4, P::Client(0), T::Ok, acked("a", 8)),
            ],
            &[job(7, "a"), job(8, "a")],
        );
        let v = acknowledged_once(&h).expect("violation");
        assert!(
            v.message
                .contains("acknowledged as job 7 and later as job 8"),
            "{}",
            v.message
        );
        // One changed id, plus the key applied twice on each replica.
        assert_eq!(v.count, 4);
    }

    #[test]
    fn acknowledged_once_finds_a_phantom_job_and_a_silent_replica() {
        let mut events = vec![
            (1, P::Client(0), T::Invoke, submit("a")),
            (2, P::Client(0), T::Ok, acked("a", 7)),
        ];
        events.extend(reads(&[job(7, "a"), job(12, "zzz")]));
        events.push((
            200,
            P::Final,
            T::Fail,
            Op::ReadJobs {
                replica: 4,
                jobs: Vec::new(),
            },
        ));
        let v = acknowledged_once(&History::from_events(events)).expect("violation");
        assert!(v.message.contains("which no client sent"), "{}", v.message);
        assert_eq!(v.count, 4, "3 phantoms and one replica that did not answer");
    }

    #[test]
    fn cancels_durable_finds_an_undone_cancel() {
        let cancelled = Op::Cancelled {
            job_id: 7,
            state: "cancelled".into(),
        };
        let ok = healthy(
            vec![(1, P::Client(0), T::Ok, cancelled.clone())],
            &[JobSample {
                state: "cancelled".into(),
                ..job(7, "a")
            }],
        );
        assert_eq!(cancels_durable(&ok), None);
        let bad = healthy(vec![(1, P::Client(0), T::Ok, cancelled)], &[job(7, "a")]);
        let v = cancels_durable(&bad).expect("violation");
        assert!(v.message.contains("\"running\""), "{}", v.message);
    }

    #[test]
    fn no_overcommit_finds_an_overfull_node() {
        let read = |cpu| Op::ReadNodes {
            replica: 2,
            nodes: vec![node("n-1", 1000), node("n-2", cpu)],
        };
        let ok = History::from_events(vec![(1, P::Sampler, T::Ok, read(4000))]);
        assert_eq!(no_overcommit(&ok), None);
        let bad = History::from_events(vec![
            (1, P::Sampler, T::Ok, read(4000)),
            (2, P::Sampler, T::Ok, read(4500)),
        ]);
        let v = no_overcommit(&bad).expect("violation");
        assert_eq!(v.counterexample["node"]["id"], "n-2");
        assert_eq!(v.counterexample["sample_index"], 1);
    }

    #[test]
    fn gang_all_or_nothing_finds_a_partial_gang() {
        let read = |j| Op::ReadJobs {
            replica: 1,
            jobs: vec![j],
        };
        let ok = History::from_events(vec![
            (1, P::Watch, T::Ok, read(gang(5, 4, 0, 4))),
            (2, P::Watch, T::Ok, read(gang(5, 4, 4, 0))),
        ]);
        assert_eq!(gang_all_or_nothing(&ok), None);
        let bad = History::from_events(vec![
            (1, P::Watch, T::Ok, read(gang(5, 4, 4, 0))),
            (2, P::Watch, T::Ok, read(gang(5, 4, 3, 1))),
        ]);
        let v = gang_all_or_nothing(&bad).expect("violation");
        assert!(
            v.message.contains("3 active and 1 pending"),
            "{}",
            v.message
        );
        // A plain job may be partly placed.
        let plain = History::from_events(vec![(
            1,
            P::Sampler,
            T::Ok,
            read(JobSample {
                gang: false,
                ..gang(6, 4, 3, 1)
            }),
        )]);
        assert_eq!(gang_all_or_nothing(&plain), None);
    }

    fn status(replica: u64, applied_index: u64, hash: &str) -> Op {
        Op::ReplicaStatus {
            replica,
            applied_index,
            state_hash: hash.into(),
        }
    }

    #[test]
    fn converged_finds_diverged_replicas() {
        let ok = History::from_events(vec![
            (1, P::Final, T::Ok, status(1, 50, "aa")),
            (1, P::Final, T::Ok, status(2, 50, "aa")),
        ]);
        assert_eq!(converged(&ok), None);
        let lagging = History::from_events(vec![
            (1, P::Final, T::Ok, status(1, 50, "aa")),
            (1, P::Final, T::Ok, status(2, 49, "bb")),
        ]);
        assert!(converged(&lagging)
            .expect("violation")
            .message
            .contains("did not converge"));
        // Same index, different state: apply is not deterministic.
        let forked = History::from_events(vec![
            (1, P::Final, T::Ok, status(1, 50, "aa")),
            (1, P::Final, T::Ok, status(2, 50, "bb")),
        ]);
        let v = converged(&forked).expect("violation");
        assert!(v.message.contains("state hashes differ"), "{}", v.message);
        let silent = History::from_events(vec![
            (1, P::Final, T::Ok, status(1, 50, "aa")),
            (1, P::Final, T::Fail, status(2, 0, "")),
        ]);
        assert!(converged(&silent)
            .expect("violation")
            .message
            .contains("2: no answer"));
    }

    #[test]
    fn liveness_finds_a_placeable_job_left_pending() {
        let healed = (
            100,
            P::Faults,
            T::Info,
            Op::Healed {
                liveness_bound_ms: 1000,
            },
        );
        let pending = Op::ReadJobs {
            replica: 1,
            jobs: vec![JobSample {
                pending: 1,
                running: 0,
                state: "pending".into(),
                ..job(7, "a")
            }],
        };
        let placed = Op::ReadJobs {
            replica: 1,
            jobs: vec![job(7, "a")],
        };
        let free = Op::ReadNodes {
            replica: 1,
            nodes: vec![node("n-1", 0)],
        };
        let full = Op::ReadNodes {
            replica: 1,
            nodes: vec![node("n-1", 4000)],
        };
        // Placed within the bound.
        let ok = History::from_events(vec![
            healed.clone(),
            (200, P::Liveness, T::Ok, pending.clone()),
            (201, P::Liveness, T::Ok, free.clone()),
            (700, P::Liveness, T::Ok, placed),
            (701, P::Liveness, T::Ok, free.clone()),
        ]);
        assert_eq!(liveness(&ok), None);
        // Pending, but nothing has room: not placeable, so not a violation.
        let no_room = History::from_events(vec![
            healed.clone(),
            (200, P::Liveness, T::Ok, pending.clone()),
            (201, P::Liveness, T::Ok, full),
        ]);
        assert_eq!(liveness(&no_room), None);
        // Pending with room until the bound passed.
        let stuck = History::from_events(vec![
            healed,
            (200, P::Liveness, T::Ok, pending.clone()),
            (201, P::Liveness, T::Ok, free.clone()),
            (1050, P::Liveness, T::Ok, pending),
            (1051, P::Liveness, T::Ok, free),
        ]);
        let v = liveness(&stuck).expect("violation");
        assert!(
            v.message.contains("job 7") && v.message.contains("950 ms"),
            "{}",
            v.message
        );
        assert_eq!(
            v.counterexample["free_capacity"][0]["free_cpu_millis"],
            4000
        );
        // Never healed.
        assert!(liveness(&History::default()).is_some());
    }

    #[test]
    fn placeable_honours_label_constraints() {
        // The container node is full; the simulated one has room but the wrong label.
        let nodes = vec![
            labelled("sim", 0, "sim"),
            labelled("ctr", 4000, "container"),
        ];
        let container_job = JobSample {
            pending: 1,
            running: 0,
            state: "pending".into(),
            constraints: vec!["chaos=container".into()],
            ..job(7, "a")
        };
        assert!(!placeable(&container_job, &nodes));
        let sim_job = JobSample {
            constraints: vec!["chaos=sim".into()],
            ..container_job.clone()
        };
        assert!(placeable(&sim_job, &nodes));
        // `!=` holds on a node without the label, `=` does not.
        let unlabelled = vec![node("n", 0)];
        let not_ctr = JobSample {
            constraints: vec!["chaos!=container".into()],
            ..container_job.clone()
        };
        assert!(placeable(&not_ctr, &unlabelled));
        assert!(!placeable(&container_job, &unlabelled));
        assert!(placeable(&not_ctr, &nodes));
    }

    #[test]
    fn placeable_counts_a_gang_across_nodes() {
        let nodes = vec![
            node("a", 2000),
            node("b", 2000),
            NodeSample {
                state: "down".into(),
                ..node("c", 0)
            },
        ];
        // 2 free CPUs on each of a and b: a gang of 4 x 1 CPU fits across them, 5 does not.
        assert!(placeable(&gang(1, 4, 0, 4), &nodes));
        assert!(!placeable(&gang(1, 5, 0, 5), &nodes));
        assert!(!placeable(
            &JobSample {
                state: "cancelled".into(),
                ..gang(1, 4, 0, 4)
            },
            &nodes
        ));
        assert!(checked(&History::default(), "liveness").is_some());
    }
}
