//! Exec and files through the replicas, end to end: real replicas, simulated nodes serving the
//! node I/O service over gRPC (the container runtime's own tests cover real processes).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use surge_client::io::Exec;
use surge_client::Client;
use surge_proto::jobs as pb;

/// A running sandbox on simulated nodes whose execs print `out_bytes` bytes after 5 ms.
async fn running_sandbox(
    out_bytes: usize,
) -> (
    surge_harness::cluster::LocalCluster,
    tempfile::TempDir,
    u64,
    u64,
) {
    let (mut c, dir, leader) = cluster(3, &[]).await;
    let out = out_bytes.to_string();
    c.start_sim_nodes(
        "n",
        2,
        &[
            "--sim-duration-ms",
            "600000",
            "--sim-exec-ms",
            "5",
            "--sim-exec-output-bytes",
            &out,
        ],
    )
    .expect("nodes");
    let addr = c.addr(leader).expect("addr");
    let id = submit_spec(
        &addr,
        pb::JobSpec {
            count: 4,
            cpu_millis: 100,
            memory_mib: 64,
            template: "busybox".into(),
            command: vec!["sleep".into(), "600".into()],
            tenant: "t".into(),
            ..Default::default()
        },
        "io",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = get_job(&addr, id).await;
        if j.counts.unwrap_or_default().running == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "never running: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (c, dir, leader, id)
}

fn follower(c: &surge_harness::cluster::LocalCluster, leader: u64) -> String {
    let f = c
        .ids()
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    c.addr(f).expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_files_work_through_a_follower() {
    let (c, _dir, leader, job) = running_sandbox(1024).await;
    let via = Client::open(&follower(&c, leader)).expect("client");
    // Exec: the node's output comes back whole, with the exit status.
    let r = via
        .exec_output(job, 0, &Exec::new(["true"]), None, 1 << 20)
        .await
        .expect("exec");
    assert_eq!(r.exit.exit_code, 0);
    assert_eq!(r.stdout.len(), 1024);
    // stdin streams in: the simulated `cat` echoes it.
    let r = via
        .exec_output(
            job,
            1,
            &Exec::new(["cat"]),
            Some(Bytes::from_static(b"hello")),
            1 << 20,
        )
        .await
        .expect("exec cat");
    assert_eq!(r.stdout, b"hello");
    // Files: write, read back, list.
    via.write_file_bytes(job, 2, "/work/a.txt", Bytes::from_static(b"data"), 0o600)
        .await
        .expect("write");
    let back = via
        .read_file_bytes(job, 2, "/work/a.txt", 1 << 20)
        .await
        .expect("read");
    assert_eq!(back, b"data");
    let listing = via.list_dir(job, 2, "/work").await.expect("list");
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(listing.entries[0].name, "a.txt");
    // Another sandbox does not share the file.
    let err = via
        .read_file_bytes(job, 3, "/work/a.txt", 1 << 20)
        .await
        .expect_err("not in 3");
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_exec_calls_get_clear_errors() {
    let (c, _dir, leader, job) = running_sandbox(0).await;
    let addr = c.addr(leader).expect("addr");
    let cl = Client::open(&addr).expect("client");
    let missing = cl
        .exec_output(job + 100, 0, &Exec::new(["true"]), None, 1024)
        .await
        .expect_err("no such job");
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
    assert!(missing.to_string().contains("no job"), "{missing}");
    let beyond = cl
        .exec_output(job, 99, &Exec::new(["true"]), None, 1024)
        .await
        .expect_err("no such index");
    assert!(beyond.to_string().contains("there is no"), "{beyond}");
    let mut zero = Exec::new(["true"]);
    zero.timeout = Some(Duration::ZERO);
    let e = cl
        .exec_output(job, 0, &zero, None, 1024)
        .await
        .expect_err("timeout 0");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let e = cl
        .exec_output(job, 0, &Exec::new(["a\0b"]), None, 1024)
        .await
        .expect_err("NUL");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let e = cl
        .read_file_bytes(job, 0, "relative/path", 1024)
        .await
        .expect_err("relative");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // Over the argument cap; a permission mode that is not one; a tar stream that is not one.
    let many: Vec<String> = (0..5_000).map(|i| i.to_string()).collect();
    let e = cl
        .exec_output(job, 0, &Exec::new(many), None, 1024)
        .await
        .expect_err("too many arguments");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let start = surge_proto::sandbox::WriteFileStart {
        sandbox: surge_client::io::sandbox(job, 0),
        path: "/w/x".into(),
        mode: 0o17777,
        make_parents: true,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let e = cl.write_file(start, rx).await.expect_err("bad mode");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Bytes::from_static(b"this is not a tar archive"))
        .await
        .expect("queue");
    drop(tx);
    let e = cl.upload(job, 0, "/w", rx).await.expect_err("not a tar");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // A stopped sandbox takes no exec, and says why.
    cl.update_sandboxes(pb::UpdateSandboxesRequest {
        job_id: job,
        first_index: 1,
        count: 1,
        action: pb::SandboxAction::Stop as i32,
        ..Default::default()
    })
    .await
    .expect("stop");
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        match cl
            .exec_output(job, 1, &Exec::new(["true"]), None, 1024)
            .await
        {
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => break e,
            other => {
                assert!(Instant::now() < deadline, "still exec-able: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(e.to_string().contains("1"), "{e}");
    // The others are unharmed.
    let ok = cl
        .exec_output(job, 0, &Exec::new(["true"]), None, 1024)
        .await
        .expect("exec 0");
    assert_eq!(ok.exit.exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_execs_and_copies() {
    let (c, dir, leader, job) = running_sandbox(3).await;
    let addr = c.addr(leader).expect("addr");
    let out = std::process::Command::new(bin())
        .args(["exec", "--server", &addr, &format!("{job}.0"), "--", "true"])
        .output()
        .expect("surge exec");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"xxx");
    let timed_out = std::process::Command::new(bin())
        .args([
            "exec",
            "--server",
            &addr,
            "--timeout",
            "1ms",
            &format!("{job}.0"),
            "--",
            "true",
        ])
        .output()
        .expect("surge exec");
    assert_eq!(timed_out.status.code(), Some(124), "{timed_out:?}");
    assert!(String::from_utf8_lossy(&timed_out.stderr).contains("timeout"));
    let missing = std::process::Command::new(bin())
        .args(["exec", "--server", &addr, "999.0", "--", "true"])
        .output()
        .expect("surge exec");
    assert_eq!(missing.status.code(), Some(125), "{missing:?}");
    // A directory up and back down.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("sub/f.txt"), b"payload").expect("write");
    surge_ok(&[
        "cp",
        "--server",
        &addr,
        src.to_str().expect("utf8"),
        &format!("{job}.1:/work/repo"),
    ]);
    let back = dir.path().join("back");
    surge_ok(&[
        "cp",
        "--server",
        &addr,
        &format!("{job}.1:/work/repo"),
        back.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::read(back.join("sub/f.txt")).expect("read back"),
        b"payload"
    );
    // A single file down.
    let one = dir.path().join("one.txt");
    surge_ok(&[
        "cp",
        "--server",
        &addr,
        &format!("{job}.1:/work/repo/sub/f.txt"),
        one.to_str().expect("utf8"),
    ]);
    assert_eq!(std::fs::read(&one).expect("read"), b"payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_execs_and_moves_files() {
    let (c, _dir, leader, job) = running_sandbox(4).await;
    let f = c
        .ids()
        .into_iter()
        .find(|i| *i != leader)
        .expect("follower");
    let http_addr = c.replica(f).expect("replica").http.clone();
    let json = "application/json";
    let base = format!("/v1/jobs/{job}/sandboxes/0");
    let (code, body) = http(
        &http_addr,
        "POST",
        &format!("{base}/exec"),
        json,
        br#"{"command": ["true"], "timeout_ms": 5000}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["stdout"], "xxxx", "{v}");
    let (code, body) = http(
        &http_addr,
        "PUT",
        &format!("{base}/files?path=/w/x.txt&mode=600"),
        "application/octet-stream",
        b"file body",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(
        &http_addr,
        "GET",
        &format!("{base}/files?path=/w/x.txt"),
        json,
        b"",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "file body"));
    let (code, body) = http(&http_addr, "GET", &format!("{base}/dir?path=/w"), json, b"").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["entries"][0]["name"], "x.txt", "{v}");
    // Errors are JSON with the status that says why.
    let (code, body) = http(
        &http_addr,
        "POST",
        &format!("/v1/jobs/{job}/sandboxes/77/exec"),
        json,
        br#"{"command": ["true"]}"#,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("there is no"), "{body}");
    let (code, body) = http(
        &http_addr,
        "POST",
        &format!("{base}/exec"),
        json,
        br#"{"command": []}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        &http_addr,
        "PUT",
        &format!("{base}/files?path=/w/y&mode=999"),
        "application/octet-stream",
        b"x",
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        &http_addr,
        "PUT",
        &format!("{base}/archive?path=/w"),
        "application/x-tar",
        b"not a tar",
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        &http_addr,
        "GET",
        &format!("/v1/jobs/{job}/sandboxes/x/dir?path=/"),
        json,
        b"",
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        &http_addr,
        "GET",
        &format!("{base}/files?path=/nope"),
        json,
        b"",
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("error"), "{body}");
}

/// Exec calls keep a sandbox with an idle timeout alive (the node's I/O service touches it, the
/// report carries it, the leader records it); the sandbox nobody drives ends idle-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_keep_an_idle_timeout_at_bay() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    c.start_sim_nodes("n", 1, &["--sim-exec-ms", "1"])
        .expect("nodes");
    let addr = c.addr(leader).expect("addr");
    let id = submit_spec(
        &addr,
        pb::JobSpec {
            count: 2,
            cpu_millis: 100,
            memory_mib: 64,
            template: "busybox".into(),
            tenant: "t".into(),
            idle_timeout_ms: 3_000,
            ..Default::default()
        },
        "idle",
    )
    .await;
    let cl = Client::open(&follower(&c, leader)).expect("client");
    let started = Instant::now();
    // Drive sandbox 0 every 500 ms for 8 s; leave sandbox 1 alone.
    while started.elapsed() < Duration::from_secs(8) {
        if let Ok(r) = cl.exec_output(id, 0, &Exec::new(["true"]), None, 64).await {
            assert_eq!(r.exit.exit_code, 0);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Driven past its idle timeout twice over, it still takes execs.
    cl.exec_output(id, 0, &Exec::new(["true"]), None, 64)
        .await
        .expect("sandbox 0 stopped taking execs");
    let s0 = cl.get_sandbox(id, 0).await.expect("sandbox 0");
    assert_eq!(s0.state().name(), "running", "{s0:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let s1 = loop {
        let s1 = cl.get_sandbox(id, 1).await.expect("sandbox 1");
        if s1.state().name() == "stopped" {
            break s1;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox 1 never went idle: {s1:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s1.end_reason(), pb::EndReason::IdleTimeout, "{s1:?}");
}

/// A leader failover does not cut an exec that runs through a follower: the stream involves
/// that follower and the node only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_does_not_cut_an_exec_through_a_follower() {
    let (mut c, _dir, leader) = cluster(3, &[]).await;
    c.start_sim_nodes(
        "n",
        1,
        &["--sim-exec-ms", "3000", "--sim-exec-output-bytes", "5"],
    )
    .expect("nodes");
    let addr = c.addr(leader).expect("addr");
    let id = submit_spec(
        &addr,
        pb::JobSpec {
            count: 1,
            cpu_millis: 100,
            memory_mib: 64,
            template: "busybox".into(),
            tenant: "t".into(),
            ..Default::default()
        },
        "failover",
    )
    .await;
    let via = Client::open(&follower(&c, leader)).expect("client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while via.get_sandbox(id, 0).await.map(|s| s.state()).ok() != Some(pb::SandboxState::Running) {
        assert!(Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exec =
        tokio::spawn(async move { via.exec_output(id, 0, &Exec::new(["true"]), None, 64).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The simulated exec prints only at its end, 3 s in: the kill lands mid-stream.
    assert!(
        !exec.is_finished(),
        "the exec ended before the leader was killed"
    );
    c.kill(leader).expect("kill the leader");
    let r = exec
        .await
        .expect("join")
        .expect("the exec survives the failover");
    assert_eq!((r.exit.exit_code, r.stdout.as_slice()), (0, &b"xxxxx"[..]));
}
