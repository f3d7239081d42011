//! Three replicas as real processes: election, replication through a follower, kill -9 failover.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_through_a_follower_survive_leader_kill() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");

    // 1,000 submissions through a follower: all applied on every replica.
    let keys: Vec<String> = (0..1000).map(|i| format!("a-{i}")).collect();
    let acked = submit_all(
        &c.addr(follower).expect("addr"),
        keys,
        32,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(acked.len(), 1000);
    let converged = c
        .wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // 32 concurrent submitters share log entries (group commit, `service::batch`): the 1,000
    // jobs took fewer entries than jobs.
    assert!(
        converged.applied_index < 1000,
        "1,000 concurrent submissions took {} entries: nothing was batched",
        converged.applied_index
    );
    for id in c.ids() {
        let addr = c.addr(id).expect("addr");
        assert_eq!(jobs_on(&addr).await.len(), 1000, "replica {id}");
        assert_all_present_once(&addr, &acked).await;
    }

    // kill -9 the leader while submissions continue; retries of the same keys after the kill
    // must not create second jobs.
    let survivors: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    let target = c.addr(survivors[0]).expect("addr");
    let during: Vec<String> = (0..300).map(|i| format!("b-{i}")).collect();
    let load = tokio::spawn({
        let target = target.clone();
        async move { submit_all(&target, during, 8, Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(leader).expect("kill leader");
    let new_leader = wait_leader(&mut c).await;
    assert_ne!(new_leader, leader);
    // The survivors found the leader's port closed (raft/src/node/gone.rs) instead of only
    // waiting out their timers; one of them stood as the leases ended.
    let noticed = survivors
        .iter()
        .filter(|id| {
            c.log_tail(**id, 100_000)
                .contains("the leader's port is closed")
        })
        .count();
    assert!(noticed > 0, "no survivor noticed the leader's closed port");
    let mut all = acked.clone();
    all.extend(load.await.expect("load"));
    // A client that never saw its ack retries: same key, same job.
    let retried: Vec<String> = (250..300)
        .map(|i| format!("b-{i}"))
        .chain((0..50).map(|i| format!("a-{i}")))
        .collect();
    let again = submit_all(&target, retried, 4, Duration::from_secs(30)).await;
    for (k, id) in &again {
        assert_eq!(all.get(k), Some(id), "retry of {k} created another job");
    }
    for id in &survivors {
        assert_all_present_once(&c.addr(*id).expect("addr"), &all).await;
    }
    assert_eq!(jobs_on(&target).await.len(), 1300);

    // The killed replica comes back on its data dir and converges.
    c.start(leader, surge_harness::cluster::StartMode::Resume)
        .expect("restart");
    c.wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| {
            dump_logs(&c);
            panic!("{e}")
        });
    assert_all_present_once(&c.addr(leader).expect("addr"), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_all_replicas_keeps_identical_state() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let keys: Vec<String> = (0..200).map(|i| format!("r-{i}")).collect();
    let acked = submit_all(
        &c.addr(leader).expect("addr"),
        keys,
        16,
        Duration::from_secs(60),
    )
    .await;
    let before = c
        .wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .expect("converged");

    c.stop_all(Duration::from_secs(5));
    for id in c.ids() {
        c.start(id, surge_harness::cluster::StartMode::Resume)
            .expect("restart");
    }
    wait_leader(&mut c).await;
    // A leader's first act in a new term is a blank entry: compare the application state hash,
    // which only commands change.
    let after = c
        .wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .expect("converged");
    assert_eq!(after.state_hash, before.state_hash);
    assert!(after.applied_index >= before.applied_index);
    for id in c.ids() {
        assert_all_present_once(&c.addr(id).expect("addr"), &acked).await;
    }
}

/// The CLI, pointed at a follower whose leader has just died, neither fails nor blames the
/// follower: reads on a follower ask the leader for a read index, and while there is none the
/// follower answers "unavailable"; the client retries until a new leader answers. With a list of
/// replicas, a dead first replica is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rides_out_a_leader_kill_and_names_the_replica_that_failed() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let via = c.addr(follower).expect("addr");
    let dead = c.addr(leader).expect("addr");
    c.kill(leader).expect("kill the leader");
    let listed = surge_ok(&["jobs", "-o", "json", "--server", &via]);
    assert!(listed.trim_start().starts_with('['), "{listed}");
    // A list whose first replica is dead: the call goes on to the next one.
    let servers = format!("{dead},{via}");
    let status = surge_ok(&["status", "-o", "json", "--server", &servers]);
    assert!(status.contains("\"leader\""), "{status}");
    // The dead replica alone: the error names it and says it cannot be reached.
    let out = std::process::Command::new(bin())
        .args(["status", "--server", &dead])
        .output()
        .expect("run surge");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains(&format!("cannot reach a surge replica at {dead}")),
        "{said}"
    );
}
