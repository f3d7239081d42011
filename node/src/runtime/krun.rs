//! The krun runtime: each sandbox is a libkrun microVM, for hosts with hardware virtualization.
//!
//! ```text
//!  daemon (KrunRuntime)                         child: `surge vm-exec --config vm.json`
//!  ─────────────────────                        ─────────────────────────────────────
//!  write vm.json, mount the overlay root   ──►  pre_exec: setsid, PR_SET_PDEATHSIG(SIGKILL),
//!  make the cgroup, set its limits              join the cgroup (write 0 to cgroup.procs)
//!  spawn from the long-lived spawner thread     load libkrun (dlopen), build the context from
//!  waiter thread: waitpid ─► exit.json          vm.json, touch `entered`, krun_start_enter:
//!  finalize: exit.json + console + cgroup       the VMM owns the process and exits with the
//!            ─► final.json                      guest command's status
//! ```
//!
//! **One VM per child process.** `krun_start_enter` never returns on success: libkrun runs the
//! VMM in the calling process and exits it when the guest ends. So the daemon re-executes its own
//! binary in a hidden mode (`surge vm-exec`), one process per VM, and supervises it like any
//! child: the host-side cgroup limits it, SIGSTOP/SIGCONT pause and resume it (every vCPU is a
//! thread of that process, so the whole guest stops, memory intact), SIGTERM then SIGKILL stop
//! it.
//!
//! **The daemon's death kills its VMs.** The child sets `PR_SET_PDEATHSIG` (and checks its parent
//! did not die before that). The signal follows the *thread* that forked, so children are forked
//! by one spawner thread that lives as long as the runtime: a tokio blocking thread that exits
//! when idle would kill its VMs with it. A daemon that re-executes itself keeps its children
//! (exec is not death) and re-adopts them from `state.json` (pid + start time); a daemon that
//! died finds them dead and reports them `Failed`, never as a success.
//!
//! **Memory.** The guest boots with headroom (see `vm::guest_ram_mib`); the host-side cgroup
//! limit is the sandbox's memory plus [`VMM_OVERHEAD_MIB`] for the VMM itself. Resizing moves
//! the cgroup limit only, up to the RAM the guest booted with. A VMM killed by the host's OOM
//! killer, or a guest whose own OOM killer acted, is `OomKilled`.
//!
//! ```text
//! <data_dir>/vms/<JOB.INDEX>/
//!   vm.json     the VM configuration vm-exec reads       state.json  pid, start time, limits
//!   rootfs/     overlay: template (read-only) + upper/   console.log the guest console
//!   vmexec.log  vm-exec's and libkrun's own stderr       entered     vm-exec reached start_enter
//!   setup-error why vm-exec failed                       exit.json   the VMM's wait status
//!   final.json  how it ended, fixed once observed    agent.sock  the guest agent's vsock port
//!   rootfs/.surge/surge-guest  the guest agent (copied in when configured)
//! ```
//!
//! **Layout of the code.** [`host`] finds libkrun and decides whether this host can run VMs;
//! [`spawner`] forks and reaps VMMs; [`ffi`] loads libkrun; [`vm`] and [`exec`] are the VM's side;
//! [`exit`] classifies how a VM ended; [`io`] is exec and files through the guest agent. The record, liveness, list, finalize and remove logic
//! shared with the container runtime are in `runtime::supervise`, cgroups in `runtime::cgroup`.

use std::ffi::{CString, OsString};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cgroup::{Cgroup, CgroupLayout};
use super::sandbox_dir::{
    cstring, lock, mount_overlay, read_json, template_dir, unmount, write_json_atomic, Final,
};
use super::supervise::{
    pidfd_open, process_start_ticks, Record, RecordExtra, Sandboxes, Supervised, Supervisor,
};
use super::{
    read_tail, ExitReport, ObservedSandbox, Resources, Runtime, RuntimeError, SandboxHandle,
    SandboxId, StartRequest, Usage, LOG_TAIL_MAX_BYTES, MIB,
};
use crate::template::{Templates, SANDBOX_GID, SANDBOX_UID};

pub mod exec;
pub mod exit;
pub mod ffi;
pub mod host;
pub mod io;
pub mod spawner;
pub mod vm;

use exit::VmmStatus;
pub use host::{search_dirs, unavailable_reason, KrunHost, KRUNFW_FILE, LIBKRUN_FILE};
use spawner::Spawner;

/// Host memory the VMM process needs beyond the guest's (devices, virtio-fs, page tables).
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// How long a VM may take to reach `krun_start_enter`.
pub const START_TIMEOUT_MS: u64 = 30_000;
/// How long after the VMM's exit its waiter may take to record the status.
const EXIT_RECORD_TIMEOUT_MS: u64 = 5_000;
/// How often a VMM this process cannot wait on (not its child) is looked at.
const EXIT_POLL_INTERVAL_MS: u64 = 50;

// ---- settings and records ----

/// Settings of the krun runtime.
#[derive(Clone, Debug)]
pub struct KrunConfig {
    /// VM directories go to `<data_dir>/vms`, templates come from `<data_dir>/templates`.
    pub data_dir: PathBuf,
    /// The program each VM runs in, and its arguments before `--config FILE`
    /// (`surge vm-exec`; tests use a fake).
    pub program: PathBuf,
    pub program_args: Vec<OsString>,
    /// Absolute cgroup path under which every VM's cgroup is made.
    pub cgroup_parent: String,
    pub krunfw: Option<PathBuf>,
    pub libkrun: Option<PathBuf>,
    /// Mount an overlay over the template (the template stays shared and unchanged). Without
    /// it the VM writes into the template directory itself.
    pub overlay: bool,
    /// The guest agent binary on this host (`surge-guest`, built static): copied into each
    /// VM's root and booted as its workload, it runs the command and serves exec and files
    /// (see `io`). `None`: VMs run their command directly and have no exec and files.
    pub agent: Option<PathBuf>,
}

impl KrunConfig {
    /// `surge vm-exec` of the running binary.
    pub fn new(data_dir: impl Into<PathBuf>, host: &KrunHost) -> Result<Self, RuntimeError> {
        let data_dir: PathBuf = data_dir.into();
        let agent = find_agent(&data_dir);
        let program = std::env::current_exe()
            .map_err(|e| RuntimeError::io("find the surge binary to run vm-exec", e))?;
        Ok(Self {
            data_dir,
            program,
            program_args: vec!["vm-exec".into()],
            cgroup_parent: "/surge-vm".to_owned(),
            krunfw: host.krunfw.clone(),
            libkrun: host.libkrun.clone().ok().flatten(),
            overlay: true,
            agent,
        })
    }
}

/// The file name of the guest agent binary.
pub const AGENT_FILE: &str = "surge-guest";

/// Where the guest agent is looked for: the same places as libkrun (next to `surge` first).
fn find_agent(data_dir: &Path) -> Option<PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let home = std::env::var_os("HOME").map(PathBuf::from);
    search_dirs(data_dir, exe_dir.as_deref(), home.as_deref())
        .into_iter()
        .map(|d| d.join(AGENT_FILE))
        .find(|p| p.is_file())
}

/// The krun runtime's fields of a VM's record (`state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    /// What the guest booted with: the ceiling for resizes.
    vcpus: u8,
    ram_mib: u32,
    pid: u32,
    start_ticks: u64,
}

impl RecordExtra for VmRecord {
    fn process(&self) -> (u32, u64) {
        (self.pid, self.start_ticks)
    }
    fn set_process(&mut self, pid: u32, start_ticks: u64) {
        self.pid = pid;
        self.start_ticks = start_ticks;
    }
}

type Vm = Supervised<KrunRuntime>;

/// Copy the guest agent into the VM's root at `vm::GUEST_AGENT_PATH` (root-owned, 0755).
fn install_agent(agent: &Path, root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dest = root.join(vm::GUEST_AGENT_PATH.trim_start_matches('/'));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("tmp");
    std::fs::copy(agent, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dest)
}

/// The VM's cgroup (one directory on v2, one per controller hierarchy on v1).
fn vm_cgroup(layout: &CgroupLayout, parent: &str, id: SandboxId) -> Cgroup {
    layout.cgroup(&CgroupLayout::child(
        parent,
        &format!("surge-vm-{}-{}", id.job, id.index),
    ))
}

/// The host-side limits of a VM: the sandbox's memory plus the VMM's own.
fn set_vm_limits(cgroup: &Cgroup, r: Resources) -> Result<(), RuntimeError> {
    cgroup.set_limits((r.memory_mib + VMM_OVERHEAD_MIB) * MIB, r.cpu_millis)
}

/// Send `sig` to the VMM through a pidfd, so a recycled pid is never signalled.
fn signal(vm: &Vm, sig: i32) -> Result<(), RuntimeError> {
    let (pid, ticks) = vm.record().extra.process();
    let pidfd =
        pidfd_open(pid).map_err(|e| RuntimeError::io(format!("pidfd of VM {}", vm.id), e))?;
    if process_start_ticks(pid) != Some(ticks) {
        return Err(RuntimeError::NotFound {
            id: vm.id,
            runtime: "krun",
        });
    }
    // SAFETY: pidfd_send_signal takes an open pidfd (`pidfd` lives until after the call), a
    // signal number, a null siginfo (allowed: the kernel then fills in a default) and flags 0;
    // no memory of ours is read or written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(RuntimeError::io(
            format!("signal {sig} to VM {}", vm.id),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

// ---- the runtime ----

/// See the module docs.
pub struct KrunRuntime {
    config: KrunConfig,
    layout: CgroupLayout,
    templates: Templates,
    spawner: Spawner,
    vms: Sandboxes<KrunRuntime>,
    agents: io::AgentClients,
}

impl Supervisor for KrunRuntime {
    type Extra = VmRecord;
    type Cgroup = Cgroup;
    const RUNTIME: &'static str = "krun";
    const NOUN: &'static str = "VM";
    const RECORD_FILE: &'static str = "state.json";
    const STDOUT_LOG: &'static str = "console.log";
    const STDERR_LOG: &'static str = "vmexec.log";
    const START_TIMEOUT_MS: u64 = START_TIMEOUT_MS;
    const START_POLL_MAX_MS: u64 = 5;

    fn cgroup(&self, record: &Record<VmRecord>) -> Cgroup {
        vm_cgroup(&self.layout, &self.config.cgroup_parent, record.id)
    }

    fn readopt(&self, vm: &Arc<Vm>) {
        Self::watch_exit(vm);
    }

    fn started_pid(vm: &Vm) -> Option<u32> {
        vm.file("entered")
            .exists()
            .then(|| vm.record().extra.process().0)
    }

    async fn verdict(&self, vm: &Vm) -> Result<Final, RuntimeError> {
        if let Some(mut rx) = vm.watcher() {
            let recorded = rx.wait_for(|done| *done);
            let _ =
                tokio::time::timeout(Duration::from_millis(EXIT_RECORD_TIMEOUT_MS), recorded).await;
        }
        let status = read_json::<VmmStatus>(&vm.file("exit.json")).unwrap_or(VmmStatus::Unknown);
        let console = read_tail(&vm.file("console.log"), LOG_TAIL_MAX_BYTES)?;
        let setup_error = std::fs::read_to_string(vm.file("setup-error")).ok();
        let (state, code) = exit::classify(
            status,
            &console,
            setup_error.as_deref(),
            vm.cgroup.oom_killed(),
        );
        Ok(Final { state, code })
    }
}

impl KrunRuntime {
    pub fn new(config: KrunConfig) -> Result<Self, RuntimeError> {
        Self::with_layout(config, CgroupLayout::detect()?)
    }

    pub fn with_layout(config: KrunConfig, layout: CgroupLayout) -> Result<Self, RuntimeError> {
        if !config.data_dir.is_absolute() {
            return Err(RuntimeError::io(
                format!("data dir {}", config.data_dir.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "must be absolute"),
            ));
        }
        Ok(Self {
            templates: Templates::new(&config.data_dir),
            vms: Sandboxes::new(config.data_dir.join("vms"))?,
            config,
            layout,
            spawner: Spawner::new()?,
            agents: io::AgentClients::default(),
        })
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    fn get(&self, id: SandboxId) -> Result<Arc<Vm>, RuntimeError> {
        self.vms.get(self, id)
    }

    /// Start the thread that reaps the VMM and records its status (once per VM and process).
    fn watch_exit(vm: &Arc<Vm>) {
        let mut slot = lock(&vm.watcher);
        if slot.is_none() {
            *slot =
                spawner::spawn_waiter(vm.id, vm.record().extra.process().0, vm.file("exit.json"));
        }
    }

    /// VM directory, root filesystem, vm.json, cgroup, state.json.
    fn prepare(&self, req: &StartRequest, dir: &Path) -> Result<Record<VmRecord>, RuntimeError> {
        let ctx = |what: &str| format!("sandbox {}: {what}", req.id);
        let template = template_dir(&self.templates, &req.spec.template)?;
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(ctx("create the VM dir"), e))?;
        let root = if self.config.overlay {
            for d in ["upper", "ovl-work", "rootfs"] {
                std::fs::create_dir_all(dir.join(d))
                    .map_err(|e| RuntimeError::io(ctx("create the VM dir"), e))?;
            }
            mount_overlay(
                &template,
                &dir.join("upper"),
                &dir.join("ovl-work"),
                &dir.join("rootfs"),
            )
            .map_err(|e| RuntimeError::io(ctx("mount the overlay root"), e))?;
            dir.join("rootfs")
        } else {
            template
        };
        if let Some(agent) = &self.config.agent {
            install_agent(agent, &root).map_err(|e| {
                RuntimeError::io(
                    ctx(&format!("install the guest agent {}", agent.display())),
                    e,
                )
            })?;
        }
        let cfg = vm::build(&vm::VmParams {
            id: req.id,
            spec: &req.spec,
            cpu_millis: req.resources.cpu_millis,
            memory_mib: req.resources.memory_mib,
            root: &root,
            dir,
            krunfw: self.config.krunfw.as_deref(),
            libkrun: self.config.libkrun.as_deref(),
            agent: self
                .config
                .agent
                .as_ref()
                .map(|_| (SANDBOX_UID, SANDBOX_GID)),
        })
        .map_err(|e| RuntimeError::StartFailed {
            id: req.id,
            reason: e.to_string(),
            stderr_tail: String::new(),
        })?;
        write_json_atomic(&dir.join("vm.json"), &cfg)?;
        let cgroup = vm_cgroup(&self.layout, &self.config.cgroup_parent, req.id);
        cgroup.create()?;
        set_vm_limits(&cgroup, req.resources)?;
        let record = Record {
            id: req.id,
            generation: req.generation,
            revision: req.revision,
            resources: req.resources,
            spec: req.spec.clone(),
            paused: false,
            extra: VmRecord {
                vcpus: cfg.vcpus,
                ram_mib: cfg.ram_mib,
                pid: 0,
                start_ticks: 0,
            },
        };
        write_json_atomic(&dir.join("state.json"), &record)?;
        Ok(record)
    }

    fn command(&self, vm: &Vm) -> Result<std::process::Command, RuntimeError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.file("vmexec.log"))
            .map_err(|e| RuntimeError::io(format!("open vmexec.log of VM {}", vm.id), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| RuntimeError::io("dup vmexec.log", e))?;
        let mut cmd = std::process::Command::new(&self.config.program);
        cmd.args(&self.config.program_args)
            .arg("--config")
            .arg(vm.file("vm.json"))
            .current_dir(&vm.dir)
            // vm-exec's own environment is explicit too: nothing of the daemon's leaks through.
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOSTNAME", format!("sb-{}-{}", vm.id.job, vm.id.index))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(dir) = self.config.krunfw.as_deref().and_then(Path::parent) {
            cmd.env("LD_LIBRARY_PATH", dir);
        }
        let procs: Vec<CString> = vm
            .cgroup
            .dirs()
            .iter()
            .map(|d| cstring(&d.join("cgroup.procs")))
            .collect::<std::io::Result<_>>()
            .map_err(|e| RuntimeError::io("cgroup path", e))?;
        spawner::supervise_child(&mut cmd, procs);
        Ok(cmd)
    }

    /// Wait until the VMM process is gone (its waiter has recorded it).
    async fn wait_exit(&self, vm: &Vm) {
        match vm.watcher() {
            Some(mut rx) => {
                let _ = rx.wait_for(|done| *done).await;
            }
            None => {
                while vm.alive() {
                    tokio::time::sleep(Duration::from_millis(EXIT_POLL_INTERVAL_MS)).await;
                }
            }
        }
    }
}
impl Runtime for KrunRuntime {
    fn name(&self) -> &'static str {
        "krun"
    }

    fn checkpoint_support(&self) -> Result<(), String> {
        Err("krun microVMs cannot be checkpointed: libkrun has no snapshot API and CRIU cannot dump a KVM process (plain `surge pause` works)".to_owned())
    }

    async fn start(&self, req: StartRequest) -> Result<SandboxHandle, RuntimeError> {
        let dir = self.vms.begin_start(self, req.id)?;
        let record = match self.prepare(&req, &dir) {
            Ok(r) => r,
            Err(e) => {
                unmount(&dir.join("rootfs"));
                let _ = std::fs::remove_dir_all(&dir);
                vm_cgroup(&self.layout, &self.config.cgroup_parent, req.id).remove();
                return Err(e);
            }
        };
        let vm = self.vms.insert(self, record);
        let cmd = self.command(&vm)?;
        let pid = self
            .spawner
            .spawn(cmd)
            .await
            .map_err(|e| RuntimeError::StartFailed {
                id: req.id,
                reason: format!("cannot run {}: {e}", self.config.program.display()),
                stderr_tail: String::new(),
            })?;
        let ticks = process_start_ticks(pid).unwrap_or(0);
        vm.update(|r| r.extra.set_process(pid, ticks))?;
        Self::watch_exit(&vm);
        let pid = self.vms.await_started(self, &vm).await?;
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: Some(pid),
        })
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let vm = self.get(id)?;
        if self.vms.state_of(self, &vm).await?.is_terminal() {
            return self.vms.report(self, &vm).await;
        }
        if vm.record().paused {
            // A stopped process keeps SIGTERM pending until it continues.
            let _ = signal(&vm, libc::SIGCONT);
            vm.update(|r| r.paused = false)?;
        }
        if let Err(e) = signal(&vm, libc::SIGTERM) {
            tracing::debug!(sandbox = %id, error = %e, "SIGTERM not delivered (already exiting?)");
        }
        if tokio::time::timeout(grace, self.wait_exit(&vm))
            .await
            .is_err()
        {
            tracing::info!(sandbox = %id, grace_ms = grace.as_millis(), "VM ignored SIGTERM; killing it");
            if let Err(e) = signal(&vm, libc::SIGKILL) {
                tracing::debug!(sandbox = %id, error = %e, "SIGKILL not delivered (already gone?)");
            }
            tokio::time::timeout(
                Duration::from_millis(EXIT_RECORD_TIMEOUT_MS),
                self.wait_exit(&vm),
            )
            .await
            .map_err(|_| RuntimeError::Timeout {
                what: format!("SIGKILL of VM {id}"),
                after_ms: EXIT_RECORD_TIMEOUT_MS,
            })?;
        }
        self.vms.report(self, &vm).await
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.vms.live(self, id, "pause").await?;
        if vm.record().paused {
            return Ok(());
        }
        signal(&vm, libc::SIGSTOP)?;
        vm.update(|r| r.paused = true)
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.vms.live(self, id, "resume").await?;
        if !vm.record().paused {
            return Ok(());
        }
        signal(&vm, libc::SIGCONT)?;
        vm.update(|r| r.paused = false)
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        let vm = self.vms.live(self, id, "resize").await?;
        let r = vm.record();
        let (vcpus, ram_mib) = (r.extra.vcpus, r.extra.ram_mib);
        let reject = |reason: String| RuntimeError::ResizeRejected {
            id,
            resources,
            reason,
        };
        if resources.memory_mib > u64::from(ram_mib) || resources.memory_mib == 0 {
            return Err(reject(format!(
                "the VM booted with {} MiB of RAM; a microVM's memory can move between 1 and that without a restart",
                ram_mib
            )));
        }
        if resources.cpu_millis > u64::from(vcpus) * 1000 || resources.cpu_millis == 0 {
            return Err(reject(format!(
                "the VM booted with {} vCPUs; its CPU limit can move up to {} millicores without a restart",
                vcpus,
                u64::from(vcpus) * 1000
            )));
        }
        if r.resources != resources {
            set_vm_limits(&vm.cgroup, resources).map_err(|e| {
                reject(format!(
                    "{e} (a memory limit below current usage is refused by the kernel)"
                ))
            })?;
        }
        vm.update(|r| {
            r.resources = resources;
            r.revision = revision;
        })
    }

    async fn status(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        let vm = self.get(id)?;
        let state = self.vms.state_of(self, &vm).await?;
        Ok(vm.observed(state))
    }

    async fn wait(&self, id: SandboxId) -> Result<ExitReport, RuntimeError> {
        let vm = self.get(id)?;
        if !self.vms.state_of(self, &vm).await?.is_terminal() {
            self.wait_exit(&vm).await;
        }
        self.vms.report(self, &vm).await
    }

    async fn usage(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
        let vm = self.get(id)?;
        let u = vm.cgroup.usage().ok_or(RuntimeError::NotFound {
            id,
            runtime: "krun",
        })?;
        // The VMM's own overhead is not the sandbox's: report against the sandbox's limit.
        let overhead = VMM_OVERHEAD_MIB * MIB;
        Ok(Usage {
            memory_bytes: u.working_set_bytes.saturating_sub(overhead),
            memory_limit_bytes: u
                .limit_bytes
                .map_or(u64::MAX, |l| l.saturating_sub(overhead)),
            cpu_usage_ns: u.cpu_usage_ns,
        })
    }

    async fn list(&self) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        self.vms.list(self).await
    }

    async fn remove(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.vms.ended(self, id).await?;
        self.agents.forget(id);
        unmount(&vm.file("rootfs"));
        vm.cgroup.remove();
        self.vms.delete(&vm)
    }
}

#[cfg(test)]
mod tests;
