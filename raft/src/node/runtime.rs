//! The replica's Raft work on its own threads, ahead of everything else on the host.
//!
//! openraft 0.9 gives an AppendEntries call one heartbeat interval (50 ms) to answer, and a
//! follower that hears nothing for its lease plus its election timeout (450–600 ms) stands.
//! On one shared tokio runtime, Raft competes with the application for the same two workers:
//! the scheduler's plans, the assignment fan-out to thousands of node streams, status
//! reports — and on a busy host with every other process. A follower whose workers are busy
//! does not read an AppendEntries before the leader gives up on it; the leader then cancels
//! it, and enough of those in a row make the follower stand although the leader is healthy.
//!
//! So openraft's core, its replication streams and state machine worker, the replica's own
//! leader watch, the Raft transport's handlers and the connections to the other replicas run
//! on a runtime of their own ([`RaftRuntime`]), whose threads run at [`RAFT_NICE`]: the kernel
//! gives them the CPU first when they wake, ahead of the application's threads (nice 0) and of
//! simulated nodes (nice 10). Raft needs little CPU; what it needs is to be on time. Raising
//! the priority needs `CAP_SYS_NICE` (root); without it the threads keep the process's
//! niceness, which still keeps them off the application's workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Worker threads of the Raft runtime.
pub const RAFT_THREADS: usize = 2;
/// Niceness of the Raft threads (lower runs first; the application's threads run at 0).
pub const RAFT_NICE: libc::c_int = -5;
/// Name prefix of the Raft threads (as `top -H` shows them).
pub const RAFT_THREAD_NAME: &str = "surge-raft";

/// A tokio runtime for Raft's tasks, stopped when dropped (also from inside another runtime).
pub struct RaftRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    raised: Arc<AtomicBool>,
}

impl RaftRuntime {
    pub fn start() -> std::io::Result<Self> {
        let raised = Arc::new(AtomicBool::new(true));
        let seen = raised.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_THREADS)
            .max_blocking_threads(RAFT_THREADS)
            .thread_name(RAFT_THREAD_NAME)
            .on_thread_start(move || {
                if !raise_priority() {
                    seen.store(false, Ordering::Relaxed);
                }
            })
            .enable_all()
            .build()?;
        Ok(RaftRuntime {
            runtime: Some(runtime),
            raised,
        })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        // Only Drop takes the runtime out.
        self.runtime
            .as_ref()
            .expect("the Raft runtime lives until dropped")
            .handle()
            .clone()
    }

    /// Whether every Raft thread started so far runs at [`RAFT_NICE`].
    pub fn raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime blocks, which panics inside another runtime's task.
            rt.shutdown_background();
        }
    }
}

/// Run the calling thread at [`RAFT_NICE`]; false when not permitted (no `CAP_SYS_NICE`).
pub fn raise_priority() -> bool {
    // On Linux setpriority(PRIO_PROCESS, tid) sets the niceness of that one thread.
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let ok = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, id_t(tid), RAFT_NICE) == 0
    };
    if !ok {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                nice = RAFT_NICE,
                "cannot raise the Raft threads' priority (needs CAP_SYS_NICE); they run at the process's"
            );
        }
    }
    ok
}

/// The calling thread's niceness.
pub fn thread_nice() -> libc::c_int {
    // SAFETY: as above; getpriority reads one integer.
    unsafe {
        let tid = libc::gettid();
        libc::getpriority(libc::PRIO_PROCESS, id_t(tid))
    }
}

fn id_t(tid: libc::pid_t) -> libc::id_t {
    libc::id_t::try_from(tid).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_tasks_run_on_named_threads_at_the_raised_priority() {
        let rt = RaftRuntime::start().expect("runtime");
        let (name, nice) = rt
            .handle()
            .block_on(async {
                tokio::spawn(async {
                    let t = std::thread::current();
                    (t.name().map(str::to_string), thread_nice())
                })
                .await
            })
            .expect("task");
        assert_eq!(name.as_deref(), Some(RAFT_THREAD_NAME));
        // The test's own thread keeps its niceness: only the Raft threads are raised.
        let own = thread_nice();
        if rt.raised() {
            assert_eq!(nice, RAFT_NICE);
            assert_ne!(own, RAFT_NICE);
        } else {
            assert_eq!(
                nice, own,
                "a thread that could not be raised keeps the process's"
            );
        }
    }

    #[tokio::test]
    async fn dropping_it_inside_another_runtime_does_not_panic() {
        let rt = RaftRuntime::start().expect("runtime");
        let answer = rt.handle().spawn(async { 42 }).await.expect("task");
        assert_eq!(answer, 42);
        drop(rt);
    }
}
