//! Property tests over random clusters, running work and job sets.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{
    any, prop, prop_assert, prop_assert_eq, prop_compose, prop_oneof, proptest, Just,
    ProptestConfig,
};
use proptest::strategy::Strategy;

use crate::placement::engine::normalize_runs;
use crate::placement::feasible::statically_feasible;
use crate::placement::Strategy as PlaceStrategy;
use crate::placement::{
    place, verify, Allocation, Attribute, Constraint, IndexRun, JobRequest, NodeView,
    PlacementInput, PlacementParams, Plan, Resources, TenantQuota,
};

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];

#[derive(Debug, Clone)]
struct RawAlloc {
    node: usize,
    count: u32,
    cpu_millis: u64,
    memory_mib: u64,
    priority: i32,
    tenant: usize,
    gang: bool,
    preemptible: bool,
}

fn arb_node(i: usize) -> impl Strategy<Value = NodeView> {
    (
        1u64..=16,
        1u64..=32,
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.9),
        0usize..2,
        prop::option::of("[ab]"),
        prop::collection::btree_set("[xy]", 0..=2),
    )
        .prop_map(
            move |(cpus, mem_gib, mac, schedulable, pool, gpu, templates)| NodeView {
                id: format!("n{i:02}"),
                allocatable: Resources::new(cpus * 1000, mem_gib * 1024),
                allocated: Resources::ZERO,
                os: if mac { "macos" } else { "linux" }.into(),
                arch: "arm64".into(),
                pool: ["p0", "p1"][pool].into(),
                labels: gpu.map(|g| ("gpu".to_string(), g)).into_iter().collect(),
                templates,
                schedulable,
                max_sandboxes: if mac { Some(2) } else { None },
                sandbox_count: 0,
            },
        )
}

fn arb_alloc(nodes: usize) -> impl Strategy<Value = RawAlloc> {
    (
        0..nodes,
        1u32..=4,
        250u64..=3000,
        256u64..=6144,
        -2i32..=3,
        0usize..3,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.9),
    )
        .prop_map(
            |(node, count, cpu_millis, memory_mib, priority, tenant, gang, preemptible)| RawAlloc {
                node,
                count,
                cpu_millis,
                memory_mib,
                priority,
                tenant,
                gang,
                preemptible,
            },
        )
}

fn arb_constraint() -> impl Strategy<Value = Constraint> {
    prop_oneof![
        Just(Constraint::equal(Attribute::Os, "macos")),
        Just(Constraint::equal(Attribute::Os, "linux")),
        Just(Constraint::not_equal(Attribute::Os, "macos")),
        Just(Constraint::equal(Attribute::Pool, "p1")),
        Just(Constraint::equal(Attribute::Label("gpu".into()), "a")),
        Just(Constraint::not_equal(Attribute::Label("gpu".into()), "b")),
        Just(Constraint::equal(Attribute::Os, "windows")),
    ]
}

fn arb_job(id: u64) -> impl Strategy<Value = JobRequest> {
    (
        (
            0usize..3,
            -2i32..=4,
            prop::collection::vec((0u32..40, 0u32..12), 1..=3),
        ),
        (
            0u64..=4000,
            0u64..=8192,
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.3),
        ),
        (
            prop::collection::vec(arb_constraint(), 0..=2),
            prop::option::of("[xyz]"),
            0u64..50,
        ),
    )
        .prop_map(
            move |(
                (tenant, priority, runs),
                (cpu, mem, gang, spread),
                (constraints, template, submitted),
            )| {
                JobRequest {
                    id,
                    tenant: TENANTS[tenant].into(),
                    priority,
                    pending: runs.into_iter().map(|(f, c)| IndexRun::new(f, c)).collect(),
                    per_sandbox: Resources::new(cpu, mem),
                    template: template.unwrap_or_default(),
                    gang,
                    strategy: if spread {
                        PlaceStrategy::Spread
                    } else {
                        PlaceStrategy::Binpack
                    },
                    constraints,
                    submitted_index: submitted,
                }
            },
        )
}

prop_compose! {
    fn arb_input()(n in 1usize..=10)(
        nodes in (0..n).map(arb_node).collect::<Vec<_>>(),
        raw in prop::collection::vec(arb_alloc(n), 0..=12),
        jobs in (0u64..7).map(arb_job).collect::<Vec<_>>(),
        job_count in 0usize..=7,
        quotas in prop::collection::vec(prop::option::of((0u64..=40, 0u64..=80)), 3),
        max_preemptions in 0u32..=12,
        cooldown in 0u64..=4,
        preempted in prop::collection::btree_map(prop_oneof![100u64..112, 200u64..206], 0u64..12, 0..=4),
        at_index in 5u64..12,
    ) -> PlacementInput {
        let mut nodes = nodes;
        let mut allocations = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let per = Resources::new(r.cpu_millis, r.memory_mib);
            let node = &mut nodes[r.node];
            let need = per.saturating_mul(u64::from(r.count));
            let cap_ok = node.max_sandboxes.is_none_or(|m| node.sandbox_count + r.count <= m);
            if !cap_ok || !node.allocated.saturating_add(need).fits_in(&node.allocatable) {
                continue;
            }
            node.allocated = node.allocated.saturating_add(need);
            node.sandbox_count += r.count;
            // Gang victims are spread over two allocation rows of the same job.
            let job = if r.gang { 200 + i as u64 / 2 } else { 100 + i as u64 };
            allocations.push(Allocation {
                job,
                node: node.id.clone(),
                first_index: u32::try_from(i).expect("a few rows") * 10,
                count: r.count,
                per_sandbox: per,
                priority: r.priority,
                tenant: TENANTS[r.tenant].into(),
                gang: r.gang,
                preemptible: r.preemptible,
            });
        }
        let quotas = quotas
            .into_iter()
            .enumerate()
            .filter_map(|(i, q)| q.map(|(c, m)| (TENANTS[i].to_string(), TenantQuota { max: Resources::new(c * 1000, m * 1024) })))
            .collect();
        PlacementInput {
            at_index,
            nodes,
            allocations,
            pending: jobs.into_iter().take(job_count).collect(),
            quotas,
            preempted_at: preempted,
            params: PlacementParams { max_preemptions_per_cycle: max_preemptions, preemption_cooldown_entries: cooldown },
        }
    }
}

/// Checks every invariant of a plan against its input; returns a description of the first violation.
fn check_plan(input: &PlacementInput, plan: &Plan) -> Result<(), String> {
    let nodes: BTreeMap<&str, &NodeView> = input.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let jobs: BTreeMap<u64, &JobRequest> = input.pending.iter().map(|j| (j.id, j)).collect();
    let by_job_priority: BTreeMap<u64, i32> =
        jobs.iter().map(|(id, j)| (*id, j.priority)).collect();

    // Node usage after the plan, starting from the snapshot.
    let mut used: BTreeMap<&str, (Resources, u32)> = input
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), (n.allocated, n.sandbox_count)))
        .collect();
    let mut tenant_usage: BTreeMap<&str, Resources> = BTreeMap::new();
    for a in &input.allocations {
        let u = tenant_usage.entry(a.tenant.as_str()).or_default();
        *u = u.saturating_add(a.per_sandbox.saturating_mul(u64::from(a.count)));
    }

    // Preemptions: strictly lower priority, preemptible, not in cool-down, inside a running run, disjoint,
    // within the bound; gang victims whole.
    let total: u64 = plan.preemptions.iter().map(|p| u64::from(p.count)).sum();
    if total > u64::from(input.params.max_preemptions_per_cycle) {
        return Err(format!("evicted {total} > bound"));
    }
    let mut evicted_idx: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut evicted_per_job: BTreeMap<u64, u64> = BTreeMap::new();
    for p in &plan.preemptions {
        let a = input
            .allocations
            .iter()
            .find(|a| {
                a.job == p.job
                    && a.node == p.node
                    && a.first_index <= p.first_index
                    && p.first_index + p.count <= a.first_index + a.count
            })
            .ok_or(format!("preemption of nothing: {p:?}"))?;
        let by = by_job_priority.get(&p.by_job).ok_or("unknown preemptor")?;
        if a.priority >= *by || !a.preemptible {
            return Err(format!("illegal victim {a:?} for priority {by}"));
        }
        if let Some(&at) = input.preempted_at.get(&a.job) {
            if input.at_index < at + input.params.preemption_cooldown_entries {
                return Err(format!("victim {} in cool-down", a.job));
            }
        }
        for i in p.first_index..p.first_index + p.count {
            if !evicted_idx.insert((p.job, i)) {
                return Err(format!("sandbox {}/{i} evicted twice", p.job));
            }
        }
        *evicted_per_job.entry(p.job).or_default() += u64::from(p.count);
        let e = used
            .get_mut(p.node.as_str())
            .ok_or("eviction on unknown node")?;
        let freed = a.per_sandbox.saturating_mul(u64::from(p.count));
        e.0 = e.0.saturating_sub(freed);
        e.1 -= p.count;
        let u = tenant_usage.entry(a.tenant.as_str()).or_default();
        *u = u.saturating_sub(freed);
        if !plan.placements.iter().any(|q| q.job == p.by_job) {
            return Err(format!("eviction for job {} that placed nothing", p.by_job));
        }
    }
    for (job, n) in &evicted_per_job {
        let rows: Vec<&Allocation> = input.allocations.iter().filter(|a| a.job == *job).collect();
        if rows.iter().any(|a| a.gang) {
            let whole: u64 = rows.iter().map(|a| u64::from(a.count)).sum();
            if *n != whole {
                return Err(format!(
                    "gang victim {job} partially evicted: {n} of {whole}"
                ));
            }
        }
    }

    // Placements: feasible node, indices pending and placed once, resources and caps respected.
    let mut placed_idx: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut placed_per_job: BTreeMap<u64, u64> = BTreeMap::new();
    for p in &plan.placements {
        let job = jobs.get(&p.job).ok_or("placement of unknown job")?;
        let node = nodes
            .get(p.node.as_str())
            .ok_or("placement on unknown node")?;
        if !statically_feasible(node, &job.constraints) {
            return Err(format!("job {} placed on infeasible {}", p.job, p.node));
        }
        if p.count == 0 {
            return Err("empty run".into());
        }
        let taken: Vec<IndexRun> = input
            .allocations
            .iter()
            .filter(|a| a.job == p.job)
            .map(|a| IndexRun::new(a.first_index, a.count))
            .collect();
        let pending = normalize_runs(&job.pending, &taken);
        for i in p.first_index..p.first_index + p.count {
            if !pending
                .iter()
                .any(|r| r.first_index <= i && u64::from(i) < r.end())
            {
                return Err(format!("index {}/{i} not pending", p.job));
            }
            if !placed_idx.insert((p.job, i)) {
                return Err(format!("sandbox {}/{i} placed twice", p.job));
            }
        }
        *placed_per_job.entry(p.job).or_default() += u64::from(p.count);
        let e = used.get_mut(p.node.as_str()).ok_or("unknown node")?;
        e.0 =
            e.0.saturating_add(job.per_sandbox.saturating_mul(u64::from(p.count)));
        e.1 += p.count;
        let u = tenant_usage.entry(job.tenant.as_str()).or_default();
        *u = u.saturating_add(job.per_sandbox.saturating_mul(u64::from(p.count)));
    }
    for (id, (res, count)) in &used {
        let n = nodes[id];
        if !res.fits_in(&n.allocatable) {
            return Err(format!(
                "node {id} overcommitted: {res:?} > {:?}",
                n.allocatable
            ));
        }
        if n.max_sandboxes.is_some_and(|m| *count > m) {
            return Err(format!("node {id} over its cap: {count}"));
        }
    }

    // Per job: gang all-or-nothing; every pending sandbox either placed or accounted as unplaced.
    let mut seen = BTreeSet::new();
    for job in &input.pending {
        if !seen.insert(job.id) {
            continue;
        }
        let taken: Vec<IndexRun> = input
            .allocations
            .iter()
            .filter(|a| a.job == job.id)
            .map(|a| IndexRun::new(a.first_index, a.count))
            .collect();
        let wanted: u64 = normalize_runs(&job.pending, &taken)
            .iter()
            .map(|r| u64::from(r.count))
            .sum();
        let placed = placed_per_job.get(&job.id).copied().unwrap_or(0);
        if job.gang && placed != 0 && placed != wanted {
            return Err(format!("partial gang {}: {placed} of {wanted}", job.id));
        }
        let unplaced: u64 = plan
            .unplaced
            .iter()
            .filter(|u| u.job == job.id)
            .map(|u| u.count)
            .sum();
        if placed + unplaced != wanted {
            return Err(format!(
                "job {}: placed {placed} + unplaced {unplaced} != {wanted}",
                job.id
            ));
        }
    }

    // Quotas: a tenant that got anything is within its quota afterwards.
    for (tenant, q) in &input.quotas {
        let got = input
            .pending
            .iter()
            .filter(|j| &j.tenant == tenant)
            .any(|j| placed_per_job.contains_key(&j.id));
        let usage = tenant_usage
            .get(tenant.as_str())
            .copied()
            .unwrap_or_default();
        if got && !usage.fits_in(&q.max) {
            return Err(format!(
                "tenant {tenant} over quota: {usage:?} > {:?}",
                q.max
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn plans_respect_every_invariant(input in arb_input()) {
        let plan = place(&input);
        prop_assert_eq!(plan.at_index, input.at_index);
        if let Err(e) = check_plan(&input, &plan) {
            prop_assert!(false, "{}\nplan: {:#?}", e, plan);
        }
    }

    #[test]
    fn same_input_same_plan(input in arb_input()) {
        let plan = place(&input);
        prop_assert_eq!(&plan, &place(&input));
        // Node order in the snapshot does not matter either.
        let mut reversed = input.clone();
        reversed.nodes.reverse();
        prop_assert_eq!(&plan, &place(&reversed));
    }

    #[test]
    fn verify_accepts_a_plan_against_its_own_snapshot(input in arb_input()) {
        let plan = place(&input);
        let v = verify(&plan, &input);
        prop_assert!(v.rejected.is_empty(), "{:?}", v.rejected);
        prop_assert!(v.dropped_preemptions.is_empty(), "{:?}", v.dropped_preemptions);
        prop_assert_eq!(&v.accepted.placements, &plan.placements);
        prop_assert_eq!(&v.accepted.preemptions, &plan.preemptions);
    }

    #[test]
    fn verify_against_newer_state_never_overcommits(
        input in arb_input(),
        down in prop::collection::vec(any::<bool>(), 10),
        extra_cpu in prop::collection::vec(0u64..4000, 10),
    ) {
        let plan = place(&input);
        let mut newer = input.clone();
        for (i, n) in newer.nodes.iter_mut().enumerate() {
            if down[i % down.len()] && i % 3 == 0 {
                n.schedulable = false;
            }
            let grown = n.allocated.saturating_add(Resources::new(extra_cpu[i % extra_cpu.len()], 0));
            n.allocated = Resources::new(grown.cpu_millis.min(n.allocatable.cpu_millis), grown.memory_mib);
        }
        let v = verify(&plan, &newer);
        prop_assert_eq!(v.accepted.placements.len() + v.rejected.len(), plan.placements.len());
        // The accepted part satisfies every invariant against the newer state, except that on an
        // unschedulable node nothing is placed at all.
        let accepted = Plan { at_index: newer.at_index, unplaced: vec![], ..v.accepted.clone() };
        for p in &accepted.placements {
            let node = newer.nodes.iter().find(|n| n.id == p.node);
            prop_assert!(node.is_some_and(|n| n.schedulable));
        }
        let gang_ok = newer.pending.iter().filter(|j| j.gang).all(|j| {
            let total: u64 = plan.placements.iter().filter(|p| p.job == j.id).map(|p| u64::from(p.count)).sum();
            let kept: u64 = accepted.placements.iter().filter(|p| p.job == j.id).map(|p| u64::from(p.count)).sum();
            kept == 0 || kept == total
        });
        prop_assert!(gang_ok);
        // Overcommit check on the newer state.
        let mut used: BTreeMap<&str, (Resources, u32)> =
            newer.nodes.iter().map(|n| (n.id.as_str(), (n.allocated, n.sandbox_count))).collect();
        for p in &accepted.preemptions {
            let a = newer.allocations.iter().find(|a| {
                a.job == p.job
                    && a.node == p.node
                    && a.first_index <= p.first_index
                    && p.first_index + p.count <= a.first_index + a.count
            });
            prop_assert!(a.is_some());
            if let (Some(a), Some(e)) = (a, used.get_mut(p.node.as_str())) {
                e.0 = e.0.saturating_sub(a.per_sandbox.saturating_mul(u64::from(p.count)));
                e.1 -= p.count;
            }
        }
        for p in &accepted.placements {
            let job = newer.pending.iter().find(|j| j.id == p.job);
            if let (Some(j), Some(e)) = (job, used.get_mut(p.node.as_str())) {
                e.0 = e.0.saturating_add(j.per_sandbox.saturating_mul(u64::from(p.count)));
                e.1 += p.count;
            }
        }
        for n in &newer.nodes {
            let (res, count) = used[n.id.as_str()];
            prop_assert!(res.fits_in(&n.allocatable), "node {} overcommitted", n.id);
            prop_assert!(n.max_sandboxes.is_none_or(|m| count <= m));
        }
    }
}
