//! `checkpoint_restored_once`: a checkpointed sandbox is never running on two nodes, each
//! checkpoint image is restored at most once, and forks run only on their source's node.
//!
//! Judged from the ground truth, the container nodes' hosts (`Op::ReadHosts`: every run crun
//! runs there, read on all hosts at once), and from the workload's own operations:
//!
//! - A run (`job.index` at one generation) is one placement on one node; a restore continues the
//!   same run on the same node (the image lives there). So one run seen on two nodes in one read
//!   is a double, whatever the cause.
//! - A run that vanished from its host and comes back is a restore. Each checkpoint the
//!   workload asked for (`Op::Lid` with `checkpoint`, whatever its outcome: a timed-out request
//!   may have taken effect) allows one such return; a return beyond that means an image was
//!   restored twice (or a run was started again from nothing under an old generation). It must
//!   come back on the node it left: another node has no image of it.
//! - Every run of a fork job is on the node the scheduler pinned the fork to when it was made
//!   (`Op::Forked`): the node of its source's checkpoint.
//!
//! What it keeps is per run and per sandbox the workload checkpointed, each under
//! [`RUNS_MAX`]; more is itself reported.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::{ev, fold, Checker, FinalReads, Found, Violation};
use crate::history::{Event, EventType, History, HostCopy, Op};

/// Runs (and, apart, checkpointed sandboxes and forks) the checker follows.
pub const RUNS_MAX: usize = 65_536;

/// One run as the host reads showed it.
struct RunSeen {
    node: String,
    /// In the last host read.
    present: bool,
    /// The last read that showed it (history index, time).
    last_seen: (u64, u64),
}

pub(crate) struct RestoredOnce {
    found: Found,
    /// (job, index, generation) -> where and whether it was running at the last read.
    runs: BTreeMap<(u64, u32, u64), RunSeen>,
    /// (job, index) -> checkpoints asked for that no return of its run has used yet.
    unused_checkpoints: BTreeMap<(u64, u32), u64>,
    /// Fork job -> (its pinned node, its source `JOB.INDEX`).
    forks: BTreeMap<u64, (String, String)>,
    /// Returns of a run to its host seen (restores); a figure for the report.
    pub(crate) restores: u64,
    /// Host reads seen.
    pub(crate) host_reads: u64,
    untracked: u64,
}

impl Default for RestoredOnce {
    fn default() -> Self {
        RestoredOnce {
            found: Found::new("checkpoint_restored_once"),
            runs: BTreeMap::new(),
            unused_checkpoints: BTreeMap::new(),
            forks: BTreeMap::new(),
            restores: 0,
            host_reads: 0,
            untracked: 0,
        }
    }
}

impl RestoredOnce {
    fn read_hosts(&mut self, e: &Event, copies: &[HostCopy]) {
        self.host_reads += 1;
        let mut nodes_of: BTreeMap<(u64, u32, u64), BTreeSet<&str>> = BTreeMap::new();
        for c in copies {
            nodes_of
                .entry((c.job, c.index, c.generation))
                .or_default()
                .insert(c.node.as_str());
        }
        for (&(job, index, generation), nodes) in &nodes_of {
            if nodes.len() > 1 {
                self.found.add(
                    || {
                        format!(
                            "sandbox {job}.{index} generation {generation} ran on nodes {nodes:?} at once (host read at {} ms)",
                            e.time_ms
                        )
                    },
                    || json!({ "sandbox": format!("{job}.{index}"), "generation": generation, "nodes": nodes, "read": ev(e) }),
                );
            }
            for node in nodes {
                if let Some((pinned, source)) = self.forks.get(&job) {
                    if !pinned.is_empty() && pinned != node {
                        self.found.add(
                            || {
                                format!(
                                    "fork {job}.{index} (of {source}) ran on node {node}, but its source's checkpoint was on node {pinned} (host read at {} ms)",
                                    e.time_ms
                                )
                            },
                            || json!({ "fork": format!("{job}.{index}"), "source": source, "pinned": pinned, "node": node, "read": ev(e) }),
                        );
                    }
                }
            }
            let node = nodes.iter().next().copied().unwrap_or_default();
            let key = (job, index, generation);
            let full = self.runs.len() >= RUNS_MAX;
            match self.runs.get_mut(&key) {
                None if full => self.untracked += 1,
                None => {
                    self.runs.insert(
                        key,
                        RunSeen {
                            node: node.to_string(),
                            present: true,
                            last_seen: (e.index, e.time_ms),
                        },
                    );
                }
                Some(seen) if seen.present => {
                    seen.last_seen = (e.index, e.time_ms);
                }
                Some(seen) => {
                    // It left its host and is back: a restore.
                    self.restores += 1;
                    let left = seen.last_seen;
                    let before = seen.node.clone();
                    seen.present = true;
                    seen.last_seen = (e.index, e.time_ms);
                    seen.node = node.to_string();
                    let tokens = self.unused_checkpoints.entry((job, index)).or_insert(0);
                    if *tokens == 0 {
                        self.found.add(
                            || {
                                format!(
                                    "sandbox {job}.{index} generation {generation} ran again on node {node} at {} ms after it had left node {before} at {} ms, with no checkpoint asked for in between: an image restored twice, or a run started again",
                                    e.time_ms, left.1
                                )
                            },
                            || json!({ "sandbox": format!("{job}.{index}"), "generation": generation, "left_after_read": left.0, "back": ev(e) }),
                        );
                    } else {
                        *tokens -= 1;
                    }
                    if before != node {
                        self.found.add(
                            || {
                                format!(
                                    "sandbox {job}.{index} generation {generation} was restored on node {node}, but it was checkpointed on node {before} (host read at {} ms)",
                                    e.time_ms
                                )
                            },
                            || json!({ "sandbox": format!("{job}.{index}"), "generation": generation, "from": before, "to": node, "back": ev(e) }),
                        );
                    }
                }
            }
        }
        for (key, seen) in self.runs.iter_mut() {
            if seen.present && !nodes_of.contains_key(key) {
                seen.present = false;
            }
        }
    }
}

impl Checker for RestoredOnce {
    fn observe(&mut self, e: &Event) {
        match (&e.op, e.kind) {
            (Op::ReadHosts { copies }, EventType::Ok) => self.read_hosts(e, copies),
            (
                Op::Lid {
                    job_id,
                    sandbox_index: index,
                    action,
                    ..
                },
                EventType::Invoke,
            ) if action == "checkpoint" => {
                let n = self.unused_checkpoints.len();
                match self.unused_checkpoints.get_mut(&(*job_id, *index)) {
                    Some(t) => *t += 1,
                    None if n >= RUNS_MAX => self.untracked += 1,
                    None => {
                        self.unused_checkpoints.insert((*job_id, *index), 1);
                    }
                }
            }
            (
                Op::Forked {
                    source_job,
                    source_index,
                    job_id,
                    node,
                    ..
                },
                EventType::Ok,
            ) => {
                if self.forks.len() >= RUNS_MAX {
                    self.untracked += 1;
                } else {
                    self.forks.insert(
                        *job_id,
                        (node.clone(), format!("{source_job}.{source_index}")),
                    );
                }
            }
            _ => {}
        }
    }

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        let mut found = self.found.clone();
        if self.untracked > 0 {
            found.add(
                || {
                    format!(
                        "more than {RUNS_MAX} runs, checkpointed sandboxes or forks; {} more were not followed",
                        self.untracked
                    )
                },
                || json!({ "untracked": self.untracked }),
            );
        }
        found.finish()
    }
}

/// See the module docs.
pub fn checkpoint_restored_once(h: &History) -> Option<Violation> {
    fold::<RestoredOnce>(h)
}

#[cfg(test)]
#[path = "lid_tests.rs"]
mod tests;
