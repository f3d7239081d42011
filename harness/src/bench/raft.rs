//! `surge bench raft`: commit throughput and latency of submissions through a replicated
//! cluster (fsync on), run by run alternating with an etcd cluster of the same size on the same
//! machine, so that load on the machine hits both alike.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::{median, percentile, small_job, start_cluster};

/// What one `surge bench raft` measures.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub replicas: u64,
    /// Submissions per run.
    pub requests: u64,
    /// Clients submitting at once.
    pub concurrency: u64,
    /// Runs (a fresh cluster each); the report gives the median.
    pub runs: u64,
    /// Submit through a follower (adds the forwarding hop).
    pub via_follower: bool,
    /// Skip etcd even where it is installed.
    pub no_etcd: bool,
    /// Say each run's figures on stderr.
    pub progress: bool,
}

/// The medians of surge's runs and, where etcd ran, of etcd's.
#[derive(Clone, Debug)]
pub struct RaftReport {
    pub config: RaftConfig,
    pub surge: RaftRun,
    pub etcd: Option<RaftRun>,
    pub etcd_version: Option<String>,
    /// Why etcd did not run, when it did not.
    pub etcd_missing: bool,
    /// surge's throughput over etcd's.
    pub ratio: Option<f64>,
    /// Bytes of one encoded submission (etcd's puts carry as many).
    pub value_bytes: usize,
}

impl RaftReport {
    pub fn json(&self) -> serde_json::Value {
        let c = &self.config;
        let mut v = json!({
            "bench": "raft",
            "replicas": c.replicas,
            "requests": c.requests,
            "concurrency": c.concurrency,
            "via_follower": c.via_follower,
            "runs": c.runs,
            "value_bytes": self.value_bytes,
            "etcd": self.etcd.as_ref().map(|e| {
                let mut j = e.json();
                j["version"] = json!(self.etcd_version);
                j
            }),
            "surge_vs_etcd_throughput": self.ratio,
        });
        // The surge figures stay at the top level, where earlier reports had them.
        if let (Some(obj), serde_json::Value::Object(s)) = (v.as_object_mut(), self.surge.json()) {
            obj.extend(s);
        }
        v
    }

    /// Writes that failed, in either system.
    pub fn errors(&self) -> u64 {
        self.surge.errors + self.etcd.as_ref().map_or(0, |e| e.errors)
    }
}

/// Run the bench: `cfg.runs` runs of surge (from `bin`) and, where installed, of etcd.
pub async fn run(cfg: RaftConfig, bin: &Path) -> anyhow::Result<RaftReport> {
    let say = |who: &str, run: u64, r: &RaftRun| {
        if cfg.progress {
            eprintln!(
                "{who} run {}: {:.0} commits/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                run + 1,
                r.ops_per_s,
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
        }
    };
    let etcd = if cfg.no_etcd {
        None
    } else {
        crate::etcd::find_binary()
    };
    let mut surge_runs = Vec::new();
    let mut etcd_runs = Vec::new();
    for run in 0..cfg.runs.max(1) {
        let r = raft_run(&cfg, bin, run).await?;
        say("surge", run, &r);
        surge_runs.push(r);
        if let Some(etcd) = &etcd {
            let r = etcd_run(&cfg, etcd, run).await?;
            say("etcd", run, &r);
            etcd_runs.push(r);
        }
    }
    let surge = RaftRun::median_of(&surge_runs);
    let etcd_median = (!etcd_runs.is_empty()).then(|| RaftRun::median_of(&etcd_runs));
    let ratio = etcd_median
        .as_ref()
        .filter(|e| e.ops_per_s > 0.0)
        .map(|e| surge.ops_per_s / e.ops_per_s);
    Ok(RaftReport {
        etcd_missing: etcd.is_none() && !cfg.no_etcd,
        etcd_version: etcd.as_deref().and_then(crate::etcd::version),
        value_bytes: prost::Message::encoded_len(&small_job("bench-0-0".into())),
        config: cfg,
        surge,
        etcd: etcd_median,
        ratio,
    })
}

#[derive(Clone, Debug)]
pub struct RaftRun {
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

impl RaftRun {
    pub fn median_of(runs: &[RaftRun]) -> RaftRun {
        let of = |f: fn(&RaftRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        RaftRun {
            ops_per_s: of(|r| r.ops_per_s),
            p50_ms: of(|r| r.p50_ms),
            p99_ms: of(|r| r.p99_ms),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "ops_per_s": self.ops_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
        })
    }
}

/// Runs `total` operations from `concurrency` tasks, each with its own operation from `make`
/// (its own client), and measures them. An operation returns whether it was acknowledged.
async fn drive<Op, Fut>(
    concurrency: u64,
    total: u64,
    make: impl Fn() -> anyhow::Result<Op>,
) -> anyhow::Result<RaftRun>
where
    Op: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let op = make()?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                if op(i).await {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(RaftRun {
        ops_per_s: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        errors,
    })
}

async fn raft_run(cfg: &RaftConfig, bin: &Path, run: u64) -> anyhow::Result<RaftRun> {
    let dir = tempfile::Builder::new().prefix("surge-bench-").tempdir()?;
    let (cluster, leader) = start_cluster(bin, dir.path(), cfg.replicas).await?;
    let target = if cfg.via_follower {
        let f = cluster
            .ids()
            .into_iter()
            .find(|id| *id != leader)
            .context("no follower")?;
        cluster.addr(f)?
    } else {
        cluster.addr(leader)?
    };
    // Warm up connections and the leader's first entries.
    let mut c = surge_client::open::jobs(&target)?;
    for i in 0..100 {
        c.submit_job(small_job(format!("warm-{run}-{i}"))).await?;
    }
    let measured = drive(cfg.concurrency, cfg.requests, || {
        let c = surge_client::open::jobs(&target)?;
        Ok(move |i| {
            let mut c = c.clone();
            async move {
                c.submit_job(small_job(format!("bench-{run}-{i}")))
                    .await
                    .is_ok()
            }
        })
    })
    .await;
    drop(cluster);
    measured
}

/// The same load against etcd: `replicas` members, puts of the key surge submits with a value
/// as long as surge's encoded submission, through the leader.
async fn etcd_run(cfg: &RaftConfig, etcd: &Path, run: u64) -> anyhow::Result<RaftRun> {
    let mut cluster = crate::etcd::EtcdCluster::start(etcd, usize::try_from(cfg.replicas)?)?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let target = if cfg.via_follower {
        cluster.follower_of(&leader).context("no etcd follower")?
    } else {
        leader
    };
    let value_len = prost::Message::encoded_len(&small_job(format!("bench-{run}-0")));
    let put = move |c: &surge_proto::etcd::kv_client::KvClient<tonic::transport::Channel>,
                    key: String| {
        let mut c = c.clone();
        async move {
            c.put(surge_proto::etcd::PutRequest {
                key: key.into_bytes(),
                value: vec![b'x'; value_len],
            })
            .await
            .is_ok()
        }
    };
    let c = crate::etcd::kv(&target)?;
    for i in 0..100 {
        if !put(&c, format!("warm-{run}-{i}")).await {
            bail!("etcd refused a warm-up put");
        }
    }
    drive(cfg.concurrency, cfg.requests, || {
        let c = crate::etcd::kv(&target)?;
        Ok(move |i| put(&c, format!("bench-{run}-{i}")))
    })
    .await
}
