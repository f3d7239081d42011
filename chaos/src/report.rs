//! The report of a real-process chaos run, and the fold that gathers it from the history as the
//! history is recorded ([`RunFold`]: the checkers and the report's counts), so that no step
//! needs the history in memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::checker::{self, Checks, Violation};
use crate::history::{Event, EventType, Fold, JobSample, Op, Process};
use crate::memory::MemoryFigures;
use crate::workload::{CLASS_LABEL, CONTAINER_CLASS};

/// Most failed container sandboxes a report explains.
pub const CONTAINER_FAILURES_MAX: usize = 10;
/// How the notes that explain a failed container sandbox begin.
pub(crate) const FAILURE_NOTE: &str = "failed container sandbox ";

#[derive(Clone, Debug, Default, Serialize)]
pub struct Operations {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    pub submissions_acknowledged: u64,
    pub keys_submitted: u64,
    pub cancels_acknowledged: u64,
    /// Reads of every job or every node (sampler, watchers, liveness, final reads).
    pub samples: u64,
    /// Samples of which live node holds which sandbox (`one_live_node_per_sandbox`).
    pub assignment_samples: u64,
    /// Holdings (node, sandbox run) those samples looked at.
    pub assignments_checked: u64,
    /// Of those, runs seen running on a container daemon's host.
    pub container_runs_seen: u64,
    /// Checkpoints, resumes and forks of the workload's counters the cluster acknowledged.
    pub checkpoints_acknowledged: u64,
    pub resumes_acknowledged: u64,
    pub forks_acknowledged: u64,
    /// Reads of what the container nodes' hosts run, and the returns of a run to its host
    /// (restores) they showed (`checkpoint_restored_once`).
    pub host_reads: u64,
    pub restores_seen: u64,
    pub events: u64,
}

/// The container nodes of a run and what their sandboxes did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ContainerFigures {
    /// Container jobs in the first final read, and their sandboxes by end state.
    pub jobs: u64,
    pub sandboxes: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Why sandboxes failed: state, node, exit code, message, output tail (at most
    /// [`CONTAINER_FAILURES_MAX`]).
    pub failures: Vec<String>,
    /// Containers, processes, mounts or cgroups of the run still on the host after the cleanup
    /// (a violation when not empty).
    pub leftovers: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_ms: u64,
    pub elapsed_ms: u64,
    pub faults: BTreeMap<String, u64>,
    pub faults_total: u64,
    pub operations: Operations,
    /// Real node daemons on the container runtime.
    pub container_nodes: u32,
    pub containers: ContainerFigures,
    /// Peak memory of the harness, the replicas and the node daemons.
    pub memory: MemoryFigures,
    pub checkers: Vec<String>,
    pub violations: Vec<Violation>,
    /// "pass" or "fail".
    pub verdict: String,
    /// Where the data dirs and logs are, when kept.
    pub data_dir: Option<PathBuf>,
    /// The history as JSON lines, one event a line, when kept (with the data dirs, or where
    /// asked).
    pub history: Option<PathBuf>,
}

/// Whether a job sample is meant for the container nodes.
pub fn is_container_job(j: &JobSample) -> bool {
    j.constraints
        .iter()
        .any(|c| *c == format!("{CLASS_LABEL}={CONTAINER_CLASS}"))
}

/// The report's counts, folded over the history.
#[derive(Default)]
pub struct Tally {
    /// Client operations by completion: ok, fail, info.
    outcomes: (u64, u64, u64),
    cancels: u64,
    samples: u64,
    assignment_samples: u64,
    assignments_checked: u64,
    container_runs_seen: u64,
    /// Acknowledged checkpoints, resumes, forks.
    lids: (u64, u64, u64),
    faults: BTreeMap<String, u64>,
    events: u64,
    /// The container jobs of the first successful final read.
    final_container_jobs: Option<Vec<JobSample>>,
    /// The first [`CONTAINER_FAILURES_MAX`] notes on failed container sandboxes.
    failures: Vec<String>,
}

impl Fold for Tally {
    fn observe(&mut self, e: &Event) {
        self.events += 1;
        if matches!(e.process, Process::Client(_)) {
            match e.kind {
                EventType::Ok => self.outcomes.0 += 1,
                EventType::Fail => self.outcomes.1 += 1,
                EventType::Info => self.outcomes.2 += 1,
                EventType::Invoke => {}
            }
        }
        match (&e.op, e.kind) {
            (Op::Cancelled { .. }, EventType::Ok) => self.cancels += 1,
            (Op::Lid { action, .. }, EventType::Ok) => match action.as_str() {
                "checkpoint" => self.lids.0 += 1,
                _ => self.lids.1 += 1,
            },
            (Op::Forked { .. }, EventType::Ok) => self.lids.2 += 1,
            (Op::ReadJobs { jobs, .. }, EventType::Ok) => {
                self.samples += 1;
                if e.process == Process::Final && self.final_container_jobs.is_none() {
                    let ours = jobs.iter().filter(|j| is_container_job(j)).cloned();
                    self.final_container_jobs = Some(ours.collect());
                }
            }
            (Op::ReadNodes { .. }, EventType::Ok) => self.samples += 1,
            (
                Op::ReadAssignments {
                    checked, running, ..
                },
                EventType::Ok,
            ) => {
                self.assignment_samples += 1;
                self.assignments_checked += checked;
                self.container_runs_seen += running;
            }
            (Op::Fault { kind, .. }, EventType::Invoke) => {
                *self.faults.entry(kind.clone()).or_insert(0) += 1;
            }
            (Op::Note { text }, _)
                if e.process == Process::Final
                    && text.starts_with(FAILURE_NOTE)
                    && self.failures.len() < CONTAINER_FAILURES_MAX =>
            {
                self.failures.push(text.clone());
            }
            _ => {}
        }
    }
}

impl Tally {
    /// The container jobs of the first successful final read, by end state, and why sandboxes
    /// failed (the notes the run recorded).
    pub fn container_figures(&self) -> ContainerFigures {
        let mut f = ContainerFigures::default();
        for j in self.final_container_jobs.iter().flatten() {
            f.jobs += 1;
            f.sandboxes += u64::from(j.count);
            f.succeeded += u64::from(j.succeeded);
            f.failed += u64::from(j.failed);
            f.cancelled += u64::from(j.cancelled);
        }
        f.failures = self.failures.clone();
        f
    }
}

/// What a real-process run folds its history into: the checkers and the report's counts.
#[derive(Default)]
pub struct RunFold {
    pub checks: Checks,
    pub tally: Tally,
}

impl Fold for RunFold {
    fn observe(&mut self, e: &Event) {
        self.checks.observe(e);
        self.tally.observe(e);
    }
}

/// What a report says of the run besides its history.
pub struct RunFacts {
    pub seed: u64,
    pub duration: Duration,
    pub elapsed: Duration,
    pub container_nodes: u32,
    pub memory: MemoryFigures,
}

impl Report {
    pub fn new(facts: RunFacts, fold: &RunFold) -> Self {
        let violations = fold.checks.violations();
        let t = &fold.tally;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Report {
            seed: facts.seed,
            duration_ms: ms(facts.duration),
            elapsed_ms: ms(facts.elapsed),
            faults_total: t.faults.values().sum(),
            faults: t.faults.clone(),
            operations: Operations {
                ok: t.outcomes.0,
                fail: t.outcomes.1,
                info: t.outcomes.2,
                submissions_acknowledged: fold.checks.keys_acknowledged(),
                keys_submitted: fold.checks.keys_submitted(),
                cancels_acknowledged: t.cancels,
                samples: t.samples,
                assignment_samples: t.assignment_samples,
                assignments_checked: t.assignments_checked,
                container_runs_seen: t.container_runs_seen,
                checkpoints_acknowledged: t.lids.0,
                resumes_acknowledged: t.lids.1,
                forks_acknowledged: t.lids.2,
                host_reads: fold.checks.host_reads_and_restores().0,
                restores_seen: fold.checks.host_reads_and_restores().1,
                events: t.events,
            },
            container_nodes: facts.container_nodes,
            containers: t.container_figures(),
            memory: facts.memory,
            checkers: checker::CHECKERS
                .iter()
                .map(|(n, _)| n.to_string())
                .chain((facts.container_nodes > 0).then(|| crate::run::LEFTOVERS_CHECKER.into()))
                .collect(),
            verdict: if violations.is_empty() {
                "pass"
            } else {
                "fail"
            }
            .to_string(),
            violations,
            data_dir: None,
            history: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;

    #[test]
    fn container_figures_count_container_jobs_and_keep_failure_notes() {
        let job = |id, constraint: &str, succeeded, failed| JobSample {
            id,
            key: format!("k{id}"),
            count: succeeded + failed,
            succeeded,
            failed,
            state: "complete".into(),
            constraints: vec![constraint.into()],
            ..JobSample::default()
        };
        let h = History::from_events(vec![
            (
                1,
                Process::Final,
                EventType::Ok,
                Op::ReadJobs {
                    replica: 1,
                    jobs: vec![
                        job(1, "chaos=container", 3, 1),
                        job(2, "chaos=sim", 5, 0),
                        job(3, "chaos=container", 2, 0),
                    ],
                },
            ),
            (
                2,
                Process::Final,
                EventType::Ok,
                Op::ReadJobs {
                    replica: 2,
                    jobs: vec![job(1, "chaos=container", 9, 9)],
                },
            ),
            (
                3,
                Process::Final,
                EventType::Info,
                Op::Note {
                    text: format!("{FAILURE_NOTE}1.3 failed on node ctr-1-0"),
                },
            ),
            (
                4,
                Process::Final,
                EventType::Info,
                Op::Note {
                    text: "something else".into(),
                },
            ),
        ]);
        let mut tally = Tally::default();
        for e in &h.events {
            tally.observe(e);
        }
        let f = tally.container_figures();
        assert_eq!(
            (f.jobs, f.sandboxes, f.succeeded, f.failed),
            (2, 6, 5, 1),
            "{f:?}"
        );
        assert_eq!(f.failures.len(), 1);
        assert!(f.failures[0].contains("1.3"), "{:?}", f.failures);
    }

    /// The report counts what the old whole-history walk counted.
    #[test]
    fn the_tally_counts_operations_faults_and_keys() {
        let submit = |key: &str| Op::Submit {
            key: key.into(),
            replica: 1,
            gang: false,
            count: 1,
            cpu_millis: 100,
            memory_mib: 64,
        };
        let acked = |key: &str, job_id| Op::Submitted {
            key: key.into(),
            job_id,
            created: true,
        };
        let fault = Op::Fault {
            kind: "kill".into(),
            target: "1".into(),
            detail: String::new(),
        };
        let h = History::from_events(vec![
            (1, Process::Client(0), EventType::Invoke, submit("a")),
            (2, Process::Client(0), EventType::Ok, acked("a", 7)),
            (3, Process::Client(1), EventType::Invoke, submit("b")),
            (4, Process::Client(1), EventType::Invoke, submit("b")),
            (5, Process::Faults, EventType::Invoke, fault.clone()),
            (6, Process::Faults, EventType::Ok, fault),
            (
                7,
                Process::Client(1),
                EventType::Ok,
                Op::Cancelled {
                    job_id: 7,
                    state: "cancelled".into(),
                },
            ),
        ]);
        let mut fold = RunFold::default();
        for e in &h.events {
            fold.observe(e);
        }
        let r = Report::new(
            RunFacts {
                seed: 1,
                duration: Duration::from_secs(1),
                elapsed: Duration::from_secs(2),
                container_nodes: 0,
                memory: MemoryFigures::default(),
            },
            &fold,
        );
        let o = &r.operations;
        assert_eq!((o.ok, o.fail, o.info), (2, 0, 0));
        assert_eq!((o.keys_submitted, o.submissions_acknowledged), (2, 1));
        assert_eq!((o.cancels_acknowledged, o.events), (1, 7));
        assert_eq!(r.faults.get("kill"), Some(&1));
        assert_eq!(r.faults_total, 1);
        // No final reads: the checkers say so.
        assert_eq!(r.verdict, "fail");
        assert_eq!(r.violations, checker::check_all(&h));
    }
}
