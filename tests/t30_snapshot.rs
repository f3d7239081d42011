//! Snapshots and log compaction; a wiped replica catches up by snapshot.

mod common;

use std::time::Duration;

use common::*;
use surge_harness::cluster::StartMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_catches_up_by_snapshot() {
    // Snapshot every 100 entries and keep only 10 behind it, so the log is compacted quickly.
    let (mut c, _dir, leader) =
        cluster(3, &["--snapshot-every", "100", "--logs-to-keep", "10"]).await;
    let victim = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    let addr = c.addr(leader).expect("addr");

    let first: Vec<String> = (0..300).map(|i| format!("s-{i}")).collect();
    let mut acked = submit_all(&addr, first, 16, Duration::from_secs(60)).await;
    c.wait_converged(&c.ids(), Duration::from_secs(30))
        .await
        .expect("converged");

    c.kill(victim).expect("kill");
    c.wipe(victim).expect("wipe");
    // More writes while it is gone, until the log it missed is compacted away on the others.
    // One at a time: concurrent submissions share entries (group commit), and what counts here
    // is entries.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut next = 300;
    loop {
        let more: Vec<String> = (next..next + 50).map(|i| format!("s-{i}")).collect();
        next += 50;
        acked.extend(submit_all(&addr, more, 1, Duration::from_secs(60)).await);
        let leader_status = c.status(leader).await.expect("status");
        if leader_status.snapshot_index > 0 && leader_status.purged_index > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leader never snapshotted and compacted its log: {leader_status:?}"
        );
    }

    c.start(victim, StartMode::Join(addr.clone()))
        .expect("restart wiped replica");
    c.wait_converged(&c.ids(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| {
            dump_logs(&c);
            panic!("{e}")
        });
    assert_all_present_once(&c.addr(victim).expect("addr"), &acked).await;

    // It got there through a snapshot: the installed-snapshot counter on its /metrics says so.
    let http = c.replica(victim).expect("replica").http.clone();
    let metrics = http_get(&http, "/metrics").await;
    let installed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("surge_raft_snapshots_installed_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(installed >= 1, "no snapshot installed; metrics:\n{metrics}");
}

/// A plain HTTP/1.0 GET on loopback (no HTTP client dependency for one call).
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}
