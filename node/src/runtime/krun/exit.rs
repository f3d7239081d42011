//! How a microVM ended, decided from plain data: the VMM process's wait status, the tail of the
//! guest console, vm-exec's setup error, and the host cgroup's OOM evidence.
//!
//! libkrun exits the VMM process with the guest command's status. A guest kernel panic, though,
//! ends the VM with status 0: taken at face value that is a success. The console says otherwise
//! ("Kernel panic - not syncing: ..."), so the console is read before the status is believed.

use serde::{Deserialize, Serialize};

use crate::reconcile::ObservedState;

/// vm-exec's own exit status when it fails before the VM starts (podman's convention).
pub const SETUP_FAILED_CODE: i32 = 125;

/// The VMM process's end, as `waitpid` saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmmStatus {
    Code(i32),
    Signal(i32),
    /// The process was not this daemon's child (or vanished unobserved): no status.
    Unknown,
}

impl VmmStatus {
    /// From a raw `waitpid` status.
    pub fn from_wait_status(status: i32) -> Self {
        if libc::WIFEXITED(status) {
            Self::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Self::Signal(libc::WTERMSIG(status))
        } else {
            Self::Unknown
        }
    }

    /// As a shell reports it.
    pub fn code(self) -> Option<i32> {
        match self {
            Self::Code(c) => Some(c),
            Self::Signal(s) => Some(128 + s),
            Self::Unknown => None,
        }
    }
}

/// The line of a guest kernel panic in the console, if any.
pub fn guest_panic(console: &str) -> Option<&str> {
    console
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
        .map(str::trim)
}

/// The guest kernel's OOM killer acted (inside the VM, below the host limit).
pub fn guest_oom(console: &str) -> bool {
    console.contains("Out of memory: Killed process") || console.contains("oom-kill:")
}

/// The verdict: terminal state and the code to report.
pub fn classify(
    status: VmmStatus,
    console_tail: &str,
    setup_error: Option<&str>,
    host_oom: bool,
) -> (ObservedState, Option<i32>) {
    if let Some(err) = setup_error {
        return (
            ObservedState::Failed {
                reason: format!("the microVM could not start: {}", err.trim()),
            },
            status.code(),
        );
    }
    if let Some(line) = guest_panic(console_tail) {
        if line.contains("Out of memory") {
            return (ObservedState::OomKilled, None);
        }
        // Whatever the status (libkrun reports 0), a panicked guest did not succeed.
        return (
            ObservedState::Failed {
                reason: format!("the guest kernel panicked: {line}"),
            },
            None,
        );
    }
    let failed = !matches!(status, VmmStatus::Code(0));
    if failed && (host_oom || guest_oom(console_tail)) {
        return (ObservedState::OomKilled, status.code());
    }
    match status.code() {
        Some(code) => (ObservedState::Exited { code }, Some(code)),
        None => (
            ObservedState::Failed {
                reason: "the microVM's exit status is unknown: it was not a child of this daemon \
                         process (started by an earlier one that died, or the host rebooted)"
                    .into(),
            },
            None,
        ),
    }
}
