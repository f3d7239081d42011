//! The anchor for `surge bench failover`: the same kills against etcd. An etcd cluster of the
//! same size on the same machine (harness/src/etcd.rs), the same number of writers putting
//! through every member, and each run kill -9s etcd's leader and times, from the kill, when a
//! survivor reports a new leader and when the first put through a survivor is accepted. The
//! killed member is started again on its data dir before the next kill.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::percentile;
use crate::etcd::EtcdCluster;

/// How often the probe starts another put while none was accepted.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// etcd's failovers, as the surge side reports its own.
#[derive(Clone, Debug)]
pub struct EtcdFailover {
    pub version: Option<String>,
    /// Per kill: until a survivor reports a new leader (ms after the kill).
    pub elected_ms: Vec<Option<f64>>,
    /// Per kill: until the first put through a survivor is accepted.
    pub first_write_ms: Vec<f64>,
}

impl EtcdFailover {
    pub fn p50_ms(&self) -> f64 {
        percentile(&sorted(&self.first_write_ms), 50.0)
    }
    pub fn max_ms(&self) -> f64 {
        sorted(&self.first_write_ms).last().copied().unwrap_or(0.0)
    }
    pub fn elected_p50_ms(&self) -> Option<f64> {
        let seen: Vec<f64> = self.elected_ms.iter().flatten().copied().collect();
        (!seen.is_empty()).then(|| percentile(&sorted(&seen), 50.0))
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// `runs` kills of etcd's leader under `writers` putting writers.
pub async fn run(
    etcd: &Path,
    members: u64,
    runs: u64,
    writers: u64,
    progress: bool,
) -> anyhow::Result<EtcdFailover> {
    let mut cluster = EtcdCluster::start(etcd, usize::try_from(members)?)?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let urls = cluster.urls().to_vec();
    let mut load = Vec::new();
    for w in 0..usize::try_from(writers)? {
        let stop = stop.clone();
        let urls = urls.clone();
        load.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let Some(url) = urls.get((w + i) % urls.len().max(1)) else {
                    return;
                };
                let ok = put(url, format!("w-{w}-{i}")).await;
                i += 1;
                if !ok {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    let mut out = EtcdFailover {
        version: crate::etcd::version(etcd),
        elected_ms: Vec::new(),
        first_write_ms: Vec::new(),
    };
    let result = async {
        for run in 0..runs {
            let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (old_id, _) = crate::etcd::status(&leader)
                .await
                .context("etcd leader's status")?;
            let survivors: Vec<String> = urls.iter().filter(|u| **u != leader).cloned().collect();
            let survivor = survivors.first().context("no etcd survivor")?.clone();
            let i = urls
                .iter()
                .position(|u| *u == leader)
                .context("leader not a member")?;
            cluster.kill(i);
            let killed = Instant::now();
            let probe = tokio::spawn(watch_elected(survivors, old_id, killed));
            // etcd drops a proposal made while there is no leader and the put hangs until its
            // timeout, so one put at a time would measure the client's timeout: a new attempt
            // starts every PROBE_EVERY (as a retrying etcd client does) and the first to be
            // accepted counts.
            let mut attempts = tokio::task::JoinSet::new();
            let mut attempt = 0;
            loop {
                let url = survivor.clone();
                let key = format!("probe-{run}-{attempt}");
                attempts.spawn(async move { put(&url, key).await });
                attempt += 1;
                let tick = tokio::time::sleep(PROBE_EVERY);
                tokio::pin!(tick);
                let mut accepted = false;
                loop {
                    tokio::select! {
                        () = &mut tick => break,
                        Some(done) = attempts.join_next() => {
                            if matches!(done, Ok(true)) {
                                accepted = true;
                                break;
                            }
                        }
                    }
                }
                if accepted {
                    break;
                }
                if killed.elapsed() > Duration::from_secs(30) {
                    bail!("etcd accepted no put within 30 s of killing its leader");
                }
            }
            attempts.abort_all();
            let ms = killed.elapsed().as_secs_f64() * 1000.0;
            let elected = tokio::time::timeout(Duration::from_secs(2), probe)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            if progress {
                let e = elected.map_or("-".to_string(), |v| format!("{v:.0}"));
                eprintln!(
                    "etcd kill {}: leader killed; elected {e} ms, first write accepted {ms:.0} ms",
                    run + 1
                );
            }
            out.elected_ms.push(elected);
            out.first_write_ms.push(ms);
            cluster.restart(i)?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    result.map(|()| out)
}

/// As long as surge's encoded submission, as `surge bench raft` puts.
fn value_len() -> usize {
    prost::Message::encoded_len(&super::small_job("probe-0-0".into()))
}

async fn put(url: &str, key: String) -> bool {
    let Ok(mut c) = crate::etcd::kv(url) else {
        return false;
    };
    let call = c.put(surge_proto::etcd::PutRequest {
        key: key.into_bytes(),
        value: vec![b'x'; value_len()],
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(2), call).await,
        Ok(Ok(_))
    )
}

/// Poll the survivors until one reports a leader other than `old`; ms after the kill.
async fn watch_elected(survivors: Vec<String>, old: u64, killed: Instant) -> Option<f64> {
    while killed.elapsed() < Duration::from_secs(30) {
        for url in &survivors {
            let elected = crate::etcd::status(url)
                .await
                .is_some_and(|(_, l)| l != 0 && l != old);
            if elected {
                return Some(killed.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(super::failover::PHASE_POLL).await;
    }
    None
}
