//! Tests of the reconciler.

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
        user: String::new(),
        fork_of: None,
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
                let saved = self
                    .sandboxes
                    .get(&id)
                    .is_some_and(|o| matches!(o.state, ObservedState::Checkpointed { .. }));
                if live && !saved {
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
            Action::Checkpoint { .. } | Action::Restore { .. } => {
                if let Some(o) = self.sandboxes.get_mut(&id) {
                    o.state = match (&o.state, action) {
                        (
                            ObservedState::Running | ObservedState::Paused,
                            Action::Checkpoint { .. },
                        ) => ObservedState::Checkpointed { image_bytes: 1 },
                        (ObservedState::Checkpointed { .. }, Action::Restore { .. }) => {
                            ObservedState::Running
                        }
                        (s, a) => {
                            self.violations.push(format!("{a:?} in state {s:?}"));
                            s.clone()
                        }
                    };
                }
            }
            Action::Pause { .. } | Action::Resume { .. } => {
                if let Some(o) = self.sandboxes.get_mut(&id) {
                    o.state = match (&o.state, action) {
                        (ObservedState::Running, Action::Pause { .. }) => ObservedState::Paused,
                        (ObservedState::Paused, Action::Resume { .. }) => ObservedState::Running,
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
        Just(DesiredState::Stopped),
        Just(DesiredState::Checkpointed)
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
        Just(ObservedState::Checkpointed { image_bytes: 1 }),
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
                matches!(
                    d.desired_state,
                    DesiredState::Stopped | DesiredState::Checkpointed
                ),
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
                    DesiredState::Checkpointed => {
                        // Saved, or never started here (nothing to save): nothing else.
                        assert!(
                            matches!(o.state, ObservedState::Checkpointed { .. }),
                            "{} desired checkpointed but {:?}",
                            d.id,
                            o.state
                        );
                        continue;
                    }
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
