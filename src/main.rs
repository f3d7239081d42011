//! `surge`: one binary for the scheduler replicas, the node daemon, the client and the tools.
//! This file only parses the command line and dispatches; `cli/` parses flags and prints, and
//! the work is in the crates: `surge-client` (every call to a cluster), `surge-harness` (local
//! clusters, `surge dev`, the benches), `surge-scheduler`, `surge-node`. `surge chaos` runs the
//! separate `surge-chaos` binary, so this one links neither the fault injector nor tokio's
//! test clock.

mod cli;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use surge_client::Client;
use surge_harness::output::Output;

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
    /// Any replica's gRPC address, or several separated by commas: writes are forwarded to the
    /// leader, and a call that is safe to repeat is retried at the next replica.
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
        action: cli::cluster::MembersCmd,
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
        /// Only jobs with this KEY=VALUE label (repeatable: all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
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
    /// Cancel a job, or with --label every job of your tenant carrying the labels.
    Cancel {
        #[arg(required_unless_present = "labels", conflicts_with = "labels")]
        id: Option<u64>,
        /// KEY=VALUE (repeatable: all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Wait until a job's sandboxes (JOB) or one sandbox (JOB.INDEX) run; exits 0 when they do,
    /// 1 when the job ended first, 2 on timeout.
    Wait {
        sandbox: String,
        #[arg(long, default_value = "60s")]
        timeout: String,
        /// Wait until they ended instead.
        #[arg(long)]
        ended: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Renew a job's owner lease; with --ttl, let its sandboxes (JOB or JOB.INDEX) live that
    /// long from now.
    Keepalive {
        sandbox: String,
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List registered nodes.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Pause sandboxes (JOB or JOB.INDEX): they keep memory and disk ("close the lid"). With
    /// --checkpoint: save them to their nodes' disks (CRIU) and release their CPU and memory;
    /// `surge resume` restores them on the same node.
    Pause {
        sandbox: String,
        /// Checkpoint to disk instead of freezing in memory (container nodes with CRIU;
        /// `surge nodes` shows which).
        #[arg(long)]
        checkpoint: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Capture a running container sandbox's filesystem (JOB.INDEX) as a new template on its
    /// node: the sandbox is frozen for the copy, then thawed. `surge template copy` spreads it.
    Snapshot {
        sandbox: String,
        /// The new template's name (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        template: String,
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
    /// Fork a running sandbox (JOB.INDEX): COUNT new sandboxes (a new job, labelled
    /// surge-fork-of=JOB.INDEX) restored side by side from one checkpoint of it, on its node;
    /// it keeps running. Each fork has its own copy of the filesystem and its own identity.
    /// Needs a node started with --checkpoint; as many as fit run, the rest wait there.
    Fork {
        sandbox: String,
        /// Forks to make, 1 to 64.
        #[arg(long, default_value_t = 1)]
        count: u32,
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
    /// Run a command in a running sandbox (JOB.INDEX), streaming its output; exits with the
    /// command's status (124 after --timeout, 128+N for signal N, 125 when surge failed).
    Exec {
        #[command(flatten)]
        args: cli::io::ExecArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Copy a file or a directory into or out of a running sandbox:
    /// `surge cp ./repo 12.0:/work/repo`, `surge cp 12.0:/work/out ./out`.
    Cp {
        #[command(flatten)]
        args: cli::io::CpArgs,
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
    /// Chaos run: a real cluster, a workload, faults on a seeded schedule, and checkers
    /// (`surge chaos --help`); `surge chaos sim` is the deterministic simulator.
    #[command(disable_help_flag = true)]
    Chaos {
        /// Passed to `surge-chaos`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
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
        Cmd::Server(_) | Cmd::Node(_) | Cmd::Dev(_) | Cmd::Bench { .. }
    ) {
        // SAFETY: still before any thread exists; SIG_IGN only changes what a write to a
        // closed socket or pipe does (it returns EPIPE).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    }
    if let Cmd::Chaos { args } = &cli.command {
        let e = run_chaos(args);
        eprintln!("error: {e:#}");
        std::process::exit(125);
    }
    // libkrun takes over the process it starts a VM in: run it before any runtime thread exists.
    if let Cmd::VmExec(args) = cli.command {
        if let Err(e) = cli::vm::run(args) {
            eprintln!("error: {e:#}");
            std::process::exit(125);
        }
        return;
    }
    let runtime = surge_client::process::runtime_or_exit();
    let result = runtime.block_on(run(cli));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { command, security } = cli;
    // Every client command talks to --server with --tls-dir and --token.
    let client = |t: &Target| -> anyhow::Result<Client> {
        Ok(Client::new(&t.server, security.credentials()?)?)
    };
    match command {
        Cmd::Server(args) => cli::server::run(args, security.tls()?).await,
        Cmd::Node(args) => cli::node::run(args, security.tls()?).await,
        Cmd::Cert { action } => cli::security::cert(action),
        Cmd::Token { action } => cli::security::token(action),
        Cmd::Dev(args) => cli::dev::run(args, surge_binary()?).await,
        Cmd::Status { target } => cli::cluster::status(&client(&target)?, target.output).await,
        Cmd::Members { action, target } => {
            cli::cluster::members(&client(&target)?, target.output, action).await
        }
        Cmd::Submit { args, target } => {
            cli::client::submit(&client(&target)?, target.output, args).await
        }
        Cmd::Jobs {
            tenant,
            state,
            limit,
            labels,
            target,
        } => {
            let c = client(&target)?;
            cli::client::jobs(&c, target.output, tenant, state, limit, &labels).await
        }
        Cmd::Job { id, watch, target } => {
            cli::client::job(&client(&target)?, target.output, id, watch).await
        }
        Cmd::Cancel {
            id: Some(id),
            target,
            ..
        } => cli::client::cancel(&client(&target)?, target.output, id).await,
        Cmd::Cancel {
            id: None,
            labels,
            target,
        } => cli::life::cancel_by_label(&client(&target)?, target.output, &labels).await,
        Cmd::Wait {
            sandbox,
            timeout,
            ended,
            target,
        } => cli::life::wait(&client(&target)?, target.output, &sandbox, &timeout, ended).await,
        Cmd::Keepalive {
            sandbox,
            ttl,
            target,
        } => cli::life::keepalive(&client(&target)?, target.output, &sandbox, ttl).await,
        Cmd::Nodes { target } => cli::client::nodes(&client(&target)?, target.output).await,
        Cmd::Pause {
            sandbox,
            checkpoint,
            target,
        } => {
            let c = client(&target)?;
            let action = if checkpoint { "checkpoint" } else { "pause" };
            cli::client::update_sandboxes(&c, target.output, &sandbox, action, None, None).await
        }
        Cmd::Resume { sandbox, target } => {
            let c = client(&target)?;
            cli::client::update_sandboxes(&c, target.output, &sandbox, "resume", None, None).await
        }
        Cmd::Resize {
            sandbox,
            cpu,
            memory_mib,
            target,
        } => {
            let c = client(&target)?;
            cli::client::update_sandboxes(&c, target.output, &sandbox, "", cpu, memory_mib).await
        }
        Cmd::Fork {
            sandbox,
            count,
            target,
        } => cli::client::fork(&client(&target)?, target.output, &sandbox, count).await,
        Cmd::Stop { sandbox, target } => {
            let c = client(&target)?;
            cli::client::update_sandboxes(&c, target.output, &sandbox, "stop", None, None).await
        }
        Cmd::Sandbox { sandbox, target } => {
            cli::client::sandbox(&client(&target)?, target.output, &sandbox).await
        }
        Cmd::Logs { sandbox, target } => {
            cli::client::logs(&client(&target)?, target.output, &sandbox).await
        }
        Cmd::Exec { args, target } => {
            let code = match client(&target) {
                Ok(c) => cli::io::exec(&c, target.output, args).await,
                Err(e) => Err(e),
            };
            let code = code.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                cli::io::EXIT_SURGE_ERROR
            });
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
        Cmd::Cp { args, target } => cli::io::cp(&client(&target)?, target.output, args).await,
        Cmd::Template {
            action: cli::template::TemplateCmd::Copy(args),
        } => {
            let c = client(&args.target)?;
            let output = args.target.output;
            cli::template::copy(&c, output, args).await
        }
        Cmd::Template { action } => cli::template::run(action).await,
        Cmd::Snapshot {
            sandbox,
            template,
            target,
        } => cli::template::snapshot(&client(&target)?, target.output, &sandbox, &template).await,
        Cmd::Drain { node, target } => {
            cli::client::drain(&client(&target)?, target.output, node).await
        }
        Cmd::Quota {
            tenant,
            cpu,
            memory_mib,
            target,
        } => cli::client::quota(&client(&target)?, tenant, cpu, memory_mib).await,
        // Handled in main() before the runtime starts.
        Cmd::VmExec(_) | Cmd::Chaos { .. } => Ok(()),
        Cmd::Bench { which } => cli::bench::run(which, surge_binary()?).await,
    }
}

/// The binary the benches start replicas and node daemons from: `SURGE_BIN` when set (to
/// measure another build with this one's harness, side by side), else this executable.
fn surge_binary() -> anyhow::Result<PathBuf> {
    match std::env::var_os("SURGE_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(std::env::current_exe()?),
    }
}

/// `surge chaos ARGS`: replace this process with `surge-chaos ARGS`, found beside this binary
/// (or on the PATH). Returns only when that fails.
fn run_chaos(args: &[std::ffi::OsString]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("surge-chaos")))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from("surge-chaos"));
    let err = std::process::Command::new(&program).args(args).exec();
    anyhow::anyhow!(
        "cannot run {}: {err} (it is built with the workspace: cargo build --workspace)",
        program.display()
    )
}
