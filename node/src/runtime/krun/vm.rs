//! One microVM's configuration (`vm.json`, written by the daemon, read by `surge vm-exec`) and
//! the pure decisions behind it: vCPUs, guest RAM with headroom, the guest's explicit
//! environment, and the sequence of libkrun calls that turns the file into a context.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ffi::KrunApi;
use crate::reconcile::{SandboxId, SandboxSpec};

/// libkrun takes the vCPU count as a `u8`; more than this is never useful for one sandbox.
pub const VCPUS_MAX: u8 = 64;
/// Guest RAM headroom over the sandbox's memory limit: the VM boots with `memory_mib + headroom`
/// so resizing (and OOM-prevention growth) only moves the host-side cgroup limit. The guest only
/// touches what it uses, so unused headroom costs the host nothing.
pub const RAM_HEADROOM_MIN_MIB: u64 = 256;
pub const RAM_HEADROOM_MAX_MIB: u64 = 8192;
/// Largest guest RAM surge asks libkrun for (libkrun takes a `u32` of MiB).
pub const GUEST_RAM_MAX_MIB: u64 = 1 << 20;
/// libkrun passes argv and the environment on the guest kernel's command line, quoted with `"`;
/// the x86 kernel keeps 2048 bytes of it. Kept well under, for libkrun's own parameters.
pub const GUEST_CMDLINE_BYTES_MAX: usize = 1536;
/// Working directory in the guest.
pub const GUEST_WORKDIR: &str = "/";
/// Where the guest agent (`surge-guest`, see the `surge-guest` crate) sits in the guest's root.
pub const GUEST_AGENT_PATH: &str = "/.surge/surge-guest";
/// The host end of the agent's vsock port, in the VM dir.
pub const AGENT_SOCKET: &str = "agent.sock";
/// A unix socket path, at most (`sun_path` is 108 bytes with its NUL).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Everything `surge vm-exec` needs to build the context (`vm.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Directory shared into the guest as `/` (virtio-fs).
    pub root: PathBuf,
    pub workdir: String,
    /// Program inside the guest, and its argv after argv[0].
    pub exec: String,
    pub args: Vec<String>,
    /// The guest's whole environment, `KEY=VALUE`; nothing of the host's leaks in.
    pub env: Vec<String>,
    pub vcpus: u8,
    pub ram_mib: u32,
    /// The guest console (the command's stdout and stderr, and the guest kernel's messages).
    pub console: PathBuf,
    /// libkrunfw to pre-load (by path), and libkrun (`None`: by soname).
    pub krunfw: Option<PathBuf>,
    pub libkrun: Option<PathBuf>,
    /// Created by vm-exec right before `krun_start_enter`: the daemon's "it runs".
    pub entered_marker: PathBuf,
    /// vm-exec writes why it failed here (and exits with `exit::SETUP_FAILED_CODE`).
    pub setup_error: PathBuf,
    /// libkrun log level (0 off .. 5 trace).
    pub log_level: u32,
    /// The host unix socket libkrun maps to the guest agent's vsock port; `None`: the VM runs
    /// the command itself, without an agent (no exec and files).
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
}

/// Why a VM configuration is refused or a libkrun call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("libkrun {call} failed: {errno_text} (errno {errno})")]
    Krun {
        call: &'static str,
        errno: i32,
        errno_text: String,
    },
}

/// vCPUs for a CPU limit: whole CPUs, rounded up, at least one.
pub fn vcpus_for(cpu_millis: u64) -> u8 {
    let whole = cpu_millis.div_ceil(1000).max(1);
    u8::try_from(whole.min(u64::from(VCPUS_MAX))).unwrap_or(VCPUS_MAX)
}

/// Guest RAM for a memory limit: the limit plus headroom (as much again, between
/// [`RAM_HEADROOM_MIN_MIB`] and [`RAM_HEADROOM_MAX_MIB`]).
pub fn guest_ram_mib(memory_mib: u64) -> Result<u32, VmError> {
    let ram =
        memory_mib.saturating_add(memory_mib.clamp(RAM_HEADROOM_MIN_MIB, RAM_HEADROOM_MAX_MIB));
    if memory_mib == 0 || ram > GUEST_RAM_MAX_MIB {
        return Err(VmError::Invalid(format!(
            "memory {memory_mib} MiB: a microVM needs 1 to {} MiB",
            GUEST_RAM_MAX_MIB - RAM_HEADROOM_MAX_MIB
        )));
    }
    Ok(u32::try_from(ram).unwrap_or(u32::MAX))
}

fn cmdline_safe(what: &str, s: &str) -> Result<(), VmError> {
    if s.contains('"') || s.contains('\0') || s.contains('\n') {
        return Err(VmError::Invalid(format!(
            "{what} {s:?} contains a double quote, NUL or newline, which libkrun cannot pass to the guest"
        )));
    }
    Ok(())
}

/// The guest's environment: a fixed base, the sandbox id, then the job's variables (which may
/// override the base). Built from the spec only, never from the host.
pub fn guest_env(id: SandboxId, spec: &SandboxSpec) -> Result<Vec<String>, VmError> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "linux".into()),
        ("SURGE_SANDBOX_ID".into(), id.to_string()),
    ];
    for (k, v) in &spec.env {
        let name_ok = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        if !name_ok {
            return Err(VmError::Invalid(format!(
                "environment variable name `{k}` is not valid in a microVM (letters, digits and _, not starting with a digit)"
            )));
        }
        cmdline_safe("environment value", v)?;
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// Inputs of [`build`].
pub struct VmParams<'a> {
    pub id: SandboxId,
    pub spec: &'a SandboxSpec,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub root: &'a Path,
    pub dir: &'a Path,
    pub krunfw: Option<&'a Path>,
    pub libkrun: Option<&'a Path>,
    /// Boot the guest agent (the binary is at [`GUEST_AGENT_PATH`] in the root) as the VM's
    /// workload, running the command (if any) as this user (uid, gid).
    pub agent: Option<(u32, u32)>,
}

/// The VM configuration of a sandbox; files live in `dir`.
pub fn build(p: &VmParams<'_>) -> Result<VmConfig, VmError> {
    let (exec, args) = match (p.agent, p.spec.command.split_first()) {
        (Some((uid, gid)), command) => {
            // The agent is the workload; it runs the command, or stays up without one.
            let mut args: Vec<String> = [
                "--init",
                "--uid",
                &uid.to_string(),
                "--gid",
                &gid.to_string(),
                "--vsock-port",
                &surge_guest::proto::AGENT_VSOCK_PORT.to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            if command.is_some() {
                args.push("--".to_owned());
                args.extend(p.spec.command.iter().cloned());
            }
            (GUEST_AGENT_PATH.to_owned(), args)
        }
        (None, Some((exec, rest))) => (exec.clone(), rest.to_vec()),
        (None, None) => ("/bin/sh".to_owned(), Vec::new()),
    };
    let agent_socket = p.agent.map(|_| p.dir.join(AGENT_SOCKET));
    if let Some(sock) = &agent_socket {
        let len = sock.as_os_str().len();
        if len > SOCKET_PATH_BYTES_MAX {
            return Err(VmError::Invalid(format!(
                "the agent socket {} is {len} bytes long; a unix socket path takes at most {SOCKET_PATH_BYTES_MAX} (use a shorter data dir)",
                sock.display()
            )));
        }
    }
    cmdline_safe("command", &exec)?;
    for a in &args {
        cmdline_safe("argument", a)?;
    }
    let env = guest_env(p.id, p.spec)?;
    // Each item is quoted and separated by a space on the kernel command line.
    let cmdline: usize = std::iter::once(&exec)
        .chain(&args)
        .chain(&env)
        .map(|s| s.len() + 3)
        .sum();
    if cmdline > GUEST_CMDLINE_BYTES_MAX {
        return Err(VmError::Invalid(format!(
            "command and environment take {cmdline} bytes of the guest kernel command line; at most {GUEST_CMDLINE_BYTES_MAX} fit (pass large data through files in the template)"
        )));
    }
    Ok(VmConfig {
        root: p.root.to_path_buf(),
        workdir: GUEST_WORKDIR.to_owned(),
        exec,
        args,
        env,
        vcpus: vcpus_for(p.cpu_millis),
        ram_mib: guest_ram_mib(p.memory_mib)?,
        console: p.dir.join("console.log"),
        krunfw: p.krunfw.map(Path::to_path_buf),
        libkrun: p.libkrun.map(Path::to_path_buf),
        entered_marker: p.dir.join("entered"),
        setup_error: p.dir.join("setup-error"),
        log_level: 1,
        agent_socket,
    })
}

fn cstr(what: &str, s: &str) -> Result<CString, VmError> {
    CString::new(s).map_err(|_| VmError::Invalid(format!("{what} {s:?} contains NUL")))
}

fn check(call: &'static str, rc: i32) -> Result<i32, VmError> {
    if rc >= 0 {
        return Ok(rc);
    }
    let errno = rc.saturating_neg();
    Err(VmError::Krun {
        call,
        errno,
        errno_text: std::io::Error::from_raw_os_error(errno).to_string(),
    })
}

/// Create and fill a libkrun context from `cfg`; returns its id. On error the context is freed.
pub fn configure(api: &dyn KrunApi, cfg: &VmConfig) -> Result<u32, VmError> {
    let root = cstr("root", &cfg.root.to_string_lossy())?;
    let workdir = cstr("workdir", &cfg.workdir)?;
    let exec = cstr("command", &cfg.exec)?;
    let args = cfg
        .args
        .iter()
        .map(|a| cstr("argument", a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = cfg
        .env
        .iter()
        .map(|e| cstr("environment entry", e))
        .collect::<Result<Vec<_>, _>>()?;
    let console = cstr("console path", &cfg.console.to_string_lossy())?;
    let agent_socket = cfg
        .agent_socket
        .as_ref()
        .map(|s| cstr("agent socket", &s.to_string_lossy()))
        .transpose()?;
    check("krun_set_log_level", api.set_log_level(cfg.log_level))?;
    let ctx = u32::try_from(check("krun_create_ctx", api.create_ctx())?)
        .map_err(|_| VmError::Invalid("libkrun returned a negative context id".into()))?;
    let filled = (|| {
        check(
            "krun_set_vm_config",
            api.set_vm_config(ctx, cfg.vcpus, cfg.ram_mib),
        )?;
        check("krun_set_root", api.set_root(ctx, &root))?;
        check("krun_set_workdir", api.set_workdir(ctx, &workdir))?;
        check("krun_set_exec", api.set_exec(ctx, &exec, &args, &env))?;
        check(
            "krun_set_console_output",
            api.set_console_output(ctx, &console),
        )?;
        if let Some(sock) = &agent_socket {
            check(
                "krun_add_vsock_port2",
                api.add_vsock_port2(ctx, surge_guest::proto::AGENT_VSOCK_PORT, sock, true),
            )?;
        }
        Ok(())
    })();
    match filled {
        Ok(()) => Ok(ctx),
        Err(e) => {
            api.free_ctx(ctx);
            Err(e)
        }
    }
}

/// Start the VM in this process. Returns only on failure (libkrun exits the process when the
/// guest ends).
pub fn enter(api: &dyn KrunApi, ctx: u32) -> VmError {
    let rc = api.start_enter(ctx);
    api.free_ctx(ctx);
    match check("krun_start_enter", rc.min(-1)) {
        Err(e) => e,
        Ok(_) => VmError::Invalid("krun_start_enter returned".into()),
    }
}
