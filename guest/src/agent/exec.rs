//! One exec: a process group of its own, as the sandbox's user with no capabilities and
//! `no_new_privs`; stdout and stderr streamed as they come; stdin, signals, timeout and cancel.
//!
//! Output ordering: each stream's chunks go out in the order they were read, and `Exited` goes
//! out only after both streams ended (or [`DRAIN_GRACE_MS`] after the command exited, when a
//! process it left in the background keeps a pipe open).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::reap::decode_status;
use super::Agent;
use crate::mux::Outbox;
use crate::proto::{
    ErrorKind, ExecRequest, ExitStatus, Frame, Header, Stream, CHUNK_BYTES, EXECS_MAX,
    WINDOW_CHUNKS,
};

/// How long after the command's exit its output may still drain.
pub const DRAIN_GRACE_MS: u64 = 1_000;
/// The highest signal number Linux has.
const SIGNAL_MAX: i32 = 64;

pub async fn run(
    agent: &Arc<Agent>,
    spec: ExecRequest,
    inbound: mpsc::Receiver<Frame>,
    out: Outbox,
) {
    if let Err(m) = spec.validate() {
        return out.error(ErrorKind::Invalid, m).await;
    }
    let Ok(_running) = agent.execs.clone().try_acquire_owned() else {
        return out
            .error(
                ErrorKind::Busy,
                format!("{EXECS_MAX} execs are already running in this sandbox"),
            )
            .await;
    };
    match start(agent, &spec) {
        Ok(child) => supervise(child, &spec, inbound, out).await,
        Err((kind, message)) => out.error(kind, message).await,
    }
}

struct Started {
    pgid: libc::pid_t,
    exit: tokio::sync::oneshot::Receiver<i32>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    at: Instant,
}

fn start(agent: &Agent, spec: &ExecRequest) -> Result<Started, (ErrorKind, String)> {
    let argv0 = &spec.argv[0];
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    let mut cmd = Command::new(argv0);
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(agent.config.root.join(cwd.trim_start_matches('/')))
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    drop_privileges(&mut cmd, agent.config.user);
    let at = Instant::now();
    let (mut child, exit) = agent.reaper.spawn(&mut cmd).map_err(|e| {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::WrongKind,
            _ => ErrorKind::Io,
        };
        (kind, format!("cannot run {argv0:?} in {cwd}: {e}"))
    })?;
    let pgid = libc::pid_t::try_from(child.id())
        .map_err(|_| (ErrorKind::Io, "pid over pid_t".to_string()))?;
    Ok(Started {
        pgid,
        exit,
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        at,
    })
}

/// In the child before exec: its own process group; then, when the agent is root, the
/// sandbox's user with no supplementary groups, an empty capability bounding set and no ambient
/// capabilities (a non-root uid then has no capabilities at all); `no_new_privs` always.
fn drop_privileges(cmd: &mut Command, user: Option<(u32, u32)>) {
    // SAFETY: the closure runs in the forked child, where only async-signal-safe calls are
    // allowed: it makes raw syscalls only (setpgid, geteuid, getuid, setgroups, setgid, prctl,
    // setuid), allocates nothing, and reads only `user`, copied in before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setpgid(0, 0) != 0 {
                return fail();
            }
            if let Some((uid, gid)) = user {
                if libc::geteuid() == 0 {
                    if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 {
                        return fail();
                    }
                    for cap in 0..64 {
                        // EINVAL past the last capability this kernel knows: nothing to drop.
                        libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                    }
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL,
                        0,
                        0,
                        0,
                    );
                    if libc::setuid(uid) != 0 {
                        return fail();
                    }
                } else if libc::getuid() != uid {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return fail();
            }
            Ok(())
        });
    }
}

fn kill_group(pgid: libc::pid_t, sig: i32) {
    // SAFETY: kill takes two integers and touches no memory of ours; a negative pid names the
    // exec's own process group.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Stream one pipe's chunks until its end.
async fn forward(fd: Option<OwnedFd>, stream: Stream, out: Outbox) {
    let Some(fd) = fd else { return };
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out
                    .data(stream, Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Write stdin chunks as they come; a credit back for each. Closing the channel closes stdin.
async fn feed(fd: Option<OwnedFd>, mut chunks: mpsc::Receiver<Bytes>, out: Outbox) {
    let mut pipe = fd.and_then(|fd| pipe::Sender::from_owned_fd(fd).ok());
    while let Some(chunk) = chunks.recv().await {
        if let Some(p) = pipe.as_mut() {
            if p.write_all(&chunk).await.is_err() {
                // The command closed its stdin: the rest is dropped.
                pipe = None;
            }
        }
        if out.credit().await.is_err() {
            return;
        }
    }
}

async fn supervise(
    started: Started,
    spec: &ExecRequest,
    mut inbound: mpsc::Receiver<Frame>,
    out: Outbox,
) {
    let Started {
        pgid,
        mut exit,
        stdin,
        stdout,
        stderr,
        at,
    } = started;
    let readers = (
        tokio::spawn(forward(stdout, Stream::Stdout, out.clone())),
        tokio::spawn(forward(stderr, Stream::Stderr, out.clone())),
    );
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(WINDOW_CHUNKS as usize);
    let writer = tokio::spawn(feed(stdin, stdin_rx, out.clone()));
    let mut stdin_tx = Some(stdin_tx);
    let deadline = tokio::time::sleep(Duration::from_millis(spec.timeout_ms));
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut inbound_open = true;
    let status = loop {
        tokio::select! {
            st = &mut exit => break st,
            () = &mut deadline, if !timed_out => {
                timed_out = true;
                kill_group(pgid, libc::SIGKILL);
            }
            frame = inbound.recv(), if inbound_open => match frame.map(|f| (f.header, f.payload)) {
                // The client cancelled, or the connection is gone: kill the whole group.
                None | Some((Header::Cancel { .. }, _)) => {
                    inbound_open = false;
                    kill_group(pgid, libc::SIGKILL);
                }
                Some((Header::Data { stream: Stream::Stdin, .. }, payload)) => {
                    let fed = stdin_tx.as_ref().map(|tx| tx.try_send(payload));
                    if !matches!(fed, Some(Ok(()))) && out.credit().await.is_err() {
                        inbound_open = false;
                        kill_group(pgid, libc::SIGKILL);
                    }
                }
                Some((Header::Eof { .. }, _)) => stdin_tx = None,
                Some((Header::Signal { signal, .. }, _)) => {
                    if (1..=SIGNAL_MAX).contains(&signal) {
                        kill_group(pgid, signal);
                    }
                }
                Some(_) => {}
            }
        }
    };
    drop(stdin_tx);
    writer.abort();
    // Each reader is awaited to its end at most once: `take` marks it consumed.
    let mut pending = [Some(readers.0), Some(readers.1)];
    let drained = async {
        for slot in pending.iter_mut() {
            if let Some(h) = slot.as_mut() {
                let _ = h.await;
                *slot = None;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(DRAIN_GRACE_MS), drained).await;
    // A pipe still open (a process left in the background holds it): no more output after the
    // exit status.
    for h in pending.into_iter().flatten() {
        h.abort();
        let _ = h.await;
    }
    let Ok(status) = status else {
        return out
            .error(ErrorKind::Io, "the exec's exit status was lost")
            .await;
    };
    let (code, signal) = decode_status(status);
    let _ = out
        .send(Header::Exited {
            id: out.id,
            status: ExitStatus {
                code,
                signal,
                timed_out,
                duration_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
        })
        .await;
}

/// Run the sandbox's own command (the VM's workload): inherited stdio (the guest console),
/// the sandbox's user, its own process group; its exit code as a shell reports it.
pub async fn run_main(agent: &Agent, argv: &[String]) -> std::io::Result<i32> {
    let (argv0, rest) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut cmd = Command::new(argv0);
    cmd.args(rest).current_dir(&agent.config.root);
    drop_privileges(&mut cmd, agent.config.user);
    let (_child, exit) = agent.reaper.spawn(&mut cmd)?;
    let status = exit
        .await
        .map_err(|_| std::io::Error::other("the command's exit status was lost"))?;
    Ok(decode_status(status).0)
}
