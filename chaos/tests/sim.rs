//! The deterministic simulator: a seed replays exactly, a planted bug is caught with the
//! command that replays it, and a short sweep of seeds is clean (the CI-sized sweep; the long
//! one is `surge chaos sim --seeds 1..10000`).

use surge_chaos::sim::{run_seed, InjectedBug, SimConfig, SimOutcome, SweepReport};

fn short() -> SimConfig {
    SimConfig {
        fault_phase_ms: 6_000,
        ..SimConfig::default()
    }
}

fn explain(o: &SimOutcome) -> String {
    o.violations
        .iter()
        .map(|v| format!("{}: {}", v.checker, v.message))
        .collect::<Vec<_>>()
        .join("; ")
        + &format!(" (replay: {})", o.replay)
}

#[test]
fn a_seed_replays_exactly_and_seeds_differ() {
    let cfg = short();
    let a = run_seed(3, &cfg).expect("runs");
    let b = run_seed(3, &cfg).expect("runs");
    let c = run_seed(4, &cfg).expect("runs");
    assert_eq!(a.digest, b.digest, "seed 3 did not replay exactly");
    assert_eq!(a.history.events, b.history.events);
    assert_ne!(a.digest, c.digest, "seeds 3 and 4 ran identically");
    // The run did something worth replaying.
    assert!(
        a.ops_ok > 0 && a.network.messages > 100,
        "{} ok ops, {} messages",
        a.ops_ok,
        a.network.messages
    );
    // The one-live-node-per-sandbox checker had assignments to look at.
    let looked: u64 = a
        .history
        .events
        .iter()
        .filter_map(|e| match &e.op {
            surge_chaos::history::Op::ReadAssignments { checked, .. } => Some(*checked),
            _ => None,
        })
        .sum();
    assert!(looked > 0, "no sandbox assignments were sampled");
}

#[test]
fn a_planted_bug_is_caught_with_its_replay_command() {
    let cfg = SimConfig {
        inject: Some(InjectedBug::LoseAcknowledgedJob),
        ..short()
    };
    let o = run_seed(5, &cfg).expect("runs");
    let names: Vec<&str> = o.violations.iter().map(|v| v.checker.as_str()).collect();
    assert!(names.contains(&"acknowledged_once"), "{}", explain(&o));
    assert!(names.contains(&"converged"), "{}", explain(&o));
    assert!(
        o.replay.contains("--seeds 5..6") && o.replay.contains("--inject"),
        "{}",
        o.replay
    );
    // The same seed without the bug is clean: the checkers caught the bug, not the run.
    let clean = run_seed(5, &short()).expect("runs");
    assert!(clean.violations.is_empty(), "{}", explain(&clean));
}

/// The short sweep CI runs; `surge chaos sim --seeds 1..10000` is the long one.
#[test]
fn short_sweep_is_clean() {
    let cfg = short();
    let mut report = SweepReport::default();
    for seed in 1..=30 {
        let o = run_seed(seed, &cfg).expect("runs");
        assert!(o.violations.is_empty(), "seed {seed}: {}", explain(&o));
        report.add(&o);
    }
    let kind = |k: &str| report.faults.get(k).copied().unwrap_or(0);
    assert!(
        kind("crash") > 5 && kind("partition") > 5,
        "{:?}",
        report.faults
    );
    assert!(report.ops_ok > 100, "{} ok ops", report.ops_ok);
}
