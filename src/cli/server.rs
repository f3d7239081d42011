//! `surge server`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use surge_raft::{RaftConfig, Start};
use surge_scheduler::server::{self, ServerConfig};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// This replica's id (1, 2, 3, ...), unique in the cluster.
    #[arg(long)]
    id: u64,
    /// gRPC listen address (Raft, cluster, job and node APIs).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Address other replicas and clients use to reach this one (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP listen address for /metrics, /healthz and the JSON job API (/v1/jobs); with
    /// --tls-dir it serves HTTPS and requires a client certificate from the cluster CA.
    #[arg(long)]
    metrics: Option<String>,
    /// Where RocksDB keeps the log and snapshots.
    #[arg(long)]
    data_dir: PathBuf,
    /// First start of a new cluster: every initial replica as ID=ADDR, comma separated.
    /// A no-op when the data dir already holds this cluster.
    #[arg(long, conflicts_with = "join")]
    bootstrap: Option<String>,
    /// Join the running cluster of the replica at ADDR (as learner, then voter).
    #[arg(long)]
    join: Option<String>,
    /// Build a snapshot (and compact the log) after this many entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Entries kept behind a snapshot for slow followers.
    #[arg(long, default_value_t = 1_000)]
    logs_to_keep: u64,
    /// A node silent this long is marked down and its sandboxes rescheduled.
    #[arg(long, default_value_t = surge_scheduler::leader::NODE_TTL_MS)]
    node_ttl_ms: u64,
    #[arg(long, default_value_t = surge_raft::node::HEARTBEAT_INTERVAL_MS)]
    heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = surge_raft::node::ELECTION_TIMEOUT_MIN_MS)]
    election_timeout_min_ms: u64,
    #[arg(long, default_value_t = surge_raft::node::ELECTION_TIMEOUT_MAX_MS)]
    election_timeout_max_ms: u64,
    /// Tokens file (hashes from `surge token new`): the job API then requires a tenant or admin
    /// token, and membership, drain and quotas the admin token. Needs --tls-dir.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
}

/// Parse `1=127.0.0.1:7070,2=127.0.0.1:7071`.
pub fn parse_bootstrap(spec: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut members = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--bootstrap: {part:?} is not ID=ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--bootstrap: {id:?} is not a replica id"))?;
        if id == 0 {
            bail!("--bootstrap: replica ids start at 1");
        }
        check_addr(addr.trim()).context("--bootstrap")?;
        if members.insert(id, addr.trim().to_string()).is_some() {
            bail!("--bootstrap: replica {id} is listed twice");
        }
    }
    if members.is_empty() {
        bail!("--bootstrap: no replicas listed");
    }
    Ok(members)
}

fn check_addr(addr: &str) -> anyhow::Result<()> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(())
        }
        _ => bail!("bad address {addr:?}: expected HOST:PORT"),
    }
}

pub async fn run(args: ServerArgs, tls: Option<surge_security::TlsDir>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.id == 0 {
        bail!("--id: replica ids start at 1");
    }
    check_addr(&args.listen).context("--listen")?;
    let start = match (&args.bootstrap, &args.join) {
        (Some(spec), _) => Start::Bootstrap(parse_bootstrap(spec)?),
        (None, Some(seed)) => {
            check_addr(seed).context("--join")?;
            Start::Join(seed.clone())
        }
        (None, None) => Start::Resume,
    };
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| args.listen.clone());
    check_addr(&advertise).context("--advertise")?;
    let mut raft = RaftConfig::new(args.id, advertise, args.data_dir.clone());
    raft.snapshot_every_entries = args.snapshot_every.max(1);
    raft.logs_to_keep = args.logs_to_keep;
    raft.heartbeat_interval_ms = args.heartbeat_interval_ms;
    raft.election_timeout_min_ms = args.election_timeout_min_ms;
    raft.election_timeout_max_ms = args.election_timeout_max_ms;
    let tokens = args
        .tokens
        .as_deref()
        .map(surge_security::Tokens::load)
        .transpose()?;
    let config = ServerConfig {
        raft,
        listen: args.listen,
        http_listen: args.metrics,
        start,
        node_ttl_ms: args.node_ttl_ms.max(1_000),
        tls,
        tokens,
    };
    server::run(config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM after the call. The handlers are installed
/// when this is called, not when the future is first polled, and a caller keeps one future for
/// its whole run: a signal between two listeners would be lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let next = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = next(interrupt) => {}
            _ = next(terminate) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lists() {
        let m = parse_bootstrap("1=127.0.0.1:7070, 2=127.0.0.1:7071").expect("parses");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "127.0.0.1:7071");
        for bad in [
            "",
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=a:1,1=b:2",
            "1=nohost",
            "1=h:0",
        ] {
            assert!(parse_bootstrap(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
