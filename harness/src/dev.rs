//! `surge dev`: a whole local cluster — replicas, simulated nodes, and real container nodes
//! where this host can run them — started, watched and stopped as one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::LocalCluster;
use crate::demo::RealNodes;
use crate::dev_secure::DevSecurity;

/// Simulated nodes one `surge node --simulate` process hosts.
const SIM_NODES_PER_PROCESS: u32 = 500;
/// Longest `wait_for_nodes` waits for registration.
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct DevConfig {
    pub root: PathBuf,
    /// 1, 3 or 5.
    pub replicas: u64,
    /// gRPC port of replica 1.
    pub port: u16,
    pub sim_nodes: u32,
    /// Asked for; fewer run where containers cannot.
    pub real_nodes: u32,
    /// Mutual TLS on every link and tenant tokens ([`crate::dev_secure`]).
    pub secure: bool,
    /// The real nodes make their sandboxes checkpointable (`surge node --checkpoint`).
    pub checkpoint: bool,
}

/// The running cluster.
pub struct DevCluster {
    pub cluster: LocalCluster,
    pub leader: u64,
    real: RealNodes,
    /// Real node daemons running (0 where containers cannot run here).
    pub real_nodes: u32,
    /// Why no real nodes run, when some were asked for.
    pub no_real_nodes: Option<String>,
    /// The run's certificates and tokens, with `--secure`.
    pub security: Option<DevSecurity>,
    /// Simulated nodes started.
    pub sim_nodes: u32,
}

/// What a program needs to use the running cluster (`surge dev --info-file`): written once
/// every node has registered.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DevInfo {
    /// Every replica's gRPC address, comma separated (`SURGE_SERVER`).
    pub servers: String,
    /// Every replica's HTTP address (metrics, the JSON API).
    pub http: Vec<String>,
    pub data_dir: PathBuf,
    pub sim_nodes: u32,
    pub real_nodes: u32,
    /// `SURGE_TLS_DIR` with `--secure`.
    pub tls_dir: Option<PathBuf>,
    /// With `--secure`: `admin` and one token per tenant (`SURGE_TOKEN`).
    pub tokens: std::collections::BTreeMap<String, String>,
}

impl DevCluster {
    /// Start the replicas, wait for a leader, then start the node daemons.
    pub async fn start(cfg: &DevConfig, bin: &Path) -> anyhow::Result<DevCluster> {
        if !matches!(cfg.replicas, 1 | 3 | 5) {
            bail!("--replicas: use 1, 3 or 5 (an odd number keeps a majority)");
        }
        std::fs::create_dir_all(&cfg.root)
            .with_context(|| format!("cannot create {}", cfg.root.display()))?;
        let security = cfg
            .secure
            .then(|| DevSecurity::create(&cfg.root))
            .transpose()?;
        let mut cluster = LocalCluster::new(bin, &cfg.root, cfg.replicas, Some(cfg.port))?;
        let mut node_args: Vec<String> = Vec::new();
        if let Some(s) = &security {
            cluster = cluster
                .with_args(&[
                    "--tls-dir",
                    &s.replica_dir.display().to_string(),
                    "--tokens",
                    &s.tokens_file.display().to_string(),
                ])
                .with_credentials(s.admin_credentials()?);
            node_args = vec!["--tls-dir".into(), s.node_dir.display().to_string()];
        }
        cluster.start_all()?;
        let leader = match cluster.wait_leader(Duration::from_secs(30)).await {
            Ok(l) => l,
            Err(e) => {
                let logs: Vec<String> = cluster
                    .ids()
                    .into_iter()
                    .map(|id| format!("--- replica {id} log ---\n{}", cluster.log_tail(id, 15)))
                    .collect();
                bail!(
                    "the cluster did not elect a leader: {e}\n{}",
                    logs.join("\n")
                );
            }
        };
        for g in 0..cfg.sim_nodes.div_ceil(SIM_NODES_PER_PROCESS) {
            let n = SIM_NODES_PER_PROCESS.min(cfg.sim_nodes - g * SIM_NODES_PER_PROCESS);
            let mut args = vec!["--label", "kind=sim", "--sim-duration-ms", "5000"];
            args.extend(node_args.iter().map(String::as_str));
            cluster.start_sim_nodes(&format!("sim{g}"), n, &args)?;
        }
        let (real_nodes, no_real_nodes) = match crate::containers::usable() {
            Ok(()) => (cfg.real_nodes, None),
            Err(why) if cfg.real_nodes > 0 => (0, Some(why)),
            Err(_) => (0, None),
        };
        let servers = cluster
            .ids()
            .into_iter()
            .filter_map(|id| cluster.addr(id).ok())
            .collect::<Vec<_>>()
            .join(",");
        let mut real_args = node_args.clone();
        if cfg.checkpoint {
            real_args.push("--checkpoint".to_owned());
        }
        let real = RealNodes::start(bin, &cfg.root, &servers, real_nodes, &real_args)?;
        Ok(DevCluster {
            cluster,
            leader,
            real,
            real_nodes,
            no_real_nodes,
            security,
            sim_nodes: cfg.sim_nodes,
        })
    }

    /// Every replica's gRPC address, comma separated (what `--server` and `SURGE_SERVER` take).
    pub fn servers(&self) -> String {
        self.cluster
            .ids()
            .into_iter()
            .filter_map(|id| self.cluster.addr(id).ok())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Wait until `n` nodes are ready (registration of hundreds of nodes takes a few seconds).
    pub async fn wait_for_nodes(&self, n: usize) -> anyhow::Result<()> {
        let creds = match &self.security {
            Some(s) => s.admin_credentials()?,
            None => surge_client::Credentials::default(),
        };
        let client = surge_client::Client::new(&self.servers(), creds)?;
        let started = Instant::now();
        loop {
            let ready = match client.list_nodes().await {
                Ok(nodes) => nodes
                    .iter()
                    .filter(|x| x.state() == surge_proto::node::NodeState::Ready)
                    .count(),
                Err(_) => 0,
            };
            if ready >= n {
                return Ok(());
            }
            if started.elapsed() > NODES_READY_TIMEOUT {
                bail!("only {ready} of {n} nodes registered within {NODES_READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What `--info-file` holds.
    pub fn info(&self) -> DevInfo {
        let ids = self.cluster.ids();
        let http = ids
            .iter()
            .filter_map(|id| self.cluster.replica(*id).ok().map(|r| r.http.clone()))
            .collect();
        let mut tokens = std::collections::BTreeMap::new();
        if let Some(s) = &self.security {
            tokens.insert("admin".to_string(), s.admin.clone());
            for (tenant, token) in &s.tenants {
                tokens.insert(tenant.clone(), token.clone());
            }
        }
        DevInfo {
            servers: self.servers(),
            http,
            data_dir: self.cluster.root().to_path_buf(),
            sim_nodes: self.sim_nodes,
            real_nodes: self.real_nodes,
            tls_dir: self.security.as_ref().map(|s| s.client_dir.clone()),
            tokens,
        }
    }

    /// Replicas that have exited since the last call, each once, with the tail of its log.
    pub fn newly_exited(
        &mut self,
        reported: &mut std::collections::BTreeSet<u64>,
    ) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for id in self.cluster.ids() {
            if !self.cluster.replica_running(id) && reported.insert(id) {
                out.push((id, self.cluster.log_tail(id, 10)));
            }
        }
        out
    }

    /// Stop the node daemons (removing what their containers left) and the replicas.
    pub async fn stop(&mut self) {
        self.real.stop().await;
        self.cluster.stop_all(Duration::from_secs(5));
    }
}
