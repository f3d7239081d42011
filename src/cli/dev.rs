//! `surge dev`: a whole local cluster in one command.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use surge_chaos::cluster::LocalCluster;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Keep the replicas' data here (default: a temporary dir removed on exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of scheduler replicas (odd: 1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// gRPC port of replica 1; replica i uses PORT+i-1, and PORT+10+i-1 for HTTP.
    #[arg(long, default_value_t = 7070)]
    port: u16,
    /// Simulated 128-CPU nodes (label kind=sim), hosted in `surge node --simulate` processes.
    #[arg(long, default_value_t = 800)]
    sim_nodes: u32,
    /// Real node daemons on the container runtime (label kind=real; needs root and crun).
    #[arg(long, default_value_t = 2)]
    real_nodes: u32,
    /// Submit an RL-style burst, show its progress, and print a summary (then keep running).
    #[arg(long)]
    demo: bool,
    /// Simulated 1-CPU sandboxes in the demo burst.
    #[arg(long, default_value_t = 100_000)]
    sim_sandboxes: u32,
    /// Real short container sandboxes in the demo burst.
    #[arg(long, default_value_t = 200)]
    real_sandboxes: u32,
}

pub async fn run(args: DevArgs, bin: PathBuf) -> anyhow::Result<()> {
    if !matches!(args.replicas, 1 | 3 | 5) {
        bail!("--replicas: use 1, 3 or 5 (an odd number keeps a majority)");
    }
    let temp;
    let root = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("surge-dev-")
                .tempdir()
                .context("cannot create a temporary data dir")?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // One listener for the whole run: Ctrl-C right as the demo ends must still stop everything.
    let shutdown = super::server::shutdown_signal();
    tokio::pin!(shutdown);
    let mut cluster = LocalCluster::new(&bin, &root, args.replicas, Some(args.port))?;
    cluster.start_all()?;
    let leader = match cluster.wait_leader(Duration::from_secs(30)).await {
        Ok(l) => l,
        Err(e) => {
            for id in cluster.ids() {
                eprintln!("--- replica {id} log ---\n{}", cluster.log_tail(id, 15));
            }
            bail!("the cluster did not elect a leader: {e}");
        }
    };
    let servers = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.addr(id).ok())
        .collect::<Vec<_>>()
        .join(",");
    let per_process = 500;
    for g in 0..args.sim_nodes.div_ceil(per_process) {
        let n = per_process.min(args.sim_nodes - g * per_process);
        cluster.start_sim_nodes(
            &format!("sim{g}"),
            n,
            &["--label", "kind=sim", "--sim-duration-ms", "5000"],
        )?;
    }
    let real_nodes = match surge_chaos::containers::usable() {
        Ok(()) => args.real_nodes,
        Err(why) if args.real_nodes > 0 => {
            eprintln!("no real node daemons: {why}; only simulated nodes");
            0
        }
        Err(_) => 0,
    };
    let mut real = super::demo::RealNodes::start(&bin, &root, &servers, real_nodes)?;
    println!(
        "surge dev: {} scheduler replicas, {} simulated nodes, {real_nodes} real nodes; data in {}",
        args.replicas,
        args.sim_nodes,
        root.display()
    );
    for id in cluster.ids() {
        let r = cluster.replica(id)?;
        let mark = if id == leader { " (leader)" } else { "" };
        println!(
            "  replica {id}  grpc {}  metrics http://{}/metrics  log {}{mark}",
            r.grpc,
            r.http,
            r.log.display()
        );
    }
    println!(
        "  security: none. No TLS and no tokens: anyone who reaches these ports can use the \
         cluster (a production cluster runs with --tls-dir and --tokens; see README, Security)"
    );
    println!();
    println!("  export SURGE_SERVER={}", cluster.addr(1)?);
    println!("  surge status; surge submit --count 10 --cpu 0.5 --mem 512 -- sh -c 'echo hi'");
    println!();
    println!("Ctrl-C stops the cluster.");
    if args.demo {
        wait_for_nodes(
            &cluster.addr(leader)?,
            (args.sim_nodes + real_nodes) as usize,
        )
        .await?;
        let real_sandboxes = if real_nodes > 0 {
            args.real_sandboxes
        } else {
            0
        };
        println!();
        println!(
            "demo: a burst of {} simulated 1-CPU sandboxes and {real_sandboxes} real container sandboxes",
            args.sim_sandboxes
        );
        let leader_addr = cluster.addr(leader)?;
        let demo = super::demo::run(&leader_addr, args.sim_sandboxes, real_sandboxes);
        tokio::select! {
            r = demo => if let Err(e) = r { eprintln!("demo: {e:#}") },
            _ = &mut shutdown => {
                println!("stopping the cluster ...");
                real.stop().await;
                cluster.stop_all(Duration::from_secs(5));
                return Ok(());
            }
        }
        println!("\nThe cluster keeps running; Ctrl-C stops it.");
    }

    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                for id in cluster.ids() {
                    let running = cluster.replica_running(id);
                    if !running && reported.insert(id) {
                        eprintln!("replica {id} exited; its log:\n{}", cluster.log_tail(id, 10));
                    }
                }
            }
        }
    }
    println!("stopping the cluster ...");
    real.stop().await;
    cluster.stop_all(Duration::from_secs(5));
    Ok(())
}

/// Wait until `n` nodes are ready (registration of hundreds of nodes takes a few seconds).
async fn wait_for_nodes(addr: &str, n: usize) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let ready = match surge_chaos::client::nodes(addr)?
            .list_nodes(surge_proto::node::ListNodesRequest {})
            .await
        {
            Ok(r) => r
                .into_inner()
                .nodes
                .iter()
                .filter(|x| x.state == "ready")
                .count(),
            Err(_) => 0,
        };
        if ready >= n {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {ready} of {n} nodes registered within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
