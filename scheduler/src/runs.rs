//! A job's sandboxes, run-length encoded: contiguous index ranges that share a node, a state and
//! a generation are one [`Run`]. A 100,000-sandbox job placed on 1,000 nodes is ~1,000 runs; as
//! sandboxes change state one by one the runs split, and they merge again when neighbours agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Resources;

/// Lifecycle of one sandbox, as the scheduler records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SandboxState {
    /// Waiting for a node.
    Pending,
    /// Assigned to a node that has not reported it running yet.
    Placed,
    Running,
    Paused,
    Succeeded,
    Failed,
    OomKilled,
    /// Its node went down and it could not be rescheduled.
    Lost,
    Cancelled,
    /// Stopped at a user's request (`surge stop`): ended on purpose, never restarted.
    Stopped,
    /// Saved to an image on its node's disk and stopped (`surge pause --checkpoint`). Holds no
    /// CPU or memory in the books and has not ended; it is pinned to its node, where
    /// `surge resume` restores it (see `state::checkpoint`).
    Checkpointed,
}

impl SandboxState {
    /// Every state, in display order.
    pub const ALL: [SandboxState; 11] = [
        SandboxState::Pending,
        SandboxState::Placed,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Succeeded,
        SandboxState::Failed,
        SandboxState::OomKilled,
        SandboxState::Lost,
        SandboxState::Cancelled,
        SandboxState::Stopped,
        SandboxState::Checkpointed,
    ];

    /// Holds resources on its node.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            SandboxState::Placed | SandboxState::Running | SandboxState::Paused
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SandboxState::Succeeded
                | SandboxState::Failed
                | SandboxState::OomKilled
                | SandboxState::Lost
                | SandboxState::Cancelled
                | SandboxState::Stopped
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Placed => "placed",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Succeeded => "succeeded",
            SandboxState::Failed => "failed",
            SandboxState::OomKilled => "oom-killed",
            SandboxState::Lost => "lost",
            SandboxState::Cancelled => "cancelled",
            SandboxState::Stopped => "stopped",
            SandboxState::Checkpointed => "checkpointed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => SandboxState::Pending,
            "placed" => SandboxState::Placed,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "succeeded" => SandboxState::Succeeded,
            "failed" => SandboxState::Failed,
            "oom-killed" => SandboxState::OomKilled,
            "lost" => SandboxState::Lost,
            "cancelled" => SandboxState::Cancelled,
            "stopped" => SandboxState::Stopped,
            "checkpointed" => SandboxState::Checkpointed,
            _ => return None,
        })
    }
}

/// The exit code recorded for a sandbox whose command never ran (the runtime could not start
/// it). No process exits with it (exit statuses are 0..=255, signals 128+N), and the wire shows
/// it as `start_failed` with no exit code.
pub const EXIT_NOT_RUN: i32 = i32::MIN;

/// A contiguous range of a job's sandboxes that agree on everything below.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub count: u32,
    pub state: SandboxState,
    /// Set while placed (and kept afterwards, to say where it ran).
    pub node: Option<String>,
    /// Bumped each time the sandbox is re-placed (restart, reschedule, preemption, drain):
    /// `(job, index, generation)` names one run of it on one node.
    pub generation: u64,
    /// Bumped on every change of the desired state or the reservation.
    pub revision: u64,
    /// The reservation per sandbox (grows when the node prevents an OOM).
    pub resources: Resources,
    /// Desired: paused ("close the lid") instead of running.
    pub paused: bool,
    /// Desired: stopped (`surge stop`); the node stops it gracefully and it ends `Stopped`.
    pub stop: bool,
    /// The command's exit code; [`EXIT_NOT_RUN`] for a sandbox whose command never ran.
    pub exit_code: i32,
    /// Restarts after failure so far (for the restart policy).
    pub restarts: u32,
    /// Reschedules after node loss, drain or preemption so far.
    pub reschedules: u32,
    /// TTL deadline on the leader's clock (0: none); see `lifetime`.
    #[serde(default)]
    pub expires_ms: u64,
    /// Last exec or file call on the leader's clock, for the idle timeout (0: not tracked).
    #[serde(default)]
    pub active_ms: u64,
    /// Why `stop` was set; what its end is reported as.
    #[serde(default)]
    pub stop_cause: crate::lifetime::StopCause,
    /// Desired: checkpointed to its node's disk (set by `surge pause --checkpoint` while it
    /// runs; stays set while it is `Checkpointed`).
    #[serde(default)]
    pub checkpoint: bool,
    /// Desired: restored from its checkpoint (`surge resume`), as soon as its node has room.
    #[serde(default)]
    pub restore: bool,
    /// Size of its checkpoint image on its node (0: none).
    #[serde(default)]
    pub image_bytes: u64,
    /// Why the last checkpoint failed, or why a restore waits (empty: nothing to say).
    #[serde(default)]
    pub note: String,
    /// A fork not yet placed (`state::fork`): it waits, `Checkpointed` with `restore`, for room
    /// on its source's node, and is in no node's desired set until then.
    #[serde(default)]
    pub forking: bool,
}

impl Run {
    pub fn pending(count: u32, resources: Resources) -> Self {
        Run {
            count,
            state: SandboxState::Pending,
            node: None,
            generation: 0,
            revision: 0,
            resources,
            paused: false,
            stop: false,
            exit_code: 0,
            restarts: 0,
            reschedules: 0,
            expires_ms: 0,
            active_ms: 0,
            stop_cause: crate::lifetime::StopCause::User,
            checkpoint: false,
            restore: false,
            forking: false,
            image_bytes: 0,
            note: String::new(),
        }
    }

    fn same_but_count(&self, o: &Run) -> bool {
        Run {
            count: 0,
            ..self.clone()
        } == Run {
            count: 0,
            ..o.clone()
        }
    }
}

/// The runs of one job, keyed by first index, covering `0..total` without gaps or overlaps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runs {
    runs: BTreeMap<u32, Run>,
}

impl Runs {
    pub fn new(total: u32, resources: Resources) -> Self {
        let mut runs = BTreeMap::new();
        if total > 0 {
            runs.insert(0, Run::pending(total, resources));
        }
        Runs { runs }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Run)> {
        self.runs.iter().map(|(k, v)| (*k, v))
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Make `at` the first index of a run (no-op at a boundary or past the end).
    fn split_at(&mut self, at: u32) {
        let Some((&first, run)) = self.runs.range(..=at).next_back() else {
            return;
        };
        let end = u64::from(first) + u64::from(run.count);
        if first == at || u64::from(at) >= end {
            return;
        }
        let head = at - first;
        let mut tail = run.clone();
        tail.count = run.count - head;
        if let Some(r) = self.runs.get_mut(&first) {
            r.count = head;
        }
        self.runs.insert(at, tail);
    }

    /// Apply `f` to the sandboxes `first..first+count` (as runs: `f` sees each covered run once
    /// and may change anything but `count`), then merge neighbours that became alike.
    /// Indices past the end are ignored.
    pub fn update(&mut self, first: u32, count: u32, mut f: impl FnMut(&mut Run)) {
        if count == 0 {
            return;
        }
        let end = first.saturating_add(count);
        self.split_at(first);
        self.split_at(end);
        let keys: Vec<u32> = self.runs.range(first..end).map(|(k, _)| *k).collect();
        for k in &keys {
            if let Some(run) = self.runs.get_mut(k) {
                let count = run.count;
                f(run);
                run.count = count;
            }
        }
        // Merge around the touched range.
        let lo = self
            .runs
            .range(..first)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(first);
        let keys: Vec<u32> = self.runs.range(lo..=end).map(|(k, _)| *k).collect();
        let mut prev: Option<u32> = None;
        for k in keys {
            if let Some(p) = prev {
                let mergeable = match (self.runs.get(&p), self.runs.get(&k)) {
                    (Some(a), Some(b)) => {
                        u64::from(p) + u64::from(a.count) == u64::from(k) && a.same_but_count(b)
                    }
                    _ => false,
                };
                if mergeable {
                    if let Some(b) = self.runs.remove(&k) {
                        if let Some(a) = self.runs.get_mut(&p) {
                            a.count += b.count;
                        }
                    }
                    continue;
                }
            }
            prev = Some(k);
        }
    }

    /// The run that holds sandbox `index`, with its first index.
    pub fn get(&self, index: u32) -> Option<(u32, &Run)> {
        let (&first, run) = self.runs.range(..=index).next_back()?;
        (u64::from(index) < u64::from(first) + u64::from(run.count)).then_some((first, run))
    }

    /// Total sandboxes covered.
    pub fn total(&self) -> u64 {
        self.runs.values().map(|r| u64::from(r.count)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r() -> Resources {
        Resources::new(1000, 512)
    }

    #[test]
    fn split_update_merge() {
        let mut runs = Runs::new(100, r());
        runs.update(10, 20, |run| {
            run.state = SandboxState::Placed;
            run.node = Some("a".into());
        });
        assert_eq!(runs.len(), 3);
        assert_eq!(runs.get(10).map(|(f, x)| (f, x.count)), Some((10, 20)));
        assert_eq!(runs.get(9).map(|(f, _)| f), Some(0));
        // the same change next door merges into one run
        runs.update(30, 5, |run| {
            run.state = SandboxState::Placed;
            run.node = Some("a".into());
        });
        assert_eq!(runs.len(), 3);
        assert_eq!(runs.get(34).map(|(f, x)| (f, x.count)), Some((10, 25)));
        // back to pending everywhere: one run again
        runs.update(0, 100, |run| {
            run.state = SandboxState::Pending;
            run.node = None;
        });
        assert_eq!(runs.len(), 1);
        assert_eq!(runs.total(), 100);
        assert!(runs.get(100).is_none());
    }

    proptest! {
        /// Runs always cover exactly 0..total, and per-index states match a plain vector model.
        #[test]
        fn runs_match_a_per_index_model(ops in proptest::collection::vec((0u32..60, 0u32..20, 0u8..4), 0..60)) {
            let total = 50u32;
            let mut runs = Runs::new(total, r());
            let mut model = vec![0u8; total as usize];
            for (first, count, v) in ops {
                runs.update(first, count, |run| run.exit_code = i32::from(v));
                for i in first..first.saturating_add(count).min(total) {
                    model[i as usize] = v;
                }
            }
            prop_assert_eq!(runs.total(), u64::from(total));
            let mut expect_first = 0u32;
            for (first, run) in runs.iter() {
                prop_assert_eq!(first, expect_first);
                prop_assert!(run.count > 0);
                expect_first = first + run.count;
            }
            for i in 0..total {
                let (_, run) = runs.get(i).expect("covered");
                prop_assert_eq!(run.exit_code, i32::from(model[i as usize]));
            }
            // maximal merging: no two neighbours are alike
            let all: Vec<_> = runs.iter().collect();
            for w in all.windows(2) {
                prop_assert!(!w[0].1.same_but_count(w[1].1));
            }
        }
    }
}
