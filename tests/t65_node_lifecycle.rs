//! The node daemon's lifecycle end to end: real scheduler replicas, real `surge node` daemons on
//! the container runtime (crun), real sandboxes. Needs root, crun and busybox-static
//! (`scripts/setup`); where they are missing each test says SKIPPED and passes, but fails under `CI=true`.
//!
//! * exit codes and output tails reach `surge job`, `surge sandbox` and `surge logs`;
//! * `surge stop` is graceful (SIGTERM), then forced (SIGKILL), and ends `stopped`;
//! * `surge template import` on a running node reaches placement;
//! * a daemon restart re-adopts its running sandboxes (they keep running);
//! * a daemon cut off past the liveness TTL finds its work rescheduled on another node, and
//!   stops its now-foreign sandbox when it comes back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use surge_client::open as client;
use surge_harness::cluster::LocalCluster;
use surge_harness::containers::{self, ContainerDaemon};
use surge_proto::jobs as pb;
use surge_proto::node::ListNodesRequest;

/// Scheduler liveness TTL for these tests: short, so a cut-off node is noticed quickly.
const NODE_TTL_MS: &str = "3000";
/// How long any one wait in these tests may take.
const WAIT: Duration = Duration::from_secs(90);

fn can_run_containers(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        surge_node::testing::unavailable(&format!(
            "{test}: needs root (namespaces, cgroups, overlay mounts)"
        ));
        return false;
    }
    if !Command::new("crun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        surge_node::testing::unavailable(&format!(
            "{test}: crun is not installed (scripts/setup installs it)"
        ));
        return false;
    }
    if !Path::new("/bin/busybox").is_file() {
        surge_node::testing::unavailable(&format!(
            "{test}: /bin/busybox missing (apt-get install -y busybox-static)"
        ));
        return false;
    }
    true
}

/// One `surge node --runtime container` daemon this test owns.
struct Node {
    id: String,
    data_dir: PathBuf,
    log: PathBuf,
    servers: String,
    /// `--checkpoint`: the shim pipes the sandbox's stdio (CRIU cannot dump host files).
    checkpoint: bool,
    child: Option<Child>,
}

impl Node {
    fn start(root: &Path, servers: &str, id: &str) -> Node {
        Self::start_with(root, servers, id, false)
    }

    fn start_with(root: &Path, servers: &str, id: &str, checkpoint: bool) -> Node {
        let mut n = Node {
            id: id.to_string(),
            data_dir: root.join(format!("node-{id}")),
            log: root.join(format!("node-{id}.log")),
            servers: servers.to_string(),
            checkpoint,
            child: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        let mut cmd = Command::new(bin());
        cmd.arg("node")
            .args(["--server", &self.servers])
            .args(["--node-id", &self.id])
            .args(["--runtime", "container"]);
        if self.checkpoint {
            cmd.arg("--checkpoint");
        }
        let child = cmd
            .args(["--cpus", "2", "--memory-mib", "2048"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start surge node");
        self.child = Some(child);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }

    /// `kill -9`: the daemon dies at once; its sandboxes do not.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sandbox_dir(&self, job: u64, index: u32) -> PathBuf {
        self.data_dir
            .join("sandboxes")
            .join(format!("{job}.{index}"))
    }

    /// The counter a `COUNTER_SCRIPT` sandbox writes, read from its overlay upper dir (0: none
    /// yet). `echo > file` truncates before it writes: an empty read is retried a few times.
    fn counter(&self, job: u64, index: u32) -> u64 {
        let file = self.sandbox_dir(job, index).join("upper/work/counter");
        for _ in 0..20 {
            let n = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            if let Some(n) = n {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        0
    }
}

impl Node {
    /// Stop the daemon and remove what it left (see `Drop`); returns whatever of it is still on
    /// the host.
    fn remove(self) -> Vec<String> {
        let daemon = ContainerDaemon {
            node: self.id.clone(),
            data_dir: self.data_dir.clone(),
        };
        drop(self);
        containers::leftovers(std::slice::from_ref(&daemon), &daemon.data_dir)
    }
}

impl Drop for Node {
    /// Kill the daemon, then whatever it left on the host (containers, shims, the overlay
    /// mounts under its data dir, its `/surge/NODE` cgroups), so nothing outlives the test. Each
    /// test names its nodes apart, since cgroups are per node id and the tests run at once.
    fn drop(&mut self) {
        self.kill();
        let daemon = ContainerDaemon {
            node: self.id.clone(),
            data_dir: self.data_dir.clone(),
        };
        containers::cleanup(std::slice::from_ref(&daemon), &self.data_dir);
    }
}

/// A sandbox that counts in /work/counter every 100 ms and ends cleanly on SIGTERM.
const COUNTER_SCRIPT: &str = "trap 'echo got TERM; exit 0' TERM; n=0; \
     while true; do n=$((n+1)); echo $n > /work/counter; sleep 0.1; done";

fn spec(count: u32, script: &str) -> pb::JobSpec {
    pb::JobSpec {
        count,
        cpu_millis: 200,
        memory_mib: 64,
        template: "busybox".into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        tenant: "test".into(),
        ..Default::default()
    }
}

async fn submit(addr: &str, spec: pb::JobSpec, key: &str) -> u64 {
    submit_spec(addr, spec, key).await
}

async fn job(addr: &str, id: u64) -> pb::Job {
    get_job(addr, id).await
}

/// The nodes the scheduler knows (`None` while it cannot answer).
async fn list_nodes(addr: &str) -> Option<Vec<surge_proto::node::NodeInfo>> {
    Some(
        client::nodes(addr)
            .ok()?
            .list_nodes(ListNodesRequest {})
            .await
            .ok()?
            .into_inner()
            .nodes,
    )
}

/// A one-replica cluster with liveness TTL `ttl_ms`, or `None` (SKIP printed) where this host
/// cannot run containers.
async fn cluster_for(
    test: &str,
    ttl_ms: &str,
) -> Option<(LocalCluster, tempfile::TempDir, String)> {
    if !can_run_containers(test) {
        return None;
    }
    let (c, dir, leader) = cluster(1, &["--node-ttl-ms", ttl_ms]).await;
    let addr = c.addr(leader).expect("addr");
    Some((c, dir, addr))
}

async fn sandbox(addr: &str, job_id: u64, index: u32) -> pb::SandboxInfo {
    surge_client::Client::open(addr)
        .expect("client")
        .get_sandbox(job_id, index)
        .await
        .expect("get sandbox")
}

fn dump(c: &LocalCluster, nodes: &[&Node]) {
    dump_logs(c);
    for n in nodes {
        let text = n.log_text();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- node {} ---\n{}",
            n.id,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
}

/// `assert!` that dumps the logs first.
fn check(c: &LocalCluster, nodes: &[&Node], ok: bool, what: &str) {
    if !ok {
        dump(c, nodes);
        panic!("{what}");
    }
}

/// Poll `probe` until it returns `Some`; on timeout dump the logs and panic with `what`.
async fn wait_for<T, F, Fut>(c: &LocalCluster, nodes: &[&Node], what: &str, mut probe: F) -> T
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
            dump(c, nodes);
            panic!("{what} never happened");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_nodes_ready(c: &LocalCluster, nodes: &[&Node], addr: &str) {
    let want: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    wait_for(c, nodes, "all nodes ready", || async {
        let listed = list_nodes(addr).await?;
        want.iter()
            .all(|w| {
                listed
                    .iter()
                    .any(|n| &n.node_id == w && n.state().name() == "ready")
            })
            .then_some(())
    })
    .await
}

/// Run the `surge` CLI against `addr`; its stdout.
fn cli(addr: &str, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--server", addr]);
    surge_ok(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_output_reach_job_sandbox_and_logs_and_stop_ends_stopped() {
    let Some((c, dir, addr)) = cluster_for("exit_codes_and_output", NODE_TTL_MS).await else {
        return;
    };
    let node = Node::start(dir.path(), &addr, "real-a");
    wait_nodes_ready(&c, &[&node], &addr).await;

    // Sandbox 0 succeeds, sandbox 1 exits 3; both write to stdout and stderr.
    let script = "i=${SURGE_SANDBOX_ID#*.}; echo \"hello from $i\"; echo \"warning $i\" >&2; \
                  exit $((i * 3))";
    let id = submit(&addr, spec(2, script), "exits").await;
    let j = wait_for(&c, &[&node], "the job ends", || async {
        let j = job(&addr, id).await;
        matches!(j.state().name(), "complete" | "failed").then_some(j)
    })
    .await;
    assert_eq!(j.state().name(), "failed", "one sandbox failed: {j:?}");
    let counts = j.counts.unwrap_or_default();
    assert_eq!((counts.succeeded, counts.failed), (1, 1), "{j:?}");
    assert_eq!(j.exits.len(), 1, "{:?}", j.exits);
    assert_eq!(
        (
            j.exits[0].state().name(),
            j.exits[0].exit_code,
            j.exits[0].count
        ),
        ("failed", 3, 1)
    );

    let failed = sandbox(&addr, id, 1).await;
    assert_eq!(
        (
            failed.state().name(),
            failed.exit_code,
            failed.node.as_str()
        ),
        ("failed", 3, "real-a")
    );
    assert!(failed.log_kept, "{failed:?}");
    assert!(
        failed.log_tail.contains("hello from 1") && failed.log_tail.contains("warning 1"),
        "stdout and stderr tails: {:?}",
        failed.log_tail
    );
    assert!(failed.finished_at_ms >= failed.submitted_at_ms);
    let ok = sandbox(&addr, id, 0).await;
    assert_eq!((ok.state().name(), ok.exit_code), ("succeeded", 0));
    assert!(ok.log_tail.contains("hello from 0"), "{:?}", ok.log_tail);

    // The same through the CLI a user types.
    let shown = cli(&addr, &["job", &id.to_string()]);
    assert!(shown.contains("1 failed (exit 3)"), "surge job: {shown}");
    let logs = cli(&addr, &["logs", &format!("{id}.1")]);
    assert!(logs.contains("hello from 1"), "surge logs: {logs}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&addr, &["sandbox", &format!("{id}.1"), "-o", "json"]))
            .expect("surge sandbox -o json is JSON");
    assert_eq!(json["state"], "failed");
    assert_eq!(json["exit_code"], 3);
    assert_eq!(json["node"], "real-a");
    let table = cli(&addr, &["sandbox", &format!("{id}.1")]);
    assert!(
        table.contains("exit code  3") && table.contains("warning 1"),
        "{table}"
    );

    // A command that does not exist never starts: the sandbox fails with the runtime's message
    // and no exit code (it used to show `exit code 0`).
    let mut missing = spec(1, "");
    missing.command = vec!["rl-episode".into()];
    let never = submit(&addr, missing, "never-starts").await;
    let j = wait_for(&c, &[&node], "the job ends", || async {
        let j = job(&addr, never).await;
        matches!(j.state().name(), "complete" | "failed").then_some(j)
    })
    .await;
    assert_eq!(j.state().name(), "failed", "{j:?}");
    assert!(
        j.exits.len() == 1 && j.exits[0].start_failed,
        "{:?}",
        j.exits
    );
    let s = sandbox(&addr, never, 0).await;
    assert!(s.start_failed, "{s:?}");
    assert!(
        s.message.contains("rl-episode"),
        "the runtime's message: {s:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&cli(
        &addr,
        &["sandbox", &format!("{never}.0"), "-o", "json"],
    ))
    .expect("JSON");
    assert_eq!(json["exit_code"], serde_json::Value::Null, "{json}");
    assert_eq!(json["start_failed"], true, "{json}");
    let shown = cli(&addr, &["job", &never.to_string()]);
    assert!(
        shown.contains("1 failed (never started)"),
        "surge job: {shown}"
    );
    let table = cli(&addr, &["sandbox", &format!("{never}.0")]);
    assert!(table.contains("the command never started"), "{table}");

    // surge stop: sandbox 0 handles SIGTERM and exits 0; sandbox 1 ignores it and is killed
    // after the grace period. Both end `stopped`, with their exit status, and are not restarted.
    let script = "i=${SURGE_SANDBOX_ID#*.}; if [ $i = 1 ]; then trap '' TERM; \
                  else trap 'echo got TERM; exit 0' TERM; fi; echo started; \
                  while true; do sleep 0.1; done";
    let mut sp = spec(2, script);
    sp.restart = Some(pb::RestartPolicy {
        mode: "on-failure".into(),
        max_restarts: 3,
    });
    let id = submit(&addr, sp, "stops").await;
    wait_for(&c, &[&node], "both sandboxes running", || async {
        let j = job(&addr, id).await;
        (j.counts.unwrap_or_default().running == 2).then_some(())
    })
    .await;
    let out = cli(&addr, &["stop", &id.to_string()]);
    assert!(out.contains(&id.to_string()), "{out}");
    let j = wait_for(&c, &[&node], "both sandboxes stopped", || async {
        let j = job(&addr, id).await;
        (j.counts.unwrap_or_default().stopped == 2).then_some(j)
    })
    .await;
    assert_eq!(
        j.state().name(),
        "complete",
        "stopping is not failing: {j:?}"
    );
    let counts = j.counts.unwrap_or_default();
    assert_eq!((counts.failed, counts.pending, counts.running), (0, 0, 0));
    let graceful = sandbox(&addr, id, 0).await;
    assert_eq!(
        (graceful.state().name(), graceful.exit_code),
        ("stopped", 0)
    );
    assert!(graceful.log_tail.contains("got TERM"), "{graceful:?}");
    assert_eq!(graceful.generation, 0, "not restarted");
    let forced = sandbox(&addr, id, 1).await;
    assert_eq!(
        (forced.state().name(), forced.exit_code),
        ("stopped", 137),
        "SIGKILL after the grace period: {forced:?}"
    );
    assert!(forced.message.contains("request"), "{forced:?}");

    // A stopped job's sandboxes are released by the node.
    wait_for(
        &c,
        &[&node],
        "the node releases stopped sandboxes",
        || async {
            (!node.sandbox_dir(id, 0).exists() && !node.sandbox_dir(id, 1).exists()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_template_reaches_placement_without_a_restart() {
    let Some((c, dir, addr)) = cluster_for("template_import", NODE_TTL_MS).await else {
        return;
    };
    let a = Node::start(dir.path(), &addr, "real-i");
    let b = Node::start(dir.path(), &addr, "real-j");
    wait_nodes_ready(&c, &[&a, &b], &addr).await;

    // A flavoured copy of the default template, as a tarball, imported on node b while its
    // daemon runs.
    let src = dir.path().join("flavour-src");
    let status = Command::new("cp")
        .arg("-a")
        .arg(b.data_dir.join("templates/busybox"))
        .arg(&src)
        .status()
        .expect("cp");
    assert!(status.success());
    std::fs::write(src.join("etc/flavour"), "mint\n").expect("write");
    let tarball = dir.path().join("flavour.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success());
    let import = |name: &str| {
        Command::new(bin())
            .args(["template", "import", name])
            .arg(&tarball)
            .arg("--data-dir")
            .arg(&b.data_dir)
            .output()
            .expect("surge template import")
    };
    let out = import("flavoured");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad import says why and leaves nothing behind.
    let out = import("bad/name");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid"), "{err}");

    // The running daemon notices and re-registers: the scheduler sees b holding it.
    wait_for(
        &c,
        &[&a, &b],
        "the scheduler learns b's new template",
        || async {
            let listed = list_nodes(&addr).await?;
            listed
                .iter()
                .any(|n| n.node_id == "real-j" && n.templates.iter().any(|t| t == "flavoured"))
                .then_some(())
        },
    )
    .await;
    assert!(b.log_text().contains("templates changed"));

    // Placement prefers the node that holds the template: every sandbox lands on b.
    let mut sp = spec(2, "cat /etc/flavour");
    sp.template = "flavoured".into();
    let id = submit(&addr, sp, "flavoured").await;
    let j = wait_for(
        &c,
        &[&a, &b],
        "the job runs on the new template",
        || async {
            let j = job(&addr, id).await;
            matches!(j.state().name(), "complete" | "failed").then_some(j)
        },
    )
    .await;
    assert_eq!(j.state().name(), "complete", "{j:?}");
    for i in 0..2 {
        let s = sandbox(&addr, id, i).await;
        assert_eq!((s.node.as_str(), s.log_tail.as_str()), ("real-j", "mint\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_readopts_its_running_sandboxes() {
    restart_readopts("restart_readopts", false).await;
}

/// The same with a `--checkpoint` daemon (piped stdio: the shim is a pipeline): its sandboxes
/// survive the kill, are adopted, and exec and a checkpoint and resume still work on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_checkpoint_daemon_readopts_its_running_sandboxes() {
    restart_readopts("restart_readopts_checkpoint", true).await;
}

/// The CRIU kit this host's `--checkpoint` daemons use is usable (else SKIPPED; fails under
/// `CI=true`).
fn can_checkpoint(test: &str) -> bool {
    use surge_node::runtime::container::checkpoint::{CriuKit, KIT_PREFIX_DEFAULT};
    if let Err(why) = CriuKit::probe(Path::new(KIT_PREFIX_DEFAULT)) {
        surge_node::testing::unavailable(&format!("{test}: {why}"));
        return false;
    }
    true
}

async fn restart_readopts(test: &str, checkpoint: bool) {
    if checkpoint && !(can_run_containers(test) && can_checkpoint(test)) {
        return;
    }
    let Some((c, dir, addr)) = cluster_for(test, "10000").await else {
        return;
    };
    let node_id = if checkpoint { "real-rc" } else { "real-r" };
    let mut node = Node::start_with(dir.path(), &addr, node_id, checkpoint);
    wait_nodes_ready(&c, &[&node], &addr).await;
    let mut job_spec = spec(2, COUNTER_SCRIPT);
    if checkpoint {
        // Root lacks CAP_SYS_RESOURCE on these hosts: CRIU dumps only sandboxes of uid 0.
        job_spec.user = "root".into();
    }
    let id = submit(&addr, job_spec, "adopt").await;
    wait_for(&c, &[&node], "both sandboxes counting", || async {
        (node.counter(id, 0) > 5 && node.counter(id, 1) > 5).then_some(())
    })
    .await;

    // The daemon dies hard and comes back well within the TTL.
    node.kill();
    let before = [node.counter(id, 0), node.counter(id, 1)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let without = node.counter(id, 0);
    check(
        &c,
        &[&node],
        without > before[0],
        &format!(
            "sandboxes keep running without their daemon: {} -> {without}",
            before[0]
        ),
    );
    node.spawn();
    wait_for(&c, &[&node], "the new daemon adopts both", || async {
        (node.log_text().matches("adopted a sandbox").count() >= 2).then_some(())
    })
    .await;
    // Still the same runs: counting on from where they were (a restart would begin at 1), the
    // same generation, and running as far as the scheduler knows.
    let after = [node.counter(id, 0), node.counter(id, 1)];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 0..2u32 {
        let now = node.counter(id, i);
        check(
            &c,
            &[&node],
            now > after[i as usize] && after[i as usize] >= before[i as usize],
            &format!(
                "sandbox {i}: counter {} -> {} -> {now}",
                before[i as usize], after[i as usize]
            ),
        );
        let s = sandbox(&addr, id, i).await;
        assert_eq!(
            (s.state().name(), s.generation, s.node.as_str()),
            ("running", 0, node_id)
        );
    }
    let j = job(&addr, id).await;
    assert_eq!(j.counts.unwrap_or_default().running, 2, "{j:?}");

    // ... and still driven: exec through the API reaches both adopted sandboxes (the new daemon
    // registered its new I/O address), as the sandbox's user.
    let cl = surge_client::Client::open(&addr).expect("client");
    for i in 0..2u32 {
        let r = wait_for(&c, &[&node], "exec into an adopted sandbox", || {
            let cl = cl.clone();
            async move {
                cl.exec_output(id, i, &surge_client::io::Exec::new(["id", "-u"]), None, 64)
                    .await
                    .ok()
            }
        })
        .await;
        assert_eq!(r.exit.exit_code, 0, "{r:?}");
        let uid = String::from_utf8_lossy(&r.stdout).trim().to_string();
        assert!(
            !uid.is_empty() && (uid == "0") == checkpoint,
            "exec ran as uid {uid:?}"
        );
    }

    if checkpoint {
        // An adopted sandbox still checkpoints (it stops counting) and resumes (it counts on).
        let sandbox0 = format!("{id}.0");
        cli(&addr, &["pause", "--checkpoint", &sandbox0]);
        wait_for(&c, &[&node], "the adopted sandbox checkpointed", || async {
            (sandbox(&addr, id, 0).await.state().name() == "checkpointed").then_some(())
        })
        .await;
        let saved = node.counter(id, 0);
        cli(&addr, &["resume", &sandbox0]);
        wait_for(&c, &[&node], "resumed, counting on", || async {
            let running = sandbox(&addr, id, 0).await.state().name() == "running";
            (running && node.counter(id, 0) > saved + 3).then_some(())
        })
        .await;

        // The restored sandbox's shim (`crun restore` piped) outlives a second kill too, and
        // the third daemon adopts it and execs into it.
        node.kill();
        let before = node.counter(id, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let without = node.counter(id, 0);
        check(
            &c,
            &[&node],
            without > before,
            &format!("a restored sandbox keeps running without its daemon: {before} -> {without}"),
        );
        node.spawn();
        wait_for(&c, &[&node], "the third daemon adopts both", || async {
            (node.log_text().matches("adopted a sandbox").count() >= 4).then_some(())
        })
        .await;
        let r = wait_for(
            &c,
            &[&node],
            "exec into the adopted restored sandbox",
            || {
                let cl = cl.clone();
                async move {
                    cl.exec_output(id, 0, &surge_client::io::Exec::new(["id", "-u"]), None, 64)
                        .await
                        .ok()
                }
            },
        )
        .await;
        assert_eq!(
            (r.exit.exit_code, r.stdout.as_slice()),
            (0, &b"0\n"[..]),
            "{r:?}"
        );
        let adopted = node.counter(id, 0);
        check(
            &c,
            &[&node],
            adopted >= without,
            &format!("the restored sandbox counted on: {without} -> {adopted}"),
        );
    }

    // The adopted sandboxes are still under control: stop them through the scheduler.
    cli(&addr, &["stop", &id.to_string()]);
    wait_for(&c, &[&node], "adopted sandboxes stop", || async {
        let j = job(&addr, id).await;
        (j.counts.unwrap_or_default().stopped == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_past_the_ttl_loses_its_work_and_stops_it_on_return() {
    let Some((c, dir, addr)) = cluster_for("cut_off", NODE_TTL_MS).await else {
        return;
    };
    let a = Node::start(dir.path(), &addr, "real-x");
    wait_nodes_ready(&c, &[&a], &addr).await;
    let id = submit(&addr, spec(1, COUNTER_SCRIPT), "moved").await;
    wait_for(&c, &[&a], "the sandbox counts on node a", || async {
        (a.counter(id, 0) > 3).then_some(())
    })
    .await;
    let b = Node::start(dir.path(), &addr, "real-y");
    wait_nodes_ready(&c, &[&a, &b], &addr).await;

    // Freeze node a's daemon (its sandbox keeps running): past the TTL the scheduler marks it
    // down and runs the sandbox again, as a new generation, on node b.
    a.signal(libc::SIGSTOP);
    let moved = wait_for(&c, &[&a, &b], "the sandbox is rescheduled on b", || async {
        let s = sandbox(&addr, id, 0).await;
        (s.node == "real-y" && s.state().name() == "running" && s.generation == 1).then_some(s)
    })
    .await;
    assert_eq!(moved.generation, 1);
    wait_for(&c, &[&a, &b], "the new run counts on b", || async {
        (b.counter(id, 0) > 3).then_some(())
    })
    .await;
    assert!(
        a.counter(id, 0) > 0,
        "the old run is still there while a is frozen"
    );

    // Node a returns: it learns the sandbox is not its own any more and stops its copy; b's
    // run is untouched.
    a.signal(libc::SIGCONT);
    wait_for(
        &c,
        &[&a, &b],
        "node a stops and releases its foreign sandbox",
        || async { (!a.sandbox_dir(id, 0).exists()).then_some(()) },
    )
    .await;
    let b_before = b.counter(id, 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(b.counter(id, 0) > b_before, "b's run keeps going");
    let s = sandbox(&addr, id, 0).await;
    assert_eq!(
        (s.node.as_str(), s.state().name(), s.generation),
        ("real-y", "running", 1),
        "a's late report about generation 0 changed nothing"
    );
    wait_nodes_ready(&c, &[&a, &b], &addr).await;
    let log = a.log_text();
    assert!(
        log.contains("re-registering") || log.contains("registered"),
        "node a reconnected: {log}"
    );

    // b's sandbox is still running: removing the nodes leaves nothing on the host.
    for n in [a, b] {
        let id = n.id.clone();
        let left = n.remove();
        assert!(left.is_empty(), "node {id} left behind: {left:?}");
    }
}

/// A long-lived container sandbox (no command) driven through the CLI like an agent does:
/// separate stdout and stderr with the command's exit code, stdin, a timeout that kills, and a
/// directory copied in and back out intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_container_sandbox_is_driven_through_the_cli() {
    let Some((c, dir, addr)) = cluster_for("driven_through_the_cli", NODE_TTL_MS).await else {
        return;
    };
    let node = Node::start(dir.path(), &addr, "real-e");
    wait_nodes_ready(&c, &[&node], &addr).await;
    let mut long = spec(1, "");
    long.command = Vec::new();
    let id = submit(&addr, long, "long").await;
    let sb = format!("{id}.0");
    cli(&addr, &["wait", &sb, "--timeout", "60s"]);
    let exec = |args: &[&str], stdin: Option<&[u8]>| {
        let mut cmd = Command::new(bin());
        cmd.args(["exec", "--server", &addr]).args(args);
        if stdin.is_some() {
            cmd.stdin(std::process::Stdio::piped());
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("surge exec");
        if let Some(data) = stdin {
            use std::io::Write;
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(data).expect("write stdin");
        }
        child.wait_with_output().expect("surge exec")
    };
    let out = exec(
        &[&sb, "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let out = exec(&[&sb, "--stdin", "--", "wc", "-c"], Some(b"12345"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5", "{out:?}");
    let out = exec(&[&sb, "--timeout", "300ms", "--", "sleep", "30"], None);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    // Nothing of the killed command is left (PID 1, the init, is all that runs).
    let left = exec(
        &[
            &sb,
            "--",
            "sh",
            "-c",
            "ps -o pid,comm | grep -c sleep || true",
        ],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "0",
        "{left:?}"
    );
    // A client that goes away mid-stream: its command (and what it started) is killed.
    let cl = surge_client::Client::open(&addr).expect("client");
    let stream = cl
        .exec(
            surge_client::io::Exec::new(["sh", "-c", "sleep 40 & sleep 41"]).start(id, 0, false),
            None,
        )
        .await
        .expect("exec");
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = exec(
            &[&sb, "--", "sh", "-c", "ps -o comm | grep -c sleep || true"],
            None,
        );
        if String::from_utf8_lossy(&left.stdout).trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned exec's processes live on: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A directory in and back out, byte for byte.
    let src = dir.path().join("tree");
    std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
    let blob: Vec<u8> = (0..200_000u32)
        .map(|i| u8::try_from(i % 251).expect("below 251"))
        .collect();
    std::fs::write(src.join("a/b/blob"), &blob).expect("write");
    std::fs::write(src.join("top.txt"), b"top").expect("write");
    cli(
        &addr,
        &[
            "cp",
            src.to_str().expect("utf8"),
            &format!("{sb}:/work/tree"),
        ],
    );
    let owner = exec(
        &[&sb, "--", "stat", "-c", "%u", "/work/tree/a/b/blob"],
        None,
    );
    let uid = exec(&[&sb, "--", "id", "-u"], None);
    assert_eq!(
        owner.stdout, uid.stdout,
        "files land owned by the sandbox's user"
    );
    let back = dir.path().join("back");
    cli(
        &addr,
        &[
            "cp",
            &format!("{sb}:/work/tree"),
            back.to_str().expect("utf8"),
        ],
    );
    assert_eq!(std::fs::read(back.join("a/b/blob")).expect("blob"), blob);
    assert_eq!(std::fs::read(back.join("top.txt")).expect("top"), b"top");
    cli(&addr, &["cancel", &id.to_string()]);
}
