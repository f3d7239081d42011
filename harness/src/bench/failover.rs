//! `surge bench failover`: kill -9 the leader under a steady write load, repeatedly; time from
//! the kill to the first write a surviving replica accepts, and check afterwards that no
//! acknowledged write was lost or applied twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::sync::Mutex;

use super::{list_all, percentile, small_job, start_cluster, Goal};
use crate::cluster::StartMode;

#[derive(Clone, Debug)]
pub struct FailoverConfig {
    pub replicas: u64,
    /// Leader kills.
    pub runs: u64,
    /// Writers submitting during the kills.
    pub writers: u64,
    /// Say each kill's figure on stderr.
    pub progress: bool,
}

#[derive(Clone, Debug)]
pub struct FailoverReport {
    pub first_write_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub acked_writes: usize,
    pub lost: usize,
    pub duplicated: usize,
}

/// The goal the figures are held against.
pub const GOAL: Goal = Goal {
    what: "failover < 1 s",
    limit_s: 1.0,
};

impl FailoverReport {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "bench": "failover",
            "kills": self.first_write_ms.len(),
            "first_write_ms": self.first_write_ms,
            "p50_ms": self.p50_ms,
            "max_ms": self.max_ms,
            "acked_writes": self.acked_writes,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "goal": {"p50": GOAL.json(self.p50_ms / 1000.0), "max": GOAL.json(self.max_ms / 1000.0)},
        })
    }
}

/// Run the bench against a cluster started from `bin`.
pub async fn run(cfg: FailoverConfig, bin: &Path) -> anyhow::Result<FailoverReport> {
    let args = &cfg;
    let mut dir = tempfile::Builder::new()
        .prefix("surge-failover-")
        .tempdir()?;
    if std::env::var_os("SURGE_BENCH_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping replica data and logs in {}", dir.path().display());
    }
    let (mut cluster, _) = start_cluster(bin, dir.path(), args.replicas).await?;
    let addrs: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id))
        .collect::<Result<_, _>>()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let writers: Vec<_> = (0..args.writers)
        .map(|w| {
            tokio::spawn(writer(
                addrs.clone(),
                format!("w{w}"),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();

    let mut times_ms = Vec::new();
    for run in 0..args.runs.max(1) {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let survivor = cluster
            .ids()
            .into_iter()
            .find(|id| *id != leader)
            .context("no survivor")?;
        let mut c = surge_client::open::jobs(&cluster.addr(survivor)?)?;
        cluster.kill(leader)?;
        let killed = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let call = c.submit_job(small_job(format!("probe-{run}-{attempt}")));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no write accepted within 30 s of killing the leader");
            }
        }
        let ms = killed.elapsed().as_secs_f64() * 1000.0;
        if args.progress {
            eprintln!(
                "kill {}: leader {leader} killed, first write accepted after {ms:.0} ms",
                run + 1
            );
        }
        times_ms.push(ms);
        cluster.start(leader, StartMode::Resume)?;
        cluster
            .wait_converged(&cluster.ids(), Duration::from_secs(60))
            .await
            .ok();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let mut c = surge_client::open::jobs(&cluster.addr(leader)?)?;
    let listed = list_all(&mut c, "bench").await?;
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for j in &listed {
        by_key
            .entry(j.idempotency_key.clone())
            .or_default()
            .push(j.id);
    }
    let acked = acked.lock().await.clone();
    let lost = acked
        .iter()
        .filter(|(k, id)| by_key.get(*k).is_none_or(|ids| !ids.contains(id)))
        .count();
    let duplicated = by_key.values().filter(|ids| ids.len() > 1).count();
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = percentile(&sorted, 50.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    Ok(FailoverReport {
        first_write_ms: times_ms,
        p50_ms: p50,
        max_ms: max,
        acked_writes: acked.len(),
        lost,
        duplicated,
    })
}

/// Writers submit unique keys through every replica, retrying a key until it is acknowledged
/// (as a real client would). Returns acknowledged key -> job id.
async fn writer(
    addrs: Vec<String>,
    prefix: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
) {
    let mut i = 0u64;
    let mut turn = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        loop {
            turn = (turn + 1) % addrs.len();
            let Ok(mut c) = surge_client::open::jobs(&addrs[turn]) else {
                break;
            };
            let call = c.submit_job(small_job(key.clone()));
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), call).await {
                acked
                    .lock()
                    .await
                    .insert(key.clone(), r.into_inner().job_id);
                break;
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i += 1;
    }
}
