//! `surge bench start`: how fast a container sandbox starts, cold and from the warm pool,
//! side by side with `crun run` of the same root filesystem in the same run.
//!
//! - **latency** (in this process, on the container runtime itself): `start()` until running
//!   and until `true` has exited, cold (bundle, overlay, cgroup, `crun run`, waiting for
//!   surge-init) and pooled (a pool sandbox takes the job), interleaved with plain `crun run`
//!   of a prepared bundle whose root is the template directory, to exit of `true`.
//! - **throughput**: a burst of long-lived sandboxes started at the node's start cap (16 at
//!   once), cold and then pooled (the pool filled beforehand; its fill time is reported).
//! - **api**: through a one-replica cluster with one real node daemon: create -> running and
//!   create -> first exec output, cold node and then a node with `--warm-pool`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use surge_client::io::Exec;
use surge_client::Client;
use surge_node::runtime::container::oci::{oci_config, OciParams};
use surge_node::runtime::container::pool::parse_warm_pool;
use surge_node::runtime::container::{ContainerConfig, ContainerRuntime};
use surge_node::runtime::{Resources, Runtime, SandboxId, SandboxSpec, StartRequest};
use surge_proto::jobs as pb;

use super::exec::Spread;
use super::start_cluster;
use crate::demo::RealNodes;

#[derive(Clone, Debug)]
pub struct StartConfig {
    /// Measured starts per path (cold, pooled, crun run), interleaved.
    pub starts: u32,
    /// Sandboxes of the throughput burst, and how many start at once.
    pub burst: u32,
    pub cap: usize,
    /// Sandboxes created through the API per path.
    pub api_starts: u32,
    pub skip_api: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Burst {
    pub sandboxes: u32,
    pub wall_s: f64,
    pub per_s: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ApiPath {
    pub running: Spread,
    pub first_output: Spread,
}

#[derive(Clone, Debug, Default)]
pub struct StartReport {
    pub cold_running: Spread,
    pub cold_exit: Spread,
    pub pooled_running: Spread,
    pub pooled_exit: Spread,
    pub crun_run: Spread,
    pub burst_cold: Burst,
    pub burst_pooled: Burst,
    /// Time to fill the pool from empty, one pool sandbox at a time (not part of any figure).
    pub pool_fill_s: f64,
    pub api_cold: Option<ApiPath>,
    pub api_pooled: Option<ApiPath>,
    pub load_before: String,
}

fn spread_json(s: &Spread) -> serde_json::Value {
    json!({"p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "n": s.n})
}

impl StartReport {
    pub fn json(&self) -> serde_json::Value {
        let burst =
            |b: &Burst| json!({"sandboxes": b.sandboxes, "wall_s": b.wall_s, "per_s": b.per_s});
        let api = |a: &Option<ApiPath>| {
            a.as_ref().map(|a| {
                json!({"create_to_running": spread_json(&a.running),
                       "create_to_first_output": spread_json(&a.first_output)})
            })
        };
        json!({
            "cold": {"running": spread_json(&self.cold_running), "exit": spread_json(&self.cold_exit)},
            "pooled": {"running": spread_json(&self.pooled_running), "exit": spread_json(&self.pooled_exit)},
            "crun_run_to_exit": spread_json(&self.crun_run),
            "ratio_cold_exit_to_crun": self.cold_exit.p50_ms / self.crun_run.p50_ms.max(1e-9),
            "ratio_pooled_exit_to_crun": self.pooled_exit.p50_ms / self.crun_run.p50_ms.max(1e-9),
            "burst_cold": burst(&self.burst_cold),
            "burst_pooled": burst(&self.burst_pooled),
            "pool_fill_s": self.pool_fill_s,
            "api_cold": api(&self.api_cold),
            "api_pooled": api(&self.api_pooled),
            "load_before": self.load_before,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn req(job: u64, index: u32, command: &[&str], memory_mib: u64) -> StartRequest {
    StartRequest {
        id: SandboxId::new(job, index),
        generation: 1,
        revision: 1,
        spec: SandboxSpec {
            template: "busybox".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            cpu_millis: 100,
            memory_mib,
            ..Default::default()
        },
        resources: Resources {
            cpu_millis: 100,
            memory_mib,
        },
    }
}

fn runtime(data: &Path, parent: &str, pool: Option<&str>) -> anyhow::Result<ContainerRuntime> {
    let rt = ContainerRuntime::new(ContainerConfig {
        cgroup_parent: parent.to_owned(),
        warm_pool: pool
            .map(parse_warm_pool)
            .transpose()
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .collect(),
        ..ContainerConfig::new(data)
    })?;
    rt.templates().ensure_busybox()?;
    Ok(rt)
}

/// A bundle for plain `crun run`: the template directory as a read-only root, `/bin/true`.
fn crun_bundle(rt: &ContainerRuntime, dir: &Path, parent: &str) -> anyhow::Result<PathBuf> {
    let bundle = dir.join("direct");
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    let template = rt.templates().path("busybox")?;
    let spec = SandboxSpec {
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    let mut config = oci_config(&OciParams {
        id: SandboxId::new(1, 0),
        spec: &spec,
        resources: Resources {
            cpu_millis: 100,
            memory_mib: 64,
        },
        cgroups_path: &format!("{parent}/direct"),
        uid: 1000,
        gid: 1000,
        tmp_size_mib: 64,
        init: rt.init_path(),
    })
    .map_err(anyhow::Error::msg)?;
    config["root"] = json!({ "path": template, "readonly": true });
    config["process"]["cwd"] = json!("/");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    Ok(bundle)
}

async fn crun_run(rt: &ContainerRuntime, bundle: &Path, id: &str) -> anyhow::Result<Duration> {
    let crun = rt.crun();
    let mut cmd = crun.command(crun.binary().as_os_str(), false);
    cmd.arg("--root")
        .arg(crun.root())
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().await?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("crun run {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// One measured start of `true`: (until running, until exited).
async fn one_start(rt: &ContainerRuntime, id: SandboxId) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    rt.start(req(id.job, id.index, &["true"], 64)).await?;
    let running = ms(t.elapsed());
    let report = rt.wait(id).await?;
    let exited = ms(t.elapsed());
    if report.code != Some(0) {
        bail!("sandbox {id}: `true` ended with {:?}", report.code);
    }
    rt.remove(id).await?;
    Ok((running, exited))
}

async fn burst(rt: &ContainerRuntime, job: u64, count: u32, cap: usize) -> anyhow::Result<Burst> {
    let permits = tokio::sync::Semaphore::new(cap.max(1));
    let t = Instant::now();
    let starts = (0..count).map(|i| {
        let permits = &permits;
        async move {
            let _p = permits.acquire().await?;
            rt.start(req(job, i, &["sleep", "600"], 16)).await?;
            Ok::<_, anyhow::Error>(())
        }
    });
    let results = futures::future::join_all(starts).await;
    let wall_s = t.elapsed().as_secs_f64();
    for i in 0..count {
        let id = SandboxId::new(job, i);
        let _ = rt.stop(id, Duration::from_millis(200)).await;
        let _ = rt.remove(id).await;
    }
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(Burst {
        sandboxes: count,
        wall_s,
        per_s: f64::from(count) / wall_s,
    })
}

pub async fn run(cfg: StartConfig, bin: &Path) -> anyhow::Result<StartReport> {
    crate::containers::usable()
        .map_err(|e| anyhow::anyhow!("surge bench start needs real containers: {e}"))?;
    let mut report = StartReport {
        load_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        ..StartReport::default()
    };
    let dir = tempfile::Builder::new()
        .prefix("surge-bench-start-")
        .tempdir()?;
    let parent = format!("/surge-bench-start-{}", std::process::id());
    let cold = runtime(&dir.path().join("cold"), &format!("{parent}/cold"), None)?;
    let pool_flag = format!("busybox={}:100:64", cfg.burst.max(1));
    let pooled = runtime(
        &dir.path().join("pooled"),
        &format!("{parent}/pooled"),
        Some(&pool_flag),
    )?;
    let bundle = crun_bundle(&cold, dir.path(), &parent)?;
    eprintln!(
        "start bench: {} starts each of cold, pooled and crun run, interleaved...",
        cfg.starts
    );
    let t = Instant::now();
    pooled.pool_refill().await?;
    report.pool_fill_s = t.elapsed().as_secs_f64();
    let (mut cr, mut ce, mut pr, mut pe, mut direct) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..cfg.starts {
        let (r, e) = one_start(&cold, SandboxId::new(1, i)).await?;
        cr.push(r);
        ce.push(e);
        pooled.pool_refill().await?; // untimed: the pool is full before each pooled start
        let (r, e) = one_start(&pooled, SandboxId::new(2, i)).await?;
        pr.push(r);
        pe.push(e);
        direct.push(ms(crun_run(&cold, &bundle, &format!("direct-{i}")).await?));
    }
    if pooled.pool_ready().get("busybox").copied().unwrap_or(0) >= usize::try_from(cfg.burst)? {
        bail!("the pooled starts did not take pool sandboxes");
    }
    report.cold_running = Spread::of(cr);
    report.cold_exit = Spread::of(ce);
    report.pooled_running = Spread::of(pr);
    report.pooled_exit = Spread::of(pe);
    report.crun_run = Spread::of(direct);
    eprintln!(
        "start bench: burst of {} cold at {} at once...",
        cfg.burst, cfg.cap
    );
    report.burst_cold = burst(&cold, 3, cfg.burst, cfg.cap).await?;
    pooled.pool_refill().await?; // untimed: the latency part took one
    eprintln!(
        "start bench: burst of {} pooled (the pool filled from empty in {:.1} s at first)...",
        cfg.burst, report.pool_fill_s
    );
    report.burst_pooled = burst(&pooled, 4, cfg.burst, cfg.cap).await?;
    pooled.pool_drain().await;
    drop((cold, pooled));
    // The parents of this run's cgroups, in every hierarchy (crun makes one in each on v1).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in surge_node::runtime::container::parse_cgroup_mounts(&mounts) {
        let top = m.mount_point.join(parent.trim_start_matches('/'));
        for sub in ["cold", "pooled", "direct"] {
            let _ = std::fs::remove_dir(top.join(sub));
        }
        let _ = std::fs::remove_dir(top);
    }
    if !cfg.skip_api {
        eprintln!("start bench: through the API, cold node...");
        report.api_cold = Some(api(bin, &dir.path().join("api-cold"), cfg.api_starts, &[]).await?);
        eprintln!("start bench: through the API, node with a warm pool...");
        let flag = vec!["--warm-pool".to_owned(), "busybox=4:25:32".to_owned()];
        report.api_pooled =
            Some(api(bin, &dir.path().join("api-pooled"), cfg.api_starts, &flag).await?);
    }
    Ok(report)
}

fn job(key: String) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            count: 1,
            cpu_millis: 25,
            memory_mib: 32,
            template: "busybox".into(),
            command: Vec::new(),
            ttl_ms: 600_000,
            tenant: "bench".into(),
            ..Default::default()
        }),
        idempotency_key: key,
    }
}

/// Create one sandbox at a time through a one-replica cluster with one real node: create ->
/// running (polled every ms) and, for another sandbox, create -> first exec output.
async fn api(bin: &Path, root: &Path, n: u32, node_args: &[String]) -> anyhow::Result<ApiPath> {
    std::fs::create_dir_all(root)?;
    let (mut cluster, _leader) = start_cluster(bin, root, 1).await?;
    let servers = cluster.addr(cluster.ids()[0])?;
    let mut nodes = RealNodes::start(bin, root, &servers, 1, node_args)?;
    let c = Client::open(&servers)?;
    // The node is up once a first sandbox runs (and, with a pool, once the pool is full).
    let warm = c
        .submit(job(format!("warm-{}", super::now_ms())))
        .await?
        .job_id;
    wait_running(&c, warm).await?;
    c.cancel_job(warm).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut running, mut first) = (Vec::new(), Vec::new());
    let print = Exec::new(["echo", "hi"]);
    for i in 0..n {
        let t = Instant::now();
        let j = c
            .submit(job(format!("run-{i}-{}", super::now_ms())))
            .await?
            .job_id;
        wait_running(&c, j).await?;
        running.push(ms(t.elapsed()));
        c.cancel_job(j).await?;
        let t = Instant::now();
        let j = c
            .submit(job(format!("exec-{i}-{}", super::now_ms())))
            .await?
            .job_id;
        loop {
            match c.exec_output(j, 0, &print, None, 1024).await {
                Ok(r) if r.stdout == b"hi\n"[..] => break,
                Ok(r) => bail!("exec in {j}.0 printed {:?}", r.stdout),
                Err(e)
                    if e.code() == Some(tonic::Code::FailedPrecondition)
                        && t.elapsed() < Duration::from_secs(60) =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("exec in {j}.0: {e}")),
            }
        }
        first.push(ms(t.elapsed()));
        c.cancel_job(j).await?;
        // Let the pool refill (and the cancelled sandboxes stop) between measurements.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    nodes.stop().await;
    cluster.stop_all(Duration::from_secs(3));
    Ok(ApiPath {
        running: Spread::of(running),
        first_output: Spread::of(first),
    })
}

async fn wait_running(c: &Client, job: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.get_job(job).await?;
        if j.counts.unwrap_or_default().running >= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!("job {job} not running after 60 s")).context("api start");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
