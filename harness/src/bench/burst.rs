//! `surge bench burst`: the 100k-CPU burst on simulated nodes. Submit one job of N sandboxes,
//! follow it until all are placed and then all started, cancel it, and wait until every node
//! holds nothing again; repeat on the same cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use surge_proto::jobs as pb;

use super::profile::Profiler;
use super::{median, node_totals, now_ms, peak_rss_mib, start_cluster, Goal};
use crate::tracker::BurstTracker;

#[derive(Clone, Debug)]
pub struct BurstConfig {
    pub nodes: u32,
    pub node_cpus: u32,
    pub node_memory_gib: u64,
    pub sandboxes: u32,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    /// Bursts (submit, run, cancel) on the same cluster.
    pub runs: u32,
    /// Simulated nodes per `surge node` process.
    pub nodes_per_process: u32,
    pub replicas: u64,
    /// Give up on a phase after this long.
    pub timeout: Duration,
    /// Record the leader with `perf` into this directory.
    pub profile: Option<PathBuf>,
    /// Say each run's figures (and a long run's counts every 5 s) on stderr.
    pub progress: bool,
}

/// One burst's milestones, in seconds from its submission.
#[derive(Clone, Debug)]
pub struct BurstRun {
    pub placed_s: f64,
    pub running_s: f64,
    pub released_s: f64,
    /// When half, 90% and 99% of the sandboxes had started.
    pub running_share_s: [f64; 3],
    /// Elections during the run (the replicas' term moved this much; nobody asked for any).
    pub terms_moved: u64,
    /// Stretches without progress longer than [`STALL_AFTER`].
    pub stalls: Vec<Stall>,
}

/// No change in the job's placed and running counts for longer than this is a stall.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

/// A stretch of a burst in which nothing was placed or started.
#[derive(Clone, Debug)]
pub struct Stall {
    /// When it began, in seconds from the submission.
    pub at_s: f64,
    pub lasted_s: f64,
    pub placed: u32,
    pub running: u32,
    /// Polls of the job the cluster did not answer meanwhile (no leader, or a starved one);
    /// none means the replicas answered and the simulated nodes or the scheduler were slow.
    pub unanswered_polls: u32,
    /// The run's term moved and the cluster did not answer during this stall: most likely an
    /// election (the term is read only between runs; Status hashes the whole state).
    pub election: bool,
}

impl Stall {
    /// Its cause as far as the bench can tell.
    pub fn cause(&self) -> &'static str {
        match (self.election, self.unanswered_polls) {
            (true, _) => "an election",
            (false, 0) => "the cluster answered; nodes or scheduler made no progress",
            (false, _) => "the cluster did not answer",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BurstReport {
    pub config: BurstConfig,
    pub runs: Vec<BurstRun>,
    /// The replicas' largest peak RSS.
    pub scheduler_rss_mib: f64,
    /// Until every node registered.
    pub registered_s: f64,
    /// Elections while the nodes registered.
    pub registration_terms_moved: u64,
}

/// `(p50, max)` of a figure over the runs.
pub type Spread = (f64, f64);

impl BurstReport {
    fn stat(&self, f: fn(&BurstRun) -> f64) -> Spread {
        let v: Vec<f64> = self.runs.iter().map(f).collect();
        (median(&v), v.iter().copied().fold(0.0, f64::max))
    }

    pub fn placed(&self) -> Spread {
        self.stat(|r| r.placed_s)
    }

    pub fn running(&self) -> Spread {
        self.stat(|r| r.running_s)
    }

    pub fn released(&self) -> Spread {
        self.stat(|r| r.released_s)
    }

    pub fn json(&self) -> serde_json::Value {
        let ((placed_p50, placed_max), (running_p50, running_max)) =
            (self.placed(), self.running());
        let (released_p50, released_max) = self.released();
        let (placed_goal, running_goal) = goals(self.config.sandboxes);
        json!({
            "goals": {
                "placed": placed_goal.as_ref().map(|g| g.json(placed_p50)),
                "running": running_goal.as_ref().map(|g| g.json(running_p50)),
            },
            "bench": "burst",
            "nodes": self.config.nodes,
            "sandboxes": self.config.sandboxes,
            "cpu_millis": self.config.cpu_millis,
            "runs": self.runs.len(),
            "placed_s": {"p50": placed_p50, "max": placed_max},
            "running_s": {"p50": running_p50, "max": running_max},
            "released_s": {"p50": released_p50, "max": released_max},
            "running_share_s": self.runs.iter().map(|r| json!({
                "50": r.running_share_s[0], "90": r.running_share_s[1], "99": r.running_share_s[2],
            })).collect::<Vec<_>>(),
            "scheduler_rss_mib": self.scheduler_rss_mib,
            "registered_s": self.registered_s,
            "elections": {
                "registration": self.registration_terms_moved,
                "runs": self.runs.iter().map(|r| r.terms_moved).collect::<Vec<_>>(),
            },
            "stalls": self.runs.iter().map(|r| r.stalls.iter().map(|s| json!({
                "at_s": s.at_s, "lasted_s": s.lasted_s, "placed": s.placed, "running": s.running,
                "unanswered_polls": s.unanswered_polls, "election": s.election, "cause": s.cause(),
            })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })
    }
}

/// How often a burst still in progress says its counts.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Run the bench on a cluster of `bin` replicas and simulated nodes.
pub async fn run(cfg: BurstConfig, bin: &Path) -> anyhow::Result<BurstReport> {
    let dir = tempfile::Builder::new().prefix("surge-burst-").tempdir()?;
    let (mut cluster, leader) = start_cluster(bin, dir.path(), cfg.replicas).await?;
    let addr = cluster.addr(leader)?;
    let addrs: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id))
        .collect::<Result<_, _>>()?;
    let term_at_start = max_term(&addrs).await;
    let per = cfg.nodes_per_process.max(1);
    let groups = cfg.nodes.div_ceil(per);
    let cpus = cfg.node_cpus.to_string();
    let mem = (cfg.node_memory_gib * 1024).to_string();
    for g in 0..groups {
        let n = per.min(cfg.nodes - g * per);
        cluster.start_sim_nodes(
            &format!("g{g}"),
            n,
            &[
                "--cpus",
                &cpus,
                "--memory-mib",
                &mem,
                "--sim-duration-ms",
                "86400000",
            ],
        )?;
    }
    let waiting = Instant::now();
    loop {
        let ready = node_totals(&addr).await.map(|t| t.0).unwrap_or(0);
        if ready >= cfg.nodes as usize {
            break;
        }
        if waiting.elapsed() > cfg.timeout {
            bail!("only {ready} of {} nodes registered", cfg.nodes);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registered_s = waiting.elapsed().as_secs_f64();
    let registration_terms_moved = max_term(&addrs).await.saturating_sub(term_at_start);
    if cfg.progress {
        eprintln!(
            "{} nodes ready in {registered_s:.1} s ({registration_terms_moved} elections); bursting {} sandboxes x {} mCPU",
            cfg.nodes,
            cfg.sandboxes,
            cfg.cpu_millis
        );
    }
    let mut runs = Vec::new();
    let leader_pid = cluster.replica(leader)?.pid();
    if let Some(dir) = &cfg.profile {
        std::fs::create_dir_all(dir)?;
    }
    for run in 0..cfg.runs.max(1) {
        let profiler = match (&cfg.profile, leader_pid) {
            (Some(dir), Some(pid)) => Some(Profiler::start(
                pid,
                dir.join(format!("leader-run-{}.data", run + 1)),
            )?),
            _ => None,
        };
        let r = burst_run(&cfg, &addr, &addrs, run, profiler).await?;
        if cfg.progress {
            let [half, most, nearly_all] = r.running_share_s;
            eprintln!(
                "run {}: placed {:.3} s, running {:.3} s (50% {half:.3} s, 90% {most:.3} s, 99% {nearly_all:.3} s), released {:.3} s; {} elections, {} stalls",
                run + 1,
                r.placed_s,
                r.running_s,
                r.released_s,
                r.terms_moved,
                r.stalls.len()
            );
            for s in &r.stalls {
                eprintln!(
                    "  stall at {:.1} s for {:.1} s ({} placed, {} running): {}",
                    s.at_s,
                    s.lasted_s,
                    s.placed,
                    s.running,
                    s.cause()
                );
            }
        }
        runs.push(r);
    }
    let scheduler_rss_mib = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.replica(id).ok().and_then(|r| r.pid()))
        .filter_map(peak_rss_mib)
        .fold(0.0, f64::max);
    cluster.stop_all(Duration::from_secs(5));
    Ok(BurstReport {
        config: cfg,
        runs,
        scheduler_rss_mib,
        registered_s,
        registration_terms_moved,
    })
}

/// The highest term any replica reports (0 when none answers). Status is not free at a million
/// sandboxes (it hashes the state), so it is asked only between phases.
async fn max_term(addrs: &[String]) -> u64 {
    let creds = surge_client::Credentials::default();
    let mut term = 0;
    for a in addrs {
        let Ok(mut c) = surge_client::connect::cluster(a, &creds) else {
            continue;
        };
        let call = c.status(surge_proto::cluster::StatusRequest {});
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), call).await {
            term = term.max(r.into_inner().term);
        }
    }
    term
}

async fn burst_run(
    cfg: &BurstConfig,
    addr: &str,
    addrs: &[String],
    run: u32,
    mut profiler: Option<Profiler>,
) -> anyhow::Result<BurstRun> {
    let mut jobs = surge_client::open::jobs(addr)?;
    let term_before = max_term(addrs).await;
    let started = Instant::now();
    let job_id = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                count: cfg.sandboxes,
                cpu_millis: cfg.cpu_millis,
                memory_mib: cfg.memory_mib,
                template: "busybox".into(),
                command: vec!["rl-episode".into()],
                tenant: "bench".into(),
                ..Default::default()
            }),
            idempotency_key: format!("burst-{run}-{}", now_ms()),
        })
        .await?
        .into_inner()
        .job_id;
    let mut tracker = BurstTracker::new(cfg.sandboxes);
    let mut progress_at = Instant::now();
    let mut stalls = Stalls::default();
    let running_s = loop {
        let Ok(j) = jobs.get_job(pb::GetJobRequest { job_id }).await else {
            stalls.unanswered += 1;
            if started.elapsed() > cfg.timeout {
                bail!("burst {run}: the cluster stopped answering");
            }
            // Not a tight loop: a cluster between leaders is not hammered by its benchmark.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let j = j.into_inner();
        let c = j.counts.unwrap_or_default();
        stalls.poll(started.elapsed().as_secs_f64(), c.placed, c.running);
        tracker.update(started.elapsed().as_secs_f64(), c);
        // A long burst says how it is doing (a stall looks different from a slow climb).
        if cfg.progress && progress_at.elapsed() >= PROGRESS_INTERVAL {
            progress_at = Instant::now();
            eprintln!(
                "  {:.1} s: {} pending, {} placed, {} running",
                started.elapsed().as_secs_f64(),
                c.pending,
                c.placed,
                c.running
            );
        }
        if let Some(s) = tracker.started_s {
            if let Some(p) = profiler.take() {
                let report = p.finish()?;
                if cfg.progress {
                    eprintln!("run {}: leader profile in {}", run + 1, report.display());
                }
            }
            break s;
        }
        if started.elapsed() > cfg.timeout {
            bail!(
                "burst {run}: after {:?} {} pending, {} placed, {} running ({})",
                cfg.timeout,
                c.pending,
                c.placed,
                c.running,
                j.pending_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cancelled = Instant::now();
    jobs.cancel_job(pb::CancelJobRequest { job_id }).await?;
    loop {
        // A poll may time out while the cluster is busy; only the deadline below is fatal.
        if let Ok((_, 0)) = node_totals(addr).await {
            break;
        }
        if cancelled.elapsed() > cfg.timeout {
            bail!(
                "burst {run}: sandboxes still held {:?} after cancel",
                cfg.timeout
            );
        }
        // Listing 10,000 nodes is not free for the leader: poll finely only at first.
        let pause_ms = if cancelled.elapsed() < Duration::from_millis(200) {
            10
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
    let terms_moved = max_term(addrs).await.saturating_sub(term_before);
    // Whether a stall held an election is known only for the whole run: any stall of a run
    // whose term moved is marked.
    let mut stalls = stalls.found;
    for s in &mut stalls {
        s.election = terms_moved > 0 && s.unanswered_polls > 0;
    }
    Ok(BurstRun {
        terms_moved,
        stalls,
        placed_s: tracker.placed_s.unwrap_or(running_s),
        running_s,
        released_s: cancelled.elapsed().as_secs_f64(),
        running_share_s: tracker.started_share_s.map(|at| at.unwrap_or(running_s)),
    })
}

/// Finds the stalls of one burst from its polls.
#[derive(Default)]
struct Stalls {
    /// Counts and time of the last change.
    last: Option<(u32, u32, f64)>,
    unanswered: u32,
    found: Vec<Stall>,
}

impl Stalls {
    fn poll(&mut self, now_s: f64, placed: u32, running: u32) {
        match self.last {
            Some((p, r, _)) if (p, r) == (placed, running) => {}
            Some((p, r, at)) => {
                if now_s - at > STALL_AFTER.as_secs_f64() {
                    self.found.push(Stall {
                        at_s: at,
                        lasted_s: now_s - at,
                        placed: p,
                        running: r,
                        unanswered_polls: self.unanswered,
                        election: false,
                    });
                }
                self.last = Some((placed, running, now_s));
                self.unanswered = 0;
            }
            None => {
                self.last = Some((placed, running, now_s));
                self.unanswered = 0;
            }
        }
    }
}

/// The goals for a burst of `sandboxes` (issue 5): 100,000 placed in under 1 s and running in
/// under 3 s; 1,000,000 placed in under 10 s.
pub fn goals(sandboxes: u32) -> (Option<Goal>, Option<Goal>) {
    match sandboxes {
        0..=100_000 => (
            Some(Goal {
                what: "placements committed < 1 s",
                limit_s: 1.0,
            }),
            Some(Goal {
                what: "all running < 3 s",
                limit_s: 3.0,
            }),
        ),
        100_001..=1_000_000 => (
            Some(Goal {
                what: "placements committed < 10 s",
                limit_s: 10.0,
            }),
            None,
        ),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_without_progress_longer_than_two_seconds_is_a_stall() {
        let mut s = Stalls::default();
        s.poll(0.0, 0, 0);
        s.poll(0.5, 10, 0);
        // 1.5 s without change: not a stall.
        s.poll(2.0, 20, 0);
        // 3 s without change, two polls unanswered meanwhile: a stall.
        s.poll(3.0, 20, 0);
        s.unanswered += 2;
        s.poll(5.0, 20, 0);
        s.poll(5.1, 20, 5);
        s.poll(5.2, 20, 20);
        assert_eq!(s.found.len(), 1, "{:?}", s.found);
        let stall = &s.found[0];
        assert_eq!((stall.placed, stall.running), (20, 0));
        assert!((stall.at_s - 2.0).abs() < 1e-9 && (stall.lasted_s - 3.1).abs() < 1e-9);
        assert_eq!(stall.unanswered_polls, 2);
        assert_eq!(stall.cause(), "the cluster did not answer");
    }
}
