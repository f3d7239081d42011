//! `surge bench snapshot`: checkpoint and restore of container sandboxes holding 64 MiB and
//! 1 GiB, beside the alternative (a cold start of the same template that re-runs its set-up),
//! and a fork of 8 — on the node's container runtime with the CRIU kit, in this process (no
//! scheduler round trip: the cost is the runtime's). Needs root and `scripts/setup-criu`.
//!
//! The sandbox's set-up is an awk that fills a string of the given size (anonymous memory,
//! every page touched) and then waits; "ready" in its output marks the end of the set-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use surge_node::reconcile::{Resources, SandboxId, SandboxSpec};
use surge_node::runtime::container::checkpoint::{kit_prefix, CriuKit};
use surge_node::runtime::container::{ContainerConfig, ContainerRuntime};
use surge_node::runtime::{Runtime, StartRequest};

use super::percentile;

#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    /// Memory each measured sandbox holds, in MiB.
    pub sizes_mib: Vec<u64>,
    /// Checkpoint + restore cycles (and cold starts) for sizes up to 256 MiB ...
    pub cycles: u32,
    /// ... and for larger ones.
    pub cycles_large: u32,
    /// Sandboxes per fork, and forks measured.
    pub forks: u32,
    pub fork_runs: u32,
    /// Work directory (a fresh one under the system temp dir when `None`).
    pub data_dir: Option<PathBuf>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            sizes_mib: vec![64, 1024],
            cycles: 20,
            cycles_large: 5,
            forks: 8,
            fork_runs: 5,
            data_dir: None,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Stats {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            n: ms.len(),
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SizeReport {
    pub size_mib: u64,
    /// The sandbox's memory as its cgroup counts it, before the first checkpoint.
    pub cgroup_mib: f64,
    pub image_mib: f64,
    pub checkpoint: Stats,
    pub restore: Stats,
    /// Start of a new sandbox of the same template until its set-up is done.
    pub cold_start_setup: Stats,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ForkReport {
    pub count: u32,
    pub source_mib: u64,
    /// From the request to all forks running (dump of the source included).
    pub all_running: Stats,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    pub sizes: Vec<SizeReport>,
    pub fork: ForkReport,
}

fn script(size_mib: u64) -> String {
    let bytes = size_mib * 1024 * 1024;
    format!(
        "awk 'BEGIN {{ s = sprintf(\"%{bytes}s\", \"\"); print \"ready\"; fflush(); \
         while (1) system(\"sleep 3600\") }}'"
    )
}

fn request(id: SandboxId, size_mib: u64) -> StartRequest {
    // Room for the string, awk's copy of it while formatting, and the rest.
    let memory_mib = size_mib * 2 + 64;
    StartRequest {
        id,
        generation: 1,
        revision: 1,
        spec: SandboxSpec {
            template: "busybox".into(),
            command: vec!["/bin/sh".into(), "-c".into(), script(size_mib)],
            env: vec![],
            cpu_millis: 1000,
            memory_mib,
            user: "root".into(),
            fork_of: None,
        },
        resources: Resources {
            cpu_millis: 1000,
            memory_mib,
        },
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Wait until the sandbox printed "ready" (its set-up is done).
async fn until_ready(data: &Path, id: SandboxId) -> anyhow::Result<()> {
    let log = data
        .join("sandboxes")
        .join(id.to_string())
        .join("stdout.log");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("ready")) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("sandbox {id} never finished its set-up")
}

async fn discard(rt: &ContainerRuntime, id: SandboxId) {
    let _ = rt.stop(id, Duration::from_millis(100)).await;
    let _ = rt.remove(id).await;
}

pub async fn run(cfg: SnapshotConfig) -> anyhow::Result<SnapshotReport> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("surge bench snapshot needs root (namespaces, cgroups, CRIU)");
    }
    let kit = CriuKit::probe(&kit_prefix()).map_err(anyhow::Error::msg)?;
    let data = cfg.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("surge-bench-snapshot-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).context("create the work directory")?;
    let config = ContainerConfig {
        sandbox_uid: 0,
        sandbox_gid: 0,
        criu: Ok(kit),
        cgroup_parent: format!("/surge-bench-snapshot-{}", std::process::id()),
        ..ContainerConfig::new(&data)
    };
    let rt = ContainerRuntime::new(config).context("container runtime")?;
    let result = measure(&rt, &data, &cfg).await;
    // Whatever a failed run left running goes too.
    for o in rt.list().await.unwrap_or_default() {
        discard(&rt, o.id).await;
    }
    let _ = std::fs::remove_dir_all(&data);
    result
}

async fn measure(
    rt: &ContainerRuntime,
    data: &Path,
    cfg: &SnapshotConfig,
) -> anyhow::Result<SnapshotReport> {
    let mut sizes = Vec::new();
    let mut job = 1;
    for &size in &cfg.sizes_mib {
        let cycles = if size <= 256 {
            cfg.cycles
        } else {
            cfg.cycles_large
        };
        job += 1;
        let id = SandboxId::new(job, 0);
        rt.start(request(id, size)).await.context("start")?;
        until_ready(data, id).await?;
        let cgroup_mib = rt
            .usage(id)
            .await
            .map(|u| u.memory_bytes as f64 / 1048576.0)
            .unwrap_or(0.0);
        let (mut dumps, mut restores, mut image) = (Vec::new(), Vec::new(), 0u64);
        for _ in 0..cycles {
            let t = Instant::now();
            image = rt.checkpoint(id).await.context("checkpoint")?;
            dumps.push(ms(t));
            let t = Instant::now();
            rt.restore(id).await.context("restore")?;
            restores.push(ms(t));
        }
        discard(rt, id).await;
        let mut cold = Vec::new();
        for i in 0..cycles {
            let cid = SandboxId::new(job, i + 1);
            let t = Instant::now();
            rt.start(request(cid, size)).await.context("cold start")?;
            until_ready(data, cid).await?;
            cold.push(ms(t));
            discard(rt, cid).await;
        }
        sizes.push(SizeReport {
            size_mib: size,
            cgroup_mib,
            image_mib: image as f64 / 1048576.0,
            checkpoint: Stats::of(dumps),
            restore: Stats::of(restores),
            cold_start_setup: Stats::of(cold),
        });
    }

    // Fork: a 64 MiB source, `forks` at a time.
    let source_mib = 64;
    job += 1;
    let source = SandboxId::new(job, 0);
    rt.start(request(source, source_mib))
        .await
        .context("start")?;
    until_ready(data, source).await?;
    let mut totals = Vec::new();
    for run in 0..cfg.fork_runs {
        job += 1;
        let key = job;
        let t = Instant::now();
        let started = futures::future::join_all(
            (0..cfg.forks)
                .map(|i| rt.fork(source, key, request(SandboxId::new(key, i), source_mib))),
        )
        .await;
        let elapsed = ms(t);
        for s in started {
            s.with_context(|| format!("fork run {run}"))?;
        }
        totals.push(elapsed);
        for i in 0..cfg.forks {
            discard(rt, SandboxId::new(key, i)).await;
        }
    }
    discard(rt, source).await;
    Ok(SnapshotReport {
        sizes,
        fork: ForkReport {
            count: cfg.forks,
            source_mib,
            all_running: Stats::of(totals),
        },
    })
}
