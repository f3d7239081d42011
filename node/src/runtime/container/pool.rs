//! The warm pool (`surge node --warm-pool TEMPLATE=N`): container sandboxes created ahead of
//! any placement, so a start only hands the job's process to one that already runs.
//!
//! ```text
//! fill:  bundle + overlay + cgroup + `crun run` of `surge-init pool`  (~all of a cold start)
//!        -> <data_dir>/pool/<slot>/, crun id surge-pool-<slot>, PID 1 waiting on fd 4
//! take:  rename crun's state dir, the cgroup dirs and the bundle to the sandbox's names,
//!        set the hostname (setns into the UTS namespace), write the job's limits to the
//!        cgroup, write the job's argv + env down fd 4  -> surge-init execs the command
//! ```
//!
//! **Why renames.** Everything else in the runtime (exec, files, stop, resize, checkpoint,
//! re-adoption after a daemon restart) finds a sandbox's container, cgroup and bundle by names
//! derived from its id. A pool sandbox is created before that id exists, so at take time its
//! names become the sandbox's: crun keeps a container's state in `<root>/<id>/` (the `status`
//! file names its cgroup and bundle, which are rewritten), cgroup directories can be renamed
//! within their parent on v1 and v2, and a bundle directory can be renamed while the overlay
//! mounted inside it is in use. The shim writes its exit code relative to its working
//! directory (the bundle), which follows the rename. After the take a pooled sandbox has the
//! same names, files and record as a cold one (only its PID 1's argv, `surge-init pool`,
//! tells them apart).
//!
//! **Identity.** The job's argv and environment (including `SURGE_SANDBOX_ID`) replace the
//! pool's in surge-init before the command runs; the hostname is set from the host; limits
//! are written to the cgroup. What the pool fixes ahead is what every sandbox of the node has
//! anyway for the node's sandbox user (uid, capabilities, rlimits, mounts, cwd `/work`), so
//! only jobs with the default user take pool sandboxes (`user = "root"` starts cold), and a
//! pool sandbox is used once: nothing of one job is ever seen by another.
//!
//! **Accounting.** The pool's sandboxes hold memory and, worse, the scheduler cannot see them:
//! the node registers its allocatable capacity minus [`reservation`] of its pool, so the
//! pool's reservation is never free capacity in the scheduler's books.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::crun::ShimMode;
use super::{container_id, ContainerRuntime, SandboxCgroup};
use crate::runtime::cgroup::{cpu_shares, parse_cgroup_mounts, CgroupLayout};
use crate::runtime::sandbox_dir::{release_mounts, write_json_atomic};
use crate::runtime::supervise::{process_start_ticks, RecordExtra};
use crate::runtime::{
    read_tail, Resources, RuntimeError, SandboxHandle, SandboxId, SandboxSpec, StartRequest, MIB,
};

/// Pool sandboxes per template at most.
pub const WARM_POOL_PER_TEMPLATE_MAX: u32 = 256;
/// Templates with a pool at most.
pub const WARM_POOL_TEMPLATES_MAX: usize = 16;
/// Size of a pool sandbox unless `TEMPLATE=N:CPU_MILLIS:MEMORY_MIB` says otherwise.
pub const WARM_POOL_DEFAULT: Resources = Resources {
    cpu_millis: 1000,
    memory_mib: 256,
};
/// Largest argv + environment handed to a pool sandbox: below a pipe's default capacity, so
/// the write never blocks (a larger spec starts cold).
pub const SPEC_MESSAGE_MAX: usize = 60 * 1024;
/// How long a pool sandbox may take to come up, and to go away when drained.
const POOL_START_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One `--warm-pool` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmPoolSpec {
    pub template: String,
    pub count: u32,
    /// Size of each pool sandbox: what the pool reserves.
    pub resources: Resources,
}

/// Parse `TEMPLATE=N` or `TEMPLATE=N:CPU_MILLIS:MEMORY_MIB`.
pub fn parse_warm_pool(arg: &str) -> Result<WarmPoolSpec, String> {
    let (template, rest) = arg.split_once('=').ok_or_else(|| {
        format!("--warm-pool {arg:?}: expected TEMPLATE=N[:CPU_MILLIS:MEMORY_MIB]")
    })?;
    crate::template::validate_name(template).map_err(|e| format!("--warm-pool {arg:?}: {e}"))?;
    let mut parts = rest.split(':');
    let number = |what: &str, v: Option<&str>| -> Result<u64, String> {
        v.ok_or_else(|| format!("--warm-pool {arg:?}: {what} missing"))?
            .parse::<u64>()
            .map_err(|e| format!("--warm-pool {arg:?}: {what}: {e}"))
    };
    let count = number("N", parts.next())?;
    if count > u64::from(WARM_POOL_PER_TEMPLATE_MAX) {
        return Err(format!(
            "--warm-pool {arg:?}: at most {WARM_POOL_PER_TEMPLATE_MAX} sandboxes per template"
        ));
    }
    let resources = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => WARM_POOL_DEFAULT,
        (cpu @ Some(_), memory @ Some(_), None) => Resources {
            cpu_millis: number("CPU_MILLIS", cpu)?,
            memory_mib: number("MEMORY_MIB", memory)?,
        },
        _ => {
            return Err(format!(
                "--warm-pool {arg:?}: expected TEMPLATE=N[:CPU_MILLIS:MEMORY_MIB]"
            ))
        }
    };
    if resources.cpu_millis == 0 || resources.memory_mib < 8 {
        return Err(format!(
            "--warm-pool {arg:?}: a pool sandbox needs some CPU and at least 8 MiB"
        ));
    }
    Ok(WarmPoolSpec {
        template: template.to_owned(),
        count: u32::try_from(count).expect("checked against WARM_POOL_PER_TEMPLATE_MAX"),
        resources,
    })
}

/// Check a node's whole `--warm-pool` list: one entry per template, at most
/// [`WARM_POOL_TEMPLATES_MAX`].
pub fn validate_warm_pools(specs: &[WarmPoolSpec]) -> Result<(), String> {
    if specs.len() > WARM_POOL_TEMPLATES_MAX {
        return Err(format!(
            "--warm-pool: at most {WARM_POOL_TEMPLATES_MAX} templates"
        ));
    }
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.template == s.template) {
            return Err(format!("--warm-pool: template {} given twice", s.template));
        }
    }
    Ok(())
}

/// What the pools hold when full: subtracted from what the node offers the scheduler.
pub fn reservation(specs: &[WarmPoolSpec]) -> Resources {
    specs.iter().fold(Resources::default(), |acc, s| Resources {
        cpu_millis: acc.cpu_millis + u64::from(s.count) * s.resources.cpu_millis,
        memory_mib: acc.memory_mib + u64::from(s.count) * s.resources.memory_mib,
    })
}

/// The message `surge-init pool` reads on fd 4: `LEN\n`, then NUL-terminated strings: the
/// number of arguments, the arguments, the environment. `None` when the spec cannot travel
/// this way (a NUL inside, or larger than [`SPEC_MESSAGE_MAX`]).
pub fn spec_message(argv: &[String], env: &[String]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let count = argv.len().to_string();
    for s in std::iter::once(&count).chain(argv).chain(env) {
        if s.as_bytes().contains(&0) {
            return None;
        }
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut msg = format!("{}\n", body.len()).into_bytes();
    msg.extend_from_slice(&body);
    (msg.len() <= SPEC_MESSAGE_MAX).then_some(msg)
}

/// The weight cgroup v2 gives for v1 CPU shares (crun's conversion).
pub(super) fn cpu_weight(shares: u64) -> u64 {
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// A pool sandbox that is up and waiting.
#[derive(Clone, Debug)]
struct Entry {
    slot: u32,
    shim_pid: u32,
    shim_ticks: u64,
}

/// The pools of one runtime.
pub(super) struct Pools {
    specs: Vec<WarmPoolSpec>,
    dir: PathBuf,
    ready: Mutex<HashMap<String, VecDeque<Entry>>>,
    next_slot: Mutex<u32>,
    /// Signalled when a placement took a pool sandbox (the refill task waits on it).
    wanted: tokio::sync::Notify,
    /// Every v1 hierarchy (crun makes the container's cgroup in each), or empty on v2.
    v1_mounts: Vec<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pools {
    pub(super) fn new(data_dir: &Path, specs: Vec<WarmPoolSpec>, layout: &CgroupLayout) -> Self {
        let v1_mounts = match layout {
            CgroupLayout::V2 { .. } => Vec::new(),
            CgroupLayout::V1 { .. } => std::fs::read_to_string("/proc/self/mountinfo")
                .map(|m| {
                    parse_cgroup_mounts(&m)
                        .into_iter()
                        .filter(|c| !c.v2)
                        .map(|c| c.mount_point)
                        .collect()
                })
                .unwrap_or_default(),
        };
        let dir = data_dir.join("pool");
        // Slots continue after those a previous daemon process left (cleared by
        // `pool_clear_leftovers`), so a new pool sandbox never meets an old one's names.
        let last = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        Self {
            specs,
            dir,
            ready: Mutex::new(HashMap::new()),
            next_slot: Mutex::new(last),
            wanted: tokio::sync::Notify::new(),
            v1_mounts,
        }
    }
}

fn pool_cid(slot: u32) -> String {
    format!("surge-pool-{slot}")
}

/// The id a pool sandbox goes by in messages before it is taken.
fn pool_id(slot: u32) -> SandboxId {
    SandboxId::new(0, slot)
}

impl ContainerRuntime {
    /// The configured pools.
    pub fn warm_pools(&self) -> &[WarmPoolSpec] {
        &self.pools.specs
    }

    /// Returns once a placement took a pool sandbox since the last call.
    pub async fn pool_wanted(&self) {
        self.pools.wanted.notified().await;
    }

    /// Pool sandboxes up and waiting, per template.
    pub fn pool_ready(&self) -> HashMap<String, usize> {
        lock(&self.pools.ready)
            .iter()
            .map(|(t, q)| (t.clone(), q.len()))
            .collect()
    }

    /// Bring every pool up to its count, one sandbox at a time (placements, which do not wait
    /// for this, come first on a busy node). Returns how many were made.
    pub async fn pool_refill(&self) -> Result<u32, RuntimeError> {
        let mut made = 0;
        for spec in self.pools.specs.clone() {
            loop {
                let have = lock(&self.pools.ready)
                    .get(&spec.template)
                    .map_or(0, VecDeque::len);
                if have >= usize::try_from(spec.count).unwrap_or(usize::MAX) {
                    break;
                }
                let entry = self.pool_fill_one(&spec).await?;
                lock(&self.pools.ready)
                    .entry(spec.template.clone())
                    .or_default()
                    .push_back(entry);
                made += 1;
            }
        }
        Ok(made)
    }

    /// Create one pool sandbox of `spec` and wait until its PID 1 runs.
    async fn pool_fill_one(&self, spec: &WarmPoolSpec) -> Result<Entry, RuntimeError> {
        let slot = {
            let mut next = lock(&self.pools.next_slot);
            *next = next.wrapping_add(1);
            *next
        };
        let dir = self.pools.dir.join(slot.to_string());
        let cid = pool_cid(slot);
        let _ = std::fs::remove_dir_all(&dir);
        let made = self.pool_create(spec, slot, &dir, &cid).await;
        if made.is_err() {
            self.pool_destroy(slot, None).await;
        }
        made
    }

    async fn pool_create(
        &self,
        spec: &WarmPoolSpec,
        slot: u32,
        dir: &Path,
        cid: &str,
    ) -> Result<Entry, RuntimeError> {
        let req = StartRequest {
            id: pool_id(slot),
            generation: 0,
            revision: 0,
            spec: SandboxSpec {
                template: spec.template.clone(),
                ..Default::default()
            },
            resources: spec.resources,
        };
        let cgroup = SandboxCgroup::new(&self.layout, &self.config.cgroup_parent, cid);
        let mut config = self.make_bundle(&req, dir, &cgroup)?;
        config["process"]["args"] = serde_json::json!([super::init::INIT_IN_SANDBOX, "pool"]);
        config["hostname"] = "sb-pool".into();
        write_json_atomic(&dir.join("config.json"), &config)?;
        mkfifo(&dir.join("spec.fifo"))?;
        let shim = self
            .crun
            .spawn_shim(pool_id(slot), dir, cid, ShimMode::Pool)?;
        let ticks = process_start_ticks(shim).unwrap_or(0);
        // Up once crun has written the pid file (the container runs `surge-init pool`).
        let deadline = tokio::time::Instant::now() + POOL_START_TIMEOUT;
        let mut delay = Duration::from_micros(500);
        loop {
            if dir.join("container.pid").is_file() {
                return Ok(Entry {
                    slot,
                    shim_pid: shim,
                    shim_ticks: ticks,
                });
            }
            if process_start_ticks(shim) != Some(ticks) || tokio::time::Instant::now() > deadline {
                return Err(RuntimeError::StartFailed {
                    id: pool_id(slot),
                    reason: format!("the pool sandbox {cid} did not come up"),
                    stderr_tail: read_tail(&dir.join("stderr.log"), 2048).unwrap_or_default(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(2));
        }
    }

    /// Whether `req` may take a pool sandbox: its template has a pool, the job runs as the
    /// node's sandbox user, it is not a fork, and the node does not checkpoint (pool sandboxes
    /// run under Debian's crun with stdio on files).
    fn pool_fits(&self, req: &StartRequest) -> bool {
        req.spec.user != "root"
            && req.spec.fork_of.is_none()
            && self.criu.is_err()
            && lock(&self.pools.ready)
                .get(&req.spec.template)
                .is_some_and(|q| !q.is_empty())
    }

    /// Start `req` in a pool sandbox if one fits; `None`: start it cold.
    pub(super) async fn start_from_pool(
        &self,
        req: &StartRequest,
    ) -> Option<Result<SandboxHandle, RuntimeError>> {
        if !self.pool_fits(req) {
            return None;
        }
        let config = self.oci_config_of(req, "").ok()?;
        let strings = |v: &serde_json::Value, skip: usize| -> Option<Vec<String>> {
            Some(
                v.as_array()?
                    .iter()
                    .skip(skip)
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect(),
            )
        };
        // `surge-init init CMD...`: the pool's PID 1 is surge-init already.
        let argv = strings(&config["process"]["args"], 2)?;
        let env = strings(&config["process"]["env"], 0)?;
        let message = spec_message(&argv, &env)?;
        let entry = lock(&self.pools.ready)
            .get_mut(&req.spec.template)?
            .pop_front()?;
        self.pools.wanted.notify_one();
        let bundle = match self.sandboxes.begin_start(self, req.id) {
            Ok(b) => b,
            Err(e) => {
                lock(&self.pools.ready)
                    .entry(req.spec.template.clone())
                    .or_default()
                    .push_front(entry);
                return Some(Err(e));
            }
        };
        let sb = match self.pool_rename(req, &entry, &bundle) {
            Ok(sb) => sb,
            Err(e) => {
                tracing::warn!(sandbox = %req.id, error = %e, "a pool sandbox could not be taken; starting cold");
                self.pool_destroy(entry.slot, Some(req.id)).await;
                return None;
            }
        };
        Some(self.pool_launch(req, &sb, &bundle, &message).await)
    }

    /// Give the pool sandbox the names of `req`'s sandbox and hold it as that sandbox.
    fn pool_rename(
        &self,
        req: &StartRequest,
        entry: &Entry,
        bundle: &Path,
    ) -> Result<std::sync::Arc<super::Sandbox>, RuntimeError> {
        let from_cid = pool_cid(entry.slot);
        let to_cid = container_id(req.id);
        let io = |what: String| move |e| RuntimeError::io(what, e);
        let from = SandboxCgroup::new(&self.layout, &self.config.cgroup_parent, &from_cid);
        let to = SandboxCgroup::new(&self.layout, &self.config.cgroup_parent, &to_cid);
        // crun's state: the directory is the container's id; its status names cgroup and bundle.
        let state = self.crun.root().join(&to_cid);
        std::fs::rename(self.crun.root().join(&from_cid), &state)
            .map_err(io(format!("rename crun state {from_cid}")))?;
        self.rename_cgroups(&from_cid, &to_cid, &from, &to)?;
        let pool_dir = self.pools.dir.join(entry.slot.to_string());
        std::fs::rename(&pool_dir, bundle).map_err(io(format!(
            "rename {} to {}",
            pool_dir.display(),
            bundle.display()
        )))?;
        patch_json(&state.join("status"), |s| {
            s["cgroup-path"] = to.crun_path.clone().into();
            s["bundle"] = bundle.display().to_string().into();
        })?;
        let config = self.oci_config_of(req, &to.crun_path)?;
        patch_json(&state.join("config.json"), |c| {
            c["hostname"] = config["hostname"].clone();
            c["linux"]["cgroupsPath"] = to.crun_path.clone().into();
        })?;
        write_json_atomic(&bundle.join("config.json"), &config)?;
        let mut record = self.record_of(req);
        record.extra.set_process(entry.shim_pid, entry.shim_ticks);
        write_json_atomic(&bundle.join("meta.json"), &record)?;
        Ok(self.sandboxes.insert(self, record))
    }

    /// The job's hostname, limits and process for a renamed pool sandbox; running once
    /// surge-init says the command runs. A failure before the command is handed over kills
    /// the container: the sandbox then reports a failed start like a cold one.
    async fn pool_launch(
        &self,
        req: &StartRequest,
        sb: &std::sync::Arc<super::Sandbox>,
        bundle: &Path,
        message: &[u8],
    ) -> Result<SandboxHandle, RuntimeError> {
        if let Err(e) = self.pool_identity(req, sb, bundle, message) {
            let cid = OsString::from(container_id(req.id));
            let _ = self
                .crun
                .run(&[
                    OsStr::new("kill"),
                    OsStr::new("--all"),
                    &cid,
                    OsStr::new("KILL"),
                ])
                .await;
            return Err(RuntimeError::StartFailed {
                id: req.id,
                reason: format!("the pool sandbox could not be given the job: {e}"),
                stderr_tail: String::new(),
            });
        }
        let pid = self.sandboxes.await_started(self, sb).await?;
        self.watch_oom(sb);
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: Some(pid),
        })
    }

    fn pool_identity(
        &self,
        req: &StartRequest,
        sb: &super::Sandbox,
        bundle: &Path,
        message: &[u8],
    ) -> Result<(), RuntimeError> {
        let io = |what: String| move |e| RuntimeError::io(what, e);
        let pid = super::shim::container_pid(sb).ok_or_else(|| {
            RuntimeError::io(
                "read container.pid",
                std::io::Error::new(std::io::ErrorKind::NotFound, "no pid"),
            )
        })?;
        set_hostname(pid, &format!("sb-{}-{}", req.id.job, req.id.index))?;
        let r = req.resources;
        sb.cgroup
            .dirs
            .set_limits(r.memory_mib * MIB, r.cpu_millis)?;
        let shares = cpu_shares(r.cpu_millis);
        let (file, value) = if sb.cgroup.dirs.v2 {
            ("cpu.weight", cpu_weight(shares))
        } else {
            ("cpu.shares", shares)
        };
        std::fs::write(sb.cgroup.dirs.cpu.join(file), value.to_string())
            .map_err(io(format!("write {file} of sandbox {}", req.id)))?;
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags_nonblock()
            .open(bundle.join("spec.fifo"))
            .map_err(io(format!("open the spec pipe of sandbox {}", req.id)))?;
        fifo.write_all(message)
            .map_err(io(format!("hand sandbox {} its command", req.id)))
    }

    fn rename_cgroups(
        &self,
        from_cid: &str,
        to_cid: &str,
        from: &SandboxCgroup,
        to: &SandboxCgroup,
    ) -> Result<(), RuntimeError> {
        let io = |what: String| move |e| RuntimeError::io(what, e);
        if let (Some(a), Some(b)) = (&from.owned, &to.owned) {
            // v2: surge's directory holds crun's `ctr`; it moves with it.
            return std::fs::rename(a, b).map_err(io(format!("rename cgroup {}", a.display())));
        }
        let parent = self.config.cgroup_parent.trim_matches('/');
        for mount in &self.pools.v1_mounts {
            let a = mount.join(parent).join(from_cid);
            if a.is_dir() {
                std::fs::rename(&a, mount.join(parent).join(to_cid))
                    .map_err(io(format!("rename cgroup {}", a.display())))?;
            }
        }
        Ok(())
    }

    /// Stop and remove a pool sandbox and everything it holds (its crun container, cgroups,
    /// overlay mount and directory), under its pool names or, after a failed take, `taken`'s.
    async fn pool_destroy(&self, slot: u32, taken: Option<SandboxId>) {
        let mut cids = vec![pool_cid(slot)];
        let mut dirs = vec![self.pools.dir.join(slot.to_string())];
        if let Some(id) = taken {
            cids.push(container_id(id));
            dirs.push(self.sandboxes.dir_of(id));
            self.sandboxes.forget_loaded(id);
        }
        for cid in &cids {
            let cid = OsString::from(cid);
            let _ = self
                .crun
                .run(&[
                    OsStr::new("kill"),
                    OsStr::new("--all"),
                    &cid,
                    OsStr::new("KILL"),
                ])
                .await;
        }
        // The shim (`crun run`) deletes the container once it is gone; wait for that.
        let deadline = tokio::time::Instant::now() + POOL_STOP_TIMEOUT;
        while cids.iter().any(|c| self.crun.root().join(c).exists())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for cid in &cids {
            self.crun.delete_force(cid).await;
            let cg = SandboxCgroup::new(&self.layout, &self.config.cgroup_parent, cid);
            if let Some(owned) = &cg.owned {
                let _ = std::fs::remove_dir(owned.join("ctr"));
                let _ = std::fs::remove_dir(owned);
            }
            let parent = self.config.cgroup_parent.trim_matches('/');
            for mount in &self.pools.v1_mounts {
                let _ = std::fs::remove_dir(mount.join(parent).join(cid));
            }
        }
        for dir in &dirs {
            release_mounts(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Stop every pool sandbox (node shutdown). Nothing of the pools stays on the host.
    pub async fn pool_drain(&self) {
        let entries: Vec<Entry> = lock(&self.pools.ready)
            .drain()
            .flat_map(|(_, q)| q)
            .collect();
        for e in entries {
            self.pool_destroy(e.slot, None).await;
        }
        self.pool_clear_leftovers().await;
    }

    /// Remove pool sandboxes a previous daemon process left (it died without draining).
    pub async fn pool_clear_leftovers(&self) {
        let Ok(dir) = std::fs::read_dir(&self.pools.dir) else {
            return;
        };
        let held: Vec<u32> = lock(&self.pools.ready)
            .values()
            .flatten()
            .map(|e| e.slot)
            .collect();
        let slots: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|s| !held.contains(s))
            .collect();
        for slot in slots {
            self.pool_destroy(slot, None).await;
        }
    }
}

/// Read, change and atomically rewrite a JSON file.
fn patch_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Result<(), RuntimeError> {
    let text =
        std::fs::read(path).map_err(|e| RuntimeError::io(format!("read {}", path.display()), e))?;
    let mut v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        RuntimeError::io(
            format!("parse {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    f(&mut v);
    let tmp = path.with_extension("surge-tmp");
    let bytes = serde_json::to_vec(&v).map_err(|e| {
        RuntimeError::io(
            format!("encode {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| RuntimeError::io(format!("write {}", path.display()), e))
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    /// A FIFO opened for writing without blocking: it fails (ENXIO) when nobody reads, instead
    /// of waiting for a reader that is gone.
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn mkfifo(path: &Path) -> Result<(), RuntimeError> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        RuntimeError::io(
            format!("mkfifo {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
        )
    })?;
    // SAFETY: `c` is a NUL-terminated path that lives across the call; mkfifo only reads it.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(RuntimeError::io(
            format!("mkfifo {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Set the hostname of the UTS namespace `pid` is in. A thread of its own joins the namespace
/// (UTS may be joined by one thread of a multi-threaded process) and ends with it.
fn set_hostname(pid: u32, hostname: &str) -> Result<(), RuntimeError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/uts"))
        .map_err(|e| RuntimeError::io(format!("open the UTS namespace of {pid}"), e))?;
    let name = hostname.as_bytes().to_vec();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns takes an open namespace fd (held by `ns` for the call) and a flag; it
        // changes only this thread's UTS namespace, and this thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUTS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `name` is a buffer of `name.len()` bytes alive across the call; sethostname
        // only reads it.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .map_err(|_| RuntimeError::Cgroup("the hostname thread panicked".into()))?
    .map_err(|e| RuntimeError::io(format!("set the hostname of {pid}"), e))
}
