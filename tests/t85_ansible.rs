//! The playbooks of ansible/ for real: `ansible-playbook` (ansible-core from PyPI, installed by
//! `scripts/setup-ops` into ~/.cache/surge/venv) brings up three "hosts" that are local
//! connections with their own install roots and ports on this machine (no systemd here, so
//! `surge_service_manager: process`), then checks that the cluster formed and runs a job, that a
//! second run changes nothing, that a rolling upgrade restarts every replica and keeps the
//! cluster, and that a node drains and goes. `ansible-lint` must pass too.
//!
//! Skipped, with a message, only where ansible cannot be installed.

mod ops;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ops::*;
use serde_json::Value;
use surge_harness::cluster::free_port;

const HOSTS: [&str; 3] = ["host1", "host2", "host3"];
/// Simulated nodes per host.
const SIM_PER_HOST: usize = 2;
/// How long the submitted job may take to complete (simulated sandboxes run 1 s).
const JOB_WAIT: Duration = Duration::from_secs(60);

fn ansible_dir() -> PathBuf {
    repo().join("ansible")
}

/// The venv's bin dir, installing ansible there when needed; `None` when it cannot be.
fn ansible_bin() -> Option<PathBuf> {
    let out = Command::new(repo().join("scripts/setup-ops")).output();
    match out {
        Ok(o) if o.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            dir.join("ansible-playbook").is_file().then_some(dir)
        }
        other => {
            surge_node::testing::unavailable(&format!(
                "ansible-core could not be installed by scripts/setup-ops: {other:?}"
            ));
            None
        }
    }
}

/// The real uid of a process.
fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every process the playbooks started (process mode keeps a pid file per service), killed
/// when the test ends however it ends.
struct Hosts {
    root: PathBuf,
}

impl Hosts {
    fn pids(&self) -> Vec<(PathBuf, i32)> {
        let mut out = Vec::new();
        for h in HOSTS {
            let run = self.root.join(h).join("run/surge");
            for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    if let Ok(pid) = text.trim().parse() {
                        out.push((entry.path(), pid));
                    }
                }
            }
        }
        out
    }

    fn pid(&self, host: &str, service: &str) -> Option<i32> {
        let f = self
            .root
            .join(host)
            .join(format!("run/surge/surge-{service}.pid"));
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, pid) in self.pids() {
            kill_pid(pid);
        }
    }
}

struct Recap {
    output: String,
}

impl Recap {
    /// `changed=` of each host in the PLAY RECAP.
    fn changed(&self) -> Vec<(String, u32)> {
        let recap = self
            .output
            .rsplit_once("PLAY RECAP")
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("no PLAY RECAP in:\n{}", self.output));
        recap
            .lines()
            .filter_map(|l| {
                let (host, rest) = l.split_once(':')?;
                let changed = rest
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("changed="))?
                    .parse()
                    .ok()?;
                Some((host.trim().to_string(), changed))
            })
            .collect()
    }
}

fn playbook(bin: &Path, inventory: &Path, book: &str, extra: &[&str]) -> Recap {
    let started = Instant::now();
    let out = Command::new(bin.join("ansible-playbook"))
        .arg("-i")
        .arg(inventory)
        .arg(book)
        .args(extra)
        .current_dir(ansible_dir())
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .output()
        .expect("run ansible-playbook");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "ansible-playbook {book} {extra:?} failed ({}):\n{output}",
        out.status
    );
    eprintln!("ansible-playbook {book}: {:?}", started.elapsed());
    Recap { output }
}

/// The playbooks' cluster runs with mutual TLS: the CLI here presents the operators' client
/// certificate the playbook made on this (the control) machine.
static TLS_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn surge_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surge"));
    if let Some(dir) = TLS_DIR.get() {
        cmd.env("SURGE_TLS_DIR", dir);
    }
    cmd
}

fn surge(args: &[&str]) -> Result<Value, String> {
    let out = surge_cmd().args(args).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Wait until `surge status` at `server` shows a leader and `voters` voters, all reachable.
fn wait_cluster(server: &str, voters: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match surge(&["status", "-o", "json", "--server", server]) {
            Ok(s) => {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                let n_voters = members.iter().filter(|m| m["voter"] == true).count();
                let all_reachable = members.iter().all(|m| m["reachable"] == true);
                if !s["leader"].is_null() && n_voters == voters && all_reachable {
                    return s;
                }
                s.to_string()
            }
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "no leader with {voters} reachable voters at {server}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Submit a job and wait for it to complete; returns its id.
fn run_job(server: &str, count: u32) -> u64 {
    let out = surge_cmd()
        .args(["submit", "--server", server, "--count", &count.to_string()])
        .args(["--cpu", "0.5", "--mem", "256", "--", "true"])
        .output()
        .expect("surge submit");
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "job N submitted"
    let said = String::from_utf8_lossy(&out.stdout);
    let id: u64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no job id in {said:?}"));
    let deadline = Instant::now() + JOB_WAIT;
    loop {
        let jobs = surge(&["jobs", "-o", "json", "--server", server]).expect("jobs");
        let job = jobs
            .as_array()
            .and_then(|js| js.iter().find(|j| j["id"] == id))
            .cloned()
            .unwrap_or(Value::Null);
        if job["state"] == "complete" {
            assert_eq!(job["counts"]["succeeded"], count, "{job}");
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not complete in {JOB_WAIT:?}: {job}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

struct Ports {
    grpc: u16,
    http: u16,
    node: u16,
    /// The node daemon's exec-and-files port.
    node_io: u16,
}

fn inventory(root: &Path, binary: &Path, ports: &[Ports]) -> String {
    let mut servers = String::new();
    for (i, (h, p)) in HOSTS.iter().zip(ports).enumerate() {
        servers.push_str(&format!(
            "        {h}: {{surge_root: {root}/{h}, surge_server_id: {id}, surge_server_port: {g}, \
             surge_server_metrics_port: {m}, surge_node_metrics_port: {n}, \
             surge_node_io_port: {io}}}\n",
            root = root.display(),
            id = i + 1,
            g = p.grpc,
            m = p.http,
            n = p.node,
            io = p.node_io,
        ));
    }
    let nodes: String = HOSTS.iter().map(|h| format!("        {h}:\n")).collect();
    format!(
        r#"all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
    ansible_host: 127.0.0.1
    surge_service_manager: process
    surge_create_user: false
    surge_server_user: nobody
    surge_binary_src: {binary}
    surge_pki_dir: {root}/pki
    surge_rust_log: info
  children:
    surge_servers:
      hosts:
{servers}    surge_nodes:
      vars:
        surge_node_runtime: sim
        surge_node_simulate: {SIM_PER_HOST}
        surge_node_extra_args: ["--sim-duration-ms", "1000"]
      hosts:
{nodes}    surge_monitoring:
      hosts:
        mon: {{surge_root: {root}/mon}}
"#,
        binary = binary.display(),
        root = root.display(),
    )
}

#[test]
fn ansible_lint_is_clean() {
    let Some(bin) = ansible_bin() else {
        return;
    };
    let out = Command::new(bin.join("ansible-lint"))
        .args(["--offline", "--nocolor", "--profile", "production"])
        .current_dir(ansible_dir())
        .env("PATH", ops::path_with(&bin))
        .output()
        .expect("run ansible-lint");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ansible-lint:\n{said}");
    assert!(said.contains("Passed"), "ansible-lint said:\n{said}");
}

#[test]
fn playbooks_bring_up_a_cluster_converge_upgrade_and_drain() {
    let Some(bin) = ansible_bin() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    // The replicas run as `nobody`: it must reach their files under the hosts' roots.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let hosts = Hosts { root: root.clone() };
    // A copy of the binary: the build may replace the original while the test runs. Stripped
    // of the debug build's 160 MB of debug info when `strip` is there: every run checksums it.
    let binary = root.join("surge-v1");
    let stripped = which("strip").is_some_and(|strip| {
        Command::new(strip)
            .arg("-o")
            .arg(&binary)
            .arg(env!("CARGO_BIN_EXE_surge"))
            .status()
            .is_ok_and(|s| s.success())
    });
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_surge"), &binary).expect("copy binary");
    }
    let ports: Vec<Ports> = HOSTS
        .iter()
        .map(|_| Ports {
            grpc: free_port().expect("port"),
            http: free_port().expect("port"),
            node: free_port().expect("port"),
            node_io: free_port().expect("port"),
        })
        .collect();
    let _ = TLS_DIR.set(root.join("pki/client"));
    let inv = root.join("hosts.yml");
    std::fs::write(&inv, inventory(&root, &binary, &ports)).expect("write inventory");
    let seed = format!("127.0.0.1:{}", ports[0].grpc);

    // First run: a new cluster bootstraps, the nodes register.
    let first = playbook(&bin, &inv, "site.yml", &[]);
    for (host, changed) in first.changed() {
        assert!(changed > 0, "{host} changed nothing on the first run");
    }
    for (i, h) in HOSTS.iter().enumerate() {
        let env = std::fs::read_to_string(root.join(h).join("etc/surge/cluster.env"))
            .expect("cluster.env");
        assert!(env.contains("--bootstrap 1=127.0.0.1:"), "{h}: {env}");
        let s = wait_cluster(&format!("127.0.0.1:{}", ports[i].grpc), 3);
        assert_eq!(s["id"], i as u64 + 1);
    }
    // Every service runs with mutual TLS; keys are private; a client without the cluster's
    // certificate is refused.
    for h in HOSTS {
        let env = std::fs::read_to_string(root.join(h).join("etc/surge/server.env")).expect("env");
        assert!(env.contains("--tls-dir"), "{h}: {env}");
        for svc in ["server", "node", "client"] {
            let key = root.join(h).join(format!("etc/surge/tls/{svc}/key.pem"));
            let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    let plain = Command::new(env!("CARGO_BIN_EXE_surge"))
        .args(["status", "--server", &seed])
        .env_remove("SURGE_TLS_DIR")
        .output()
        .expect("surge status");
    assert!(
        !plain.status.success(),
        "a client without a certificate got in"
    );
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(
        said.contains(&format!("the replica at {seed} requires TLS")),
        "a plaintext client is not told that the cluster wants TLS: {said}"
    );
    // The replicas run as surge_server_user in process mode too (systemd's User=); the node
    // daemons as root.
    for h in HOSTS {
        let server = hosts.pid(h, "server").expect("server pid");
        let node = hosts.pid(h, "node").expect("node pid");
        assert_eq!(
            uid_of(server),
            Some(65534),
            "{h}: surge-server is not nobody's"
        );
        assert_eq!(uid_of(node), Some(0), "{h}: surge-node is not root's");
    }
    let nodes = surge(&["nodes", "-o", "json", "--server", &seed]).expect("nodes");
    let ready = nodes
        .as_array()
        .expect("node list")
        .iter()
        .filter(|n| n["state"] == "ready")
        .count();
    assert_eq!(ready, HOSTS.len() * SIM_PER_HOST, "{nodes}");
    run_job(&seed, 6);

    // Second run: nothing to do.
    let second = playbook(&bin, &inv, "site.yml", &[]);
    let changed = second.changed();
    assert_eq!(changed.len(), HOSTS.len() + 1, "{}", second.output);
    for (host, n) in &changed {
        assert_eq!(
            *n, 0,
            "{host} changed on the second run:\n{}",
            second.output
        );
    }

    // The Prometheus config it wrote is valid, and lists every replica and node daemon.
    let mon = root.join("mon/etc/prometheus");
    let targets = std::fs::read_to_string(mon.join("targets/surge-servers.json")).expect("targets");
    for p in &ports {
        assert!(
            targets.contains(&format!("127.0.0.1:{}", p.http)),
            "{targets}"
        );
    }
    if let Some(promtool) = which("promtool") {
        run_ok(
            Command::new(promtool)
                .args(["check", "config", "prometheus.yml"])
                .current_dir(&mon),
        );
    }

    // Rolling upgrade to a "new" binary (the same program with a different checksum): every
    // replica and node daemon restarts, one replica at a time, and the cluster stays whole.
    let v2 = root.join("surge-v2");
    let mut bytes = std::fs::read(&binary).expect("read binary");
    bytes.extend_from_slice(b"\0surge-t85-v2");
    std::fs::write(&v2, bytes).expect("write v2");
    let before: Vec<i32> = HOSTS
        .iter()
        .map(|h| hosts.pid(h, "server").expect("server pid"))
        .collect();
    let v2_arg = format!("surge_binary_src={}", v2.display());
    playbook(
        &bin,
        &inv,
        "rolling-upgrade.yml",
        &["-e", &v2_arg, "-e", "surge_node_batch=100%"],
    );
    for (h, old) in HOSTS.iter().zip(&before) {
        let new = hosts.pid(h, "server").expect("server pid");
        assert_ne!(new, *old, "{h}'s replica was not restarted");
        assert!(!pid_alive(*old), "{h}'s old replica {old} still runs");
        let installed = std::fs::read(root.join(h).join("usr/local/bin/surge")).expect("bin");
        assert!(
            installed.ends_with(b"surge-t85-v2"),
            "{h} runs the old binary"
        );
    }
    wait_cluster(&seed, 3);
    run_job(&seed, 6);

    // Drain host3 and take its node daemon away.
    let node3 = hosts.pid("host3", "node").expect("host3 node pid");
    playbook(
        &bin,
        &inv,
        "drain-node.yml",
        &["--limit", "host3", "-e", &v2_arg],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(node3) {
        assert!(Instant::now() < deadline, "host3's node daemon still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!root.join("host3/etc/surge/node.env").exists());
    let nodes = surge(&["nodes", "-o", "json", "--server", &seed]).expect("nodes");
    for n in nodes.as_array().expect("node list") {
        let id = n["node_id"].as_str().unwrap_or_default();
        if id.starts_with("host3-") {
            assert_ne!(n["state"], "ready", "{id} still takes work: {n}");
        }
    }
    run_job(&seed, 4);

    // Nothing left behind.
    let pids = hosts.pids();
    drop(hosts);
    for (file, pid) in pids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "{} ({pid}) survived",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
