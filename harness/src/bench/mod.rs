//! The engines of `surge bench`: each starts its own cluster, drives it, and returns a report
//! the CLI prints as a table or JSON. Progress goes to stderr while a run goes on.
//!
//! - [`raft`]: commit throughput and latency of submissions, side by side with etcd;
//! - [`failover`]: kill -9 the leader under load, time to the first accepted write, no loss;
//! - [`burst`]: the 100k-sandbox burst: submit -> all placed -> all running -> cancel -> free;
//! - [`exec`]: exec and files: API vs `crun exec`, the RL pattern, and execs at scale;
//! - [`start`]: sandbox start, cold and from the warm pool, beside `crun run`.

pub mod burst;
pub mod exec;
pub mod failover;
pub mod failover_etcd;
mod profile;
pub mod raft;
pub mod snapshot;
pub mod start;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use surge_client::Conn;
use surge_proto::jobs as pb;

use crate::cluster::LocalCluster;

/// A minimal job: the benchmark measures the log, not the scheduler.
pub fn small_job(key: String) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            count: 1,
            cpu_millis: 500,
            memory_mib: 256,
            template: "busybox".into(),
            command: vec!["true".into()],
            tenant: "bench".into(),
            ..Default::default()
        }),
        idempotency_key: key,
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let last = sorted.len() - 1;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within 0..=last, rounded"
    )]
    let rank = ((p / 100.0) * last as f64).round() as usize;
    sorted[rank.min(last)]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

async fn start_cluster(
    bin: &Path,
    root: &Path,
    replicas: u64,
) -> anyhow::Result<(LocalCluster, u64)> {
    let mut cluster = LocalCluster::new(bin, root, replicas, None)?;
    cluster.start_all()?;
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .context("cluster did not elect a leader")?;
    Ok((cluster, leader))
}

/// Every job of `tenant`, page by page.
pub async fn list_all(
    c: &mut pb::jobs_client::JobsClient<Conn>,
    tenant: &str,
) -> anyhow::Result<Vec<pb::Job>> {
    let mut all = Vec::new();
    let mut before_id = 0;
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                tenant: tenant.into(),
                state: pb::JobState::Unspecified as i32,
                limit: 10_000,
                before_id,
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .jobs;
        let Some(last) = page.last() else { break };
        before_id = last.id;
        all.extend(page);
    }
    Ok(all)
}

/// surge's published goals, held against a measured figure: `(what, limit)`.
#[derive(Clone, Debug)]
pub struct Goal {
    pub what: &'static str,
    pub limit_s: f64,
}

impl Goal {
    pub fn verdict(&self, measured_s: f64) -> &'static str {
        if measured_s < self.limit_s {
            "met"
        } else {
            "missed"
        }
    }

    pub fn json(&self, measured_s: f64) -> serde_json::Value {
        json!({"what": self.what, "limit_s": self.limit_s, "measured_s": measured_s,
               "met": measured_s < self.limit_s})
    }
}

/// Peak resident memory (VmHWM) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Nodes ready and sandboxes held, from any replica.
pub async fn node_totals(addr: &str) -> anyhow::Result<(usize, u64)> {
    let nodes = surge_client::open::nodes(addr)?
        .list_nodes(surge_proto::node::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let ready = nodes
        .iter()
        .filter(|n| n.state() == surge_proto::node::NodeState::Ready)
        .count();
    let held = nodes.iter().map(|n| u64::from(n.sandboxes)).sum();
    Ok((ready, held))
}

/// Milliseconds since the Unix epoch (unique keys across runs).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
