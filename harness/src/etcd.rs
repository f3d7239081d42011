//! An etcd cluster on loopback, the peer `surge bench raft` measures itself against: the same
//! number of members on the same machine, each with its own data dir and fsync on (etcd's
//! default), driven through its gRPC API with the same value size and concurrency as surge.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::free_port;
use anyhow::{bail, Context};
use surge_proto::etcd as pb;
use tonic::transport::{Channel, Endpoint};

/// Members beyond this are refused: the comparison is about 3- and 5-replica clusters.
const MEMBERS_MAX: usize = 7;

/// `etcd` on `PATH`, if installed (Debian: `etcd-server`).
pub fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

/// Running etcd members; dropping it kills them and removes their data.
pub struct EtcdCluster {
    bin: PathBuf,
    /// Per member: (client port, peer port).
    ports: Vec<(u16, u16)>,
    initial_cluster: String,
    children: Vec<Child>,
    client_urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` etcd processes that form one new cluster.
    pub fn start(bin: &Path, members: usize) -> anyhow::Result<Self> {
        if members == 0 || members > MEMBERS_MAX {
            bail!("etcd members must be 1..={MEMBERS_MAX}, got {members}");
        }
        let dir = tempfile::Builder::new().prefix("surge-etcd-").tempdir()?;
        let mut ports = Vec::with_capacity(members);
        for _ in 0..members {
            ports.push((free_port()?, free_port()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            bin: bin.to_path_buf(),
            client_urls: ports
                .iter()
                .map(|(client, _)| format!("http://127.0.0.1:{client}"))
                .collect(),
            ports,
            initial_cluster,
            children: Vec::with_capacity(members),
            dir,
        };
        for i in 0..members {
            let child = cluster.spawn(i)?;
            cluster.children.push(child);
        }
        Ok(cluster)
    }

    /// Start member `i` on its data dir (a new member the first time, a restart afterwards:
    /// etcd ignores the initial-cluster flags when its data dir holds a cluster).
    fn spawn(&self, i: usize) -> anyhow::Result<Child> {
        let (client, peer) = *self.ports.get(i).context("no such etcd member")?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("e{i}.log")))?;
        Command::new(&self.bin)
            .arg("--name")
            .arg(format!("e{i}"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("e{i}")))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "surge-bench"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }

    /// Every member's client URL, by member index.
    pub fn urls(&self) -> &[String] {
        &self.client_urls
    }

    /// kill -9 member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(c) = self.children.get_mut(i) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data dir after [`EtcdCluster::kill`].
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.spawn(i)?;
        if let Some(c) = self.children.get_mut(i) {
            *c = child;
        }
        Ok(())
    }

    /// The leader's client URL, once one is elected and answers.
    pub async fn wait_leader(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, child) in self.children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "etcd member e{i} exited with {status}; its log: {}",
                        self.dir.path().join(format!("e{i}.log")).display()
                    );
                }
            }
            for url in &self.client_urls {
                let Ok(mut c) = maintenance(url) else {
                    continue;
                };
                let call = c.status(pb::StatusRequest {});
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                    let r = r.into_inner();
                    let me = r.header.map(|h| h.member_id).unwrap_or(0);
                    if r.leader != 0 && r.leader == me {
                        return Ok(url.clone());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("etcd elected no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl EtcdCluster {
    /// A member's client URL other than `leader`'s.
    pub fn follower_of(&self, leader: &str) -> Option<String> {
        self.client_urls.iter().find(|u| *u != leader).cloned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The version `etcd --version` reports ("3.4.23"), for the report.
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
}

/// `(member id, leader id)` as the member at `url` reports them, if it answers within 200 ms.
pub async fn status(url: &str) -> Option<(u64, u64)> {
    let mut c = maintenance(url).ok()?;
    let call = c.status(pb::StatusRequest {});
    let r = tokio::time::timeout(Duration::from_millis(200), call)
        .await
        .ok()?
        .ok()?
        .into_inner();
    Some((r.header.map(|h| h.member_id).unwrap_or(0), r.leader))
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}

pub fn kv(url: &str) -> anyhow::Result<pb::kv_client::KvClient<Channel>> {
    Ok(pb::kv_client::KvClient::new(channel(url)?))
}

fn maintenance(url: &str) -> anyhow::Result<pb::maintenance_client::MaintenanceClient<Channel>> {
    Ok(pb::maintenance_client::MaintenanceClient::new(channel(
        url,
    )?))
}
