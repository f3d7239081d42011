//! `surge dev --demo`: an RL-style burst on the local cluster — simulated sandboxes on the
//! simulated nodes and short real ones on the container nodes — followed live to its end.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use surge_proto::jobs as pb;
use surge_proto::node::ListNodesRequest;

use crate::containers::{self, ContainerDaemon};
use crate::tracker::BurstTracker;

/// `surge node` daemons on the container runtime, stopped (and their containers removed) on drop.
pub struct RealNodes {
    children: Vec<Child>,
    pub daemons: Vec<ContainerDaemon>,
    root: PathBuf,
}

/// How long a real node daemon gets to exit after SIGTERM before it is killed.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl RealNodes {
    /// `args`: extra `surge node` flags for every daemon (e.g. `--tls-dir`).
    pub fn start(
        bin: &Path,
        root: &Path,
        servers: &str,
        count: u32,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let mut nodes = RealNodes {
            children: Vec::new(),
            daemons: Vec::new(),
            root: root.to_path_buf(),
        };
        for i in 0..count {
            let dir = root.join(format!("real-{i}"));
            let log = std::fs::File::create(root.join(format!("real-{i}.log")))?;
            let child = Command::new(bin)
                .arg("node")
                .args(["--server", servers])
                .args(["--node-id", &format!("real-{i}")])
                .args(["--runtime", "container"])
                .args([
                    "--cpus",
                    "1",
                    "--memory-mib",
                    "4096",
                    "--label",
                    "kind=real",
                ])
                .arg("--data-dir")
                .arg(&dir)
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start a real node daemon")?;
            nodes.children.push(child);
            nodes.daemons.push(ContainerDaemon {
                node: format!("real-{i}"),
                data_dir: dir,
            });
        }
        Ok(nodes)
    }

    /// Stop the daemons, then remove every container, mount and cgroup they left (a daemon's
    /// sandboxes outlive it on purpose), so nothing outlives `surge dev`.
    pub async fn stop(&mut self) {
        for c in &mut self.children {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        for c in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        let daemons = std::mem::take(&mut self.daemons);
        let root = self.root.clone();
        let _ = tokio::task::spawn_blocking(move || containers::cleanup(&daemons, &root)).await;
    }
}

impl Drop for RealNodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.daemons.is_empty() {
            containers::cleanup(&self.daemons, &self.root);
        }
    }
}

/// Longest the demo follows its burst.
const DEMO_TIMEOUT: Duration = Duration::from_secs(600);

/// One job of the demo.
#[derive(Clone, Debug)]
pub struct DemoJob {
    pub label: &'static str,
    pub id: u64,
    pub tracker: BurstTracker,
}

/// How the demo's burst went.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub jobs: Vec<DemoJob>,
    /// Seconds from the first submission until no node held a sandbox of the burst.
    pub released_s: Option<f64>,
    /// Highest share of the cluster's CPUs allocated at once.
    pub peak_utilisation: f64,
}

fn demo_job(
    count: u32,
    cpu_millis: u64,
    memory_mib: u64,
    kind: &str,
    command: Vec<String>,
) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            count,
            cpu_millis,
            memory_mib,
            template: "busybox".into(),
            command,
            tenant: "rl".into(),
            constraints: vec![pb::Constraint {
                key: "kind".into(),
                op: "=".into(),
                value: kind.into(),
            }],
            name: format!("demo-{kind}"),
            ..Default::default()
        }),
        idempotency_key: format!("demo-{kind}-{}", crate::bench::now_ms()),
    }
}

/// Submit the burst and follow it to the end, drawing its progress bars on stdout.
pub async fn run(
    addr: &str,
    sim_sandboxes: u32,
    real_sandboxes: u32,
) -> anyhow::Result<DemoReport> {
    let mut jobs = surge_client::open::jobs(addr)?;
    let mut nodes = surge_client::open::nodes(addr)?;
    let mut tracked = Vec::new();
    let started = Instant::now();
    if real_sandboxes > 0 {
        let command = vec!["sh".into(), "-c".into(), "echo episode; sleep 0.2".into()];
        let req = demo_job(real_sandboxes, 10, 16, "real", command);
        let id = jobs.submit_job(req).await?.into_inner().job_id;
        tracked.push(DemoJob {
            label: "real",
            id,
            tracker: BurstTracker::new(real_sandboxes),
        });
    }
    if sim_sandboxes > 0 {
        let req = demo_job(sim_sandboxes, 1000, 2048, "sim", vec!["rl-episode".into()]);
        let id = jobs.submit_job(req).await?.into_inner().job_id;
        tracked.push(DemoJob {
            label: "sim",
            id,
            tracker: BurstTracker::new(sim_sandboxes),
        });
    }
    let tty = std::io::stdout().is_terminal();
    let mut peak: f64 = 0.0;
    let mut released: Option<f64> = None;
    let mut last_print: Option<Instant> = None;
    loop {
        for t in tracked.iter_mut() {
            if let Ok(j) = jobs.get_job(pb::GetJobRequest { job_id: t.id }).await {
                let counts = j.into_inner().counts.unwrap_or_default();
                t.tracker.update(started.elapsed().as_secs_f64(), counts);
            }
        }
        if let Ok(r) = nodes.list_nodes(ListNodesRequest {}).await {
            let list = r.into_inner().nodes;
            let cap: u64 = list
                .iter()
                .map(|n| n.allocatable.unwrap_or_default().cpu_millis)
                .sum();
            let used: u64 = list
                .iter()
                .map(|n| n.allocated.unwrap_or_default().cpu_millis)
                .sum();
            let held: u64 = list.iter().map(|n| u64::from(n.sandboxes)).sum();
            if cap > 0 {
                #[allow(clippy::cast_precision_loss, reason = "a ratio for display")]
                let util = used as f64 / cap as f64;
                peak = peak.max(util);
            }
            let all_done = tracked.iter().all(|t| t.tracker.done_s.is_some());
            if all_done && held == 0 && released.is_none() {
                released = Some(started.elapsed().as_secs_f64());
            }
        }
        let finished = released.is_some();
        if tty {
            let mut out = std::io::stdout();
            for t in &tracked {
                let _ = write!(out, "\r\x1b[2K{}\n", t.tracker.bar(t.label));
            }
            let _ = write!(out, "\x1b[{}A", tracked.len());
            let _ = out.flush();
        } else if finished || last_print.is_none_or(|p| p.elapsed() >= Duration::from_secs(1)) {
            for t in &tracked {
                println!("{}", t.tracker.bar(t.label));
            }
            last_print = Some(Instant::now());
        }
        if finished {
            break;
        }
        if started.elapsed() > DEMO_TIMEOUT {
            bail!("the demo did not finish within {DEMO_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if tty {
        for t in &tracked {
            println!("\r\x1b[2K{}", t.tracker.bar(t.label));
        }
    }
    Ok(DemoReport {
        jobs: tracked,
        released_s: released,
        peak_utilisation: peak,
    })
}

/// How the demo's agent phase went: sandboxes driven like an RL rollout's tool calls.
#[derive(Clone, Debug)]
pub struct AgentReport {
    pub sandboxes: u32,
    pub execs_each: u32,
    pub wall_s: f64,
    pub first_output: crate::bench::exec::Spread,
    pub exec: crate::bench::exec::Spread,
    pub files_ok: u32,
}

/// The agent phase: `sandboxes` long-lived container sandboxes created in one call, each
/// driven by `execs` exec calls and a file round trip, with a progress bar on stdout.
pub async fn agents(servers: &str, sandboxes: u32, execs: u32) -> anyhow::Result<AgentReport> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let c = surge_client::Client::open(servers)?;
    let started = Instant::now();
    let mut req = demo_job(sandboxes, 10, 32, "real", Vec::new());
    if let Some(spec) = req.spec.as_mut() {
        spec.ttl_ms = 600_000;
        spec.labels.insert("demo".into(), "agents".into());
    }
    let job = c.submit(req).await?.job_id;
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let total = u64::from(sandboxes) * u64::from(execs);
    let drive = crate::bench::exec::drive(
        &c,
        job,
        sandboxes,
        execs,
        started,
        DEMO_TIMEOUT,
        done.clone(),
    );
    tokio::pin!(drive);
    let tty = std::io::stdout().is_terminal();
    let bar = |n: u64| {
        let fill = usize::try_from(n.min(total) * 30 / total.max(1)).unwrap_or(0);
        format!(
            "agents [{}{}] {n}/{total} execs in {sandboxes} sandboxes",
            "#".repeat(fill),
            ".".repeat(30 - fill)
        )
    };
    let mut last = Instant::now();
    let driven = loop {
        tokio::select! {
            r = &mut drive => break r,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                let n = done.load(Ordering::Relaxed);
                if tty {
                    print!("\r\x1b[2K{}", bar(n));
                    let _ = std::io::stdout().flush();
                } else if last.elapsed() >= Duration::from_secs(1) {
                    println!("{}", bar(n));
                    last = Instant::now();
                }
            }
        }
    };
    let n = done.load(Ordering::Relaxed);
    if tty {
        println!("\r\x1b[2K{}", bar(n));
    } else {
        println!("{}", bar(n));
    }
    let wall_s = started.elapsed().as_secs_f64();
    // Whatever happened, the sandboxes go.
    let _ = c.cancel_job(job).await;
    let d = driven?;
    Ok(AgentReport {
        sandboxes,
        execs_each: execs,
        wall_s,
        first_output: crate::bench::exec::Spread::of(d.first_output_ms),
        exec: crate::bench::exec::Spread::of(d.exec_ms),
        files_ok: d.files_ok,
    })
}
