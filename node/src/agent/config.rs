//! The daemon's settings and the pure decisions made from them: which runtime, what to offer.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::AgentError;
use crate::detect::{HostInfo, Virtualization};
use crate::reconcile::Resources;
use crate::runtime::krun::{self, KrunHost};

/// Default and upper bound of `--start-concurrency`.
pub const START_CONCURRENCY_DEFAULT: usize = 16;
pub const START_CONCURRENCY_MAX: usize = 1_024;
/// Simulated nodes one process may host.
pub const SIMULATE_NODES_MAX: u32 = 5_000;
/// What a simulated node offers unless told otherwise: 128 CPUs, 512 GiB.
pub const SIM_CPU_MILLIS_DEFAULT: u64 = 128_000;
pub const SIM_MEMORY_MIB_DEFAULT: u64 = 512 * 1024;
/// `--label` flags accepted, and their sizes.
pub const LABELS_MAX: usize = 64;
pub const LABEL_KEY_BYTES_MAX: usize = 63;
pub const LABEL_VALUE_BYTES_MAX: usize = 253;
/// Where a guest kernel for microVMs may be installed (besides `<data_dir>/kernel/vmlinux`):
/// a plain kernel image, or libkrunfw, the library libkrun loads its kernel from.
pub const GUEST_KERNEL_PATHS: &[&str] = &[
    "/usr/share/surge/vmlinux",
    "/usr/lib/surge/vmlinux",
    "/usr/lib64/libkrunfw.so.4",
    "/usr/lib/libkrunfw.so.4",
    "/usr/local/lib/libkrunfw.so.4",
    "/usr/local/lib64/libkrunfw.so.4",
    "/usr/lib/x86_64-linux-gnu/libkrunfw.so.4",
    "/usr/lib/aarch64-linux-gnu/libkrunfw.so.4",
];

/// `--runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RuntimeFlag {
    /// krun when the host can run microVMs, else container.
    #[default]
    Auto,
    Container,
    Krun,
    Sim,
}

impl FromStr for RuntimeFlag {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "container" => Ok(Self::Container),
            "krun" => Ok(Self::Krun),
            "sim" => Ok(Self::Sim),
            other => Err(AgentError::Invalid(format!(
                "--runtime {other:?}: expected auto, container, krun or sim"
            ))),
        }
    }
}

impl fmt::Display for RuntimeFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Container => "container",
            Self::Krun => "krun",
            Self::Sim => "sim",
        })
    }
}

/// The runtime the daemon will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeChoice {
    Container,
    Krun,
    Sim,
}

/// Decide the runtime. Returns the choice and, for `auto`, why (to log).
///
/// `krun` needs hardware virtualization, the guest kernel (libkrunfw) and libkrun
/// ([`krun::unavailable_reason`]): asking for it on a host without them is an error that says
/// which is missing; `auto` falls back to containers and says why.
pub fn choose_runtime(
    flag: RuntimeFlag,
    virtualization: &Virtualization,
    krun_host: &KrunHost,
) -> Result<(RuntimeChoice, Option<String>), AgentError> {
    let unavailable = krun::unavailable_reason(virtualization, krun_host);
    match flag {
        RuntimeFlag::Krun => match unavailable {
            None => Ok((RuntimeChoice::Krun, None)),
            Some(why) => Err(AgentError::Invalid(format!(
                "--runtime krun cannot run microVMs on this host: {why}; use --runtime container, \
                 or --runtime auto to fall back to containers"
            ))),
        },
        RuntimeFlag::Container => Ok((RuntimeChoice::Container, None)),
        RuntimeFlag::Sim => Ok((RuntimeChoice::Sim, None)),
        RuntimeFlag::Auto => Ok(match (unavailable, virtualization) {
            (None, _) => (
                RuntimeChoice::Krun,
                Some(format!(
                    "{virtualization}; guest kernel {}",
                    krun_host
                        .krunfw
                        .as_deref()
                        .map_or_else(String::new, |p| p.display().to_string())
                )),
            ),
            // detect's own explanation ("no hardware virtualization (...); using the container runtime").
            (Some(_), unavailable @ Virtualization::Unavailable { .. }) => {
                (RuntimeChoice::Container, Some(unavailable.to_string()))
            }
            (Some(why), Virtualization::Hardware { flag }) => (
                RuntimeChoice::Container,
                Some(format!(
                    "hardware virtualization ({flag}) is present but {why}; using the container runtime"
                )),
            ),
        }),
    }
}

/// The first guest kernel found, if any.
pub fn find_guest_kernel(data_dir: &Path) -> Option<PathBuf> {
    std::iter::once(data_dir.join("kernel").join("vmlinux"))
        .chain(GUEST_KERNEL_PATHS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// `KEY=VALUE` labels into a map; a key given twice is an error.
pub fn parse_labels(flags: &[String]) -> Result<BTreeMap<String, String>, AgentError> {
    if flags.len() > LABELS_MAX {
        return Err(AgentError::Invalid(format!(
            "{} --label flags given; at most {LABELS_MAX}",
            flags.len()
        )));
    }
    let mut labels = BTreeMap::new();
    for flag in flags {
        let bad = || AgentError::BadLabel(flag.clone());
        let (k, v) = flag.split_once('=').ok_or_else(bad)?;
        let (k, v) = (k.trim(), v.trim());
        let key_ok = !k.is_empty()
            && k.len() <= LABEL_KEY_BYTES_MAX
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok || v.len() > LABEL_VALUE_BYTES_MAX {
            return Err(bad());
        }
        if labels.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(AgentError::BadLabel(format!(
                "{flag} (key `{k}` given twice)"
            )));
        }
    }
    Ok(labels)
}

/// `--cpus 3.5` in millicores.
pub fn cpus_to_millis(cpus: f64) -> Result<u64, AgentError> {
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1_000_000.0 {
        return Err(AgentError::Invalid(format!(
            "--cpus {cpus}: expected a positive number of CPUs such as 4 or 3.5"
        )));
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "cpus is in (0, 1e6], so the millicores are in [0, 1e9]: no overflow, and round() left no fraction"
    )]
    let millis = (cpus * 1000.0).round() as u64;
    Ok(millis)
}

/// What this node offers: the host minus nothing, or less when the flags say so (never more
/// than the host has, unless the runtime is simulated).
pub fn allocatable(
    host: &HostInfo,
    cpu_millis: Option<u64>,
    memory_mib: Option<u64>,
    simulated: bool,
) -> Result<Resources, AgentError> {
    if simulated {
        return Ok(Resources {
            cpu_millis: cpu_millis.unwrap_or(SIM_CPU_MILLIS_DEFAULT),
            memory_mib: memory_mib.unwrap_or(SIM_MEMORY_MIB_DEFAULT),
        });
    }
    let host_cpu_millis = u64::from(host.cpus) * 1000;
    let cpu = cpu_millis.unwrap_or(host_cpu_millis);
    if cpu > host_cpu_millis {
        return Err(AgentError::MoreThanHost {
            flag: "--cpus",
            asked: format!("{}", cpu as f64 / 1000.0),
            host: format!("{} CPUs", host.cpus),
        });
    }
    let mem = memory_mib.unwrap_or(host.memory_mib);
    if mem > host.memory_mib {
        return Err(AgentError::MoreThanHost {
            flag: "--memory-mib",
            asked: mem.to_string(),
            host: format!("{} MiB", host.memory_mib),
        });
    }
    Ok(Resources {
        cpu_millis: cpu,
        memory_mib: mem,
    })
}

/// This machine's name, for the default node id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// Everything `surge node` was asked to do (the CLI's flags, checked).
/// Output of one simulated exec, at most.
pub const SIM_EXEC_OUTPUT_MAX: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub servers: Vec<String>,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub runtime: RuntimeFlag,
    pub cpu_millis: Option<u64>,
    pub memory_mib: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub pool: String,
    /// 0: no cap.
    pub max_sandboxes: u32,
    pub metrics: Option<SocketAddr>,
    pub start_concurrency: usize,
    /// Host this many simulated nodes instead of one real one.
    pub simulate: Option<u32>,
    pub sim_duration_ms: u64,
    pub sim_exit_code: i32,
    /// Simulated execs: how long they take and how many bytes they print.
    pub sim_exec_ms: u64,
    pub sim_exec_output_bytes: usize,
    /// Where the I/O service (exec and files) listens, and the address replicas dial.
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    /// Mutual TLS to the replicas (`--tls-dir`: a node certificate and the cluster CA).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The same certificate serving the I/O service (replica certificates only may call).
    pub server_tls: Option<tonic::transport::ServerTlsConfig>,
    /// Checkpointing on (`--checkpoint`): the container runtime runs every sandbox under the
    /// CRIU kit's crun with piped stdio, so that it can be dumped. Off: Debian's crun, and the
    /// node says checkpointing is off.
    pub checkpoint: bool,
    /// `--warm-pool`: container sandboxes kept created ahead per template.
    pub warm_pool: Vec<crate::runtime::container::pool::WarmPoolSpec>,
}

impl DaemonConfig {
    pub fn check(&self) -> Result<(), AgentError> {
        if self.servers.is_empty() {
            return Err(AgentError::NoServers);
        }
        if self.node_id.is_empty() || self.node_id.len() > 253 {
            return Err(AgentError::Invalid(
                "--node-id must be 1 to 253 characters".into(),
            ));
        }
        crate::runtime::container::pool::validate_warm_pools(&self.warm_pool)
            .map_err(AgentError::Invalid)?;
        if !self.warm_pool.is_empty() && (self.simulate.is_some() || self.checkpoint) {
            return Err(AgentError::Invalid(
                "--warm-pool needs the container runtime without --checkpoint (pool sandboxes run under Debian's crun)".into(),
            ));
        }
        if !(1..=START_CONCURRENCY_MAX).contains(&self.start_concurrency) {
            return Err(AgentError::Invalid(format!(
                "--start-concurrency {}: expected 1 to {START_CONCURRENCY_MAX}",
                self.start_concurrency
            )));
        }
        if self.sim_exec_output_bytes > SIM_EXEC_OUTPUT_MAX {
            return Err(AgentError::Invalid(format!(
                "--sim-exec-output-bytes {}: at most {SIM_EXEC_OUTPUT_MAX}",
                self.sim_exec_output_bytes
            )));
        }
        if self.listen.ip().is_unspecified() && self.advertise.is_none() {
            return Err(AgentError::Invalid(format!(
                "--listen {} accepts on every interface; pass --advertise HOST:PORT, the address replicas dial",
                self.listen
            )));
        }
        if let Some(n) = self.simulate {
            if !(1..=SIMULATE_NODES_MAX).contains(&n) {
                return Err(AgentError::Invalid(format!(
                    "--simulate {n}: expected 1 to {SIMULATE_NODES_MAX} nodes per process"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw() -> Virtualization {
        Virtualization::Hardware { flag: "vmx".into() }
    }

    fn none() -> Virtualization {
        Virtualization::Unavailable {
            reason: "no hardware virtualization (no vmx/svm in /proc/cpuinfo)".into(),
            note: None,
        }
    }

    fn krun_ready() -> KrunHost {
        KrunHost {
            krunfw: Some(PathBuf::from("/k/libkrunfw.so.5")),
            libkrun: Ok(None),
        }
    }

    #[test]
    fn runtime_choice() {
        // This machine's shape: /dev/kvm from a software hypervisor, no vmx/svm.
        let pvm = Virtualization::Unavailable {
            reason: "no hardware virtualization (no vmx/svm in /proc/cpuinfo)".into(),
            note: Some("/dev/kvm is present but backed by a software hypervisor such as kvm_pvm, which libkrun cannot use".into()),
        };
        let err = choose_runtime(RuntimeFlag::Krun, &pvm, &krun_ready())
            .expect_err("no microVMs without hardware virtualization");
        let msg = err.to_string();
        assert!(
            msg.contains("--runtime krun cannot run microVMs on this host"),
            "{msg}"
        );
        assert!(msg.contains("no hardware virtualization"), "{msg}");
        assert!(msg.contains("kvm_pvm"), "{msg}");
        assert_eq!(
            choose_runtime(RuntimeFlag::Krun, &hw(), &krun_ready())
                .expect("krun")
                .0,
            RuntimeChoice::Krun
        );
        let no_fw = KrunHost {
            krunfw: None,
            ..krun_ready()
        };
        let msg = choose_runtime(RuntimeFlag::Krun, &hw(), &no_fw)
            .expect_err("no guest kernel")
            .to_string();
        assert!(
            msg.contains("libkrunfw.so.5 is not installed (run scripts/setup-krun)"),
            "{msg}"
        );
        let no_vmm = KrunHost {
            libkrun: Err("libkrun is not installed".into()),
            ..krun_ready()
        };
        assert!(choose_runtime(RuntimeFlag::Krun, &hw(), &no_vmm)
            .expect_err("no libkrun")
            .to_string()
            .contains("libkrun is not installed"));
        assert_eq!(
            choose_runtime(RuntimeFlag::Sim, &none(), &no_fw)
                .expect("sim")
                .0,
            RuntimeChoice::Sim
        );
        let (c, why) = choose_runtime(RuntimeFlag::Auto, &none(), &krun_ready()).expect("auto");
        assert_eq!(c, RuntimeChoice::Container);
        assert_eq!(
            why.as_deref(),
            Some("no hardware virtualization (no vmx/svm in /proc/cpuinfo); using the container runtime")
        );
        let (c, why) = choose_runtime(RuntimeFlag::Auto, &hw(), &no_fw).expect("auto");
        assert_eq!(c, RuntimeChoice::Container);
        let why = why.unwrap_or_default();
        assert!(
            why.contains("hardware virtualization (vmx) is present but the guest kernel"),
            "{why}"
        );
        assert!(why.ends_with("using the container runtime"), "{why}");
        let (c, why) = choose_runtime(RuntimeFlag::Auto, &hw(), &no_vmm).expect("auto");
        assert_eq!(c, RuntimeChoice::Container);
        assert!(why.unwrap_or_default().contains("libkrun is not installed"));
        let (c, why) = choose_runtime(RuntimeFlag::Auto, &hw(), &krun_ready()).expect("auto");
        assert_eq!(c, RuntimeChoice::Krun);
        assert!(why.unwrap_or_default().contains("using the krun runtime"));
        assert_eq!("krun".parse::<RuntimeFlag>().ok(), Some(RuntimeFlag::Krun));
        assert!("kvm".parse::<RuntimeFlag>().is_err());
    }

    #[test]
    fn labels() {
        let l = parse_labels(&["gpu=a100".into(), "zone = eu-1 ".into(), "empty=".into()])
            .expect("valid");
        assert_eq!(l.get("zone").map(String::as_str), Some("eu-1"));
        assert_eq!(l.get("empty").map(String::as_str), Some(""));
        for bad in ["novalue", "=v", "sp ace=v", "k=v\u{0}".repeat(100).as_str()] {
            assert!(parse_labels(&[bad.to_owned()]).is_err(), "{bad:?}");
        }
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn allocatable_never_exceeds_the_host() {
        let host = HostInfo {
            cpus: 8,
            memory_mib: 16_384,
            os: "linux".into(),
            arch: "x86_64".into(),
            virtualization: none(),
        };
        assert_eq!(
            allocatable(&host, None, None, false).expect("host"),
            Resources {
                cpu_millis: 8000,
                memory_mib: 16_384
            }
        );
        assert_eq!(
            allocatable(&host, Some(3500), Some(4096), false)
                .expect("less")
                .cpu_millis,
            3500
        );
        assert!(matches!(
            allocatable(&host, Some(9000), None, false),
            Err(AgentError::MoreThanHost { flag: "--cpus", .. })
        ));
        assert!(allocatable(&host, None, Some(20_000), false).is_err());
        assert_eq!(
            allocatable(&host, None, None, true).expect("sim"),
            Resources {
                cpu_millis: SIM_CPU_MILLIS_DEFAULT,
                memory_mib: SIM_MEMORY_MIB_DEFAULT
            }
        );
        assert_eq!(cpus_to_millis(3.5).expect("valid"), 3500);
        assert!(cpus_to_millis(0.0).is_err() && cpus_to_millis(f64::NAN).is_err());
    }
}
