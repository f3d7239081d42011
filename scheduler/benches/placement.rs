//! Placement benchmarks: bursts of 100,000 sandboxes.
//!
//! Run with `cargo bench -p surge-scheduler --bench placement`. Each case times one call to `place` on
//! a prepared snapshot (building the snapshot is outside the timing).

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use surge_scheduler::placement::{
    place, verify, IndexRun, JobRequest, NodeView, PlacementInput, Resources, Strategy,
};

const CPU: u64 = 1000;
const GIB: u64 = 1024;

/// `n` empty nodes of 128 CPUs / 512 GiB; every tenth holds the `py311` template.
fn nodes(n: usize) -> Vec<NodeView> {
    (0..n)
        .map(|i| NodeView {
            id: format!("node-{i:05}"),
            allocatable: Resources::new(128 * CPU, 512 * GIB),
            allocated: Resources::ZERO,
            os: "linux".into(),
            arch: "x86_64".into(),
            pool: "default".into(),
            labels: BTreeMap::new(),
            templates: if i % 10 == 0 {
                BTreeSet::from(["py311".to_string()])
            } else {
                BTreeSet::new()
            },
            schedulable: true,
            max_sandboxes: None,
            sandbox_count: 0,
        })
        .collect()
}

/// `count` sandboxes of 1 CPU / 2 GiB.
fn job(id: u64, tenant: &str, count: u32) -> JobRequest {
    JobRequest {
        id,
        tenant: tenant.into(),
        priority: 0,
        pending: vec![IndexRun::new(0, count)],
        per_sandbox: Resources::new(CPU, 2 * GIB),
        template: "py311".into(),
        gang: false,
        strategy: Strategy::Binpack,
        constraints: vec![],
        submitted_index: id,
    }
}

fn input(nodes: Vec<NodeView>, pending: Vec<JobRequest>) -> PlacementInput {
    PlacementInput {
        at_index: 1,
        nodes,
        pending,
        ..PlacementInput::default()
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("place");

    let one_job_1k = input(nodes(1_000), vec![job(1, "rl", 100_000)]);
    group.bench_function("100k sandboxes, 1 job, 1k nodes", |b| {
        b.iter(|| place(black_box(&one_job_1k)))
    });

    let one_job_10k = input(nodes(10_000), vec![job(1, "rl", 100_000)]);
    group.bench_function("100k sandboxes, 1 job, 10k nodes", |b| {
        b.iter(|| place(black_box(&one_job_10k)))
    });

    let mut spread = job(1, "rl", 100_000);
    spread.strategy = Strategy::Spread;
    let spread_10k = input(nodes(10_000), vec![spread]);
    group.bench_function("100k sandboxes, 1 spread job, 10k nodes", |b| {
        b.iter(|| place(black_box(&spread_10k)))
    });

    let tenants = ["rl", "eval", "research", "ci"];
    let small_jobs: Vec<JobRequest> = (0..10_000u64)
        .map(|i| job(i, tenants[(i % 4) as usize], 10))
        .collect();
    let many_small = input(nodes(1_000), small_jobs);
    group.bench_function("10k jobs x 10 sandboxes, 1k nodes", |b| {
        b.iter(|| place(black_box(&many_small)))
    });

    let mut gang = job(1, "rl", 50_000);
    gang.gang = true;
    let gang_1k = input(nodes(1_000), vec![gang]);
    group.bench_function("gang of 50k, 1k nodes", |b| {
        b.iter(|| place(black_box(&gang_1k)))
    });

    let mut too_big = job(1, "rl", 150_000);
    too_big.gang = true;
    let gang_fail = input(nodes(1_000), vec![too_big]);
    group.bench_function("gang of 150k that does not fit, 1k nodes", |b| {
        b.iter(|| place(black_box(&gang_fail)))
    });

    let plan = place(&one_job_10k);
    group.bench_function("verify 100k-sandbox plan, 10k nodes", |b| {
        b.iter(|| verify(black_box(&plan), black_box(&one_job_10k)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
