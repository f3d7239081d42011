//! Checkpoint and restore in the books: resources released and booked again, the node's desired
//! set, pinning, waiting for room, node loss, refusals.

use super::tests::{apply, node, placed_on_a, range};
use super::*;
use crate::command::{image_kib_code, StatusRange};
use crate::lifetime::{end_reason, EndReason};
use crate::model::NodeState;
use crate::outcomes::OutcomeReport;
use crate::runs::SandboxState;

/// Register node `id` (`cpus` CPUs, a container node) saying whether it can checkpoint.
pub(super) fn can_checkpoint(s: &mut ClusterState, index: u64, id: &str, cpus: u64, yes: bool) {
    let mut spec = node(id, cpus);
    spec.runtime = "container".into();
    spec.labels.insert("checkpoint".into(), yes.to_string());
    apply(
        s,
        index,
        Command::RegisterNode {
            node: spec,
            at_ms: 0,
        },
    );
}

fn running(s: &mut ClusterState, index: u64, first: u32, count: u32) {
    apply(
        s,
        index,
        Command::ReportStatus {
            reports: vec![range(first, count, SandboxState::Running, 0)],
            at_ms: 10,
        },
    );
}

fn checkpoint(s: &mut ClusterState, index: u64, first: u32, count: u32) -> Response {
    apply(
        s,
        index,
        Command::Checkpoint {
            job_id: 2,
            first,
            count,
            at_ms: 20,
        },
    )
}

fn dumped(s: &mut ClusterState, index: u64, first: u32, count: u32) {
    let mut r = range(
        first,
        count,
        SandboxState::Checkpointed,
        image_kib_code(65 << 20),
    );
    r.generation = 0;
    apply(
        s,
        index,
        Command::ReportStatus {
            reports: vec![r],
            at_ms: 30,
        },
    );
}

fn restore(s: &mut ClusterState, index: u64, first: u32, count: u32) {
    apply(
        s,
        index,
        Command::Restore {
            job_id: 2,
            first,
            count,
            paused: false,
            at_ms: 40,
        },
    );
}

fn run_of(s: &ClusterState, index: u32) -> crate::runs::Run {
    s.jobs[&2].runs.get(index).expect("run").1.clone()
}

#[test]
fn a_checkpoint_releases_its_reservation_and_a_restore_books_it_on_the_same_node() {
    let mut s = ClusterState::default();
    placed_on_a(&mut s, 2);
    can_checkpoint(&mut s, 4, "a", 10, true);
    running(&mut s, 5, 0, 2);
    assert_eq!(s.node_usage()["a"].allocated, Resources::new(2000, 4096));

    assert_eq!(checkpoint(&mut s, 6, 0, 1), Response::Done);
    // Asked, not yet done: still booked; the node is told to dump it.
    assert_eq!(s.node_usage()["a"].allocated, Resources::new(2000, 4096));
    let a = s.assignments_of("a");
    assert!(a.iter().any(|x| x.index == 0 && x.checkpoint));
    assert!(a.iter().any(|x| x.index == 1 && !x.checkpoint));

    dumped(&mut s, 7, 0, 1);
    let r = run_of(&s, 0);
    assert_eq!(r.state, SandboxState::Checkpointed);
    assert_eq!(r.image_bytes, 65 << 20);
    assert_eq!(r.node.as_deref(), Some("a"));
    // Released in the books, still in the node's desired set (it keeps the image).
    assert_eq!(s.node_usage()["a"].allocated, Resources::new(1000, 2048));
    assert!(s
        .assignments_of("a")
        .iter()
        .any(|x| x.index == 0 && x.checkpoint));
    assert_eq!(s.jobs[&2].counts.checkpointed, 1);
    assert_eq!(s.jobs[&2].state, crate::model::JobState::Running);
    // Placement never moves it: it is not pending.
    assert_eq!(s.jobs[&2].counts.pending, 0);

    restore(&mut s, 8, 0, 1);
    let r = run_of(&s, 0);
    assert_eq!(r.state, SandboxState::Placed);
    assert_eq!(r.node.as_deref(), Some("a"));
    assert!(!r.checkpoint);
    assert_eq!(s.node_usage()["a"].allocated, Resources::new(2000, 4096));
    assert!(s
        .assignments_of("a")
        .iter()
        .any(|x| x.index == 0 && !x.checkpoint));
    running(&mut s, 9, 0, 1);
    assert_eq!(run_of(&s, 0).state, SandboxState::Running);
    assert!(s.overcommitted().is_none());
}

#[test]
fn a_restore_waits_for_room_with_a_reason_and_a_lost_node_ends_it_node_lost() {
    let mut s = ClusterState::default();
    placed_on_a(&mut s, 2);
    can_checkpoint(&mut s, 4, "a", 2, true);
    running(&mut s, 5, 0, 2);
    checkpoint(&mut s, 6, 0, 1);
    dumped(&mut s, 7, 0, 1);
    // Other work takes the room it released.
    apply(
        &mut s,
        8,
        Command::SubmitJob {
            spec: super::tests::spec(1, "t"),
            idempotency_key: "other".into(),
            at_ms: 0,
        },
    );
    let plan = crate::placement::place(
        &s.placement_input(8, crate::placement::PlacementParams::default()),
    );
    apply(
        &mut s,
        9,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    );
    assert_eq!(s.jobs[&8].counts.placed, 1);
    restore(&mut s, 10, 0, 1);
    let r = run_of(&s, 0);
    assert_eq!(r.state, SandboxState::Checkpointed);
    assert!(r.note.contains("waiting for room on node a"), "{}", r.note);
    assert!(s.overcommitted().is_none());
    // The other job ends: the restore goes ahead in the same entry.
    apply(
        &mut s,
        11,
        Command::ReportStatus {
            reports: vec![StatusRange {
                job: 8,
                ..range(0, 1, SandboxState::Succeeded, 0)
            }],
            at_ms: 50,
        },
    );
    assert_eq!(run_of(&s, 0).state, SandboxState::Placed);

    // Checkpoint index 1, lose the node, resume: node-lost.
    checkpoint(&mut s, 12, 1, 1);
    dumped(&mut s, 13, 1, 1);
    apply(
        &mut s,
        14,
        Command::SetNodeState {
            node: "a".into(),
            state: NodeState::Down,
            at_ms: 60,
        },
    );
    restore(&mut s, 15, 1, 1);
    let r = run_of(&s, 1);
    assert_eq!(r.state, SandboxState::Lost);
    assert_eq!(end_reason(&r), Some(EndReason::NodeLost));
}

#[test]
fn nodes_that_cannot_checkpoint_refuse_with_one_line_and_a_failed_dump_keeps_it_running() {
    let mut s = ClusterState::default();
    placed_on_a(&mut s, 1);
    running(&mut s, 4, 0, 1);
    // Registered by `placed_on_a` as a sim node without the label.
    let Response::Rejected(why) = checkpoint(&mut s, 5, 0, 1) else {
        panic!("a sim node cannot checkpoint");
    };
    assert!(why.to_string().contains("cannot checkpoint"), "{why}");
    let mut krun = node("a", 10);
    krun.runtime = "krun".into();
    apply(
        &mut s,
        6,
        Command::RegisterNode {
            node: krun,
            at_ms: 0,
        },
    );
    let Response::Rejected(why) = checkpoint(&mut s, 7, 0, 1) else {
        panic!("krun cannot checkpoint");
    };
    assert!(
        why.to_string().contains("libkrun has no snapshot API"),
        "{why}"
    );
    assert!(!why.to_string().contains('\n'));
    assert!(!run_of(&s, 0).checkpoint);

    can_checkpoint(&mut s, 8, "a", 10, true);
    assert_eq!(checkpoint(&mut s, 9, 0, 1), Response::Done);
    apply(
        &mut s,
        10,
        Command::ReportStatusOutcomes {
            reports: vec![],
            outcomes: vec![OutcomeReport {
                node: "a".into(),
                job: 2,
                index: 0,
                generation: 0,
                state: SandboxState::Running,
                exit_code: 0,
                message: "checkpoint failed: No space left on device".into(),
                log_tail: String::new(),
            }],
            at_ms: 70,
        },
    );
    let r = run_of(&s, 0);
    assert_eq!(r.state, SandboxState::Running);
    assert!(!r.checkpoint, "not asked again");
    assert!(r.note.contains("No space left"));
    // A pending sandbox cannot be checkpointed.
    let mut t = ClusterState::default();
    apply(
        &mut t,
        1,
        Command::SubmitJob {
            spec: super::tests::spec(1, "t"),
            idempotency_key: "k".into(),
            at_ms: 0,
        },
    );
    assert!(matches!(
        t.apply_command(
            2,
            Command::Checkpoint {
                job_id: 1,
                first: 0,
                count: 1,
                at_ms: 0
            }
        ),
        Response::Rejected(_)
    ));
}
