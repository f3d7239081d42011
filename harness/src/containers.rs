//! Real node daemons on the container runtime in a chaos run: whether this host can run them,
//! what they run right now (read from crun's own state, not from the daemon), and removing
//! everything they leave behind at the end: containers, their shims, overlay mounts and cgroups.
//!
//! A daemon's sandboxes outlive it on purpose (a restarted daemon re-adopts them), so killing
//! the daemons at the end of a run leaves containers running; [`cleanup`] removes them and
//! [`leftovers`] says whether anything of the run is still on the host.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One container node daemon of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDaemon {
    /// Node id; also the last component of its cgroup parent (`/surge/NODE`).
    pub node: String,
    /// Its `--data-dir`: bundles under `sandboxes/`, crun's state under `crun/`.
    pub data_dir: PathBuf,
}

impl ContainerDaemon {
    pub fn crun_root(&self) -> PathBuf {
        self.data_dir.join("crun")
    }
}

/// Most containers one daemon's crun state is read for (a sample, a cleanup).
pub const CONTAINERS_PER_NODE_MAX: usize = 4096;
/// How long one `crun` command of the harness may take.
pub const CRUN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`cleanup`] keeps retrying cgroups that are still busy (tasks exiting).
pub const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this host can run container nodes: root, `/bin/busybox` for the default template,
/// and the container runtime's own check (crun runnable, a cgroup filesystem with the memory
/// controller, a data dir overlayfs accepts), made on a throwaway data dir.
pub fn usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (containers need namespaces, cgroups and overlay mounts)".into());
    }
    if !Path::new(surge_node::template::HOST_BUSYBOX).is_file() {
        return Err(format!(
            "{} is missing (apt-get install -y busybox-static)",
            surge_node::template::HOST_BUSYBOX
        ));
    }
    let probe = tempfile::Builder::new()
        .prefix("surge-chaos-probe-")
        .tempdir()
        .map_err(|e| format!("cannot create a probe dir: {e}"))?;
    use surge_node::runtime::container::{ContainerConfig, ContainerRuntime};
    ContainerRuntime::new(ContainerConfig::new(probe.path()))
        .map(drop)
        .map_err(|e| format!("the container runtime is not usable here: {e}"))
}

/// One entry of `crun list --format json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrunContainer {
    pub id: String,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    pub bundle: PathBuf,
}

/// Parse `crun list --format json` (an array of objects with `id`, `status`, `bundle`).
pub fn parse_crun_list(json: &str) -> Result<Vec<CrunContainer>, String> {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .map_err(|e| format!("crun list printed no JSON array: {e}"))?;
    let arr = v
        .as_array()
        .ok_or_else(|| "crun list printed no JSON array".to_string())?;
    if arr.len() > CONTAINERS_PER_NODE_MAX {
        return Err(format!(
            "crun lists {} containers; at most {CONTAINERS_PER_NODE_MAX} are read",
            arr.len()
        ));
    }
    arr.iter()
        .map(|c| {
            let field = |k: &str| {
                c.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| format!("crun list entry without {k:?}: {c}"))
            };
            Ok(CrunContainer {
                id: field("id")?,
                status: field("status")?,
                bundle: PathBuf::from(field("bundle")?),
            })
        })
        .collect()
}

/// The sandbox a surge container id names (`surge-JOB-INDEX`, see
/// `surge_node::runtime::container::container_id`).
pub fn sandbox_of_container(id: &str) -> Option<(u64, u32)> {
    let (job, index) = id.strip_prefix("surge-")?.split_once('-')?;
    Some((job.parse().ok()?, index.parse().ok()?))
}

/// Run a command with a deadline; its stdout when it succeeded.
fn run(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}"));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn crun(d: &ContainerDaemon, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("crun");
    cmd.arg("--root").arg(d.crun_root()).args(args);
    run(&mut cmd, CRUN_TIMEOUT)
}

/// The containers crun holds for daemon `d` (none before its first sandbox).
pub fn containers(d: &ContainerDaemon) -> Result<Vec<CrunContainer>, String> {
    if !d.crun_root().is_dir() {
        return Ok(Vec::new());
    }
    parse_crun_list(&crun(d, &["list", "--format", "json"])?)
}

/// One sandbox a daemon's crun runs, and the generation its bundle records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningCopy {
    pub job: u64,
    pub index: u32,
    pub generation: u64,
}

/// What daemon `d` runs right now, as crun sees it: every container that is not stopped, with
/// the generation its bundle records. This is the ground truth of a double run: a sandbox the
/// scheduler placed once but two hosts execute shows here and nowhere else.
pub fn running_copies(d: &ContainerDaemon) -> Result<Vec<RunningCopy>, String> {
    let mut out = Vec::new();
    for c in containers(d)? {
        if !matches!(c.status.as_str(), "created" | "running" | "paused") {
            continue;
        }
        let Some((job, index)) = sandbox_of_container(&c.id) else {
            continue;
        };
        // The bundle may be removed between the list and this read (the sandbox ended): then it
        // is not running any more either.
        let Ok(text) = std::fs::read_to_string(c.bundle.join("meta.json")) else {
            continue;
        };
        let generation = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|m| m.get("generation").and_then(|g| g.as_u64()))
            .ok_or_else(|| format!("{}/meta.json has no generation", c.bundle.display()))?;
        out.push(RunningCopy {
            job,
            index,
            generation,
        });
    }
    Ok(out)
}

/// Mount points (from a mountinfo text) at or under `root`.
pub fn mounts_under(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// The cgroup directories daemon `node` owns: `/surge/NODE` under every cgroup filesystem.
fn cgroup_dirs(node: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    surge_node::runtime::container::parse_cgroup_mounts(&mountinfo)
        .into_iter()
        .map(|m| m.mount_point.join("surge").join(node))
        .collect()
}

/// Remove a cgroup directory tree, children first (a cgroup directory holds only control files,
/// which `rmdir` takes with it once no task is left).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Processes whose command line names `needle` (the shims of a daemon name its crun root).
fn processes_naming(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle))
        })
        .collect()
}

/// Remove every container, shim, mount and cgroup of the daemons (which must be dead already)
/// and everything mounted under `root`. Best effort; [`leftovers`] says what remains.
pub fn cleanup(daemons: &[ContainerDaemon], root: &Path) {
    for d in daemons {
        let listed = containers(d).unwrap_or_default();
        for c in &listed {
            // A frozen container (a paused sandbox) cannot die until thawed.
            if c.status == "paused" {
                let _ = crun(d, &["resume", &c.id]);
            }
            let _ = crun(d, &["kill", "--all", &c.id, "KILL"]);
            let _ = crun(d, &["delete", "--force", &c.id]);
        }
        for pid in processes_naming(&d.crun_root()) {
            // SAFETY: kill(2) with a pid read from /proc; at worst the process is already gone.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    // Overlay roots, deepest first.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts = mounts_under(&mountinfo, root);
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; a path that is not mounted is an error we ignore.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    let deadline = Instant::now() + CGROUP_REMOVE_TIMEOUT;
    for d in daemons {
        for dir in cgroup_dirs(&d.node) {
            while remove_cgroup_tree(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Whatever of the daemons' work is still on the host: containers crun knows, shim processes,
/// mounts under `root`, cgroup directories. Empty after a clean [`cleanup`].
pub fn leftovers(daemons: &[ContainerDaemon], root: &Path) -> Vec<String> {
    let mut left = BTreeSet::new();
    for d in daemons {
        match containers(d) {
            Ok(cs) => {
                for c in cs {
                    left.insert(format!(
                        "container {} ({}) of node {}",
                        c.id, c.status, d.node
                    ));
                }
            }
            Err(e) => {
                left.insert(format!("crun state of node {} unreadable: {e}", d.node));
            }
        }
        for pid in processes_naming(&d.crun_root()) {
            left.insert(format!("process {pid} of node {}", d.node));
        }
        for dir in cgroup_dirs(&d.node) {
            if dir.exists() {
                left.insert(format!("cgroup {}", dir.display()));
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts_under(&mountinfo, root) {
        left.insert(format!("mount {}", m.display()));
    }
    left.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crun_list_parses() {
        let json = r#"[
            {"id":"surge-12-3","pid":4242,"status":"running","bundle":"/d/sandboxes/12.3","created":"2026-11-29T00:00:00Z","owner":"root"},
            {"id":"surge-12-4","pid":0,"status":"stopped","bundle":"/d/sandboxes/12.4","created":"2026-11-29T00:00:00Z","owner":"root"}
        ]"#;
        let list = parse_crun_list(json).expect("parses");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, "surge-12-3");
        assert_eq!(list[0].status, "running");
        assert_eq!(list[1].bundle, PathBuf::from("/d/sandboxes/12.4"));
        assert_eq!(parse_crun_list("[\n\n]").expect("empty"), Vec::new());
        assert!(parse_crun_list("ID PID STATUS").is_err());
        assert!(parse_crun_list(r#"[{"id":"x"}]"#).is_err());
    }

    #[test]
    fn container_ids_name_sandboxes() {
        assert_eq!(sandbox_of_container("surge-12-3"), Some((12, 3)));
        assert_eq!(sandbox_of_container("surge-12"), None);
        assert_eq!(sandbox_of_container("other-1-2"), None);
        assert_eq!(sandbox_of_container("surge-a-2"), None);
    }

    #[test]
    fn mounts_under_the_root_are_found() {
        let info = "\
36 35 98:0 / /mnt1 rw - ext3 /dev/root rw
41 36 0:40 / /tmp/run/nodes-a/sandboxes/3.0/rootfs rw - overlay overlay rw,lowerdir=x
42 36 0:41 / /tmp/run-other/x rw - overlay overlay rw
43 36 0:42 / /tmp/run/with\\040space rw - tmpfs tmpfs rw";
        assert_eq!(
            mounts_under(info, Path::new("/tmp/run")),
            vec![
                PathBuf::from("/tmp/run/nodes-a/sandboxes/3.0/rootfs"),
                PathBuf::from("/tmp/run/with space"),
            ]
        );
    }
}
