//! t66: lifetimes end to end on real replicas and simulated nodes. Long-lived sandboxes (no
//! command) stay up until a deadline of the replicated state ends them: TTL, idle timeout (fed
//! by the activity a node reports) and the owner's lease (kept while renewed, lost when the
//! renewals stop), each with its typed reason, even after the leader is killed; labels select
//! jobs for listing and bulk cancel; bad lifetimes and labels get clear errors on every API.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use surge_client::Client;
use surge_proto::jobs as pb;
use tonic::Code;

/// A long-lived job (no command) of `count` small sandboxes.
fn long_lived(count: u32, labels: &[(&str, &str)]) -> pb::JobSpec {
    pb::JobSpec {
        count,
        cpu_millis: 100,
        memory_mib: 64,
        template: "busybox".into(),
        command: vec![],
        tenant: "test".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn client(addrs: &[String]) -> Client {
    Client::open(&addrs.join(",")).expect("client")
}

/// Wait (server-side) until the job's sandboxes all run; panics with the job otherwise.
async fn wait_running(c: &Client, job_id: u64) -> pb::Job {
    let r = c
        .wait_job(pb::WaitJobRequest {
            job_id,
            index: None,
            timeout_ms: 60_000,
            until: pb::WaitFor::Running as i32,
        })
        .await
        .expect("wait");
    assert_eq!(
        r.outcome,
        pb::WaitOutcome::Met as i32,
        "job {job_id} not running: {:?}",
        r.job
    );
    r.job.expect("job")
}

/// Wait (server-side) until the job ended, at most `secs`.
async fn wait_ended(c: &Client, job_id: u64, secs: u64) -> pb::Job {
    let r = c
        .wait_job(pb::WaitJobRequest {
            job_id,
            index: None,
            timeout_ms: secs * 1000,
            until: pb::WaitFor::Ended as i32,
        })
        .await
        .expect("wait");
    assert_eq!(
        r.outcome,
        pb::WaitOutcome::Met as i32,
        "job {job_id} did not end within {secs} s: {:?}",
        r.job
    );
    r.job.expect("job")
}

async fn reason(c: &Client, job_id: u64, index: u32) -> pb::EndReason {
    let s = c.get_sandbox(job_id, index).await.expect("sandbox");
    pb::EndReason::try_from(s.end_reason).expect("a known reason")
}

fn running(j: &pb::Job) -> u32 {
    j.counts.unwrap_or_default().running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_lease_end_sandboxes_with_their_reasons_and_renewals_keep_them() {
    let (mut cl, _dir, leader) = cluster(3, &[]).await;
    let addrs: Vec<String> = cl
        .ids()
        .iter()
        .map(|i| cl.addr(*i).expect("addr"))
        .collect();
    let addr = cl.addr(leader).expect("addr");
    cl.start_sim_nodes("n", 2, &["--sim-duration-ms", "1000"])
        .expect("nodes");
    let c = client(&addrs);

    // Sandboxes without a command outlive the nodes' 1 s simulated commands.
    let forever = submit_spec(&addr, long_lived(3, &[("run", "t66")]), "forever").await;
    let ttl = submit_spec(
        &addr,
        pb::JobSpec {
            ttl_ms: 3_000,
            ..long_lived(4, &[])
        },
        "ttl",
    )
    .await;
    let leased = submit_spec(
        &addr,
        pb::JobSpec {
            lease_ms: 3_000,
            ..long_lived(2, &[])
        },
        "lease",
    )
    .await;
    let started = Instant::now();
    for id in [leased, forever] {
        let keep = c.keepalive(pb::KeepaliveRequest {
            job_id: leased,
            ..Default::default()
        });
        keep.await.expect("renew while waiting");
        wait_running(&c, id).await;
    }

    // The owner renews the lease every second, for more than twice the lease.
    while started.elapsed() < Duration::from_secs(8) {
        let j = c
            .keepalive(pb::KeepaliveRequest {
                job_id: leased,
                ..Default::default()
            })
            .await
            .expect("renew");
        assert!(j.lease_expires_at_ms > 0, "{j:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let j = get_job(&addr, leased).await;
    assert_eq!(running(&j), 2, "renewed: the lease holds: {j:?}");

    // The TTL job ended by then, each sandbox with its reason.
    let j = wait_ended(&c, ttl, 30).await;
    assert_eq!(
        j.state().name(),
        "complete",
        "a TTL is not a failure: {j:?}"
    );
    for i in 0..4 {
        assert_eq!(reason(&c, ttl, i).await, pb::EndReason::TtlExpired);
    }
    assert!(
        j.exits
            .iter()
            .all(|e| e.reason == pb::EndReason::TtlExpired as i32),
        "{:?}",
        j.exits
    );

    // Renewals stop: the lease runs out and the leader stops the sandboxes.
    let stopped_renewing = Instant::now();
    wait_ended(&c, leased, 30).await;
    assert!(
        stopped_renewing.elapsed() >= Duration::from_secs(1),
        "ended only after the lease ran out"
    );
    for i in 0..2 {
        assert_eq!(reason(&c, leased, i).await, pb::EndReason::LeaseLost);
    }
    let s = c.get_sandbox(leased, 0).await.expect("sandbox");
    assert!(!s.infrastructure, "a lost lease is the owner's, not infra");

    // Nothing ended the job without a lifetime: long-lived until cancelled (by its label).
    let j = get_job(&addr, forever).await;
    assert_eq!(running(&j), 3, "{j:?}");
    let r = c
        .cancel_jobs(pb::CancelJobsRequest {
            labels: BTreeMap::from([("run".to_string(), "t66".to_string())]),
            tenant: String::new(),
        })
        .await
        .expect("cancel by label");
    assert_eq!((r.cancelled, r.job_ids), (1, vec![forever]));
    assert_eq!(reason(&c, forever, 2).await, pb::EndReason::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_happens_after_the_leader_is_killed() {
    let (mut cl, _dir, leader) = cluster(3, &[]).await;
    let addr = cl.addr(leader).expect("addr");
    cl.start_sim_nodes("n", 1, &[]).expect("nodes");
    let survivors: Vec<String> = cl
        .ids()
        .into_iter()
        .filter(|i| *i != leader)
        .map(|i| cl.addr(i).expect("addr"))
        .collect();
    let spec = pb::JobSpec {
        ttl_ms: 6_000,
        ..long_lived(2, &[])
    };
    let id = submit_spec(&addr, spec, "ttl-failover").await;
    let j = wait_running(&client(std::slice::from_ref(&addr)), id).await;
    assert_eq!(j.state().name(), "running");
    // The deadline is in the replicated state: the old leader's memory goes with it.
    cl.kill(leader).expect("kill the leader");
    let new_leader = wait_leader(&mut cl).await;
    assert_ne!(new_leader, leader);
    let c = client(&survivors);
    let j = wait_ended(&c, id, 60).await;
    assert_eq!(j.state().name(), "complete", "{j:?}");
    for i in 0..2 {
        assert_eq!(reason(&c, id, i).await, pb::EndReason::TtlExpired);
    }
}

/// The idle clock follows what the node reports: an in-process simulated node whose
/// `Activity` the test touches as the I/O service would, on every exec or file call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_follows_the_activity_nodes_report() {
    use surge_node::agent::{NodeAgent, NodeConfig, NodeMetrics, Replicas};
    use surge_node::reconcile::{Resources, SandboxId};
    use surge_node::runtime::sim::{SimProfile, SimRuntime};

    let (cl, _dir, leader) = cluster(1, &[]).await;
    let addr = cl.addr(leader).expect("addr");
    let mut config = NodeConfig::new(
        "act-0",
        Resources {
            cpu_millis: 8_000,
            memory_mib: 8_192,
        },
    );
    config.pool = "act".into();
    let activity = config.activity.clone();
    let replicas = Arc::new(Replicas::new(std::slice::from_ref(&addr), None).expect("replicas"));
    let metrics = Arc::new(NodeMetrics::new().expect("metrics"));
    let runtime = Arc::new(SimRuntime::new(SimProfile::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node = tokio::spawn(NodeAgent::simulated(config, runtime, replicas, metrics).run(stop_rx));

    let spec = pb::JobSpec {
        idle_timeout_ms: 3_000,
        constraints: vec![pb::Constraint {
            key: "pool".into(),
            op: "=".into(),
            value: "act".into(),
        }],
        ..long_lived(2, &[])
    };
    let id = submit_spec(&addr, spec, "idle").await;
    let c = client(std::slice::from_ref(&addr));
    wait_running(&c, id).await;
    // Sandbox 0 is used every 300 ms for 7 s; sandbox 1 never.
    let used_until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < used_until {
        activity.touch(SandboxId::new(id, 0));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(reason(&c, id, 1).await, pb::EndReason::IdleTimeout);
    let s = c.get_sandbox(id, 0).await.expect("sandbox 0");
    assert_eq!(s.state().name(), "running", "used: not idle: {s:?}");
    assert!(s.last_active_at_ms > 0, "the leader recorded its activity");
    // No more calls: it goes idle too.
    let j = wait_ended(&c, id, 30).await;
    assert_eq!(j.state().name(), "complete");
    assert_eq!(reason(&c, id, 0).await, pb::EndReason::IdleTimeout);
    stop_tx.send(true).expect("stop the node");
    let _ = node.await;
}

fn surge_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .expect("run surge");
    assert!(!out.status.success(), "surge {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_select_jobs_and_bad_lifetimes_get_clear_errors_on_every_api() {
    let (cl, _dir, leader) = cluster(1, &[]).await;
    let addr = cl.addr(leader).expect("addr");
    let web = cl.replica(leader).expect("replica").http.clone();
    let server = ["--server", addr.as_str()];

    // The CLI: long-lived sandboxes in one call, no command; listed and cancelled by label.
    let submit = |label: &str| {
        let mut args = vec!["submit", "-o", "json", "--count", "3", "--label", label];
        args.extend(["--ttl", "1h", "--idle-timeout", "10m", "--lease", "5m"]);
        args.extend(server);
        let out: serde_json::Value =
            serde_json::from_str(&surge_ok(&args)).expect("submit prints JSON");
        out["job_id"].as_u64().expect("job id")
    };
    let (a, b, other) = (submit("run=exp7"), submit("run=exp7"), submit("run=exp8"));
    let list = |label: &str| -> Vec<serde_json::Value> {
        let mut args = vec!["jobs", "-o", "json", "--label", label];
        args.extend(server);
        serde_json::from_str(&surge_ok(&args)).expect("jobs prints JSON")
    };
    let exp7 = list("run=exp7");
    let ids: Vec<u64> = exp7.iter().filter_map(|j| j["id"].as_u64()).collect();
    assert_eq!(ids, vec![b, a], "newest first, only the label's");
    assert_eq!(exp7[0]["ttl_ms"], 3_600_000);
    assert_eq!(exp7[0]["idle_timeout_ms"], 600_000);
    assert!(exp7[0]["command"].as_array().is_some_and(Vec::is_empty));
    let mut args = vec!["cancel", "-o", "json", "--label", "run=exp7"];
    args.extend(server);
    let out: serde_json::Value = serde_json::from_str(&surge_ok(&args)).expect("cancel JSON");
    assert_eq!(out["cancelled"], 2);
    assert_eq!(
        list("run=exp8")[0]["state"],
        "pending",
        "another label: untouched"
    );
    assert_eq!(list("run=exp7")[0]["state"], "cancelled");

    // `surge wait` and `submit --wait` wait on the server and say how it went in the exit code
    // (no node here: nothing runs, so they time out: 2); `keepalive` renews and extends.
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .args(server)
            .output()
            .expect("run surge")
    };
    let id = other.to_string();
    let out = run(&["wait", &id, "--timeout", "1s", "-o", "json"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("wait prints JSON");
    assert_eq!(v["outcome"], "timed-out");
    let out = run(&["wait", &format!("{a}.0"), "--timeout", "1s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "cancelled: it ended first: {out:?}"
    );
    let out = run(&[
        "submit",
        "--wait",
        "--wait-timeout",
        "1s",
        "--label",
        "run=w",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&surge_ok(&[
        "keepalive",
        &id,
        "--ttl",
        "2h",
        "-o",
        "json",
        "--server",
        &addr,
    ]))
    .expect("keepalive prints JSON");
    assert!(
        v["lease_expires_at_ms"].as_u64().is_some_and(|t| t > 0),
        "{v}"
    );

    // Bad input from the CLI names the flag.
    for (flags, says) in [
        (vec!["--ttl", "0"], "--ttl"),
        (vec!["--ttl", "40d"], "30 days"),
        (vec!["--idle-timeout", "5 parsecs"], "--idle-timeout"),
        (vec!["--label", "run"], "KEY=VALUE"),
        (vec!["--label", "run=a b"], "label value"),
    ] {
        let mut args = vec!["submit"];
        args.extend(flags);
        args.extend(server);
        let err = surge_fails(&args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let err = surge_fails(&["cancel", "--server", &addr]);
    assert!(err.contains("--label") || err.contains("<ID>"), "{err}");

    // ... from gRPC, as InvalidArgument naming the field.
    let mut grpc = surge_client::connect::jobs(&addr, &Default::default()).expect("grpc");
    for (spec, says) in [
        (
            pb::JobSpec {
                ttl_ms: 5,
                ..long_lived(1, &[])
            },
            "ttl_ms",
        ),
        (
            pb::JobSpec {
                lease_ms: 31 * 86_400_000,
                ..long_lived(1, &[])
            },
            "lease_ms",
        ),
        (long_lived(1, &[("bad key", "x")]), "labels"),
    ] {
        let err = grpc
            .submit_job(pb::SubmitJobRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(says), "{says}: {}", err.message());
    }
    let err = grpc
        .cancel_jobs(pb::CancelJobsRequest::default())
        .await
        .expect_err("an empty selector is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .wait_job(pb::WaitJobRequest {
            job_id: other,
            timeout_ms: 3_600_000,
            ..Default::default()
        })
        .await
        .expect_err("a wait of an hour is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .keepalive(pb::KeepaliveRequest {
            job_id: 999_999,
            ..Default::default()
        })
        .await
        .expect_err("no such job");
    assert_eq!(err.code(), Code::NotFound);

    // ... and from HTTP, as JSON errors; the lifetime routes answer JSON.
    let (code, body) = http(&web, "POST", "/v1/jobs", br#"{"ttl_ms": 5}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("ttl_ms"), "{body}");
    let (code, body) = http(&web, "POST", "/v1/jobs/cancel", br#"{"labels": {}}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = http(&web, "GET", "/v1/jobs?labels=run=exp8", b"").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{body}");
    let path = format!("/v1/jobs/{other}/wait?timeout_ms=200");
    let (code, body) = http(&web, "GET", &path, b"").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"outcome\":\"timed-out\""),
        "no nodes: {body}"
    );
    let path = format!("/v1/jobs/{a}/sandboxes/1");
    let (code, body) = http(&web, "GET", &path, b"").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"end_reason\":\"cancelled\""), "{body}");
    let path = format!("/v1/jobs/{other}/keepalive");
    let (code, body) = http(&web, "POST", &path, br#"{"ttl_ms": 60000}"#).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("lease_expires_at_ms"), "{body}");
}

/// One HTTP/1.1 request over a fresh connection; the status and the body.
async fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
