//! Unit and property tests of the lifetime commands: TTL, idle timeout, lease, labels, and
//! deadlines that survive a snapshot.

use std::collections::BTreeMap;

use proptest::prelude::*;
use surge_raft::StateMachine;

use super::tests::{node, spec};
use super::*;
use crate::command::StatusRange;
use crate::leader::core::Lifetimes;
use crate::lifetime::{end_reason, EndReason, Expiry, Lifetime, StopCause};
use crate::placement::{self, PlacementParams};
use crate::runs::SandboxState;

const JOB: JobId = 2;

/// A node `a`, a job of `count` sandboxes with `life` placed on it at index 3, reported running
/// at `running_at_ms` (index 4).
fn running(
    count: u32,
    life: Lifetime,
    labels: &[(&str, &str)],
    running_at_ms: u64,
) -> ClusterState {
    let mut s = ClusterState::default();
    s.apply_command(
        1,
        Command::RegisterNode {
            node: node("a", 64),
            at_ms: 0,
        },
    );
    let mut spec = spec(count, "t");
    spec.command.clear();
    spec.lifetime = life;
    spec.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = s.apply_command(
        2,
        Command::SubmitJob {
            spec,
            idempotency_key: "k".into(),
            at_ms: 0,
        },
    );
    assert_eq!(
        r,
        Response::JobSubmitted {
            job_id: JOB,
            created: true
        }
    );
    let plan = placement::place(&s.placement_input(2, PlacementParams::default()));
    s.apply_command(
        3,
        Command::ApplyPlan {
            plan,
            reasons: vec![],
            at_ms: 0,
        },
    );
    report(&mut s, 4, 0, count, SandboxState::Running, running_at_ms);
    s
}

fn report(
    s: &mut ClusterState,
    index: u64,
    first: u32,
    count: u32,
    state: SandboxState,
    at_ms: u64,
) {
    let reports = vec![StatusRange {
        node: "a".into(),
        job: JOB,
        first,
        count,
        generation: 0,
        state,
        exit_code: 143,
        resources: None,
    }];
    s.apply_command(index, Command::ReportStatus { reports, at_ms });
}

fn ttl(ms: u64) -> Lifetime {
    Lifetime {
        ttl_ms: ms,
        ..Lifetime::default()
    }
}

fn reasons(s: &ClusterState) -> Vec<Option<EndReason>> {
    s.jobs[&JOB]
        .runs
        .iter()
        .map(|(_, r)| end_reason(r))
        .collect()
}

#[test]
fn ttl_passes_the_sandboxes_stop_and_end_ttl_expired() {
    let mut s = running(4, ttl(10_000), &[], 1_000);
    assert!(s.lifetimes.contains(&JOB), "in the deadline index");
    assert!(expiries(&s, 10_999).is_empty(), "not before its time");
    let due = expiries(&s, 11_000);
    assert_eq!(
        due,
        vec![Expiry {
            job: JOB,
            first: 0,
            count: 4,
            cause: StopCause::Ttl
        }]
    );
    let r = s.apply_command(
        5,
        Command::Expire {
            expiries: due,
            at_ms: 11_000,
        },
    );
    assert_eq!(r, Response::Expired { stopped: 4 });
    assert!(
        s.assignments_of("a").iter().all(|a| a.stop),
        "the node is asked to stop them"
    );
    assert!(expiries(&s, 20_000).is_empty(), "asked once");
    report(&mut s, 6, 0, 4, SandboxState::Failed, 11_500);
    assert_eq!(reasons(&s), vec![Some(EndReason::TtlExpired)]);
    assert!(s.jobs[&JOB].state.is_terminal());
    assert!(s.lifetimes.is_empty(), "an ended job leaves the index");
}

#[test]
fn a_keepalive_committed_before_the_expiry_wins() {
    let mut s = running(2, ttl(10_000), &[], 1_000);
    let due = expiries(&s, 11_000);
    // The owner's keepalive with a new TTL reaches the log before the leader's expiry.
    let k = Command::Keepalive {
        job_id: JOB,
        first: 0,
        count: 2,
        ttl_ms: Some(60_000),
        at_ms: 10_500,
    };
    assert_eq!(s.apply_command(5, k), Response::Done);
    let r = s.apply_command(
        6,
        Command::Expire {
            expiries: due,
            at_ms: 11_000,
        },
    );
    assert_eq!(
        r,
        Response::Expired { stopped: 0 },
        "re-decided on apply: not due any more"
    );
    assert_eq!(expiries(&s, 70_499), vec![]);
    assert_eq!(expiries(&s, 70_500).len(), 1);
}

#[test]
fn the_lease_stops_every_sandbox_pending_ones_too_unless_renewed() {
    let life = Lifetime {
        lease_ms: 5_000,
        ..Lifetime::default()
    };
    // 2 of 3 run; the third waits for a node.
    let mut s = running(3, life, &[], 1_000);
    report(&mut s, 5, 2, 1, SandboxState::Lost, 1_000); // rescheduled: pending again
    assert_eq!(
        s.jobs[&JOB].lease_expires_ms, 5_000,
        "submitted at 0 with a 5 s lease"
    );
    let renew = |at_ms| Command::Keepalive {
        job_id: JOB,
        first: 0,
        count: 3,
        ttl_ms: None,
        at_ms,
    };
    s.apply_command(6, renew(4_000));
    assert_eq!(s.jobs[&JOB].lease_expires_ms, 9_000);
    assert!(expiries(&s, 8_999).is_empty(), "renewed in time");
    let due = expiries(&s, 9_000);
    assert!(due.iter().all(|e| e.cause == StopCause::Lease), "{due:?}");
    assert_eq!(
        due.iter().map(|e| e.count).sum::<u32>(),
        3,
        "pending ones too: {due:?}"
    );
    s.apply_command(
        7,
        Command::Expire {
            expiries: due,
            at_ms: 9_000,
        },
    );
    let pending = s.jobs[&JOB].runs.get(2).map(|(_, r)| r.state);
    assert_eq!(
        pending,
        Some(SandboxState::Stopped),
        "a pending one never starts"
    );
    report(&mut s, 8, 0, 2, SandboxState::Succeeded, 9_100);
    let ends = reasons(&s);
    assert!(
        !ends.is_empty() && ends.iter().all(|r| *r == Some(EndReason::LeaseLost)),
        "{ends:?}"
    );
}

#[test]
fn activity_restarts_the_idle_clock_and_only_for_jobs_with_one() {
    let life = Lifetime {
        idle_timeout_ms: 10_000,
        ..Lifetime::default()
    };
    let mut s = running(2, life, &[], 1_000);
    assert_eq!(expiries(&s, 11_000).len(), 1, "idle since it started");
    s.apply_command(
        5,
        Command::Touch {
            ranges: vec![(JOB, 1, 1)],
            at_ms: 8_000,
        },
    );
    let due = expiries(&s, 11_000);
    assert_eq!(
        due,
        vec![Expiry {
            job: JOB,
            first: 0,
            count: 1,
            cause: StopCause::Idle
        }]
    );
    assert_eq!(
        expiries(&s, 18_000).len(),
        1,
        "sandbox 1's clock restarted at 8 s"
    );
    assert_eq!(expiries(&s, 18_000)[0].count, 2);

    let mut plain = running(2, Lifetime::default(), &[], 1_000);
    let before = plain.hash();
    plain.apply_command(
        5,
        Command::Touch {
            ranges: vec![(JOB, 0, 2)],
            at_ms: 8_000,
        },
    );
    assert_eq!(plain.hash(), before, "no idle timeout: nothing stored");
    assert!(plain.lifetimes.is_empty());
}

#[test]
fn the_leaders_core_proposes_one_touch_per_second_at_most_by_its_own_clock() {
    let life = Lifetime {
        idle_timeout_ms: 60_000,
        ..Lifetime::default()
    };
    let s = running(4, life, &[], 1_000);
    let mut core = Lifetimes::default();
    core.touch([(JOB, 0), (JOB, 1), (JOB, 3), (99, 0)]);
    assert!(
        core.check(&s, false, 5_000).is_empty(),
        "a follower proposes nothing"
    );
    core.touch([(JOB, 0), (JOB, 1), (JOB, 3)]);
    let out = core.check(&s, true, 5_000);
    assert_eq!(
        out,
        vec![Command::Touch {
            ranges: vec![(JOB, 0, 2), (JOB, 3, 1)],
            at_ms: 5_000
        }],
        "coalesced, unknown jobs dropped, stamped with the leader's clock"
    );
    core.touch([(JOB, 2)]);
    assert!(
        core.check(&s, true, 5_500).is_empty(),
        "within the second: held"
    );
    assert_eq!(core.check(&s, true, 6_000).len(), 1, "then proposed");
}

#[test]
fn cancel_by_label_takes_the_matching_jobs_of_one_tenant() {
    let mut s = ClusterState::default();
    let submit = |s: &mut ClusterState, index: u64, tenant: &str, run: &str| {
        let mut spec = spec(2, tenant);
        spec.labels = BTreeMap::from([("run".to_string(), run.to_string())]);
        s.apply_command(
            index,
            Command::SubmitJob {
                spec,
                idempotency_key: format!("k{index}"),
                at_ms: 0,
            },
        )
    };
    submit(&mut s, 1, "alice", "exp7");
    submit(&mut s, 2, "alice", "exp8");
    submit(&mut s, 3, "bob", "exp7");
    let selector = BTreeMap::from([("run".to_string(), "exp7".to_string())]);
    let r = s.apply_command(
        4,
        Command::CancelJobs {
            tenant: Some("alice".into()),
            selector: selector.clone(),
            at_ms: 5,
        },
    );
    assert_eq!(
        r,
        Response::JobsCancelled {
            count: 1,
            job_ids: vec![1]
        }
    );
    assert!(s.jobs[&1].cancelled && !s.jobs[&2].cancelled && !s.jobs[&3].cancelled);
    let empty = s.apply_command(
        5,
        Command::CancelJobs {
            tenant: None,
            selector: BTreeMap::new(),
            at_ms: 5,
        },
    );
    assert!(
        matches!(empty, Response::Rejected(_)),
        "an empty selector is refused"
    );
    let all = s.apply_command(
        6,
        Command::CancelJobs {
            tenant: None,
            selector,
            at_ms: 5,
        },
    );
    assert_eq!(
        all,
        Response::JobsCancelled {
            count: 1,
            job_ids: vec![3]
        },
        "operator: any tenant"
    );
}

#[test]
fn bad_lifetimes_and_labels_are_refused_on_apply_too() {
    let mut s = ClusterState::default();
    for (life, labels) in [
        (ttl(1), vec![]),
        (ttl(crate::lifetime::LIFETIME_MS_MAX + 1), vec![]),
        (Lifetime::default(), vec![("bad key", "x")]),
        (Lifetime::default(), vec![("run", "")]),
    ] {
        let mut spec = spec(1, "t");
        spec.lifetime = life;
        spec.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = s.apply_command(
            1,
            Command::SubmitJob {
                spec,
                idempotency_key: "k".into(),
                at_ms: 0,
            },
        );
        assert!(
            matches!(r, Response::Rejected(Rejection::Invalid(_))),
            "{r:?}"
        );
    }
    assert!(s.jobs.is_empty());
}

proptest! {
    /// Deadlines are state: after any mix of keepalives, touches and reports, a replica restored
    /// from a snapshot finds the same deadlines due at any time as the one that took it, and
    /// both go on to apply the same entries identically.
    #[test]
    fn deadlines_survive_snapshot_and_restore(
        ttl_s in 0u64..20,
        idle_s in 0u64..20,
        lease_s in 0u64..20,
        steps in proptest::collection::vec((0u8..3, 0u32..8, 1u32..4, 0u64..30_000), 0..12),
        probe_ms in 0u64..60_000,
    ) {
        let life = Lifetime {
            ttl_ms: if ttl_s == 0 { 0 } else { ttl_s * 1_000 },
            idle_timeout_ms: if idle_s == 0 { 0 } else { idle_s * 1_000 },
            lease_ms: if lease_s == 0 { 0 } else { lease_s * 1_000 },
        };
        let mut a = running(8, life, &[("run", "p")], 500);
        let mut index = 10;
        for (kind, first, count, at_ms) in steps {
            let count = count.min(8 - first);
            let c = match kind {
                0 => Command::Keepalive { job_id: JOB, first, count, ttl_ms: Some(5_000), at_ms },
                1 => Command::Touch { ranges: vec![(JOB, first, count)], at_ms },
                _ => Command::Expire { expiries: expiries(&a, at_ms), at_ms },
            };
            a.apply_command(index, c);
            index += 1;
        }
        let mut b = ClusterState::default();
        b.restore(&a.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(a.hash(), b.hash());
        prop_assert_eq!(&a.lifetimes, &b.lifetimes);
        prop_assert_eq!(expiries(&a, probe_ms), expiries(&b, probe_ms));
        let next = Command::Expire { expiries: expiries(&a, probe_ms), at_ms: probe_ms };
        prop_assert_eq!(a.apply_command(index, next.clone()), b.apply_command(index, next));
        prop_assert_eq!(a.hash(), b.hash());
    }
}
