//! Checkpoint, resume and fork end to end: a real scheduler replica, a real `surge node
//! --checkpoint` daemon on the container runtime with the vendored CRIU + crun
//! (`scripts/setup-criu`), real sandboxes as uid 0 (`--user root`: root lacks CAP_SYS_RESOURCE
//! on these hosts). Where root, crun, busybox or the kit are missing the test says SKIPPED and
//! passes, but fails under `CI=true`.
//!
//! A counter sandbox is checkpointed (it stops counting, its reservation is released), resumed
//! (it continues from where it was), then forked 3 times through the CLI: the forks run on the
//! same node, continue the counter from the source's value (not from 1), each in its own
//! filesystem, and the source keeps running. The HTTP API does the same (fork, checkpoint,
//! resume), and refuses bad requests with JSON errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use surge_harness::cluster::LocalCluster;
use surge_harness::containers::{self, ContainerDaemon};
use surge_proto::jobs as pb;

const WAIT: Duration = Duration::from_secs(90);

fn can_checkpoint(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        surge_node::testing::unavailable(&format!("{test}: needs root"));
        return false;
    }
    if !Path::new("/bin/busybox").is_file() {
        surge_node::testing::unavailable(&format!("{test}: /bin/busybox missing"));
        return false;
    }
    if let Err(why) = surge_node::runtime::container::checkpoint::CriuKit::probe(Path::new(
        surge_node::runtime::container::checkpoint::KIT_PREFIX_DEFAULT,
    )) {
        surge_node::testing::unavailable(&format!("{test}: {why}"));
        return false;
    }
    true
}

/// One `surge node --runtime container --checkpoint` daemon.
struct Node {
    id: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(root: &Path, servers: &str, id: &str) -> Node {
        let data_dir = root.join(format!("node-{id}"));
        let log = root.join(format!("node-{id}.log"));
        let out = std::fs::File::create(&log).expect("node log");
        let child = Command::new(bin())
            .arg("node")
            .args(["--server", servers])
            .args(["--node-id", id])
            .args(["--runtime", "container", "--checkpoint"])
            .args(["--cpus", "2", "--memory-mib", "2048"])
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start surge node");
        Node {
            id: id.into(),
            data_dir,
            log,
            child: Some(child),
        }
    }

    /// The counter a `COUNTER` sandbox writes, read from its overlay upper dir (0: none yet).
    fn counter(&self, job: u64, index: u32) -> u64 {
        let file = self
            .data_dir
            .join("sandboxes")
            .join(format!("{job}.{index}"))
            .join("upper/work/counter");
        std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let daemon = ContainerDaemon {
            node: self.id.clone(),
            data_dir: self.data_dir.clone(),
        };
        containers::cleanup(std::slice::from_ref(&daemon), &self.data_dir);
    }
}

/// Counts in /work/counter every 100 ms.
const COUNTER: &str = "n=0; while true; do n=$((n+1)); echo $n > /work/counter; sleep 0.1; done";

async fn sandbox(addr: &str, job_id: u64, index: u32) -> pb::SandboxInfo {
    surge_client::Client::open(addr)
        .expect("client")
        .get_sandbox(job_id, index)
        .await
        .expect("get sandbox")
}

async fn wait_for<T, F, Fut>(c: &LocalCluster, node: &Node, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            dump_logs(c);
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- node ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
            panic!("{what} never happened");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn in_state(addr: &str, job: u64, index: u32, state: &str) -> Option<pb::SandboxInfo> {
    let s = sandbox(addr, job, index).await;
    (s.state().name() == state).then_some(s)
}

fn cli(addr: &str, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--server", addr]);
    surge_ok(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_resume_then_fork_of_three_through_the_daemon() {
    if !can_checkpoint("checkpoint_resume_fork") {
        return;
    }
    let (c, dir, leader) = cluster(1, &["--node-ttl-ms", "5000"]).await;
    let addr = c.addr(leader).expect("addr");
    let node = Node::start(dir.path(), &addr, "ck-a");
    wait_for(
        &c,
        &node,
        "the node is ready and can checkpoint",
        || async {
            let nodes: serde_json::Value =
                serde_json::from_str(&cli(&addr, &["nodes", "-o", "json"])).ok()?;
            nodes
                .as_array()?
                .iter()
                .any(|n| n["node_id"] == "ck-a" && n["state"] == "ready" && n["checkpoint"] == true)
                .then_some(())
        },
    )
    .await;

    let spec = pb::JobSpec {
        count: 1,
        cpu_millis: 200,
        memory_mib: 64,
        template: "busybox".into(),
        command: vec!["/bin/sh".into(), "-c".into(), COUNTER.into()],
        tenant: "test".into(),
        user: "root".into(),
        ..Default::default()
    };
    let job = submit_spec(&addr, spec, "counter").await;
    wait_for(&c, &node, "the counter runs", || async {
        in_state(&addr, job, 0, "running").await?;
        (node.counter(job, 0) >= 5).then_some(())
    })
    .await;

    // Checkpoint: it stops counting and shows its image.
    cli(&addr, &["pause", "--checkpoint", &format!("{job}.0")]);
    let saved = wait_for(&c, &node, "checkpointed", || {
        in_state(&addr, job, 0, "checkpointed")
    })
    .await;
    assert!(saved.image_bytes > 0, "{saved:?}");
    assert_eq!(saved.node, "ck-a");
    let at_checkpoint = node.counter(job, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.counter(job, 0),
        at_checkpoint,
        "it counted while saved"
    );

    // Resume: it continues from where it was.
    cli(&addr, &["resume", &format!("{job}.0")]);
    wait_for(&c, &node, "resumed and counting on", || async {
        in_state(&addr, job, 0, "running").await?;
        (node.counter(job, 0) > at_checkpoint + 3).then_some(())
    })
    .await;

    // Fork of 3 through the CLI.
    let before_fork = node.counter(job, 0);
    let out = cli(
        &addr,
        &["fork", &format!("{job}.0"), "--count", "3", "-o", "json"],
    );
    let reply: serde_json::Value = serde_json::from_str(&out).expect("surge fork -o json");
    let forks = reply["job_id"].as_u64().expect("job_id");
    for i in 0..3 {
        wait_for(&c, &node, "a fork runs", || {
            in_state(&addr, forks, i, "running")
        })
        .await;
    }
    let j = get_job(&addr, forks).await;
    let spec = j.spec.expect("spec");
    assert_eq!(
        spec.labels.get("surge-fork-of").map(String::as_str),
        Some(format!("{job}.0").as_str())
    );
    for i in 0..3 {
        let s = sandbox(&addr, forks, i).await;
        assert_eq!(s.node, "ck-a", "forks run on the source's node");
        // Each continued the source's counter (a cold start would count from 1), in its own
        // writable layer.
        let first = wait_for(&c, &node, "the fork counts", || async {
            let n = node.counter(forks, i);
            (n > 0).then_some(n)
        })
        .await;
        assert!(
            first >= before_fork,
            "fork {i} counts from {first}, the source was at {before_fork}"
        );
    }
    // They diverge: each counter keeps moving in its own file, and the source keeps running.
    let now = node.counter(forks, 1);
    wait_for(&c, &node, "the fork keeps counting", || async {
        (node.counter(forks, 1) > now + 3).then_some(())
    })
    .await;
    assert_eq!(sandbox(&addr, job, 0).await.state().name(), "running");

    // Refusals come back in one line.
    let refused = surge_client::Client::open(&addr)
        .expect("client")
        .fork(pb::ForkSandboxRequest {
            job_id: job,
            index: 0,
            count: 65,
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("65 forks");
    assert!(refused.to_string().contains("1 to 64"), "{refused}");

    // The same through the HTTP API: a fork of 2, a checkpoint and a resume of one of them, and
    // refusals as JSON errors.
    let web = c.replica(leader).expect("replica").http.clone();
    let json = "application/json";
    let path = |what: &str| format!("/v1/jobs/{job}/sandboxes/0/{what}");
    let (code, text) = http(&web, "POST", &path("fork"), json, br#"{"count": 2}"#).await;
    assert_eq!(code, 200, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).expect("fork reply");
    let web_forks = reply["job_id"].as_u64().expect("job_id");
    for i in 0..2 {
        wait_for(&c, &node, "an HTTP fork runs", || {
            in_state(&addr, web_forks, i, "running")
        })
        .await;
        assert_eq!(sandbox(&addr, web_forks, i).await.node, "ck-a");
    }
    let fork_path = |what: &str| format!("/v1/jobs/{web_forks}/sandboxes/1/{what}");
    let (code, text) = http(&web, "POST", &fork_path("checkpoint"), json, b"").await;
    assert_eq!(code, 200, "{text}");
    wait_for(&c, &node, "an HTTP checkpoint", || {
        in_state(&addr, web_forks, 1, "checkpointed")
    })
    .await;
    let (code, text) = http(&web, "POST", &fork_path("resume"), json, b"").await;
    assert_eq!(code, 200, "{text}");
    wait_for(&c, &node, "an HTTP resume", || {
        in_state(&addr, web_forks, 1, "running")
    })
    .await;
    for (body, expect) in [
        (&br#"{"count": 65}"#[..], "1 to 64"),
        (&br#"{"count": 0}"#[..], "1 to 64"),
        (&br#"{}"#[..], "count"),
        (&br#"{"count": 1, "extra": 1}"#[..], "extra"),
        (&b"[1]"[..], "request body"),
    ] {
        let (code, text) = http(&web, "POST", &path("fork"), json, body).await;
        assert_eq!(code, 400, "{}: {text}", String::from_utf8_lossy(body));
        let err: serde_json::Value = serde_json::from_str(&text).expect("a JSON error");
        let msg = err["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(expect), "{text}");
    }
    let (code, text) = http(&web, "POST", "/v1/jobs/x/sandboxes/0/fork", json, b"{}").await;
    assert_eq!(code, 400, "{text}");
    // A checkpoint of a job that does not exist: 404, in JSON.
    let (code, text) = http(
        &web,
        "POST",
        "/v1/jobs/999999/sandboxes/0/checkpoint",
        json,
        b"",
    )
    .await;
    assert_eq!(code, 404, "{text}");
    cli(&addr, &["cancel", &web_forks.to_string()]);

    cli(&addr, &["cancel", &forks.to_string()]);
    cli(&addr, &["cancel", &job.to_string()]);
    drop(node);
    drop(c);
}
