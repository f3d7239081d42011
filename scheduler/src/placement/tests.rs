//! Scenario tests of `place` and `verify`.

use std::collections::{BTreeMap, BTreeSet};

use crate::placement::*;

pub(crate) const GIB: u64 = 1024;

pub(crate) fn node(id: &str, cpus: u64, mem_gib: u64) -> NodeView {
    NodeView {
        id: id.into(),
        allocatable: Resources::new(cpus * 1000, mem_gib * GIB),
        allocated: Resources::ZERO,
        os: "linux".into(),
        arch: "x86_64".into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        templates: BTreeSet::new(),
        schedulable: true,
        max_sandboxes: None,
        sandbox_count: 0,
    }
}

pub(crate) fn job(id: u64, tenant: &str, count: u32, cpu_millis: u64, mem_mib: u64) -> JobRequest {
    JobRequest {
        id,
        tenant: tenant.into(),
        priority: 0,
        pending: vec![IndexRun::new(0, count)],
        per_sandbox: Resources::new(cpu_millis, mem_mib),
        template: String::new(),
        gang: false,
        strategy: Strategy::Binpack,
        constraints: vec![],
        submitted_index: id,
    }
}

fn input(nodes: Vec<NodeView>, pending: Vec<JobRequest>) -> PlacementInput {
    PlacementInput {
        at_index: 7,
        nodes,
        pending,
        ..PlacementInput::default()
    }
}

/// A running allocation; also charges the node.
fn running(
    nodes: &mut [NodeView],
    job: u64,
    node: &str,
    count: u32,
    cpu_millis: u64,
    priority: i32,
) -> Allocation {
    let per = Resources::new(cpu_millis, GIB);
    if let Some(n) = nodes.iter_mut().find(|n| n.id == node) {
        n.allocated = n
            .allocated
            .saturating_add(per.saturating_mul(u64::from(count)));
        n.sandbox_count += count;
    }
    Allocation {
        job,
        node: node.into(),
        first_index: 0,
        count,
        per_sandbox: per,
        priority,
        tenant: "batch".into(),
        gang: false,
        preemptible: true,
    }
}

fn placed_by_node(plan: &Plan, job: u64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in plan.placements.iter().filter(|p| p.job == job) {
        *out.entry(p.node.clone()).or_insert(0) += u64::from(p.count);
    }
    out
}

fn placed(plan: &Plan, job: u64) -> u64 {
    placed_by_node(plan, job).values().sum()
}

fn reasons(plan: &Plan, job: u64) -> Vec<String> {
    plan.unplaced
        .iter()
        .filter(|u| u.job == job)
        .map(|u| u.reason.to_string())
        .collect()
}

fn evicted(plan: &Plan) -> u64 {
    plan.preemptions.iter().map(|p| u64::from(p.count)).sum()
}

fn with_allocated(mut n: NodeView, cpus: u64) -> NodeView {
    n.allocated = Resources::new(cpus * 1000, 0);
    n
}

// ---- ranking ----

#[test]
fn binpack_picks_the_fullest_node_that_fits() {
    let nodes = vec![
        with_allocated(node("a", 128, 512), 60),
        with_allocated(node("b", 128, 512), 120),
        with_allocated(node("c", 128, 512), 126),
    ];
    // c has 2 CPUs free: too small for 4. b is the fullest that fits.
    let plan = place(&input(nodes, vec![job(1, "t", 4, 1000, 1024)]));
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("b".to_string(), 4)])
    );
}

#[test]
fn binpack_fills_one_node_before_the_next() {
    let nodes = vec![node("a", 8, 64), node("b", 8, 64), node("c", 8, 64)];
    let plan = place(&input(nodes, vec![job(1, "t", 12, 1000, 1024)]));
    let by_node = placed_by_node(&plan, 1);
    assert_eq!(
        by_node.values().copied().collect::<Vec<_>>(),
        vec![8, 4],
        "{by_node:?}"
    );
}

#[test]
fn spread_picks_the_emptiest_node() {
    let nodes = vec![
        with_allocated(node("a", 128, 512), 60),
        with_allocated(node("b", 128, 512), 10),
        with_allocated(node("c", 128, 512), 120),
    ];
    let mut j = job(1, "t", 1, 1000, 1024);
    j.strategy = Strategy::Spread;
    let plan = place(&input(nodes, vec![j]));
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("b".to_string(), 1)])
    );
}

#[test]
fn spread_shares_round_robin() {
    let nodes = (0..4).map(|i| node(&format!("n{i}"), 16, 64)).collect();
    let mut j = job(1, "t", 10, 1000, 1024);
    j.strategy = Strategy::Spread;
    let plan = place(&input(nodes, vec![j]));
    let mut counts: Vec<u64> = placed_by_node(&plan, 1).into_values().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![2, 2, 3, 3]);
}

#[test]
fn template_locality_breaks_near_ties() {
    let mut with_template = with_allocated(node("b", 128, 512), 50);
    with_template.templates.insert("py311".into());
    // a is slightly fuller (better fit), b holds the template.
    let nodes = vec![with_allocated(node("a", 128, 512), 54), with_template];
    let mut j = job(1, "t", 2, 1000, 1024);
    j.template = "py311".into();
    let plan = place(&input(nodes.clone(), vec![j.clone()]));
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("b".to_string(), 2)])
    );
    // Without the template the better fit wins.
    j.template = "other".into();
    let plan = place(&input(nodes, vec![j]));
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("a".to_string(), 2)])
    );
}

// ---- feasibility and reasons ----

#[test]
fn constraints_and_schedulability_are_honoured() {
    let mut mac = node("mac", 16, 64);
    mac.os = "macos".into();
    let mut down = node("down", 64, 256);
    down.os = "macos".into();
    down.schedulable = false;
    let mut j = job(1, "t", 2, 1000, 1024);
    j.constraints = vec![Constraint::equal(Attribute::Os, "macos")];
    let plan = place(&input(vec![node("lin", 64, 256), mac, down], vec![j]));
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("mac".to_string(), 2)])
    );
}

#[test]
fn reason_no_node_with_os() {
    let mut j = job(1, "t", 2, 1000, 1024);
    j.constraints = vec![Constraint::equal(Attribute::Os, "windows")];
    let plan = place(&input(vec![node("a", 8, 8)], vec![j]));
    assert_eq!(placed(&plan, 1), 0);
    assert_eq!(reasons(&plan, 1), vec!["no node with os=windows"]);
    assert_eq!(plan.unplaced[0].count, 2);
}

#[test]
fn reason_needs_more_cpus() {
    let nodes = (0..10).map(|i| node(&format!("n{i}"), 100, 1000)).collect();
    let plan = place(&input(nodes, vec![job(1, "t", 5000, 1000, 1024)]));
    assert_eq!(placed(&plan, 1), 1000);
    assert_eq!(
        reasons(&plan, 1),
        vec!["needs 4,000 more CPUs (4,000 of 5,000 sandboxes unplaced)"]
    );
}

#[test]
fn reason_node_cap() {
    let mut mac = node("mac", 64, 256);
    mac.os = "macos".into();
    mac.max_sandboxes = Some(2);
    let mut j = job(1, "t", 5, 1000, 1024);
    j.constraints = vec![Constraint::equal(Attribute::Os, "macos")];
    let plan = place(&input(vec![mac], vec![j]));
    assert_eq!(placed(&plan, 1), 2);
    assert_eq!(
        reasons(&plan, 1),
        vec!["node cap: at most 2 macos sandboxes per host"]
    );
}

#[test]
fn reason_invalid_and_duplicate() {
    let zero = job(1, "t", 1, 0, 0);
    let dup = job(1, "t", 1, 1000, 0);
    let plan = place(&input(vec![node("a", 8, 8)], vec![zero, dup]));
    assert!(plan.placements.is_empty());
    let r = reasons(&plan, 1);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r.iter().any(|s| s.contains("duplicate")), "{r:?}");
}

// ---- runs and indices ----

#[test]
fn big_job_is_run_length() {
    let nodes: Vec<NodeView> = (0..100)
        .map(|i| node(&format!("n{i:03}"), 128, 512))
        .collect();
    let plan = place(&input(nodes, vec![job(1, "t", 10_000, 1000, 2048)]));
    assert_eq!(placed(&plan, 1), 10_000);
    // 128 per node -> 79 nodes; one row per node.
    assert_eq!(plan.placements.len(), 79);
    assert!(plan.unplaced.is_empty());
}

#[test]
fn non_contiguous_pending_and_running_indices() {
    let mut j = job(1, "t", 0, 1000, 1024);
    j.pending = vec![IndexRun::new(0, 5), IndexRun::new(10, 5)];
    let mut nodes = vec![node("a", 64, 256)];
    // Indices 2..4 of job 1 are already running: they must not be placed again.
    let mut alloc = running(&mut nodes, 1, "a", 2, 1000, 0);
    alloc.first_index = 2;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = vec![alloc];
    let plan = place(&inp);
    let runs: Vec<(u32, u32)> = plan
        .placements
        .iter()
        .map(|p| (p.first_index, p.count))
        .collect();
    assert_eq!(runs, vec![(0, 2), (4, 1), (10, 5)]);
}

// ---- gang ----

#[test]
fn gang_is_all_or_nothing() {
    let nodes = vec![node("a", 4, 64), node("b", 4, 64)];
    let mut g = job(1, "t", 10, 1000, 1024);
    g.gang = true;
    let small = job(2, "t", 3, 1000, 1024);
    let plan = place(&input(nodes, vec![g, small]));
    assert_eq!(placed(&plan, 1), 0);
    assert_eq!(
        reasons(&plan, 1),
        vec!["gang of 10 does not fit: 8 of 10 placeable"]
    );
    // The rolled-back gang left the room to the next job.
    assert_eq!(placed(&plan, 2), 3);
}

#[test]
fn gang_that_fits_is_placed_whole() {
    let nodes = vec![node("a", 4, 64), node("b", 4, 64)];
    let mut g = job(1, "t", 8, 1000, 1024);
    g.gang = true;
    let plan = place(&input(nodes, vec![g]));
    assert_eq!(placed(&plan, 1), 8);
}

// ---- quota and fair share ----

#[test]
fn quota_holds_back_the_excess() {
    let mut inp = input(
        vec![node("a", 64, 256)],
        vec![job(1, "eval", 20, 1000, 1024)],
    );
    inp.quotas.insert(
        "eval".into(),
        TenantQuota {
            max: Resources::new(10_000, 1024 * GIB),
        },
    );
    let plan = place(&inp);
    assert_eq!(placed(&plan, 1), 10);
    assert_eq!(
        reasons(&plan, 1),
        vec!["tenant eval at quota (cpu 10/10): 10 sandboxes held back"]
    );
}

#[test]
fn quota_holds_back_a_whole_gang() {
    let mut g = job(1, "eval", 20, 1000, 1024);
    g.gang = true;
    let mut inp = input(vec![node("a", 64, 256)], vec![g]);
    inp.quotas.insert(
        "eval".into(),
        TenantQuota {
            max: Resources::new(10_000, 1024 * GIB),
        },
    );
    let plan = place(&inp);
    assert_eq!(placed(&plan, 1), 0);
    assert_eq!(plan.unplaced[0].count, 20);
    assert!(reasons(&plan, 1)[0].starts_with("tenant eval at quota"));
}

#[test]
fn drf_serves_the_lowest_dominant_share_first() {
    // 10 CPUs left. Tenant "heavy" already uses a lot of memory (dominant share), "light" nothing.
    // Both want all 10 CPUs; heavy submitted first, but light goes first.
    let mut nodes = vec![node("a", 20, 100)];
    let mut hog = running(&mut nodes, 50, "a", 10, 1000, 0);
    hog.tenant = "heavy".into();
    hog.per_sandbox = Resources::new(1000, 8 * GIB);
    nodes[0].allocated = Resources::new(10_000, 80 * GIB);
    let mut inp = input(
        nodes,
        vec![
            job(1, "heavy", 10, 1000, 1024),
            job(2, "light", 10, 1000, 1024),
        ],
    );
    inp.allocations = vec![hog];
    let plan = place(&inp);
    assert_eq!(placed(&plan, 2), 10);
    assert_eq!(placed(&plan, 1), 0);
}

#[test]
fn drf_alternates_between_equal_tenants() {
    // Room for 4 jobs; each tenant has 4 queued. Equal shares -> 2 each, not 4 of the first tenant.
    let nodes = vec![node("a", 4, 64)];
    let jobs = (0..8u64)
        .map(|i| job(i, if i < 4 { "x" } else { "y" }, 1, 1000, 1024))
        .collect();
    let plan = place(&input(nodes, jobs));
    let x: u64 = (0..4).map(|i| placed(&plan, i)).sum();
    let y: u64 = (4..8).map(|i| placed(&plan, i)).sum();
    assert_eq!((x, y), (2, 2));
    // FIFO within a tenant: the first two of each.
    assert_eq!(
        (
            placed(&plan, 0),
            placed(&plan, 1),
            placed(&plan, 4),
            placed(&plan, 5)
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn priority_beats_fair_share() {
    let nodes = vec![node("a", 4, 64)];
    let mut urgent = job(2, "y", 4, 1000, 1024);
    urgent.priority = 5;
    urgent.submitted_index = 99;
    let plan = place(&input(nodes, vec![job(1, "x", 4, 1000, 1024), urgent]));
    assert_eq!((placed(&plan, 1), placed(&plan, 2)), (0, 4));
}

// ---- preemption ----

fn full_cluster() -> (Vec<NodeView>, Vec<Allocation>) {
    let mut nodes = vec![node("a", 8, 64), node("b", 8, 64)];
    let allocs = vec![
        running(&mut nodes, 100, "a", 8, 1000, 1),
        running(&mut nodes, 101, "b", 8, 1000, 5),
    ];
    (nodes, allocs)
}

#[test]
fn preempts_lowest_priority_first_and_uses_the_room() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 3, 1000, 1024);
    j.priority = 10;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = allocs;
    let plan = place(&inp);
    assert_eq!(
        placed_by_node(&plan, 1),
        BTreeMap::from([("a".to_string(), 3)])
    );
    assert_eq!(
        plan.preemptions,
        vec![Preemption {
            job: 100,
            node: "a".into(),
            first_index: 5,
            count: 3,
            by_job: 1
        }]
    );
}

#[test]
fn never_preempts_equal_or_higher_priority() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 3, 1000, 1024);
    j.priority = 1;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = allocs;
    let plan = place(&inp);
    assert!(plan.preemptions.is_empty());
    assert_eq!(placed(&plan, 1), 0);
}

#[test]
fn preemption_is_bounded_per_plan() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 10, 1000, 1024);
    j.priority = 10;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = allocs;
    inp.params.max_preemptions_per_cycle = 4;
    let plan = place(&inp);
    assert_eq!(evicted(&plan), 4);
    assert_eq!(placed(&plan, 1), 4);
}

#[test]
fn preemption_respects_cooldown() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 3, 1000, 1024);
    j.priority = 10;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = allocs;
    inp.params.preemption_cooldown_entries = 100;
    // Job 100 (priority 1) was preempted at index 5; the snapshot is at 7: immune. Job 101 is next.
    inp.preempted_at.insert(100, 5);
    let plan = place(&inp);
    assert!(
        plan.preemptions.iter().all(|p| p.job == 101),
        "{:?}",
        plan.preemptions
    );
    assert_eq!(evicted(&plan), 3);
    // Once the cool-down is over, the cheaper victim is back.
    inp.at_index = 105;
    let plan = place(&inp);
    assert!(
        plan.preemptions.iter().all(|p| p.job == 100),
        "{:?}",
        plan.preemptions
    );
}

#[test]
fn gang_preempts_only_if_the_whole_gang_fits() {
    let (nodes, allocs) = full_cluster();
    let mut g = job(1, "t", 12, 1000, 1024);
    g.priority = 10;
    g.gang = true;
    let mut inp = input(nodes, vec![g]);
    inp.allocations = allocs;
    inp.params.max_preemptions_per_cycle = 8;
    let plan = place(&inp);
    assert!(plan.preemptions.is_empty(), "{:?}", plan.preemptions);
    assert!(plan.placements.is_empty());
    assert_eq!(
        reasons(&plan, 1),
        vec!["gang of 12 does not fit: 8 of 12 placeable"]
    );
    inp.params.max_preemptions_per_cycle = 12;
    let plan = place(&inp);
    assert_eq!(placed(&plan, 1), 12);
    assert_eq!(evicted(&plan), 12);
}

#[test]
fn gang_victim_is_evicted_whole() {
    let mut nodes = vec![node("a", 4, 64), node("b", 4, 64)];
    let mut v1 = running(&mut nodes, 100, "a", 4, 1000, 0);
    let mut v2 = running(&mut nodes, 100, "b", 4, 1000, 0);
    v1.gang = true;
    v2.gang = true;
    v2.first_index = 4;
    let mut j = job(1, "t", 1, 1000, 1024);
    j.priority = 3;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = vec![v1, v2];
    let plan = place(&inp);
    assert_eq!(evicted(&plan), 8, "{:?}", plan.preemptions);
    assert_eq!(placed(&plan, 1), 1);
}

// ---- verify ----

#[test]
fn verify_accepts_a_fresh_plan_unchanged() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 3, 1000, 1024);
    j.priority = 10;
    let mut inp = input(nodes, vec![j, job(2, "t", 2, 500, 512)]);
    inp.allocations = allocs;
    inp.nodes.push(node("c", 1, 8));
    let plan = place(&inp);
    let v = verify(&plan, &inp);
    assert!(v.rejected.is_empty(), "{:?}", v.rejected);
    assert_eq!(v.accepted.placements, plan.placements);
    assert_eq!(v.accepted.preemptions, plan.preemptions);
}

#[test]
fn verify_drops_what_no_longer_fits() {
    let nodes = vec![node("a", 4, 64), node("b", 4, 64)];
    let inp = input(nodes, vec![job(1, "t", 8, 1000, 1024)]);
    let plan = place(&inp);
    assert_eq!(placed(&plan, 1), 8);
    let mut newer = inp.clone();
    newer.at_index = 9;
    newer.nodes[0].schedulable = false;
    newer.nodes[1].allocated = Resources::new(2000, 0);
    let v = verify(&plan, &newer);
    assert!(
        v.accepted.placements.is_empty(),
        "{:?}",
        v.accepted.placements
    );
    let reasons: BTreeSet<String> = v.rejected.iter().map(|r| r.reason.to_string()).collect();
    assert!(reasons.contains("node is down or draining"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("node has 2 CPUs")),
        "{reasons:?}"
    );
    assert_eq!(v.accepted.at_index, 9);
}

#[test]
fn verify_drops_the_whole_gang() {
    let nodes = vec![node("a", 4, 64), node("b", 4, 64)];
    let mut g = job(1, "t", 8, 1000, 1024);
    g.gang = true;
    let inp = input(nodes, vec![g]);
    let plan = place(&inp);
    assert_eq!(placed(&plan, 1), 8);
    let mut newer = inp.clone();
    newer.nodes[1].allocated = Resources::new(1000, 0);
    let v = verify(&plan, &newer);
    assert!(v.accepted.placements.is_empty());
    assert!(v
        .rejected
        .iter()
        .any(|r| r.reason == RejectReason::GangIncomplete));
    assert_eq!(v.rejected.len(), plan.placements.len());
}

#[test]
fn verify_rejects_indices_placed_twice_and_cancelled_jobs() {
    let nodes = vec![node("a", 64, 256)];
    let inp = input(nodes, vec![job(1, "t", 4, 1000, 1024)]);
    let mut plan = place(&inp);
    plan.placements.push(plan.placements[0].clone());
    let v = verify(&plan, &inp);
    assert_eq!(v.accepted.placements.len(), 1);
    assert_eq!(v.rejected[0].reason, RejectReason::IndicesNotPending);
    let mut cancelled = inp.clone();
    cancelled.pending.clear();
    let v = verify(&plan, &cancelled);
    assert!(v.accepted.placements.is_empty());
    assert!(v
        .rejected
        .iter()
        .all(|r| r.reason == RejectReason::JobNotPending));
}

#[test]
fn verify_keeps_evictions_only_with_their_placement() {
    let (nodes, allocs) = full_cluster();
    let mut j = job(1, "t", 3, 1000, 1024);
    j.priority = 10;
    let mut inp = input(nodes, vec![j]);
    inp.allocations = allocs;
    let plan = place(&inp);
    assert_eq!(evicted(&plan), 3);
    let mut newer = inp.clone();
    newer.nodes[0].schedulable = false;
    let v = verify(&plan, &newer);
    assert!(v.accepted.placements.is_empty());
    assert!(v.accepted.preemptions.is_empty());
    assert_eq!(v.dropped_preemptions, plan.preemptions);
}
