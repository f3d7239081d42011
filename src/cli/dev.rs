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
    println!(
        "surge dev: {} scheduler replicas, data in {}",
        args.replicas,
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
    println!();
    println!("  export SURGE_SERVER={}", cluster.addr(1)?);
    println!("  surge status; surge submit --count 10 --cpu 0.5 --mem 512 -- sh -c 'echo hi'");
    println!();
    println!("Ctrl-C stops the cluster.");

    let shutdown = super::server::shutdown_signal();
    tokio::pin!(shutdown);
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
    cluster.stop_all(Duration::from_secs(5));
    Ok(())
}
