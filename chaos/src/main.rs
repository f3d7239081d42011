//! `surge-chaos` (run as `surge chaos`): a real cluster, a workload, faults on a seeded
//! schedule, and checkers; `surge chaos sim` is the deterministic simulator. The work is in
//! `surge_chaos::run` and `surge_chaos::sim`; this file parses flags, prints the replay command
//! and the report. It is its own binary so that the product binary links neither the fault
//! injector nor tokio's `test-util` (the simulator's paused clock).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use surge_chaos::faults::{self, FaultKind};
use surge_chaos::run::{self, ChaosConfig, Report};
use surge_harness::output::{self, Output};

fn main() {
    // A daemon-like process: a peer that went away must not kill it (see `surge`'s main).
    // SAFETY: called before any thread exists; SIG_IGN only changes what a write to a closed
    // socket or pipe does (it returns EPIPE).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let args = ChaosArgs::parse();
    let runtime = surge_client::process::runtime_or_exit();
    let result = surge_harness::surge_binary().and_then(|bin| runtime.block_on(run(args, bin)));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Chaos run: a real cluster, a workload, faults on a seeded schedule, and checkers.
#[derive(clap::Parser)]
#[command(name = "surge chaos", version, args_conflicts_with_subcommands = true)]
pub struct ChaosArgs {
    #[command(subcommand)]
    command: Option<ChaosCommand>,
    /// Seed of the fault schedule and the workload (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults and workload go on: 90s, 2m, 1500ms (a bare number is seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Fault kinds, comma separated: kill, pause, restart, wipe, nodes, partition, or all
    /// (none: ""). `partition` puts each replica in its own network namespace (needs root).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Scheduler replicas.
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Simulated nodes.
    #[arg(long, default_value_t = 20)]
    nodes: u32,
    /// Node daemon processes the nodes are split over (the `nodes` fault kills one).
    #[arg(long, default_value_t = 4)]
    node_groups: u32,
    /// Real node daemons on the container runtime (crun), with small real jobs of their own
    /// (default: 2 where the harness is root and crun is usable, else 0, saying why).
    #[arg(long)]
    container_nodes: Option<u32>,
    /// CPUs of each simulated node.
    #[arg(long, default_value_t = 16)]
    node_cpus: u32,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Most uncancelled jobs one client keeps.
    #[arg(long, default_value_t = 20)]
    live_jobs: usize,
    /// Node TTL of the replicas (a silent node is marked down after this); the `nodes` fault
    /// holds a group down for 1/4 to 3/2 of it.
    #[arg(long, default_value_t = surge_scheduler::leader::NODE_TTL_MS)]
    node_ttl_ms: u64,
    /// After the faults heal, every placeable pending job must be placed within this.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    liveness_bound: Duration,
    /// Keep the cluster's data dirs and logs here (default: a temp dir, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temp dir with the data dirs and logs.
    #[arg(long)]
    keep: bool,
    /// Write the whole history here as JSON lines, one event a line, as the run goes (default:
    /// history.jsonl in the run's directory, kept with it).
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Subcommand)]
pub enum ChaosCommand {
    /// Deterministic simulation: openraft, the storage, the state machine and placement in one
    /// process on a simulated network and clock; one seed replays one run exactly.
    Sim(SimArgs),
}

#[derive(clap::Args)]
pub struct SimArgs {
    /// Seeds to run: `A..B` (B excluded), `A..=B`, or one seed.
    #[arg(long, default_value = "1..101", value_parser = parse_seeds)]
    seeds: std::ops::Range<u64>,
    /// Simulated milliseconds of faults and workload per seed.
    #[arg(long, default_value_t = surge_chaos::sim::SimConfig::default().fault_phase_ms)]
    fault_ms: u64,
    /// Replicas (3 or 5 is typical).
    #[arg(long, default_value_t = surge_chaos::sim::SimConfig::default().replicas)]
    replicas: u64,
    /// Simulated node daemons.
    #[arg(long, default_value_t = surge_chaos::sim::SimConfig::default().nodes)]
    nodes: u32,
    /// Plant a bug to watch the checkers catch it: lose-acknowledged-job or
    /// stale-quiet-planner (a quiet cycle in the real leader core that ignores capacity changes).
    #[arg(long, value_parser = parse_bug)]
    inject: Option<surge_chaos::sim::InjectedBug>,
    /// Stop at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `A..B` (B excluded), `A..=B`, or a single seed `A`.
pub fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>, String> {
    let num = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|_| format!("{x:?} is not a seed (a number)"))
    };
    let range = if let Some((a, b)) = s.split_once("..=") {
        num(a)?..num(b)?.saturating_add(1)
    } else if let Some((a, b)) = s.split_once("..") {
        num(a)?..num(b)?
    } else {
        let a = num(s)?;
        a..a.saturating_add(1)
    };
    if range.is_empty() {
        return Err(format!("{s:?} holds no seed (write A..B with A < B)"));
    }
    Ok(range)
}

fn parse_bug(s: &str) -> Result<surge_chaos::sim::InjectedBug, String> {
    s.parse()
        .map_err(|e: surge_chaos::sim::SimError| e.to_string())
}

/// `surge chaos sim`: sweep the seeds on a blocking thread (each seed builds its own
/// current-thread runtime), print a line per failing seed and the totals.
async fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    use surge_chaos::sim::{self, SimConfig};
    let cfg = SimConfig {
        fault_phase_ms: args.fault_ms,
        replicas: args.replicas,
        nodes: args.nodes,
        inject: args.inject,
        ..SimConfig::default()
    };
    cfg.validate()?;
    let seeds = args.seeds.clone();
    let total = seeds.end - seeds.start;
    let fail_fast = args.fail_fast;
    let sweep_cfg = cfg.clone();
    let started = std::time::Instant::now();
    let report = tokio::task::spawn_blocking(move || {
        let mut done = 0u64;
        sim::sweep(seeds, &sweep_cfg, fail_fast, |o| {
            done += 1;
            if !o.violations.is_empty() {
                let names: Vec<&str> = o.violations.iter().map(|v| v.checker.as_str()).collect();
                eprintln!(
                    "seed {}: {} — replay: {}",
                    o.seed,
                    names.join(", "),
                    o.replay
                );
            } else if total <= 20 {
                eprintln!("seed {}: ok, digest {}", o.seed, o.digest);
            }
            if done.is_multiple_of(100) {
                eprintln!(
                    "{done}/{total} seeds, {:.1} seeds/s",
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    })
    .await
    .context("simulation thread")??;
    let wall = started.elapsed();
    let seeds_per_second = report.seeds as f64 / wall.as_secs_f64().max(1e-9);
    match args.output {
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "wall_ms".into(),
                    u64::try_from(wall.as_millis()).unwrap_or(u64::MAX).into(),
                );
                o.insert("seeds_per_second".into(), seeds_per_second.into());
                o.insert(
                    "verdict".into(),
                    if report.failed_seeds.is_empty() {
                        "pass"
                    } else {
                        "fail"
                    }
                    .into(),
                );
            }
            output::json(&v);
        }
        Output::Table => {
            let faults: Vec<String> = report
                .faults
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            println!(
                "verdict:     {}",
                if report.failed_seeds.is_empty() {
                    "pass"
                } else {
                    "FAIL"
                }
            );
            println!(
                "seeds:       {} in {:.1} s ({seeds_per_second:.1} seeds/s), {} failed",
                report.seeds,
                wall.as_secs_f64(),
                report.failed_seeds.len()
            );
            println!("digest:      {}", report.digest);
            println!("faults:      {}", faults.join(", "));
            println!(
                "operations:  {} ok, {} fail, {} info; {} messages; {:.0} s simulated",
                report.ops_ok,
                report.ops_fail,
                report.ops_info,
                report.messages,
                report.simulated_ms as f64 / 1000.0
            );
            if let Some(f) = &report.first_failure {
                println!("\nfirst failing seed {} — replay: {}", f.seed, f.replay);
                for v in &f.violations {
                    println!(
                        "{}: {}\n{}",
                        v.checker,
                        v.message,
                        serde_json::to_string_pretty(&v.counterexample).unwrap_or_default()
                    );
                }
            }
        }
    }
    if let Some(f) = &report.first_failure {
        bail!(
            "{} of {} seeds failed; replay the first with: {}",
            report.failed_seeds.len(),
            report.seeds,
            f.replay
        );
    }
    Ok(())
}

/// `90s`, `2m`, `1500ms`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // A bare number is seconds, as it always was here; anything else is humantime's syntax.
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 60s, 2m, 500ms, 1h30m): {e}"))
}

/// Container nodes of a run where the host can run them and `--container-nodes` is not given.
const DEFAULT_CONTAINER_NODES: u32 = 2;

fn kinds_spec(kinds: &[FaultKind]) -> String {
    if kinds.is_empty() {
        return "''".into();
    }
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
}

fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn replay(args: &ChaosArgs, seed: u64, kinds: &[FaultKind], container_nodes: u32) -> String {
    format!(
        "surge chaos --seed {seed} --duration {} --faults {} --replicas {} --nodes {} --node-groups {} --container-nodes {container_nodes} --node-cpus {} --clients {} --live-jobs {} --node-ttl-ms {} --liveness-bound {}",
        format_duration(args.duration),
        kinds_spec(kinds),
        args.replicas,
        args.nodes,
        args.node_groups,
        args.node_cpus,
        args.clients,
        args.live_jobs,
        args.node_ttl_ms,
        format_duration(args.liveness_bound),
    )
}

pub async fn run(mut args: ChaosArgs, bin: PathBuf) -> anyhow::Result<()> {
    if let Some(ChaosCommand::Sim(sim)) = args.command.take() {
        return run_sim(sim).await;
    }
    let kinds = faults::parse_kinds(&args.faults)?;
    if args.replicas == 0 || args.replicas > surge_harness::cluster::REPLICAS_MAX {
        bail!(
            "--replicas {}: between 1 and {}",
            args.replicas,
            surge_harness::cluster::REPLICAS_MAX
        );
    }
    if args.nodes == 0 || args.clients == 0 {
        bail!("--nodes and --clients must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            // Nanoseconds since 1970 fit in a u64 until 2554.
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(1)
    });
    // Progress goes to stderr; stdout carries the report only.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "surge_chaos=info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let container_nodes = match args.container_nodes {
        Some(n) if n > run::CONTAINER_NODES_MAX => {
            bail!(
                "--container-nodes {n}: at most {}",
                run::CONTAINER_NODES_MAX
            )
        }
        Some(0) => 0,
        Some(n) => match surge_harness::containers::usable() {
            Ok(()) => n,
            Err(why) => bail!("--container-nodes {n}: {why}"),
        },
        None => match surge_harness::containers::usable() {
            Ok(()) => DEFAULT_CONTAINER_NODES,
            Err(why) => {
                eprintln!("no container nodes: {why}");
                0
            }
        },
    };
    let replay = replay(&args, seed, &kinds, container_nodes);
    eprintln!("replay: {replay}");

    let mut cfg = ChaosConfig::new(bin, seed);
    cfg.duration = args.duration;
    cfg.faults = kinds;
    cfg.replicas = args.replicas;
    cfg.nodes = args.nodes;
    cfg.node_groups = args.node_groups;
    cfg.container_nodes = container_nodes;
    cfg.node_cpus = args.node_cpus;
    cfg.clients = args.clients;
    cfg.live_jobs_max_per_client = args.live_jobs;
    cfg.node_ttl_ms = args.node_ttl_ms;
    cfg.liveness_bound = args.liveness_bound;
    cfg.dir = args.dir.clone();
    cfg.keep = args.keep;
    cfg.history = args.history.clone();

    let report = run::run(&cfg).await.context("chaos run")?;
    match args.output {
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("replay".into(), serde_json::Value::String(replay.clone()));
            }
            output::json(&v);
        }
        Output::Table => print_table(&report, &replay),
    }
    eprintln!("replay: {replay}");
    if !report.violations.is_empty() {
        bail!(
            "{} violation(s): {}; replay with: {replay}",
            report.violations.len(),
            report
                .violations
                .iter()
                .map(|v| v.checker.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn print_table(r: &Report, replay: &str) {
    println!("replay:      {replay}");
    println!(
        "verdict:     {} ({} ms run, {} ms with set-up and checks)",
        r.verdict, r.duration_ms, r.elapsed_ms
    );
    let faults: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("faults:      {} ({})", r.faults_total, faults.join(", "));
    let o = &r.operations;
    println!(
        "operations:  {} ok, {} fail, {} info; {} of {} keys acknowledged, {} cancels, {} samples",
        o.ok,
        o.fail,
        o.info,
        o.submissions_acknowledged,
        o.keys_submitted,
        o.cancels_acknowledged,
        o.samples
    );
    println!(
        "holdings:    {} samples of which live node holds which sandbox, {} holdings checked ({} running on container hosts)",
        o.assignment_samples, o.assignments_checked, o.container_runs_seen
    );
    if r.container_nodes > 0 {
        let c = &r.containers;
        println!(
            "containers:  {} nodes; {} jobs, {} sandboxes: {} succeeded, {} failed, {} cancelled; {} left behind",
            r.container_nodes,
            c.jobs,
            c.sandboxes,
            c.succeeded,
            c.failed,
            c.cancelled,
            c.leftovers.len()
        );
        for f in &c.failures {
            println!("             {f}");
        }
    }
    let m = &r.memory;
    let peaks = |by: Vec<(String, u64)>| -> String {
        by.iter()
            .map(|(who, kib)| format!("{who} {} MiB", kib / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "memory:      harness peak {} MiB; replicas {}",
        m.harness_peak_rss_kib / 1024,
        peaks(
            m.replica_peak_rss_kib
                .iter()
                .map(|(id, kib)| (id.to_string(), *kib))
                .collect()
        )
    );
    if let Some(d) = &r.data_dir {
        println!("data:        {}", d.display());
    }
    if let Some(h) = &r.history {
        println!("history:     {}", h.display());
    }
    println!();
    let rows: Vec<Vec<String>> = r
        .checkers
        .iter()
        .map(|c| match r.violations.iter().find(|v| &v.checker == c) {
            None => vec![c.clone(), "ok".into(), String::new()],
            Some(v) => vec![
                c.clone(),
                format!("{} violation(s)", v.count),
                v.message.clone(),
            ],
        })
        .collect();
    output::table(&["CHECKER", "RESULT", "FIRST COUNTER-EXAMPLE"], &rows);
    for v in &r.violations {
        println!(
            "\n{}: {}\n{}",
            v.checker,
            v.message,
            serde_json::to_string_pretty(&v.counterexample).unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("7 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn durations_round_trip_through_the_replay_line() {
        for d in [
            Duration::from_secs(90),
            Duration::from_millis(1500),
            Duration::from_secs(3600),
            Duration::from_secs(5400),
        ] {
            let text = format_duration(d);
            assert!(!text.contains(' '), "{text}");
            assert_eq!(parse_duration(&text), Ok(d), "{text}");
        }
    }

    #[test]
    fn seed_ranges_parse() {
        assert_eq!(parse_seeds("1..10000"), Ok(1..10000));
        assert_eq!(parse_seeds("5..=7"), Ok(5..8));
        assert_eq!(parse_seeds("42"), Ok(42..43));
        assert!(parse_seeds("9..3").is_err());
        assert!(parse_seeds("a..b").is_err());
    }
}
