//! The simulator runs the production leader core: a bug planted in that core (not in a copy)
//! must turn a clean sweep into a failing one.

use super::*;

/// The seeds both sweeps run. Each run is a few simulated seconds of faults and workload.
const SEEDS: std::ops::Range<u64> = 1..4;

fn failed(cfg: &SimConfig) -> (Vec<u64>, Vec<String>) {
    let report = sweep(SEEDS, cfg, false, |_| {}).expect("the simulation runs");
    assert_eq!(report.seeds, SEEDS.end - SEEDS.start);
    let checkers = report
        .first_failure
        .map(|f| f.violations.into_iter().map(|v| v.checker).collect())
        .unwrap_or_default();
    (report.failed_seeds, checkers)
}

#[test]
fn a_stale_quiet_planner_in_the_leader_core_fails_the_sweep() {
    let (clean, checkers) = failed(&SimConfig::default());
    assert!(clean.is_empty(), "without the bug: {clean:?} {checkers:?}");

    let cfg = SimConfig {
        inject: Some(InjectedBug::StaleQuietPlanner),
        ..SimConfig::default()
    };
    let (dirty, checkers) = failed(&cfg);
    assert!(!dirty.is_empty(), "the planted planner bug went unnoticed");
    assert!(
        checkers.iter().any(|c| c == "liveness"),
        "jobs left pending show as a liveness violation: {checkers:?}"
    );
}

#[test]
fn oversized_starts_in_the_node_core_fail_the_sweep() {
    let cfg = SimConfig {
        inject: Some(InjectedBug::NodeOversizedStarts),
        ..SimConfig::default()
    };
    let (dirty, checkers) = failed(&cfg);
    assert!(!dirty.is_empty(), "the planted node bug went unnoticed");
    assert!(
        checkers.iter().any(|c| c == "no_overcommit"),
        "doubled reservations show as overcommitted nodes: {checkers:?}"
    );
}

#[test]
fn bugs_parse_by_their_replay_names() {
    for bug in InjectedBug::ALL {
        let parsed: InjectedBug = bug.name().parse().expect("a known name");
        assert_eq!(parsed, bug);
        let cfg = SimConfig {
            inject: Some(bug),
            ..SimConfig::default()
        };
        assert!(replay_command(3, &cfg).ends_with(&format!("--inject {}", bug.name())));
    }
    assert!("no-such-bug".parse::<InjectedBug>().is_err());
}
