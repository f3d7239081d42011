//! Membership changes at run time: 3 -> 5 -> 3 replicas while submissions continue.

mod common;

use std::time::Duration;

use common::*;
use surge_client::open as client;
use surge_harness::cluster::StartMode;
use surge_proto::cluster::{RemoveMemberRequest, StatusRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_to_three_under_load() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    let seed = c.addr(leader).expect("addr");
    let target = c.addr(1).expect("addr");
    let keys: Vec<String> = (0..600).map(|i| format!("m-{i}")).collect();
    let load =
        tokio::spawn(async move { submit_all(&target, keys, 4, Duration::from_secs(120)).await });

    for id in [4, 5] {
        c.plan(id, None).expect("plan");
        c.start(id, StartMode::Join(seed.clone()))
            .expect("start joiner");
    }
    let five = wait_members(&c, 1, 5).await;
    assert!(five.iter().all(|m| m.voter), "{five:?}");

    // Remove two of the original replicas (the leader among them, if it is 2 or 3).
    for id in [2, 3] {
        let mut cl = client::cluster(&c.addr(1).expect("addr")).expect("client");
        cl.remove_member(RemoveMemberRequest { id })
            .await
            .unwrap_or_else(|e| {
                dump_logs(&c);
                panic!("remove {id}: {e}")
            });
        c.stop(id, Duration::from_secs(5)).expect("stop");
    }
    let three = wait_members(&c, 1, 3).await;
    let ids: Vec<u64> = three.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![1, 4, 5]);

    let acked = load.await.expect("load");
    assert_eq!(acked.len(), 600);
    c.wait_converged(&[1, 4, 5], Duration::from_secs(30))
        .await
        .expect("converged");
    for id in [1, 4, 5] {
        assert_all_present_once(&c.addr(id).expect("addr"), &acked).await;
    }
}

async fn wait_members(
    c: &surge_harness::cluster::LocalCluster,
    via: u64,
    n: usize,
) -> Vec<surge_proto::cluster::Member> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut cl = client::cluster(&c.addr(via).expect("addr")).expect("client");
        if let Ok(s) = cl.status(StatusRequest {}).await {
            let s = s.into_inner();
            if s.members.len() == n && s.members.iter().all(|m| m.voter) {
                return s.members;
            }
        }
        if std::time::Instant::now() > deadline {
            dump_logs(c);
            panic!("membership never reached {n} voters");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
