//! The history of a chaos run: every operation a client, the fault injector or the sampler
//! performed, as Jepsen records it.
//!
//! An operation is an `invoke` event followed by exactly one completion from the same process:
//! `ok` (the cluster acknowledged it), `fail` (the cluster definitely did not do it) or `info`
//! (unknown: a timeout or a dropped connection; it may or may not have taken effect). A retry is a
//! new operation with the same idempotency key. Checkers read only this history and the final
//! states, so a violation can be explained from the history alone.
//!
//! A real-process run does not keep its history in memory: the [`Recorder`] hands every event to
//! one recording thread, which appends it to a JSON-lines file and feeds it to a [`Fold`] (the
//! checkers, folded event by event) and forgets it. An hour-long run thus holds what the checkers
//! keep, not the history. [`History`] is the in-memory form for the simulator and for tests.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Who performed an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// A job as a sample saw it: what the checkers need, no more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
}

/// A sandbox and the live nodes a state assigns it to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxHolders {
    pub job: u64,
    pub index: u32,
    pub nodes: Vec<String>,
}

/// A run of a sandbox that a live node still runs although the scheduler has given a newer run
/// (a higher generation) of it to another live node: a returning node's copy it has not stopped
/// yet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StaleCopy {
    pub node: String,
    pub job: u64,
    pub index: u32,
    pub generation: u64,
}

/// A node as a sample saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSample {
    pub id: String,
    pub state: String,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_mib: u64,
    pub allocated_cpu_millis: u64,
    pub allocated_memory_mib: u64,
    pub sandboxes: u32,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A sandbox run a container node's host runs, as crun lists it (the ground truth).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostCopy {
    pub node: String,
    pub job: u64,
    pub index: u32,
    pub generation: u64,
}

/// What an operation did or asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Read every job of the run's tenant from one replica. The final reads keep every job; the
    /// samples taken while the run goes on (sampler, liveness) keep only the jobs in flight (see
    /// [`in_flight`]): every job ever submitted in every sample made the history grow with the
    /// square of the run's length, and a job with nothing pending or active cannot break a
    /// property a sample judges.
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
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stale: Vec<StaleCopy>,
    },
    /// Close or open the lid of sandbox `job_id`.`sandbox_index`: `action` is `checkpoint` (`surge pause
    /// --checkpoint`) or `resume`. The reply is the same op with `ok`; a refusal is an `Error`.
    Lid {
        job_id: u64,
        /// (Not `index`: the event's own position in the history is `index`.)
        sandbox_index: u32,
        action: String,
        replica: u64,
    },
    /// Fork sandbox `job_id`.`sandbox_index` into `count` sandboxes under idempotency key `key`.
    Fork {
        key: String,
        job_id: u64,
        sandbox_index: u32,
        count: u32,
        replica: u64,
    },
    /// The reply to a fork: its new job, and the node the scheduler pinned its forks to (the
    /// source's node when it forked; "" when the read that tells it failed).
    Forked {
        key: String,
        source_job: u64,
        source_index: u32,
        job_id: u64,
        node: String,
    },
    /// Every sandbox run the container nodes' hosts run, in one read of all of them.
    ReadHosts { copies: Vec<HostCopy> },
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// Whether a sample's property can concern job `j`: some of its sandboxes wait to be placed or
/// hold a node. `gang_all_or_nothing` looks for active and pending at once, `liveness` for
/// pending; a job with neither is judged only by the final reads.
pub fn in_flight(j: &JobSample) -> bool {
    j.pending + j.placed + j.running + j.paused > 0
}

/// What consumes the events of a recording, one at a time, in the order they were recorded.
pub trait Fold: Send + 'static {
    fn observe(&mut self, e: &Event);
}

/// Keeps every event: the in-memory history (tests, short runs).
impl Fold for Vec<Event> {
    fn observe(&mut self, e: &Event) {
        self.push(e.clone());
    }
}

/// Most events waiting for the recording thread. A task that records while this many wait blocks
/// until the thread catches up (the file's write speed bounds the recording, not memory).
pub const EVENTS_QUEUED_MAX: usize = 4096;

enum Message {
    Event {
        time_ms: u64,
        process: Process,
        kind: EventType,
        op: Op,
    },
    /// Flush the file and return the fold: the history ends here.
    End,
}

/// A shared handle that concurrent tasks record into. Recording sends the event to the recording
/// thread over a bounded queue and never waits on I/O while the queue has room. After
/// [`Recording::finish`] recording is a no-op.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    queue: SyncSender<Message>,
}

/// The recording thread of a [`Recorder`]: it owns the history file and the fold.
pub struct Recording<F> {
    queue: SyncSender<Message>,
    thread: std::thread::JoinHandle<Recorded<F>>,
}

/// What a recording leaves: the fold, how many events it saw, and the first error writing the
/// history file (the fold saw every event even then).
pub struct Recorded<F> {
    pub fold: F,
    pub events: u64,
    pub write_error: Option<std::io::Error>,
}

impl Recorder {
    /// Start recording into `fold` and, when given, a JSON-lines file at `path` (one event a line,
    /// created or truncated).
    pub fn start<F: Fold>(
        path: Option<&Path>,
        fold: F,
    ) -> std::io::Result<(Recorder, Recording<F>)> {
        let file = path.map(std::fs::File::create).transpose()?;
        let (queue, events) = std::sync::mpsc::sync_channel(EVENTS_QUEUED_MAX);
        let thread = std::thread::Builder::new()
            .name("chaos-history".into())
            .spawn(move || record_loop(events, file, fold))?;
        Ok((
            Recorder {
                started: Instant::now(),
                queue: queue.clone(),
            },
            Recording { queue, thread },
        ))
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, process: Process, kind: EventType, op: Op) {
        let time_ms = self.elapsed_ms();
        // An error means the recording has finished: a straggler's event is not part of it.
        let _ = self.queue.send(Message::Event {
            time_ms,
            process,
            kind,
            op,
        });
    }
}

impl<F> Recording<F> {
    /// End the history: wait for the thread to fold and write what is queued, and take the fold.
    pub fn finish(self) -> Recorded<F> {
        let _ = self.queue.send(Message::End);
        match self.thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn record_loop<F: Fold>(
    queue: Receiver<Message>,
    file: Option<std::fs::File>,
    mut fold: F,
) -> Recorded<F> {
    let mut out = file.map(std::io::BufWriter::new);
    let mut write_error = None;
    let mut index = 0u64;
    while let Ok(Message::Event {
        time_ms,
        process,
        kind,
        op,
    }) = queue.recv()
    {
        let e = Event {
            index,
            time_ms,
            process,
            kind,
            op,
        };
        index += 1;
        fold.observe(&e);
        if let Some(w) = &mut out {
            let written = serde_json::to_writer(&mut *w, &e)
                .map_err(std::io::Error::from)
                .and_then(|()| w.write_all(b"\n"));
            if let Err(err) = written {
                write_error = Some(err);
                out = None;
            }
        }
    }
    if let Some(Err(err)) = out.as_mut().map(std::io::Write::flush) {
        write_error = write_error.or(Some(err));
    }
    Recorded {
        fold,
        events: index,
        write_error,
    }
}

/// The events of a history file written by a [`Recorder`], in order; stops at the first line
/// that does not parse (with its error).
pub fn read_events(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<Event>>> {
    use std::io::BufRead;
    let lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
    Ok(lines.map(|l| l.and_then(|l| serde_json::from_str(&l).map_err(std::io::Error::from))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_writes_every_event_in_order_and_folds_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let (r, recording) = Recorder::start(Some(&path), Vec::new()).expect("start");
        let job = JobSample {
            id: 7,
            key: "k".into(),
            pending: 1,
            constraints: vec!["chaos=sim".into()],
            ..JobSample::default()
        };
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            for i in 0..100 {
                r2.record(
                    Process::Client(1),
                    EventType::Invoke,
                    Op::Cancel {
                        job_id: i,
                        replica: 2,
                    },
                );
            }
        });
        r.record(
            Process::Sampler,
            EventType::Ok,
            Op::ReadJobs {
                replica: 1,
                jobs: vec![job],
            },
        );
        t.join().expect("recording thread");
        let done = recording.finish();
        assert!(done.write_error.is_none());
        assert_eq!(done.events, 101);
        // After the end, recording is a no-op rather than a hang or a panic.
        r.record(
            Process::Final,
            EventType::Info,
            Op::Note {
                text: "late".into(),
            },
        );
        let read: Vec<Event> = read_events(&path)
            .expect("open")
            .collect::<std::io::Result<_>>()
            .expect("every line parses");
        assert_eq!(read, done.fold, "the file holds exactly what the fold saw");
        assert!(read.iter().enumerate().all(|(i, e)| e.index == i as u64));
        // One client's events keep their order.
        let cancels: Vec<u64> = read
            .iter()
            .filter_map(|e| match e.op {
                Op::Cancel { job_id, .. } => Some(job_id),
                _ => None,
            })
            .collect();
        assert_eq!(cancels, (0..100).collect::<Vec<_>>());
    }
}
