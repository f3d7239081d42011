//! `surge-guest`: the agent of a surge microVM. See the crate docs (`lib.rs`).
//!
//! ```text
//! surge-guest [--init] [--root DIR] [--uid N --gid N]
//!             (--vsock-port PORT | --listen-unix PATH) [-- COMMAND ARGS...]
//! ```
//!
//! `--init`: the guest's first process (mounts `/proc`, `/sys`, `/dev`, `/tmp`). With a
//! command, the agent exits with its exit code when it ends; without one it stays up until the
//! VM is stopped. `--listen-unix` serves on a unix socket instead of vsock (tests).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use surge_guest::agent::{pid1, Agent, AgentConfig, ReapMode};

enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

struct Args {
    init: bool,
    root: PathBuf,
    user: Option<(u32, u32)>,
    listen: Listen,
    command: Vec<String>,
}

const USAGE: &str = "usage: surge-guest [--init] [--root DIR] [--uid N --gid N] (--vsock-port PORT | --listen-unix PATH) [-- COMMAND ARGS...]";

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut init, mut root, mut uid, mut gid, mut listen) =
        (false, PathBuf::from("/"), None, None, None);
    let mut command = Vec::new();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--init" => init = true,
            "--root" => root = PathBuf::from(value("--root")?),
            "--uid" => {
                uid = Some(
                    value("--uid")?
                        .parse::<u32>()
                        .map_err(|e| format!("--uid: {e}"))?,
                )
            }
            "--gid" => {
                gid = Some(
                    value("--gid")?
                        .parse::<u32>()
                        .map_err(|e| format!("--gid: {e}"))?,
                )
            }
            "--vsock-port" => {
                listen = Some(Listen::Vsock(
                    value("--vsock-port")?
                        .parse()
                        .map_err(|e| format!("--vsock-port: {e}"))?,
                ))
            }
            "--listen-unix" => listen = Some(Listen::Unix(PathBuf::from(value("--listen-unix")?))),
            "--" => {
                command = it.by_ref().collect();
                break;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let user = match (uid, gid) {
        (Some(u), Some(g)) => Some((u, g)),
        (None, None) => None,
        _ => return Err("--uid and --gid go together".into()),
    };
    let listen = listen.ok_or("--vsock-port or --listen-unix is needed")?;
    Ok(Args {
        init,
        root,
        user,
        listen,
        command,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("surge-guest: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.init {
        for problem in pid1::mount_basics() {
            eprintln!("surge-guest: {problem}");
        }
    }
    if let Err(e) = pid1::become_subreaper() {
        eprintln!("surge-guest: cannot become a subreaper: {e}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("surge-guest: tokio runtime: {e}");
            return ExitCode::from(125);
        }
    };
    let code = rt.block_on(run(args));
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(125))
}

async fn run(args: Args) -> i32 {
    let agent = match Agent::new(AgentConfig {
        root: args.root.clone(),
        user: args.user,
        reap: ReapMode::All,
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("surge-guest: root {}: {e}", args.root.display());
            return 125;
        }
    };
    if let Err(e) = listen(&agent, &args.listen) {
        eprintln!("surge-guest: cannot listen: {e}");
        return 125;
    }
    if args.command.is_empty() {
        return std::future::pending().await;
    }
    match agent.run_command(&args.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("surge-guest: cannot run {:?}: {e}", args.command[0]);
            127
        }
    }
}

fn listen(agent: &Arc<Agent>, how: &Listen) -> std::io::Result<()> {
    match how {
        Listen::Vsock(port) => {
            let listener = pid1::vsock_listen(*port)?;
            let handle = tokio::runtime::Handle::current();
            let agent = agent.clone();
            std::thread::Builder::new()
                .name("vsock-accept".into())
                .spawn(move || loop {
                    match pid1::accept(&listener) {
                        Ok(fd) => {
                            let _guard = handle.enter();
                            match tokio::net::UnixStream::from_std(
                                std::os::unix::net::UnixStream::from(fd),
                            ) {
                                Ok(s) => {
                                    handle.spawn(agent.clone().serve(s));
                                }
                                Err(e) => eprintln!("surge-guest: connection: {e}"),
                            }
                        }
                        Err(e) => {
                            eprintln!("surge-guest: accept: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                })?;
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            let agent = agent.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(agent.clone().serve(s));
                }
            });
        }
    }
    Ok(())
}
