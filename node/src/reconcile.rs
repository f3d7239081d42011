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
    /// argv; empty means the template's shell.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The job's initial request; the current limits are [`DesiredSandbox::resources`].
    pub cpu_millis: u64,
    pub memory_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    Paused,
    Stopped,
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
                // Paused-before-ever-running starts, then pauses on the next pass.
                if d.desired_state != DesiredState::Stopped {
                    start(d, &mut actions);
                }
            }
            (None, Some(o)) => {
                if o.state.is_terminal() {
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
                    if d.desired_state != DesiredState::Stopped {
                        start(d, &mut actions);
                    }
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn spec() -> SandboxSpec {
        SandboxSpec {
            template: "busybox".into(),
            command: vec!["sleep".into(), "1".into()],
            env: vec![],
            cpu_millis: 500,
            memory_mib: 256,
        }
    }

    fn desired(job: u64, index: u32, state: DesiredState) -> DesiredSandbox {
        DesiredSandbox {
            id: SandboxId::new(job, index),
            generation: 1,
            revision: 1,
            spec: spec(),
            desired_state: state,
            resources: Resources {
                cpu_millis: 500,
                memory_mib: 256,
            },
        }
    }

    fn observed(d: &DesiredSandbox, state: ObservedState) -> ObservedSandbox {
        ObservedSandbox {
            id: d.id,
            generation: d.generation,
            revision: d.revision,
            state,
            resources: d.resources,
            owned: true,
        }
    }

    #[test]
    fn sandbox_id_displays_and_parses() {
        let id = SandboxId::new(42, 7);
        assert_eq!(id.to_string(), "42.7");
        assert_eq!("42.7".parse::<SandboxId>(), Ok(id));
        for bad in ["42", "42.", ".7", "a.7", "42.7.1", "-1.2", "42.+7", ""] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn starts_missing_and_forgets_unassigned_terminal() {
        let d = desired(1, 0, DesiredState::Running);
        let gone = ObservedSandbox {
            id: SandboxId::new(9, 9),
            state: ObservedState::Exited { code: 0 },
            ..observed(&d, ObservedState::Running)
        };
        let actions = reconcile(
            std::slice::from_ref(&d),
            &[gone],
            &ReconcilePolicy::default(),
        );
        assert!(matches!(actions[0], Action::Start { id, .. } if id == d.id));
        assert_eq!(
            actions[1],
            Action::Forget {
                id: SandboxId::new(9, 9)
            }
        );
        assert_eq!(actions.len(), 2);
    }

    #[test]
    fn exited_sandbox_of_same_generation_is_not_restarted() {
        let d = desired(1, 0, DesiredState::Running);
        let o = observed(&d, ObservedState::OomKilled);
        assert!(reconcile(&[d], &[o], &ReconcilePolicy::default()).is_empty());
    }

    #[test]
    fn new_generation_replaces_terminal_in_one_pass_and_stops_live_first() {
        let mut d = desired(1, 0, DesiredState::Running);
        let o_dead = observed(&d, ObservedState::Exited { code: 1 });
        let o_live = observed(&d, ObservedState::Running);
        d.generation = 2;
        let a = reconcile(&[d.clone()], &[o_dead], &ReconcilePolicy::default());
        assert_eq!(a[0], Action::Forget { id: d.id });
        assert!(matches!(a[1], Action::Start { generation: 2, .. }));
        let a = reconcile(&[d.clone()], &[o_live], &ReconcilePolicy::default());
        assert!(matches!(
            a[..],
            [Action::Stop {
                reason: StopReason::Superseded,
                ..
            }]
        ));
    }

    #[test]
    fn local_memory_growth_is_not_undone_by_an_old_revision() {
        let d = desired(1, 0, DesiredState::Running);
        let mut o = observed(&d, ObservedState::Running);
        o.resources.memory_mib = 512; // grown by the OOM guard
        assert!(reconcile(
            std::slice::from_ref(&d),
            std::slice::from_ref(&o),
            &ReconcilePolicy::default()
        )
        .is_empty());
        let d2 = DesiredSandbox { revision: 2, ..d };
        let a = reconcile(std::slice::from_ref(&d2), &[o], &ReconcilePolicy::default());
        assert_eq!(
            a,
            vec![Action::Resize {
                id: d2.id,
                resources: d2.resources,
                revision: 2
            }]
        );
    }

    #[test]
    fn adopts_unowned_desired_and_stops_unowned_unwanted() {
        let d = desired(1, 0, DesiredState::Running);
        let mut o = observed(&d, ObservedState::Running);
        o.owned = false;
        let mut stray = o.clone();
        stray.id = SandboxId::new(2, 0);
        let a = reconcile(
            std::slice::from_ref(&d),
            &[o, stray],
            &ReconcilePolicy::default(),
        );
        assert_eq!(a[0], Action::Adopt { id: d.id });
        assert!(matches!(
            a[1],
            Action::Stop {
                reason: StopReason::Unassigned,
                ..
            }
        ));
    }

    #[test]
    fn start_burst_is_bounded_per_pass() {
        let ds: Vec<_> = (0..100)
            .map(|i| desired(7, i, DesiredState::Running))
            .collect();
        let policy = ReconcilePolicy {
            starts_max_per_pass: 10,
            ..Default::default()
        };
        assert_eq!(reconcile(&ds, &[], &policy).len(), 10);
    }

    // ---- property tests: a simulated node executing the actions ----

    /// Applies actions like a runtime would, and records every start.
    #[derive(Default)]
    struct SimNode {
        sandboxes: BTreeMap<SandboxId, ObservedSandbox>,
        starts: Vec<(SandboxId, u64)>,
        violations: Vec<String>,
    }

    impl SimNode {
        fn apply(&mut self, action: &Action) {
            let id = action.id();
            let live = self
                .sandboxes
                .get(&id)
                .is_some_and(|o| !o.state.is_terminal());
            match action {
                Action::Start {
                    generation,
                    revision,
                    resources,
                    ..
                } => {
                    if self.sandboxes.contains_key(&id) {
                        self.violations
                            .push(format!("start of {id} while a record exists"));
                    }
                    self.starts.push((id, *generation));
                    self.sandboxes.insert(
                        id,
                        ObservedSandbox {
                            id,
                            generation: *generation,
                            revision: *revision,
                            state: ObservedState::Starting,
                            resources: *resources,
                            owned: true,
                        },
                    );
                }
                Action::Forget { .. } => {
                    if live {
                        self.violations.push(format!("forget of live {id}"));
                    }
                    self.sandboxes.remove(&id);
                }
                _ if !live => self
                    .violations
                    .push(format!("{action:?} on a non-live sandbox")),
                Action::Stop { .. } => {
                    if let Some(o) = self.sandboxes.get_mut(&id) {
                        o.state = ObservedState::Exited { code: 143 };
                    }
                }
                Action::Pause { .. } | Action::Resume { .. } => {
                    if let Some(o) = self.sandboxes.get_mut(&id) {
                        o.state = match (&o.state, action) {
                            (ObservedState::Running, Action::Pause { .. }) => ObservedState::Paused,
                            (ObservedState::Paused, Action::Resume { .. }) => {
                                ObservedState::Running
                            }
                            (s, a) => {
                                self.violations.push(format!("{a:?} in state {s:?}"));
                                s.clone()
                            }
                        };
                    }
                }
                Action::Resize {
                    resources,
                    revision,
                    ..
                } => {
                    if let Some(o) = self.sandboxes.get_mut(&id) {
                        o.resources = *resources;
                        o.revision = *revision;
                    }
                }
                Action::Adopt { .. } => {
                    if let Some(o) = self.sandboxes.get_mut(&id) {
                        o.owned = true;
                    }
                }
            }
        }

        /// Time passes: starting sandboxes come up.
        fn settle(&mut self) {
            for o in self.sandboxes.values_mut() {
                if o.state == ObservedState::Starting {
                    o.state = ObservedState::Running;
                }
            }
        }

        fn observed(&self) -> Vec<ObservedSandbox> {
            self.sandboxes.values().cloned().collect()
        }
    }

    fn arb_state() -> impl Strategy<Value = DesiredState> {
        prop_oneof![
            Just(DesiredState::Running),
            Just(DesiredState::Paused),
            Just(DesiredState::Stopped)
        ]
    }

    fn arb_observed_state() -> impl Strategy<Value = ObservedState> {
        prop_oneof![
            Just(ObservedState::Starting),
            Just(ObservedState::Running),
            Just(ObservedState::Paused),
            (0i32..3).prop_map(|code| ObservedState::Exited { code }),
            Just(ObservedState::OomKilled),
            Just(ObservedState::Failed { reason: "x".into() }),
        ]
    }

    /// Desired sandboxes over a small id space (so desired and observed overlap).
    fn arb_desired() -> impl Strategy<Value = Vec<DesiredSandbox>> {
        prop::collection::btree_map(
            (0u64..4, 0u32..4),
            (1u64..4, 1u64..4, arb_state(), 1u64..4, 1u64..4),
            0..12,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(
                    |((job, index), (generation, revision, state, cpu, mem))| DesiredSandbox {
                        id: SandboxId::new(job, index),
                        generation,
                        revision,
                        spec: spec(),
                        desired_state: state,
                        resources: Resources {
                            cpu_millis: cpu * 250,
                            memory_mib: mem * 128,
                        },
                    },
                )
                .collect()
        })
    }

    fn arb_observed() -> impl Strategy<Value = Vec<ObservedSandbox>> {
        prop::collection::btree_map(
            (0u64..4, 0u32..4),
            (
                1u64..4,
                1u64..4,
                arb_observed_state(),
                1u64..4,
                any::<bool>(),
            ),
            0..12,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(
                    |((job, index), (generation, revision, state, mem, owned))| ObservedSandbox {
                        id: SandboxId::new(job, index),
                        generation,
                        revision,
                        state,
                        resources: Resources {
                            cpu_millis: 250,
                            memory_mib: mem * 128,
                        },
                        owned,
                    },
                )
                .collect()
        })
    }

    /// The state the node must reach for one desired sandbox, given what it started from.
    fn assert_converged(
        desired: &[DesiredSandbox],
        node: &SimNode,
        initial: &BTreeMap<SandboxId, ObservedSandbox>,
    ) {
        let wanted: BTreeSet<SandboxId> = desired.iter().map(|d| d.id).collect();
        for (id, o) in &node.sandboxes {
            assert!(
                wanted.contains(id),
                "unassigned sandbox {id} survived: {o:?}"
            );
        }
        for d in desired {
            let o = node.sandboxes.get(&d.id);
            let started_before = initial.get(&d.id);
            match o {
                None => assert!(
                    d.desired_state == DesiredState::Stopped,
                    "{} desired {:?} but absent",
                    d.id,
                    d.desired_state
                ),
                Some(o) if o.generation > d.generation => {
                    // stale desired view: left alone (only adopted; starting ones came up)
                    let b = started_before.expect("the node never makes a newer generation itself");
                    assert_eq!(
                        (o.generation, o.revision, o.resources),
                        (b.generation, b.revision, b.resources)
                    );
                    if b.state != ObservedState::Starting {
                        assert_eq!(o.state, b.state);
                    }
                }
                Some(o) => {
                    assert_eq!(o.generation, d.generation);
                    if o.state.is_terminal() {
                        continue; // a record, kept for the scheduler; nothing to own
                    }
                    assert!(o.owned, "{} never adopted", d.id);
                    let want = match d.desired_state {
                        DesiredState::Running => ObservedState::Running,
                        DesiredState::Paused => ObservedState::Paused,
                        DesiredState::Stopped => unreachable!("a stopped sandbox is terminal"),
                    };
                    assert_eq!(o.state, want, "{}", d.id);
                    assert!(o.revision >= d.revision);
                    // Limits follow the scheduler unless the node's record is already at (or past)
                    // this revision, e.g. after a local OOM-prevention growth.
                    let node_was_current = started_before
                        .is_some_and(|b| b.generation == d.generation && b.revision >= d.revision);
                    if !node_was_current {
                        assert_eq!(o.resources, d.resources, "{}", d.id);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn converges_without_double_starts(
            desired in arb_desired(),
            observed in arb_observed(),
            starts_max in 1usize..5,
        ) {
            let policy = ReconcilePolicy { stop_grace_ms: 5, starts_max_per_pass: starts_max };
            let mut node = SimNode::default();
            for o in &observed {
                node.sandboxes.insert(o.id, o.clone());
            }
            let initial = node.sandboxes.clone();
            let mut quiet = false;
            for _pass in 0..40 {
                let actions = reconcile(&desired, &node.observed(), &policy);
                let starts = actions.iter().filter(|a| matches!(a, Action::Start { .. })).count();
                prop_assert!(starts <= starts_max);
                if actions.is_empty() {
                    quiet = true;
                    break;
                }
                for a in &actions {
                    node.apply(a);
                }
                node.settle();
            }
            prop_assert!(quiet, "did not converge in 40 passes");
            prop_assert!(node.violations.is_empty(), "{:?}", node.violations);
            let unique: BTreeSet<_> = node.starts.iter().collect();
            prop_assert_eq!(unique.len(), node.starts.len(), "an incarnation was started twice");
            assert_converged(&desired, &node, &initial);
        }

        /// Sandboxes that die between passes are never restarted within the same generation, and
        /// terminal desired sandboxes get no actions at all.
        #[test]
        fn terminal_incarnations_stay_terminal(
            desired in arb_desired(),
            deaths in prop::collection::vec((0u64..4, 0u32..4, 0usize..6), 0..10),
        ) {
            let policy = ReconcilePolicy { stop_grace_ms: 5, starts_max_per_pass: 100 };
            let mut node = SimNode::default();
            for pass in 0..8 {
                for (job, index, at) in &deaths {
                    if *at == pass {
                        if let Some(o) = node.sandboxes.get_mut(&SandboxId::new(*job, *index)) {
                            o.state = ObservedState::OomKilled;
                        }
                    }
                }
                let actions = reconcile(&desired, &node.observed(), &policy);
                for a in &actions {
                    let o = node.sandboxes.get(&a.id());
                    let d = desired.iter().find(|d| d.id == a.id());
                    if let (Some(o), Some(d)) = (o, d) {
                        prop_assert!(
                            !(o.state.is_terminal() && o.generation == d.generation),
                            "action {:?} for terminal incarnation {:?}", a, o
                        );
                    }
                    node.apply(a);
                }
                node.settle();
            }
            prop_assert!(node.violations.is_empty(), "{:?}", node.violations);
            let unique: BTreeSet<_> = node.starts.iter().collect();
            prop_assert_eq!(unique.len(), node.starts.len());
        }

        #[test]
        fn deterministic_and_order_independent(desired in arb_desired(), observed in arb_observed()) {
            let policy = ReconcilePolicy::default();
            let a = reconcile(&desired, &observed, &policy);
            let mut rd = desired.clone();
            rd.reverse();
            let mut ro = observed.clone();
            ro.reverse();
            prop_assert_eq!(a, reconcile(&rd, &ro, &policy));
        }
    }
}
