//! `surge dev --demo`: an RL-style burst on the local cluster, with live progress and a summary.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use surge_chaos::client;
use surge_chaos::containers::{self, ContainerDaemon};
use surge_proto::jobs as pb;
use surge_proto::node::ListNodesRequest;

use super::output::table;

/// `surge node` daemons on the container runtime, stopped (and their containers removed) on drop.
pub struct RealNodes {
    children: Vec<Child>,
    daemons: Vec<ContainerDaemon>,
    root: PathBuf,
}

/// How long a real node daemon gets to exit after SIGTERM before it is killed.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl RealNodes {
    pub fn start(bin: &Path, root: &Path, servers: &str, count: u32) -> anyhow::Result<Self> {
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

/// One job of the demo and the moments it reached each phase.
struct Tracked {
    label: &'static str,
    id: u64,
    count: u32,
    submitted: Instant,
    placed: Option<f64>,
    running: Option<f64>,
    done: Option<f64>,
    last: pb::Counts,
}

impl Tracked {
    fn update(&mut self, c: pb::Counts) {
        let t = self.submitted.elapsed().as_secs_f64();
        let finished = c.succeeded + c.failed + c.oom_killed + c.lost + c.cancelled;
        if self.placed.is_none() && c.pending == 0 {
            self.placed = Some(t);
        }
        if self.running.is_none() && c.running + finished >= self.count {
            self.running = Some(t);
        }
        if self.done.is_none() && finished >= self.count {
            self.done = Some(t);
        }
        self.last = c;
    }

    fn bar(&self) -> String {
        let c = self.last;
        let finished = c.succeeded + c.failed + c.oom_killed + c.lost + c.cancelled;
        let width = 30u64;
        let total = u64::from(self.count.max(1));
        let placed = u64::from(self.count - c.pending.min(self.count));
        let fill = |n: u64| (n * width / total) as usize;
        let (d, r, p) = (
            fill(u64::from(finished)),
            fill(u64::from(c.running)),
            fill(placed),
        );
        let bar: String = (0..width as usize)
            .map(|i| {
                if i < d {
                    '#'
                } else if i < d + r {
                    '='
                } else if i < p {
                    '-'
                } else {
                    '.'
                }
            })
            .collect();
        format!(
            "{:<5} [{bar}] placed {:>7}  running {:>7}  done {:>7}/{}",
            self.label, placed, c.running, finished, self.count
        )
    }
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into())
}

/// Submit the burst and follow it to the end.
pub async fn run(addr: &str, sim_sandboxes: u32, real_sandboxes: u32) -> anyhow::Result<()> {
    let mut jobs = client::jobs(addr)?;
    let mut nodes = client::nodes(addr)?;
    let submit =
        |count: u32, cpu_millis: u64, memory_mib: u64, kind: &str, command: Vec<String>| {
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
                idempotency_key: format!("demo-{kind}-{}", super::super::now_ms()),
            }
        };
    let mut tracked = Vec::new();
    if real_sandboxes > 0 {
        let req = submit(
            real_sandboxes,
            10,
            16,
            "real",
            vec!["sh".into(), "-c".into(), "echo episode; sleep 0.2".into()],
        );
        let id = jobs.submit_job(req).await?.into_inner().job_id;
        tracked.push(Tracked {
            label: "real",
            id,
            count: real_sandboxes,
            submitted: Instant::now(),
            placed: None,
            running: None,
            done: None,
            last: Default::default(),
        });
    }
    if sim_sandboxes > 0 {
        let req = submit(sim_sandboxes, 1000, 2048, "sim", vec!["rl-episode".into()]);
        let id = jobs.submit_job(req).await?.into_inner().job_id;
        tracked.push(Tracked {
            label: "sim",
            id,
            count: sim_sandboxes,
            submitted: Instant::now(),
            placed: None,
            running: None,
            done: None,
            last: Default::default(),
        });
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut peak_util: f64 = 0.0;
    let mut released: Option<f64> = None;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        for t in tracked.iter_mut() {
            if let Ok(j) = jobs.get_job(pb::GetJobRequest { job_id: t.id }).await {
                t.update(j.into_inner().counts.unwrap_or_default());
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
                peak_util = peak_util.max(used as f64 / cap as f64);
            }
            if tracked.iter().all(|t| t.done.is_some()) && held == 0 && released.is_none() {
                released = Some(started.elapsed().as_secs_f64());
            }
        }
        let finished = released.is_some();
        if tty {
            let mut out = std::io::stdout();
            for t in &tracked {
                let _ = write!(out, "\r\x1b[2K{}\n", t.bar());
            }
            let _ = write!(out, "\x1b[{}A", tracked.len());
            let _ = out.flush();
        } else if last_print.elapsed() >= Duration::from_secs(1) || finished {
            for t in &tracked {
                println!("{}", t.bar());
            }
            last_print = Instant::now();
        }
        if finished {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the demo did not finish within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if tty {
        for t in &tracked {
            println!("\r\x1b[2K{}", t.bar());
        }
    }
    println!();
    let rows: Vec<Vec<String>> = tracked
        .iter()
        .map(|t| {
            vec![
                t.label.to_string(),
                t.count.to_string(),
                secs(t.placed),
                secs(t.running),
                secs(t.done),
            ]
        })
        .collect();
    table(
        &["JOB", "SANDBOXES", "ALL PLACED", "ALL STARTED", "ALL DONE"],
        &rows,
    );
    println!();
    println!(
        "capacity released {} after submit; CPU utilisation at peak {:.0}%",
        secs(released),
        peak_util * 100.0
    );
    Ok(())
}
