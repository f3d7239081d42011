//! The web console (`/ui`) in a real browser: a local cluster of 3 replicas, a real container
//! node and 1,000 simulated nodes, and Debian's `chromium` headless (installed by
//! `scripts/setup`), driven over the DevTools protocol (`tests/cdp`).
//!
//! Checked through the browser: the overview's `#nodes-ready` and `#sandboxes-running` match the
//! gRPC API; the heatmap has one cell per node and a click opens the node; a job submitted
//! through the API appears on the jobs page without a reload; a failed sandbox's exit code and
//! output tail are on its job page; the page logged no errors; and a heatmap of 10,000 nodes
//! renders within [`RENDER_10K_BOUND`]. Screenshots of the overview, heatmap and a job page are
//! saved under `$CARGO_TARGET_TMPDIR/console/` (and copied to `docs/img/` with
//! `SURGE_UPDATE_SCREENSHOTS=1`).

mod cdp;
mod common;
mod ops;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use ops::*;
use serde_json::Value;
use surge_client::open as client;
use surge_proto::node as npb;

/// Simulated nodes (the 1,000), plus one real container node.
const SIM_NODES: u32 = 1000;
/// How long the cluster and the page may take to converge (registration of 1,000 nodes on a
/// shared 2-core machine; the page polls every 2 s). A bound on waiting, not a measurement.
const CONVERGE: Duration = Duration::from_secs(180);
/// A heatmap of 10,000 nodes must render within this in headless chromium. Generous on
/// purpose (a shared, unoptimised CI box): it catches a quadratic render, not a slow machine.
const RENDER_10K_BOUND: Duration = Duration::from_secs(20);
/// What the failing sandbox prints before it exits 3.
const FAIL_OUTPUT: &str = "reward-model-unreachable";

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("console")
}

/// POST a job through the JSON API; its id.
async fn submit(web: &str, body: Value) -> u64 {
    let (code, text) = http(
        web,
        "POST",
        "/v1/jobs",
        "application/json",
        body.to_string().as_bytes(),
    )
    .await;
    assert!(code == 201 || code == 200, "submit: {code} {text}");
    let v: Value = serde_json::from_str(&text).expect("submit reply");
    v["job_id"].as_u64().expect("job id")
}

/// The ready nodes the gRPC API lists (empty while the cluster cannot answer yet).
async fn ready_nodes(addr: &str) -> Vec<npb::NodeInfo> {
    let mut c = client::nodes(addr).expect("nodes client");
    match c.list_nodes(npb::ListNodesRequest {}).await {
        Ok(r) => r
            .into_inner()
            .nodes
            .into_iter()
            .filter(|n| n.state().name() == "ready")
            .collect(),
        Err(e) => {
            eprintln!("t95: list nodes: {e}");
            Vec::new()
        }
    }
}

/// A job as the gRPC API has it, or `None` while the cluster cannot answer (an election on a
/// loaded machine).
async fn try_job(addr: &str, id: u64) -> Option<surge_proto::jobs::Job> {
    let mut c = client::jobs(addr).ok()?;
    match c
        .get_job(surge_proto::jobs::GetJobRequest { job_id: id })
        .await
    {
        Ok(r) => Some(r.into_inner()),
        Err(e) => {
            eprintln!("t95: get job {id}: {e}");
            None
        }
    }
}

async fn running_sandboxes(addr: &str) -> u64 {
    jobs_on(addr)
        .await
        .iter()
        .map(|j| u64::from(j.counts.unwrap_or_default().running))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_cluster_in_a_real_browser() {
    let Some(chromium) = debian_tool("chromium") else {
        return;
    };
    if let Err(why) = surge_harness::containers::usable() {
        surge_node::testing::unavailable(&format!("no real container node on this host: {why}"));
        return;
    }
    // Patient Raft and node timings: this test is about the console, and 1,000 simulated nodes
    // with 3 debug-build replicas on a shared 2-core box must not flap elections or mark nodes
    // down (which would move the counts the page is compared against).
    let (mut c, dir, leader) = cluster(
        3,
        &[
            "--heartbeat-interval-ms",
            "500",
            "--election-timeout-min-ms",
            "4000",
            "--election-timeout-max-ms",
            "8000",
            "--node-ttl-ms",
            "120000",
        ],
    )
    .await;
    c.start_container_node("real-0", &["--pool", "real", "--label", "kind=real"])
        .expect("container node");
    c.start_sim_nodes(
        "sim",
        SIM_NODES,
        &[
            "--pool",
            "sim",
            "--cpus",
            "16",
            "--sim-duration-ms",
            "600000",
        ],
    )
    .expect("sim nodes");
    let addr = c.addr(leader).expect("leader addr");
    let web = c.replica(leader).expect("leader").http.clone();
    // A follower serves the console too: the page is opened there.
    let follower = *c
        .ids()
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");
    let ui_web = c.replica(follower).expect("follower").http.clone();

    let total = SIM_NODES as usize + 1;
    let deadline = Instant::now() + CONVERGE;
    while ready_nodes(&addr).await.len() < total {
        assert!(Instant::now() < deadline, "{total} nodes never all ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Work for the pictures: a running job on the simulated nodes, and one on the real node
    // whose sandbox fails with output.
    let busy = submit(
        &web,
        serde_json::json!({"count": 2000, "cpu": "1", "memory_mib": 512, "template": "busybox",
            "tenant": "test", "name": "rollouts", "constraints": ["pool=sim"],
            "labels": {"run": "exp7"}}),
    )
    .await;
    let failing = submit(
        &web,
        serde_json::json!({"count": 1, "cpu": "0.1", "memory_mib": 64, "template": "busybox",
            "tenant": "test", "name": "reward-check", "constraints": ["kind=real"],
            "command": ["sh", "-c", format!("echo {FAIL_OUTPUT}; exit 3")]}),
    )
    .await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let f = try_job(&addr, failing).await;
        let b = try_job(&addr, busy).await;
        if let (Some(f), Some(b)) = (&f, &b) {
            if f.state().name() == "failed" && b.counts.unwrap_or_default().running == 2000 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "jobs never settled: failing {f:?} busy {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let nodes_ready = ready_nodes(&addr).await.len();
    let running = running_sandboxes(&addr).await;
    assert_eq!(running, 2000);

    let profile = tempfile::tempdir().expect("profile dir");
    let mut b = cdp::Browser::start(&chromium, profile.path(), 1400, 1000);
    b.navigate(&format!("http://{ui_web}/ui/"));

    // The overview's counts are the API's.
    b.wait_for(
        "document.getElementById('nodes-ready')?.textContent",
        "nodes ready on the overview",
        CONVERGE,
        |v| v.as_str() == Some(nodes_ready.to_string().as_str()),
    );
    b.wait_for(
        "document.getElementById('sandboxes-running')?.textContent",
        "sandboxes running on the overview",
        CONVERGE,
        |v| v.as_str() == Some(running.to_string().as_str()),
    );
    // Two polls, so the utilisation chart has a line.
    let loaded = b
        .eval("+document.body.dataset.loaded")
        .as_u64()
        .unwrap_or(0);
    b.wait_for(
        "+document.body.dataset.loaded",
        "a second poll",
        CONVERGE,
        |v| v.as_u64().unwrap_or(0) >= loaded + 2,
    );
    b.screenshot(&artifacts().join("overview.png"));

    // The heatmap: one cell per node, each naming its node; a click opens the node's page.
    b.eval("location.hash = '#/nodes'");
    let cells = b.wait_for(
        "document.querySelectorAll('#heatmap .cell').length",
        "heatmap cells",
        CONVERGE,
        |v| v.as_u64().unwrap_or(0) > 0,
    );
    assert_eq!(cells.as_u64(), Some(total as u64), "one cell per node");
    let named = b.eval(
        "new Set([...document.querySelectorAll('#heatmap .cell')].map(c => c.dataset.node)).size",
    );
    assert_eq!(
        named.as_u64(),
        Some(total as u64),
        "every cell a distinct node"
    );
    let pools =
        b.eval("[...document.querySelectorAll('#heatmap .pool h3')].map(h => h.textContent)");
    let pools = pools.to_string();
    assert!(
        pools.contains("pool real") && pools.contains("pool sim"),
        "{pools}"
    );
    b.screenshot(&artifacts().join("heatmap.png"));
    b.eval("document.querySelector('#heatmap .cell[data-node=\"real-0\"]').click()");
    b.wait_for(
        "document.querySelector('main h1')?.textContent",
        "the node page after a click",
        CONVERGE,
        |v| v.as_str().is_some_and(|t| t.starts_with("Node real-0")),
    );

    // The jobs page picks up a job submitted through the API without a reload.
    b.eval("location.hash = '#/jobs'");
    b.wait_for(
        &format!("!!document.querySelector('tr[data-job=\"{busy}\"]')"),
        "the jobs list",
        CONVERGE,
        |v| v == &Value::Bool(true),
    );
    b.eval("window.__same_page = 42");
    let late = submit(
        &web,
        serde_json::json!({"count": 5, "cpu": "0.5", "memory_mib": 256, "template": "busybox",
            "tenant": "test", "name": "late-arrival", "constraints": ["pool=sim"]}),
    )
    .await;
    b.wait_for(
        &format!("!!document.querySelector('tr[data-job=\"{late}\"]')"),
        "a job submitted after the page loaded",
        CONVERGE,
        |v| v == &Value::Bool(true),
    );
    assert_eq!(
        b.eval("window.__same_page").as_u64(),
        Some(42),
        "the page was reloaded"
    );

    // The failed sandbox's exit code and output tail on its job page.
    b.eval(&format!("location.hash = '#/job/{failing}'"));
    b.wait_for(
        "document.querySelector('#outcomes .exit-code')?.textContent",
        "the failed sandbox's exit code",
        CONVERGE,
        |v| v.as_str() == Some("3"),
    );
    let tail = b.eval("document.querySelector('#outcomes .output-tail')?.textContent");
    assert!(
        tail.as_str().is_some_and(|t| t.contains(FAIL_OUTPUT)),
        "output tail: {tail}"
    );
    b.screenshot(&artifacts().join("job-failed.png"));
    // And a running job's page: its progress.
    b.eval(&format!("location.hash = '#/job/{busy}'"));
    b.wait_for(
        "document.getElementById('job-progress')?.textContent",
        "a running job's progress",
        CONVERGE,
        |v| v.as_str() == Some("0 / 2000"),
    );
    b.screenshot(&artifacts().join("job.png"));

    // 10,000 nodes render within the stated bound (a synthetic heatmap through the page's own
    // renderer; the cluster above is the 1,000-node one).
    b.eval("location.hash = '#/tenants'");
    let rendered = b.eval(
        "(() => { const pools = [0,1,2,3].map(p => ({pool: 'pool-' + p, nodes: []}));
           for (let i = 0; i < 10000; i++) pools[i % 4].nodes.push(
             ['n' + i, i % 97 ? 'ready' : 'down', 16000, 65536, (i * 37) % 16000, (i * 91) % 65536,
              (i * 13) % 16000, (i * 7) % 65536, i % 12]);
           const t0 = performance.now();
           const cells = window.surge.renderHeatmap({nodes: 10000, truncated: false, pools});
           document.body.offsetHeight; // layout included
           return {cells, ms: performance.now() - t0}; })()",
    );
    assert_eq!(rendered["cells"].as_u64(), Some(10_000), "{rendered}");
    let ms = rendered["ms"].as_f64().expect("ms");
    eprintln!("t95: a 10,000-node heatmap rendered in {ms:.0} ms (bound {RENDER_10K_BOUND:?})");
    assert!(
        ms < RENDER_10K_BOUND.as_secs_f64() * 1000.0,
        "10,000-node heatmap took {ms:.0} ms"
    );

    let errors = b.console_errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");

    if std::env::var_os("SURGE_UPDATE_SCREENSHOTS").is_some() {
        let img = repo().join("docs/img");
        std::fs::create_dir_all(&img).expect("docs/img");
        for f in ["overview.png", "heatmap.png", "job.png", "job-failed.png"] {
            std::fs::copy(artifacts().join(f), img.join(format!("console-{f}"))).expect("copy");
        }
    }
    drop(b);
    c.stop_all(Duration::from_secs(5));
    drop(dir);
}
