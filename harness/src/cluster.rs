//! A cluster of `surge server` processes on loopback.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use surge_proto::cluster::{StatusReply, StatusRequest};

use crate::netns::{Net, NetError};
use surge_client as client;

/// Most replicas one local cluster runs.
pub const REPLICAS_MAX: u64 = 9;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start replica {id}: {source}")]
    Spawn { id: u64, source: std::io::Error },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("replica {0} is not part of this local cluster")]
    Unknown(u64),
    #[error("{what} within {timeout:?}; last state: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Client(#[from] client::ConnectError),
    #[error("{0}")]
    Net(#[from] NetError),
}

/// How a replica process is started.
#[derive(Clone, Debug)]
pub enum StartMode {
    /// `--bootstrap` with the cluster's initial replicas.
    Bootstrap,
    /// `--join ADDR`.
    Join(String),
    /// Neither: restart from the data dir.
    Resume,
}

#[derive(Debug)]
pub struct Replica {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Replicas (and node daemons) as child processes of this process.
pub struct LocalCluster {
    bin: PathBuf,
    root: PathBuf,
    replicas: BTreeMap<u64, Replica>,
    /// `surge node` processes by group name.
    node_groups: BTreeMap<String, Child>,
    /// The `--bootstrap` list: the replicas the cluster was formed with.
    initial: Vec<u64>,
    extra_args: Vec<String>,
    /// What this harness presents to the replicas when it asks them for their status.
    credentials: client::Credentials,
    /// With [`LocalCluster::with_netns`]: each replica on its own network host.
    net: Option<Net>,
}

/// Lowest port handed out by [`free_port`].
const PORTS_FROM: u32 = 20_000;

/// A free port on 127.0.0.1, below the kernel's ephemeral range. Ports from that range
/// (what binding port 0 returns) are also what outgoing connections use: a replica stopped and
/// restarted on its port could find it taken by some client's connection in between.
pub fn free_port() -> Result<u16, ClusterError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(32_768);
    let span = ephemeral_from.saturating_sub(PORTS_FROM).max(1);
    // Spread processes apart; a counter keeps one process's clusters apart.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(4_096) {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = PORTS_FROM + (offset + n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(ClusterError::Port)?;
    Ok(l.local_addr().map_err(ClusterError::Port)?.port())
}

impl LocalCluster {
    /// Plan `n` replicas with data under `root`. With `base_port`, replica i listens on
    /// `base_port + i - 1` (gRPC) and `base_port + 10 + i - 1` (HTTP); otherwise on free ports.
    pub fn new(
        bin: &Path,
        root: &Path,
        n: u64,
        base_port: Option<u16>,
    ) -> Result<Self, ClusterError> {
        let mut cluster = LocalCluster {
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            replicas: BTreeMap::new(),
            node_groups: BTreeMap::new(),
            initial: (1..=n).collect(),
            extra_args: Vec::new(),
            credentials: client::Credentials::default(),
            net: None,
        };
        for id in 1..=n.min(REPLICAS_MAX) {
            cluster.plan(id, base_port)?;
        }
        Ok(cluster)
    }

    /// Extra flags for every `surge server` started from now on (e.g. snapshot tuning).
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Runs every replica in its own network namespace on `net` (created with the replicas'
    /// ids), so that faults can partition them; addresses move from loopback to `net`'s hosts.
    /// Call before starting any replica.
    pub fn with_netns(mut self, net: Net) -> Result<Self, ClusterError> {
        for r in self.replicas.values_mut() {
            let ip = net.addr(r.id)?;
            let port = |a: &str| a.rsplit(':').next().unwrap_or_default().to_string();
            r.grpc = format!("{ip}:{}", port(&r.grpc));
            r.http = format!("{ip}:{}", port(&r.http));
        }
        self.net = Some(net);
        Ok(self)
    }

    /// The replicas' network, when they run on one.
    pub fn net_mut(&mut self) -> Option<&mut Net> {
        self.net.as_mut()
    }

    /// Credentials for the harness's own calls (status, leader and convergence waits), for a
    /// cluster started with `--tls-dir` (and `--tokens`) through [`Self::with_args`].
    pub fn with_credentials(mut self, credentials: client::Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Add a replica to the plan (not started) and return its id.
    pub fn plan(&mut self, id: u64, base_port: Option<u16>) -> Result<u64, ClusterError> {
        let (grpc, http) = match base_port {
            Some(p) => {
                let offset = u16::try_from(id - 1).unwrap_or(0);
                (p + offset, p + 10 + offset)
            }
            None => (free_port()?, free_port()?),
        };
        let data_dir = self.root.join(format!("replica-{id}"));
        let log = self.root.join(format!("replica-{id}.log"));
        let host = match &mut self.net {
            Some(net) => net.host(id)?.to_string(),
            None => "127.0.0.1".to_string(),
        };
        self.replicas.insert(
            id,
            Replica {
                id,
                grpc: format!("{host}:{grpc}"),
                http: format!("{host}:{http}"),
                data_dir,
                log,
                child: None,
            },
        );
        Ok(id)
    }

    /// Process ids of the node daemons this cluster started.
    pub fn node_pids(&self) -> Vec<u32> {
        self.node_groups.values().map(Child::id).collect()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.replicas.keys().copied().collect()
    }

    fn replica_mut(&mut self, id: u64) -> Result<&mut Replica, ClusterError> {
        self.replicas.get_mut(&id).ok_or(ClusterError::Unknown(id))
    }

    pub fn replica(&self, id: u64) -> Result<&Replica, ClusterError> {
        self.replicas.get(&id).ok_or(ClusterError::Unknown(id))
    }

    /// Whether replica `id`'s process is alive.
    pub fn replica_running(&mut self, id: u64) -> bool {
        self.replicas.get_mut(&id).is_some_and(Replica::is_running)
    }

    pub fn addr(&self, id: u64) -> Result<String, ClusterError> {
        Ok(self.replica(id)?.grpc.clone())
    }

    pub fn bootstrap_spec(&self) -> String {
        self.initial
            .iter()
            .filter_map(|id| self.replicas.get(id))
            .map(|r| format!("{}={}", r.id, r.grpc))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start every planned replica that is not running, as the initial cluster.
    pub fn start_all(&mut self) -> Result<(), ClusterError> {
        for id in self.ids() {
            if !self.replicas.get_mut(&id).is_some_and(Replica::is_running) {
                self.start(id, StartMode::Bootstrap)?;
            }
        }
        Ok(())
    }

    pub fn start(&mut self, id: u64, mode: StartMode) -> Result<(), ClusterError> {
        let bootstrap = self.bootstrap_spec();
        let extra = self.extra_args.clone();
        let bin = self.bin.clone();
        let namespace = self.net.as_ref().map(|n| n.namespace(id));
        let r = self.replica_mut(id)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)?;
        // `ip netns exec` enters the namespace and execs the server: the child is the server.
        let mut cmd = match &namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("server")
            .args(["--id", &id.to_string()])
            .args(["--listen", &r.grpc])
            .args(["--metrics", &r.http])
            .arg("--data-dir")
            .arg(&r.data_dir);
        match mode {
            StartMode::Bootstrap => {
                cmd.args(["--bootstrap", &bootstrap]);
            }
            StartMode::Join(seed) => {
                cmd.args(["--join", &seed]);
            }
            StartMode::Resume => {}
        }
        cmd.args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|source| ClusterError::Spawn { id, source })?;
        r.child = Some(child);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill(&mut self, id: u64) -> Result<(), ClusterError> {
        let r = self.replica_mut(id)?;
        if let Some(mut c) = r.child.take() {
            reap(&mut c);
        }
        Ok(())
    }

    /// [`Self::stop`] that waits without blocking the runtime's thread.
    pub async fn stop_async(&mut self, id: u64, grace: Duration) -> Result<(), ClusterError> {
        if let Some(mut s) = self.begin_stop(id, grace)? {
            while !s.over() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, id: u64, grace: Duration) -> Result<(), ClusterError> {
        if let Some(mut s) = self.begin_stop(id, grace)? {
            while !s.over() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// SIGTERM a running replica; `None` when it is not running.
    fn begin_stop(&mut self, id: u64, grace: Duration) -> Result<Option<Stopping>, ClusterError> {
        let r = self.replica_mut(id)?;
        Ok(r.child.take().map(|child| {
            signal(&child, libc::SIGTERM);
            Stopping {
                child,
                deadline: Instant::now() + grace,
            }
        }))
    }

    /// SIGSTOP (`resume == false`) or SIGCONT.
    pub fn pause(&mut self, id: u64, resume: bool) -> Result<(), ClusterError> {
        let r = self.replica_mut(id)?;
        if let Some(c) = &r.child {
            signal(c, if resume { libc::SIGCONT } else { libc::SIGSTOP });
        }
        Ok(())
    }

    /// Delete a (stopped) replica's data dir.
    pub fn wipe(&mut self, id: u64) -> Result<(), ClusterError> {
        let r = self.replicas.get(&id).ok_or(ClusterError::Unknown(id))?;
        match std::fs::remove_dir_all(&r.data_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn stop_all(&mut self, grace: Duration) {
        for id in self.ids() {
            let _ = self.stop(id, grace);
        }
    }

    pub async fn status(&self, id: u64) -> Result<StatusReply, String> {
        let addr = self.addr(id).map_err(|e| e.to_string())?;
        let mut c =
            client::connect::cluster(&addr, &self.credentials).map_err(|e| e.to_string())?;
        let call = c.status(StatusRequest {});
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Err(_) => Err(format!("replica {id} did not answer status")),
            Ok(Err(s)) => Err(format!("replica {id}: {}", s.message())),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Wait until every running replica agrees on one leader; return its id.
    pub async fn wait_leader(&mut self, timeout: Duration) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            let running: Vec<u64> = self
                .replicas
                .iter_mut()
                .filter_map(|(id, r)| r.is_running().then_some(*id))
                .collect();
            let mut leaders = Vec::new();
            for id in &running {
                match self.status(*id).await {
                    Ok(s) => leaders.push(s.leader_id),
                    Err(e) => {
                        last = e;
                        leaders.push(0);
                    }
                }
            }
            if let Some(&l) = leaders.first() {
                if l != 0 && leaders.iter().all(|x| *x == l) && running.contains(&l) {
                    return Ok(l);
                }
                last = format!("leaders seen by replicas {running:?}: {leaders:?}");
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: "no agreed leader".into(),
                    timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the given replicas report the same applied index and state hash.
    pub async fn wait_converged(
        &self,
        ids: &[u64],
        timeout: Duration,
    ) -> Result<StatusReply, ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let mut seen = Vec::new();
            for id in ids {
                match self.status(*id).await {
                    Ok(s) => seen.push(s),
                    Err(e) => last = e,
                }
            }
            if seen.len() == ids.len() {
                let first = &seen[0];
                if seen.iter().all(|s| {
                    s.applied_index == first.applied_index && s.state_hash == first.state_hash
                }) {
                    return Ok(first.clone());
                }
                last = seen
                    .iter()
                    .map(|s| {
                        format!(
                            "{}: applied {} hash {:.12}",
                            s.id, s.applied_index, s.state_hash
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: format!("replicas {ids:?} did not converge"),
                    timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Start a `surge node` process hosting `count` simulated nodes named `GROUP-0..`, talking to
    /// every replica; `args` are extra `surge node` flags (e.g. `--cpus 64`).
    pub fn start_sim_nodes(
        &mut self,
        group: &str,
        count: u32,
        args: &[&str],
    ) -> Result<(), ClusterError> {
        let data_dir = self.root.join(format!("nodes-{group}"));
        let count = count.to_string();
        let runtime = ["--runtime", "sim", "--simulate", &count];
        self.spawn_node_daemon(group, &runtime, &data_dir, args)
    }

    /// Start a real `surge node` daemon on the container runtime (crun) with id `node`, its own
    /// data dir (`nodes-NODE` under the root) and hence its own cgroup parent (`/surge/NODE`),
    /// talking to every replica; `args` are extra `surge node` flags (labels, CPUs, memory).
    /// It is a node group of one: [`Self::kill_nodes`] and [`Self::pause_nodes`] take its id.
    /// Its sandboxes outlive it (crun runs them under their own shim), as on a real host.
    pub fn start_container_node(&mut self, node: &str, args: &[&str]) -> Result<(), ClusterError> {
        let data_dir = self.container_node_dir(node);
        self.spawn_node_daemon(node, &["--runtime", "container"], &data_dir, args)
    }

    /// Spawn one `surge node` process as node group `group` (its `--node-id`), logging to
    /// `nodes-GROUP.log` under the root, niced, dying with the harness.
    fn spawn_node_daemon(
        &mut self,
        group: &str,
        runtime: &[&str],
        data_dir: &Path,
        args: &[&str],
    ) -> Result<(), ClusterError> {
        let servers = self
            .replicas
            .values()
            .map(|r| r.grpc.clone())
            .collect::<Vec<_>>()
            .join(",");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("nodes-{group}.log")))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .args(["--server", &servers])
            .args(["--node-id", group])
            .args(runtime)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        die_with_parent(&mut cmd);
        lower_priority(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|source| ClusterError::Spawn { id: 0, source })?;
        if let Some(mut old) = self.node_groups.insert(group.to_string(), child) {
            reap(&mut old);
        }
        Ok(())
    }

    /// The data dir of container node `node` (see [`Self::start_container_node`]).
    pub fn container_node_dir(&self, node: &str) -> PathBuf {
        self.root.join(format!("nodes-{node}"))
    }

    /// SIGSTOP (`resume == false`) or SIGCONT of a node group's daemon process.
    pub fn pause_nodes(&mut self, group: &str, resume: bool) {
        if let Some(c) = self.node_groups.get(group) {
            signal(c, if resume { libc::SIGCONT } else { libc::SIGSTOP });
        }
    }

    /// `kill -9` a group of simulated nodes (or a container node's daemon): they stop
    /// heartbeating at once. A stopped (SIGSTOP) process dies of SIGKILL all the same.
    pub fn kill_nodes(&mut self, group: &str) {
        if let Some(mut c) = self.node_groups.remove(group) {
            reap(&mut c);
        }
    }

    /// Whether the `surge node` process of `group` is alive.
    pub fn node_group_running(&mut self, group: &str) -> bool {
        self.node_groups
            .get_mut(group)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The root directory holding the replicas' data dirs and logs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The last `lines` lines of a replica's log, for failure reports.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Ok(r) = self.replica(id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&r.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.node_groups.values_mut() {
            reap(c);
        }
        for r in self.replicas.values_mut() {
            if let Some(mut c) = r.child.take() {
                reap(&mut c);
            }
        }
    }
}

/// `kill -9` a child and reap it.
/// A replica told to stop (SIGTERM) and given until `deadline`.
struct Stopping {
    child: Child,
    deadline: Instant,
}

impl Stopping {
    /// It has exited, or its grace ran out and it was killed.
    fn over(&mut self) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        if Instant::now() >= self.deadline {
            reap(&mut self.child);
            return true;
        }
        false
    }
}

fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Ask the kernel to SIGKILL the replica if its parent dies, so a crashed test or `surge dev`
/// leaves no replica behind. Linux ties this to the *thread* that spawned the child: start
/// replicas from a long-lived thread (the main thread, a test's thread, a runtime worker), never
/// from `spawn_blocking`, whose threads exit when idle.
/// Niceness of simulated node daemons: they stand in for other machines, so on a shared host they
/// must not take the CPU the replicas need to keep their Raft deadlines (openraft gives an
/// AppendEntries RPC one heartbeat interval to answer).
const SIM_NODES_NICE: libc::c_int = 10;

fn lower_priority(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls setpriority(2),
    // which is async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, SIM_NODES_NICE) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
