//! The container runtime: OCI containers run by Debian's `crun`, for hosts without hardware
//! virtualization. surge writes the bundle; crun does namespaces, pivot_root, cgroups, freezing.
//!
//! ```text
//! <data_dir>/sandboxes/<JOB.INDEX>/     one bundle per sandbox (crun --root <data_dir>/crun)
//!   config.json    OCI spec: pid/mount/ipc/uts/net/cgroup namespaces, uid 1000, cgroup limits
//!   meta.json      surge's record: generation, revision, resources, spec, shim pid, paused
//!   rootfs/        overlay mount: lower = the template (read-only), upper = upper/
//!   upper/ ovl-work/   the sandbox's writes, kept until the sandbox is forgotten
//!   stdout.log stderr.log   the container's stdio (tails of 64 KiB in exit reports)
//!   container.pid  written by crun once the container runs
//!   exit.code      written by the shim when crun returns: the container's status (128+sig)
//!   init.status    written by surge-init: "ok" once the command runs, or why it could not
//!   exec/N.json    the process spec of a running exec (`crun exec --process`)
//!   final.json     how it ended, fixed once observed
//! ```
//!
//! **The shim.** Each sandbox runs as `sh -c 'crun run ...; echo $? > exit.code'`, in its own
//! session so it outlives a daemon restart. `crun run` in the foreground creates, starts and waits
//! for the container and returns its exit status, so the status survives the daemon: a new daemon
//! process finds `exit.code` (or a live shim, which it watches through a pidfd) and re-adopts
//! everything from `meta.json`. This is the job conmon or containerd-shim do, done by a shell.
//!
//! **Root filesystem.** The template stays read-only and shared; each sandbox gets an overlayfs
//! with a private upper directory. Starting costs one mount instead of copying the template
//! (templates for agents are hundreds of MiB), and the sandbox's writes stay inspectable in
//! `upper/` after it ends. Paths end up in overlay mount options, so the data dir must not contain
//! `,` or `:` (checked).
//!
//! **cgroups.** crun manages the sandbox's cgroup (`crun update`, `crun pause`); surge reads the
//! files to report usage. Hosts differ:
//! * pure v2: crun's cgroup is `<parent>/surge-J-I/ctr` and surge owns `<parent>/surge-J-I`. crun
//!   removes its cgroup when the container exits, taking the `oom_kill` counter with it; the
//!   parent's `memory.events` is hierarchical and survives until the sandbox is forgotten.
//! * v1 (legacy or hybrid): `memory.oom_control` counters are not hierarchical on v1, so surge
//!   registers an eventfd on it (`cgroup.event_control`) as soon as the container runs and marks
//!   the sandbox when an OOM is signalled.
//! * hybrid with controllers on the v2 mount (this build machine: `hugetlb` is bound to v2):
//!   crun 1.8 refuses such hosts ("cgroups in hybrid mode not supported"). surge runs crun in a
//!   private mount namespace in which `/sys/fs/cgroup/unified` is unmounted, so crun sees a plain
//!   v1 host. Nothing outside that namespace changes.
//!
//! **PID 1, exec and files.** PID 1 is surge-init ([`init`]), bind-mounted read-only from the
//! data dir: it reaps orphans and forwards SIGTERM; with no command the sandbox stays up until
//! stopped. Exec is `crun exec --process` with the sandbox's user, no capabilities and
//! no_new_privs, wrapped by surge-init for process groups and kills ([`exec`]). Files are opened
//! from the host through `/proc/<PID 1>/root` with `openat2(RESOLVE_IN_ROOT)`, as the sandbox's
//! user ([`resolve`], [`files`], [`tarball`]).
//!
//! **OOM.** `runtime::guard_memory` grows the limit under pressure. When it cannot, the kernel
//! kills a process; a sandbox that then ends with a non-zero status and OOM evidence is
//! `OomKilled`, never a plain exit.
//!
//! **Layout of the code.** The OCI spec is built in [`oci`] (pure); cgroup discovery, reads and
//! the v1 OOM eventfd are in `runtime::cgroup`; the record, liveness, list, finalize and remove
//! logic shared with the krun runtime are in `runtime::supervise`. This file holds what is crun's
//! own: the shim, the crun commands ([`crun`]) and the verdict.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::cgroup::{cpu_quota_us, cpu_shares, Cgroup, CPU_PERIOD_US};
use super::sandbox_dir::{release_mounts, Final};
use super::supervise::{
    pidfd_open, process_start_ticks, Record, RecordExtra, Sandboxes, Supervised, Supervisor,
};
use super::{
    read_tail, ExitReport, ObservedSandbox, ObservedState, Resources, Runtime, RuntimeError,
    SandboxHandle, SandboxId, StartRequest, Usage, MIB,
};
use crate::template::{Templates, SANDBOX_GID, SANDBOX_UID};

mod bundle;
pub mod checkpoint;
pub mod crun;
mod exec;
mod files;
pub mod fork;
pub mod init;
mod io;
pub mod netns;
pub mod oci;
mod oom;
pub mod pool;
mod resolve;
mod shim;
mod snapshot;
mod tarball;

use checkpoint::CriuKit;
use crun::{Crun, ShimMode};
pub use shim::{container_id, ShimRecord};
use shim::{container_pid, exit_code, init_status, InitStatus};

// Kept at their old paths for callers outside this module (`chaos` reads the cgroup mounts).
pub use super::cgroup::{parse_cgroup_mounts, CgroupLayout, CgroupMount};
pub use crun::CRUN_COMMAND_TIMEOUT_MS;
pub use oci::{oci_config, OciParams, PIDS_MAX};

/// How long a container may take to come up.
pub const START_TIMEOUT_MS: u64 = 30_000;
/// Bytes of crun's stderr quoted when it could not start a container.
const CRUN_ERROR_TAIL_BYTES: usize = 2048;

/// Settings of the container runtime.
#[derive(Clone, Debug)]
pub struct ContainerConfig {
    /// Bundles go to `<data_dir>/sandboxes`, crun's state to `<data_dir>/crun`, templates to
    /// `<data_dir>/templates`.
    pub data_dir: PathBuf,
    pub crun: PathBuf,
    /// Absolute cgroup path under which every sandbox's cgroup is made. Each daemon on a host
    /// needs its own (`surge node` uses `/surge/<node id>`): container ids are per job and
    /// index, so two daemons holding runs of the same sandbox would otherwise share a cgroup.
    pub cgroup_parent: String,
    /// User the sandbox's processes run as (no user namespace: the same uid on the host).
    pub sandbox_uid: u32,
    pub sandbox_gid: u32,
    pub tmp_size_mib: u64,
    /// The crun + CRIU that checkpoints sandboxes, or why this node cannot (see `checkpoint`).
    /// With a kit, every container runs under its crun with piped stdio.
    pub criu: Result<CriuKit, String>,
    /// Sandboxes kept created ahead per template (`surge node --warm-pool`; see `pool`).
    pub warm_pool: Vec<pool::WarmPoolSpec>,
}

impl ContainerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            crun: PathBuf::from("crun"),
            cgroup_parent: "/surge".to_owned(),
            sandbox_uid: SANDBOX_UID,
            sandbox_gid: SANDBOX_GID,
            tmp_size_mib: 256,
            criu: Err("checkpointing is not enabled on this node".to_owned()),
            warm_pool: Vec::new(),
        }
    }
}

/// A sandbox's cgroup as crun holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxCgroup {
    /// `cgroupsPath` given to crun.
    pub crun_path: String,
    /// crun's cgroup (the leaf on v2).
    pub dirs: Cgroup,
    /// Directory surge owns (v2 parent holding hierarchical events; v1 none).
    pub owned: Option<PathBuf>,
}

impl SandboxCgroup {
    pub fn new(layout: &CgroupLayout, parent: &str, cid: &str) -> Self {
        let relative = CgroupLayout::child(parent, cid);
        match layout {
            // crun removes its own cgroup when the container exits, taking the `oom_kill`
            // counter with it; the parent's `memory.events` is hierarchical and stays.
            CgroupLayout::V2 { root } => Self {
                crun_path: format!("/{relative}/ctr"),
                dirs: layout.cgroup(&format!("{relative}/ctr")),
                owned: Some(root.join(&relative)),
            },
            CgroupLayout::V1 { .. } => Self {
                crun_path: format!("/{relative}"),
                dirs: layout.cgroup(&relative),
                owned: None,
            },
        }
    }
}

type Sandbox = Supervised<ContainerRuntime>;

// ---- the runtime ----

/// See the module docs.
pub struct ContainerRuntime {
    config: ContainerConfig,
    layout: CgroupLayout,
    templates: Templates,
    crun: Crun,
    sandboxes: Sandboxes<ContainerRuntime>,
    /// surge-init on the host (`<data_dir>/bin/surge-init`).
    init: PathBuf,
    /// Exec slots and exec contexts of the sandboxes (see `io`).
    io: io::IoState,
    /// The kit this node checkpoints with, or why it cannot.
    criu: Result<CriuKit, String>,
    /// One fork image is made at a time (see `fork`).
    fork_lock: tokio::sync::Mutex<()>,
    /// CRIU's options for this host (`checkpoint::criu_config`), named in every bundle.
    criu_conf: Option<PathBuf>,
    /// The warm pools (see `pool`).
    pools: pool::Pools,
}

impl Supervisor for ContainerRuntime {
    type Extra = ShimRecord;
    type Cgroup = SandboxCgroup;
    const RUNTIME: &'static str = "container";
    const NOUN: &'static str = "sandbox";
    const RECORD_FILE: &'static str = "meta.json";
    const STDOUT_LOG: &'static str = "stdout.log";
    const STDERR_LOG: &'static str = "stderr.log";
    const START_TIMEOUT_MS: u64 = START_TIMEOUT_MS;
    const START_POLL_MAX_MS: u64 = 2;

    fn cgroup(&self, record: &Record<ShimRecord>) -> SandboxCgroup {
        let parent = record.extra.cgroup_parent.as_deref();
        SandboxCgroup::new(
            &self.layout,
            parent.unwrap_or(&self.config.cgroup_parent),
            &container_id(record.id),
        )
    }

    fn held_state(sb: &Sandbox) -> Option<ObservedState> {
        checkpoint::held_state(sb)
    }

    fn readopt(&self, sb: &Arc<Sandbox>) {
        if container_pid(sb).is_some() {
            self.watch_oom(sb); // watch again what we watched before the restart
        }
    }

    /// Running once surge-init has executed the command (a command that cannot be executed is
    /// a failed start, not a start and an exit).
    fn started_pid(sb: &Sandbox) -> Option<u32> {
        match init_status(sb)? {
            InitStatus::Ran => container_pid(sb),
            InitStatus::Failed(_) => None,
        }
    }

    async fn verdict(&self, sb: &Sandbox) -> Result<Final, RuntimeError> {
        let code = exit_code(sb);
        // surge-init could not execute the command: a start failure, with its reason.
        if let Some(InitStatus::Failed(reason)) = init_status(sb) {
            return Ok(Final {
                state: ObservedState::Failed { reason },
                code: None,
            });
        }
        // OOM evidence only matters for a failed exit: a sandbox that recovered from the OOM kill
        // of one of its processes and exited 0 succeeded.
        let oom = matches!(code, Some(c) if c != 0) && self.oom_evidence(sb).await;
        Ok(match code {
            Some(c) if c != 0 && oom => Final {
                state: ObservedState::OomKilled,
                code,
            },
            Some(c) => Final {
                state: ObservedState::Exited { code: c },
                code,
            },
            None if container_pid(sb).is_none() => Final {
                state: ObservedState::Failed {
                    reason: format!(
                        "crun could not start the container: {}",
                        read_tail(&sb.file("stderr.log"), CRUN_ERROR_TAIL_BYTES)?.trim()
                    ),
                },
                code: None,
            },
            None => Final {
                state: ObservedState::Failed {
                    reason: "the sandbox's shim died without recording an exit status (killed with the daemon's \
                             process group, or the host rebooted)"
                        .into(),
                },
                code: None,
            },
        })
    }
}

impl ContainerRuntime {
    /// Check the host (crun present, cgroups usable, data dir fit for overlay options).
    pub fn new(config: ContainerConfig) -> Result<Self, RuntimeError> {
        let layout = CgroupLayout::detect()?;
        Self::with_layout(config, layout)
    }

    pub fn with_layout(
        config: ContainerConfig,
        layout: CgroupLayout,
    ) -> Result<Self, RuntimeError> {
        let data = config.data_dir.as_os_str().as_bytes();
        if data.contains(&b',') || data.contains(&b':') || !config.data_dir.is_absolute() {
            return Err(RuntimeError::io(
                format!("data dir {}", config.data_dir.display()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "must be absolute and contain no `,` or `:` (overlay options)",
                ),
            ));
        }
        let crun = match &config.criu {
            Ok(kit) => Crun::new(&kit.crun, config.data_dir.join("crun"), &layout)?
                .with_path_first(&kit.bin_dir),
            Err(_) => Crun::new(&config.crun, config.data_dir.join("crun"), &layout)?,
        };
        let init = init::install(&config.data_dir)?;
        let criu_conf = match &config.criu {
            Ok(_) => checkpoint::install_criu_config(&config.data_dir)?,
            Err(_) => None,
        };
        Ok(Self {
            init,
            criu: config.criu.clone(),
            fork_lock: tokio::sync::Mutex::new(()),
            criu_conf,
            io: io::IoState::default(),
            pools: pool::Pools::new(&config.data_dir, config.warm_pool.clone(), &layout),
            templates: Templates::new(&config.data_dir),
            sandboxes: Sandboxes::new(config.data_dir.join("sandboxes"))?,
            config,
            layout,
            crun,
        })
    }

    /// The uid and gid a sandbox runs as: the node's sandbox user, or 0 for `user = "root"`
    /// (no capabilities and no_new_privs either way).
    fn user_of(&self, spec: &super::SandboxSpec) -> (u32, u32) {
        if spec.user == "root" {
            (0, 0)
        } else {
            (self.config.sandbox_uid, self.config.sandbox_gid)
        }
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    /// The crun this runtime drives (benchmarks run `crun run` beside it the same way).
    pub fn crun(&self) -> &Crun {
        &self.crun
    }

    /// surge-init on the host (what `config.json` bind-mounts as PID 1).
    pub fn init_path(&self) -> &Path {
        &self.init
    }

    fn get(&self, id: SandboxId) -> Result<Arc<Sandbox>, RuntimeError> {
        self.sandboxes.get(self, id)
    }

    fn spawn_shim(&self, sb: &Sandbox) -> Result<(), RuntimeError> {
        let mode = if self.criu.is_ok() {
            ShimMode::RunPiped
        } else {
            ShimMode::Run
        };
        let pid = self
            .crun
            .spawn_shim(sb.id, &sb.dir, &container_id(sb.id), mode)?;
        let ticks = process_start_ticks(pid).unwrap_or(0);
        sb.update(|r| r.extra.set_process(pid, ticks))
    }

    /// Wait for the shim to exit (pidfd), without finalizing.
    async fn wait_shim(&self, sb: &Sandbox) -> Result<(), RuntimeError> {
        let (pid, ticks) = sb.record().extra.process();
        if pid == 0 {
            return Ok(());
        }
        let Ok(pidfd) = pidfd_open(pid) else {
            return Ok(()); // ESRCH: already gone
        };
        // The pid could have been reused between reading meta.json and pidfd_open.
        if process_start_ticks(pid) != Some(ticks) {
            return Ok(());
        }
        // SAFETY: `pidfd` is an open OwnedFd moved into the AsyncFd, which owns it from here on:
        // only the AsyncFd's drop closes it, and an OwnedFd's `as_raw_fd` never changes, as
        // `register_with_interest` requires.
        let afd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| RuntimeError::io("register pidfd", e.into()))?;
        let _ready = afd
            .readable()
            .await
            .map_err(|e| RuntimeError::io("wait on pidfd", e))?;
        Ok(())
    }
}

impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        "container"
    }

    async fn start(&self, req: StartRequest) -> Result<SandboxHandle, RuntimeError> {
        if let Some(started) = self.start_from_pool(&req).await {
            return started;
        }
        let bundle = self.sandboxes.begin_start(self, req.id)?;
        let record = match self.prepare_bundle(&req, &bundle) {
            Ok(r) => r,
            Err(e) => {
                release_mounts(&bundle);
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let sb = self.sandboxes.insert(self, record);
        self.spawn_shim(&sb)?;
        let pid = self.sandboxes.await_started(self, &sb).await?;
        self.watch_oom(&sb);
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: Some(pid),
        })
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let sb = self.get(id)?;
        let state = self.sandboxes.state_of(self, &sb).await?;
        if matches!(state, ObservedState::Checkpointed { .. }) {
            self.discard_checkpoint(&sb)?;
            return self.sandboxes.report(self, &sb).await;
        }
        if state.is_terminal() {
            return self.sandboxes.report(self, &sb).await;
        }
        if state == ObservedState::Starting {
            // crun has not written the pid file yet; give it the start timeout.
            let _ = self.sandboxes.await_started(self, &sb).await;
        }
        let cid = OsString::from(container_id(id));
        if sb.record().paused {
            // Frozen tasks cannot handle SIGTERM (or die of SIGKILL on v1) until thawed.
            let _ = self.crun.run(&[OsStr::new("resume"), &cid]).await;
            sb.update(|r| r.paused = false)?;
        }
        if let Err(e) = self
            .crun
            .run(&[OsStr::new("kill"), &cid, OsStr::new("TERM")])
            .await
        {
            tracing::debug!(sandbox = %id, error = %e, "SIGTERM not delivered (already exiting?)");
        }
        if tokio::time::timeout(grace, self.wait_shim(&sb))
            .await
            .is_err()
        {
            tracing::info!(sandbox = %id, grace_ms = grace.as_millis(), "sandbox ignored SIGTERM; killing it");
            if let Err(e) = self
                .crun
                .run(&[
                    OsStr::new("kill"),
                    OsStr::new("--all"),
                    &cid,
                    OsStr::new("KILL"),
                ])
                .await
            {
                tracing::debug!(sandbox = %id, error = %e, "SIGKILL not delivered (already gone?)");
            }
            tokio::time::timeout(
                Duration::from_millis(CRUN_COMMAND_TIMEOUT_MS),
                self.wait_shim(&sb),
            )
            .await
            .map_err(|_| RuntimeError::Timeout {
                what: format!("SIGKILL of sandbox {id}"),
                after_ms: CRUN_COMMAND_TIMEOUT_MS,
            })??;
        }
        self.sandboxes.report(self, &sb).await
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.sandboxes.live(self, id, "pause").await?;
        if sb.record().paused {
            return Ok(());
        }
        self.crun
            .run(&[OsStr::new("pause"), OsStr::new(&container_id(id))])
            .await?;
        sb.update(|r| r.paused = true)
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.sandboxes.live(self, id, "resume").await?;
        if !sb.record().paused {
            return Ok(());
        }
        self.crun
            .run(&[OsStr::new("resume"), OsStr::new(&container_id(id))])
            .await?;
        sb.update(|r| r.paused = false)
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        let sb = self.sandboxes.live(self, id, "resize").await?;
        if sb.record().resources != resources {
            let memory = OsString::from(format!("--memory={}", resources.memory_mib * MIB));
            let quota = OsString::from(format!(
                "--cpu-quota={}",
                cpu_quota_us(resources.cpu_millis)
            ));
            let period = OsString::from(format!("--cpu-period={CPU_PERIOD_US}"));
            let shares =
                OsString::from(format!("--cpu-share={}", cpu_shares(resources.cpu_millis)));
            let cid = OsString::from(container_id(id));
            self.crun
                .run(&[
                    OsStr::new("update"),
                    &memory,
                    &quota,
                    &period,
                    &shares,
                    &cid,
                ])
                .await
                .map_err(|e| RuntimeError::ResizeRejected {
                    id,
                    resources,
                    reason: format!(
                        "{e} (a memory limit below current usage is refused by the kernel)"
                    ),
                })?;
        }
        sb.update(|r| {
            r.resources = resources;
            r.revision = revision;
        })
    }

    async fn status(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        let sb = self.get(id)?;
        let state = self.sandboxes.state_of(self, &sb).await?;
        Ok(sb.observed(state))
    }

    async fn wait(&self, id: SandboxId) -> Result<ExitReport, RuntimeError> {
        let sb = self.get(id)?;
        loop {
            let state = self.sandboxes.state_of(self, &sb).await?;
            if state.is_terminal() {
                return self.sandboxes.report(self, &sb).await;
            }
            if matches!(state, ObservedState::Checkpointed { .. }) {
                // Nothing runs to wait for; the owner waits again after a restore.
                return Err(RuntimeError::WrongState {
                    id,
                    state,
                    operation: "wait for",
                });
            }
            self.wait_shim(&sb).await?;
            // The shim is gone or going: give it a moment to be observably dead.
            if sb.alive() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    async fn usage(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
        let sb = self.get(id)?;
        let u = sb.cgroup.dirs.usage().ok_or(RuntimeError::NotFound {
            id,
            runtime: "container",
        })?;
        Ok(Usage {
            memory_bytes: u.working_set_bytes,
            memory_limit_bytes: u.limit_bytes.unwrap_or(u64::MAX),
            cpu_usage_ns: u.cpu_usage_ns,
        })
    }

    async fn list(&self) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        self.sandboxes.list(self).await
    }

    async fn checkpoint(&self, id: SandboxId) -> Result<u64, RuntimeError> {
        self.checkpoint_sandbox(id).await
    }

    async fn restore(&self, id: SandboxId) -> Result<(), RuntimeError> {
        self.restore_sandbox(id).await
    }

    async fn fork(
        &self,
        source: SandboxId,
        key: u64,
        req: StartRequest,
    ) -> Result<SandboxHandle, RuntimeError> {
        self.fork_sandbox(source, key, req).await
    }

    fn checkpoint_support(&self) -> Result<(), String> {
        ContainerRuntime::checkpoint_support(self)
    }

    async fn remove(&self, id: SandboxId) -> Result<(), RuntimeError> {
        if let Ok(sb) = self.get(id) {
            if let ObservedState::Checkpointed { .. } = self.sandboxes.state_of(self, &sb).await? {
                self.discard_checkpoint(&sb)?;
            }
        }
        let sb = self.sandboxes.ended(self, id).await?;
        // crun deletes the container when `crun run` returns; this covers a crun that was killed.
        self.crun.delete_force(&container_id(id)).await;
        release_mounts(&sb.dir);
        self.io.forget(id);
        if let Some(owned) = &sb.cgroup.owned {
            let _ = std::fs::remove_dir(owned.join("ctr"));
            if let Err(e) = std::fs::remove_dir(owned) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(RuntimeError::io(
                        format!("remove cgroup {}", owned.display()),
                        e,
                    ));
                }
            }
        }
        self.sandboxes.delete(&sb)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_checkpoint;
#[cfg(test)]
mod tests_fork;
#[cfg(test)]
mod tests_io;
#[cfg(test)]
mod tests_pool;
