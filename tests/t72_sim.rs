//! `surge chaos sim`: the deterministic simulator from the command line. A seed replays exactly
//! across processes (each process seeds its hash maps and tokio differently, so this is the
//! check that no such source leaks into a run); a planted bug fails the command with the line
//! that replays it; the real-process `surge chaos` keeps its flags.

use std::process::Command;

fn surge(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_surge"))
        .args(args)
        .output()
        .expect("run surge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `seed -> digest` from the per-seed lines of a short sweep.
fn digests(stderr: &str) -> Vec<(u64, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("seed ")?;
            let (seed, rest) = rest.split_once(": ok, digest ")?;
            Some((seed.parse().ok()?, rest.trim().to_string()))
        })
        .collect()
}

#[test]
fn a_sweep_passes_and_reports_json() {
    let (ok, stdout, stderr) = surge(&["chaos", "sim", "--seeds", "1..4", "-o", "json"]);
    assert!(ok, "sweep failed:\n{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["seeds"], 3, "{v}");
    assert_eq!(v["verdict"], "pass", "{v}");
    assert_eq!(v["failed_seeds"], serde_json::json!([]), "{v}");
    assert!(
        v["seeds_per_second"].as_f64().is_some_and(|s| s > 0.0),
        "{v}"
    );
    assert!(v["ops_ok"].as_u64().is_some_and(|n| n > 0), "{v}");
}

#[test]
fn a_seed_replays_exactly_in_another_process() {
    let (ok1, _, err1) = surge(&["chaos", "sim", "--seeds", "7..=8"]);
    let (ok2, _, err2) = surge(&["chaos", "sim", "--seeds", "7..=8"]);
    assert!(ok1 && ok2, "{err1}\n{err2}");
    let (a, b) = (digests(&err1), digests(&err2));
    assert_eq!(a.len(), 2, "{err1}");
    assert_eq!(a, b, "the same seeds gave different runs");
    assert_ne!(a[0].1, a[1].1, "seeds 7 and 8 ran identically");
}

#[test]
fn a_planted_bug_fails_with_its_replay_command() {
    let (ok, stdout, stderr) = surge(&[
        "chaos",
        "sim",
        "--seeds",
        "5..6",
        "--inject",
        "lose-acknowledged-job",
    ]);
    assert!(!ok, "a lost job went unnoticed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("acknowledged_once"), "{stdout}");
    assert!(
        stderr.contains("replay")
            && stderr.contains("surge chaos sim --seeds 5..6 --inject lose-acknowledged-job"),
        "{stderr}"
    );
}

#[test]
fn five_replicas_sweep_clean() {
    let (ok, stdout, stderr) = surge(&[
        "chaos",
        "sim",
        "--seeds",
        "1..3",
        "--replicas",
        "5",
        "-o",
        "json",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["verdict"], "pass", "{v}");
    assert_eq!(v["seeds"], 2, "{v}");
}

#[test]
fn bad_seed_ranges_are_refused() {
    let (ok, _, stderr) = surge(&["chaos", "sim", "--seeds", "9..3"]);
    assert!(!ok);
    assert!(stderr.contains("holds no seed"), "{stderr}");
}
