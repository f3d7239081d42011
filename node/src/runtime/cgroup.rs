//! Cgroups as both runtimes use them: finding the hierarchies (v2, v1, or a hybrid of the two),
//! the directories of one sandbox's cgroup, its limits, usage and OOM evidence.
//!
//! The two runtimes hold their cgroups differently, and this module serves both:
//! * `container`: crun creates and limits the cgroup (`crun update`); surge only reads it, and on
//!   v2 owns the parent of crun's leaf (see [`SandboxCgroup`] in `container`).
//! * `krun`: surge creates the cgroup, writes its limits and moves the VMM into it.
//!
//! Parsing is pure (mountinfo, keyed files, limit files) and tested without a host; the reads and
//! writes are thin wrappers around it. On v1 the OOM counter is not hierarchical, so an OOM is
//! learnt from an eventfd registered on `memory.oom_control` ([`watch_v1_oom`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::RuntimeError;

/// CFS period used for every sandbox; quota = cpu_millis * period / 1000.
pub const CPU_PERIOD_US: u64 = 100_000;
/// How long after exit the v1 OOM watcher may take to settle its verdict.
pub const OOM_VERDICT_TIMEOUT_MS: u64 = 500;
/// v1 controllers surge knows by name; other mount options of a v1 hierarchy are not controllers.
const V1_CONTROLLERS: &[&str] = &[
    "memory", "cpu", "cpuacct", "freezer", "pids", "cpuset", "blkio", "devices",
];

/// crun's `cpu.shares` from millicores (1024 per CPU, at least 2).
pub fn cpu_shares(cpu_millis: u64) -> u64 {
    (cpu_millis * 1024 / 1000).max(2)
}

/// CFS quota for `cpu_millis` over [`CPU_PERIOD_US`] (at least 1 ms).
pub fn cpu_quota_us(cpu_millis: u64) -> u64 {
    (cpu_millis * CPU_PERIOD_US / 1000).max(1000)
}

// ---- layout: pure parsing + one read of mountinfo ----

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
                let controllers = options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
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
                let cpu = v1("cpu")
                    .ok_or_else(|| RuntimeError::Cgroup("v1 cpu controller is not mounted".into()))?;
                let cpuacct = v1("cpuacct").unwrap_or_else(|| cpu.clone());
                let hide_unified = unified.filter(|u| !unified_controllers(u).trim().is_empty());
                Ok(Self::V1 {
                    memory,
                    cpu,
                    cpuacct,
                    hide_unified,
                })
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

    /// The cgroup at `relative` (a path below every hierarchy's root, slashes trimmed).
    pub fn cgroup(&self, relative: &str) -> Cgroup {
        let relative = relative.trim_matches('/');
        match self {
            Self::V2 { root } => {
                let dir = root.join(relative);
                Cgroup {
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: dir,
                    v2: true,
                }
            }
            Self::V1 {
                memory,
                cpu,
                cpuacct,
                ..
            } => Cgroup {
                memory: memory.join(relative),
                cpu: cpu.join(relative),
                cpuacct: cpuacct.join(relative),
                v2: false,
            },
        }
    }

    /// `parent` and one child below it, as a relative cgroup path.
    pub fn child(parent: &str, name: &str) -> String {
        format!("{}/{name}", parent.trim_matches('/'))
    }
}

// ---- one cgroup ----

/// One cgroup's directories: one on v2, one per controller hierarchy on v1 (some may coincide,
/// as `cpu,cpuacct` usually does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub memory: PathBuf,
    pub cpu: PathBuf,
    pub cpuacct: PathBuf,
    pub v2: bool,
}

/// What a cgroup's files say about its use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupUsage {
    /// Charged memory minus inactive page cache (what an OOM kill is about).
    pub working_set_bytes: u64,
    /// `None`: no limit.
    pub limit_bytes: Option<u64>,
    pub cpu_usage_ns: u64,
}

impl Cgroup {
    /// Each directory once.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut d: Vec<&Path> = vec![&self.memory, &self.cpu, &self.cpuacct];
        d.dedup();
        d
    }

    /// Make the directories; on v2 also ask each ancestor to hand `memory` and `cpu` down.
    pub fn create(&self) -> Result<(), RuntimeError> {
        if self.v2 {
            // Best effort: the root may hand them down already, and a parent with processes of
            // its own refuses (the kernel's "no internal processes" rule), which the limits
            // written next then report.
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

    /// Write a memory limit and a CFS quota over [`CPU_PERIOD_US`].
    pub fn set_limits(&self, memory_bytes: u64, cpu_millis: u64) -> Result<(), RuntimeError> {
        let quota = cpu_quota_us(cpu_millis);
        let write = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                RuntimeError::Cgroup(format!(
                    "write {value} to {}: {e}",
                    dir.join(file).display()
                ))
            })
        };
        if self.v2 {
            write(&self.memory, "memory.max", memory_bytes.to_string())?;
            write(&self.cpu, "cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        } else {
            write(
                &self.memory,
                "memory.limit_in_bytes",
                memory_bytes.to_string(),
            )?;
            write(&self.cpu, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            write(&self.cpu, "cpu.cfs_quota_us", quota.to_string())?;
        }
        Ok(())
    }

    /// Current use; `None` when the cgroup is gone (its sandbox ended).
    pub fn usage(&self) -> Option<CgroupUsage> {
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
        let (current, inactive, limit, cpu_ns) = if self.v2 {
            let stat = read(&self.memory, "memory.stat")?;
            let cpu = read(&self.cpu, "cpu.stat")?;
            (
                read_u64(&self.memory.join("memory.current"))?,
                parse_keyed(&stat, "inactive_file").unwrap_or(0),
                read_u64(&self.memory.join("memory.max")),
                parse_keyed(&cpu, "usage_usec")
                    .unwrap_or(0)
                    .saturating_mul(1000),
            )
        } else {
            let stat = read(&self.memory, "memory.stat")?;
            (
                read_u64(&self.memory.join("memory.usage_in_bytes"))?,
                parse_keyed(&stat, "total_inactive_file").unwrap_or(0),
                read_u64(&self.memory.join("memory.limit_in_bytes")),
                read_u64(&self.cpuacct.join("cpuacct.usage")).unwrap_or(0),
            )
        };
        Some(CgroupUsage {
            working_set_bytes: current.saturating_sub(inactive),
            limit_bytes: limit,
            cpu_usage_ns: cpu_ns,
        })
    }

    /// Whether the kernel's OOM killer acted in this cgroup (as far as its counters tell: on v1
    /// the counter is not hierarchical and goes with the cgroup; see [`watch_v1_oom`]).
    pub fn oom_killed(&self) -> bool {
        oom_kill_counted(&self.memory, self.v2)
    }

    /// Remove the directories, best effort (a cgroup with processes left stays).
    pub fn remove(&self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// `oom_kill` of a memory cgroup directory's events (`memory.events` on v2, `memory.oom_control`
/// on v1) is above zero.
pub fn oom_kill_counted(memcg: &Path, v2: bool) -> bool {
    let file = if v2 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let text = std::fs::read_to_string(memcg.join(file)).unwrap_or_default();
    parse_keyed(&text, "oom_kill").is_some_and(|n| n > 0)
}

// ---- file formats ----

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

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| parse_limit(&t))
}

// ---- v1 OOM notification ----

/// Register an eventfd on a v1 memory cgroup's `memory.oom_control`.
pub fn register_v1_oom_eventfd(memcg: &Path) -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers, touches no memory of ours, and returns a new fd or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd just returned by eventfd (checked >= 0 above); nothing else
    // owns it, so the OwnedFd is its only owner and closes it exactly once.
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
pub async fn watch_v1_oom(efd: OwnedFd, memcg: &Path, marker: &Path) -> std::io::Result<()> {
    // SAFETY: `efd` is an open OwnedFd moved into the AsyncFd, which owns it from here on: it
    // stays open (only the AsyncFd's drop closes it) and `as_raw_fd` of an OwnedFd always returns
    // the same descriptor, as `register_with_interest` requires.
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
        // SAFETY: `buf` is a live, writable 8-byte stack buffer and we pass its exact length, so
        // the kernel writes within it; the fd is the eventfd the AsyncFd keeps open.
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
