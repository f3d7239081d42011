//! `surge`: one binary for the scheduler replicas, the node daemon, the client and the tools.
//! This file only parses the command line and dispatches; the work is in `cli/` and the crates.

mod cli;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cli::output::Output;

#[derive(Parser)]
#[command(
    name = "surge",
    version,
    about = "A scheduler for AI-agent sandboxes on bare metal"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    security: cli::security::SecurityArgs,
}

/// Where a client command sends its request.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Any replica's gRPC address (writes are forwarded to the leader).
    #[arg(
        long,
        global = true,
        env = "SURGE_SERVER",
        default_value = "127.0.0.1:7070"
    )]
    server: String,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scheduler replica.
    Server(cli::server::ServerArgs),
    /// Run the node daemon: register this host and run the sandboxes assigned to it.
    Node(cli::node::NodeArgs),
    /// Run a whole local cluster (3 replicas) in the foreground.
    Dev(cli::dev::DevArgs),
    /// Show the cluster as the replica at --server sees it.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// List, add or remove scheduler replicas.
    Members {
        #[command(subcommand)]
        action: cli::client::MembersCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Submit a job: COUNT identical sandboxes.
    Submit {
        #[command(flatten)]
        args: cli::client::SubmitArgs,
        #[command(flatten)]
        target: Target,
    },
    /// List jobs.
    Jobs {
        #[arg(long)]
        tenant: Option<String>,
        /// pending, running, complete, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Show one job; --watch follows its progress.
    Job {
        id: u64,
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel a job.
    Cancel {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// List registered nodes.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Pause sandboxes (JOB or JOB.INDEX): they keep memory and disk ("close the lid").
    Pause {
        sandbox: String,
        #[command(flatten)]
        target: Target,
    },
    /// Resume paused sandboxes (JOB or JOB.INDEX).
    Resume {
        sandbox: String,
        #[command(flatten)]
        target: Target,
    },
    /// Change the CPU and memory of running sandboxes (JOB or JOB.INDEX).
    Resize {
        sandbox: String,
        /// New CPUs per sandbox: cores (2, 0.5) or millicores (500m).
        #[arg(long)]
        cpu: Option<String>,
        /// New memory per sandbox in MiB.
        #[arg(long = "mem")]
        memory_mib: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Stop sandboxes (JOB or JOB.INDEX): SIGTERM, a grace period, then SIGKILL; they end
    /// `stopped`, not `failed`, and are not restarted.
    Stop {
        sandbox: String,
        #[command(flatten)]
        target: Target,
    },
    /// Show one sandbox (JOB.INDEX): state, node, resources, exit code, times, output tail.
    Sandbox {
        sandbox: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print the tail of a sandbox's stdout/stderr (JOB.INDEX), as its node reported it.
    Logs {
        sandbox: String,
        #[command(flatten)]
        target: Target,
    },
    /// Manage the root filesystems sandboxes boot from, on this node.
    Template {
        #[command(subcommand)]
        action: cli::template::TemplateCmd,
    },
    /// Stop new placements on a node and move its work elsewhere.
    Drain {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set a tenant's quota (no --cpu and no --mem: remove it).
    Quota {
        tenant: String,
        /// CPUs the tenant's sandboxes may hold at once.
        #[arg(long)]
        cpu: Option<String>,
        /// Memory in MiB the tenant's sandboxes may hold at once.
        #[arg(long = "mem")]
        memory_mib: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// (internal) The process one microVM lives in; started by the node daemon's krun runtime.
    #[command(hide = true)]
    VmExec(cli::vm::VmArgs),
    /// Benchmarks of the real system.
    Bench {
        #[command(subcommand)]
        which: cli::bench::BenchCmd,
    },
    /// Chaos run: a real cluster, a workload, faults on a seeded schedule, and checkers.
    Chaos(cli::chaos::ChaosArgs),
    /// Make the cluster CA and per-host certificates for --tls-dir.
    Cert {
        #[command(subcommand)]
        action: cli::security::CertCmd,
    },
    /// Make tenant and admin tokens for the servers' --tokens file.
    Token {
        #[command(subcommand)]
        action: cli::security::TokenCmd,
    },
}

fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    // SAFETY: called before any thread exists; SIG_DFL for SIGPIPE only changes what a write
    // to a closed pipe does.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // A daemon must never die of a peer that went away: a TLS connection closed by its peer
    // makes the next (vectored, so not MSG_NOSIGNAL) write raise SIGPIPE. Servers, node
    // daemons and the commands that run clusters ignore it and see EPIPE as an error instead.
    if matches!(
        cli.command,
        Cmd::Server(_) | Cmd::Node(_) | Cmd::Dev(_) | Cmd::Bench { .. } | Cmd::Chaos(_)
    ) {
        // SAFETY: still before any thread exists; SIG_IGN only changes what a write to a
        // closed socket or pipe does (it returns EPIPE).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    }
    // libkrun takes over the process it starts a VM in: run it before any runtime thread exists.
    if let Cmd::VmExec(args) = cli.command {
        if let Err(e) = cli::vm::run(args) {
            eprintln!("error: {e:#}");
            std::process::exit(125);
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        // Commands that start their own (open) clusters, serve, or make no calls.
        Cmd::Server(_)
        | Cmd::Node(_)
        | Cmd::Dev(_)
        | Cmd::Bench { .. }
        | Cmd::Chaos(_)
        | Cmd::VmExec(_)
        | Cmd::Cert { .. }
        | Cmd::Token { .. } => {}
        // Every client command talks to --server with --tls-dir and --token.
        _ => {
            let creds = cli.security.credentials()?;
            surge_chaos::client::set_default_credentials(creds)?;
        }
    }
    match cli.command {
        Cmd::Server(args) => cli::server::run(args, cli.security.tls()?).await,
        Cmd::Node(args) => cli::node::run(args, cli.security.tls()?).await,
        Cmd::Cert { action } => cli::security::cert(action),
        Cmd::Token { action } => cli::security::token(action),
        Cmd::Dev(args) => cli::dev::run(args, surge_binary()?).await,
        Cmd::Status { target } => cli::client::status(&target.server, target.output).await,
        Cmd::Members { action, target } => {
            cli::client::members(&target.server, target.output, action).await
        }
        Cmd::Submit { args, target } => {
            cli::client::submit(&target.server, target.output, args).await
        }
        Cmd::Jobs {
            tenant,
            state,
            limit,
            target,
        } => cli::client::jobs(&target.server, target.output, tenant, state, limit).await,
        Cmd::Job { id, watch, target } => {
            cli::client::job(&target.server, target.output, id, watch).await
        }
        Cmd::Cancel { id, target } => cli::client::cancel(&target.server, target.output, id).await,
        Cmd::Nodes { target } => cli::client::nodes(&target.server, target.output).await,
        Cmd::Pause { sandbox, target } => {
            cli::client::update_sandboxes(
                &target.server,
                target.output,
                &sandbox,
                "pause",
                None,
                None,
            )
            .await
        }
        Cmd::Resume { sandbox, target } => {
            cli::client::update_sandboxes(
                &target.server,
                target.output,
                &sandbox,
                "resume",
                None,
                None,
            )
            .await
        }
        Cmd::Resize {
            sandbox,
            cpu,
            memory_mib,
            target,
        } => {
            cli::client::update_sandboxes(
                &target.server,
                target.output,
                &sandbox,
                "",
                cpu,
                memory_mib,
            )
            .await
        }
        Cmd::Stop { sandbox, target } => {
            cli::client::update_sandboxes(
                &target.server,
                target.output,
                &sandbox,
                "stop",
                None,
                None,
            )
            .await
        }
        Cmd::Sandbox { sandbox, target } => {
            cli::client::sandbox(&target.server, target.output, &sandbox).await
        }
        Cmd::Logs { sandbox, target } => {
            cli::client::logs(&target.server, target.output, &sandbox).await
        }
        Cmd::Template { action } => cli::template::run(action).await,
        Cmd::Drain { node, target } => {
            cli::client::drain(&target.server, target.output, node).await
        }
        Cmd::Quota {
            tenant,
            cpu,
            memory_mib,
            target,
        } => cli::client::quota(&target.server, tenant, cpu, memory_mib).await,
        // Handled in main() before the runtime starts; kept for completeness.
        Cmd::VmExec(args) => cli::vm::run(args),
        Cmd::Bench { which } => cli::bench::run(which, surge_binary()?).await,
        Cmd::Chaos(args) => cli::chaos::run(args, surge_binary()?).await,
    }
}

/// Milliseconds since the Unix epoch (for unique keys in benchmarks).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// This executable, to start replicas as child processes.
fn surge_binary() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?)
}
