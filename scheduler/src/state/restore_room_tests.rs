//! Preemption for a restore that waits for room on its node: lower priority work is evicted,
//! equal or higher never is, nor gangs, nor a job in its cool-down, nor anything when the
//! evictions would not make the restore fit.

use super::checkpoint_tests::can_checkpoint;
use super::tests::{apply, range, spec};
use super::*;
use crate::command::{image_kib_code, StatusRange};
use crate::placement::PlacementParams;
use crate::runs::SandboxState;

/// Node `a` (2 CPUs, 8 GiB, can checkpoint); job 2 (priority 0) with 2 sandboxes of 1 CPU on
/// it, running; its sandbox 0 checkpointed (1 CPU free).
fn one_checkpointed() -> ClusterState {
    let mut s = ClusterState::default();
    can_checkpoint(&mut s, 1, "a", 2, true);
    submit(&mut s, 2, spec(2, "t"), "k");
    place(&mut s, 3);
    report(&mut s, 4, 2, 0, 2, SandboxState::Running, 0);
    apply(
        &mut s,
        5,
        Command::Checkpoint {
            job_id: 2,
            first: 0,
            count: 1,
            at_ms: 20,
        },
    );
    report(
        &mut s,
        6,
        2,
        0,
        1,
        SandboxState::Checkpointed,
        image_kib_code(1 << 20),
    );
    assert_eq!(
        s.jobs[&2].runs.get(0).expect("run").1.state,
        SandboxState::Checkpointed
    );
    s
}

fn submit(s: &mut ClusterState, index: u64, spec: crate::model::JobSpec, key: &str) {
    apply(
        s,
        index,
        Command::SubmitJob {
            spec,
            idempotency_key: key.into(),
            at_ms: 0,
        },
    );
}

fn place(s: &mut ClusterState, index: u64) {
    let plan = crate::placement::place(&s.placement_input(index, PlacementParams::default()));
    apply(
        s,
        index,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    );
}

fn report(
    s: &mut ClusterState,
    index: u64,
    job: JobId,
    first: u32,
    count: u32,
    state: SandboxState,
    exit_code: i32,
) {
    apply(
        s,
        index,
        Command::ReportStatus {
            reports: vec![StatusRange {
                job,
                ..range(first, count, state, exit_code)
            }],
            at_ms: 10,
        },
    );
}

fn restore(s: &mut ClusterState, index: u64) {
    apply(
        s,
        index,
        Command::Restore {
            job_id: 2,
            first: 0,
            count: 1,
            paused: false,
            at_ms: 40,
        },
    );
}

/// Another job on node `a` taking the free CPU: `priority`, `gang`, submitted at `index` (its
/// id).
fn filler(s: &mut ClusterState, index: u64, priority: i32, gang: bool) -> JobId {
    let mut other = spec(1, "t");
    other.priority = priority;
    other.gang = gang;
    submit(s, index, other, &format!("filler-{index}"));
    place(s, index + 1);
    assert_eq!(s.jobs[&index].counts.placed, 1, "the filler took the room");
    index
}

fn restored(s: &ClusterState) -> bool {
    s.jobs[&2].runs.get(0).expect("run").1.state == SandboxState::Placed
}

#[test]
fn a_restore_evicts_lower_priority_work_on_its_node() {
    let mut s = one_checkpointed();
    let low = filler(&mut s, 7, -5, false);
    restore(&mut s, 9);
    assert!(restored(&s), "{:?}", s.jobs[&2].runs.get(0));
    let victim = &s.jobs[&low];
    assert_eq!(victim.counts.preempted, 1);
    assert_eq!(
        victim.counts.pending, 1,
        "back in the queue, placed elsewhere later"
    );
    assert_eq!(s.preempted_at.get(&low), Some(&9));
    assert!(s.overcommitted().is_none());
    assert!(s.restores.is_empty());
}

#[test]
fn equal_or_higher_priority_and_gangs_are_never_evicted_for_a_restore() {
    for (priority, gang) in [(0, false), (5, false), (-5, true)] {
        let mut s = one_checkpointed();
        let other = filler(&mut s, 7, priority, gang);
        restore(&mut s, 9);
        assert!(!restored(&s), "priority {priority} gang {gang}");
        let r = s.jobs[&2].runs.get(0).expect("run").1.clone();
        assert!(r.note.contains("waiting for room on node a"), "{}", r.note);
        assert_eq!(s.jobs[&other].counts.preempted, 0);
        assert_eq!(s.jobs[&other].counts.placed, 1);
    }
}

#[test]
fn nothing_is_evicted_when_the_evictions_would_not_make_it_fit() {
    let mut s = one_checkpointed();
    // Half a CPU of low priority and half of equal priority fill the free CPU: evicting the
    // low one alone leaves no room for 1 CPU.
    for (i, priority) in [(7, -5), (9, 0)] {
        let mut half = spec(1, "t");
        half.priority = priority;
        half.per_sandbox = Resources::new(500, 1024);
        submit(&mut s, i, half, &format!("half-{i}"));
        place(&mut s, i + 1);
    }
    assert_eq!(s.node_usage()["a"].allocated.cpu_millis, 2000);
    restore(&mut s, 11);
    assert!(!restored(&s));
    assert_eq!(s.jobs[&7].counts.preempted, 0, "no damage for nothing");
    assert_eq!(s.jobs[&7].counts.placed, 1);
}

#[test]
fn a_job_in_its_cool_down_is_not_evicted_again() {
    let mut s = one_checkpointed();
    let low = filler(&mut s, 7, -5, false);
    // Preempted just now (by the planner, say): immune for the cool-down.
    s.preempted_at.insert(low, 8);
    restore(&mut s, 9);
    assert!(!restored(&s));
    assert_eq!(s.jobs[&low].counts.preempted, 0);
    // Past the cool-down, the next entry that retries restores evicts it.
    let later = 8 + PlacementParams::default().preemption_cooldown_entries;
    apply(
        &mut s,
        later,
        Command::Restore {
            job_id: 2,
            first: 0,
            count: 1,
            paused: false,
            at_ms: 50,
        },
    );
    assert!(restored(&s));
    assert_eq!(s.jobs[&low].counts.preempted, 1);
}

#[test]
fn evictions_per_call_are_bounded() {
    let mut s = one_checkpointed();
    filler(&mut s, 7, -5, false);
    // Ask for the restore without going through try_restores, then bound the evictions.
    s.jobs
        .get_mut(&2)
        .expect("job")
        .runs
        .update(0, 1, |r| r.restore = true);
    s.restores.insert(2);
    let bound = |max| PlacementParams {
        max_preemptions_per_cycle: max,
        ..PlacementParams::default()
    };
    assert_eq!(s.preempt_for_restores(9, 0, bound(0)), 0);
    assert_eq!(s.jobs[&7].counts.preempted, 0);
    assert_eq!(s.preempt_for_restores(9, 0, bound(1)), 1);
    assert_eq!(s.jobs[&7].counts.preempted, 1);
}
