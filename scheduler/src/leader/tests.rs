//! Unit tests of the leader's pure core: plain data and explicit times, no runtime.

use std::collections::BTreeMap;

use super::core::{CoreConfig, Heartbeats, Planner, PlantedBug, ReportBatch};
use super::*;
use crate::model::{JobSpec, NodeSpec, NodeState, RestartPolicy, Strategy};

#[allow(
    clippy::cast_possible_truncation,
    reason = "a constant of a few seconds; try_from is not const"
)]
const FULL_MS: u64 = FULL_PLAN_INTERVAL.as_millis() as u64;

fn spec(count: u32) -> JobSpec {
    JobSpec {
        name: String::new(),
        count,
        per_sandbox: Resources::new(1_000, 2_048),
        template: "busybox".into(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        priority: 0,
        tenant: "eval".into(),
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

fn node(id: &str, cpus: u64) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        address: String::new(),
        allocatable: Resources::new(cpus * 1_000, cpus * 4_096),
        labels: BTreeMap::new(),
        os: "linux".into(),
        arch: "x86_64".into(),
        pool: "default".into(),
        templates: vec![],
        max_sandboxes: 0,
        runtime: "sim".into(),
    }
}

fn submit(s: &mut ClusterState, index: u64) {
    let r = s.apply_command(
        index,
        Command::SubmitJob {
            spec: spec(10),
            idempotency_key: format!("k{index}"),
            at_ms: 0,
        },
    );
    assert!(matches!(r, Response::JobSubmitted { .. }), "{r:?}");
}

fn register(s: &mut ClusterState, index: u64, id: &str, cpus: u64) {
    let r = s.apply_command(
        index,
        Command::RegisterNode {
            node: node(id, cpus),
            at_ms: 0,
        },
    );
    assert!(matches!(r, Response::NodeRegistered), "{r:?}");
}

/// A cycle whose plan placed nothing: what the planner keeps for the next one.
fn quiet_cycle(p: &mut Planner, s: &ClusterState, applied: u64, now_ms: u64) -> Vec<JobId> {
    let c = p.prepare(s, applied, now_ms);
    let jobs = c.jobs();
    let plan = c.input().map(placement::place);
    assert!(plan
        .as_ref()
        .is_none_or(|p| p.placements.is_empty() && p.preemptions.is_empty()));
    p.finish(c, plan, now_ms);
    jobs
}

use crate::model::JobId;

#[test]
fn a_quiet_queue_plans_only_new_jobs_until_capacity_changes() {
    let mut s = ClusterState::default();
    submit(&mut s, 1);
    submit(&mut s, 2);
    let mut p = Planner::new(&CoreConfig::new(NODE_TTL_MS));
    let t0 = 1_000_000;
    let full = p.prepare(&s, 2, t0);
    assert_eq!(full.jobs(), [1, 2]);
    assert_eq!(full.pending(), 20);
    let plan = full.input().map(placement::place);
    assert!(
        p.finish(full, plan, t0).is_some(),
        "the first plan records why the jobs wait"
    );
    assert!(p.is_current(2));

    // Nothing placed, no capacity change: the next cycle plans the new job only.
    submit(&mut s, 3);
    let new_only = p.prepare(&s, 3, t0 + 10);
    assert_eq!(new_only.jobs(), [3]);
    assert_eq!(new_only.pending(), 30, "the gauge still counts every job");
    let plan = new_only.input().map(placement::place);
    p.finish(new_only, plan, t0 + 10);

    // Every FULL_PLAN_INTERVAL all jobs are planned again.
    let later = t0 + FULL_MS;
    assert_eq!(quiet_cycle(&mut p, &s, 3, later), [1, 2, 3]);

    // A node joining changes the capacity: all jobs, against the new node.
    register(&mut s, 4, "a", 8);
    let joined = p.prepare(&s, 4, later + 1);
    assert_eq!(joined.jobs(), [1, 2, 3]);
    let input = joined.input().expect("jobs are pending");
    assert_eq!(input.nodes.len(), 1);
    let plan = placement::place(input);
    assert!(!plan.placements.is_empty());
    let command = p.finish(joined, Some(plan), later + 1);
    assert!(
        matches!(command, Some(Command::ApplyPlan { ref plan, at_ms, .. })
            if !plan.placements.is_empty() && at_ms == later + 1),
        "{command:?}"
    );
}

#[test]
fn the_planted_stale_quiet_bug_ignores_a_capacity_change() {
    // The simulator's proof that it catches planner bugs rests on this knob doing something.
    let mut s = ClusterState::default();
    submit(&mut s, 1);
    let mut healthy = Planner::new(&CoreConfig::new(NODE_TTL_MS));
    let mut buggy = Planner::new(&CoreConfig {
        planted: Some(PlantedBug::StaleQuiet),
        ..CoreConfig::new(NODE_TTL_MS)
    });
    for p in [&mut healthy, &mut buggy] {
        assert_eq!(quiet_cycle(p, &s, 1, 0), [1]);
    }
    register(&mut s, 2, "a", 8);
    assert!(
        matches!(healthy.cycle(&s, 2, 10), Some(Command::ApplyPlan { ref plan, .. }) if !plan.placements.is_empty())
    );
    assert!(buggy.cycle(&s, 2, 10).is_none());
    assert!(buggy.cycle(&s, 2, 10 + 10 * FULL_MS).is_none());
}

#[test]
fn an_empty_queue_proposes_nothing_and_an_unchanged_state_is_current() {
    let s = ClusterState::default();
    let mut p = Planner::new(&CoreConfig::new(NODE_TTL_MS));
    assert!(!p.is_current(7));
    assert!(p.cycle(&s, 7, 0).is_none());
    assert!(p.is_current(7));
}

#[test]
fn silent_nodes_are_marked_down_after_their_ttl_and_a_new_leader_waits_a_full_ttl() {
    let mut s = ClusterState::default();
    register(&mut s, 1, "a", 4);
    register(&mut s, 2, "b", 4);
    let ttl = 1_000;
    let mut h = Heartbeats::new(ttl);
    assert!(
        h.check(&s, false, 0).is_none(),
        "a follower decides nothing"
    );
    assert!(
        h.check(&s, true, 100_000).is_none(),
        "taking over starts every TTL afresh"
    );
    h.heartbeat("a", Resources::new(500, 0), 1, 100_800);
    assert_eq!(h.used("a"), Resources::new(500, 0));
    let down = h.check(&s, true, 101_001).expect("leading");
    let ids: Vec<_> = down
        .iter()
        .map(|c| match c {
            Command::SetNodeState { node, state, at_ms } => {
                assert_eq!((*state, *at_ms), (NodeState::Down, 101_001));
                node.clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, ["b"]);
    // Losing and regaining leadership gives b a full TTL again.
    assert!(h.check(&s, false, 101_500).is_none());
    assert!(h.check(&s, true, 102_000).is_none());
    assert_eq!(h.check(&s, true, 102_500).expect("leading"), vec![]);
}

#[test]
fn a_report_batch_caps_text_but_keeps_every_state() {
    let mut b = ReportBatch::default();
    assert!(!b.is_full());
    let ranges = coalesce(
        "n",
        (0..3)
            .map(|i| (1, i * 2, 0, SandboxState::Running, 0, None))
            .collect(),
    );
    b.add(ranges, Vec::new());
    let (command, n) = b.flush(42);
    assert_eq!(n, 3);
    assert!(matches!(
        command,
        Command::ReportStatusOutcomes { at_ms: 42, ref reports, .. } if reports.len() == 3
    ));
}

#[test]
fn reports_coalesce_into_ranges() {
    let mut updates = Vec::new();
    for i in (0..100).rev() {
        updates.push((7, i, 0, SandboxState::Running, 0, None));
    }
    updates.push((7, 50, 0, SandboxState::Running, 0, None)); // duplicate
    updates.push((7, 200, 0, SandboxState::Failed, 3, None));
    updates.push((8, 0, 1, SandboxState::Running, 0, None));
    let ranges = coalesce("n1", updates);
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(
        (ranges[0].job, ranges[0].first, ranges[0].count),
        (7, 0, 100)
    );
    assert_eq!(
        (ranges[1].first, ranges[1].state, ranges[1].exit_code),
        (200, SandboxState::Failed, 3)
    );
    assert_eq!((ranges[2].job, ranges[2].generation), (8, 1));
}

#[test]
fn gaps_and_differences_split_ranges() {
    let updates = vec![
        (1, 0, 0, SandboxState::Running, 0, None),
        (1, 2, 0, SandboxState::Running, 0, None),
        (
            1,
            3,
            0,
            SandboxState::Running,
            0,
            Some(Resources::new(1, 1)),
        ),
    ];
    assert_eq!(coalesce("n", updates).len(), 3);
}
