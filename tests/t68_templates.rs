//! Templates made from sandboxes and copied between nodes, end to end: a real replica, two real
//! `surge node --runtime container` daemons (crun), real sandboxes. Needs root, crun and
//! busybox-static (`scripts/setup`); where they are missing the test says SKIPPED and passes,
//! but fails under `CI=true`.
//!
//! A sandbox is changed through exec, captured with `surge snapshot`, the template copied to the
//! other node with `surge template copy` (node to node), and a job pinned to that node boots
//! from it and sees the changes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use surge_client::io::Exec;
use surge_client::Client;
use surge_harness::cluster::LocalCluster;
use surge_harness::containers::{self, ContainerDaemon};
use surge_proto::jobs as pb;

/// How long any one wait in this test may take.
const WAIT: Duration = Duration::from_secs(120);

/// The cluster, then the container daemons' leftovers (containers, mounts, cgroups), removed
/// when the test ends however it ends.
struct Rig {
    cluster: LocalCluster,
    daemons: Vec<ContainerDaemon>,
    _dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for d in &self.daemons {
            self.cluster.kill_nodes(&d.node);
        }
        for d in &self.daemons {
            containers::cleanup(std::slice::from_ref(d), &d.data_dir);
        }
    }
}

fn cli(addr: &str, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--server", addr]);
    surge_ok(&args)
}

/// `surge ARGS` that must fail; its stderr.
fn cli_fails(addr: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(args)
        .args(["--server", addr])
        .output()
        .expect("run surge");
    assert!(!out.status.success(), "surge {args:?} succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn wait_for<T, F, Fut>(rig: &Rig, what: &str, mut probe: F) -> T
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
            dump_logs(&rig.cluster);
            for d in &rig.daemons {
                let log = rig
                    .cluster
                    .container_node_dir(&d.node)
                    .with_extension("log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- node {} ---\n{}",
                    d.node,
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether node `node` reports template `t` (`None` while it does not).
async fn reports(client: &Client, node: &str, t: &str) -> Option<()> {
    let nodes = client.list_nodes().await.ok()?;
    nodes
        .iter()
        .any(|n| {
            n.node_id == node && n.state().name() == "ready" && n.templates.iter().any(|x| x == t)
        })
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_made_from_a_sandbox_starts_elsewhere_after_a_copy() {
    if let Err(why) = containers::usable() {
        surge_node::testing::unavailable(&format!("templates from sandboxes: {why}"));
        return;
    }
    let (cluster, dir, leader) = cluster(1, &[]).await;
    let addr = cluster.addr(leader).expect("addr");
    let mut rig = Rig {
        cluster,
        daemons: Vec::new(),
        _dir: dir,
    };
    for (node, side) in [("tpl-a", "side=a"), ("tpl-b", "side=b")] {
        rig.cluster
            .start_container_node(
                node,
                &["--cpus", "2", "--memory-mib", "2048", "--label", side],
            )
            .expect("start a container node");
        rig.daemons.push(ContainerDaemon {
            node: node.into(),
            data_dir: rig.cluster.container_node_dir(node),
        });
    }
    let client = Client::open(&addr).expect("client");
    for node in ["tpl-a", "tpl-b"] {
        wait_for(&rig, "both nodes ready", || {
            reports(&client, node, "busybox")
        })
        .await;
    }

    // A long-lived sandbox on node a, changed through exec.
    let id = submit_spec(
        &addr,
        pb::JobSpec {
            count: 1,
            cpu_millis: 200,
            memory_mib: 64,
            template: "busybox".into(),
            tenant: "t".into(),
            constraints: vec![pb::Constraint {
                key: "side".into(),
                op: "=".into(),
                value: "a".into(),
            }],
            ..Default::default()
        },
        "prepared",
    )
    .await;
    let sb = format!("{id}.0");
    cli(&addr, &["wait", &sb, "--timeout", "60s"]);
    let prepare = Exec::new([
        "sh",
        "-c",
        "echo made-in-the-sandbox > /work/marker && mkdir -p /work/tool && echo 42 > /work/tool/answer",
    ]);
    let r = client
        .exec_output(id, 0, &prepare, None, 1 << 16)
        .await
        .expect("prepare the sandbox");
    assert_eq!(r.exit.exit_code, 0, "{r:?}");

    // Snapshot it: the node holding it makes the template, and reports it.
    let out = cli(&addr, &["snapshot", &sb, "--template", "prepared"]);
    assert!(out.contains("made on node tpl-a"), "{out}");
    // The sandbox was thawed: it still runs and takes execs.
    let r = client
        .exec_output(id, 0, &Exec::new(["cat", "/work/marker"]), None, 1 << 16)
        .await
        .expect("exec after the snapshot");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "made-in-the-sandbox\n");
    // The same name again, and a bad name, are refused with a reason.
    let err = cli_fails(&addr, &["snapshot", &sb, "--template", "prepared"]);
    assert!(err.contains("already exists"), "{err}");
    let err = cli_fails(&addr, &["snapshot", &sb, "--template", "no spaces"]);
    assert!(err.contains("template"), "{err}");
    wait_for(&rig, "node a to report the template", || {
        reports(&client, "tpl-a", "prepared")
    })
    .await;

    // Copy it to node b, node to node; copying what nobody holds fails with a reason.
    let out = cli(&addr, &["template", "copy", "prepared", "--to", "tpl-b"]);
    assert!(out.contains("1 copied, 0 failed"), "{out}");
    assert!(out.contains("from node tpl-a"), "{out}");
    let err = cli_fails(&addr, &["template", "copy", "nowhere", "--to", "tpl-b"]);
    assert!(
        err.contains("no ready node holds template nowhere"),
        "{err}"
    );
    // Again: node b holds it now, so nothing is copied and nothing fails.
    let out = cli(&addr, &["template", "copy", "prepared", "--to", "tpl-b"]);
    assert!(out.contains("already holds"), "{out}");
    // No staging directory is left on the target.
    let left: Vec<String> =
        std::fs::read_dir(rig.cluster.container_node_dir("tpl-b").join("templates"))
            .expect("templates of node b")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
    assert!(left.is_empty(), "{left:?}");
    wait_for(&rig, "node b to report the template", || {
        reports(&client, "tpl-b", "prepared")
    })
    .await;

    // A job pinned to node b boots from the copy and sees what the sandbox had written.
    let started = submit_spec(
        &addr,
        pb::JobSpec {
            count: 1,
            cpu_millis: 200,
            memory_mib: 64,
            template: "prepared".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "cat /work/marker /work/tool/answer".into(),
            ],
            tenant: "t".into(),
            constraints: vec![pb::Constraint {
                key: "side".into(),
                op: "=".into(),
                value: "b".into(),
            }],
            ..Default::default()
        },
        "from-copy",
    )
    .await;
    let s = wait_for(&rig, "the job from the copy to end", || async {
        let s = client.get_sandbox(started, 0).await.ok()?;
        (s.finished_at_ms != 0).then_some(s)
    })
    .await;
    assert_eq!(s.node, "tpl-b", "{s:?}");
    assert_eq!(s.state().name(), "succeeded", "{s:?}");
    assert!(
        s.log_tail.contains("made-in-the-sandbox") && s.log_tail.contains("42"),
        "{s:?}"
    );
}

/// Where a snapshot cannot work (simulated nodes: no root filesystem on the host), the call
/// fails in one line saying why; another tenant's sandbox is "no job", as for exec; a copy
/// nobody can serve names why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_copies_refuse_with_reasons_on_simulated_nodes() {
    let (mut c, _dir, leader) = cluster(1, &[]).await;
    c.start_sim_nodes("s", 2, &["--sim-duration-ms", "600000"])
        .expect("nodes");
    let addr = c.addr(leader).expect("addr");
    let id = submit_spec(
        &addr,
        pb::JobSpec {
            count: 1,
            cpu_millis: 100,
            memory_mib: 64,
            template: "busybox".into(),
            command: vec!["sleep".into(), "600".into()],
            tenant: "t".into(),
            ..Default::default()
        },
        "sim",
    )
    .await;
    let sb = format!("{id}.0");
    cli(&addr, &["wait", &sb, "--timeout", "60s"]);
    let err = cli_fails(&addr, &["snapshot", &sb, "--template", "x"]);
    assert!(
        err.contains("not supported by this runtime") && err.contains("container"),
        "{err}"
    );
    let err = cli_fails(
        &addr,
        &["snapshot", &format!("{}.0", id + 100), "--template", "x"],
    );
    assert!(err.contains(&format!("no job {}", id + 100)), "{err}");
    // Every node holds busybox already: nothing to copy, nothing failed.
    let out = cli(&addr, &["template", "copy", "busybox", "--count", "1"]);
    assert!(out.contains("0 copied, 0 failed"), "{out}");
    let err = cli_fails(&addr, &["template", "copy", "busybox"]);
    assert!(err.contains("say where to copy"), "{err}");
}
