//! `surge bench exec`: the path agents drive, in three parts.
//!
//! - **anchor**: exec of `true` in one running container sandbox through the API (client ->
//!   replica -> node -> `crun exec --process`), side by side with plain `crun exec` of the same
//!   container, interleaved so both see the same machine: p50, p99 and their ratio.
//! - **rl**: the RL pattern on real containers: sandboxes created in one call, each driven by
//!   sequential execs with ~1 KiB of output, one file upload and download, from one client:
//!   wall time, exec p50/p99, create -> first exec output.
//! - **scale**: execs into thousands of simulated sandboxes through every replica at once:
//!   execs/s and each replica's CPU, to show the leader is not the bottleneck.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::json;
use surge_client::io::Exec;
use surge_client::Client;
use surge_proto::jobs as pb;
use tokio::task::JoinSet;

use super::{percentile, start_cluster};
use crate::containers::ContainerDaemon;
use crate::demo::RealNodes;

#[derive(Clone, Debug)]
pub struct ExecConfig {
    pub replicas: u64,
    /// anchor: execs per side.
    pub anchor_execs: u32,
    /// rl: sandboxes, and sequential execs in each.
    pub rl_sandboxes: u32,
    pub rl_execs: u32,
    /// scale: simulated sandboxes, execs into each, execs in flight.
    pub scale_sandboxes: u32,
    pub scale_execs: u32,
    pub scale_concurrency: u32,
    /// Skip the parts that need real containers (a host without crun).
    pub skip_containers: bool,
    pub timeout: Duration,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            replicas: 3,
            anchor_execs: 200,
            rl_sandboxes: 64,
            rl_execs: 40,
            scale_sandboxes: 10_000,
            scale_execs: 10,
            scale_concurrency: 256,
            skip_containers: false,
            timeout: Duration::from_secs(300),
        }
    }
}

/// Latencies in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Spread {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(mut ms: Vec<f64>) -> Spread {
        ms.sort_by(f64::total_cmp);
        Spread {
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            n: ms.len(),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "n": self.n})
    }
}

#[derive(Clone, Debug)]
pub struct AnchorReport {
    pub api: Spread,
    pub crun: Spread,
}

#[derive(Clone, Debug)]
pub struct RlReport {
    pub sandboxes: u32,
    pub execs_each: u32,
    pub wall_s: f64,
    pub exec: Spread,
    pub first_output: Spread,
    pub files_ok: u32,
}

#[derive(Clone, Debug)]
pub struct ScaleReport {
    pub sandboxes: u32,
    pub execs: u64,
    pub wall_s: f64,
    pub execs_per_s: f64,
    pub exec: Spread,
    /// (replica id, was leader, CPU seconds used during the phase)
    pub replica_cpu_s: Vec<(u64, bool, f64)>,
    pub node_cpu_s: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ExecReport {
    pub anchor: Option<AnchorReport>,
    pub rl: Option<RlReport>,
    pub scale: Option<ScaleReport>,
}

impl ExecReport {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "anchor": self.anchor.as_ref().map(|a| json!({
                "api": a.api.json(), "crun_exec": a.crun.json(),
                "ratio_p50": a.api.p50_ms / a.crun.p50_ms.max(1e-9),
                "ratio_p99": a.api.p99_ms / a.crun.p99_ms.max(1e-9),
            })),
            "rl": self.rl.as_ref().map(|r| json!({
                "sandboxes": r.sandboxes, "execs_each": r.execs_each, "wall_s": r.wall_s,
                "exec": r.exec.json(), "create_to_first_output": r.first_output.json(),
                "file_round_trips_ok": r.files_ok,
            })),
            "scale": self.scale.as_ref().map(|s| json!({
                "sandboxes": s.sandboxes, "execs": s.execs, "wall_s": s.wall_s,
                "execs_per_s": s.execs_per_s, "exec": s.exec.json(),
                "replica_cpu_s": s.replica_cpu_s.iter().map(|(id, leader, cpu)|
                    json!({"replica": id, "leader": leader, "cpu_s": cpu})).collect::<Vec<_>>(),
                "node_processes_cpu_s": s.node_cpu_s,
            })),
        })
    }
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[allow(clippy::cast_precision_loss, reason = "ticks per second is ~100")]
    Some((utime + stime) / ticks.max(1) as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn spec(count: u32, cpu_millis: u64, memory_mib: u64, kind: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            count,
            cpu_millis,
            memory_mib,
            template: "busybox".into(),
            // Long-lived: no command, up until cancelled (or the TTL, should the bench die).
            command: Vec::new(),
            ttl_ms: 3_600_000,
            tenant: "bench".into(),
            constraints: vec![pb::Constraint {
                key: "kind".into(),
                op: "=".into(),
                value: kind.into(),
            }],
            ..Default::default()
        }),
        idempotency_key: format!("bench-exec-{kind}-{}", super::now_ms()),
    }
}

/// Wait until every sandbox of `job` runs.
async fn wait_running(c: &Client, job: u64, count: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let j = c.get_job(job).await?;
        if j.counts.unwrap_or_default().running >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("job {job}: only {:?} after {timeout:?}", j.counts);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(cfg: ExecConfig, bin: &Path) -> anyhow::Result<ExecReport> {
    let dir = tempfile::tempdir()?;
    let mut report = ExecReport::default();
    let (mut cluster, leader) = start_cluster(bin, dir.path(), cfg.replicas).await?;
    let servers: Vec<String> = cluster
        .ids()
        .iter()
        .map(|i| cluster.addr(*i))
        .collect::<Result<_, _>>()?;
    let all = servers.join(",");
    if !cfg.skip_containers {
        crate::containers::usable().map_err(|e| {
            anyhow::anyhow!("{e} (pass --skip-containers to run the simulated part only)")
        })?;
        let nodes = RealNodes::start(bin, dir.path(), &all, 2, &[])?;
        let client = Client::open(&all)?;
        eprintln!("exec bench: anchor (API vs crun exec)...");
        report.anchor = Some(anchor(&cfg, &client, &nodes.daemons).await?);
        eprintln!("exec bench: RL pattern on real containers...");
        report.rl = Some(rl(&cfg, &client).await?);
        let mut nodes = nodes;
        nodes.stop().await;
    }
    eprintln!("exec bench: scale on simulated nodes...");
    report.scale = Some(scale(&cfg, &mut cluster, leader, &servers).await?);
    cluster.stop_all(Duration::from_secs(3));
    Ok(report)
}

async fn anchor(
    cfg: &ExecConfig,
    c: &Client,
    daemons: &[ContainerDaemon],
) -> anyhow::Result<AnchorReport> {
    let job = c.submit(spec(1, 100, 64, "real")).await?.job_id;
    wait_running(c, job, 1, cfg.timeout).await?;
    let info = c.get_sandbox(job, 0).await?;
    let daemon = daemons
        .iter()
        .find(|d| d.node == info.node)
        .with_context(|| format!("sandbox {job}.0 runs on {}, not a bench node", info.node))?;
    let root: PathBuf = daemon.crun_root();
    let id = format!("surge-{job}-0");
    let run = Exec::new(["true"]);
    let (mut api, mut crun) = (Vec::new(), Vec::new());
    for _ in 0..cfg.anchor_execs {
        let t = Instant::now();
        let r = c.exec_output(job, 0, &run, None, 1024).await?;
        if r.exit.exit_code != 0 {
            bail!("exec of true in {job}.0 exited {}", r.exit.exit_code);
        }
        api.push(ms(t.elapsed()));
        let t = Instant::now();
        let out = tokio::process::Command::new("crun")
            .arg("--root")
            .arg(&root)
            .args(["exec", &id, "true"])
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "crun exec {id} true: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        crun.push(ms(t.elapsed()));
    }
    c.cancel_job(job).await?;
    Ok(AnchorReport {
        api: Spread::of(api),
        crun: Spread::of(crun),
    })
}

/// What driving a set of sandboxes like an RL rollout gave: per sandbox, the time from the
/// submission to its first exec's output; every later exec's latency; file round trips that
/// came back equal.
#[derive(Clone, Debug, Default)]
pub struct Driven {
    pub first_output_ms: Vec<f64>,
    pub exec_ms: Vec<f64>,
    pub files_ok: u32,
}

/// Drive sandboxes `0..count` of `job` as an RL rollout does, all at once: each takes `execs`
/// sequential execs printing 1 KiB (the first retried while the sandbox is not running yet:
/// what a trainer's first tool call sees) and one 64 KiB file upload and read-back.
/// `submitted` is when the job was submitted; `done` counts execs as they finish (progress).
pub async fn drive(
    c: &Client,
    job: u64,
    count: u32,
    execs: u32,
    submitted: Instant,
    timeout: Duration,
    done: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Driven> {
    let mut tasks = JoinSet::new();
    let payload = Bytes::from(vec![7u8; 64 * 1024]);
    for index in 0..count {
        let (c, payload, done) = (c.clone(), payload.clone(), done.clone());
        tasks.spawn(async move {
            let print = Exec::new(["head", "-c", "1024", "/dev/zero"]);
            let deadline = Instant::now() + timeout;
            let first = loop {
                match c.exec_output(job, index, &print, None, 4096).await {
                    Ok(r) => break r,
                    Err(e)
                        if e.code() == Some(tonic::Code::FailedPrecondition)
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(anyhow::anyhow!("{job}.{index}: {e}")),
                }
            };
            let first_ms = ms(submitted.elapsed());
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if first.stdout.len() != 1024 {
                bail!(
                    "{job}.{index}: {} bytes of output, not 1024",
                    first.stdout.len()
                );
            }
            let mut lat = Vec::new();
            for _ in 1..execs {
                let t = Instant::now();
                let r = c.exec_output(job, index, &print, None, 4096).await?;
                lat.push(ms(t.elapsed()));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r.stdout.len() != 1024 || r.exit.exit_code != 0 {
                    bail!(
                        "{job}.{index}: exec gave {} bytes, exit {}",
                        r.stdout.len(),
                        r.exit.exit_code
                    );
                }
            }
            c.write_file_bytes(job, index, "/tmp/payload", payload.clone(), 0o644)
                .await?;
            let back = c
                .read_file_bytes(job, index, "/tmp/payload", 1 << 20)
                .await?;
            Ok::<_, anyhow::Error>((first_ms, lat, back == payload[..]))
        });
    }
    let mut d = Driven::default();
    while let Some(r) = tasks.join_next().await {
        let (first, lat, ok) = r??;
        d.first_output_ms.push(first);
        d.exec_ms.extend(lat);
        d.files_ok += u32::from(ok);
    }
    Ok(d)
}

async fn rl(cfg: &ExecConfig, c: &Client) -> anyhow::Result<RlReport> {
    let started = Instant::now();
    let job = c
        .submit(spec(cfg.rl_sandboxes, 25, 32, "real"))
        .await?
        .job_id;
    let d = drive(
        c,
        job,
        cfg.rl_sandboxes,
        cfg.rl_execs,
        started,
        cfg.timeout,
        Arc::default(),
    )
    .await?;
    let wall_s = started.elapsed().as_secs_f64();
    c.cancel_job(job).await?;
    Ok(RlReport {
        sandboxes: cfg.rl_sandboxes,
        execs_each: cfg.rl_execs,
        wall_s,
        exec: Spread::of(d.exec_ms),
        first_output: Spread::of(d.first_output_ms),
        files_ok: d.files_ok,
    })
}

async fn scale(
    cfg: &ExecConfig,
    cluster: &mut crate::cluster::LocalCluster,
    leader: u64,
    servers: &[String],
) -> anyhow::Result<ScaleReport> {
    // 128-CPU simulated nodes; sandboxes of 0.1 CPU: 10,000 fill 8 of them.
    let nodes = cfg.scale_sandboxes.div_ceil(1000).max(2);
    cluster.start_sim_nodes(
        "sim",
        nodes,
        &[
            "--sim-duration-ms",
            "3600000",
            "--sim-exec-ms",
            "1",
            "--sim-exec-output-bytes",
            "64",
            "--label",
            "kind=sim",
        ],
    )?;
    let all = Client::open(&servers.join(","))?;
    let job = all
        .submit(spec(cfg.scale_sandboxes, 100, 16, "sim"))
        .await?
        .job_id;
    wait_running(&all, job, cfg.scale_sandboxes, cfg.timeout).await?;
    // One client per replica; each exec goes to replica (index % replicas).
    let per_replica: Vec<Arc<Client>> = servers
        .iter()
        .map(|s| Client::open(s).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let ids = cluster.ids();
    let pids: Vec<(u64, Option<u32>)> = ids
        .iter()
        .map(|i| (*i, cluster.replica(*i).ok().and_then(|r| r.pid())))
        .collect();
    let node_pids = cluster.node_pids();
    let before: Vec<f64> = pids
        .iter()
        .map(|(_, p)| p.and_then(cpu_seconds).unwrap_or(0.0))
        .collect();
    let nodes_before: f64 = node_pids.iter().filter_map(|p| cpu_seconds(*p)).sum();
    let total = u64::from(cfg.scale_sandboxes) * u64::from(cfg.scale_execs);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..cfg.scale_concurrency {
        let (next, per_replica) = (next.clone(), per_replica.clone());
        let sandboxes = u64::from(cfg.scale_sandboxes);
        tasks.spawn(async move {
            let run = Exec::new(["true"]);
            let mut lat = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let index = u32::try_from(n % sandboxes)?;
                let c = &per_replica[usize::try_from(n)? % per_replica.len()];
                let t = Instant::now();
                let r = c.exec_output(job, index, &run, None, 1024).await?;
                lat.push(ms(t.elapsed()));
                if r.exit.exit_code != 0 {
                    bail!("exec into {job}.{index} exited {}", r.exit.exit_code);
                }
            }
        });
    }
    let mut lats = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lats.extend(r??);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let replica_cpu_s = pids
        .iter()
        .zip(before)
        .map(|((id, p), b)| {
            (
                *id,
                *id == leader,
                p.and_then(cpu_seconds).unwrap_or(0.0) - b,
            )
        })
        .collect();
    let node_cpu_s = node_pids
        .iter()
        .filter_map(|p| cpu_seconds(*p))
        .sum::<f64>()
        - nodes_before;
    all.cancel_job(job).await?;
    #[allow(clippy::cast_precision_loss, reason = "a count of execs")]
    let execs_per_s = total as f64 / wall_s;
    Ok(ScaleReport {
        sandboxes: cfg.scale_sandboxes,
        execs: total,
        wall_s,
        execs_per_s,
        exec: Spread::of(lats),
        replica_cpu_s,
        node_cpu_s,
    })
}
