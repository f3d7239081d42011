//! `surge dev`: a whole local cluster in one command. Flags and printing; the cluster is
//! `surge_harness::dev`, the demo `surge_harness::demo`.

use std::path::PathBuf;

use anyhow::Context;
use surge_harness::demo::DemoReport;
use surge_harness::dev::{DevCluster, DevConfig};
use surge_harness::output::table;

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
    /// After the burst: long-lived container sandboxes driven like an agent's tool calls
    /// (0: no agent phase).
    #[arg(long, default_value_t = 32)]
    agent_sandboxes: u32,
    /// Exec calls into each of them.
    #[arg(long, default_value_t = 20)]
    agent_execs: u32,
    /// Mutual TLS on every link and tenant tokens, as production runs: the run's CA,
    /// certificates and tokens (admin, tenants alpha and beta) are made under the data dir.
    #[arg(long, conflicts_with = "demo")]
    secure: bool,
    /// Once every node has registered, write what a program needs to use the cluster here, as
    /// JSON: servers, HTTP addresses, and with --secure the TLS dir and tokens (the SDK's tests
    /// start `surge dev` this way).
    #[arg(long, value_name = "FILE")]
    info_file: Option<PathBuf>,
    /// The real nodes make their sandboxes checkpointable (`surge node --checkpoint`; needs the
    /// CRIU kit of scripts/setup-criu).
    #[arg(long)]
    checkpoint: bool,
}

pub async fn run(args: DevArgs, bin: PathBuf) -> anyhow::Result<()> {
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
    // One listener for the whole run: Ctrl-C right as the demo ends must still stop everything.
    let shutdown = super::server::shutdown_signal();
    tokio::pin!(shutdown);
    let cfg = DevConfig {
        root: root.clone(),
        replicas: args.replicas,
        port: args.port,
        sim_nodes: args.sim_nodes,
        real_nodes: args.real_nodes,
        secure: args.secure,
        checkpoint: args.checkpoint,
    };
    let mut dev = DevCluster::start(&cfg, &bin).await?;
    if let Some(why) = &dev.no_real_nodes {
        eprintln!("no real node daemons: {why}; only simulated nodes");
    }
    banner(&dev, &args, &root, &bin)?;
    if let Some(path) = &args.info_file {
        tokio::select! {
            r = write_info(&dev, path, args.sim_nodes) => r?,
            _ = &mut shutdown => {
                println!("stopping the cluster ...");
                dev.stop().await;
                return Ok(());
            }
        }
    }
    if args.demo {
        dev.wait_for_nodes((args.sim_nodes + dev.real_nodes) as usize)
            .await?;
        let real_sandboxes = if dev.real_nodes > 0 {
            args.real_sandboxes
        } else {
            0
        };
        println!();
        println!(
            "demo: a burst of {} simulated 1-CPU sandboxes and {real_sandboxes} real container sandboxes",
            args.sim_sandboxes
        );
        let leader_addr = dev.cluster.addr(dev.leader)?;
        let demo = surge_harness::demo::run(&leader_addr, args.sim_sandboxes, real_sandboxes);
        tokio::select! {
            () = async {
                match demo.await {
                    Ok(report) => print_demo(&report),
                    Err(e) => eprintln!("demo: {e:#}"),
                }
                if real_sandboxes > 0 && args.agent_sandboxes > 0 {
                    println!();
                    println!(
                        "agents: {} long-lived container sandboxes created in one call, each driven by {} exec calls and a file round trip",
                        args.agent_sandboxes, args.agent_execs
                    );
                    match surge_harness::demo::agents(&dev.servers(), args.agent_sandboxes, args.agent_execs).await {
                        Ok(a) => print_agents(&a),
                        Err(e) => eprintln!("demo agents: {e:#}"),
                    }
                }
            } => {}
            _ = &mut shutdown => {
                println!("stopping the cluster ...");
                dev.stop().await;
                return Ok(());
            }
        }
        println!("\nThe cluster keeps running; Ctrl-C stops it.");
    }

    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                for (id, log) in dev.newly_exited(&mut reported) {
                    eprintln!("replica {id} exited; its log:\n{log}");
                }
            }
        }
    }
    println!("stopping the cluster ...");
    dev.stop().await;
    Ok(())
}

/// Wait for every node, then write the cluster's [`surge_harness::dev::DevInfo`] to `path`
/// (whole or not at all: a reader polling for the file never sees half of it).
async fn write_info(dev: &DevCluster, path: &std::path::Path, sim: u32) -> anyhow::Result<()> {
    dev.wait_for_nodes((sim + dev.real_nodes) as usize).await?;
    let text = serde_json::to_string_pretty(&dev.info())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text + "\n").with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    println!("cluster info written to {}", path.display());
    Ok(())
}

/// How a newcomer runs `surge` from a shell: `surge` where the one on the PATH is this binary,
/// else this binary's full path.
fn invocation(bin: &std::path::Path) -> String {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("surge"))
            .find(|p| p.is_file())
    });
    let same = on_path
        .and_then(|p| p.canonicalize().ok())
        .zip(bin.canonicalize().ok())
        .is_some_and(|(a, b)| a == b);
    if same {
        "surge".to_string()
    } else {
        bin.display().to_string()
    }
}

fn banner(
    dev: &DevCluster,
    args: &DevArgs,
    root: &std::path::Path,
    bin: &std::path::Path,
) -> anyhow::Result<()> {
    println!(
        "surge dev: {} scheduler replicas, {} simulated nodes, {} real nodes; data in {}",
        args.replicas,
        args.sim_nodes,
        dev.real_nodes,
        root.display()
    );
    for id in dev.cluster.ids() {
        let r = dev.cluster.replica(id)?;
        let mark = if id == dev.leader { " (leader)" } else { "" };
        println!(
            "  replica {id}  grpc {}  metrics http://{}/metrics  log {}{mark}",
            r.grpc,
            r.http,
            r.log.display()
        );
    }
    match &dev.security {
        None => println!(
            "  security: none. No TLS and no tokens: anyone who reaches these ports can use the \
             cluster (a production cluster runs with --tls-dir and --tokens; see README, Security)"
        ),
        Some(s) => {
            println!(
                "  security: mutual TLS on every link and tokens; the run's CA and certificates are in {}",
                root.join("pki").display()
            );
            for (tenant, token) in &s.tenants {
                println!("  tenant {tenant}: SURGE_TOKEN={token}");
            }
        }
    }
    let surge = invocation(bin);
    println!();
    println!("  export SURGE_SERVER={}", dev.servers());
    if let Some(s) = &dev.security {
        println!("  export SURGE_TLS_DIR={}", s.client_dir.display());
        println!("  export SURGE_TOKEN={}   # admin", s.admin);
    }
    println!("  {surge} status");
    println!("  {surge} submit --count 10 --cpu 0.5 --mem 512 --constraint kind=sim -- rl-episode");
    if dev.real_nodes > 0 {
        println!(
            "  {surge} submit --count 2 --cpu 0.1 --mem 64 --constraint kind=real -- sh -c 'echo hi'"
        );
    }
    println!();
    println!("Ctrl-C stops the cluster.");
    Ok(())
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into())
}

fn print_demo(r: &DemoReport) {
    println!();
    let rows: Vec<Vec<String>> = r
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.label.to_string(),
                j.tracker.count.to_string(),
                secs(j.tracker.placed_s),
                secs(j.tracker.started_s),
                secs(j.tracker.done_s),
            ]
        })
        .collect();
    table(
        &["JOB", "SANDBOXES", "ALL PLACED", "ALL STARTED", "ALL DONE"],
        &rows,
    );
    println!();
    println!(
        "capacity released {} after submit; CPU utilisation at peak {:.0}%",
        secs(r.released_s),
        r.peak_utilisation * 100.0
    );
}

fn print_agents(a: &surge_harness::demo::AgentReport) {
    println!();
    table(
        &[
            "AGENTS",
            "EXECS EACH",
            "CREATE -> FIRST OUTPUT p50",
            "EXEC p50",
            "EXEC p99",
            "FILES OK",
            "WALL",
        ],
        &[vec![
            a.sandboxes.to_string(),
            a.execs_each.to_string(),
            format!("{:.0} ms", a.first_output.p50_ms),
            format!("{:.1} ms", a.exec.p50_ms),
            format!("{:.1} ms", a.exec.p99_ms),
            format!("{}/{}", a.files_ok, a.sandboxes),
            format!("{:.2} s", a.wall_s),
        ]],
    );
}
