//! Chaos: real replicas and node daemons, a concurrent workload, faults on a seeded schedule, and
//! the checkers of `surge_chaos::checker` over the recorded history. A failure prints the
//! violations and the command that replays the run.

mod common;

use std::time::Duration;

use surge_chaos::faults::{self, FaultKind};
use surge_chaos::history::{EventType, History, Op};
use surge_chaos::run::{self, ChaosConfig, Report};

fn config(seed: u64, kinds: &str, duration: Duration) -> ChaosConfig {
    let mut cfg = ChaosConfig::new(common::bin(), seed);
    cfg.duration = duration;
    cfg.faults = faults::parse_kinds(kinds).expect("fault kinds");
    cfg.keep = std::env::var_os("SURGE_TEST_KEEP").is_some();
    cfg
}

fn replay(cfg: &ChaosConfig) -> String {
    let kinds: Vec<&str> = cfg.faults.iter().map(|k| FaultKind::name(*k)).collect();
    format!(
        "surge chaos --seed {} --duration {}s --faults {} --replicas {} --nodes {} --container-nodes {} --node-ttl-ms {}",
        cfg.seed,
        cfg.duration.as_secs(),
        kinds.join(","),
        cfg.replicas,
        cfg.nodes,
        cfg.container_nodes,
        cfg.node_ttl_ms
    )
}

/// `SURGE_CHAOS_SEED` when set (to rerun a failure), else the test's own seed.
fn seed_or(default: u64) -> u64 {
    std::env::var("SURGE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn messages(report: &Report) -> Vec<&String> {
    report.violations.iter().map(|v| &v.message).collect()
}

/// Every checker passed; otherwise the violations and the command that replays the run.
fn assert_clean(report: &Report, replay: &str) {
    assert!(
        report.violations.is_empty(),
        "{} violation(s): {:?}\nreplay: {replay}",
        report.violations.len(),
        messages(report)
    );
}

/// One chaos run at a time: each is a whole cluster with its own faults, and two sharing a
/// 2-core machine would mostly measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_and_check(cfg: ChaosConfig) -> Report {
    run_and_check_history(cfg).await.0
}

async fn run_and_check_history(cfg: ChaosConfig) -> (Report, History) {
    let _turn = ONE_AT_A_TIME.lock().await;
    eprintln!("replay: {}", replay(&cfg));
    let (report, history) = run::run(&cfg).await.expect("chaos run");
    eprintln!(
        "{} faults {:?}; {} ok / {} fail / {} info operations; {} keys acknowledged; {} ms",
        report.faults_total,
        report.faults,
        report.operations.ok,
        report.operations.fail,
        report.operations.info,
        report.operations.submissions_acknowledged,
        report.elapsed_ms
    );
    for v in &report.violations {
        eprintln!(
            "VIOLATION {} ({}x): {}\n{}",
            v.checker,
            v.count,
            v.message,
            serde_json::to_string_pretty(&v.counterexample).unwrap_or_default()
        );
    }
    (report, history)
}

/// The CI run: about a minute of replica kills (leader and followers), SIGSTOP pauses and
/// restarts under a submitting and cancelling workload; every checker must pass.
///
/// `wipe` and `nodes` have their own runs below (the regressions of the two bugs they found), so
/// this one stays within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_pauses_and_restarts_lose_no_acknowledged_job() {
    let seed = seed_or(70);
    let cfg = config(seed, "kill,pause,restart", Duration::from_secs(60));
    let replay = replay(&cfg);
    let report = run_and_check(cfg).await;
    assert!(
        report.faults_total >= 10,
        "only {} faults injected: {:?}",
        report.faults_total,
        report.faults
    );
    assert!(
        report.operations.submissions_acknowledged >= 100,
        "too little workload to judge: {:?}",
        report.operations
    );
    // `one_live_node_per_sandbox` judged real samples, not an empty history.
    assert!(
        report.operations.assignment_samples >= 10 && report.operations.assignments_checked > 0,
        "too few holding samples: {:?}",
        report.operations
    );
    assert_clean(&report, &replay);
}

/// Partitions between replicas — the leader isolated, a minority cut off, a bridge replica that
/// alone sees both halves — mixed with leader kills, each replica on its own network namespace.
/// A deposed leader cut off from its peers must not acknowledge a write; every checker must pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lose_no_acknowledged_job() {
    if !surge_harness::netns::available() {
        surge_node::testing::unavailable("partitions need network namespaces, which need root");
        return;
    }
    let seed = seed_or(71);
    let cfg = config(seed, "partition,kill", Duration::from_secs(45));
    let replay = replay(&cfg);
    let report = run_and_check(cfg).await;
    assert!(
        report.faults.get("partition").copied().unwrap_or(0) >= 4,
        "only {:?} faults injected",
        report.faults
    );
    assert_clean(&report, &replay);
}

/// Regression, found by `surge chaos --seed 3 --duration 30s --faults wipe` (fixed: an empty
/// replica now refuses cluster calls at once, see raft/src/service.rs): the leader is wiped and restarted
/// with `--join`. The joining replica asks the seed to remove its old id; the seed forwards the
/// request to the leader it last knew, which is the wiped replica itself (same address, empty,
/// gate closed, knows no leader). The call hangs for ADD_MEMBER_TIMEOUT (120 s), the join fails
/// and the replica exits: the cluster is left with two of three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_leader_rejoins() {
    let report = run_and_check(config(3, "wipe", Duration::from_secs(30))).await;
    assert!(report.violations.is_empty(), "{:?}", messages(&report));
}

/// Regression, found by `surge chaos --seed 2 --duration 60s --faults all --node-ttl-ms 2000`
/// (fixed: `Job::keep_gang_whole` in state.rs requeues the whole gang): when a node
/// holding part of a gang is marked down (or its daemon restarts without the sandbox), the
/// state machine reschedules the lost sandboxes one by one (`reschedule` in `state.rs`) while the
/// rest of the gang keeps running: the gang is partly running until the lost part is placed
/// again, and indefinitely if it does not fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_stays_whole_when_its_nodes_die() {
    let mut cfg = config(2, "nodes", Duration::from_secs(60));
    cfg.node_ttl_ms = 2000;
    let report = run_and_check(cfg).await;
    assert!(
        !report
            .violations
            .iter()
            .any(|v| v.checker == "gang_all_or_nothing"),
        "{:?}",
        messages(&report)
    );
}

/// Real node daemons on the container runtime beside the simulated nodes: small real jobs
/// constrained to them, and the `nodes` fault killing (`kill -9`, restart) or freezing (SIGSTOP,
/// past the 2 s TTL some of the time) their daemons, among leader and follower kills. Their
/// sandboxes must really run (some succeed), every checker must pass on them, the sampler must
/// have seen which live node holds which sandbox (including the containers crun runs, so
/// `one_live_node_per_sandbox` is not vacuous), and nothing of the run (container, shim, mount,
/// cgroup) may be left on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_nodes_survive_kills_and_freezes() {
    if let Err(why) = surge_harness::containers::usable() {
        surge_node::testing::unavailable(&format!("container nodes need root and crun: {why}"));
        return;
    }
    let mut cfg = config(seed_or(76), "nodes,kill", Duration::from_secs(40));
    cfg.container_nodes = 2;
    cfg.node_ttl_ms = 2000;
    let replay = replay(&cfg);
    let (report, history) = run_and_check_history(cfg).await;
    let container_faults: Vec<&str> = history
        .events
        .iter()
        .filter_map(|e| match (&e.op, e.kind) {
            (Op::Fault { target, detail, .. }, EventType::Invoke) if target.starts_with("ctr-") => {
                Some(detail.as_str())
            }
            _ => None,
        })
        .collect();
    eprintln!(
        "container node faults: {container_faults:?}; {:?}",
        report.containers
    );
    assert!(
        !container_faults.is_empty(),
        "no fault hit a container node: {:?}\nreplay: {replay}",
        report.faults
    );
    assert!(
        report.containers.succeeded >= 10,
        "container sandboxes did not run: {:?}\nreplay: {replay}",
        report.containers
    );
    let o = &report.operations;
    assert!(
        o.assignment_samples >= 20 && o.container_runs_seen > 0,
        "the holdings sampler saw too little: {o:?}\nreplay: {replay}"
    );
    assert!(
        report.containers.leftovers.is_empty(),
        "{:?}",
        report.containers.leftovers
    );
    // Independently of the harness's own count: no cgroup and no mount of this run's nodes.
    let prefix = format!("ctr-{}-", std::process::id());
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup fs")
        .flatten()
    {
        if let Ok(nodes) = std::fs::read_dir(controller.path().join("surge")) {
            for n in nodes.flatten() {
                assert!(
                    !n.file_name().to_string_lossy().starts_with(&prefix),
                    "cgroup {} left behind",
                    n.path().display()
                );
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(&format!("nodes-{prefix}")),
        "a mount of the run's container nodes is left"
    );
    assert_clean(&report, &replay);
}
