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
    // The bench holds its figures against surge's goals and says which it met.
    let goal = &r["goals"]["placed"];
    assert_eq!(goal["limit_s"], 1.0, "{r}");
    assert_eq!(goal["measured_s"], r["placed_s"]["p50"], "{r}");
    assert!(goal["met"].is_boolean(), "{r}");
}

/// `--profile` records the leader with perf during the burst and writes its report. Runs where
/// `perf` is installed and may record (this project's CI has no perf: skipped there, saying so).
#[test]
fn burst_bench_profiles_the_leader() {
    let perf_works = Command::new("perf")
        .args(["record", "-o", "/dev/null", "--", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !perf_works {
        eprintln!("skipped: `perf record` is not available here");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let profile = dir.path().to_str().expect("utf-8 path");
    bench(&[
        "burst",
        "--nodes",
        "4",
        "--node-cpus",
        "16",
        "--sandboxes",
        "40",
        "--runs",
        "1",
        "--nodes-per-process",
        "4",
        "--profile",
        profile,
    ]);
    let report = std::fs::read_to_string(dir.path().join("leader-run-1.txt")).expect("report");
    assert!(
        report
            .lines()
            .any(|l| l.contains('%') && !l.starts_with('#')),
        "a report with samples of the surge leader:\n{report}"
    );
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
        surge_node::testing::unavailable(
            "etcd is not installed (scripts/setup installs etcd-server): the side-by-side half of the raft bench cannot run",
        );
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
    // The same kills against etcd when it is installed: one figure per kill.
    if surge_harness::etcd::find_binary().is_some() {
        let etcd = &r["etcd"]["first_write_ms"];
        assert_eq!(etcd.as_array().map(Vec::len), Some(2), "{r}");
    } else {
        assert!(r["etcd"].is_null(), "{r}");
    }
}
