//! `surge node` as a whole: pick the runtime, prepare the host, serve metrics, run the node (or,
//! with `--simulate N`, N simulated nodes sharing one channel per replica).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use std::collections::HashMap;

use super::config::{allocatable, choose_runtime, DaemonConfig, RuntimeChoice};
use super::connection::Replicas;
use super::io_server::{self, Hosted, IoService};
use super::metrics::{self, NodeMetrics};
use super::{AgentError, NodeAgent, NodeConfig};
use crate::detect::detect_host;
use crate::runtime::container::{ContainerConfig, ContainerRuntime};
use crate::runtime::io::SandboxIo;
use crate::runtime::krun::{KrunConfig, KrunHost, KrunRuntime};
use crate::runtime::sim::{SimProfile, SimRuntime};
use crate::runtime::Runtime;
use crate::template::{Templates, DEFAULT_TEMPLATE};

/// Run `surge node` until `stop` turns true.
pub async fn run_daemon(cfg: DaemonConfig, stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    cfg.check()?;
    let metrics = Arc::new(NodeMetrics::new()?);
    let _metrics_server = match cfg.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
            ))))
        }
        None => None,
    };
    let replicas = Arc::new(Replicas::new(&cfg.servers, cfg.tls.as_ref())?);
    let host = detect_host();
    let io_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            AgentError::Invalid(format!("cannot listen on --listen {}: {e}", cfg.listen))
        })?;
    let address = match &cfg.advertise {
        Some(a) => a.clone(),
        None => io_listener
            .local_addr()
            .map_err(|e| AgentError::Invalid(format!("--listen {}: {e}", cfg.listen)))?
            .to_string(),
    };
    let io = IoPlan {
        listener: io_listener,
        tls: cfg.server_tls.clone(),
        client_tls: cfg.tls.clone(),
        stop: stop.clone(),
    };
    let exec_output = bytes::Bytes::from(vec![b'x'; cfg.sim_exec_output_bytes]);
    let exec_delay = Duration::from_millis(cfg.sim_exec_ms);
    let sim =
        |profile: SimProfile| SimRuntime::new(profile).with_exec(exec_delay, exec_output.clone());

    if let Some(n) = cfg.simulate {
        let allocatable = allocatable(&host, cfg.cpu_millis, cfg.memory_mib, true)?;
        tracing::info!(
            nodes = n,
            cpu_millis = allocatable.cpu_millis,
            memory_mib = allocatable.memory_mib,
            sandbox_ms = cfg.sim_duration_ms,
            "simulating nodes"
        );
        let profile = SimProfile {
            run_for: Duration::from_millis(cfg.sim_duration_ms),
            exit_code: cfg.sim_exit_code,
            ..SimProfile::default()
        };
        // Hundreds of nodes in one process: one heartbeat call per replica, not one per node.
        replicas.batch_heartbeats(super::heartbeats::BATCH_TIMEOUT);
        let mut nodes = JoinSet::new();
        let mut hosted = HashMap::new();
        for i in 0..n {
            let mut node = node_config(&cfg, format!("{}-{i}", cfg.node_id), allocatable, &address);
            node.first_replica = usize::try_from(i).unwrap_or(0);
            let runtime = Arc::new(sim(profile));
            hosted.insert(
                node.node_id.clone(),
                Hosted {
                    runtime: runtime.clone(),
                    activity: node.activity.clone(),
                    templates: None,
                },
            );
            // At scale: no task, channel or timer per sandbox, and no memory guard polling.
            let agent = NodeAgent::simulated(node, runtime, replicas.clone(), metrics.clone());
            nodes.spawn(agent.run(stop.clone()));
        }
        let _io = io.serve(hosted);
        return wait_all(nodes).await;
    }

    let data_dir = absolute(&cfg.data_dir)?;
    std::fs::create_dir_all(&data_dir).map_err(|source| AgentError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    let krun_host = KrunHost::probe(&data_dir);
    let (choice, why) = choose_runtime(cfg.runtime, &host.virtualization, &krun_host)?;
    if let Some(why) = why {
        tracing::info!("{why}");
    }
    match choice {
        RuntimeChoice::Sim => {
            let allocatable = allocatable(&host, cfg.cpu_millis, cfg.memory_mib, true)?;
            let profile = SimProfile {
                run_for: Duration::from_millis(cfg.sim_duration_ms),
                exit_code: cfg.sim_exit_code,
                ..SimProfile::default()
            };
            let node = node_config(&cfg, cfg.node_id.clone(), allocatable, &address);
            run_one(node, sim(profile), replicas, metrics, io).await
        }
        RuntimeChoice::Container => {
            let offered = allocatable(&host, cfg.cpu_millis, cfg.memory_mib, false)?;
            let allocatable = without_pool(offered, &cfg.warm_pool)?;
            let warm_pool = cfg.warm_pool.clone();
            let dir = data_dir.clone();
            let node_id = cfg.node_id.clone();
            let checkpoint = cfg.checkpoint;
            let (runtime, templates) = tokio::task::spawn_blocking(move || {
                // Checkpointing needs the CRIU kit (scripts/setup-criu); without it the node
                // runs Debian's crun and says why it cannot checkpoint.
                let prefix = crate::runtime::container::checkpoint::kit_prefix();
                let criu = if checkpoint {
                    crate::runtime::container::checkpoint::CriuKit::probe(&prefix)
                } else {
                    Err(
                        "checkpointing is off on this node (start it with --checkpoint; it needs \
                         the CRIU kit of scripts/setup-criu)"
                            .to_string(),
                    )
                };
                let runtime = ContainerRuntime::new(ContainerConfig {
                    cgroup_parent: format!("/surge/{}", cgroup_component(&node_id)),
                    criu,
                    warm_pool,
                    ..ContainerConfig::new(&dir)
                })?;
                let t = Templates::new(&dir);
                t.ensure_busybox()?;
                let held = t.list()?;
                Ok::<_, AgentError>((runtime, held))
            })
            .await
            .map_err(|e| AgentError::NodeFailed {
                node: cfg.node_id.clone(),
                reason: format!("preparing the container runtime panicked: {e}"),
            })??;
            let mut node = node_config(&cfg, cfg.node_id.clone(), allocatable, &address);
            node.templates = templates;
            node.template_data_dir = Some(data_dir.clone());
            let runtime = Arc::new(runtime);
            let stop = io.stop.clone();
            let refill = AbortOnDrop(tokio::spawn(keep_pools_full(runtime.clone(), stop)));
            let ran = run_arc(node, runtime.clone(), replicas, metrics, io).await;
            drop(refill);
            runtime.pool_drain().await;
            ran
        }
        RuntimeChoice::Krun => {
            let allocatable = allocatable(&host, cfg.cpu_millis, cfg.memory_mib, false)?;
            let dir = data_dir.clone();
            let (runtime, templates) = tokio::task::spawn_blocking(move || {
                let runtime = KrunRuntime::new(KrunConfig::new(&dir, &krun_host)?)?;
                let t = Templates::new(&dir);
                t.ensure_busybox()?;
                let held = t.list()?;
                Ok::<_, AgentError>((runtime, held))
            })
            .await
            .map_err(|e| AgentError::NodeFailed {
                node: cfg.node_id.clone(),
                reason: format!("preparing the krun runtime panicked: {e}"),
            })??;
            let mut node = node_config(&cfg, cfg.node_id.clone(), allocatable, &address);
            node.templates = templates;
            node.template_data_dir = Some(data_dir.clone());
            run_one(node, runtime, replicas, metrics, io).await
        }
    }
}

/// A node id as one cgroup path component: characters other than letters, digits, `.`, `_`
/// and `-` become `_`, and a leading dot is escaped (no `.`, `..` or hidden names).
pub fn cgroup_component(node_id: &str) -> String {
    let mut s: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

fn absolute(p: &Path) -> Result<std::path::PathBuf, AgentError> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(p))
        .map_err(|source| AgentError::DataDir {
            path: p.display().to_string(),
            source,
        })
}

fn node_config(
    cfg: &DaemonConfig,
    node_id: String,
    allocatable: crate::reconcile::Resources,
    address: &str,
) -> NodeConfig {
    let mut node = NodeConfig::new(node_id, allocatable);
    node.address = address.to_owned();
    node.labels = cfg.labels.clone();
    node.pool = cfg.pool.clone();
    node.max_sandboxes = cfg.max_sandboxes;
    node.start_concurrency = cfg.start_concurrency;
    node.templates = vec![DEFAULT_TEMPLATE.to_owned()];
    node
}

async fn run_one<R: Runtime + SandboxIo>(
    node: NodeConfig,
    runtime: R,
    replicas: Arc<Replicas>,
    metrics: Arc<NodeMetrics>,
    io: IoPlan,
) -> Result<(), AgentError> {
    run_arc(node, Arc::new(runtime), replicas, metrics, io).await
}

/// What the node offers the scheduler: its allocatable capacity minus what its warm pools
/// hold when full (their sandboxes are not free capacity, whether or not they are up yet).
pub fn without_pool(
    offered: crate::reconcile::Resources,
    pools: &[crate::runtime::container::pool::WarmPoolSpec],
) -> Result<crate::reconcile::Resources, AgentError> {
    let held = crate::runtime::container::pool::reservation(pools);
    match (
        offered.cpu_millis.checked_sub(held.cpu_millis),
        offered.memory_mib.checked_sub(held.memory_mib),
    ) {
        (Some(cpu_millis), Some(memory_mib)) => Ok(crate::reconcile::Resources {
            cpu_millis,
            memory_mib,
        }),
        _ => Err(AgentError::Invalid(format!(
            "--warm-pool reserves {} CPU millis and {} MiB; the node offers only {} and {}",
            held.cpu_millis, held.memory_mib, offered.cpu_millis, offered.memory_mib
        ))),
    }
}

/// Refill the warm pools whenever a placement took a sandbox (and once a second regardless),
/// one pool sandbox at a time, until stop. Pool sandboxes a dead daemon left go first.
async fn keep_pools_full(runtime: Arc<ContainerRuntime>, mut stop: watch::Receiver<bool>) {
    if runtime.warm_pools().is_empty() {
        return;
    }
    runtime.pool_clear_leftovers().await;
    loop {
        if let Err(e) = runtime.pool_refill().await {
            tracing::warn!(error = %e, "could not fill the warm pool; retrying in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::select! {
            () = runtime.pool_wanted() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn run_arc<R: Runtime + SandboxIo>(
    node: NodeConfig,
    runtime: Arc<R>,
    replicas: Arc<Replicas>,
    metrics: Arc<NodeMetrics>,
    io: IoPlan,
) -> Result<(), AgentError> {
    let mut node = node;
    // `checkpoint=true|false`: `surge nodes` shows it and `--constraint checkpoint=true` selects
    // nodes that can checkpoint (an operator's own label wins).
    let support = runtime.checkpoint_support();
    if let Err(why) = &support {
        tracing::info!(node = %node.node_id, "no checkpoints on this node: {why}");
    }
    node.labels
        .entry("checkpoint".to_owned())
        .or_insert_with(|| support.is_ok().to_string());
    tracing::info!(node = %node.node_id, runtime = runtime.name(), address = %node.address,
        cpu_millis = node.allocatable.cpu_millis, memory_mib = node.allocatable.memory_mib, "node starting");
    let stop = io.stop.clone();
    let hosted = HashMap::from([(
        node.node_id.clone(),
        Hosted {
            runtime: runtime.clone(),
            activity: node.activity.clone(),
            templates: node
                .template_data_dir
                .as_deref()
                .map(crate::template::Templates::new),
        },
    )]);
    let _io = io.serve(hosted);
    NodeAgent::new(node, runtime, replicas, metrics)
        .run(stop)
        .await
}

/// The I/O service's listener, waiting for the nodes it will serve.
struct IoPlan {
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    /// How this node calls other nodes (template copies): its client identity.
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    stop: watch::Receiver<bool>,
}

impl IoPlan {
    /// Serve exec and files for `nodes` until stop; the task ends with the returned guard.
    fn serve<R: Runtime + SandboxIo>(self, nodes: HashMap<String, Hosted<R>>) -> AbortOnDrop<()> {
        let service = IoService::new(nodes, self.tls.is_some()).with_client_tls(self.client_tls);
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = io_server::serve(self.listener, service, self.tls, self.stop).await {
                tracing::error!(error = %e, "the I/O service (exec and files) stopped");
            }
        }))
    }
}

async fn wait_all(mut nodes: JoinSet<Result<(), AgentError>>) -> Result<(), AgentError> {
    while let Some(r) = nodes.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(AgentError::NodeFailed {
                    node: "simulated".into(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_pool_is_not_offered_to_the_scheduler() {
        use crate::runtime::container::pool::parse_warm_pool;
        let offered = crate::reconcile::Resources {
            cpu_millis: 4000,
            memory_mib: 8192,
        };
        let pools = [parse_warm_pool("busybox=2").expect("flag")];
        assert_eq!(
            without_pool(offered, &pools).expect("fits"),
            crate::reconcile::Resources {
                cpu_millis: 2000,
                memory_mib: 8192 - 512
            }
        );
        assert_eq!(without_pool(offered, &[]).expect("none"), offered);
        let too_big = [parse_warm_pool("busybox=5").expect("flag")];
        assert!(without_pool(offered, &too_big).is_err());
    }

    #[test]
    fn node_ids_become_safe_cgroup_components() {
        assert_eq!(cgroup_component("node-7.rack_2"), "node-7.rack_2");
        assert_eq!(cgroup_component("a/b c"), "a_b_c");
        assert_eq!(cgroup_component(".."), "_..");
        assert_eq!(cgroup_component("../x"), "_.._x");
    }
}
