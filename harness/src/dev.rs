//! `surge dev`: a whole local cluster — replicas, simulated nodes, and real container nodes
//! where this host can run them — started, watched and stopped as one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::LocalCluster;
use crate::demo::RealNodes;

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
}

impl DevCluster {
    /// Start the replicas, wait for a leader, then start the node daemons.
    pub async fn start(cfg: &DevConfig, bin: &Path) -> anyhow::Result<DevCluster> {
        if !matches!(cfg.replicas, 1 | 3 | 5) {
            bail!("--replicas: use 1, 3 or 5 (an odd number keeps a majority)");
        }
        std::fs::create_dir_all(&cfg.root)
            .with_context(|| format!("cannot create {}", cfg.root.display()))?;
        let mut cluster = LocalCluster::new(bin, &cfg.root, cfg.replicas, Some(cfg.port))?;
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
            cluster.start_sim_nodes(
                &format!("sim{g}"),
                n,
                &["--label", "kind=sim", "--sim-duration-ms", "5000"],
            )?;
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
        let real = RealNodes::start(bin, &cfg.root, &servers, real_nodes)?;
        Ok(DevCluster {
            cluster,
            leader,
            real,
            real_nodes,
            no_real_nodes,
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
        let addr = self.cluster.addr(self.leader)?;
        let started = Instant::now();
        loop {
            let ready = match surge_client::open::nodes(&addr)?
                .list_nodes(surge_proto::node::ListNodesRequest {})
                .await
            {
                Ok(r) => r
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|x| x.state == "ready")
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
