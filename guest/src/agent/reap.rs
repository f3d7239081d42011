//! Reaping children. As PID 1 the agent inherits every orphan of the guest and must reap them
//! all (`waitpid(-1)`), or they stay zombies forever; the exit statuses of its own commands are
//! handed to whoever waits for them. In tests the agent shares its process with others, so it
//! waits only for the pids it started.
//!
//! `std::process::Command::spawn` itself waits for a child whose `exec` failed; a reaper that
//! took that status first would make it panic. So in [`ReapMode::All`] a spawn holds a read
//! lock until its pid is registered, and the reaper reaps only under the write lock (it learns
//! that something is ready with `waitid(WNOWAIT)`, which reaps nothing).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long the reaper sleeps when the agent has no child at all (a spawn wakes it at once).
const NO_CHILD_WAIT_MS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReapMode {
    /// Reap every child (PID 1, or the agent as its own process).
    All,
    /// Wait only for the commands the agent started (the agent inside a test process).
    Own,
}

#[derive(Default)]
struct Shared {
    spawning: RwLock<()>,
    waiters: Mutex<HashMap<libc::pid_t, oneshot::Sender<i32>>>,
    /// Bumped by every spawn, to wake a reaper that found no child.
    spawns: Mutex<u64>,
    spawned: Condvar,
}

/// See the module docs.
pub struct Reaper {
    mode: ReapMode,
    shared: Arc<Shared>,
}

fn waitpid(pid: libc::pid_t, options: i32) -> (libc::pid_t, i32) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one i32 through the pointer, a live local.
        let rc = unsafe { libc::waitpid(pid, &mut status, options) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return (rc, status);
    }
}

impl Reaper {
    pub fn new(mode: ReapMode) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        if mode == ReapMode::All {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reap_all(&s))?;
        }
        Ok(Self { mode, shared })
    }

    /// Start `cmd`; the receiver gets its wait status when it ends.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<i32>)> {
        let (tx, rx) = oneshot::channel();
        match self.mode {
            ReapMode::All => {
                let _spawning = self
                    .shared
                    .spawning
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                let child = cmd.spawn()?;
                let pid = pid_of(&child)?;
                self.shared
                    .waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pid, tx);
                *self.shared.spawns.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                self.shared.spawned.notify_all();
                Ok((child, rx))
            }
            ReapMode::Own => {
                let child = cmd.spawn()?;
                let pid = pid_of(&child)?;
                std::thread::Builder::new()
                    .name(format!("wait-{pid}"))
                    .spawn(move || {
                        let (_, status) = waitpid(pid, 0);
                        let _ = tx.send(status);
                    })?;
                Ok((child, rx))
            }
        }
    }
}

fn pid_of(child: &Child) -> std::io::Result<libc::pid_t> {
    libc::pid_t::try_from(child.id()).map_err(|_| std::io::Error::other("pid over pid_t"))
}

fn reap_all(shared: &Shared) {
    loop {
        let seen = *shared.spawns.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t through the pointer, a live local; WNOWAIT
        // leaves the child waitable.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // ECHILD: no child yet; sleep until the next spawn (one since `seen` counts).
                let spawns = shared.spawns.lock().unwrap_or_else(|p| p.into_inner());
                let _ = shared.spawned.wait_timeout_while(
                    spawns,
                    Duration::from_millis(NO_CHILD_WAIT_MS),
                    |n| *n == seen,
                );
            }
            continue;
        }
        let _reaping = shared.spawning.write().unwrap_or_else(|p| p.into_inner());
        loop {
            let (pid, status) = waitpid(-1, libc::WNOHANG);
            if pid <= 0 {
                break;
            }
            let waiter = shared
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid);
            if let Some(tx) = waiter {
                let _ = tx.send(status);
            }
        }
    }
}

/// Exit code as a shell reports it, and the signal, from a wait status.
pub fn decode_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (libc::WEXITSTATUS(status), None)
    }
}
