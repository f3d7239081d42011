//! A rolling restart of three replicas under write load, as an operator does it (SIGTERM, start
//! again on the data dir, wait until converged, next): a stopping replica never stands for
//! election and a stopping leader hands leadership over, so the restart costs at most one
//! leader change per leader restarted and none per follower; no acknowledged write is lost.
//! Counts, not timings: the watch records every `(term, leader)` any replica reports.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use surge_harness::bench::list_all;
use surge_harness::rolling::{rolling_restart, LeaderWatch, WriteLoad};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_changes_leader_once_per_leader_restarted() {
    let (mut c, _dir, _) = cluster(3, &[]).await;
    let addrs: Vec<String> = c
        .ids()
        .into_iter()
        .map(|id| c.addr(id).expect("addr"))
        .collect();
    // Node daemons hold gRPC streams open (assignment watches) on every replica, as in
    // production: a replica's drain then lasts its full grace, long enough to stand for
    // election in it if nothing stopped it.
    c.start_sim_nodes("n", 8, &["--sim-duration-ms", "600000"])
        .expect("start simulated nodes");
    let watch = LeaderWatch::start(addrs.clone());
    let load = WriteLoad::start(addrs, "roll-", 4);
    // Some writes before the first stop, so that the load is on when it starts.
    let started = std::time::Instant::now();
    while load.acked_count() < 50 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no writes acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steps = match rolling_restart(&mut c, &watch, Some(&load)).await {
        Ok(s) => s,
        Err(e) => {
            dump_logs(&c);
            panic!("rolling restart: {e}");
        }
    };
    let before_end = load.acked_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = load.stop().await;
    let leaders = watch.stop().await;
    eprintln!("leaders by term: {leaders:?}");
    for s in &steps {
        eprintln!(
            "restart of replica {} (leader: {}): new leaders {:?}, terms moved {}, exit after {:?}, longest refused write {:?}",
            s.id, s.was_leader, s.new_leaders, s.terms_moved, s.stop_took, s.longest_refused
        );
    }
    assert_eq!(steps.len(), 3);
    assert!(
        steps.iter().any(|s| s.was_leader),
        "no step restarted the leader: {steps:?}"
    );
    for s in &steps {
        if s.new_leaders.len() > s.allowed_changes() {
            dump_logs(&c);
        }
        assert!(
            s.new_leaders.len() <= s.allowed_changes(),
            "restarting replica {} (leader: {}) brought {} new leaders {:?}; at most {} allowed",
            s.id,
            s.was_leader,
            s.new_leaders.len(),
            s.new_leaders,
            s.allowed_changes()
        );
        // The watch is not blind: a restarted leader has a successor, and it saw it; a
        // restarted follower leaves the same leader in office.
        if s.was_leader {
            assert!(
                !s.new_leaders.is_empty() && s.leader_after != s.id,
                "restarting leader {}: leader afterwards {}, new leaders seen {:?}",
                s.id,
                s.leader_after,
                s.new_leaders
            );
        }
        if !s.was_leader {
            assert_eq!(
                s.leader_after, s.leader_before,
                "restarting follower {} changed the leader",
                s.id
            );
        }
        // The leader handed over: its successor is another replica.
        if s.was_leader {
            assert!(
                s.new_leaders.iter().all(|(_, l)| *l != s.id),
                "replica {} led again after being stopped: {:?}",
                s.id,
                s.new_leaders
            );
        }
    }
    assert!(
        stats.acked.len() > before_end.min(50),
        "the load stopped making progress"
    );

    // Every acknowledged write is there exactly once.
    let leader = wait_leader(&mut c).await;
    c.wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut jobs = surge_client::open::jobs(&c.addr(leader).expect("addr")).expect("client");
    let listed = list_all(&mut jobs, "bench").await.expect("list jobs");
    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for j in &listed {
        by_key
            .entry(j.idempotency_key.as_str())
            .or_default()
            .push(j.id);
    }
    for (key, id) in &stats.acked {
        assert_eq!(
            by_key.get(key.as_str()),
            Some(&vec![*id]),
            "acknowledged write {key} (job {id}) lost or duplicated"
        );
    }
}
