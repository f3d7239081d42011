//! The scheduler end to end: real replicas, simulated nodes over the real gRPC node API.

mod common;

use std::time::{Duration, Instant};

use common::*;
use surge_proto::jobs as pb;

fn spec(count: u32, cpu_millis: u64, priority: i32, gang: bool) -> pb::JobSpec {
    pb::JobSpec {
        count,
        cpu_millis,
        memory_mib: 256,
        template: "busybox".into(),
        command: vec!["true".into()],
        tenant: "test".into(),
        priority,
        gang,
        ..Default::default()
    }
}

async fn submit(addr: &str, spec: pb::JobSpec, key: &str) -> u64 {
    submit_spec(addr, spec, key).await
}

async fn job(addr: &str, id: u64) -> pb::Job {
    get_job(addr, id).await
}

/// Wait until `ok` holds for the job; panic with the job's last state otherwise.
async fn wait_job(
    c: &surge_harness::cluster::LocalCluster,
    addr: &str,
    id: u64,
    what: &str,
    ok: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(addr, id).await;
        if ok(&j) {
            return j;
        }
        if Instant::now() > deadline {
            dump_logs(c);
            panic!("job {id}: {what} never happened; last: {j:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_nodes_ready(addr: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = surge_client::Client::open(addr)
            .expect("client")
            .list_nodes()
            .await
            .expect("list nodes");
        if nodes.iter().filter(|n| n.state().name() == "ready").count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} nodes ready",
            nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn counts(j: &pb::Job) -> pb::Counts {
    j.counts.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sandboxes_land_on_fifty_nodes() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let addr = c.addr(leader).expect("addr");
    // 50 nodes of 128 CPUs; sandboxes of half a CPU: 10,000 need 5,000 of the 6,400 CPUs.
    c.start_sim_nodes("n", 50, &["--sim-duration-ms", "600000"])
        .expect("nodes");
    wait_nodes_ready(&addr, 50).await;
    let id = submit(&addr, spec(10_000, 500, 0, false), "big").await;
    let j = wait_job(&c, &addr, id, "all 10,000 running", |j| {
        counts(j).running == 10_000
    })
    .await;
    assert_eq!(j.state().name(), "running");
    // No node holds more than it offers, and the job is spread over several nodes (bin-packing
    // fills nodes: 10,000 x 0.5 CPU needs at least 40 of them).
    let nodes = surge_client::Client::open(&addr)
        .expect("client")
        .list_nodes()
        .await
        .expect("list");
    let mut used_nodes = 0;
    let mut total = 0;
    for n in &nodes {
        let a = n.allocatable.unwrap_or_default();
        let b = n.allocated.unwrap_or_default();
        assert!(
            b.cpu_millis <= a.cpu_millis && b.memory_mib <= a.memory_mib,
            "{n:?} overcommitted"
        );
        if n.sandboxes > 0 {
            used_nodes += 1;
        }
        total += n.sandboxes;
    }
    assert_eq!(total, 10_000);
    assert!(used_nodes >= 40, "{used_nodes} nodes used");
    // Placements are committed on every replica, not just the leader.
    c.wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .expect("converged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_waits_with_a_reason_until_nodes_join() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let addr = c.addr(leader).expect("addr");
    c.start_sim_nodes("a", 4, &["--cpus", "16", "--sim-duration-ms", "600000"])
        .expect("nodes");
    wait_nodes_ready(&addr, 4).await;
    // 100 x 1 CPU as a gang: 64 CPUs are not enough, and no part of it may run.
    let id = submit(&addr, spec(100, 1000, 0, true), "gang").await;
    let j = wait_job(&c, &addr, id, "a pending reason", |j| {
        !j.pending_reason.is_empty() && j.pending_reason != "waiting for the scheduler"
    })
    .await;
    assert_eq!(counts(&j).pending, 100, "part of a gang was placed: {j:?}");
    assert!(j.pending_reason.contains("gang"), "{}", j.pending_reason);
    // Capacity appears: the whole gang is placed at once.
    c.start_sim_nodes("b", 4, &["--cpus", "16", "--sim-duration-ms", "600000"])
        .expect("nodes");
    let j = wait_job(&c, &addr, id, "gang placed", |j| counts(j).pending == 0).await;
    assert_eq!(counts(&j).placed + counts(&j).running, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_evicts_only_lower_priority() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let addr = c.addr(leader).expect("addr");
    c.start_sim_nodes("n", 2, &["--cpus", "16", "--sim-duration-ms", "600000"])
        .expect("nodes");
    wait_nodes_ready(&addr, 2).await;
    // 32 CPUs: 16 of priority 5 (protected) and 16 of priority 1 fill the cluster.
    let high_old = submit(&addr, spec(16, 1000, 5, false), "p5").await;
    wait_job(&c, &addr, high_old, "running", |j| counts(j).running == 16).await;
    let low = submit(&addr, spec(16, 1000, 1, false), "p1").await;
    wait_job(&c, &addr, low, "running", |j| counts(j).running == 16).await;
    // Priority 5 again, 8 CPUs: it may only take from the priority-1 job, and only what it needs.
    let urgent = submit(&addr, spec(8, 1000, 5, false), "urgent").await;
    wait_job(&c, &addr, urgent, "placed", |j| counts(j).pending == 0).await;
    let low_job = job(&addr, low).await;
    assert_eq!(counts(&low_job).preempted, 8, "{low_job:?}");
    assert_eq!(counts(&low_job).pending, 8, "evicted sandboxes wait again");
    let old = job(&addr, high_old).await;
    assert_eq!(counts(&old).preempted, 0);
    assert_eq!(counts(&old).running, 16);
    // An equal-priority job finds no victims: it waits.
    let same = submit(&addr, spec(4, 1000, 1, false), "same").await;
    let j = wait_job(&c, &addr, same, "a pending reason", |j| {
        j.pending_reason.contains("CPU")
    })
    .await;
    assert_eq!(counts(&j).pending, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_is_marked_down_and_its_sandboxes_rescheduled() {
    let (mut c, _dir, leader) = cluster(3, &["--node-ttl-ms", "2000"]).await;
    let addr = c.addr(leader).expect("addr");
    c.start_sim_nodes("a", 1, &["--cpus", "8", "--sim-duration-ms", "600000"])
        .expect("nodes");
    wait_nodes_ready(&addr, 1).await;
    let id = submit(&addr, spec(8, 1000, 0, false), "move-me").await;
    wait_job(&c, &addr, id, "running on a-0", |j| counts(j).running == 8).await;
    c.start_sim_nodes("b", 1, &["--cpus", "8", "--sim-duration-ms", "600000"])
        .expect("nodes");
    wait_nodes_ready(&addr, 2).await;
    c.kill_nodes("a");
    // Past the TTL a-0 is down, and the 8 sandboxes run again on b-0.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = surge_client::Client::open(&addr)
            .expect("client")
            .list_nodes()
            .await
            .expect("list");
        let a = nodes.iter().find(|n| n.node_id == "a-0").expect("a-0");
        let b = nodes.iter().find(|n| n.node_id == "b-0").expect("b-0");
        let j = job(&addr, id).await;
        if a.state().name() == "down"
            && a.sandboxes == 0
            && b.sandboxes == 8
            && counts(&j).running == 8
        {
            assert_eq!(j.state().name(), "running");
            break;
        }
        if Instant::now() > deadline {
            dump_logs(&c);
            panic!(
                "not rescheduled: a-0 {} with {}, b-0 with {}; job {j:?}",
                a.state().name(),
                a.sandboxes,
                b.sandboxes
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same idempotency key again: still one job.
    assert_eq!(submit(&addr, spec(8, 1000, 0, false), "move-me").await, id);
}
