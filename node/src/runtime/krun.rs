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
//!   final.json  how it ended, fixed once observed
//! ```

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::container::{cpu_quota_us, parse_keyed, parse_limit, CgroupLayout, CPU_PERIOD_US};
use super::sandbox_dir::{
    clear_debris, cstring, lock, mount_overlay, process_start_ticks, read_json, sandbox_ids,
    template_dir, unmount, write_json_atomic, Final,
};
use super::{
    read_tail, ExitReport, ObservedSandbox, ObservedState, Resources, Runtime, RuntimeError,
    SandboxHandle, SandboxId, SandboxSpec, StartRequest, Usage, LOG_TAIL_MAX_BYTES, MIB,
};
use crate::detect::Virtualization;
use crate::template::Templates;

pub mod exec;
pub mod exit;
pub mod ffi;
pub mod vm;

use exit::VmmStatus;

/// The guest kernel library libkrun loads (by this soname).
pub const KRUNFW_FILE: &str = "libkrunfw.so.5";
/// The VMM library.
pub const LIBKRUN_FILE: &str = "libkrun.so.1";
/// Host memory the VMM process needs beyond the guest's (devices, virtio-fs, page tables).
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// How long a VM may take to reach `krun_start_enter`.
pub const START_TIMEOUT_MS: u64 = 30_000;
/// How long after the VMM's exit its waiter may take to record the status.
const EXIT_RECORD_TIMEOUT_MS: u64 = 5_000;
/// How long a waiter that could not reap the VMM leaves its parent to record the status.
const UNKNOWN_STATUS_GRACE_MS: u64 = 200;
/// Spawn requests queued for the spawner thread.
const SPAWN_QUEUE_MAX: usize = 64;

// ---- finding libkrun and libkrunfw ----

/// Where the krun pieces are looked for, in order: next to the `surge` binary (where
/// `scripts/setup-krun` can put them), the daemon's data dir, the setup script's default
/// (`~/.cache/surge/krun`), then the system library directories.
pub fn search_dirs(data_dir: &Path, exe_dir: Option<&Path>, home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(exe_dir.map(Path::to_path_buf));
    dirs.push(data_dir.join("krun"));
    dirs.extend(home.map(|h| h.join(".cache/surge/krun")));
    for d in [
        "/usr/local/lib",
        "/usr/local/lib64",
        "/usr/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// What this host has for microVMs, found once at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KrunHost {
    /// `libkrunfw.so.5`, the guest kernel.
    pub krunfw: Option<PathBuf>,
    /// `Ok(Some(path))`: libkrun found at a path; `Ok(None)`: loadable by soname; `Err`: why not.
    pub libkrun: Result<Option<PathBuf>, String>,
}

impl KrunHost {
    /// Look in [`search_dirs`]; libkrun not found there is tried by soname with `dlopen`.
    pub fn probe(data_dir: &Path) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dirs = search_dirs(data_dir, exe_dir.as_deref(), home.as_deref());
        let find = |file: &str| dirs.iter().map(|d| d.join(file)).find(|p| p.is_file());
        let libkrun = match find(LIBKRUN_FILE) {
            Some(p) => Ok(Some(p)),
            None => ffi::DlKrun::load(None).map(|_| None).map_err(|e| {
                format!(
                    "libkrun is not installed (no {LIBKRUN_FILE} in {} or the library path: {e})",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        };
        Self {
            krunfw: find(KRUNFW_FILE),
            libkrun,
        }
    }
}

/// Why this host cannot run microVMs, or `None` when it can. Pure: the runtime selection's
/// decision, in the order an operator fixes things.
pub fn unavailable_reason(virtualization: &Virtualization, host: &KrunHost) -> Option<String> {
    if let Virtualization::Unavailable { reason, note } = virtualization {
        return Some(match note {
            Some(note) => format!("{reason} ({note})"),
            None => reason.clone(),
        });
    }
    if host.krunfw.is_none() {
        return Some(format!(
            "the guest kernel {KRUNFW_FILE} is not installed (run scripts/setup-krun)"
        ));
    }
    if let Err(why) = &host.libkrun {
        return Some(why.clone());
    }
    None
}

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
}

impl KrunConfig {
    /// `surge vm-exec` of the running binary.
    pub fn new(data_dir: impl Into<PathBuf>, host: &KrunHost) -> Result<Self, RuntimeError> {
        let program = std::env::current_exe()
            .map_err(|e| RuntimeError::io("find the surge binary to run vm-exec", e))?;
        Ok(Self {
            data_dir: data_dir.into(),
            program,
            program_args: vec!["vm-exec".into()],
            cgroup_parent: "/surge-vm".to_owned(),
            krunfw: host.krunfw.clone(),
            libkrun: host.libkrun.clone().ok().flatten(),
            overlay: true,
        })
    }
}

/// surge's persistent record of one VM (`state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct VmRecord {
    id: SandboxId,
    generation: u64,
    revision: u64,
    resources: Resources,
    spec: SandboxSpec,
    /// What the guest booted with: the ceiling for resizes.
    vcpus: u8,
    ram_mib: u32,
    pid: u32,
    start_ticks: u64,
    paused: bool,
}

/// The VM's cgroup directories: one on v2, one per controller hierarchy on v1.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VmCgroup {
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    v2: bool,
}

impl VmCgroup {
    fn new(layout: &CgroupLayout, parent: &str, id: SandboxId) -> Self {
        let parent = parent.trim_matches('/');
        let leaf = format!("surge-vm-{}-{}", id.job, id.index);
        match layout {
            CgroupLayout::V2 { root } => {
                let dir = root.join(parent).join(leaf);
                Self {
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: dir,
                    v2: true,
                }
            }
            CgroupLayout::V1 {
                memory,
                cpu,
                cpuacct,
                ..
            } => Self {
                memory: memory.join(parent).join(&leaf),
                cpu: cpu.join(parent).join(&leaf),
                cpuacct: cpuacct.join(parent).join(&leaf),
                v2: false,
            },
        }
    }

    fn dirs(&self) -> Vec<&Path> {
        let mut d: Vec<&Path> = vec![&self.memory, &self.cpu, &self.cpuacct];
        d.dedup();
        d
    }

    fn create(&self) -> Result<(), RuntimeError> {
        if self.v2 {
            // The parent must hand the controllers down (best effort: the root may already).
            let mut up = self.memory.parent();
            let mut chain = Vec::new();
            while let Some(p) = up {
                if !p.join("cgroup.subtree_control").exists() && !chain.is_empty() {
                    break;
                }
                chain.push(p.to_path_buf());
                up = p.parent();
            }
            for p in chain.iter().rev() {
                let _ = std::fs::create_dir_all(p);
                let _ = std::fs::write(p.join("cgroup.subtree_control"), "+memory +cpu");
            }
        }
        for d in self.dirs() {
            std::fs::create_dir_all(d)
                .map_err(|e| RuntimeError::io(format!("create cgroup {}", d.display()), e))?;
        }
        Ok(())
    }

    fn set_limits(&self, r: Resources) -> Result<(), RuntimeError> {
        let memory = (r.memory_mib + VMM_OVERHEAD_MIB) * MIB;
        let quota = cpu_quota_us(r.cpu_millis);
        let write = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                RuntimeError::Cgroup(format!(
                    "write {value} to {}: {e}",
                    dir.join(file).display()
                ))
            })
        };
        if self.v2 {
            write(&self.memory, "memory.max", memory.to_string())?;
            write(&self.cpu, "cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        } else {
            write(&self.memory, "memory.limit_in_bytes", memory.to_string())?;
            write(&self.cpu, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            write(&self.cpu, "cpu.cfs_quota_us", quota.to_string())?;
        }
        Ok(())
    }

    fn oom_killed(&self) -> bool {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.memory.join(file)).unwrap_or_default();
        parse_keyed(&text, "oom_kill").is_some_and(|n| n > 0)
    }

    fn remove(&self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

struct Vm {
    id: SandboxId,
    dir: PathBuf,
    cgroup: VmCgroup,
    record: Mutex<VmRecord>,
    ended: Mutex<Option<Final>>,
    /// Turns `true` when this process's waiter has recorded the VMM's exit in `exit.json`.
    exited: Mutex<Option<watch::Receiver<bool>>>,
}

impl Vm {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn record(&self) -> VmRecord {
        lock(&self.record).clone()
    }

    fn update(&self, f: impl FnOnce(&mut VmRecord)) -> Result<(), RuntimeError> {
        let mut r = lock(&self.record);
        f(&mut r);
        write_json_atomic(&self.file("state.json"), &*r)
    }

    fn alive(&self) -> bool {
        let r = self.record();
        r.pid != 0 && process_start_ticks(r.pid) == Some(r.start_ticks)
    }

    fn observed(&self, state: ObservedState) -> ObservedSandbox {
        let r = self.record();
        ObservedSandbox {
            id: self.id,
            generation: r.generation,
            revision: r.revision,
            state,
            resources: r.resources,
            owned: false,
        }
    }

    /// Send `sig` to the VMM through a pidfd, so a recycled pid is never signalled.
    fn signal(&self, sig: i32) -> Result<(), RuntimeError> {
        let r = self.record();
        let pidfd = pidfd_open(r.pid)
            .map_err(|e| RuntimeError::io(format!("pidfd of VM {}", self.id), e))?;
        if process_start_ticks(r.pid) != Some(r.start_ticks) {
            return Err(RuntimeError::NotFound {
                id: self.id,
                runtime: "krun",
            });
        }
        // SAFETY: pidfd_send_signal takes an open pidfd, a signal number, a null siginfo and
        // flags 0; no memory is shared with the kernel.
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
                format!("signal {sig} to VM {}", self.id),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "fd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Block until `pid` ends; its status when it is this process's child.
fn wait_for_exit(pid: u32) -> VmmStatus {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return VmmStatus::Unknown;
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`, a valid local.
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
        // SAFETY: one valid pollfd, infinite timeout; the pidfd becomes readable at exit.
        while unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {}
    }
    VmmStatus::Unknown
}

/// Forks every VM from one thread that lives as long as the runtime (see the module docs:
/// `PR_SET_PDEATHSIG` follows the forking thread).
struct Spawner {
    tx: std_mpsc::SyncSender<(std::process::Command, oneshot::Sender<std::io::Result<u32>>)>,
}

impl Spawner {
    fn new() -> Result<Self, RuntimeError> {
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

    async fn spawn(&self, cmd: std::process::Command) -> std::io::Result<u32> {
        let (reply, rx) = oneshot::channel();
        let gone = || std::io::Error::other("the krun spawner thread is gone");
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send((cmd, reply)).map_err(|_| gone()))
            .await
            .map_err(|_| gone())??;
        rx.await.map_err(|_| gone())?
    }
}

// ---- the runtime ----

/// See the module docs.
pub struct KrunRuntime {
    config: KrunConfig,
    layout: CgroupLayout,
    templates: Templates,
    spawner: Spawner,
    vms: Mutex<HashMap<SandboxId, Arc<Vm>>>,
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
        let vms = config.data_dir.join("vms");
        std::fs::create_dir_all(&vms)
            .map_err(|e| RuntimeError::io(format!("create {}", vms.display()), e))?;
        Ok(Self {
            templates: Templates::new(&config.data_dir),
            config,
            layout,
            spawner: Spawner::new()?,
            vms: Mutex::new(HashMap::new()),
        })
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    fn vm_dir(&self, id: SandboxId) -> PathBuf {
        self.config.data_dir.join("vms").join(id.to_string())
    }

    fn new_vm(&self, record: VmRecord) -> Vm {
        Vm {
            id: record.id,
            dir: self.vm_dir(record.id),
            cgroup: VmCgroup::new(&self.layout, &self.config.cgroup_parent, record.id),
            record: Mutex::new(record),
            ended: Mutex::new(None),
            exited: Mutex::new(None),
        }
    }

    /// Start the thread that reaps the VMM and records its status.
    fn watch_exit(vm: &Arc<Vm>) {
        let mut slot = lock(&vm.exited);
        if slot.is_some() {
            return;
        }
        let (tx, rx) = watch::channel(false);
        *slot = Some(rx);
        let pid = vm.record().pid;
        let path = vm.file("exit.json");
        let id = vm.id;
        let spawned = std::thread::Builder::new()
            .name(format!("vm-wait-{id}"))
            .spawn(move || {
                let status = wait_for_exit(pid);
                if status == VmmStatus::Unknown {
                    // Not our child: the process that is its parent (another runtime of this
                    // process, or nobody) may still record the real status; never overwrite it.
                    std::thread::sleep(Duration::from_millis(UNKNOWN_STATUS_GRACE_MS));
                    if path.exists() {
                        let _ = tx.send(true);
                        return;
                    }
                }
                if let Err(e) = write_json_atomic(&path, &status) {
                    tracing::warn!(sandbox = %id, error = %e, "cannot record the VM's exit status");
                }
                let _ = tx.send(true);
            });
        if let Err(e) = spawned {
            tracing::warn!(sandbox = %id, error = %e, "cannot start the VM's waiter thread");
            *slot = None;
        }
    }

    /// The in-memory record, loading it from disk (re-adoption) after a daemon restart.
    fn get(&self, id: SandboxId) -> Result<Arc<Vm>, RuntimeError> {
        if let Some(vm) = lock(&self.vms).get(&id) {
            return Ok(vm.clone());
        }
        let path = self.vm_dir(id).join("state.json");
        if !path.is_file() {
            return Err(RuntimeError::NotFound {
                id,
                runtime: "krun",
            });
        }
        let vm = Arc::new(self.new_vm(read_json(&path)?));
        if let Ok(f) = read_json::<Final>(&vm.file("final.json")) {
            *lock(&vm.ended) = Some(f);
        } else if vm.alive() {
            Self::watch_exit(&vm);
        }
        Ok(lock(&self.vms).entry(id).or_insert(vm).clone())
    }

    fn template_dir(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        template_dir(&self.templates, name)
    }

    /// VM directory, root filesystem, vm.json, cgroup, state.json.
    fn prepare(
        &self,
        req: &StartRequest,
        dir: &Path,
    ) -> Result<(VmRecord, vm::VmConfig), RuntimeError> {
        let ctx = |what: &str| format!("sandbox {}: {what}", req.id);
        let template = self.template_dir(&req.spec.template)?;
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
        let cfg = vm::build(&vm::VmParams {
            id: req.id,
            spec: &req.spec,
            cpu_millis: req.resources.cpu_millis,
            memory_mib: req.resources.memory_mib,
            root: &root,
            dir,
            krunfw: self.config.krunfw.as_deref(),
            libkrun: self.config.libkrun.as_deref(),
        })
        .map_err(|e| RuntimeError::StartFailed {
            id: req.id,
            reason: e.to_string(),
            stderr_tail: String::new(),
        })?;
        write_json_atomic(&dir.join("vm.json"), &cfg)?;
        let cgroup = VmCgroup::new(&self.layout, &self.config.cgroup_parent, req.id);
        cgroup.create()?;
        cgroup.set_limits(req.resources)?;
        let record = VmRecord {
            id: req.id,
            generation: req.generation,
            revision: req.revision,
            resources: req.resources,
            spec: req.spec.clone(),
            vcpus: cfg.vcpus,
            ram_mib: cfg.ram_mib,
            pid: 0,
            start_ticks: 0,
            paused: false,
        };
        write_json_atomic(&dir.join("state.json"), &record)?;
        Ok((record, cfg))
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
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe syscalls (setsid, prctl, getppid, open, write, close) on memory
        // prepared before the fork (`procs`).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The daemon may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the daemon died while starting the VM",
                    ));
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
        Ok(cmd)
    }

    /// Fix how a VM ended once its VMM is gone.
    async fn finalize(&self, vm: &Vm) -> Result<Final, RuntimeError> {
        if let Some(f) = lock(&vm.ended).clone() {
            return Ok(f);
        }
        let rx = lock(&vm.exited).clone();
        if let Some(mut rx) = rx {
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
        let f = Final { state, code };
        write_json_atomic(&vm.file("final.json"), &f)?;
        unmount(&vm.file("rootfs"));
        *lock(&vm.ended) = Some(f.clone());
        Ok(f)
    }

    async fn state_of(&self, vm: &Vm) -> Result<ObservedState, RuntimeError> {
        if let Some(f) = lock(&vm.ended).clone() {
            return Ok(f.state);
        }
        if vm.alive() {
            return Ok(match (vm.file("entered").exists(), vm.record().paused) {
                (false, _) => ObservedState::Starting,
                (true, true) => ObservedState::Paused,
                (true, false) => ObservedState::Running,
            });
        }
        Ok(self.finalize(vm).await?.state)
    }

    async fn report(&self, vm: &Vm) -> Result<ExitReport, RuntimeError> {
        let f = self.finalize(vm).await?;
        Ok(ExitReport {
            id: vm.id,
            generation: vm.record().generation,
            state: f.state,
            code: f.code,
            stdout_tail: read_tail(&vm.file("console.log"), LOG_TAIL_MAX_BYTES)?,
            stderr_tail: read_tail(&vm.file("vmexec.log"), LOG_TAIL_MAX_BYTES)?,
        })
    }

    /// Wait until the VMM process is gone (its waiter has recorded it).
    async fn wait_exit(&self, vm: &Vm) {
        let rx = lock(&vm.exited).clone();
        match rx {
            Some(mut rx) => {
                let _ = rx.wait_for(|done| *done).await;
            }
            None => {
                while vm.alive() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn await_entered(&self, vm: &Vm) -> Result<u32, RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        let mut delay = Duration::from_micros(500);
        loop {
            // Entered first: a short command may have run and ended already; that is a
            // successful start whose exit `wait` reports.
            if vm.file("entered").exists() {
                return Ok(vm.record().pid);
            }
            if !vm.alive() {
                if vm.file("entered").exists() {
                    return Ok(vm.record().pid); // entered and ended between the two checks
                }
                let f = self.finalize(vm).await?;
                let reason = match f.state {
                    ObservedState::Failed { reason } => reason,
                    other => format!("the VM ended before it was seen running: {other:?}"),
                };
                return Err(RuntimeError::StartFailed {
                    id: vm.id,
                    reason,
                    stderr_tail: read_tail(&vm.file("vmexec.log"), 4096)?,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    what: format!("start of VM {}", vm.id),
                    after_ms: START_TIMEOUT_MS,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    async fn live(&self, id: SandboxId, operation: &'static str) -> Result<Arc<Vm>, RuntimeError> {
        let vm = self.get(id)?;
        match self.state_of(&vm).await? {
            ObservedState::Running | ObservedState::Paused => Ok(vm),
            state => Err(RuntimeError::WrongState {
                id,
                state,
                operation,
            }),
        }
    }
}

impl Runtime for KrunRuntime {
    fn name(&self) -> &'static str {
        "krun"
    }

    async fn start(&self, req: StartRequest) -> Result<SandboxHandle, RuntimeError> {
        if let Ok(existing) = self.get(req.id) {
            return Err(RuntimeError::AlreadyExists {
                id: req.id,
                generation: existing.record().generation,
            });
        }
        let dir = self.vm_dir(req.id);
        // A directory without state.json: debris of a start that died half-way.
        clear_debris(&dir)?;
        let (record, _cfg) = match self.prepare(&req, &dir) {
            Ok(r) => r,
            Err(e) => {
                unmount(&dir.join("rootfs"));
                let _ = std::fs::remove_dir_all(&dir);
                VmCgroup::new(&self.layout, &self.config.cgroup_parent, req.id).remove();
                return Err(e);
            }
        };
        let vm = Arc::new(self.new_vm(record));
        lock(&self.vms).insert(req.id, vm.clone());
        // From here on the record stays (a failed start is a terminal `Failed` to report).
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
        vm.update(|r| {
            r.pid = pid;
            r.start_ticks = ticks;
        })?;
        Self::watch_exit(&vm);
        let pid = self.await_entered(&vm).await?;
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: Some(pid),
        })
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let vm = self.get(id)?;
        if self.state_of(&vm).await?.is_terminal() {
            return self.report(&vm).await;
        }
        if vm.record().paused {
            // A stopped process keeps SIGTERM pending until it continues.
            let _ = vm.signal(libc::SIGCONT);
            vm.update(|r| r.paused = false)?;
        }
        if let Err(e) = vm.signal(libc::SIGTERM) {
            tracing::debug!(sandbox = %id, error = %e, "SIGTERM not delivered (already exiting?)");
        }
        if tokio::time::timeout(grace, self.wait_exit(&vm))
            .await
            .is_err()
        {
            tracing::info!(sandbox = %id, grace_ms = grace.as_millis(), "VM ignored SIGTERM; killing it");
            if let Err(e) = vm.signal(libc::SIGKILL) {
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
        self.report(&vm).await
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.live(id, "pause").await?;
        if vm.record().paused {
            return Ok(());
        }
        vm.signal(libc::SIGSTOP)?;
        vm.update(|r| r.paused = true)
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.live(id, "resume").await?;
        if !vm.record().paused {
            return Ok(());
        }
        vm.signal(libc::SIGCONT)?;
        vm.update(|r| r.paused = false)
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        let vm = self.live(id, "resize").await?;
        let r = vm.record();
        let reject = |reason: String| RuntimeError::ResizeRejected {
            id,
            resources,
            reason,
        };
        if resources.memory_mib > u64::from(r.ram_mib) || resources.memory_mib == 0 {
            return Err(reject(format!(
                "the VM booted with {} MiB of RAM; a microVM's memory can move between 1 and that without a restart",
                r.ram_mib
            )));
        }
        if resources.cpu_millis > u64::from(r.vcpus) * 1000 || resources.cpu_millis == 0 {
            return Err(reject(format!(
                "the VM booted with {} vCPUs; its CPU limit can move up to {} millicores without a restart",
                r.vcpus,
                u64::from(r.vcpus) * 1000
            )));
        }
        if r.resources != resources {
            vm.cgroup.set_limits(resources).map_err(|e| {
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
        let state = self.state_of(&vm).await?;
        Ok(vm.observed(state))
    }

    async fn wait(&self, id: SandboxId) -> Result<ExitReport, RuntimeError> {
        let vm = self.get(id)?;
        if !self.state_of(&vm).await?.is_terminal() {
            self.wait_exit(&vm).await;
        }
        self.report(&vm).await
    }

    async fn usage(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
        let vm = self.get(id)?;
        let cg = &vm.cgroup;
        let gone = || RuntimeError::NotFound {
            id,
            runtime: "krun",
        };
        let read = |p: PathBuf| std::fs::read_to_string(p).map_err(|_| gone());
        let num = |p: PathBuf| read(p).map(|t| parse_limit(&t));
        let (current, inactive, limit, cpu_ns) = if cg.v2 {
            let stat = read(cg.memory.join("memory.stat"))?;
            let cpu = read(cg.cpu.join("cpu.stat"))?;
            (
                num(cg.memory.join("memory.current"))?.ok_or_else(gone)?,
                parse_keyed(&stat, "inactive_file").unwrap_or(0),
                num(cg.memory.join("memory.max"))?,
                parse_keyed(&cpu, "usage_usec")
                    .unwrap_or(0)
                    .saturating_mul(1000),
            )
        } else {
            let stat = read(cg.memory.join("memory.stat"))?;
            (
                num(cg.memory.join("memory.usage_in_bytes"))?.ok_or_else(gone)?,
                parse_keyed(&stat, "total_inactive_file").unwrap_or(0),
                num(cg.memory.join("memory.limit_in_bytes"))?,
                num(cg.cpuacct.join("cpuacct.usage"))?.unwrap_or(0),
            )
        };
        // The VMM's own overhead is not the sandbox's: report against the sandbox's limit.
        let overhead = VMM_OVERHEAD_MIB * MIB;
        Ok(Usage {
            memory_bytes: current.saturating_sub(inactive).saturating_sub(overhead),
            memory_limit_bytes: limit.map_or(u64::MAX, |l| l.saturating_sub(overhead)),
            cpu_usage_ns: cpu_ns,
        })
    }

    async fn list(&self) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        let dir = self.config.data_dir.join("vms");
        let mut out = Vec::new();
        for id in sandbox_ids(&dir)? {
            match self.get(id) {
                Ok(vm) => {
                    let state = self.state_of(&vm).await?;
                    out.push(vm.observed(state));
                }
                Err(RuntimeError::NotFound { .. }) => {} // debris without state.json; cleared on start
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|o| o.id);
        Ok(out)
    }

    async fn remove(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let vm = self.get(id)?;
        let state = self.state_of(&vm).await?;
        if !state.is_terminal() {
            return Err(RuntimeError::WrongState {
                id,
                state,
                operation: "forget",
            });
        }
        unmount(&vm.file("rootfs"));
        vm.cgroup.remove();
        std::fs::remove_dir_all(&vm.dir)
            .map_err(|e| RuntimeError::io(format!("remove {}", vm.dir.display()), e))?;
        lock(&self.vms).remove(&id);
        Ok(())
    }
}

// ---- mounts ----

#[cfg(test)]
mod tests;
