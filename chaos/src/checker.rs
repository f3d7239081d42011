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
//! | `checkpoint_restored_once`  | no run on two hosts at once; a run back on its host only once |
//! |                             | per checkpoint, on the same node; forks on their source's node|
//!
//! The real-process harness adds `containers_cleaned_up` after the run (`crate::run`): nothing
//! of its container nodes is left on the host.
//!
//! Each checker is a fold: it sees the events one by one, in history order, keeps what it will
//! need and nothing else, and judges at the end. [`Checks`] folds all of them in one pass, so the
//! real-process harness can check a history it streams to disk instead of keeping it (an
//! hour-long run's history is gigabytes; what the checkers keep is per key, per job or per stale
//! copy, each under a named `*_MAX`). The functions in [`CHECKERS`] fold one checker over an
//! in-memory [`History`] (the simulator and the tests).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Event, EventType, Fold, History, JobSample, Op, Process, StaleCopy};

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
    ("checkpoint_restored_once", checkpoint_restored_once),
];

/// Run every checker; the violations found, in checker order.
pub fn check_all(h: &History) -> Vec<Violation> {
    let mut checks = Checks::default();
    for e in &h.events {
        checks.observe(e);
    }
    checks.violations()
}

/// Operations kept per idempotency key for a counter-example (a key retried for 30 s has a few
/// dozen); the rest are counted.
pub const KEY_EVENTS_MAX: usize = 64;
/// Stale copies `one_live_node_per_sandbox` follows across samples. A live node keeps an older
/// run only while it returns from a fault, so a run has a handful; more than this is itself
/// reported.
pub const STALE_COPIES_MAX: usize = 65_536;
/// Faults a `gang_all_or_nothing` counter-example shows (the most recent before it).
pub const RECENT_FAULTS_MAX: usize = 4;
/// Applied indexes `converged` remembers a state hash of (the real-process harness records a
/// status per replica at the end; the simulator a few per run).
pub const STATUS_INDEXES_MAX: usize = 65_536;

/// Every checker folded over one pass of the history.
#[derive(Default)]
pub struct Checks {
    finals: FinalReads,
    acknowledged: AcknowledgedOnce,
    cancels: CancelsDurable,
    overcommit: NoOvercommit,
    holders: OneLiveNode,
    gangs: GangAllOrNothing,
    converged: Converged,
    liveness: Liveness,
    restored_once: lid::RestoredOnce,
}

impl Fold for Checks {
    fn observe(&mut self, e: &Event) {
        self.finals.observe(e);
        self.acknowledged.observe(e);
        self.cancels.observe(e);
        self.overcommit.observe(e);
        self.holders.observe(e);
        self.gangs.observe(e);
        self.converged.observe(e);
        self.liveness.observe(e);
        self.restored_once.observe(e);
    }
}

impl Checks {
    /// The violations of the history seen so far, in [`CHECKERS`] order.
    pub fn violations(&self) -> Vec<Violation> {
        let f = &self.finals;
        [
            self.acknowledged.finish(f),
            self.cancels.finish(f),
            self.overcommit.finish(f),
            self.holders.finish(f),
            self.gangs.finish(f),
            self.converged.finish(f),
            self.liveness.finish(f),
            self.restored_once.finish(f),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Idempotency keys some client submitted under.
    pub fn keys_submitted(&self) -> u64 {
        self.acknowledged
            .keys
            .values()
            .filter(|k| k.invoked)
            .count() as u64
    }

    /// Host reads and returns of a run to its host (restores) `checkpoint_restored_once` saw.
    pub fn host_reads_and_restores(&self) -> (u64, u64) {
        (self.restored_once.host_reads, self.restored_once.restores)
    }

    /// Idempotency keys whose submission the cluster acknowledged.
    pub fn keys_acknowledged(&self) -> u64 {
        self.acknowledged
            .keys
            .values()
            .filter(|k| k.ack.is_some())
            .count() as u64
    }
}

/// One checker as a fold: `observe` every event in order, then `finish` with the final reads.
trait Checker: Default {
    fn observe(&mut self, e: &Event);
    fn finish(&self, finals: &FinalReads) -> Option<Violation>;
}

/// Fold one checker over an in-memory history.
fn fold<C: Checker>(h: &History) -> Option<Violation> {
    let mut finals = FinalReads::default();
    let mut c = C::default();
    for e in &h.events {
        finals.observe(e);
        c.observe(e);
    }
    c.finish(&finals)
}

/// Collects instances of one violation, keeping the first in full.
#[derive(Clone)]
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

/// The final per-replica reads of every job: replica -> Ok(the read) or Err(the failed read). A
/// successful read replaces an earlier one; a failed one counts only when no read succeeded.
#[derive(Default)]
struct FinalReads {
    reads: BTreeMap<u64, Result<Event, Event>>,
}

impl FinalReads {
    fn observe(&mut self, e: &Event) {
        if e.process != Process::Final {
            return;
        }
        if let Op::ReadJobs { replica, .. } = &e.op {
            match e.kind {
                EventType::Ok => {
                    self.reads.insert(*replica, Ok(e.clone()));
                }
                EventType::Fail | EventType::Info => {
                    self.reads.entry(*replica).or_insert_with(|| Err(e.clone()));
                }
                EventType::Invoke => {}
            }
        }
    }

    /// Replica -> Ok((the read, its jobs)) or Err(the failed read).
    fn iter(&self) -> impl Iterator<Item = (u64, Result<(&Event, &[JobSample]), &Event>)> {
        self.reads.iter().map(|(replica, read)| {
            let read = match read {
                Ok(e) => match &e.op {
                    Op::ReadJobs { jobs, .. } => Ok((e, jobs.as_slice())),
                    _ => Ok((e, &[][..])),
                },
                Err(e) => Err(e),
            };
            (*replica, read)
        })
    }

    fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }
}

/// What `acknowledged_once` keeps of one idempotency key.
#[derive(Default)]
struct KeyOps {
    /// Some client sent a submission under it.
    invoked: bool,
    /// The first acknowledgement and the job id it named.
    ack: Option<(Event, u64)>,
    /// Submissions, replies and errors under the key, for a counter-example (at most
    /// [`KEY_EVENTS_MAX`]).
    events: Vec<Event>,
    events_dropped: u64,
}

struct AcknowledgedOnce {
    found: Found,
    keys: BTreeMap<String, KeyOps>,
}

impl Default for AcknowledgedOnce {
    fn default() -> Self {
        AcknowledgedOnce {
            found: Found::new("acknowledged_once"),
            keys: BTreeMap::new(),
        }
    }
}

impl KeyOps {
    fn keep(&mut self, e: &Event) {
        if self.events.len() < KEY_EVENTS_MAX {
            self.events.push(e.clone());
        } else {
            self.events_dropped += 1;
        }
    }
}

impl Checker for AcknowledgedOnce {
    fn observe(&mut self, e: &Event) {
        match (&e.op, e.kind) {
            // A fork is a submission too: its job carries the fork's key.
            (Op::Submit { key, .. } | Op::Fork { key, .. }, kind) => {
                let k = self.keys.entry(key.clone()).or_default();
                k.invoked |= kind == EventType::Invoke;
                k.keep(e);
            }
            (Op::Submitted { key, job_id, .. } | Op::Forked { key, job_id, .. }, kind) => {
                let k = self.keys.entry(key.clone()).or_default();
                k.keep(e);
                if kind != EventType::Ok {
                    return;
                }
                match &k.ack {
                    Some((first, id)) if id != job_id => self.found.add(
                        || {
                            format!(
                                "key {key:?} acknowledged as job {id} and later as job {job_id}"
                            )
                        },
                        || json!({ "first_ack": ev(first), "second_ack": ev(e) }),
                    ),
                    Some(_) => {}
                    None => k.ack = Some((e.clone(), *job_id)),
                }
            }
            (Op::Error { about, .. }, _) => {
                // Errors of cancels (`job N`) name no key.
                if let Some(k) = self.keys.get_mut(about) {
                    k.keep(e);
                }
            }
            _ => {}
        }
    }

    fn finish(&self, finals: &FinalReads) -> Option<Violation> {
        let mut found = self.found.clone();
        if finals.is_empty() {
            found.add(
                || "no final read of any replica's jobs: nothing can be checked".to_string(),
                || Value::Null,
            );
        }
        for (replica, read) in finals.iter() {
            let (read_event, jobs) = match read {
                Ok(r) => r,
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
                let ops = self.keys.get(*key);
                if js.len() > 1 {
                    found.add(
                        || {
                            format!(
                                "replica {replica}: key {key:?} applied {} times (jobs {:?})",
                                js.len(),
                                js.iter().map(|j| j.id).collect::<Vec<_>>()
                            )
                        },
                        || json!({ "replica": replica, "jobs": js, "ack": ops.and_then(|k| k.ack.as_ref()).map(|(e, _)| ev(e)) }),
                    );
                }
                if !ops.is_some_and(|k| k.invoked) {
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
            for (key, ops) in &self.keys {
                let Some((ack, id)) = &ops.ack else { continue };
                let present = by_key
                    .get(key.as_str())
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
                            json!({
                                "replica": replica,
                                "ack": ev(ack),
                                "operations_on_key": ops.events.iter().map(ev).collect::<Vec<_>>(),
                                "operations_not_shown": ops.events_dropped,
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
}

/// Every acknowledged submission exists exactly once (by key) with its acknowledged id on every
/// replica; two acknowledgements of one key name one job; no key is applied twice; no job exists
/// whose key no client ever sent.
pub fn acknowledged_once(h: &History) -> Option<Violation> {
    fold::<AcknowledgedOnce>(h)
}

/// The acknowledged cancels (reply state "cancelled"), in history order.
#[derive(Default)]
struct CancelsDurable {
    acks: Vec<Event>,
}

impl Checker for CancelsDurable {
    fn observe(&mut self, e: &Event) {
        if let (EventType::Ok, Op::Cancelled { state, .. }) = (e.kind, &e.op) {
            if state == "cancelled" {
                self.acks.push(e.clone());
            }
        }
    }

    fn finish(&self, finals: &FinalReads) -> Option<Violation> {
        let mut found = Found::new("cancels_durable");
        for e in &self.acks {
            let Op::Cancelled { job_id, .. } = &e.op else {
                continue;
            };
            for (replica, read) in finals.iter() {
                let Ok((_, jobs)) = read else { continue };
                let job = jobs.iter().find(|j| j.id == *job_id);
                if job.is_none_or(|j| j.state != "cancelled") {
                    found.add(
                        || match job {
                            None => {
                                format!("cancelled job {job_id} is missing on replica {replica}")
                            }
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
}

/// A cancel the cluster acknowledged (reply state "cancelled") stays cancelled on every replica.
pub fn cancels_durable(h: &History) -> Option<Violation> {
    fold::<CancelsDurable>(h)
}

struct NoOvercommit {
    found: Found,
}

impl Default for NoOvercommit {
    fn default() -> Self {
        NoOvercommit {
            found: Found::new("no_overcommit"),
        }
    }
}

impl Checker for NoOvercommit {
    fn observe(&mut self, e: &Event) {
        let (EventType::Ok, Op::ReadNodes { replica, nodes }) = (e.kind, &e.op) else {
            return;
        };
        for n in nodes {
            if n.allocated_cpu_millis > n.allocatable_cpu_millis
                || n.allocated_memory_mib > n.allocatable_memory_mib
            {
                self.found.add(
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

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        self.found.clone().finish()
    }
}

/// No node, in any sample, is allocated more CPU or memory than it offers.
pub fn no_overcommit(h: &History) -> Option<Violation> {
    fold::<NoOvercommit>(h)
}

/// How long a live node may go on running an older run of a sandbox whose newer run another
/// live node holds. A node cut off past the TTL comes back (re-registers: live again) still
/// running its copy; it stops it once its watch shows the sandbox is no longer its own: a
/// reconnect, a reconcile pass and at most the node's SIGTERM-to-SIGKILL grace (10 s). Three
/// times that is "never stopped", not "slow".
pub const STALE_COPY_GRACE_MS: u64 = 30_000;

struct OneLiveNode {
    found: Found,
    /// A stale copy -> the sample that first showed it (shared by the copies it showed).
    first_seen: BTreeMap<StaleCopy, Arc<Event>>,
    reported: BTreeSet<StaleCopy>,
    /// Stale copies not followed because [`STALE_COPIES_MAX`] were.
    untracked: u64,
}

impl Default for OneLiveNode {
    fn default() -> Self {
        OneLiveNode {
            found: Found::new("one_live_node_per_sandbox"),
            first_seen: BTreeMap::new(),
            reported: BTreeSet::new(),
            untracked: 0,
        }
    }
}

impl Checker for OneLiveNode {
    fn observe(&mut self, e: &Event) {
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
            return;
        };
        for d in doubles {
            self.found.add(
                || {
                    format!(
                        "sandbox {}.{} assigned to live nodes {:?} at once (seen on replica {replica} at {} ms)",
                        d.job, d.index, d.nodes, e.time_ms
                    )
                },
                || json!({ "sandbox": d, "sample_index": e.index, "time_ms": e.time_ms, "replica": replica }),
            );
        }
        let mut this: Option<Arc<Event>> = None;
        for copy in stale {
            let first = match self.first_seen.get(copy) {
                Some(first) => first.clone(),
                None if self.first_seen.len() >= STALE_COPIES_MAX => {
                    self.untracked += 1;
                    continue;
                }
                None => {
                    let first = this.get_or_insert_with(|| Arc::new(e.clone())).clone();
                    self.first_seen.insert(copy.clone(), first.clone());
                    first
                }
            };
            let held_ms = e.time_ms.saturating_sub(first.time_ms);
            if held_ms > STALE_COPY_GRACE_MS && !self.reported.contains(copy) {
                self.reported.insert(copy.clone());
                self.found.add(
                    || {
                        format!(
                            "live node {} still ran sandbox {}.{} generation {} {held_ms} ms after a newer run was on another live node (seen on replica {replica} at {} ms)",
                            copy.node, copy.job, copy.index, copy.generation, e.time_ms
                        )
                    },
                    || json!({ "copy": copy, "first_sample": ev(&first), "last_sample": ev(e) }),
                );
            }
        }
    }

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        let mut found = self.found.clone();
        if self.untracked > 0 {
            found.add(
                || {
                    format!(
                        "more than {STALE_COPIES_MAX} stale copies on live nodes; {} more were not followed",
                        self.untracked
                    )
                },
                || json!({ "untracked": self.untracked }),
            );
        }
        found.finish()
    }
}

/// No sandbox, in any sample, is held by two live nodes at once: no two live nodes hold its
/// newest run (`doubles`), and no live node keeps running an older run for longer than
/// [`STALE_COPY_GRACE_MS`] while another live node holds a newer one (`stale`, judged across
/// samples). The simulator's samples read every node's assignments in its state; the
/// real-process harness reads them from a replica and adds what the container daemons really run
/// (see `crate::holdings`).
pub fn one_live_node_per_sandbox(h: &History) -> Option<Violation> {
    fold::<OneLiveNode>(h)
}

/// Sandboxes of a gang holding a node (placed, running or paused).
fn active(j: &JobSample) -> u32 {
    j.placed + j.running + j.paused
}

struct GangAllOrNothing {
    found: Found,
    /// Gang jobs already reported (each once, at its first partial sample).
    seen: BTreeSet<u64>,
    /// The last [`RECENT_FAULTS_MAX`] faults, oldest first.
    recent_faults: VecDeque<Event>,
}

impl Default for GangAllOrNothing {
    fn default() -> Self {
        GangAllOrNothing {
            found: Found::new("gang_all_or_nothing"),
            seen: BTreeSet::new(),
            recent_faults: VecDeque::new(),
        }
    }
}

impl Checker for GangAllOrNothing {
    fn observe(&mut self, e: &Event) {
        if matches!(e.op, Op::Fault { .. }) {
            if self.recent_faults.len() == RECENT_FAULTS_MAX {
                self.recent_faults.pop_front();
            }
            self.recent_faults.push_back(e.clone());
            return;
        }
        let (EventType::Ok, Op::ReadJobs { replica, jobs }) = (e.kind, &e.op) else {
            return;
        };
        for j in jobs {
            if j.gang && active(j) > 0 && j.pending > 0 && self.seen.insert(j.id) {
                let recent = &self.recent_faults;
                self.found.add(
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
                        let faults: Vec<Value> = recent
                            .iter()
                            .rev()
                            .filter(|f| f.time_ms <= e.time_ms)
                            .map(ev)
                            .collect();
                        json!({ "job": j, "sample_index": e.index, "time_ms": e.time_ms, "replica": replica, "recent_faults": faults })
                    },
                );
            }
        }
    }

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        self.found.clone().finish()
    }
}

/// No gang job, in any sample, has sandboxes active while others of it wait to be placed.
pub fn gang_all_or_nothing(h: &History) -> Option<Violation> {
    fold::<GangAllOrNothing>(h)
}

mod converged;
mod lid;
mod liveness;

use converged::Converged;
use liveness::Liveness;

pub use converged::converged;
pub use lid::checkpoint_restored_once;
pub use liveness::{liveness, placeable, satisfies_all};

#[cfg(test)]
mod tests;
