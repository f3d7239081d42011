//! Starting and reaping VMM processes.
//!
//! `PR_SET_PDEATHSIG` follows the *thread* that forked, not the process: a VMM forked from a tokio
//! blocking thread would be killed when that thread exits idle. So every VMM is forked by one
//! [`Spawner`] thread that lives as long as the runtime, and its death (the runtime dropped, or
//! the daemon gone) takes the VMs with it. Each VMM then has a waiter thread that reaps it and
//! records its wait status in `exit.json`.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::exit::VmmStatus;
use crate::runtime::sandbox_dir::write_json_atomic;
use crate::runtime::supervise::pidfd_open;
use crate::runtime::{RuntimeError, SandboxId};

/// Spawn requests queued for the spawner thread.
const SPAWN_QUEUE_MAX: usize = 64;
/// How long a waiter that could not reap the VMM leaves its parent to record the status.
const UNKNOWN_STATUS_GRACE_MS: u64 = 200;

/// Block until `pid` ends; its status when it is this process's child.
fn wait_for_exit(pid: u32) -> VmmStatus {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return VmmStatus::Unknown;
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid's only pointer argument is `&mut status`, a live local i32 it writes
        // once; no other memory is touched.
        let rc = unsafe { libc::waitpid(raw, &mut status, 0) };
        if rc == raw {
            return VmmStatus::from_wait_status(status);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break; // ECHILD: not ours (adopted from a process that exec'd or died): poll its pidfd.
    }
    if let Ok(fd) = pidfd_open(pid) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes exactly one pollfd (nfds = 1), `pfd`, a live local that
        // outlives the call; the fd in it is the pidfd `fd` keeps open until after the loop.
        while unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {}
    }
    VmmStatus::Unknown
}

/// Forks every VM from one thread that lives as long as the runtime (see the module docs:
/// `PR_SET_PDEATHSIG` follows the forking thread).
pub struct Spawner {
    tx: std_mpsc::SyncSender<(std::process::Command, oneshot::Sender<std::io::Result<u32>>)>,
}

impl Spawner {
    pub fn new() -> Result<Self, RuntimeError> {
        let (tx, rx) = std_mpsc::sync_channel::<(
            std::process::Command,
            oneshot::Sender<std::io::Result<u32>>,
        )>(SPAWN_QUEUE_MAX);
        std::thread::Builder::new()
            .name("krun-spawner".into())
            .spawn(move || {
                // Ends when the runtime (the only sender) is dropped; its children get SIGKILL.
                while let Ok((mut cmd, reply)) = rx.recv() {
                    // The Child is dropped without waiting: the VM's waiter thread reaps it.
                    let _ = reply.send(cmd.spawn().map(|c| c.id()));
                }
            })
            .map_err(|e| RuntimeError::io("start the krun spawner thread", e))?;
        Ok(Self { tx })
    }

    pub async fn spawn(&self, cmd: std::process::Command) -> std::io::Result<u32> {
        let (reply, rx) = oneshot::channel();
        let gone = || std::io::Error::other("the krun spawner thread is gone");
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send((cmd, reply)).map_err(|_| gone()))
            .await
            .map_err(|_| gone())??;
        rx.await.map_err(|_| gone())?
    }
}

/// Start the thread that reaps the VMM `pid` and records its status at `exit_json`; the receiver
/// turns `true` once it is recorded. `None` if no thread could be started.
pub fn spawn_waiter(id: SandboxId, pid: u32, exit_json: PathBuf) -> Option<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let spawned = std::thread::Builder::new()
        .name(format!("vm-wait-{id}"))
        .spawn(move || {
            let status = wait_for_exit(pid);
            if status == VmmStatus::Unknown {
                // Not our child: the process that is its parent (another runtime of this
                // process, or nobody) may still record the real status; never overwrite it.
                std::thread::sleep(Duration::from_millis(UNKNOWN_STATUS_GRACE_MS));
                if exit_json.exists() {
                    let _ = tx.send(true);
                    return;
                }
            }
            if let Err(e) = write_json_atomic(&exit_json, &status) {
                tracing::warn!(sandbox = %id, error = %e, "cannot record the VM's exit status");
            }
            let _ = tx.send(true);
        });
    match spawned {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::warn!(sandbox = %id, error = %e, "cannot start the VM's waiter thread");
            None
        }
    }
}

/// Prepare `cmd` to run as a VMM: its own session, killed when the daemon's spawner thread dies,
/// and moved into the cgroup whose `cgroup.procs` files are `procs` before it executes anything.
pub fn supervise_child(cmd: &mut std::process::Command, procs: Vec<CString>) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: pre_exec's contract is that the closure runs in the forked child, where only
    // async-signal-safe work is allowed. It makes raw syscalls only (setsid, prctl, getppid,
    // open, write, close, and errno reads), allocates nothing, and reads only memory prepared
    // before the fork: `procs` (CStrings moved in), `parent`, and a static literal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon may have died between fork and prctl: then nobody would kill us.
            // (ESRCH, not a message: building one would allocate in the forked child, and
            // nobody is left to read it.)
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            for p in &procs {
                // "0" moves the writing process (v1 and v2); the VM's memory is charged
                // from its first page.
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, c"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
