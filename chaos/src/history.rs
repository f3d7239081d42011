//! The history of a chaos run: every operation a client, the fault injector or the sampler
//! performed, as Jepsen records it.
//!
//! An operation is an `invoke` event followed by exactly one completion from the same process:
//! `ok` (the cluster acknowledged it), `fail` (the cluster definitely did not do it) or `info`
//! (unknown: a timeout or a dropped connection; it may or may not have taken effect). A retry is a
//! new operation with the same idempotency key. Checkers read only this history and the final
//! states, so a violation can be explained from the history alone.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Who performed an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Process {
    /// A workload client, by number.
    Client(u32),
    /// The fault injector ("nemesis" in Jepsen).
    Faults,
    /// The sampler that reads nodes and jobs while the run goes on.
    Sampler,
    /// Watchers of gang jobs (`WatchJob`): every committed change of a gang's counts.
    Watch,
    /// Observations after the faults healed, until nothing placeable is pending.
    Liveness,
    /// The final reads of every replica.
    Final,
}

/// How an event ends (or starts) an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// A job as a sample saw it: what the checkers need, no more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobSample {
    pub id: u64,
    pub key: String,
    pub gang: bool,
    pub count: u32,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub state: String,
    pub pending: u32,
    pub placed: u32,
    pub running: u32,
    pub paused: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub lost: u32,
    pub cancelled: u32,
    /// Times sandboxes of this job were preempted or rescheduled back to pending.
    pub preempted: u32,
    pub submitted_index: u64,
    pub pending_reason: String,
    /// The job's placement constraints as `KEY=VALUE` or `KEY!=VALUE` (labels only are judged
    /// by [`crate::checker::placeable`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
}

/// A sandbox and the live nodes a state assigns it to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SandboxHolders {
    pub job: u64,
    pub index: u32,
    pub nodes: Vec<String>,
}

/// A run of a sandbox that a live node still runs although the scheduler has given a newer run
/// (a higher generation) of it to another live node: a returning node's copy it has not stopped
/// yet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct StaleCopy {
    pub node: String,
    pub job: u64,
    pub index: u32,
    pub generation: u64,
}

/// A node as a sample saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeSample {
    pub id: String,
    pub state: String,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_mib: u64,
    pub allocated_cpu_millis: u64,
    pub allocated_memory_mib: u64,
    pub sandboxes: u32,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What an operation did or asked for.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Submit a job under an idempotency key (sent to replica `replica`).
    Submit {
        key: String,
        replica: u64,
        gang: bool,
        count: u32,
        cpu_millis: u64,
        memory_mib: u64,
    },
    /// The reply to a submission.
    Submitted {
        key: String,
        job_id: u64,
        created: bool,
    },
    /// Cancel a job.
    Cancel { job_id: u64, replica: u64 },
    /// The reply to a cancel: the job's state afterwards.
    Cancelled { job_id: u64, state: String },
    /// A fault: `kind` on `target` (a replica id, or a node group).
    Fault {
        kind: String,
        target: String,
        detail: String,
    },
    /// Read every node from one replica.
    ReadNodes {
        replica: u64,
        nodes: Vec<NodeSample>,
    },
    /// Read every job of the run's tenant from one replica.
    ReadJobs { replica: u64, jobs: Vec<JobSample> },
    /// Which live nodes (ready or draining) hold each active sandbox, as one replica's state
    /// assigns them (and, in the real-process harness, as the container daemons run them): how
    /// many holdings were looked at, every sandbox whose newest run is held by more than one
    /// live node, and older runs live nodes still run (judged by how long they last).
    ReadAssignments {
        replica: u64,
        checked: u64,
        /// Of `checked`, the runs seen running on a container daemon's host (0 in the simulator).
        #[serde(default)]
        running: u64,
        doubles: Vec<SandboxHolders>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        stale: Vec<StaleCopy>,
    },
    /// A replica's applied index and state hash (`fail`: it did not answer).
    ReplicaStatus {
        replica: u64,
        applied_index: u64,
        state_hash: String,
    },
    /// Every fault is healed: every replica and node daemon runs; liveness is checked from here.
    Healed { liveness_bound_ms: u64 },
    /// A completion that carries an error instead of a reply; `about` is the idempotency key of a
    /// submission or `job N` for a cancel.
    Error { about: String, error: String },
    /// Anything else worth keeping in the history (an error text, a phase change).
    Note { text: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Position in the history.
    pub index: u64,
    /// Milliseconds since the run started.
    pub time_ms: u64,
    pub process: Process,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(flatten)]
    pub op: Op,
}

/// The whole history, in the order events were recorded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    /// Build a history from `(time_ms, process, type, op)` tuples (hand-made histories in tests).
    pub fn from_events(events: Vec<(u64, Process, EventType, Op)>) -> Self {
        History {
            events: events
                .into_iter()
                .enumerate()
                .map(|(i, (time_ms, process, kind, op))| Event {
                    index: i as u64,
                    time_ms,
                    process,
                    kind,
                    op,
                })
                .collect(),
        }
    }

    /// Operations counted by how they completed: (ok, fail, info) of client operations.
    pub fn client_outcomes(&self) -> (u64, u64, u64) {
        let (mut ok, mut fail, mut info) = (0, 0, 0);
        for e in &self.events {
            if matches!(e.process, Process::Client(_)) {
                match e.kind {
                    EventType::Ok => ok += 1,
                    EventType::Fail => fail += 1,
                    EventType::Info => info += 1,
                    EventType::Invoke => {}
                }
            }
        }
        (ok, fail, info)
    }

    /// Invocations of faults, by kind.
    pub fn faults_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by = std::collections::BTreeMap::new();
        for e in &self.events {
            if let (EventType::Invoke, Op::Fault { kind, .. }) = (e.kind, &e.op) {
                *by.entry(kind.clone()).or_insert(0) += 1;
            }
        }
        by
    }
}

/// A shared handle that concurrent tasks record into. Recording takes a short lock and never
/// waits on I/O, so it cannot slow the workload down enough to matter.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            started: Instant::now(),
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, process: Process, kind: EventType, op: Op) {
        let time_ms = self.elapsed_ms();
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = events.len() as u64;
        events.push(Event {
            index,
            time_ms,
            process,
            kind,
            op,
        });
    }

    /// A copy of everything recorded so far.
    pub fn history(&self) -> History {
        History {
            events: self
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}
