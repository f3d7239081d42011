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
//! **OOM.** `runtime::guard_memory` grows the limit under pressure. When it cannot, the kernel
//! kills a process; a sandbox that then ends with a non-zero status and OOM evidence is
//! `OomKilled`, never a plain exit.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio::sync::watch;

use super::sandbox_dir::{
    clear_debris, lock, mount_overlay, process_start_ticks, read_json, sandbox_ids, template_dir,
    unmount, write_json_atomic, Final,
};
use super::{
    read_tail, ExitReport, ObservedSandbox, ObservedState, Resources, Runtime, RuntimeError,
    SandboxHandle, SandboxId, SandboxSpec, StartRequest, Usage, LOG_TAIL_MAX_BYTES, MIB,
};
use crate::template::{Templates, SANDBOX_GID, SANDBOX_UID};

/// CFS period used for every sandbox; quota = cpu_millis * period / 1000.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Processes per sandbox (fork bombs stay inside).
pub const PIDS_MAX: u64 = 4096;
/// How long one crun command (other than `run`) may take.
pub const CRUN_COMMAND_TIMEOUT_MS: u64 = 10_000;
/// How long a container may take to come up.
pub const START_TIMEOUT_MS: u64 = 30_000;
/// How long after exit the v1 OOM watcher may take to settle its verdict.
const OOM_VERDICT_TIMEOUT_MS: u64 = 500;

const SHIM_SCRIPT: &str = r#""$1" --root "$2" run --bundle "$3" --pid-file "$3/container.pid" "$4"; echo $? > "$3/exit.code""#;

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
        }
    }
}

// ---- cgroup layout (pure parsing + thin I/O) ----

/// One cgroup filesystem from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    pub v2: bool,
    /// v1 controllers of this hierarchy (`memory`, `cpu`, ...); empty for v2.
    pub controllers: Vec<String>,
}

/// Cgroup filesystems listed in a mountinfo text.
pub fn parse_cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut right = right.split_whitespace();
        let (Some(fstype), Some(_source), Some(options)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        let mount_point = PathBuf::from(mount_point.replace("\\040", " "));
        match fstype {
            "cgroup2" => mounts.push(CgroupMount {
                mount_point,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => {
                let known = [
                    "memory", "cpu", "cpuacct", "freezer", "pids", "cpuset", "blkio", "devices",
                ];
                let controllers = options
                    .split(',')
                    .filter(|o| known.contains(o))
                    .map(str::to_owned)
                    .collect();
                mounts.push(CgroupMount {
                    mount_point,
                    v2: false,
                    controllers,
                });
            }
            _ => {}
        }
    }
    mounts
}

/// Where the controllers surge reads live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    V2 {
        root: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
        /// A v2 mount beside v1 that holds controllers: crun must not see it.
        hide_unified: Option<PathBuf>,
    },
}

impl CgroupLayout {
    /// Decide from the mounts; `unified_controllers` reads `cgroup.controllers` of a v2 mount.
    pub fn from_mounts(
        mounts: &[CgroupMount],
        unified_controllers: impl Fn(&Path) -> String,
    ) -> Result<Self, RuntimeError> {
        let v1 = |name: &str| {
            mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == name))
                .map(|m| m.mount_point.clone())
        };
        let v2 = mounts.iter().find(|m| m.v2).map(|m| m.mount_point.clone());
        match (v1("memory"), v2) {
            (Some(memory), unified) => {
                let cpu = v1("cpu").ok_or_else(|| RuntimeError::Cgroup("v1 cpu controller is not mounted".into()))?;
                let cpuacct = v1("cpuacct").unwrap_or_else(|| cpu.clone());
                let hide_unified = unified.filter(|u| !unified_controllers(u).trim().is_empty());
                Ok(Self::V1 { memory, cpu, cpuacct, hide_unified })
            }
            (None, Some(root)) => Ok(Self::V2 { root }),
            (None, None) => Err(RuntimeError::Cgroup(
                "no cgroup filesystem with the memory controller is mounted; mount cgroup2 on /sys/fs/cgroup".into(),
            )),
        }
    }

    pub fn detect() -> Result<Self, RuntimeError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| RuntimeError::io("read /proc/self/mountinfo", e))?;
        Self::from_mounts(&parse_cgroup_mounts(&mountinfo), |p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
        })
    }
}

/// A sandbox's cgroup directories.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SandboxCgroup {
    /// `cgroupsPath` given to crun.
    crun_path: String,
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    /// Directory surge owns (v2 parent holding hierarchical events; v1 none).
    owned: Option<PathBuf>,
    v2: bool,
}

impl SandboxCgroup {
    fn new(layout: &CgroupLayout, parent: &str, cid: &str) -> Self {
        let parent = parent.trim_matches('/');
        match layout {
            CgroupLayout::V2 { root } => {
                let owned = root.join(parent).join(cid);
                let leaf = owned.join("ctr");
                Self {
                    crun_path: format!("/{parent}/{cid}/ctr"),
                    memory: leaf.clone(),
                    cpu: leaf.clone(),
                    cpuacct: leaf,
                    owned: Some(owned),
                    v2: true,
                }
            }
            CgroupLayout::V1 {
                memory,
                cpu,
                cpuacct,
                ..
            } => Self {
                crun_path: format!("/{parent}/{cid}"),
                memory: memory.join(parent).join(cid),
                cpu: cpu.join(parent).join(cid),
                cpuacct: cpuacct.join(parent).join(cid),
                owned: None,
                v2: false,
            },
        }
    }
}

/// Value of `key` in a flat keyed file (`memory.stat`, `memory.events`, `cpu.stat`).
pub fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

/// A limit file: a number, or `max` (v2) / a huge v1 number for no limit.
pub fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|v| *v < (1 << 62))
}

/// Start time (clock ticks since boot, field 22) of a `/proc/PID/stat` line; `None` for a zombie
/// or dead process, which for our purposes has exited.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| parse_limit(&t))
}

// ---- the OCI spec ----

/// Inputs of [`oci_config`].
#[derive(Clone, Debug)]
pub struct OciParams<'a> {
    pub id: SandboxId,
    pub spec: &'a SandboxSpec,
    pub resources: Resources,
    pub cgroups_path: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub tmp_size_mib: u64,
}

/// crun's `cpu.shares` from millicores (1024 per CPU, at least 2).
pub fn cpu_shares(cpu_millis: u64) -> u64 {
    (cpu_millis * 1024 / 1000).max(2)
}

/// CFS quota for `cpu_millis` over [`CPU_PERIOD_US`] (at least 1 ms).
pub fn cpu_quota_us(cpu_millis: u64) -> u64 {
    (cpu_millis * CPU_PERIOD_US / 1000).max(1000)
}

/// The OCI runtime spec of one sandbox. Env names must be non-empty and free of `=`.
pub fn oci_config(p: &OciParams<'_>) -> Result<serde_json::Value, String> {
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/work".to_owned(),
        format!("SURGE_SANDBOX_ID={}", p.id),
    ];
    for (k, v) in &p.spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!(
                "environment variable name `{k}` is invalid (empty, or contains `=` or NUL)"
            ));
        }
        env.push(format!("{k}={v}"));
    }
    let args = if p.spec.command.is_empty() {
        vec!["/bin/sh".to_owned()]
    } else {
        p.spec.command.clone()
    };
    if args.iter().any(|a| a.contains('\0')) {
        return Err("command contains a NUL byte".to_owned());
    }
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    Ok(json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": { "uid": p.uid, "gid": p.gid },
            "args": args,
            "env": env,
            "cwd": "/work",
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": [] },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": format!("sb-{}-{}", p.id.job, p.id.index),
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", p.tmp_size_mib)] }
        ],
        "linux": {
            "cgroupsPath": p.cgroups_path,
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": p.resources.memory_mib * MIB },
                "cpu": {
                    "shares": cpu_shares(p.resources.cpu_millis),
                    "quota": cpu_quota_us(p.resources.cpu_millis),
                    "period": CPU_PERIOD_US
                },
                "pids": { "limit": PIDS_MAX }
            },
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }, { "type": "cgroup" }
            ],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    }))
}

// ---- per-sandbox record ----

/// surge's persistent record of one sandbox (`meta.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    id: SandboxId,
    generation: u64,
    revision: u64,
    resources: Resources,
    spec: SandboxSpec,
    shim_pid: u32,
    shim_start_ticks: u64,
    paused: bool,
    /// The cgroup parent the sandbox was started under (absent in records of older surge:
    /// the configured parent then). Kept so a daemon restarted with another parent still finds
    /// the cgroups of the sandboxes it re-adopts.
    #[serde(default)]
    cgroup_parent: Option<String>,
}

struct Sandbox {
    id: SandboxId,
    cid: String,
    bundle: PathBuf,
    cgroup: SandboxCgroup,
    meta: Mutex<Meta>,
    ended: Mutex<Option<Final>>,
    /// v1 only: becomes `true` when the OOM watcher has its verdict.
    oom_watch: Mutex<Option<watch::Receiver<bool>>>,
}

impl Sandbox {
    fn file(&self, name: &str) -> PathBuf {
        self.bundle.join(name)
    }

    fn meta(&self) -> Meta {
        lock(&self.meta).clone()
    }

    fn save_meta(&self, meta: &Meta) -> Result<(), RuntimeError> {
        write_json_atomic(&self.file("meta.json"), meta)
    }

    fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<(), RuntimeError> {
        let mut meta = lock(&self.meta);
        f(&mut meta);
        self.save_meta(&meta)
    }

    fn shim_alive(&self) -> bool {
        let meta = self.meta();
        meta.shim_pid != 0 && process_start_ticks(meta.shim_pid) == Some(meta.shim_start_ticks)
    }

    fn exit_code(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.file("exit.code")).ok()?;
        // The shim writes "N\n" in one write; without the newline it is still being written.
        text.strip_suffix('\n')?.trim().parse().ok()
    }

    fn container_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.file("container.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn observed(&self, state: ObservedState) -> ObservedSandbox {
        let meta = self.meta();
        ObservedSandbox {
            id: self.id,
            generation: meta.generation,
            revision: meta.revision,
            state,
            resources: meta.resources,
            owned: false,
        }
    }
}

/// crun container id of a sandbox.
pub fn container_id(id: SandboxId) -> String {
    format!("surge-{}-{}", id.job, id.index)
}

// ---- the runtime ----

/// See the module docs.
pub struct ContainerRuntime {
    config: ContainerConfig,
    layout: CgroupLayout,
    templates: Templates,
    /// For crun's private mount namespace on hybrid hosts (prepared before any fork).
    hide_unified: Option<CString>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
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
        let status = std::process::Command::new(&config.crun)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err(RuntimeError::Command {
                command: format!("{} --version", config.crun.display()),
                status: "not runnable".into(),
                stderr: "crun is required for the container runtime: apt-get install -y crun"
                    .into(),
            });
        }
        for dir in ["sandboxes", "crun"] {
            let path = config.data_dir.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|e| RuntimeError::io(format!("create {}", path.display()), e))?;
        }
        let hide_unified = match &layout {
            CgroupLayout::V1 {
                hide_unified: Some(p),
                ..
            } => Some(CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                RuntimeError::Cgroup(format!("cgroup mount path {} contains NUL", p.display()))
            })?),
            _ => None,
        };
        Ok(Self {
            templates: Templates::new(&config.data_dir),
            config,
            layout,
            hide_unified,
            sandboxes: Mutex::new(HashMap::new()),
        })
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    fn bundle_dir(&self, id: SandboxId) -> PathBuf {
        self.config.data_dir.join("sandboxes").join(id.to_string())
    }

    fn crun_root(&self) -> PathBuf {
        self.config.data_dir.join("crun")
    }

    fn new_sandbox(&self, meta: Meta) -> Sandbox {
        let cid = container_id(meta.id);
        Sandbox {
            id: meta.id,
            cgroup: SandboxCgroup::new(
                &self.layout,
                meta.cgroup_parent
                    .as_deref()
                    .unwrap_or(&self.config.cgroup_parent),
                &cid,
            ),
            cid,
            bundle: self.bundle_dir(meta.id),
            meta: Mutex::new(meta),
            ended: Mutex::new(None),
            oom_watch: Mutex::new(None),
        }
    }

    /// The in-memory record, loading it from disk after a daemon restart.
    fn get(&self, id: SandboxId) -> Result<Arc<Sandbox>, RuntimeError> {
        if let Some(sb) = lock(&self.sandboxes).get(&id) {
            return Ok(sb.clone());
        }
        let meta_path = self.bundle_dir(id).join("meta.json");
        if !meta_path.is_file() {
            return Err(RuntimeError::NotFound {
                id,
                runtime: "container",
            });
        }
        let meta: Meta = read_json(&meta_path)?;
        let sb = Arc::new(self.new_sandbox(meta));
        if let Ok(f) = read_json::<Final>(&sb.file("final.json")) {
            *lock(&sb.ended) = Some(f);
        } else if sb.shim_alive() && sb.container_pid().is_some() {
            self.watch_oom(&sb); // re-adoption: watch again what we watched before the restart
        }
        Ok(lock(&self.sandboxes).entry(id).or_insert(sb).clone())
    }

    /// A crun command in the right cgroup view; `setsid` for the long-lived shim.
    fn command(&self, program: &OsStr, setsid: bool) -> Command {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null()).kill_on_drop(false);
        let hide = self.hide_unified.clone();
        if hide.is_none() && !setsid {
            return cmd;
        }
        let root = c"/";
        // SAFETY: the closure runs in the forked child before exec. It only makes raw syscalls
        // (setsid, unshare, mount, umount2), which are async-signal-safe, and touches no memory
        // allocated after the fork: `hide` was built before. Failures are reported as io errors.
        unsafe {
            cmd.pre_exec(move || {
                if setsid && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(unified) = &hide {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let flags = libc::MS_REC | libc::MS_PRIVATE;
                    if libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::umount2(unified.as_ptr(), libc::MNT_DETACH) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Run `crun --root R <args>` to completion.
    async fn crun(&self, args: &[&OsStr]) -> Result<String, RuntimeError> {
        let mut cmd = self.command(self.config.crun.as_os_str(), false);
        cmd.arg("--root")
            .arg(self.crun_root())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!(
            "crun {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out =
            tokio::time::timeout(Duration::from_millis(CRUN_COMMAND_TIMEOUT_MS), cmd.output())
                .await
                .map_err(|_| RuntimeError::Timeout {
                    what: command.clone(),
                    after_ms: CRUN_COMMAND_TIMEOUT_MS,
                })?
                .map_err(|e| RuntimeError::io(format!("run {command}"), e))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(RuntimeError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn template_dir(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        template_dir(&self.templates, name)
    }

    /// Bundle directory, overlay root, config.json, meta.json.
    fn prepare_bundle(&self, req: &StartRequest, bundle: &Path) -> Result<Meta, RuntimeError> {
        let ctx = |what: &str| format!("sandbox {}: {what}", req.id);
        let template = self.template_dir(&req.spec.template)?;
        for dir in ["", "upper", "ovl-work", "rootfs"] {
            std::fs::create_dir_all(bundle.join(dir))
                .map_err(|e| RuntimeError::io(ctx("create bundle"), e))?;
        }
        // /work is the sandbox user's: writable, and visible from the host in upper/work.
        let work = bundle.join("upper/work");
        std::fs::create_dir_all(&work).map_err(|e| RuntimeError::io(ctx("create /work"), e))?;
        std::os::unix::fs::chown(
            &work,
            Some(self.config.sandbox_uid),
            Some(self.config.sandbox_gid),
        )
        .map_err(|e| RuntimeError::io(ctx("chown /work"), e))?;
        mount_overlay(&template, &bundle.join("upper"), &bundle.join("ovl-work"), &bundle.join("rootfs"))
            .map_err(|e| RuntimeError::io(ctx("mount the overlay root (is the data dir on a filesystem overlayfs accepts as upper, e.g. ext4 or xfs?)"), e))?;
        let cgroup = SandboxCgroup::new(
            &self.layout,
            &self.config.cgroup_parent,
            &container_id(req.id),
        );
        if let Some(owned) = &cgroup.owned {
            std::fs::create_dir_all(owned)
                .map_err(|e| RuntimeError::io(ctx("create cgroup"), e))?;
        }
        let config = oci_config(&OciParams {
            id: req.id,
            spec: &req.spec,
            resources: req.resources,
            cgroups_path: &cgroup.crun_path,
            uid: self.config.sandbox_uid,
            gid: self.config.sandbox_gid,
            tmp_size_mib: self.config.tmp_size_mib,
        })
        .map_err(|reason| RuntimeError::StartFailed {
            id: req.id,
            reason,
            stderr_tail: String::new(),
        })?;
        write_json_atomic(&bundle.join("config.json"), &config)?;
        let meta = Meta {
            id: req.id,
            generation: req.generation,
            revision: req.revision,
            resources: req.resources,
            spec: req.spec.clone(),
            shim_pid: 0,
            shim_start_ticks: 0,
            paused: false,
            cgroup_parent: Some(self.config.cgroup_parent.clone()),
        };
        write_json_atomic(&bundle.join("meta.json"), &meta)?;
        Ok(meta)
    }

    fn spawn_shim(&self, sb: &Sandbox) -> Result<(), RuntimeError> {
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(sb.file(name))
                .map_err(|e| RuntimeError::io(format!("open {name} of sandbox {}", sb.id), e))
        };
        let mut cmd = self.command(OsStr::new("/bin/sh"), true);
        cmd.arg("-c")
            .arg(SHIM_SCRIPT)
            .arg(format!("surge-shim-{}", sb.id))
            .arg(&self.config.crun)
            .arg(self.crun_root())
            .arg(&sb.bundle)
            .arg(&sb.cid)
            .current_dir(&sb.bundle)
            .stdout(open("stdout.log")?)
            .stderr(open("stderr.log")?);
        // The child is not awaited: tokio reaps it when it exits; the daemon follows it by pidfd.
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::io(format!("spawn the shim of sandbox {}", sb.id), e))?;
        let pid = child.id().ok_or_else(|| RuntimeError::StartFailed {
            id: sb.id,
            reason: "the shim exited before its pid was known".into(),
            stderr_tail: String::new(),
        })?;
        drop(child);
        let ticks = process_start_ticks(pid).unwrap_or(0);
        sb.update_meta(|m| {
            m.shim_pid = pid;
            m.shim_start_ticks = ticks;
        })
    }

    /// v1: watch `memory.oom_control` through an eventfd (see the module docs).
    fn watch_oom(&self, sb: &Arc<Sandbox>) {
        if sb.cgroup.v2 {
            return;
        }
        let mut slot = lock(&sb.oom_watch);
        if slot.is_some() {
            return;
        }
        match register_v1_oom_eventfd(&sb.cgroup.memory) {
            Ok(efd) => {
                let (tx, rx) = watch::channel(false);
                *slot = Some(rx);
                let memcg = sb.cgroup.memory.clone();
                let marker = sb.file("oom");
                let id = sb.id;
                tokio::spawn(async move {
                    if let Err(e) = watch_v1_oom(efd, &memcg, &marker).await {
                        tracing::warn!(sandbox = %id, error = %e, "OOM watcher failed; OOM kills may be reported as exits");
                    }
                    let _ = tx.send(true);
                });
            }
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, error = %e, "cannot watch memory.oom_control")
            }
        }
    }

    /// Whether the kernel OOM-killed something in the sandbox.
    async fn oom_evidence(&self, sb: &Sandbox) -> bool {
        if let Some(owned) = &sb.cgroup.owned {
            let events = std::fs::read_to_string(owned.join("memory.events")).unwrap_or_default();
            return parse_keyed(&events, "oom_kill").is_some_and(|n| n > 0);
        }
        let rx = lock(&sb.oom_watch).clone();
        if let Some(mut rx) = rx {
            let settled = rx.wait_for(|done| *done);
            let _ =
                tokio::time::timeout(Duration::from_millis(OOM_VERDICT_TIMEOUT_MS + 500), settled)
                    .await;
        }
        sb.file("oom").exists()
    }

    /// Fix how a sandbox ended once its shim is gone.
    async fn finalize(&self, sb: &Sandbox) -> Result<Final, RuntimeError> {
        if let Some(f) = lock(&sb.ended).clone() {
            return Ok(f);
        }
        let code = sb.exit_code();
        // OOM evidence only matters for a failed exit: a sandbox that recovered from the OOM kill
        // of one of its processes and exited 0 succeeded.
        let oom = matches!(code, Some(c) if c != 0) && self.oom_evidence(sb).await;
        let f = match code {
            Some(c) if c != 0 && oom => Final { state: ObservedState::OomKilled, code },
            Some(c) => Final { state: ObservedState::Exited { code: c }, code },
            None if sb.container_pid().is_none() => Final {
                state: ObservedState::Failed {
                    reason: format!(
                        "crun could not start the container: {}",
                        read_tail(&sb.file("stderr.log"), 2048)?.trim()
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
        };
        write_json_atomic(&sb.file("final.json"), &f)?;
        // The writes stay in upper/; the mount is not needed any more.
        unmount(&sb.file("rootfs"));
        *lock(&sb.ended) = Some(f.clone());
        Ok(f)
    }

    async fn state_of(&self, sb: &Sandbox) -> Result<ObservedState, RuntimeError> {
        if let Some(f) = lock(&sb.ended).clone() {
            return Ok(f.state);
        }
        if sb.shim_alive() {
            return Ok(match (sb.container_pid(), sb.meta().paused) {
                (None, _) => ObservedState::Starting,
                (Some(_), true) => ObservedState::Paused,
                (Some(_), false) => ObservedState::Running,
            });
        }
        Ok(self.finalize(sb).await?.state)
    }

    async fn report(&self, sb: &Sandbox) -> Result<ExitReport, RuntimeError> {
        let f = self.finalize(sb).await?;
        Ok(ExitReport {
            id: sb.id,
            generation: sb.meta().generation,
            state: f.state,
            code: f.code,
            stdout_tail: read_tail(&sb.file("stdout.log"), LOG_TAIL_MAX_BYTES)?,
            stderr_tail: read_tail(&sb.file("stderr.log"), LOG_TAIL_MAX_BYTES)?,
        })
    }

    /// Wait for the shim to exit (pidfd), without finalizing.
    async fn wait_shim(&self, sb: &Sandbox) -> Result<(), RuntimeError> {
        let meta = sb.meta();
        if meta.shim_pid == 0 {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(meta.shim_pid)
            .map_err(|_| RuntimeError::Cgroup("pid out of range".into()))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Ok(()); // ESRCH: already gone
        }
        let fd =
            i32::try_from(fd).map_err(|_| RuntimeError::Cgroup("pidfd out of range".into()))?;
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The pid could have been reused between reading meta.json and pidfd_open.
        if process_start_ticks(meta.shim_pid) != Some(meta.shim_start_ticks) {
            return Ok(());
        }
        // SAFETY: the AsyncFd owns `pidfd`, an open OwnedFd whose raw fd never changes while owned.
        let afd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| RuntimeError::io("register pidfd", e.into()))?;
        let _ready = afd
            .readable()
            .await
            .map_err(|e| RuntimeError::io("wait on pidfd", e))?;
        Ok(())
    }

    /// Wait until the container runs (pid file) or the shim gives up.
    async fn await_running(&self, sb: &Sandbox) -> Result<u32, RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        let mut delay = Duration::from_micros(500);
        loop {
            if let Some(pid) = sb.container_pid() {
                return Ok(pid);
            }
            if !sb.shim_alive() {
                let f = self.finalize(sb).await?;
                let reason = match f.state {
                    ObservedState::Failed { reason } => reason,
                    other => format!("the container ended before it was seen running: {other:?}"),
                };
                return Err(RuntimeError::StartFailed {
                    id: sb.id,
                    reason,
                    stderr_tail: read_tail(&sb.file("stderr.log"), 4096)?,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    what: format!("start of sandbox {}", sb.id),
                    after_ms: START_TIMEOUT_MS,
                });
            }
            tokio::time::sleep(delay).await;
            // A stat every 2 ms at most: cheap, and adds at most 2 ms to the start latency.
            delay = (delay * 2).min(Duration::from_millis(2));
        }
    }

    async fn live(
        &self,
        id: SandboxId,
        operation: &'static str,
    ) -> Result<Arc<Sandbox>, RuntimeError> {
        let sb = self.get(id)?;
        match self.state_of(&sb).await? {
            ObservedState::Running | ObservedState::Paused => Ok(sb),
            state => Err(RuntimeError::WrongState {
                id,
                state,
                operation,
            }),
        }
    }
}

impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        "container"
    }

    async fn start(&self, req: StartRequest) -> Result<SandboxHandle, RuntimeError> {
        if let Ok(existing) = self.get(req.id) {
            return Err(RuntimeError::AlreadyExists {
                id: req.id,
                generation: existing.meta().generation,
            });
        }
        let bundle = self.bundle_dir(req.id);
        // A bundle without meta.json: debris of a start that died half-way.
        clear_debris(&bundle)?;
        let meta = match self.prepare_bundle(&req, &bundle) {
            Ok(m) => m,
            Err(e) => {
                unmount(&bundle.join("rootfs"));
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let sb = Arc::new(self.new_sandbox(meta));
        lock(&self.sandboxes).insert(req.id, sb.clone());
        // From here on the record stays (a failed start is a terminal `Failed` to report).
        self.spawn_shim(&sb)?;
        let pid = self.await_running(&sb).await?;
        self.watch_oom(&sb);
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: Some(pid),
        })
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let sb = self.get(id)?;
        let state = self.state_of(&sb).await?;
        if state.is_terminal() {
            return self.report(&sb).await;
        }
        if state == ObservedState::Starting {
            // crun has not written the pid file yet; give it the start timeout.
            let _ = self.await_running(&sb).await;
        }
        let cid = OsString::from(&sb.cid);
        if sb.meta().paused {
            // Frozen tasks cannot handle SIGTERM (or die of SIGKILL on v1) until thawed.
            let _ = self.crun(&[OsStr::new("resume"), &cid]).await;
            sb.update_meta(|m| m.paused = false)?;
        }
        if let Err(e) = self
            .crun(&[OsStr::new("kill"), &cid, OsStr::new("TERM")])
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
                .crun(&[
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
        self.report(&sb).await
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.live(id, "pause").await?;
        if sb.meta().paused {
            return Ok(());
        }
        self.crun(&[OsStr::new("pause"), OsStr::new(&sb.cid)])
            .await?;
        sb.update_meta(|m| m.paused = true)
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.live(id, "resume").await?;
        if !sb.meta().paused {
            return Ok(());
        }
        self.crun(&[OsStr::new("resume"), OsStr::new(&sb.cid)])
            .await?;
        sb.update_meta(|m| m.paused = false)
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        let sb = self.live(id, "resize").await?;
        if sb.meta().resources != resources {
            let memory = OsString::from(format!("--memory={}", resources.memory_mib * MIB));
            let quota = OsString::from(format!(
                "--cpu-quota={}",
                cpu_quota_us(resources.cpu_millis)
            ));
            let period = OsString::from(format!("--cpu-period={CPU_PERIOD_US}"));
            let shares =
                OsString::from(format!("--cpu-share={}", cpu_shares(resources.cpu_millis)));
            let cid = OsString::from(&sb.cid);
            self.crun(&[
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
        sb.update_meta(|m| {
            m.resources = resources;
            m.revision = revision;
        })
    }

    async fn status(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        let sb = self.get(id)?;
        let state = self.state_of(&sb).await?;
        Ok(sb.observed(state))
    }

    async fn wait(&self, id: SandboxId) -> Result<ExitReport, RuntimeError> {
        let sb = self.get(id)?;
        loop {
            if self.state_of(&sb).await?.is_terminal() {
                return self.report(&sb).await;
            }
            self.wait_shim(&sb).await?;
            // The shim is gone or going: give it a moment to be observably dead.
            if sb.shim_alive() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    async fn usage(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
        let sb = self.get(id)?;
        let cg = &sb.cgroup;
        let gone = || RuntimeError::NotFound {
            id,
            runtime: "container",
        };
        let read =
            |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).map_err(|_| gone());
        let (current, inactive, limit, cpu_ns) = if cg.v2 {
            let stat = read(&cg.memory, "memory.stat")?;
            let cpu = read(&cg.cpu, "cpu.stat")?;
            (
                read_u64(&cg.memory.join("memory.current")).ok_or_else(gone)?,
                parse_keyed(&stat, "inactive_file").unwrap_or(0),
                read_u64(&cg.memory.join("memory.max")),
                parse_keyed(&cpu, "usage_usec")
                    .unwrap_or(0)
                    .saturating_mul(1000),
            )
        } else {
            let stat = read(&cg.memory, "memory.stat")?;
            (
                read_u64(&cg.memory.join("memory.usage_in_bytes")).ok_or_else(gone)?,
                parse_keyed(&stat, "total_inactive_file").unwrap_or(0),
                read_u64(&cg.memory.join("memory.limit_in_bytes")),
                read_u64(&cg.cpuacct.join("cpuacct.usage")).unwrap_or(0),
            )
        };
        Ok(Usage {
            memory_bytes: current.saturating_sub(inactive),
            memory_limit_bytes: limit.unwrap_or(u64::MAX),
            cpu_usage_ns: cpu_ns,
        })
    }

    async fn list(&self) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        let dir = self.config.data_dir.join("sandboxes");
        let mut out = Vec::new();
        for id in sandbox_ids(&dir)? {
            match self.get(id) {
                Ok(sb) => {
                    let state = self.state_of(&sb).await?;
                    out.push(sb.observed(state));
                }
                Err(RuntimeError::NotFound { .. }) => {} // debris without meta.json; cleared on start
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|o| o.id);
        Ok(out)
    }

    async fn remove(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.get(id)?;
        let state = self.state_of(&sb).await?;
        if !state.is_terminal() {
            return Err(RuntimeError::WrongState {
                id,
                state,
                operation: "forget",
            });
        }
        // crun deletes the container when `crun run` returns; this covers a crun that was killed.
        let _ = self
            .crun(&[
                OsStr::new("delete"),
                OsStr::new("--force"),
                OsStr::new(&sb.cid),
            ])
            .await;
        unmount(&sb.file("rootfs"));
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
        if is_mount_point(&sb.file("rootfs")) {
            return Err(RuntimeError::Cgroup(format!(
                "{} is still mounted; not deleting the bundle",
                sb.file("rootfs").display()
            )));
        }
        std::fs::remove_dir_all(&sb.bundle)
            .map_err(|e| RuntimeError::io(format!("remove {}", sb.bundle.display()), e))?;
        lock(&self.sandboxes).remove(&id);
        Ok(())
    }
}

// ---- mounts and eventfds ----

fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

fn register_v1_oom_eventfd(memcg: &Path) -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers and returns a new fd or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    let control = std::fs::File::open(memcg.join("memory.oom_control"))?;
    // The kernel keeps its own reference to the control file; ours may close afterwards.
    std::fs::write(
        memcg.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )?;
    Ok(efd)
}

/// The kernel signals the eventfd once per OOM and once more when the cgroup is removed. A signal
/// seen while the cgroup still exists is an OOM; after removal, any count beyond the removal's
/// one is. The marker file records the verdict for later daemon processes.
async fn watch_v1_oom(efd: OwnedFd, memcg: &Path, marker: &Path) -> std::io::Result<()> {
    // SAFETY: the AsyncFd owns `efd`, an open OwnedFd whose raw fd never changes while owned.
    let afd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut total = 0u64;
    let mut removed_at = None;
    loop {
        let ready = match removed_at {
            None => afd.readable().await.map(Some)?,
            Some(at) => match tokio::time::timeout_at(at, afd.readable()).await {
                Ok(r) => Some(r?),
                Err(_) => None,
            },
        };
        let Some(mut guard) = ready else {
            return Ok(());
        };
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte stack buffer from a valid eventfd.
        let n = unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n != 8 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(err);
        }
        total += u64::from_ne_bytes(buf);
        let alive = memcg.join("memory.oom_control").exists();
        if (alive || total >= 2) && !marker.exists() {
            std::fs::write(marker, format!("{total}\n"))?;
        }
        if !alive {
            if total >= 2 || marker.exists() {
                return Ok(());
            }
            // One signal and the cgroup gone: a removal, or an OOM whose removal signal is on its
            // way. Wait a little for a second one.
            removed_at.get_or_insert(
                tokio::time::Instant::now() + Duration::from_millis(OOM_VERDICT_TIMEOUT_MS),
            );
        }
    }
}

#[cfg(test)]
mod tests;
