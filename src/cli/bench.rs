//! `surge bench`: benchmarks of the real system — replica processes, RocksDB with fsync, gRPC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use surge_chaos::client;
use surge_chaos::cluster::{LocalCluster, StartMode};
use surge_proto::jobs as pb;
use tokio::sync::Mutex;

use super::output::{json as print_json, table, Output};

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Commit throughput and latency of submissions through a 3-replica cluster (fsync on).
    Raft(RaftArgs),
    /// Kill -9 the leader under load, repeatedly: time to the first accepted write, and no loss.
    Failover(FailoverArgs),
    /// The 100k-CPU burst: submit -> all placed -> all running; cancel -> all capacity free.
    Burst(BurstArgs),
}

#[derive(clap::Args)]
pub struct BurstArgs {
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    #[arg(long, default_value_t = 128)]
    node_cpus: u32,
    #[arg(long, default_value_t = 512)]
    node_memory_gib: u64,
    #[arg(long, default_value_t = 100_000)]
    sandboxes: u32,
    /// CPUs per sandbox: cores (1, 0.5) or millicores (500m).
    #[arg(long, default_value = "1")]
    cpu: String,
    #[arg(long, default_value_t = 2048)]
    memory_mib: u64,
    /// Bursts (submit, run, cancel) on the same cluster.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Simulated nodes per `surge node` process.
    #[arg(long, default_value_t = 500)]
    nodes_per_process: u32,
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Record the leader with `perf` from each submit until all sandboxes run, and write
    /// `leader-run-N.data` and its hottest-symbols report `leader-run-N.txt` into this directory.
    #[arg(long)]
    profile: Option<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct RaftArgs {
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Submissions per run.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Clients submitting at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    /// Runs (a fresh cluster each); the report gives the median.
    #[arg(long, default_value_t = 3)]
    runs: u64,
    /// Submit through a follower instead of the leader (adds the forwarding hop).
    #[arg(long)]
    via_follower: bool,
    /// Skip the side-by-side etcd run even when `etcd` is installed.
    #[arg(long)]
    no_etcd: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Leader kills.
    #[arg(long, default_value_t = 5)]
    runs: u64,
    /// Writers submitting during the kills.
    #[arg(long, default_value_t = 4)]
    writers: u64,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(cmd: BenchCmd, bin: PathBuf) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Raft(a) => raft(a, &bin).await,
        BenchCmd::Failover(a) => failover(a, &bin).await,
        BenchCmd::Burst(a) => burst(a, &bin).await,
    }
}

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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
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

struct RaftRun {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl RaftRun {
    fn median_of(runs: &[RaftRun]) -> RaftRun {
        let of = |f: fn(&RaftRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        RaftRun {
            ops_per_s: of(|r| r.ops_per_s),
            p50_ms: of(|r| r.p50_ms),
            p99_ms: of(|r| r.p99_ms),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }

    fn json(&self) -> serde_json::Value {
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

async fn raft_run(args: &RaftArgs, bin: &Path, run: u64) -> anyhow::Result<RaftRun> {
    let dir = tempfile::Builder::new().prefix("surge-bench-").tempdir()?;
    let (cluster, leader) = start_cluster(bin, dir.path(), args.replicas).await?;
    let target = if args.via_follower {
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
    let mut c = client::jobs(&target)?;
    for i in 0..100 {
        c.submit_job(small_job(format!("warm-{run}-{i}"))).await?;
    }
    let measured = drive(args.concurrency, args.requests, || {
        let c = client::jobs(&target)?;
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
async fn etcd_run(args: &RaftArgs, etcd: &Path, run: u64) -> anyhow::Result<RaftRun> {
    let mut cluster = super::etcd::EtcdCluster::start(etcd, args.replicas as usize)?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let target = if args.via_follower {
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
    let c = super::etcd::kv(&target)?;
    for i in 0..100 {
        if !put(&c, format!("warm-{run}-{i}")).await {
            bail!("etcd refused a warm-up put");
        }
    }
    drive(args.concurrency, args.requests, || {
        let c = super::etcd::kv(&target)?;
        Ok(move |i| put(&c, format!("bench-{run}-{i}")))
    })
    .await
}

async fn raft(args: RaftArgs, bin: &Path) -> anyhow::Result<()> {
    let say = |who: &str, run: u64, r: &RaftRun| {
        if args.output == Output::Table {
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
    let etcd = if args.no_etcd {
        None
    } else {
        super::etcd::find_binary()
    };
    if etcd.is_none() && !args.no_etcd && args.output == Output::Table {
        eprintln!("etcd is not installed (Debian: etcd-server): surge runs alone");
    }
    // Alternate the two systems run by run so that load on the machine hits both alike.
    let mut surge_runs = Vec::new();
    let mut etcd_runs = Vec::new();
    for run in 0..args.runs.max(1) {
        let r = raft_run(&args, bin, run).await?;
        say("surge", run, &r);
        surge_runs.push(r);
        if let Some(etcd) = &etcd {
            let r = etcd_run(&args, etcd, run).await?;
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
    match args.output {
        Output::Json => {
            let mut v = json!({
                "bench": "raft",
                "replicas": args.replicas,
                "requests": args.requests,
                "concurrency": args.concurrency,
                "via_follower": args.via_follower,
                "runs": args.runs,
                "value_bytes": prost::Message::encoded_len(&small_job("bench-0-0".into())),
                "etcd": etcd_median.as_ref().map(|e| {
                    let mut j = e.json();
                    j["version"] = json!(etcd.as_deref().and_then(super::etcd::version));
                    j
                }),
                "surge_vs_etcd_throughput": ratio,
            });
            // The surge figures stay at the top level, where earlier reports had them.
            if let (Some(obj), serde_json::Value::Object(s)) = (v.as_object_mut(), surge.json()) {
                obj.extend(s);
            }
            print_json(&v)
        }
        Output::Table => {
            let row = |who: &str, r: &RaftRun| {
                vec![
                    who.to_string(),
                    args.replicas.to_string(),
                    args.requests.to_string(),
                    args.concurrency.to_string(),
                    format!("{:.0}", r.ops_per_s),
                    format!("{:.2}", r.p50_ms),
                    format!("{:.2}", r.p99_ms),
                    r.errors.to_string(),
                ]
            };
            let mut rows = vec![row("surge", &surge)];
            if let Some(e) = &etcd_median {
                rows.push(row("etcd", e));
            }
            table(
                &[
                    "SYSTEM",
                    "REPLICAS",
                    "REQUESTS",
                    "CONCURRENCY",
                    "COMMITS/S",
                    "P50_MS",
                    "P99_MS",
                    "ERRORS",
                ],
                &rows,
            );
            if let Some(ratio) = ratio {
                let verdict = if ratio >= 1.0 { "meets" } else { "misses" };
                println!(
                    "surge/etcd throughput: {ratio:.2}x ({verdict} the goal of at least etcd's)"
                );
            }
        }
    }
    let errors = surge.errors + etcd_median.map_or(0, |e| e.errors);
    if errors > 0 {
        bail!("{errors} writes failed");
    }
    Ok(())
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
            let Ok(mut c) = client::jobs(&addrs[turn]) else {
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

/// Every job of `tenant`, page by page.
pub async fn list_all(
    c: &mut surge_proto::jobs::jobs_client::JobsClient<surge_chaos::client::Conn>,
    tenant: &str,
) -> anyhow::Result<Vec<pb::Job>> {
    let mut all = Vec::new();
    let mut before_id = 0;
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                tenant: tenant.into(),
                state: String::new(),
                limit: 10_000,
                before_id,
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

async fn failover(args: FailoverArgs, bin: &Path) -> anyhow::Result<()> {
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
        let mut c = client::jobs(&cluster.addr(survivor)?)?;
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
        if args.output == Output::Table {
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
    let mut c = client::jobs(&cluster.addr(leader)?)?;
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
    let goal = Goal {
        what: "failover < 1 s",
        limit_s: 1.0,
    };
    match args.output {
        Output::Json => print_json(&json!({
            "bench": "failover",
            "kills": times_ms.len(),
            "first_write_ms": times_ms,
            "p50_ms": p50,
            "max_ms": max,
            "acked_writes": acked.len(),
            "lost": lost,
            "duplicated": duplicated,
            "goal": {"p50": goal.json(p50 / 1000.0), "max": goal.json(max / 1000.0)},
        })),
        Output::Table => table(
            &[
                "KILLS",
                "P50_MS",
                "MAX_MS",
                "ACKED_WRITES",
                "LOST",
                "DUPLICATED",
            ],
            &[vec![
                times_ms.len().to_string(),
                format!("{p50:.0}"),
                format!("{max:.0}"),
                acked.len().to_string(),
                lost.to_string(),
                duplicated.to_string(),
            ]],
        ),
    }
    if args.output == Output::Table {
        println!(
            "goal {}: p50 {:.3} s {}, max {:.3} s {}",
            goal.what,
            p50 / 1000.0,
            goal.verdict(p50 / 1000.0),
            max / 1000.0,
            goal.verdict(max / 1000.0)
        );
    }
    if lost > 0 || duplicated > 0 {
        bail!("{lost} acknowledged writes lost, {duplicated} keys applied twice");
    }
    Ok(())
}

/// surge's published goals, held against a measured figure: `(what, limit)`.
struct Goal {
    what: &'static str,
    limit_s: f64,
}

impl Goal {
    fn verdict(&self, measured_s: f64) -> &'static str {
        if measured_s < self.limit_s {
            "met"
        } else {
            "missed"
        }
    }

    fn json(&self, measured_s: f64) -> serde_json::Value {
        json!({"what": self.what, "limit_s": self.limit_s, "measured_s": measured_s,
               "met": measured_s < self.limit_s})
    }
}

/// The goals for a burst of `sandboxes` (issue 5): 100,000 placed in under 1 s and running in
/// under 3 s; 1,000,000 placed in under 10 s.
fn burst_goals(sandboxes: u32) -> (Option<Goal>, Option<Goal>) {
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

/// How long `perf record` is given to attach before the measured phase starts.
const PERF_ATTACH: Duration = Duration::from_millis(500);

/// `perf record` of one process while it lives, for `--profile`: where a missed goal's time goes.
struct Profiler {
    child: std::process::Child,
    data: PathBuf,
}

impl Profiler {
    fn start(pid: u32, data: PathBuf) -> anyhow::Result<Self> {
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("--profile needs `perf` (Debian: linux-perf)")?;
        // perf takes a moment to attach; the burst's clock starts after this.
        std::thread::sleep(PERF_ATTACH);
        Ok(Profiler { child, data })
    }

    /// Stops recording and writes the report (`perf report --stdio`, hottest symbols) next to
    /// the data; returns the report's path.
    fn finish(mut self) -> anyhow::Result<PathBuf> {
        // SIGINT lets perf flush its buffers; it exits on its own.
        let pid = i32::try_from(self.child.id()).context("perf pid")?;
        // SAFETY: kill(2) only sends a signal to the child we spawned and still own.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        self.child.wait()?;
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "1",
                "-i",
            ])
            .arg(&self.data)
            .output()?;
        let report = self.data.with_extension("txt");
        std::fs::write(&report, &out.stdout)?;
        Ok(report)
    }
}

/// Peak resident memory (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
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
async fn node_totals(addr: &str) -> anyhow::Result<(usize, u64)> {
    let nodes = client::nodes(addr)?
        .list_nodes(surge_proto::node::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let ready = nodes.iter().filter(|n| n.state == "ready").count();
    let held = nodes.iter().map(|n| u64::from(n.sandboxes)).sum();
    Ok((ready, held))
}

struct BurstRun {
    placed_s: f64,
    running_s: f64,
    released_s: f64,
    /// When half, 90% and 99% of the sandboxes were reported running: a slow tail (a few
    /// starved nodes) looks different from a slow pipeline.
    running_share_s: [f64; 3],
}

/// How often a burst still in progress prints its counts.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// The shares of a burst whose "reported running" times are recorded.
const RUNNING_SHARES: [f64; 3] = [0.5, 0.9, 0.99];

async fn burst_run(
    args: &BurstArgs,
    addr: &str,
    run: u32,
    cpu_millis: u64,
    mut profiler: Option<Profiler>,
) -> anyhow::Result<BurstRun> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut jobs = client::jobs(addr)?;
    let started = Instant::now();
    let job_id = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                count: args.sandboxes,
                cpu_millis,
                memory_mib: args.memory_mib,
                template: "busybox".into(),
                command: vec!["rl-episode".into()],
                tenant: "bench".into(),
                ..Default::default()
            }),
            idempotency_key: format!("burst-{run}-{}", super::super::now_ms()),
        })
        .await?
        .into_inner()
        .job_id;
    let mut placed_s = None;
    let mut running_share_s = [None; 3];
    let mut progress_at = Instant::now();
    let running_s;
    loop {
        let Ok(j) = jobs.get_job(pb::GetJobRequest { job_id }).await else {
            if started.elapsed() > timeout {
                bail!("burst {run}: the cluster stopped answering");
            }
            // Not a tight loop: a cluster between leaders is not hammered by its benchmark.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let j = j.into_inner();
        let c = j.counts.unwrap_or_default();
        if placed_s.is_none() && c.pending == 0 {
            placed_s = Some(started.elapsed().as_secs_f64());
        }
        // A long burst says how it is doing (a stall looks different from a slow climb).
        if args.output == Output::Table && progress_at.elapsed() >= PROGRESS_INTERVAL {
            progress_at = Instant::now();
            eprintln!(
                "  {:.1} s: {} pending, {} placed, {} running",
                started.elapsed().as_secs_f64(),
                c.pending,
                c.placed,
                c.running
            );
        }
        for (at, share) in running_share_s.iter_mut().zip(RUNNING_SHARES) {
            if at.is_none() && f64::from(c.running) >= share * f64::from(args.sandboxes) {
                *at = Some(started.elapsed().as_secs_f64());
            }
        }
        if c.running == args.sandboxes {
            running_s = started.elapsed().as_secs_f64();
            if let Some(p) = profiler.take() {
                let report = p.finish()?;
                if args.output == Output::Table {
                    eprintln!("run {}: leader profile in {}", run + 1, report.display());
                }
            }
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "burst {run}: after {timeout:?} {} pending, {} placed, {} running ({})",
                c.pending,
                c.placed,
                c.running,
                j.pending_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled = Instant::now();
    jobs.cancel_job(pb::CancelJobRequest { job_id }).await?;
    loop {
        // A poll may time out while the cluster is busy; only the deadline below is fatal.
        if let Ok((_, 0)) = node_totals(addr).await {
            break;
        }
        if cancelled.elapsed() > timeout {
            bail!("burst {run}: sandboxes still held {timeout:?} after cancel");
        }
        // Listing 10,000 nodes is not free for the leader: poll finely only at first.
        let pause_ms = if cancelled.elapsed() < Duration::from_millis(200) {
            10
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
    Ok(BurstRun {
        placed_s: placed_s.unwrap_or(running_s),
        running_s,
        released_s: cancelled.elapsed().as_secs_f64(),
        running_share_s: running_share_s.map(|at| at.unwrap_or(running_s)),
    })
}

async fn burst(args: BurstArgs, bin: &Path) -> anyhow::Result<()> {
    let cpu_millis =
        surge_scheduler::model::parse_cpu(&args.cpu).map_err(|e| anyhow::anyhow!("--cpu: {e}"))?;
    let dir = tempfile::Builder::new().prefix("surge-burst-").tempdir()?;
    let (mut cluster, leader) = start_cluster(bin, dir.path(), args.replicas).await?;
    let addr = cluster.addr(leader)?;
    let per = args.nodes_per_process.max(1);
    let groups = args.nodes.div_ceil(per);
    let cpus = args.node_cpus.to_string();
    let mem = (args.node_memory_gib * 1024).to_string();
    for g in 0..groups {
        let n = per.min(args.nodes - g * per);
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
        if ready >= args.nodes as usize {
            break;
        }
        if waiting.elapsed() > Duration::from_secs(args.timeout_s) {
            bail!("only {ready} of {} nodes registered", args.nodes);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if args.output == Output::Table {
        eprintln!(
            "{} nodes ready in {:.1} s; bursting {} sandboxes x {} CPU",
            args.nodes,
            waiting.elapsed().as_secs_f64(),
            args.sandboxes,
            args.cpu
        );
    }
    let mut runs = Vec::new();
    let leader_pid = cluster.replica(leader)?.pid();
    if let Some(dir) = &args.profile {
        std::fs::create_dir_all(dir)?;
    }
    for run in 0..args.runs.max(1) {
        let profiler = match (&args.profile, leader_pid) {
            (Some(dir), Some(pid)) => Some(Profiler::start(
                pid,
                dir.join(format!("leader-run-{}.data", run + 1)),
            )?),
            _ => None,
        };
        let r = burst_run(&args, &addr, run, cpu_millis, profiler).await?;
        if args.output == Output::Table {
            let [half, most, nearly_all] = r.running_share_s;
            eprintln!(
                "run {}: placed {:.3} s, running {:.3} s (50% {half:.3} s, 90% {most:.3} s, 99% {nearly_all:.3} s), released {:.3} s",
                run + 1,
                r.placed_s,
                r.running_s,
                r.released_s
            );
        }
        runs.push(r);
    }
    let rss = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.replica(id).ok().and_then(|r| r.pid()))
        .filter_map(peak_rss_mib)
        .fold(0.0, f64::max);
    let stat = |f: fn(&BurstRun) -> f64| {
        let v: Vec<f64> = runs.iter().map(f).collect();
        (median(&v), v.iter().copied().fold(0.0, f64::max))
    };
    let (placed_p50, placed_max) = stat(|r| r.placed_s);
    let (running_p50, running_max) = stat(|r| r.running_s);
    let (released_p50, released_max) = stat(|r| r.released_s);
    let (placed_goal, running_goal) = burst_goals(args.sandboxes);
    match args.output {
        Output::Json => print_json(&json!({
            "goals": {
                "placed": placed_goal.as_ref().map(|g| g.json(placed_p50)),
                "running": running_goal.as_ref().map(|g| g.json(running_p50)),
            },
            "bench": "burst",
            "nodes": args.nodes,
            "sandboxes": args.sandboxes,
            "cpu_millis": cpu_millis,
            "runs": runs.len(),
            "placed_s": {"p50": placed_p50, "max": placed_max},
            "running_s": {"p50": running_p50, "max": running_max},
            "released_s": {"p50": released_p50, "max": released_max},
            "running_share_s": runs.iter().map(|r| json!({
                "50": r.running_share_s[0], "90": r.running_share_s[1], "99": r.running_share_s[2],
            })).collect::<Vec<_>>(),
            "scheduler_rss_mib": rss,
        })),
        Output::Table => table(
            &[
                "NODES",
                "SANDBOXES",
                "PLACED_S p50/max",
                "RUNNING_S p50/max",
                "RELEASED_S p50/max",
                "SCHEDULER_RSS_MIB",
            ],
            &[vec![
                args.nodes.to_string(),
                args.sandboxes.to_string(),
                format!("{placed_p50:.3}/{placed_max:.3}"),
                format!("{running_p50:.3}/{running_max:.3}"),
                format!("{released_p50:.3}/{released_max:.3}"),
                format!("{rss:.0}"),
            ]],
        ),
    }
    if args.output == Output::Table {
        for (goal, p50) in [(placed_goal, placed_p50), (running_goal, running_p50)] {
            if let Some(g) = goal {
                println!("goal {}: p50 {p50:.3} s, {}", g.what, g.verdict(p50));
            }
        }
    }
    cluster.stop_all(Duration::from_secs(5));
    Ok(())
}
