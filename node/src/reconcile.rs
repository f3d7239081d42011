//! The node daemon's reconciler: desired sandboxes (from the scheduler) and observed sandboxes (from
//! the runtime) in, a list of [`Action`]s out. Pure: no I/O, no clock, no randomness; the agent
//! executes the actions, observes again and calls [`reconcile`] again until it returns nothing.
//!
//! ```text
//!   scheduler watch ──► desired ─┐
//!                                ├─► reconcile() ──► [Action] ──► agent ──► Runtime
//!   Runtime::list/status ─► observed ┘        ▲                          │
//!                                             └──────── observe again ◄──┘
//! ```
//!
//! Rules, per sandbox id (in id order, so the output is deterministic):
//!
//! * An **incarnation** is `(id, generation)`. The scheduler asks for a fresh run of the same id by
//!   bumping `generation`. The node starts each incarnation at most once: a sandbox that has exited
//!   (or failed, or was OOM-killed) stays in `observed` as a terminal record until the scheduler
//!   either drops it from `desired` (then [`Action::Forget`]) or bumps its generation (then
//!   [`Action::Forget`] followed by [`Action::Start`]). The node never restarts anything on its own:
//!   restart policy belongs to the scheduler, which sees the exit code first.
//! * A desired sandbox with an **older** generation than the observed one is a stale view (a watch
//!   served by a lagging replica); the reconciler waits instead of acting on it.
//! * `desired_state` drives pause/resume/stop. A paused sandbox that must stop is stopped directly
//!   (the runtime thaws it first so SIGTERM can be handled).
//! * **Resize** is driven by `revision`, not by comparing numbers: the node may have grown a
//!   sandbox's memory on its own to prevent an OOM kill (see `runtime::plan_memory_growth`) and
//!   reported the new reservation; until the scheduler publishes a newer revision, its older
//!   figures must not shrink the sandbox back. So a `Resize` is issued exactly when
//!   `desired.revision > observed.revision`, carrying the revision it applies.
//! * Sandboxes found by `Runtime::list` after a daemon restart are not yet owned by a task of this
//!   daemon (`owned == false`): the desired ones are [`Action::Adopt`]ed, the others stopped or
//!   forgotten like any unwanted sandbox.
//! * At most `policy.starts_max_per_pass` sandboxes are started per pass, so a burst of thousands
//!   of assignments is spread over passes instead of forking everything at once.
//!
//! The agent must only reconcile against a *complete* desired set (after the watch's initial sync):
//! a sandbox missing from `desired` is stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One sandbox: the `index`-th of job `job`. Displayed as `JOB.INDEX`, e.g. `42.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SandboxId {
    pub job: u64,
    pub index: u32,
}

impl SandboxId {
    pub const fn new(job: u64, index: u32) -> Self {
        Self { job, index }
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.job, self.index)
    }
}

/// The text is not `JOB.INDEX` with two decimal numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sandbox id; expected JOB.INDEX such as 42.7")]
pub struct ParseSandboxIdError(pub String);

impl FromStr for SandboxId {
    type Err = ParseSandboxIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseSandboxIdError(s.to_owned());
        let (job, index) = s.split_once('.').ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(job) || !digits(index) {
            return Err(bad());
        }
        Ok(Self {
            job: job.parse().map_err(|_| bad())?,
            index: index.parse().map_err(|_| bad())?,
        })
    }
}

/// CPU and memory of one sandbox: its limits on the node and its reservation at the scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mib: u64,
}

/// What to run: identical for all sandboxes of a job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Root filesystem template, a directory under `<data_dir>/templates/`.
    pub template: String,
    /// argv; empty: a long-lived sandbox that runs the init alone until it is stopped (the
    /// scheduler's TTL, idle timeout or lease, `surge stop`, cancel); containers: surge-init as
    /// PID 1, reaping what execs leave.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The job's initial request; the current limits are [`DesiredSandbox::resources`].
    pub cpu_millis: u64,
    pub memory_mib: u64,
    /// "" (the node's sandbox user) or "root" (uid 0, no capabilities, no_new_privs).
    #[serde(default)]
    pub user: String,
    /// A fork (`surge fork`): started by restoring a checkpoint of this sandbox of the node.
    #[serde(default)]
    pub fork_of: Option<SandboxId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    Paused,
    Stopped,
    /// Checkpointed to the node's disk and stopped (CRIU); a later `Running` restores it.
    Checkpointed,
}

/// The scheduler's wish for one sandbox on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSandbox {
    pub id: SandboxId,
    /// Incarnation: bumped by the scheduler to ask for a fresh run of the same id.
    pub generation: u64,
    /// Bumped by the scheduler on every change of `desired_state` or `resources`.
    pub revision: u64,
    pub spec: SandboxSpec,
    pub desired_state: DesiredState,
    pub resources: Resources,
}

/// What the runtime reports about a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObservedState {
    Starting,
    Running,
    Paused,
    Exited {
        code: i32,
    },
    Failed {
        reason: String,
    },
    /// The kernel killed it for exceeding its memory limit after the node could not grow it.
    OomKilled,
    /// Stopped with its processes saved to an image of this many bytes on this node's disk;
    /// not ended: a restore continues it.
    Checkpointed {
        image_bytes: u64,
    },
}

impl ObservedState {
    /// It will never run again: only a new incarnation can.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Exited { .. } | Self::Failed { .. } | Self::OomKilled
        )
    }
}

/// One sandbox as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedSandbox {
    pub id: SandboxId,
    pub generation: u64,
    /// The desired revision whose resources the sandbox's limits were last set from.
    pub revision: u64,
    pub state: ObservedState,
    /// Current limits (may exceed the reservation after an OOM-prevention growth).
    pub resources: Resources,
    /// A task of this daemon owns it (waits for its exit, guards its memory). `Runtime::list`
    /// reports `false`; the agent sets it once it has adopted the sandbox.
    pub owned: bool,
}

/// Knobs of the reconciler; plain data so tests can vary them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconcilePolicy {
    /// SIGTERM-to-SIGKILL grace given to sandboxes the node stops.
    pub stop_grace_ms: u64,
    /// Upper bound on `Start` actions in one pass.
    pub starts_max_per_pass: usize,
}

impl Default for ReconcilePolicy {
    fn default() -> Self {
        Self {
            stop_grace_ms: 10_000,
            starts_max_per_pass: 64,
        }
    }
}

/// Why the node stops a sandbox: carried into logs and status reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The scheduler set `desired_state = Stopped` (cancel, preemption, drain).
    Requested,
    /// The sandbox is no longer assigned to this node.
    Unassigned,
    /// The scheduler asked for a newer incarnation of the same id.
    Superseded,
}

/// One thing for the agent to do. Actions for one sandbox are listed in the order they must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Start {
        id: SandboxId,
        generation: u64,
        revision: u64,
        spec: SandboxSpec,
        resources: Resources,
    },
    Stop {
        id: SandboxId,
        grace_ms: u64,
        reason: StopReason,
    },
    Pause {
        id: SandboxId,
    },
    Resume {
        id: SandboxId,
    },
    /// Dump the sandbox to disk and stop it; `revision` is the desired revision that asked.
    Checkpoint {
        id: SandboxId,
        revision: u64,
    },
    /// Bring a checkpointed sandbox back from its image.
    Restore {
        id: SandboxId,
    },
    Resize {
        id: SandboxId,
        resources: Resources,
        revision: u64,
    },
    /// Take ownership of a sandbox found after a daemon restart (wait for its exit, guard memory).
    Adopt {
        id: SandboxId,
    },
    /// Release everything left of a terminal sandbox (bundle, logs, cgroup, runtime record).
    Forget {
        id: SandboxId,
    },
}

impl Action {
    pub fn id(&self) -> SandboxId {
        match self {
            Self::Start { id, .. }
            | Self::Stop { id, .. }
            | Self::Pause { id }
            | Self::Resume { id }
            | Self::Checkpoint { id, .. }
            | Self::Restore { id }
            | Self::Resize { id, .. }
            | Self::Adopt { id }
            | Self::Forget { id } => *id,
        }
    }
}

/// Compute the actions that move `observed` towards `desired`.
///
/// Duplicated ids in either input: the last entry wins (the inputs are expected to be keyed by
/// id). `desired` is borrowed entry by entry, so a node's pass never copies its desired set.
pub fn reconcile<'a>(
    desired: impl IntoIterator<Item = &'a DesiredSandbox>,
    observed: &[ObservedSandbox],
    policy: &ReconcilePolicy,
) -> Vec<Action> {
    let desired: BTreeMap<SandboxId, &DesiredSandbox> =
        desired.into_iter().map(|d| (d.id, d)).collect();
    let observed: BTreeMap<SandboxId, &ObservedSandbox> =
        observed.iter().map(|o| (o.id, o)).collect();

    let mut actions = Vec::new();
    let mut starts = 0usize;
    let mut start = |d: &DesiredSandbox, actions: &mut Vec<Action>| {
        if starts < policy.starts_max_per_pass {
            starts += 1;
            actions.push(Action::Start {
                id: d.id,
                generation: d.generation,
                revision: d.revision,
                spec: d.spec.clone(),
                resources: d.resources,
            });
        }
    };
    let stop = |id, reason| Action::Stop {
        id,
        grace_ms: policy.stop_grace_ms,
        reason,
    };

    // Walk the union of ids in order.
    let mut ids: Vec<SandboxId> = desired.keys().chain(observed.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();

    for id in ids {
        match (desired.get(&id).copied(), observed.get(&id).copied()) {
            (None, None) => {}
            (Some(d), None) => {
                // Paused-before-ever-running starts, then pauses on the next pass. A sandbox
                // to be checkpointed that the node does not hold has nothing to save: it waits
                // (the scheduler sees it missing from the node's full report).
                if !matches!(
                    d.desired_state,
                    DesiredState::Stopped | DesiredState::Checkpointed
                ) {
                    start(d, &mut actions);
                }
            }
            (None, Some(o)) => {
                if o.state.is_terminal() || matches!(o.state, ObservedState::Checkpointed { .. }) {
                    actions.push(Action::Forget { id });
                } else {
                    actions.push(stop(id, StopReason::Unassigned));
                }
            }
            (Some(d), Some(o)) if d.generation < o.generation => {
                // Stale desired view: wait for the scheduler's newer state, but own what runs.
                if !o.owned && !o.state.is_terminal() {
                    actions.push(Action::Adopt { id });
                }
            }
            (Some(d), Some(o)) if d.generation > o.generation => {
                if o.state.is_terminal() {
                    actions.push(Action::Forget { id });
                    if !matches!(
                        d.desired_state,
                        DesiredState::Stopped | DesiredState::Checkpointed
                    ) {
                        start(d, &mut actions);
                    }
                } else if matches!(o.state, ObservedState::Checkpointed { .. }) {
                    // A new incarnation replaces the saved one: drop its image.
                    actions.push(Action::Forget { id });
                } else {
                    actions.push(stop(id, StopReason::Superseded));
                }
            }
            (Some(d), Some(o)) => same_incarnation(d, o, policy, &mut actions),
        }
    }
    actions
}

fn same_incarnation(
    d: &DesiredSandbox,
    o: &ObservedSandbox,
    policy: &ReconcilePolicy,
    actions: &mut Vec<Action>,
) {
    let id = d.id;
    if o.state.is_terminal() {
        // Kept as a record for the scheduler; restarting is the scheduler's decision.
        return;
    }
    if !o.owned {
        actions.push(Action::Adopt { id });
    }
    let live_and_settled = matches!(o.state, ObservedState::Running | ObservedState::Paused);
    match (d.desired_state, &o.state) {
        (DesiredState::Checkpointed, ObservedState::Running | ObservedState::Paused) => {
            actions.push(Action::Checkpoint {
                id,
                revision: d.revision,
            });
            return;
        }
        (DesiredState::Running | DesiredState::Paused, ObservedState::Checkpointed { .. }) => {
            actions.push(Action::Restore { id });
            return;
        }
        (DesiredState::Checkpointed, _) | (_, ObservedState::Checkpointed { .. })
            if d.desired_state != DesiredState::Stopped =>
        {
            return;
        }
        (DesiredState::Stopped, _) => {
            actions.push(Action::Stop {
                id,
                grace_ms: policy.stop_grace_ms,
                reason: StopReason::Requested,
            });
            return;
        }
        (DesiredState::Running, ObservedState::Paused) => actions.push(Action::Resume { id }),
        (DesiredState::Paused, ObservedState::Running) => actions.push(Action::Pause { id }),
        _ => {}
    }
    if live_and_settled && d.revision > o.revision {
        actions.push(Action::Resize {
            id,
            resources: d.resources,
            revision: d.revision,
        });
    }
}

#[cfg(test)]
mod tests;
