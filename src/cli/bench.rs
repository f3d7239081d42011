//! `surge bench`: flags and printing; the engines are in `surge_harness::bench`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use surge_harness::bench::{burst, exec, failover, raft, snapshot};
use surge_harness::output::{json as print_json, table, Output};

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Commit throughput and latency of submissions through a 3-replica cluster (fsync on).
    Raft(RaftArgs),
    /// Kill -9 the leader under load, repeatedly: time to the first accepted write, and no loss.
    Failover(FailoverArgs),
    /// The 100k-CPU burst: submit -> all placed -> all running; cancel -> all capacity free.
    Burst(BurstArgs),
    /// Exec and files: API vs plain `crun exec` side by side, the RL pattern on real
    /// containers, and execs into 10,000 simulated sandboxes through every replica.
    Exec(ExecArgs),
    /// Checkpoint and restore of container sandboxes holding 64 MiB and 1 GiB beside a cold
    /// start that re-runs the set-up, and a fork of 8 (root, the CRIU kit: scripts/setup-criu).
    Snapshot(SnapshotArgs),
    /// Sandbox start: cold and from the warm pool, side by side with `crun run` of the same
    /// root filesystem; starts per second at the cap; create -> running through the API.
    Start(super::bench_start::StartArgs),
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// Memory each measured sandbox holds, in MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    sizes_mib: Vec<u64>,
    /// Checkpoint + restore cycles and cold starts for sizes up to 256 MiB ...
    #[arg(long, default_value_t = 20)]
    cycles: u32,
    /// ... and for larger ones.
    #[arg(long, default_value_t = 5)]
    cycles_large: u32,
    /// Sandboxes per fork ...
    #[arg(long, default_value_t = 8)]
    forks: u32,
    /// ... and forks measured.
    #[arg(long, default_value_t = 5)]
    fork_runs: u32,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Execs of `true` per side (API, crun exec) in the side-by-side part.
    #[arg(long, default_value_t = 200)]
    anchor_execs: u32,
    /// Sandboxes of the RL pattern, created in one call ...
    #[arg(long, default_value_t = 64)]
    rl_sandboxes: u32,
    /// ... each driven by this many sequential execs (plus a file round trip).
    #[arg(long, default_value_t = 40)]
    rl_execs: u32,
    /// Simulated sandboxes of the scale part ...
    #[arg(long, default_value_t = 10_000)]
    scale_sandboxes: u32,
    /// ... execs into each ...
    #[arg(long, default_value_t = 10)]
    scale_execs: u32,
    /// ... with this many in flight, spread over every replica.
    #[arg(long, default_value_t = 256)]
    scale_concurrency: u32,
    /// Only the simulated part (a host without crun).
    #[arg(long)]
    skip_containers: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
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
    /// Writers submitting during the kills and restarts.
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// Rolling restarts after the kills: SIGTERM each replica in turn, start it again, wait
    /// until converged; leader changes and the longest refused write are reported. Off by
    /// default: with node daemons it adds ~1 min to a debug run.
    #[arg(long, default_value_t = 0)]
    rolling: u64,
    /// Skip the same kills against etcd (run by default when `etcd` is on PATH).
    #[arg(long)]
    no_etcd: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(cmd: BenchCmd, bin: PathBuf) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Raft(a) => run_raft(a, &bin).await,
        BenchCmd::Failover(a) => run_failover(a, &bin).await,
        BenchCmd::Burst(a) => run_burst(a, &bin).await,
        BenchCmd::Exec(a) => run_exec(a, &bin).await,
        BenchCmd::Snapshot(a) => run_snapshot(a).await,
        BenchCmd::Start(a) => super::bench_start::run(a, &bin).await,
    }
}

async fn run_raft(args: RaftArgs, bin: &Path) -> anyhow::Result<()> {
    let cfg = raft::RaftConfig {
        replicas: args.replicas,
        requests: args.requests,
        concurrency: args.concurrency,
        runs: args.runs,
        via_follower: args.via_follower,
        no_etcd: args.no_etcd,
        progress: args.output == Output::Table,
    };
    if !args.no_etcd && surge_harness::etcd::find_binary().is_none() && args.output == Output::Table
    {
        eprintln!("etcd is not installed (Debian: etcd-server): surge runs alone");
    }
    let r = raft::run(cfg, bin).await?;
    match args.output {
        Output::Json => print_json(&r.json()),
        Output::Table => {
            let row = |who: &str, x: &raft::RaftRun| {
                vec![
                    who.to_string(),
                    args.replicas.to_string(),
                    args.requests.to_string(),
                    args.concurrency.to_string(),
                    format!("{:.0}", x.ops_per_s),
                    format!("{:.2}", x.p50_ms),
                    format!("{:.2}", x.p99_ms),
                    x.errors.to_string(),
                ]
            };
            let mut rows = vec![row("surge", &r.surge)];
            if let Some(e) = &r.etcd {
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
            if let Some(ratio) = r.ratio {
                let verdict = if ratio >= 1.0 { "meets" } else { "misses" };
                println!(
                    "surge/etcd throughput: {ratio:.2}x ({verdict} the goal of at least etcd's)"
                );
            }
        }
    }
    if r.errors() > 0 {
        bail!("{} writes failed", r.errors());
    }
    Ok(())
}

async fn run_failover(args: FailoverArgs, bin: &Path) -> anyhow::Result<()> {
    let cfg = failover::FailoverConfig {
        replicas: args.replicas,
        runs: args.runs,
        writers: args.writers,
        progress: args.output == Output::Table,
        rolling: args.rolling,
        no_etcd: args.no_etcd,
    };
    let r = failover::run(cfg, bin).await?;
    match args.output {
        Output::Json => print_json(&r.json()),
        Output::Table => {
            table(
                &[
                    "KILLS",
                    "P50_MS",
                    "MAX_MS",
                    "ACKED_WRITES",
                    "LOST",
                    "DUPLICATED",
                ],
                &[vec![
                    r.first_write_ms.len().to_string(),
                    format!("{:.0}", r.p50_ms),
                    format!("{:.0}", r.max_ms),
                    r.acked_writes.to_string(),
                    r.lost.to_string(),
                    r.duplicated.to_string(),
                ]],
            );
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
            println!(
                "phases after the kill (p50): stood {}, elected {}, blank entry committed {}, \
                 first write accepted {}",
                f(r.phase_p50(|p| p.stood_ms)),
                f(r.phase_p50(|p| p.elected_ms)),
                f(r.phase_p50(|p| p.blank_committed_ms)),
                f(r.phase_p50(|p| Some(p.first_write_ms)))
            );
            let (changes, allowed) = r.rolling_changes();
            println!(
                "kills: {} leader changes, longest refused write {:.0} ms",
                r.kill_leader_changes, r.kill_longest_refused_ms
            );
            println!(
                "rolling restarts: {} replicas restarted ({} leaders), {changes} leader changes \
                 (goal: at most {allowed}), longest refused write {:.0} ms",
                r.rolling.len(),
                r.rolling.iter().filter(|s| s.was_leader).count(),
                r.rolling_longest_refused_ms()
            );
            let (p50, max) = (r.p50_ms / 1000.0, r.max_ms / 1000.0);
            let (g50, gmax) = (failover::GOAL_P50, failover::GOAL_MAX);
            println!(
                "goals: {} {} ({p50:.3} s), {} {} ({max:.3} s)",
                g50.what,
                g50.verdict(p50),
                gmax.what,
                gmax.verdict(max)
            );
            if let Some(e) = &r.etcd {
                println!(
                    "etcd {} (same kills, same writers, same machine, right after): p50 {:.0} ms, \
                     max {:.0} ms, elected p50 {}",
                    e.version.as_deref().unwrap_or("?"),
                    e.p50_ms(),
                    e.max_ms(),
                    e.elected_p50_ms()
                        .map_or("-".to_string(), |v| format!("{v:.0} ms"))
                );
            } else if r.etcd_missing {
                println!("etcd not installed: no side-by-side figure (scripts/setup installs etcd-server)");
            }
        }
    }
    if r.lost > 0 || r.duplicated > 0 {
        bail!(
            "{} acknowledged writes lost, {} keys applied twice",
            r.lost,
            r.duplicated
        );
    }
    Ok(())
}

async fn run_burst(args: BurstArgs, bin: &Path) -> anyhow::Result<()> {
    let cpu_millis = surge_client::convert::cpu_millis(Some(&args.cpu))?;
    let cfg = burst::BurstConfig {
        nodes: args.nodes,
        node_cpus: args.node_cpus,
        node_memory_gib: args.node_memory_gib,
        sandboxes: args.sandboxes,
        cpu_millis,
        memory_mib: args.memory_mib,
        runs: args.runs,
        nodes_per_process: args.nodes_per_process,
        replicas: args.replicas,
        timeout: Duration::from_secs(args.timeout_s),
        profile: args.profile.clone(),
        progress: args.output == Output::Table,
    };
    let r = burst::run(cfg, bin).await?;
    match args.output {
        Output::Json => print_json(&r.json()),
        Output::Table => {
            let ((placed_p50, placed_max), (running_p50, running_max)) = (r.placed(), r.running());
            let (released_p50, released_max) = r.released();
            table(
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
                    format!("{:.0}", r.scheduler_rss_mib),
                ]],
            );
            let (placed_goal, running_goal) = burst::goals(args.sandboxes);
            for (goal, p50) in [(placed_goal, placed_p50), (running_goal, running_p50)] {
                if let Some(g) = goal {
                    println!("goal {}: p50 {p50:.3} s, {}", g.what, g.verdict(p50));
                }
            }
            let stalls: Vec<String> = r
                .runs
                .iter()
                .flat_map(|run| &run.stalls)
                .map(|s| format!("{:.1} s at {:.1} s ({})", s.lasted_s, s.at_s, s.cause()))
                .collect();
            println!(
                "nodes registered in {:.1} s; elections: {} while registering, {:?} in the runs; \
                 stalls (no progress > 2 s): {}",
                r.registered_s,
                r.registration_terms_moved,
                r.runs.iter().map(|run| run.terms_moved).collect::<Vec<_>>(),
                if stalls.is_empty() {
                    "none".to_string()
                } else {
                    stalls.join(", ")
                }
            );
        }
    }
    Ok(())
}

async fn run_exec(args: ExecArgs, bin: &Path) -> anyhow::Result<()> {
    let cfg = exec::ExecConfig {
        replicas: args.replicas,
        anchor_execs: args.anchor_execs,
        rl_sandboxes: args.rl_sandboxes,
        rl_execs: args.rl_execs,
        scale_sandboxes: args.scale_sandboxes,
        scale_execs: args.scale_execs,
        scale_concurrency: args.scale_concurrency,
        skip_containers: args.skip_containers,
        ..exec::ExecConfig::default()
    };
    let r = exec::run(cfg, bin).await?;
    if args.output == Output::Json {
        print_json(&r.json());
        return Ok(());
    }
    if let Some(a) = &r.anchor {
        println!(
            "exec of `true` in one container sandbox, {} each, interleaved:",
            a.api.n
        );
        table(
            &["PATH", "P50_MS", "P99_MS"],
            &[
                vec![
                    "API (client -> replica -> node -> crun exec --process)".into(),
                    format!("{:.2}", a.api.p50_ms),
                    format!("{:.2}", a.api.p99_ms),
                ],
                vec![
                    "crun exec (plain, same container)".into(),
                    format!("{:.2}", a.crun.p50_ms),
                    format!("{:.2}", a.crun.p99_ms),
                ],
            ],
        );
        println!(
            "ratio API / crun exec: p50 {:.2}x, p99 {:.2}x (goal <= 2)",
            a.api.p50_ms / a.crun.p50_ms.max(1e-9),
            a.api.p99_ms / a.crun.p99_ms.max(1e-9)
        );
    }
    if let Some(rl) = &r.rl {
        println!("\nRL pattern: {} sandboxes created in one call, {} execs (1 KiB out) + a 64 KiB file round trip each:", rl.sandboxes, rl.execs_each);
        table(
            &[
                "WALL_S",
                "EXEC_P50_MS",
                "EXEC_P99_MS",
                "CREATE_TO_FIRST_OUTPUT_P50_MS",
                "P99_MS",
                "FILES_OK",
            ],
            &[vec![
                format!("{:.2}", rl.wall_s),
                format!("{:.2}", rl.exec.p50_ms),
                format!("{:.2}", rl.exec.p99_ms),
                format!("{:.0}", rl.first_output.p50_ms),
                format!("{:.0}", rl.first_output.p99_ms),
                format!("{}/{}", rl.files_ok, rl.sandboxes),
            ]],
        );
        println!(
            "goal create -> first exec output p50 < 250 ms: {}",
            if rl.first_output.p50_ms < 250.0 {
                "met"
            } else {
                "missed"
            }
        );
    }
    if let Some(s) = &r.scale {
        println!(
            "\nscale: {} execs into {} simulated sandboxes through every replica:",
            s.execs, s.sandboxes
        );
        table(
            &["EXECS_PER_S", "P50_MS", "P99_MS", "WALL_S"],
            &[vec![
                format!("{:.0}", s.execs_per_s),
                format!("{:.2}", s.exec.p50_ms),
                format!("{:.2}", s.exec.p99_ms),
                format!("{:.1}", s.wall_s),
            ]],
        );
        let rows: Vec<Vec<String>> = s
            .replica_cpu_s
            .iter()
            .map(|(id, leader, cpu)| {
                vec![
                    id.to_string(),
                    if *leader {
                        "leader".into()
                    } else {
                        "follower".into()
                    },
                    format!("{cpu:.2}"),
                ]
            })
            .chain(std::iter::once(vec![
                "nodes".into(),
                "(all node processes)".into(),
                format!("{:.2}", s.node_cpu_s),
            ]))
            .collect();
        table(&["REPLICA", "ROLE", "CPU_S"], &rows);
    }
    Ok(())
}

async fn run_snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let cfg = snapshot::SnapshotConfig {
        sizes_mib: args.sizes_mib,
        cycles: args.cycles,
        cycles_large: args.cycles_large,
        forks: args.forks,
        fork_runs: args.fork_runs,
        data_dir: None,
    };
    let r = snapshot::run(cfg).await?;
    let restore_goal = surge_harness::bench::Goal {
        what: "restore of 64 MiB, p50",
        limit_s: 0.150,
    };
    let fork_goal = surge_harness::bench::Goal {
        what: "fork of 8, all running",
        limit_s: 1.0,
    };
    let small = r.sizes.iter().find(|s| s.size_mib == 64);
    if args.output == Output::Json {
        let mut goals = vec![fork_goal.json(r.fork.all_running.p50_ms / 1000.0)];
        if let Some(s) = small {
            goals.push(restore_goal.json(s.restore.p50_ms / 1000.0));
        }
        print_json(&serde_json::json!({"sizes": r.sizes, "fork": r.fork, "goals": goals}));
        return Ok(());
    }
    let f = |x: f64| format!("{x:.0}");
    let rows: Vec<Vec<String>> = r
        .sizes
        .iter()
        .map(|s| {
            vec![
                format!("{} MiB", s.size_mib),
                format!("{:.0}", s.cgroup_mib),
                format!("{:.1}", s.image_mib),
                format!("{}/{}", f(s.checkpoint.p50_ms), f(s.checkpoint.p99_ms)),
                format!("{}/{}", f(s.restore.p50_ms), f(s.restore.p99_ms)),
                format!(
                    "{}/{}",
                    f(s.cold_start_setup.p50_ms),
                    f(s.cold_start_setup.p99_ms)
                ),
                s.restore.n.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "HOLDS",
            "CGROUP MIB",
            "IMAGE MIB",
            "CHECKPOINT P50/P99 MS",
            "RESTORE P50/P99 MS",
            "COLD START + SET-UP P50/P99 MS",
            "N",
        ],
        &rows,
    );
    let fk = &r.fork;
    println!(
        "\nfork of {} from a {} MiB sandbox (dump + copies + restores, all running): p50 {} ms, p99 {} ms over {} forks",
        fk.count,
        fk.source_mib,
        f(fk.all_running.p50_ms),
        f(fk.all_running.p99_ms),
        fk.all_running.n
    );
    if let Some(s) = small {
        let m = s.restore.p50_ms / 1000.0;
        println!(
            "goal: {} <= {:.0} ms: {} ({:.0} ms)",
            restore_goal.what,
            restore_goal.limit_s * 1000.0,
            if m <= restore_goal.limit_s {
                "met"
            } else {
                "missed"
            },
            s.restore.p50_ms
        );
    }
    let m = fk.all_running.p50_ms / 1000.0;
    println!(
        "goal: {} < {:.0} ms: {} ({:.0} ms)",
        fork_goal.what,
        fork_goal.limit_s * 1000.0,
        fork_goal.verdict(m),
        fk.all_running.p50_ms
    );
    Ok(())
}
