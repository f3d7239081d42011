//! `surge node`: the node daemon (agent). The work is in `surge_node::agent`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use surge_node::agent::config::{self, cpus_to_millis, parse_labels, START_CONCURRENCY_DEFAULT};
use surge_node::agent::connection::parse_servers;
use surge_node::agent::{run_daemon, DaemonConfig, RuntimeFlag};
use surge_security::Role;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// Scheduler replicas to connect to, comma separated; the node moves to the next one when
    /// one is unreachable or not the leader.
    #[arg(long, env = "SURGE_SERVER", value_name = "ADDR[,ADDR...]")]
    server: String,
    /// This node's id (default: the host name). With --simulate, the prefix of the nodes' ids.
    #[arg(long)]
    node_id: Option<String>,
    /// Where sandboxes, templates and the runtime's state live.
    #[arg(long, default_value = "/var/lib/surge/node")]
    data_dir: PathBuf,
    /// auto (krun when the host has hardware virtualization and a guest kernel, else
    /// container), container, krun, or sim (simulated sandboxes, no processes).
    #[arg(long, default_value_t = RuntimeFlag::Auto)]
    runtime: RuntimeFlag,
    /// CPUs to offer to sandboxes (default: all of the host's; 128 for simulated nodes).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to offer to sandboxes, in MiB (default: all of the host's; 512 GiB for simulated
    /// nodes).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// A label the scheduler can match jobs against, KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Node pool this node belongs to.
    #[arg(long, default_value = "")]
    pool: String,
    /// Most sandboxes this node runs at once (0: no cap).
    #[arg(long, default_value_t = 0)]
    max_sandboxes: u32,
    /// HTTP address for Prometheus /metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Sandboxes starting at once (per node).
    #[arg(long, default_value_t = START_CONCURRENCY_DEFAULT)]
    start_concurrency: usize,
    /// Host N simulated nodes in this process (ids NODE-ID-0 .. NODE-ID-(N-1)), each with its own
    /// simulated runtime.
    #[arg(long, value_name = "N")]
    simulate: Option<u32>,
    /// Container runtime: make sandboxes checkpointable (`surge pause --checkpoint`, `surge
    /// resume`) with the CRIU kit of scripts/setup-criu (at $SURGE_CRIU_PREFIX, default
    /// /opt/surge-crun-criu). Every sandbox of the node then runs under the kit's crun with
    /// piped stdio. Off: the node reports that it cannot checkpoint and why.
    #[arg(long)]
    checkpoint: bool,
    /// Container runtime: keep N sandboxes of TEMPLATE created ahead (overlay, cgroup, the
    /// container running and waiting for a job), so a placement only hands over the job's
    /// command. Repeatable, one per template; each pool sandbox reserves CPU_MILLIS and
    /// MEMORY_MIB (default 1000 and 256), which the node does not offer the scheduler.
    #[arg(long = "warm-pool", value_name = "TEMPLATE=N[:CPU_MILLIS:MEMORY_MIB]")]
    warm_pool: Vec<String>,
    /// How long a simulated sandbox runs (one whose job has no command runs until stopped).
    #[arg(long, default_value_t = 60_000)]
    sim_duration_ms: u64,
    /// Exit code of a simulated sandbox.
    #[arg(long, default_value_t = 0)]
    sim_exit_code: i32,
    /// How long a simulated exec takes.
    #[arg(long, default_value_t = 1)]
    sim_exec_ms: u64,
    /// Bytes of output a simulated exec prints.
    #[arg(long, default_value_t = 0)]
    sim_exec_output_bytes: usize,
    /// Where this node serves exec and files to the replicas (gRPC; mutual TLS with
    /// --tls-dir). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The address replicas dial for exec and files (default: the --listen address; required
    /// when listening on 0.0.0.0 or [::]).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
}

pub async fn run(args: NodeArgs, tls: Option<surge_security::TlsDir>) -> anyhow::Result<()> {
    // The daemon explains itself in its log (runtime choice, adoption, reconnects).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    if let Some(t) = &tls {
        if !matches!(t.role(), Role::Node | Role::Replica) {
            anyhow::bail!(
                "--tls-dir {}: cert.pem is a {} certificate; a node daemon needs one issued with `surge cert issue --role node`",
                t.dir().display(),
                t.role()
            );
        }
    }
    let cfg = DaemonConfig {
        servers: parse_servers(&args.server)?,
        node_id: args.node_id.unwrap_or_else(config::hostname),
        data_dir: args.data_dir,
        runtime: args.runtime,
        cpu_millis: args.cpus.map(cpus_to_millis).transpose()?,
        memory_mib: args.memory_mib,
        labels: parse_labels(&args.labels)?,
        pool: args.pool,
        max_sandboxes: args.max_sandboxes,
        metrics: args.metrics,
        start_concurrency: args.start_concurrency,
        simulate: args.simulate,
        sim_duration_ms: args.sim_duration_ms,
        sim_exit_code: args.sim_exit_code,
        sim_exec_ms: args.sim_exec_ms,
        sim_exec_output_bytes: args.sim_exec_output_bytes,
        listen: args.listen,
        advertise: args.advertise,
        tls: tls.as_ref().map(surge_security::TlsDir::client_config),
        server_tls: tls.as_ref().map(surge_security::TlsDir::server_config),
        checkpoint: args.checkpoint,
        warm_pool: args
            .warm_pool
            .iter()
            .map(|w| surge_node::runtime::container::pool::parse_warm_pool(w))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut daemon = tokio::spawn(run_daemon(cfg, stop_rx));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = &mut daemon => return Ok(r.context("the node daemon panicked")??),
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = sigterm.recv() => {}
    }
    tracing::info!("stopping; sandboxes keep running and are re-adopted on the next start");
    let _ = stop_tx.send(true);
    daemon.await.context("the node daemon panicked")??;
    Ok(())
}
