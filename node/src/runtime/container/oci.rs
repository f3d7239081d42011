//! The OCI runtime spec (`config.json`) of one sandbox: what crun is asked to build.
//!
//! Pure: the spec is a function of the sandbox's spec, its resources and where its cgroup goes,
//! so the isolation it promises (namespaces, no host paths, an unprivileged user, a reduced
//! capability set, masked /proc files, surge-init as PID 1) is checked by unit tests without crun.

use serde_json::json;

use super::init::{init_args, INIT_IN_SANDBOX};
use crate::runtime::cgroup::{cpu_quota_us, cpu_shares, CPU_PERIOD_US};
use crate::runtime::{Resources, SandboxId, SandboxSpec, MIB};

/// Processes per sandbox (fork bombs stay inside).
pub const PIDS_MAX: u64 = 4096;
/// Open files per process in the sandbox.
pub const NOFILE_MAX: u64 = 4096;

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
    /// Host path of surge-init (`init::install`), bind-mounted read-only as PID 1.
    pub init: &'a std::path::Path,
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
    // PID 1 is surge-init: it reaps, forwards SIGTERM and runs the command (none: the sandbox
    // stays up until stopped).
    let args = init_args(&p.spec.command);
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
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": NOFILE_MAX, "soft": NOFILE_MAX }],
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
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", p.tmp_size_mib)] },
            // The one host file a sandbox sees: surge's init, read-only (after /dev, which holds it).
            { "destination": INIT_IN_SANDBOX, "type": "bind", "source": p.init, "options": ["bind", "ro", "nosuid", "nodev"] }
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
