//! What a sandbox's shim leaves in its directory, and the container runtime's part of its record:
//! `meta.json`'s shim pid and cgroup parent, `exit.code`, `init.status` and `container.pid`.

use serde::{Deserialize, Serialize};

use super::checkpoint::CheckpointRecord;
use super::{Sandbox, CRUN_ERROR_TAIL_BYTES};
use crate::runtime::supervise::RecordExtra;
use crate::runtime::SandboxId;

/// The container runtime's fields of a sandbox's record (`meta.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShimRecord {
    pub(super) shim_pid: u32,
    pub(super) shim_start_ticks: u64,
    /// The cgroup parent the sandbox was started under (absent in records of older surge:
    /// the configured parent then). Kept so a daemon restarted with another parent still finds
    /// the cgroups of the sandboxes it re-adopts.
    #[serde(default)]
    pub(super) cgroup_parent: Option<String>,
    /// Set while the sandbox is being or has been checkpointed (see `checkpoint`).
    #[serde(default)]
    pub(super) checkpoint: Option<CheckpointRecord>,
}

impl RecordExtra for ShimRecord {
    fn process(&self) -> (u32, u64) {
        (self.shim_pid, self.shim_start_ticks)
    }
    fn set_process(&mut self, pid: u32, start_ticks: u64) {
        self.shim_pid = pid;
        self.shim_start_ticks = start_ticks;
    }
}

/// The container's status as the shim recorded it; `None` until the shim has written it.
pub(super) fn exit_code(sb: &Sandbox) -> Option<i32> {
    let text = std::fs::read_to_string(sb.file("exit.code")).ok()?;
    // The shim writes "N\n" in one write; without the newline it is still being written.
    text.strip_suffix('\n')?.trim().parse().ok()
}

/// What surge-init said about starting the command: `None` while it has said nothing.
pub(super) enum InitStatus {
    Ran,
    Failed(String),
}

pub(super) fn init_status(sb: &Sandbox) -> Option<InitStatus> {
    match std::fs::read_to_string(sb.file("init.status")) {
        // Started by a shim that passed no status file (an older surge): it ran.
        Err(_) => Some(InitStatus::Ran),
        Ok(t) if t.is_empty() => None,
        Ok(t) if t.starts_with("ok\n") => Some(InitStatus::Ran),
        Ok(t) => Some(InitStatus::Failed(
            t.trim().chars().take(CRUN_ERROR_TAIL_BYTES).collect(),
        )),
    }
}

/// The container's first process, once crun has written its pid file.
pub(super) fn container_pid(sb: &Sandbox) -> Option<u32> {
    std::fs::read_to_string(sb.file("container.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// crun container id of a sandbox.
pub fn container_id(id: SandboxId) -> String {
    format!("surge-{}-{}", id.job, id.index)
}
