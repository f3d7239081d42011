//! The node agent against a fake scheduler: a real tonic server on 127.0.0.1:0 that records what
//! the agent says and pushes assignments the test chooses. Real time, short sandboxes; every wait
//! is "until the condition holds", bounded by a generous deadline, never a timed assertion.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use surge_node::agent::{NodeAgent, NodeConfig, NodeMetrics, Replicas};
use surge_node::reconcile::{Resources, SandboxId, SandboxSpec};
use surge_node::runtime::sim::{SimProfile, SimRuntime};
use surge_node::runtime::{ObservedState, Runtime, StartRequest};
use surge_proto::node as pn;
use surge_proto::node::node_api_server::{NodeApi, NodeApiServer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

const DEADLINE: Duration = Duration::from_secs(20);

// ---- the fake scheduler ----

#[derive(Default)]
struct Recorded {
    registrations: Vec<pn::RegisterNodeRequest>,
    heartbeats: Vec<pn::HeartbeatRequest>,
    /// HeartbeatBatch calls (their heartbeats are in `heartbeats` too).
    heartbeat_batches: usize,
    reports: Vec<pn::ReportStatusRequest>,
    watches: usize,
    /// Registrations still to refuse with "not leader".
    refuse_registrations: usize,
    /// Client addresses seen (one per TCP connection).
    peers: std::collections::BTreeSet<SocketAddr>,
}

type Watcher = mpsc::Sender<Result<pn::Assignments, Status>>;

#[derive(Clone, Default)]
struct Fake {
    recorded: Arc<Mutex<Recorded>>,
    desired: Arc<Mutex<BTreeMap<(u64, u32), pn::Sandbox>>>,
    revision: Arc<Mutex<u64>>,
    heartbeat_interval_ms: Arc<Mutex<u64>>,
    /// The open watch streams.
    watchers: Arc<Mutex<Vec<Watcher>>>,
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<pn::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl NodeApi for Fake {
    async fn register_node(
        &self,
        req: Request<pn::RegisterNodeRequest>,
    ) -> Result<Response<pn::RegisterNodeReply>, Status> {
        let mut r = self.recorded.lock().expect("lock");
        if let Some(peer) = req.remote_addr() {
            r.peers.insert(peer);
        }
        if r.refuse_registrations > 0 {
            r.refuse_registrations -= 1;
            return Err(Status::unavailable("not the leader; try another replica"));
        }
        r.registrations.push(req.into_inner());
        Ok(Response::new(pn::RegisterNodeReply {
            index: 1,
            heartbeat_interval_ms: *self.heartbeat_interval_ms.lock().expect("lock"),
            // A quarter of the TTL is each heartbeat's deadline: generous, so that hundreds of
            // nodes in one debug-built test process on a busy CI host do not time out.
            ttl_ms: 4_000,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pn::HeartbeatRequest>,
    ) -> Result<Response<pn::HeartbeatReply>, Status> {
        self.recorded
            .lock()
            .expect("lock")
            .heartbeats
            .push(req.into_inner());
        Ok(Response::new(pn::HeartbeatReply { known: true }))
    }

    async fn heartbeat_batch(
        &self,
        req: Request<pn::HeartbeatBatchRequest>,
    ) -> Result<Response<pn::HeartbeatBatchReply>, Status> {
        let beats = req.into_inner().beats;
        let replies = beats
            .iter()
            .map(|_| pn::HeartbeatReply { known: true })
            .collect();
        let mut r = self.recorded.lock().expect("lock");
        r.heartbeat_batches += 1;
        r.heartbeats.extend(beats);
        Ok(Response::new(pn::HeartbeatBatchReply { replies }))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<pn::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        assert_eq!(
            req.into_inner().from_revision,
            0,
            "the agent always re-watches from 0"
        );
        let (tx, rx) = mpsc::channel(64);
        let full = pn::Assignments {
            revision: *self.revision.lock().expect("lock"),
            full: true,
            sandboxes: self
                .desired
                .lock()
                .expect("lock")
                .values()
                .cloned()
                .collect(),
            removed: vec![],
        };
        tx.try_send(Ok(full)).expect("room for the full set");
        self.watchers.lock().expect("lock").push(tx);
        self.recorded.lock().expect("lock").watches += 1;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_status(
        &self,
        req: Request<pn::ReportStatusRequest>,
    ) -> Result<Response<pn::ReportStatusReply>, Status> {
        let req = req.into_inner();
        let accepted = u32::try_from(req.updates.len()).expect("small");
        self.recorded.lock().expect("lock").reports.push(req);
        Ok(Response::new(pn::ReportStatusReply { accepted }))
    }

    async fn list_nodes(
        &self,
        _req: Request<pn::ListNodesRequest>,
    ) -> Result<Response<pn::ListNodesReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn drain_node(
        &self,
        _req: Request<pn::DrainNodeRequest>,
    ) -> Result<Response<pn::NodeInfo>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

impl Fake {
    fn new() -> Self {
        let fake = Self::default();
        *fake.heartbeat_interval_ms.lock().expect("lock") = 100;
        fake
    }

    async fn serve(&self) -> (SocketAddr, JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = NodeApiServer::new(self.clone());
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("fake scheduler");
        });
        (addr, server)
    }

    fn push(&self, sandboxes: Vec<pn::Sandbox>, removed: Vec<pn::Sandbox>) {
        let revision = {
            let mut r = self.revision.lock().expect("lock");
            *r += 1;
            *r
        };
        {
            let mut d = self.desired.lock().expect("lock");
            for s in &sandboxes {
                d.insert((s.job_id, s.index), s.clone());
            }
            for s in &removed {
                d.remove(&(s.job_id, s.index));
            }
        }
        let msg = pn::Assignments {
            revision,
            full: false,
            sandboxes,
            removed,
        };
        for w in self.watchers.lock().expect("lock").iter() {
            let _ = w.try_send(Ok(msg.clone()));
        }
    }

    /// End every open watch stream (as a replica that steps down would).
    fn close_watches(&self) {
        self.watchers.lock().expect("lock").clear();
    }

    fn with<T>(&self, f: impl FnOnce(&Recorded) -> T) -> T {
        f(&self.recorded.lock().expect("lock"))
    }

    /// The latest reported status of each sandbox (by arrival order).
    fn latest(&self) -> BTreeMap<(u64, u32), pn::SandboxStatus> {
        self.with(|r| {
            let mut out = BTreeMap::new();
            for rep in &r.reports {
                for u in &rep.updates {
                    out.insert((u.job_id, u.index), u.clone());
                }
            }
            out
        })
    }
}

/// A desired state on the wire, by the name people use.
fn wire_state(name: &str) -> i32 {
    surge_proto::jobs::SandboxState::from_name(name).expect("a sandbox state") as i32
}

fn sandbox(job: u64, index: u32, command: &[&str]) -> pn::Sandbox {
    pn::Sandbox {
        job_id: job,
        index,
        desired_state: wire_state("running"),
        resources: Some(pn::Resources {
            cpu_millis: 250,
            memory_mib: 64,
        }),
        template: "busybox".into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: Default::default(),
        generation: 1,
        revision: 1,
        user: String::new(),
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), surge_node::agent::AgentError>>,
    metrics: Arc<NodeMetrics>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("join").expect("agent ran cleanly");
    }
}

fn node_config(node_id: &str) -> NodeConfig {
    let mut cfg = NodeConfig::new(
        node_id,
        Resources {
            cpu_millis: 8_000,
            memory_mib: 16_384,
        },
    );
    cfg.labels.insert("zone".into(), "test-1".into());
    cfg.pool = "batch".into();
    cfg.max_sandboxes = 100;
    cfg.call_timeout = Duration::from_secs(5);
    cfg
}

fn start_agent<R: Runtime>(cfg: NodeConfig, runtime: Arc<R>, servers: &[String]) -> Running {
    let replicas = Arc::new(Replicas::new(servers, None).expect("replicas"));
    let metrics = Arc::new(NodeMetrics::new().expect("metrics"));
    let (stop, stop_rx) = watch::channel(false);
    let agent = NodeAgent::new(cfg, runtime, replicas, metrics.clone());
    Running {
        stop,
        task: tokio::spawn(agent.run(stop_rx)),
        metrics,
    }
}

/// Who carries out a simulated node's actions: the same scenarios run with both.
#[derive(Clone, Copy, Debug)]
enum Hands {
    /// One owner task per sandbox, as for every real runtime.
    Owners,
    /// The simulated fleet of `surge node --simulate`: no task per sandbox.
    Fleet,
}

fn start_sim_agent(
    hands: Hands,
    cfg: NodeConfig,
    runtime: Arc<SimRuntime>,
    servers: &[String],
) -> Running {
    match hands {
        Hands::Owners => start_agent(cfg, runtime, servers),
        Hands::Fleet => {
            let replicas = Arc::new(Replicas::new(servers, None).expect("replicas"));
            let metrics = Arc::new(NodeMetrics::new().expect("metrics"));
            let (stop, stop_rx) = watch::channel(false);
            let agent = NodeAgent::simulated(cfg, runtime, replicas, metrics.clone());
            Running {
                stop,
                task: tokio::spawn(agent.run(stop_rx)),
                metrics,
            }
        }
    }
}

fn sim(run_for_ms: u64) -> Arc<SimRuntime> {
    Arc::new(SimRuntime::new(SimProfile {
        run_for: Duration::from_millis(run_for_ms),
        ..SimProfile::default()
    }))
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_then_reports_twenty_sandboxes_running_then_succeeded() {
    registers_then_reports_twenty_sandboxes_running_then_succeeded_with(Hands::Owners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_then_reports_twenty_sandboxes_running_then_succeeded_in_the_fleet() {
    registers_then_reports_twenty_sandboxes_running_then_succeeded_with(Hands::Fleet).await;
}

async fn registers_then_reports_twenty_sandboxes_running_then_succeeded_with(hands: Hands) {
    let fake = Fake::new();
    let (addr, _server) = fake.serve().await;
    let agent = start_sim_agent(hands, node_config("n-1"), sim(1_500), &[addr.to_string()]);

    until("registered and watching", || fake.with(|r| r.watches == 1)).await;
    let reg = fake.with(|r| r.registrations[0].clone());
    assert_eq!(reg.node_id, "n-1");
    assert_eq!(reg.runtime, "sim");
    assert_eq!(reg.pool, "batch");
    assert_eq!(reg.max_sandboxes, 100);
    assert_eq!(reg.labels.get("zone").map(String::as_str), Some("test-1"));
    assert_eq!(
        reg.allocatable,
        Some(pn::Resources {
            cpu_millis: 8_000,
            memory_mib: 16_384
        })
    );
    assert_eq!(reg.templates, vec!["busybox".to_owned()]);
    // The first report of a session is the full one (empty: nothing runs yet).
    until("the first full report", || {
        fake.with(|r| !r.reports.is_empty())
    })
    .await;
    fake.with(|r| assert!(r.reports[0].full && r.reports[0].updates.is_empty()));

    // The watch's full set was empty; now twenty sandboxes arrive as a change.
    fake.push((0..20).map(|i| sandbox(7, i, &["work"])).collect(), vec![]);
    until("all twenty reported running", || {
        fake.with(|r| {
            let mut seen = std::collections::BTreeSet::new();
            for rep in &r.reports {
                for u in &rep.updates {
                    if u.state().name() == "running" {
                        seen.insert(u.index);
                    }
                }
            }
            seen.len() == 20
        })
    })
    .await;
    until("all twenty reported succeeded", || {
        let latest = fake.latest();
        latest.len() == 20 && latest.values().all(|s| s.state().name() == "succeeded")
    })
    .await;
    for s in fake.latest().values() {
        assert_eq!((s.exit_code, s.generation), (0, 1));
        assert!(
            s.log_tail.contains("simulated sandbox"),
            "exit reports carry the log tail: {:?}",
            s.log_tail
        );
    }
    // Batched: far fewer calls than updates (40 updates).
    let calls = fake.with(|r| r.reports.len());
    assert!(calls < 40, "{calls} ReportStatus calls for 40 updates");
    until("heartbeats", || fake.with(|r| r.heartbeats.len() >= 2)).await;
    // The gauges follow the owner tasks asynchronously: wait for them to settle.
    let metrics = agent.metrics.clone();
    let encode = move || String::from_utf8(metrics.encode().expect("metrics")).expect("utf8");
    until("the succeeded gauge reaches 20", || {
        encode().contains("surge_node_sandboxes{state=\"succeeded\"} 20")
    })
    .await;
    let text = String::from_utf8(agent.metrics.encode().expect("metrics")).expect("utf8");
    assert!(
        text.contains("surge_node_sandbox_start_seconds_count 20"),
        "{text}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_removed_from_the_desired_set_is_stopped_and_forgotten() {
    a_sandbox_removed_from_the_desired_set_is_stopped_and_forgotten_with(Hands::Owners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_removed_from_the_desired_set_is_stopped_and_forgotten_in_the_fleet() {
    a_sandbox_removed_from_the_desired_set_is_stopped_and_forgotten_with(Hands::Fleet).await;
}

async fn a_sandbox_removed_from_the_desired_set_is_stopped_and_forgotten_with(hands: Hands) {
    let fake = Fake::new();
    fake.push(vec![sandbox(8, 0, &["a"]), sandbox(8, 1, &["b"])], vec![]);
    let (addr, _server) = fake.serve().await;
    let runtime = sim(600_000);
    let agent = start_sim_agent(
        hands,
        node_config("n-2"),
        runtime.clone(),
        &[addr.to_string()],
    );
    until("both running", || {
        let l = fake.latest();
        l.len() == 2 && l.values().all(|s| s.state().name() == "running")
    })
    .await;

    fake.push(vec![], vec![sandbox(8, 1, &["b"])]);
    until("8.1 reported ended", || {
        fake.latest()
            .get(&(8, 1))
            .is_some_and(|s| s.state().name() != "running")
    })
    .await;
    let stopped = fake.latest()[&(8, 1)].clone();
    assert_eq!((stopped.state().name(), stopped.exit_code), ("failed", 143));
    assert!(
        stopped.message.contains("no longer assigned"),
        "{}",
        stopped.message
    );
    // Forgotten by the runtime too; the other one untouched.
    let rt = runtime.clone();
    until("8.1 released", || rt.len() == 1).await;
    assert_eq!(
        runtime
            .status(SandboxId::new(8, 0))
            .await
            .expect("8.0 kept")
            .state,
        ObservedState::Running
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_stream_closes_it_reconnects_and_resends_a_full_report() {
    after_the_stream_closes_it_reconnects_and_resends_a_full_report_with(Hands::Owners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_stream_closes_it_reconnects_and_resends_a_full_report_in_the_fleet() {
    after_the_stream_closes_it_reconnects_and_resends_a_full_report_with(Hands::Fleet).await;
}

async fn after_the_stream_closes_it_reconnects_and_resends_a_full_report_with(hands: Hands) {
    let fake = Fake::new();
    fake.push((0..3).map(|i| sandbox(9, i, &["x"])).collect(), vec![]);
    let (addr, _server) = fake.serve().await;
    let agent = start_sim_agent(hands, node_config("n-3"), sim(600_000), &[addr.to_string()]);
    until("three running", || {
        let l = fake.latest();
        l.len() == 3 && l.values().all(|s| s.state().name() == "running")
    })
    .await;
    let reports_before = fake.with(|r| r.reports.len());

    fake.close_watches();
    until("re-registered and watching again", || {
        fake.with(|r| r.registrations.len() == 2 && r.watches == 2)
    })
    .await;
    until("a full report after the reconnect", || {
        fake.with(|r| r.reports[reports_before..].iter().any(|rep| rep.full))
    })
    .await;
    let full = fake.with(|r| {
        r.reports[reports_before..]
            .iter()
            .find(|rep| rep.full)
            .cloned()
            .expect("full")
    });
    let listed: Vec<_> = full
        .updates
        .iter()
        .map(|u| (u.job_id, u.index, u.state().name()))
        .collect();
    assert_eq!(
        listed,
        vec![(9, 0, "running"), (9, 1, "running"), (9, 2, "running")]
    );
    assert!(agent.metrics.reconnects.get() >= 1);
    // Nothing was restarted: still one start per sandbox.
    assert_eq!(agent.metrics.start_seconds.get_sample_count(), 3);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_past_a_dead_replica_and_a_not_leader_answer() {
    let fake = Fake::new();
    fake.recorded.lock().expect("lock").refuse_registrations = 2;
    let (addr, _server) = fake.serve().await;
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let agent = start_agent(
        node_config("n-4"),
        sim(600_000),
        &[dead.to_string(), addr.to_string()],
    );
    until("registered after refusals", || {
        fake.with(|r| r.registrations.len() == 1 && r.watches == 1)
    })
    .await;
    assert!(
        agent.metrics.reconnects.get() >= 3,
        "dead, refused, dead, refused ..."
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_readopts_running_sandboxes_and_stops_strays() {
    a_restarted_agent_readopts_running_sandboxes_and_stops_strays_with(Hands::Owners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_readopts_running_sandboxes_and_stops_strays_in_the_fleet() {
    a_restarted_agent_readopts_running_sandboxes_and_stops_strays_with(Hands::Fleet).await;
}

async fn a_restarted_agent_readopts_running_sandboxes_and_stops_strays_with(hands: Hands) {
    let fake = Fake::new();
    fake.push((0..3).map(|i| sandbox(10, i, &["x"])).collect(), vec![]);
    let (addr, _server) = fake.serve().await;
    // Job 10 ends by itself after 3 s (so the new agent must be watching it to report that);
    // the stray, job 99, would run for ten minutes.
    let runtime = Arc::new(SimRuntime::with_profiles(|req| SimProfile {
        run_for: Duration::from_millis(if req.id.job == 10 { 3_000 } else { 600_000 }),
        ..SimProfile::default()
    }));
    let first = start_sim_agent(
        hands,
        node_config("n-5"),
        runtime.clone(),
        &[addr.to_string()],
    );
    until("three running", || {
        let l = fake.latest();
        l.len() == 3 && l.values().all(|s| s.state().name() == "running")
    })
    .await;
    first.stop().await;

    // While no daemon runs: a sandbox nobody assigned appears (debris of an older assignment).
    runtime
        .start(StartRequest {
            id: SandboxId::new(99, 0),
            generation: 1,
            revision: 1,
            spec: SandboxSpec::default(),
            resources: Resources {
                cpu_millis: 100,
                memory_mib: 64,
            },
        })
        .await
        .expect("stray");
    let reports_before = fake.with(|r| r.reports.len());

    let second = start_sim_agent(
        hands,
        node_config("n-5"),
        runtime.clone(),
        &[addr.to_string()],
    );
    until("the new agent's full report", || {
        fake.with(|r| r.reports[reports_before..].iter().any(|rep| rep.full))
    })
    .await;
    let full = fake.with(|r| {
        r.reports[reports_before..]
            .iter()
            .find(|rep| rep.full)
            .cloned()
            .expect("full")
    });
    let mut listed: Vec<_> = full.updates.iter().map(|u| (u.job_id, u.index)).collect();
    listed.sort_unstable();
    assert_eq!(listed, vec![(10, 0), (10, 1), (10, 2), (99, 0)]);
    assert!(full.updates.iter().all(|u| u.state().name() == "running"));

    let rt = runtime.clone();
    until("the stray is stopped and released", || rt.len() == 3).await;
    until("the stray's end reported", || {
        fake.latest()
            .get(&(99, 0))
            .is_some_and(|s| s.state().name() != "running")
    })
    .await;
    let stray = fake.latest()[&(99, 0)].clone();
    assert_eq!((stray.state().name(), stray.exit_code), ("failed", 143));
    // The adopted sandboxes are watched by the new agent: their exits are reported.
    until("the adopted sandboxes reported succeeded", || {
        let l = fake.latest();
        (0..3).all(|i| {
            l.get(&(10, i))
                .is_some_and(|s| s.state().name() == "succeeded")
        })
    })
    .await;
    for i in 0..3 {
        let o = runtime
            .status(SandboxId::new(10, i))
            .await
            .expect("kept as a record until the scheduler drops it");
        assert_eq!(
            (o.state, o.generation),
            (ObservedState::Exited { code: 0 }, 1)
        );
    }
    assert_eq!(
        second.metrics.start_seconds.get_sample_count(),
        0,
        "re-adopted, not restarted"
    );
    let errors = String::from_utf8(second.metrics.encode().expect("metrics")).expect("utf8");
    assert!(
        !errors.contains("surge_node_runtime_errors_total{"),
        "no runtime errors: {errors}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_resumes_and_stops_on_request() {
    pauses_resumes_and_stops_on_request_with(Hands::Owners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_resumes_and_stops_on_request_in_the_fleet() {
    pauses_resumes_and_stops_on_request_with(Hands::Fleet).await;
}

/// Desired states drive pause, resume and stops that take their time: 13.0 handles SIGTERM
/// after 300 ms, 13.1 ignores it and is killed when the 500 ms grace is up. Both end "stopped"
/// (asked for), with the exit status of how they ended.
async fn pauses_resumes_and_stops_on_request_with(hands: Hands) {
    let fake = Fake::new();
    fake.push(vec![sandbox(13, 0, &["x"]), sandbox(13, 1, &["y"])], vec![]);
    let (addr, _server) = fake.serve().await;
    let runtime = Arc::new(SimRuntime::with_profiles(|req| SimProfile {
        run_for: Duration::from_secs(600),
        term_exit_after: (req.id.index == 0).then_some(Duration::from_millis(300)),
        ..SimProfile::default()
    }));
    let mut cfg = node_config("n-13");
    cfg.policy.stop_grace_ms = 500;
    let agent = start_sim_agent(hands, cfg, runtime.clone(), &[addr.to_string()]);
    until("both running", || {
        let l = fake.latest();
        l.len() == 2 && l.values().all(|s| s.state().name() == "running")
    })
    .await;
    let with_state = |state: &str| pn::Sandbox {
        desired_state: wire_state(state),
        ..sandbox(13, 0, &["x"])
    };

    fake.push(vec![with_state("paused")], vec![]);
    until("13.0 reported paused", || {
        fake.latest()[&(13, 0)].state().name() == "paused"
    })
    .await;
    let id = SandboxId::new(13, 0);
    assert_eq!(
        runtime.status(id).await.expect("status").state,
        ObservedState::Paused
    );
    fake.push(vec![with_state("running")], vec![]);
    until("13.0 reported running again", || {
        fake.latest()[&(13, 0)].state().name() == "running"
    })
    .await;
    assert_eq!(
        runtime.status(id).await.expect("status").state,
        ObservedState::Running
    );

    let stopped_1 = pn::Sandbox {
        desired_state: wire_state("stopped"),
        ..sandbox(13, 1, &["y"])
    };
    fake.push(vec![with_state("stopped"), stopped_1], vec![]);
    until("both reported stopped", || {
        fake.latest()
            .values()
            .all(|s| s.state().name() == "stopped")
    })
    .await;
    let l = fake.latest();
    assert_eq!(l[&(13, 0)].exit_code, 143, "handled SIGTERM");
    assert_eq!(l[&(13, 1)].exit_code, 137, "killed after the grace");
    assert!(
        l[&(13, 0)].message.contains("request"),
        "{}",
        l[&(13, 0)].message
    );
    // Ended, kept as records until the scheduler drops them; never restarted.
    assert_eq!(agent.metrics.start_seconds.get_sample_count(), 2);
    agent.stop().await;
}

/// Real containers (root, crun, busybox-static); skipped with a message elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_exit_code_and_log_tail_are_reported() {
    use surge_node::runtime::container::{ContainerConfig, ContainerRuntime};
    use surge_node::testing::{is_root, unavailable};
    if !is_root() {
        unavailable("container test: needs root (namespaces, cgroups, overlay mounts)");
        return;
    }
    if !Path::new(surge_node::template::HOST_BUSYBOX).is_file() {
        unavailable("container test: /bin/busybox missing; apt-get install -y busybox-static");
        return;
    }
    let data = tempfile::tempdir().expect("tmp");
    let mut config = ContainerConfig::new(data.path());
    config.cgroup_parent = format!("/surge-agent-test-{}", std::process::id());
    let runtime = match ContainerRuntime::new(config) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            unavailable(&format!("container test: {e}"));
            return;
        }
    };
    runtime
        .templates()
        .ensure_busybox()
        .expect("busybox template");

    let fake = Fake::new();
    fake.push(
        vec![sandbox(11, 0, &["/bin/sh", "-c", "echo hi; exit 3"])],
        vec![],
    );
    let (addr, _server) = fake.serve().await;
    let mut cfg = node_config("n-ct");
    cfg.templates = runtime.templates().list().expect("templates");
    let agent = start_agent(cfg, runtime.clone(), &[addr.to_string()]);
    until("11.0 reported ended", || {
        fake.latest()
            .get(&(11, 0))
            .is_some_and(|s| s.state().name() != "running")
    })
    .await;
    let s = fake.latest()[&(11, 0)].clone();
    assert_eq!((s.state().name(), s.exit_code), ("failed", 3), "{s:?}");
    assert!(s.log_tail.contains("hi"), "log tail: {:?}", s.log_tail);
    assert_eq!(
        fake.with(|r| r.registrations[0].runtime.clone()),
        "container"
    );

    // Unassigned: the node forgets it (bundle, cgroup, mounts).
    fake.push(vec![], vec![sandbox(11, 0, &[])]);
    let rt = runtime.clone();
    let mut gone = false;
    let start = tokio::time::Instant::now();
    while !gone && start.elapsed() < DEADLINE {
        gone = rt.list().await.expect("list").is_empty();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the container sandbox was forgotten");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_simulated_nodes_share_one_connection() {
    const NODES: usize = 500;
    let fake = Fake::new();
    *fake.heartbeat_interval_ms.lock().expect("lock") = 2_000;
    // The same desired set for every node (the fake does not tell nodes apart): 4 sandboxes.
    fake.push((0..4).map(|i| sandbox(12, i, &["x"])).collect(), vec![]);
    let (addr, _server) = fake.serve().await;
    let replicas = Arc::new(Replicas::new(&[addr.to_string()], None).expect("replicas"));
    let metrics = Arc::new(NodeMetrics::new().expect("metrics"));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..NODES {
        // As `surge node --simulate` runs them: in the fleet, no task per sandbox.
        let cfg = node_config(&format!("sim-{i}"));
        let agent = NodeAgent::simulated(cfg, sim(600_000), replicas.clone(), metrics.clone());
        tasks.push(tokio::spawn(agent.run(stop_rx.clone())));
    }
    until("every node registered and watching", || {
        fake.with(|r| r.registrations.len() == NODES && r.watches == NODES)
    })
    .await;
    let m = metrics.clone();
    until("every node runs its four sandboxes", || {
        m.sandboxes.with_label_values(&["running"]).get() == 4 * NODES as i64
    })
    .await;
    until("all reported", || {
        let running: usize = fake.with(|r| {
            r.reports
                .iter()
                .flat_map(|rep| &rep.updates)
                .filter(|u| u.state().name() == "running")
                .count()
        });
        running >= 4 * NODES
    })
    .await;
    assert_eq!(
        fake.with(|r| r.peers.len()),
        1,
        "all nodes share one HTTP/2 connection to the replica"
    );
    let _ = stop.send(true);
    for t in tasks {
        t.await.expect("join").expect("node ran cleanly");
    }
    assert_eq!(
        metrics.sandboxes.with_label_values(&["running"]).get(),
        0,
        "stopped nodes withdraw their gauges"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_many_nodes_go_out_in_few_batches() {
    const NODES: usize = 200;
    let fake = Fake::new();
    *fake.heartbeat_interval_ms.lock().expect("lock") = 100;
    let (addr, _server) = fake.serve().await;
    let replicas = Arc::new(Replicas::new(&[addr.to_string()], None).expect("replicas"));
    replicas.batch_heartbeats(Duration::from_secs(2));
    let metrics = Arc::new(NodeMetrics::new().expect("metrics"));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..NODES {
        let mut cfg = node_config(&format!("beat-{i}"));
        cfg.memory_guard = None;
        let agent = NodeAgent::new(cfg, sim(600_000), replicas.clone(), metrics.clone());
        tasks.push(tokio::spawn(agent.run(stop_rx.clone())));
    }
    until("every node heartbeated three times", || {
        fake.with(|r| {
            let mut per_node = std::collections::HashMap::new();
            for h in &r.heartbeats {
                *per_node.entry(h.node_id.clone()).or_insert(0) += 1;
            }
            per_node.len() == NODES && per_node.values().all(|n| *n >= 3)
        })
    })
    .await;
    let (beats, batches) = fake.with(|r| (r.heartbeats.len(), r.heartbeat_batches));
    assert!(
        batches > 0 && batches * 10 <= beats,
        "{beats} heartbeats in {batches} batch calls: expected at least ten per call"
    );
    let _ = stop.send(true);
    for t in tasks {
        t.await.expect("join").expect("node ran cleanly");
    }
}
