//! What this host offers: CPUs, memory, OS/arch, and whether sandboxes can be microVMs.
//!
//! Hardware virtualization needs both the CPU flag (`vmx` for Intel VT-x, `svm` for AMD-V) and a
//! usable `/dev/kvm`. A `/dev/kvm` alone is not enough: inside some cloud VMs it is provided by a
//! software hypervisor (e.g. `kvm_pvm`) that libkrun cannot use, and the CPU flags are absent.
//! Parsing is pure and tested on samples; the `detect_*` functions are thin I/O wrappers.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which sandbox runtime the node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuntimeKind {
    Krun,
    Container,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Virtualization {
    /// `flag` is `vmx` or `svm`; /dev/kvm opened read-write.
    Hardware { flag: String },
    /// `note` adds detail after the decision (e.g. why a present /dev/kvm is not used).
    Unavailable {
        reason: String,
        note: Option<String>,
    },
}

impl Virtualization {
    pub fn runtime(&self) -> RuntimeKind {
        match self {
            Self::Hardware { .. } => RuntimeKind::Krun,
            Self::Unavailable { .. } => RuntimeKind::Container,
        }
    }
}

impl fmt::Display for Virtualization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hardware { flag } => write!(
                f,
                "hardware virtualization ({flag}, /dev/kvm usable); using the krun runtime"
            ),
            Self::Unavailable { reason, note: None } => {
                write!(f, "{reason}; using the container runtime")
            }
            Self::Unavailable {
                reason,
                note: Some(note),
            } => {
                write!(f, "{reason}; using the container runtime ({note})")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpus: u32,
    pub memory_mib: u64,
    pub os: String,
    pub arch: String,
    pub virtualization: Virtualization,
}

/// The virtualization flag in `/proc/cpuinfo`, if any CPU lists one.
pub fn parse_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

/// Number of `processor` entries in `/proc/cpuinfo`.
pub fn parse_cpu_count(cpuinfo: &str) -> u32 {
    let n = cpuinfo
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor")
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
pub fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let kib = match parts.next() {
        Some("kB") | None => value,
        Some(_) => return None,
    };
    Some(kib / 1024)
}

/// The decision, from the CPU flags and whether /dev/kvm could be opened.
pub fn classify_virtualization(cpuinfo: &str, kvm: Result<(), String>) -> Virtualization {
    match (parse_virt_flag(cpuinfo), kvm) {
        (Some(flag), Ok(())) => Virtualization::Hardware { flag: flag.to_owned() },
        (Some(flag), Err(why)) => Virtualization::Unavailable {
            reason: format!("the CPU has {flag} but /dev/kvm is not usable ({why})"),
            note: Some("load kvm_intel or kvm_amd and check the permissions of /dev/kvm".to_owned()),
        },
        (None, kvm) => Virtualization::Unavailable {
            reason: "no hardware virtualization (no vmx/svm in /proc/cpuinfo)".to_owned(),
            note: kvm.is_ok().then(|| {
                "/dev/kvm is present but backed by a software hypervisor such as kvm_pvm, which libkrun cannot use"
                    .to_owned()
            }),
        },
    }
}

/// Open /dev/kvm read-write, as libkrun will.
pub fn probe_kvm(path: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn detect_virtualization() -> Virtualization {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify_virtualization(&cpuinfo, probe_kvm(Path::new("/dev/kvm")))
}

/// Everything the node registers with.
pub fn detect_host() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    // available_parallelism honours affinity and cgroup quotas; cpuinfo is the fallback.
    let cpus = std::thread::available_parallelism().map_or_else(
        |_| parse_cpu_count(&cpuinfo),
        |n| u32::try_from(n.get()).unwrap_or(u32::MAX),
    );
    HostInfo {
        cpus,
        memory_mib: parse_mem_total_mib(&meminfo).unwrap_or(0),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        virtualization: classify_virtualization(&cpuinfo, probe_kvm(Path::new("/dev/kvm"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr vmx smx est\n\n\
                         processor\t: 1\nflags\t\t: fpu vme vmx\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm lahf_lm\n";
    // Shape of this CI machine: a PVM guest, /dev/kvm present, no vmx/svm.
    const PVM: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae hypervisor\n\
                       vmx flags\t: none\n\nprocessor\t: 1\nflags\t\t: fpu hypervisor\n";

    #[test]
    fn flags_and_counts() {
        assert_eq!(parse_virt_flag(INTEL), Some("vmx"));
        assert_eq!(parse_virt_flag(AMD), Some("svm"));
        assert_eq!(
            parse_virt_flag(PVM),
            None,
            "a `vmx flags` line is not the flags line"
        );
        assert_eq!(parse_cpu_count(INTEL), 2);
        assert_eq!(parse_cpu_count(PVM), 2);
        assert_eq!(
            parse_mem_total_mib("MemTotal:       24683424 kB\nMemFree: 1 kB\n"),
            Some(24104)
        );
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify_virtualization(INTEL, Ok(())),
            Virtualization::Hardware { flag: "vmx".into() }
        );
        assert_eq!(
            classify_virtualization(INTEL, Ok(())).runtime(),
            RuntimeKind::Krun
        );
        let pvm = classify_virtualization(PVM, Ok(()));
        assert_eq!(pvm.runtime(), RuntimeKind::Container);
        assert!(pvm.to_string().starts_with(
            "no hardware virtualization (no vmx/svm in /proc/cpuinfo); using the container runtime"
        ));
        assert!(pvm.to_string().contains("kvm_pvm"));
        let none = classify_virtualization(PVM, Err("No such file or directory".into()));
        assert_eq!(
            none.to_string(),
            "no hardware virtualization (no vmx/svm in /proc/cpuinfo); using the container runtime"
        );
        let no_dev = classify_virtualization(AMD, Err("Permission denied".into()));
        assert_eq!(no_dev.runtime(), RuntimeKind::Container);
        assert!(no_dev
            .to_string()
            .contains("/dev/kvm is not usable (Permission denied)"));
    }

    #[test]
    fn this_host() {
        let host = detect_host();
        assert!(host.cpus >= 1);
        assert!(host.memory_mib > 0);
        eprintln!("detected: {host:?}; {}", host.virtualization);
    }
}
