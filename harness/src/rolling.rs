//! Leader changes and refused writes, counted while a cluster is disturbed: what the failover
//! bench reports and the rolling-restart cluster test asserts.
//!
//! - [`LeaderWatch`] asks every replica for its status every [`WATCH_EVERY`] and keeps each
//!   `(term, leader)` pair it sees. Raft has at most one leader per term, so the number of
//!   distinct leader terms is the number of leaders the cluster had: a count, not a timing.
//! - [`WriteLoad`]: writers submitting unique keys through the replicas in turn, retrying a key
//!   until it is acknowledged, recording every acknowledgement and each writer's longest
//!   refused-write window (first refusal to the next acknowledgement).
//! - [`rolling_restart`]: SIGTERM each replica in turn, start it again on its data dir, wait
//!   until the cluster converges, and count the leader changes of each step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surge_client as client;
use surge_proto::cluster::StatusRequest;

use crate::bench::small_job;
use crate::cluster::{LocalCluster, StartMode};

/// How often [`LeaderWatch`] asks the replicas. A leader must last longer than this to be
/// seen; one that wins an election holds on for at least an election timeout (150 ms).
pub const WATCH_EVERY: Duration = Duration::from_millis(20);
/// Longest one status call of the watch may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Refused-write windows a [`WriteLoad`] keeps (the rest are dropped).
pub const REFUSALS_MAX: usize = 100_000;
/// Longest a SIGTERMed replica may take to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// The leaders a cluster had, as seen from outside.
pub struct LeaderWatch {
    seen: Arc<Mutex<BTreeMap<u64, (u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderWatch {
    /// Start watching the replicas at `addrs` (they may come and go).
    pub fn start(addrs: Vec<String>) -> Self {
        let seen: Arc<Mutex<BTreeMap<u64, (u64, Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            async move {
                let creds = client::Credentials::default();
                while !stop.load(Ordering::Relaxed) {
                    // All replicas at once, each with a generous timeout: on a loaded host a
                    // short one would miss leaders and undercount.
                    let mut polls = tokio::task::JoinSet::new();
                    for addr in &addrs {
                        let (creds, addr) = (creds.clone(), addr.clone());
                        polls.spawn(async move {
                            let mut c = client::connect::cluster(&addr, &creds).ok()?;
                            let call = c.status(StatusRequest {});
                            let r = tokio::time::timeout(STATUS_TIMEOUT, call)
                                .await
                                .ok()?
                                .ok()?;
                            Some((r.into_inner(), Instant::now()))
                        });
                    }
                    while let Some(polled) = polls.join_next().await {
                        let Ok(Some((s, at))) = polled else { continue };
                        if s.leader_id != 0 {
                            seen.lock()
                                .expect("leader watch lock")
                                .entry(s.term)
                                .or_insert((s.leader_id, at));
                        }
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
            }
        });
        LeaderWatch { seen, stop, task }
    }

    /// Leaders first seen in `[from, to]`, by term.
    pub fn leaders_between(&self, from: Instant, to: Instant) -> Vec<(u64, u64)> {
        self.seen
            .lock()
            .expect("leader watch lock")
            .iter()
            .filter(|(_, (_, at))| *at >= from && *at <= to)
            .map(|(term, (leader, _))| (*term, *leader))
            .collect()
    }

    /// Every leader seen, by term.
    pub fn leaders(&self) -> Vec<(u64, u64)> {
        self.seen
            .lock()
            .expect("leader watch lock")
            .iter()
            .map(|(term, (leader, _))| (*term, *leader))
            .collect()
    }

    pub async fn stop(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let leaders = self.leaders();
        let _ = self.task.await;
        leaders
    }
}

/// Writers submitting through every replica in turn.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Every refused-write window: when it ended, how long it was.
    refused: Arc<Mutex<Vec<(Instant, Duration)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a [`WriteLoad`] saw.
#[derive(Clone, Debug, Default)]
pub struct WriteStats {
    /// Acknowledged key -> job id.
    pub acked: BTreeMap<String, u64>,
    /// Longest time any writer went from a refused (or timed out) write to its next
    /// acknowledged one.
    pub longest_refused: Duration,
}

impl WriteLoad {
    /// `writers` writers with keys `PREFIX{w}-{i}` through `addrs` in turn.
    pub fn start(addrs: Vec<String>, prefix: &str, writers: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..writers)
            .map(|w| {
                tokio::spawn(writer(
                    addrs.clone(),
                    format!("{prefix}{w}"),
                    usize::try_from(w).unwrap_or(0),
                    stop.clone(),
                    acked.clone(),
                    refused.clone(),
                ))
            })
            .collect();
        WriteLoad {
            stop,
            acked,
            refused,
            tasks,
        }
    }

    /// Longest refused window of any writer that ended after `from`.
    pub fn longest_refused_since(&self, from: Instant) -> Duration {
        self.refused
            .lock()
            .expect("write load lock")
            .iter()
            .filter(|(at, _)| *at >= from)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().expect("write load lock").len()
    }

    pub async fn stop(self) -> WriteStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let longest_refused = self
            .refused
            .lock()
            .expect("write load lock")
            .iter()
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(Duration::ZERO);
        let acked = self.acked.lock().expect("write load lock").clone();
        WriteStats {
            acked,
            longest_refused,
        }
    }
}

async fn writer(
    addrs: Vec<String>,
    prefix: String,
    slot: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    refused: Arc<Mutex<Vec<(Instant, Duration)>>>,
) {
    let mut i = 0u64;
    let mut turn = slot;
    let mut refused_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        loop {
            turn = (turn + 1) % addrs.len().max(1);
            let Some(addr) = addrs.get(turn) else { return };
            let call = async {
                let mut c = client::open::jobs(addr).ok()?;
                c.submit_job(small_job(key.clone())).await.ok()
            };
            if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(3), call).await {
                acked
                    .lock()
                    .expect("write load lock")
                    .insert(key.clone(), r.into_inner().job_id);
                if let Some(since) = refused_since.take() {
                    let now = Instant::now();
                    let mut r = refused.lock().expect("write load lock");
                    if r.len() < REFUSALS_MAX {
                        r.push((now, now - since));
                    }
                }
                break;
            }
            refused_since.get_or_insert_with(Instant::now);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i += 1;
    }
}

/// One replica's restart in a [`rolling_restart`].
#[derive(Clone, Debug)]
pub struct RestartStep {
    pub id: u64,
    /// It led the cluster when it was asked to stop.
    pub was_leader: bool,
    /// Leaders that appeared from the SIGTERM until the cluster converged again: `(term, id)`.
    pub new_leaders: Vec<(u64, u64)>,
    /// The leader before the step.
    pub leader_before: u64,
    /// The leader after the step (when the cluster agreed on one again).
    pub leader_after: u64,
    /// How far the term moved during the step: elections started, won or not (an upper
    /// bound of `new_leaders`).
    pub terms_moved: u64,
    /// SIGTERM to exit.
    pub stop_took: Duration,
    /// Longest refused-write window that ended during the step.
    pub longest_refused: Duration,
}

impl RestartStep {
    /// The goal: at most one leader change for a leader restarted, none for a follower.
    pub fn allowed_changes(&self) -> usize {
        usize::from(self.was_leader)
    }
}

/// Restart every replica in turn (SIGTERM, wait for the exit, start on its data dir, wait until
/// all converge), counting leader changes per step with `watch`.
pub async fn rolling_restart(
    cluster: &mut LocalCluster,
    watch: &LeaderWatch,
    load: Option<&WriteLoad>,
) -> anyhow::Result<Vec<RestartStep>> {
    let mut steps = Vec::new();
    for id in cluster.ids() {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        let term_before = cluster
            .status(leader)
            .await
            .map_err(anyhow::Error::msg)?
            .term;
        // The watch must have seen the current leader before the step starts.
        tokio::time::sleep(WATCH_EVERY * 3).await;
        let started = Instant::now();
        cluster.stop_async(id, STOP_GRACE).await?;
        let stop_took = started.elapsed();
        cluster.start(id, StartMode::Resume)?;
        wait_caught_up(cluster, id, Duration::from_secs(60)).await?;
        // Let a late election (the restarted replica standing) show up in this step.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let leader_after = cluster.wait_leader(Duration::from_secs(30)).await?;
        let term_after = cluster
            .status(leader_after)
            .await
            .map_err(anyhow::Error::msg)?
            .term;
        let ended = Instant::now();
        steps.push(RestartStep {
            id,
            was_leader: leader == id,
            leader_before: leader,
            leader_after,
            terms_moved: term_after.saturating_sub(term_before),
            new_leaders: watch.leaders_between(started, ended),
            stop_took,
            longest_refused: load.map_or(Duration::ZERO, |l| l.longest_refused_since(started)),
        });
    }
    Ok(steps)
}

/// Wait until replica `id` has applied what the leader had committed when the wait began (the
/// load keeps writing, so the replicas never stand still at one index).
pub async fn wait_caught_up(
    cluster: &mut LocalCluster,
    id: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let leader = cluster.wait_leader(timeout).await?;
    let target = cluster
        .status(leader)
        .await
        .map_err(anyhow::Error::msg)?
        .commit_index;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match cluster.status(id).await {
            Ok(s) if s.applied_index >= target => return Ok(()),
            Ok(s) => last = format!("applied {} of {target}", s.applied_index),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("replica {id} did not catch up within {timeout:?}: {last}")
}
