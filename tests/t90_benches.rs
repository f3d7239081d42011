//! CI-sized runs of every `surge bench`, so the benchmarks cannot rot. They check that each bench
//! runs end to end and reports sane numbers — never how fast (that is BENCHMARKS.md's job).

mod common;

use std::process::Command;

use common::bin;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .arg("bench")
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run surge bench");
    assert!(
        out.status.success(),
        "surge bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench output is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn burst_bench_places_runs_and_releases() {
    let r = bench(&[
        "burst",
        "--nodes",
        "20",
        "--node-cpus",
        "16",
        "--sandboxes",
        "300",
        "--runs",
        "2",
        "--nodes-per-process",
        "10",
    ]);
    assert_eq!(r["sandboxes"], 300);
    assert_eq!(r["runs"], 2);
    let placed = r["placed_s"]["p50"].as_f64().expect("placed_s");
    let running = r["running_s"]["p50"].as_f64().expect("running_s");
    assert!(placed > 0.0 && running >= placed, "{r}");
    assert!(r["scheduler_rss_mib"].as_f64().expect("rss") > 1.0, "{r}");
}

#[test]
fn raft_bench_commits_without_errors() {
    let r = bench(&[
        "raft",
        "--requests",
        "300",
        "--concurrency",
        "8",
        "--runs",
        "1",
    ]);
    assert_eq!(r["errors"], 0);
    assert!(r["ops_per_s"].as_f64().expect("ops") > 0.0, "{r}");
    assert!(
        r["p99_ms"].as_f64().expect("p99") >= r["p50_ms"].as_f64().expect("p50"),
        "{r}"
    );
    // scripts/setup installs etcd-server, so the side-by-side run happens here too.
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok()
    {
        let etcd = &r["etcd"];
        assert_eq!(etcd["errors"], 0, "{r}");
        assert!(etcd["ops_per_s"].as_f64().expect("etcd ops") > 0.0, "{r}");
        assert!(etcd["version"].as_str().is_some(), "{r}");
        assert!(
            r["surge_vs_etcd_throughput"].as_f64().expect("ratio") > 0.0,
            "{r}"
        );
    } else {
        eprintln!("etcd is not installed: the side-by-side half of the raft bench is skipped");
        assert!(r["etcd"].is_null(), "{r}");
    }
}

#[test]
fn failover_bench_loses_nothing() {
    let r = bench(&["failover", "--runs", "2", "--writers", "2"]);
    assert_eq!(r["kills"], 2);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    assert!(r["acked_writes"].as_u64().expect("acked") > 0, "{r}");
}
