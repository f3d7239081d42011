//! Fork in the books: the new job, pinned to the source's node, as many booked as fit, the rest
//! waiting with a reason; refusals in one line.

use super::checkpoint_tests::can_checkpoint;
use super::tests::{apply, placed_on_a, range};
use super::*;
use crate::model::{ForkOf, NodeState};
use crate::runs::SandboxState;

/// Job 2 (tenant "t", 2 sandboxes of 1 CPU + 2 GiB) running on node "a" of `cpus` CPUs.
fn source(cpus: u64, checkpoint: bool) -> ClusterState {
    let mut s = ClusterState::default();
    placed_on_a(&mut s, 2);
    can_checkpoint(&mut s, 4, "a", cpus, checkpoint);
    apply(
        &mut s,
        5,
        Command::ReportStatus {
            reports: vec![range(0, 2, SandboxState::Running, 0)],
            at_ms: 10,
        },
    );
    s
}

fn fork(s: &mut ClusterState, index: u64, count: u32, tenant: Option<&str>) -> Response {
    apply(
        s,
        index,
        Command::Fork {
            job_id: 2,
            index: 1,
            count,
            tenant: tenant.map(str::to_owned),
            idempotency_key: format!("fork-{index}"),
            at_ms: 100,
        },
    )
}

fn refusal(r: Response) -> String {
    match r {
        Response::Rejected(why) => why.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_fork_is_a_new_job_pinned_to_the_source_node_and_booked_as_far_as_it_fits() {
    // 10 CPUs: the source job holds 2; 8 forks of 1 CPU fit, not 9.
    let mut s = source(10, true);
    let Response::JobSubmitted {
        job_id,
        created: true,
    } = fork(&mut s, 6, 3, Some("t"))
    else {
        panic!("fork refused");
    };
    let job = &s.jobs[&job_id];
    assert_eq!(job.spec.count, 3);
    assert_eq!(
        job.spec.fork_of,
        Some(ForkOf {
            job_id: 2,
            index: 1
        })
    );
    assert_eq!(job.spec.labels[FORK_LABEL], "2.1");
    assert_eq!(job.spec.tenant, "t");
    assert_eq!(job.spec.template, s.jobs[&2].spec.template);
    for i in 0..3 {
        let (_, run) = job.runs.get(i).expect("run");
        assert_eq!(run.state, SandboxState::Placed);
        assert_eq!(run.node.as_deref(), Some("a"));
        assert!(!run.forking);
    }
    // Booked, and in the node's desired set as running sandboxes.
    assert_eq!(s.node_usage()["a"].allocated, Resources::new(5000, 10240));
    let on_a = s.assignments_of("a");
    assert_eq!(
        on_a.iter()
            .filter(|a| a.job == job_id && !a.checkpoint && !a.stop)
            .count(),
        3
    );

    // Seven more: five fit (10 CPUs), two wait on node "a" with a reason, in no desired set.
    let Response::JobSubmitted { job_id: more, .. } = fork(&mut s, 7, 7, None) else {
        panic!("fork refused");
    };
    let job = &s.jobs[&more];
    let states: Vec<SandboxState> = (0..7)
        .map(|i| job.runs.get(i).expect("run").1.state)
        .collect();
    assert_eq!(
        states
            .iter()
            .filter(|x| **x == SandboxState::Placed)
            .count(),
        7 - 2
    );
    let (_, waiting) = job.runs.get(6).expect("run");
    assert_eq!(waiting.state, SandboxState::Checkpointed);
    assert!(waiting.forking);
    assert!(
        waiting.note.contains("waiting for room on node a"),
        "{}",
        waiting.note
    );
    assert_eq!(
        s.assignments_of("a")
            .iter()
            .filter(|a| a.job == more)
            .count(),
        5,
        "a waiting fork is in no node's desired set"
    );
    assert!(s.overcommitted().is_none());

    // The first fork job ends: the waiting two are booked in the same entry.
    apply(&mut s, 8, Command::CancelJob { job_id, at_ms: 200 });
    let job = &s.jobs[&more];
    for i in 0..7 {
        assert_eq!(
            job.runs.get(i).expect("run").1.state,
            SandboxState::Placed,
            "fork {i}"
        );
    }
    assert!(s.overcommitted().is_none());
}

#[test]
fn a_fork_waiting_for_room_ends_node_lost_when_its_node_goes() {
    let mut s = source(3, true);
    let Response::JobSubmitted { job_id, .. } = fork(&mut s, 6, 2, Some("t")) else {
        panic!("fork refused");
    };
    assert_eq!(
        s.jobs[&job_id].runs.get(1).expect("run").1.state,
        SandboxState::Checkpointed
    );
    apply(
        &mut s,
        7,
        Command::SetNodeState {
            node: "a".into(),
            state: NodeState::Down,
            at_ms: 300,
        },
    );
    apply(
        &mut s,
        8,
        Command::ReportStatus {
            reports: vec![],
            at_ms: 310,
        },
    );
    let (_, run) = s.jobs[&job_id].runs.get(1).expect("run");
    assert_eq!(run.state, SandboxState::Lost);
    assert_eq!(
        crate::lifetime::end_reason(run),
        Some(crate::lifetime::EndReason::NodeLost)
    );
}

#[test]
fn forks_are_refused_with_one_line_each() {
    let mut s = source(10, true);
    assert!(refusal(fork(&mut s, 6, 0, None)).contains("1 to 64"));
    assert!(refusal(fork(&mut s, 6, FORK_COUNT_MAX + 1, None)).contains("1 to 64"));
    // Another tenant's job is "no job".
    assert_eq!(refusal(fork(&mut s, 6, 1, Some("other"))), "no job 2");
    // Never fits: 11 forks of 1 CPU on a 10-CPU node.
    let why = refusal(fork(&mut s, 6, 11, None));
    assert!(why.contains("can never fit on node a"), "{why}");
    // A sandbox that is not running.
    apply(
        &mut s,
        7,
        Command::StopSandboxes {
            job_id: 2,
            first: 1,
            count: 1,
            at_ms: 50,
        },
    );
    let why = refusal(fork(&mut s, 8, 1, None));
    assert!(
        why.contains("only a running sandbox can be forked"),
        "{why}"
    );
    // A submission cannot claim to be a fork.
    let mut spec = super::tests::spec(1, "t");
    spec.fork_of = Some(ForkOf {
        job_id: 2,
        index: 0,
    });
    let why = refusal(apply(
        &mut s,
        9,
        Command::SubmitJob {
            spec,
            idempotency_key: "sneaky".into(),
            at_ms: 0,
        },
    ));
    assert!(why.contains("surge fork"), "{why}");

    // A node without checkpointing: one clear line.
    let mut s = source(10, false);
    let why = refusal(fork(&mut s, 6, 2, None));
    assert!(why.contains("cannot checkpoint"), "{why}");
    assert!(!why.contains('\n'));
    assert_eq!(s.jobs.len(), 1, "nothing was created");
}

#[test]
fn a_running_fork_whose_node_goes_ends_node_lost_and_is_never_moved() {
    let mut s = source(10, true);
    let Response::JobSubmitted { job_id, .. } = fork(&mut s, 6, 2, Some("t")) else {
        panic!("fork refused");
    };
    let fork_range = |first: u32, state: SandboxState| crate::command::StatusRange {
        job: job_id,
        ..range(first, 1, state, 0)
    };
    apply(
        &mut s,
        7,
        Command::ReportStatus {
            reports: vec![
                fork_range(0, SandboxState::Running),
                fork_range(1, SandboxState::Running),
            ],
            at_ms: 110,
        },
    );
    // Another node with room and checkpointing, where a moved fork could be placed.
    can_checkpoint(&mut s, 8, "b", 10, true);
    // Node "a" says it lost fork 1 (its process vanished): it is not sent back to the queue.
    apply(
        &mut s,
        9,
        Command::ReportStatus {
            reports: vec![fork_range(1, SandboxState::Lost)],
            at_ms: 120,
        },
    );
    // Then node "a" goes down: fork 0 ends too, while the source's sandboxes (no fork) are
    // sent back to the queue as usual.
    apply(
        &mut s,
        10,
        Command::SetNodeState {
            node: "a".into(),
            state: NodeState::Down,
            at_ms: 300,
        },
    );
    let job = &s.jobs[&job_id];
    for i in 0..2 {
        let (_, run) = job.runs.get(i).expect("run");
        assert_eq!(run.state, SandboxState::Lost, "fork {i}");
        assert_eq!(run.node.as_deref(), Some("a"), "fork {i} stays on its node");
        assert_eq!(run.generation, 0, "fork {i} has no new run");
        assert_eq!(
            crate::lifetime::end_reason(run),
            Some(crate::lifetime::EndReason::NodeLost)
        );
        assert!(
            run.note.contains("fork of 2.1") && run.note.contains("not moved"),
            "{}",
            run.note
        );
    }
    assert_eq!(job.counts.pending, 0);
    assert_eq!(job.counts.lost, 2);
    assert!(
        s.assignments_of("b").iter().all(|a| a.job != job_id),
        "no fork is given to node b"
    );
    assert_eq!(
        s.jobs[&2].counts.pending, 2,
        "the source's sandboxes are moved"
    );
}

#[test]
fn a_forks_labels_and_owner_lease_reach_its_job_and_an_unrenewed_lease_ends_it() {
    let mut s = source(10, true);
    let labels = [
        ("surge-owner".to_owned(), "trainer-1".to_owned()),
        (FORK_LABEL.to_owned(), "forged".to_owned()),
    ];
    let Response::JobSubmitted { job_id, .. } = apply(
        &mut s,
        6,
        Command::ForkOwned {
            job_id: 2,
            index: 1,
            count: 2,
            tenant: Some("t".into()),
            idempotency_key: "owned".into(),
            labels: labels.into_iter().collect(),
            lease_ms: 5_000,
            at_ms: 100,
        },
    ) else {
        panic!("fork refused");
    };
    let job = &s.jobs[&job_id];
    assert_eq!(job.spec.labels["surge-owner"], "trainer-1");
    assert_eq!(
        job.spec.labels[FORK_LABEL], "2.1",
        "the origin label is surge's"
    );
    assert_eq!(job.spec.lifetime.lease_ms, 5_000);
    assert!(super::lifetime::expiries(&s, 5_099)
        .iter()
        .all(|e| e.job != job_id));
    let due: Vec<_> = super::lifetime::expiries(&s, 5_100)
        .into_iter()
        .filter(|e| e.job == job_id)
        .collect();
    assert_eq!(due.iter().map(|e| e.count).sum::<u32>(), 2, "{due:?}");
    assert!(due
        .iter()
        .all(|e| e.cause == crate::lifetime::StopCause::Lease));
    // Too many labels once merged with the source's: refused in one line, nothing made.
    let many = (0..64).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let r = apply(
        &mut s,
        7,
        Command::ForkOwned {
            job_id: 2,
            index: 1,
            count: 1,
            tenant: Some("t".into()),
            idempotency_key: "many".into(),
            labels: many,
            lease_ms: 0,
            at_ms: 200,
        },
    );
    assert!(refusal(r).contains("fork of 2.1"));
}

/// A checkpoint of a sandbox whose forks are not made yet (booked, or waiting for room) is
/// refused in one line: the node makes each fork from the running source, and a source dumped
/// first leaves its forks nothing to fork (found by chaos: "... is Checkpointed; cannot fork it").
#[test]
fn a_checkpoint_waits_until_the_forks_of_its_sandbox_are_made() {
    // 3 CPUs: the source job holds 2; of 2 forks of 1 CPU, one is booked, one waits for room.
    let mut s = source(3, true);
    let Response::JobSubmitted { job_id, .. } = fork(&mut s, 6, 2, Some("t")) else {
        panic!("fork refused");
    };
    let checkpoint = |s: &mut ClusterState, index: u64, first: u32| {
        apply(
            s,
            index,
            Command::Checkpoint {
                job_id: 2,
                first,
                count: 1,
                at_ms: 120,
            },
        )
    };
    let refused = |r: Response| {
        let why = refusal(r);
        assert!(why.contains("not made yet"), "{why}");
        assert!(!why.contains('\n'));
    };
    refused(checkpoint(&mut s, 7, 1));
    assert!(!s.jobs[&2].runs.get(1).expect("run").1.checkpoint);
    // The other sandbox of the source job has no forks: it checkpoints.
    assert_eq!(checkpoint(&mut s, 8, 0), Response::Done);

    // The booked fork runs; the other still waits for room: still refused.
    let fork_range = |first: u32, state: SandboxState| crate::command::StatusRange {
        job: job_id,
        ..range(first, 1, state, 0)
    };
    apply(
        &mut s,
        9,
        Command::ReportStatus {
            reports: vec![fork_range(0, SandboxState::Running)],
            at_ms: 130,
        },
    );
    let (_, waiting) = s.jobs[&job_id].runs.get(1).expect("run");
    assert!(waiting.forking, "{waiting:?}");
    refused(checkpoint(&mut s, 10, 1));

    // It is placed (room freed when sandbox 2.0's dump is reported) and runs: accepted.
    apply(
        &mut s,
        11,
        Command::ReportStatus {
            reports: vec![range(0, 1, SandboxState::Checkpointed, 0)],
            at_ms: 140,
        },
    );
    assert_eq!(
        s.jobs[&job_id].runs.get(1).expect("run").1.state,
        SandboxState::Placed
    );
    refused(checkpoint(&mut s, 12, 1));
    apply(
        &mut s,
        13,
        Command::ReportStatus {
            reports: vec![fork_range(1, SandboxState::Running)],
            at_ms: 150,
        },
    );
    assert_eq!(checkpoint(&mut s, 14, 1), Response::Done);
    assert!(s.jobs[&2].runs.get(1).expect("run").1.checkpoint);
}
