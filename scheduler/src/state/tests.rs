//! Unit and property tests of the state machine.

use super::*;
use crate::command::{StatusRange, BATCH_COMMANDS_MAX};
use crate::model::{JobSpec, JobState, NodeSpec, NodeState, Resources, RestartPolicy, Strategy};
use crate::outcomes::OutcomeReport;
use crate::placement::{self, PlacementParams, Plan};
use crate::runs::SandboxState;
use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use surge_raft::StateMachine;

pub(crate) fn spec(count: u32, tenant: &str) -> JobSpec {
    JobSpec {
        name: String::new(),
        count,
        per_sandbox: Resources::new(1000, 2048),
        template: "busybox".into(),
        command: vec!["true".into()],
        env: Default::default(),
        priority: 0,
        tenant: tenant.into(),
        gang: false,
        strategy: Strategy::Binpack,
        constraints: vec![],
        restart: RestartPolicy::Never,
        labels: Default::default(),
        lifetime: Default::default(),
        user: String::new(),
        fork_of: None,
    }
}

fn submit(s: &mut ClusterState, index: u64, key: &str) -> Response {
    s.apply_command(
        index,
        Command::SubmitJob {
            spec: spec(10, "eval"),
            idempotency_key: key.into(),
            at_ms: 1000,
        },
    )
}

#[test]
fn same_key_twice_gives_the_first_job() {
    let mut s = ClusterState::default();
    assert_eq!(
        submit(&mut s, 5, "k1"),
        Response::JobSubmitted {
            job_id: 5,
            created: true
        }
    );
    assert_eq!(
        submit(&mut s, 9, "k1"),
        Response::JobSubmitted {
            job_id: 5,
            created: false
        }
    );
    assert_eq!(s.jobs.len(), 1);
    // the same key in another tenant is another job
    let other = s.apply_command(
        11,
        Command::SubmitJob {
            spec: spec(1, "train"),
            idempotency_key: "k1".into(),
            at_ms: 0,
        },
    );
    assert_eq!(
        other,
        Response::JobSubmitted {
            job_id: 11,
            created: true
        }
    );
}

#[test]
fn invalid_submission_is_rejected_and_changes_nothing() {
    let mut s = ClusterState::default();
    let before = s.hash();
    let r = s.apply_command(
        1,
        Command::SubmitJob {
            spec: spec(0, "eval"),
            idempotency_key: "k".into(),
            at_ms: 0,
        },
    );
    assert!(
        matches!(r, Response::Rejected(Rejection::Invalid(_))),
        "{r:?}"
    );
    assert_eq!(s.hash(), before);
}

#[test]
fn undecodable_command_is_rejected_without_change() {
    let mut s = ClusterState::default();
    submit(&mut s, 1, "a");
    let before = s.hash();
    // variant 200 does not exist: a command from a newer version
    let reply = s.apply(2, &[200, 0, 0, 0, 1, 2, 3]);
    let r = Response::decode(&reply).expect("reply decodes");
    assert!(
        matches!(r, Response::Rejected(Rejection::Undecodable(_))),
        "{r:?}"
    );
    assert_eq!(s.hash(), before);
}

#[test]
fn cancel_moves_unfinished_sandboxes_to_cancelled() {
    let mut s = ClusterState::default();
    submit(&mut s, 1, "a");
    let r = s.apply_command(
        2,
        Command::CancelJob {
            job_id: 1,
            at_ms: 7,
        },
    );
    let Response::JobCancelled { job } = r else {
        panic!("{r:?}")
    };
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.counts.cancelled, 10);
    assert_eq!(job.counts.pending, 0);
    assert_eq!(job.finished_at_ms, 7);
    assert_eq!(
        s.apply_command(
            3,
            Command::CancelJob {
                job_id: 99,
                at_ms: 7
            }
        ),
        Response::Rejected(Rejection::NoSuchJob(99))
    );
}

#[test]
fn snapshot_restores_an_identical_state() {
    let mut s = ClusterState::default();
    for i in 1..50 {
        submit(&mut s, i, &format!("k{}", i % 17));
    }
    let mut t = ClusterState::default();
    t.restore(&s.snapshot()).expect("restore");
    assert_eq!(t, s);
    assert_eq!(t.hash(), s.hash());
    assert!(t.restore(&[1, 2, 3]).is_err());
}

pub(crate) fn node(id: &str, cpus: u64) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        address: String::new(),
        allocatable: Resources::new(cpus * 1000, cpus * 4096),
        labels: Default::default(),
        os: "linux".into(),
        arch: "x86_64".into(),
        pool: "default".into(),
        templates: vec![],
        max_sandboxes: 0,
        runtime: "sim".into(),
    }
}

fn plan_for(s: &ClusterState, index: u64) -> Plan {
    placement::place(&s.placement_input(index, PlacementParams::default()))
}

pub(super) fn apply(s: &mut ClusterState, index: u64, c: Command) -> Response {
    s.apply_command(index, c)
}

/// Plan every pending job on the state as of `index - 1` and apply the plan at `index`.
fn place_pending(s: &mut ClusterState, index: u64) -> Response {
    let plan = plan_for(s, index - 1);
    apply(
        s,
        index,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    )
}

#[test]
fn plan_places_and_status_runs_to_completion() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 8),
            at_ms: 0,
        },
    );
    apply(
        &mut s,
        2,
        Command::RegisterNode {
            node: node("b", 8),
            at_ms: 0,
        },
    );
    submit(&mut s, 3, "k"); // 10 sandboxes of 1 CPU
    let plan = plan_for(&s, 3);
    let r = apply(
        &mut s,
        4,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 5,
        },
    );
    assert_eq!(
        r,
        Response::PlanApplied {
            placed: 10,
            preempted: 0,
            rejected: 0
        }
    );
    assert_eq!(s.jobs[&3].counts.placed, 10);
    assert_eq!(s.jobs[&3].state, JobState::Running);
    assert!(s.overcommitted().is_none());
    let usage = s.node_usage();
    assert_eq!(usage["a"].sandboxes + usage["b"].sandboxes, 10);
    // every node reports its sandboxes running, then succeeded
    for (n, list) in s.assignments() {
        let reports = list
            .iter()
            .map(|a| StatusRange {
                node: n.clone(),
                job: a.job,
                first: a.index,
                count: 1,
                generation: a.generation,
                state: SandboxState::Succeeded,
                exit_code: 0,
                resources: None,
            })
            .collect();
        apply(&mut s, 5, Command::ReportStatus { reports, at_ms: 9 });
    }
    let job = &s.jobs[&3];
    assert_eq!(job.counts.succeeded, 10);
    assert_eq!(job.state, JobState::Complete);
    assert_eq!(job.finished_at_ms, 9);
    assert!(s.assignments().is_empty());
}

#[test]
fn a_batch_applies_each_command_as_its_own_with_its_own_reply() {
    let mut s = ClusterState::default();
    submit(&mut s, 1, "before");
    let sub = |key: &str| {
        Command::SubmitJob {
            spec: spec(2, "eval"),
            idempotency_key: key.into(),
            at_ms: 7,
        }
        .encode()
    };
    let batch = Command::Batch {
        commands: vec![
            sub("a"),
            sub("b"),
            sub("a"), // a retry of "a" in the same entry: the same job
            Command::CancelJob {
                job_id: 99,
                at_ms: 7,
            }
            .encode(),
            vec![0xff, 0x00, 0x13],
        ],
    };
    let r = apply(&mut s, 2, batch);
    let Response::Batch(replies) = r else {
        panic!("{r:?}")
    };
    let ids: Vec<_> = replies
        .iter()
        .filter_map(|r| match r {
            Response::JobSubmitted { job_id, .. } => Some(*job_id),
            _ => None,
        })
        .collect();
    // Jobs in one entry share its index and take the ids after it.
    assert_eq!(ids, [2, 3, 2]);
    assert_eq!(
        replies[2],
        Response::JobSubmitted {
            job_id: 2,
            created: false
        }
    );
    assert_eq!(replies[3], Response::Rejected(Rejection::NoSuchJob(99)));
    assert!(matches!(
        replies[4],
        Response::Rejected(Rejection::Undecodable(_))
    ));
    assert_eq!(s.jobs.len(), 3);
    // The next entry's index is taken already: its job gets the next free id.
    submit(&mut s, 3, "after");
    assert_eq!(s.jobs.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    submit(&mut s, 9, "later");
    assert!(s.jobs.contains_key(&9), "ids follow the index again");

    // Refused whole, state unchanged: a batch in a batch, or too many commands.
    let before = s.state_hash();
    let nested = Command::Batch {
        commands: vec![
            sub("c"),
            Command::Batch {
                commands: vec![sub("d")],
            }
            .encode(),
        ],
    };
    assert!(matches!(
        apply(&mut s, 10, nested),
        Response::Rejected(Rejection::Invalid(_))
    ));
    let huge = Command::Batch {
        commands: vec![sub("e"); BATCH_COMMANDS_MAX + 1],
    };
    assert!(matches!(
        apply(&mut s, 11, huge),
        Response::Rejected(Rejection::Invalid(_))
    ));
    assert_eq!(s.state_hash(), before);
}

#[test]
fn capacity_fingerprint_moves_with_capacity_not_with_submissions() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    submit(&mut s, 2, "fills"); // 10 x 1 CPU: fills node a
    place_pending(&mut s, 3);
    let full = s.capacity_fingerprint();
    submit(&mut s, 4, "waits");
    submit(&mut s, 5, "new");
    assert_eq!(
        s.capacity_fingerprint(),
        full,
        "a submission changes no capacity"
    );

    // Only the jobs from the given id on are pending work; allocations all count.
    let all = s.placement_input(5, PlacementParams::default());
    assert_eq!(all.pending.iter().map(|j| j.id).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(all.pending, s.pending_requests(0));
    let new = placement::PlacementInput {
        pending: s.pending_requests(5),
        ..all
    };
    assert_eq!(new.pending.iter().map(|j| j.id).collect::<Vec<_>>(), [5]);
    assert!(placement::place(&new).placements.is_empty());

    // A sandbox ending frees capacity: the fingerprint moves and everything is re-planned.
    let a = s.assignments()["a"][0].clone();
    let ended = StatusRange {
        node: "a".into(),
        job: a.job,
        first: a.index,
        count: 1,
        generation: a.generation,
        state: SandboxState::Succeeded,
        exit_code: 0,
        resources: None,
    };
    apply(
        &mut s,
        6,
        Command::ReportStatus {
            reports: vec![ended],
            at_ms: 1,
        },
    );
    let freed = s.capacity_fingerprint();
    assert_ne!(freed, full);
    let others = [
        Command::SetQuota {
            tenant: "eval".into(),
            max: Some(Resources::new(1000, 1024)),
        },
        Command::RegisterNode {
            node: node("b", 4),
            at_ms: 2,
        },
        Command::SetNodeState {
            node: "b".into(),
            state: NodeState::Down,
            at_ms: 3,
        },
    ];
    let mut seen = vec![freed];
    for (i, c) in others.into_iter().enumerate() {
        apply(&mut s, 7 + i as u64, c);
        let now = s.capacity_fingerprint();
        assert!(!seen.contains(&now), "command {i} left the fingerprint");
        seen.push(now);
    }
}

#[test]
fn stale_plan_is_partly_rejected_never_overcommits() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    submit(&mut s, 2, "k1"); // 10 x 1 CPU: fills node a exactly
    let plan1 = plan_for(&s, 2);
    submit(&mut s, 3, "k2");
    let plan2 = plan_for(&s, 3); // computed on the same old state: places k1's job again + k2
    apply(
        &mut s,
        4,
        Command::ApplyPlan {
            plan: plan1,
            reasons: vec![],
            at_ms: 0,
        },
    );
    let r = apply(
        &mut s,
        5,
        Command::ApplyPlan {
            plan: plan2,
            reasons: vec![],
            at_ms: 0,
        },
    );
    let Response::PlanApplied {
        placed, rejected, ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(placed, 0, "the stale plan placed on a full node");
    assert!(rejected > 0);
    assert!(s.overcommitted().is_none());
    assert_eq!(s.jobs[&3].counts.pending, 10);
}

#[test]
fn node_down_reschedules_and_stale_reports_are_ignored() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    apply(
        &mut s,
        2,
        Command::RegisterNode {
            node: node("b", 10),
            at_ms: 0,
        },
    );
    submit(&mut s, 3, "k");
    place_pending(&mut s, 4);
    let (victim, list) = s.assignments().into_iter().next().expect("placed");
    let before = u32::try_from(list.len()).expect("a few assignments");
    apply(
        &mut s,
        5,
        Command::SetNodeState {
            node: victim.clone(),
            state: NodeState::Down,
            at_ms: 0,
        },
    );
    let job = &s.jobs[&3];
    assert_eq!(
        job.counts.pending, before,
        "lost sandboxes go back to the queue"
    );
    assert!(s.assignments_of(&victim).is_empty());
    // the old node's late report about generation 0 changes nothing
    let stale = StatusRange {
        node: victim.clone(),
        job: 3,
        first: list[0].index,
        count: 1,
        generation: 0,
        state: SandboxState::Running,
        exit_code: 0,
        resources: None,
    };
    let r = apply(
        &mut s,
        6,
        Command::ReportStatus {
            reports: vec![stale],
            at_ms: 0,
        },
    );
    assert_eq!(
        r,
        Response::StatusApplied {
            applied: 0,
            ignored: 1
        }
    );
    // rescheduled onto the other node with a new generation
    place_pending(&mut s, 7);
    assert_eq!(s.jobs[&3].counts.placed, 10);
    assert!(s.assignments_of(&victim).is_empty());
    assert!(s
        .assignments()
        .values()
        .flatten()
        .all(|a| a.generation <= 1));
}

#[test]
fn failure_restarts_by_policy() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    let mut sp = spec(1, "t");
    sp.restart = RestartPolicy::OnFailure { max_restarts: 1 };
    apply(
        &mut s,
        2,
        Command::SubmitJob {
            spec: sp,
            idempotency_key: "r".into(),
            at_ms: 0,
        },
    );
    for (index, generation, expect) in [(3, 0, JobState::Pending), (5, 1, JobState::Failed)] {
        let plan = plan_for(&s, index);
        apply(
            &mut s,
            index,
            Command::ApplyPlan {
                plan,
                reasons: vec![],
                at_ms: 0,
            },
        );
        let fail = StatusRange {
            node: "a".into(),
            job: 2,
            first: 0,
            count: 1,
            generation,
            state: SandboxState::Failed,
            exit_code: 3,
            resources: None,
        };
        apply(
            &mut s,
            index + 1,
            Command::ReportStatus {
                reports: vec![fail],
                at_ms: 0,
            },
        );
        assert_eq!(s.jobs[&2].state, expect);
    }
    assert_eq!(s.jobs[&2].counts.failed, 1);
}

#[test]
fn resize_never_overcommits() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    submit(&mut s, 2, "k"); // 10 x 1 CPU on a 10-CPU node
    place_pending(&mut s, 3);
    let grow = Command::SetSandboxes {
        job_id: 2,
        first: 0,
        count: 1,
        paused: None,
        resources: Some(Resources::new(2000, 2048)),
    };
    assert!(matches!(apply(&mut s, 4, grow), Response::Rejected(_)));
    let pause = Command::SetSandboxes {
        job_id: 2,
        first: 0,
        count: 3,
        paused: Some(true),
        resources: None,
    };
    assert_eq!(apply(&mut s, 5, pause), Response::Done);
    assert_eq!(s.assignments_of("a").iter().filter(|a| a.paused).count(), 3);
    assert!(s.nodes["a"].revision == 5);
}

#[test]
fn gang_losing_a_node_is_requeued_whole() {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        Command::RegisterNode {
            node: node("a", 4),
            at_ms: 0,
        },
    );
    apply(
        &mut s,
        2,
        Command::RegisterNode {
            node: node("b", 4),
            at_ms: 0,
        },
    );
    let mut sp = spec(8, "t");
    sp.gang = true;
    apply(
        &mut s,
        3,
        Command::SubmitJob {
            spec: sp,
            idempotency_key: "g".into(),
            at_ms: 0,
        },
    );
    let plan = plan_for(&s, 3);
    let shown = format!("{plan:?}");
    apply(
        &mut s,
        4,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    );
    assert_eq!(s.jobs[&3].counts.placed, 8, "{shown}");
    apply(
        &mut s,
        5,
        Command::SetNodeState {
            node: "a".into(),
            state: NodeState::Down,
            at_ms: 0,
        },
    );
    let c = s.jobs[&3].counts;
    assert_eq!(
        (c.pending, c.placed, c.running),
        (8, 0, 0),
        "a partial gang was left: {c:?}"
    );
    assert!(s.assignments_of("b").is_empty());
}

pub(super) fn placed_on_a(s: &mut ClusterState, count: u32) -> JobId {
    apply(
        s,
        1,
        Command::RegisterNode {
            node: node("a", 10),
            at_ms: 0,
        },
    );
    apply(
        s,
        2,
        Command::SubmitJob {
            spec: spec(count, "t"),
            idempotency_key: "k".into(),
            at_ms: 0,
        },
    );
    let plan = plan_for(s, 2);
    apply(
        s,
        3,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    );
    2
}

pub(super) fn range(first: u32, count: u32, state: SandboxState, exit_code: i32) -> StatusRange {
    StatusRange {
        node: "a".into(),
        job: 2,
        first,
        count,
        generation: 0,
        state,
        exit_code,
        resources: None,
    }
}

#[test]
fn one_entry_of_many_ranges_counts_each_once() {
    let mut s = ClusterState::default();
    let job = placed_on_a(&mut s, 10);
    let reports = vec![
        range(0, 4, SandboxState::Running, 0),
        range(4, 3, SandboxState::Running, 0),
        range(7, 2, SandboxState::Succeeded, 0),
        range(9, 1, SandboxState::Failed, 2),
        range(0, 2, SandboxState::Succeeded, 0), // later in the entry: wins
    ];
    let r = apply(&mut s, 4, Command::ReportStatus { reports, at_ms: 5 });
    assert_eq!(
        r,
        Response::StatusApplied {
            applied: 12,
            ignored: 0
        }
    );
    let j = &s.jobs[&job];
    let c = j.counts;
    assert_eq!(
        (c.running, c.succeeded, c.failed, c.placed),
        (5, 4, 1, 0),
        "{c:?}"
    );
    assert_eq!(j.state, JobState::Running);
    // The rest ends: the job's state follows in the same entry.
    let reports = vec![range(2, 5, SandboxState::Succeeded, 0)];
    apply(&mut s, 5, Command::ReportStatus { reports, at_ms: 6 });
    assert_eq!(s.jobs[&job].state, JobState::Failed, "one sandbox failed");
    assert_eq!(s.jobs[&job].finished_at_ms, 6);
}

#[test]
fn stop_asks_the_node_then_ends_stopped_not_failed() {
    let mut s = ClusterState::default();
    let job = placed_on_a(&mut s, 3);
    let running = vec![range(0, 3, SandboxState::Running, 0)];
    apply(
        &mut s,
        4,
        Command::ReportStatus {
            reports: running,
            at_ms: 0,
        },
    );
    let stop = |first, count| Command::StopSandboxes {
        job_id: job,
        first,
        count,
        at_ms: 5,
    };
    assert!(matches!(
        apply(&mut s, 5, stop(2, 5)),
        Response::Rejected(_)
    ));
    assert_eq!(apply(&mut s, 6, stop(0, 2)), Response::Done);
    let desired = s.assignments_of("a");
    assert_eq!(desired.iter().filter(|a| a.stop).count(), 2);
    assert_eq!(s.nodes["a"].revision, 6, "the node is told");
    // The node stops them; SIGTERM makes one exit 143. Both end `stopped`, with the code.
    let ended = vec![
        range(0, 1, SandboxState::Stopped, 143),
        range(1, 1, SandboxState::Failed, 143),
    ];
    let tail = |i: u32| OutcomeReport {
        node: "a".into(),
        job,
        index: i,
        generation: 0,
        state: SandboxState::Stopped,
        exit_code: 143,
        message: "stopped by the node at the scheduler's request".into(),
        log_tail: format!("bye from {i}\n"),
    };
    apply(
        &mut s,
        7,
        Command::ReportStatusOutcomes {
            reports: ended,
            outcomes: vec![tail(0), tail(1)],
            at_ms: 70,
        },
    );
    let j = &s.jobs[&job];
    assert_eq!(
        (j.counts.stopped, j.counts.failed, j.counts.running),
        (2, 0, 1)
    );
    assert_eq!(j.runs.get(0).map(|(_, r)| r.exit_code), Some(143));
    let kept = j.outcomes.get(1).expect("outcome kept");
    assert_eq!((kept.state, kept.at_ms), (SandboxState::Stopped, 70));
    assert_eq!(kept.log_tail, "bye from 1\n");
    // A stopped sandbox is not restarted and not asked for again.
    assert_eq!(s.assignments_of("a").len(), 1);
    // A stale outcome (older generation) is dropped.
    let mut stale = tail(2);
    stale.generation = 9;
    apply(
        &mut s,
        8,
        Command::ReportStatusOutcomes {
            reports: vec![],
            outcomes: vec![stale],
            at_ms: 0,
        },
    );
    assert!(s.jobs[&job].outcomes.get(2).is_none());
    // Stopping a sandbox whose node goes down ends it stopped, not rescheduled.
    apply(&mut s, 9, stop(2, 1));
    apply(
        &mut s,
        10,
        Command::SetNodeState {
            node: "a".into(),
            state: NodeState::Down,
            at_ms: 0,
        },
    );
    let j = &s.jobs[&job];
    assert_eq!((j.counts.stopped, j.counts.pending), (3, 0));
    assert_eq!(j.state, JobState::Complete);
}

#[test]
fn stopping_a_pending_sandbox_ends_it_at_once() {
    let mut s = ClusterState::default();
    submit(&mut s, 1, "k");
    let r = apply(
        &mut s,
        2,
        Command::StopSandboxes {
            job_id: 1,
            first: 0,
            count: 10,
            at_ms: 0,
        },
    );
    assert_eq!(r, Response::Done);
    assert_eq!(s.jobs[&1].counts.stopped, 10);
    assert!(s.jobs[&1].state.is_terminal());
}

fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
    prop_oneof![
        (0u32..5, "[a-c]{1,2}", 0u64..1000).prop_map(|(count, key, at_ms)| {
            Command::SubmitJob {
                spec: spec(count, "t"),
                idempotency_key: key,
                at_ms,
            }
        }),
        (0u64..40, 0u64..1000).prop_map(|(job_id, at_ms)| Command::CancelJob { job_id, at_ms }),
    ]
}

proptest! {
    /// Apply is deterministic: two replicas applying the same log agree byte for byte, and
    /// arbitrary bytes never panic.
    #[test]
    fn apply_is_deterministic(commands in proptest::collection::vec(arb_command(), 0..40),
                              junk in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut a = ClusterState::default();
        let mut b = ClusterState::default();
        for (i, c) in commands.iter().enumerate() {
            let ra = a.apply(i as u64 + 1, &c.encode());
            let rb = b.apply(i as u64 + 1, &c.encode());
            prop_assert_eq!(ra, rb);
        }
        let ra = a.apply(1000, &junk);
        let rb = b.apply(1000, &junk);
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(a.hash(), b.hash());
        // every idempotency entry points at a job with that key
        for ((tenant, key), id) in &a.idempotency {
            let job = &a.jobs[id];
            prop_assert_eq!(&job.spec.tenant, tenant);
            prop_assert_eq!(&job.idempotency_key, key);
        }
    }
}

/// A sandbox whose command never ran carries no exit code: its run records `EXIT_NOT_RUN`, and
/// the wire says `start_failed` with exit code 0, per sandbox and in the job's exit summary.
#[test]
fn a_sandbox_that_never_started_has_no_exit_code() {
    use crate::runs::EXIT_NOT_RUN;
    let mut s = ClusterState::default();
    let job = placed_on_a(&mut s, 2);
    let reports = vec![
        range(0, 1, SandboxState::Failed, EXIT_NOT_RUN),
        range(1, 1, SandboxState::Failed, 0),
    ];
    apply(&mut s, 4, Command::ReportStatus { reports, at_ms: 5 });
    let j = &s.jobs[&job];
    let never = crate::convert::sandbox_to_pb(j, 0).expect("sandbox 0");
    assert!(never.start_failed, "{never:?}");
    assert_eq!(never.exit_code, 0);
    let ran = crate::convert::sandbox_to_pb(j, 1).expect("sandbox 1");
    assert!(!ran.start_failed, "{ran:?}");
    let exits = crate::convert::exits_of(j);
    assert_eq!(exits.len(), 2, "{exits:?}");
    assert!(exits.iter().any(|e| e.start_failed && e.exit_code == 0));
    assert!(exits.iter().any(|e| !e.start_failed && e.exit_code == 0));
}
