//! The node's session with the scheduler: register, full report, watch, heartbeat; and again.
//!
//! ```text
//!   ┌─► RegisterNode ──► full ReportStatus ──► WatchAssignments(from 0) ──► { heartbeat every
//!   │        (timeout)       (via reporter)        (first message full)        interval; forward
//!   │                                                                          assignments }
//!   └── backoff, next replica ◄── error / "not leader" / stream closed / heartbeat says unknown
//! ```
//!
//! Sandboxes keep running while there is no session: losing the scheduler is not a reason to
//! stop work. Every session starts from revision 0, so the agent always reconciles against a
//! complete desired set after a reconnect, whatever it missed.
//!
//! Replicas are reached through one lazily connected HTTP/2 channel each ([`Replicas`]), shared by
//! every node of the process (`--simulate 500` opens one connection per replica, not 500).
//! Backoff is "equal jitter" (half fixed, half spread) with the spread drawn from a hash of the
//! node id, so hundreds of simulated nodes do not reconnect in lockstep, and a run replays exactly.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surge_proto::node as pn;
use surge_proto::node::node_api_client::NodeApiClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::convert::resources_to_pb;
use super::heartbeats::HeartbeatBatcher;
use super::metrics::{NodeGauges, NodeMetrics};
use super::report::ReporterControl;
use super::view::View;
use super::AgentError;
use crate::reconcile::{ObservedState, Resources};
use crate::runtime::{Runtime, MIB};

/// Scheduler replicas one daemon may be given.
pub const SERVERS_MAX: usize = 16;
/// Time to open a TCP connection to a replica.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default time any one call may take (registration waits for a Raft commit).
pub const CALL_TIMEOUT_MS: u64 = 10_000;
/// Reconnect backoff: first step and ceiling.
pub const BACKOFF_BASE_MS: u64 = 100;
pub const BACKOFF_MAX_MS: u64 = 10_000;
/// Consecutive failed heartbeats after which the session is abandoned.
pub const HEARTBEAT_FAILURES_MAX: u32 = 3;
/// Bounds on the heartbeat interval the scheduler may ask for.
pub const HEARTBEAT_INTERVAL_MIN_MS: u64 = 50;
pub const HEARTBEAT_INTERVAL_MAX_MS: u64 = 60_000;
/// Assignment messages queued between the session and the agent loop.
pub const ASSIGNMENTS_QUEUE_MAX: usize = 16;
/// HTTP/2 keepalive: a half-open connection is noticed even when no call is running.
const KEEPALIVE_INTERVAL_MS: u64 = 10_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 20_000;

/// A remote call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{call} failed: {code:?}: {message}")]
    Status {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{call} did not answer within {after_ms} ms")]
    Timeout { call: &'static str, after_ms: u64 },
}

impl CallError {
    /// Worth trying again (possibly at another replica) rather than a request the scheduler
    /// will never accept.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Status { code, .. } => is_retryable(*code),
        }
    }
}

/// "Not leader", overload, a restarting replica: answers that mean "try again, maybe elsewhere".
pub fn is_retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::FailedPrecondition
    )
}

/// Run one call with a deadline, sent along as `grpc-timeout` too.
pub async fn call_timeout<T, F>(call: &'static str, timeout: Duration, f: F) -> Result<T, CallError>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(CallError::Status {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(CallError::Timeout {
            call,
            after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Split `a:1,b:2` into checked `HOST:PORT` addresses.
pub fn parse_servers(spec: &str) -> Result<Vec<String>, AgentError> {
    let servers: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    if servers.len() > SERVERS_MAX {
        return Err(AgentError::Invalid(format!(
            "{} --server addresses given; at most {SERVERS_MAX}",
            servers.len()
        )));
    }
    for s in &servers {
        let hostport = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .unwrap_or(s);
        let ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
        if !ok {
            return Err(AgentError::BadServer(s.clone()));
        }
    }
    Ok(servers)
}

struct Replica {
    addr: String,
    channel: Channel,
}

/// One lazily connected channel per scheduler replica; see the module docs. With `tls`, every
/// channel is mutual TLS: the node's certificate, and only the cluster CA trusted.
pub struct Replicas {
    replicas: Vec<Replica>,
    /// With [`Replicas::batch_heartbeats`]: the heartbeats of all nodes of this process go out
    /// in one call per replica.
    heartbeats: std::sync::OnceLock<HeartbeatBatcher>,
}

impl Replicas {
    pub fn new(addrs: &[String], tls: Option<&ClientTlsConfig>) -> Result<Self, AgentError> {
        if addrs.is_empty() {
            return Err(AgentError::NoServers);
        }
        let mut replicas = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let hostport = addr
                .strip_prefix("http://")
                .or_else(|| addr.strip_prefix("https://"))
                .unwrap_or(addr);
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{hostport}"))
                .map_err(|_| AgentError::BadServer(addr.clone()))?;
            if let Some(tls) = tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|_| AgentError::BadServer(addr.clone()))?;
            }
            let channel = endpoint
                .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
                .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
                .keep_alive_while_idle(true)
                .connect_lazy();
            replicas.push(Replica {
                addr: addr.clone(),
                channel,
            });
        }
        Ok(Self {
            replicas,
            heartbeats: std::sync::OnceLock::new(),
        })
    }

    /// Sends the heartbeats of every node that shares these channels in batches, each call
    /// timing out after `timeout` (see [`super::heartbeats`]). Must be called inside the runtime.
    pub fn batch_heartbeats(&self, timeout: Duration) {
        self.heartbeats.get_or_init(|| {
            let clients = (0..self.replicas.len()).map(|i| self.client(i).1).collect();
            HeartbeatBatcher::start(clients, timeout)
        });
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The `i`-th replica (modulo their number) and a client on its shared channel.
    pub fn client(&self, i: usize) -> (&str, NodeApiClient<Channel>) {
        let r = &self.replicas[i % self.replicas.len().max(1)];
        let client = NodeApiClient::new(r.channel.clone())
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX);
        (&r.addr, client)
    }
}

/// A stable number from a node id, to seed its backoff jitter.
pub fn seed_of(node_id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    node_id.hash(&mut h);
    h.finish()
}

/// splitmix64: a well-mixed number from a counter (pure; see module docs on jitter).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Delay before reconnect attempt `attempt` (0 = first retry): within
/// `[ceiling/2, ceiling]`, `ceiling = min(BASE * 2^attempt, MAX)`.
pub fn backoff_ms(attempt: u32, seed: u64) -> u64 {
    let ceiling = BACKOFF_BASE_MS
        .saturating_mul(1u64 << attempt.min(20))
        .min(BACKOFF_MAX_MS);
    let half = ceiling / 2;
    half + mix(seed ^ u64::from(attempt)) % (half + 1)
}

/// Whether a session gives up on its replica after a failed heartbeat: once heartbeats have gone
/// unanswered for half the node's TTL (so it moves on before the TTL runs out), or after
/// [`HEARTBEAT_FAILURES_MAX`] failures in a row. One failure alone is not enough: the heartbeats
/// of a whole simulating process fail together when one batch call does, and every session that
/// ends registers again through Raft, thousands of writes on a cluster that is slow already.
pub fn heartbeats_lost(failures: u32, unanswered_for: Duration, ttl: Duration) -> bool {
    failures >= HEARTBEAT_FAILURES_MAX || unanswered_for >= ttl / 2
}

/// CPU rate from two cumulative samples, in millicores.
pub fn cpu_millis_between(prev_ns: u64, now_ns: u64, elapsed: Duration) -> u64 {
    let elapsed_ns = elapsed.as_nanos();
    if elapsed_ns == 0 {
        return 0;
    }
    // Sandboxes that ended take their counters with them: a drop is not negative use.
    let used = u128::from(now_ns.saturating_sub(prev_ns));
    u64::try_from(used * 1000 / elapsed_ns).unwrap_or(u64::MAX)
}

/// Why a session ended.
struct SessionEnd {
    reason: String,
    /// It got as far as the first message of the watch (reset the backoff).
    established: bool,
}

/// The inputs of one node's session loop.
pub struct Session<R> {
    pub registration: pn::RegisterNodeRequest,
    /// The templates the node holds now; a change is sent by registering again.
    pub templates: watch::Receiver<Vec<String>>,
    pub replicas: Arc<Replicas>,
    /// Replica to try first (spreads the nodes of one process over replicas).
    pub first_replica: usize,
    pub runtime: Arc<R>,
    pub view: Arc<View>,
    pub assignments: mpsc::Sender<pn::Assignments>,
    pub reporter: mpsc::Sender<ReporterControl>,
    pub metrics: Arc<NodeMetrics>,
    pub gauges: Arc<Mutex<NodeGauges>>,
    pub call_timeout: Duration,
}

/// Usage of the live sandboxes, cumulative CPU and current memory.
struct UsageSample {
    cpu_ns: u64,
    memory_bytes: u64,
    running: u32,
}

impl<R: Runtime> Session<R> {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let node_id = self.registration.node_id.clone();
        let seed = seed_of(&node_id);
        let mut attempt = 0u32;
        let mut index = self.first_replica;
        loop {
            let (addr, client) = self.replicas.client(index);
            let addr = addr.to_owned();
            let end = tokio::select! {
                end = self.session(client, index) => end,
                _ = stop.wait_for(|s| *s) => return,
            };
            let _ = self.reporter.send(ReporterControl::Disconnected).await;
            if end.established {
                attempt = 0;
            } else {
                attempt = attempt.saturating_add(1);
            }
            index = index.wrapping_add(1);
            self.metrics.reconnects.inc();
            let delay = Duration::from_millis(backoff_ms(attempt, seed));
            tracing::warn!(node = %node_id, replica = %addr, reason = %end.reason,
                retry_in_ms = delay.as_millis(), "session with the scheduler ended; reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn session(&self, mut client: NodeApiClient<Channel>, index: usize) -> SessionEnd {
        let node_id = self.registration.node_id.clone();
        let t = self.call_timeout;
        let end = |reason: String, established| SessionEnd {
            reason,
            established,
        };

        let mut templates = self.templates.clone();
        let mut registration = self.registration.clone();
        registration.templates = templates.borrow_and_update().clone();
        let reply = match call_timeout(
            "RegisterNode",
            t,
            client.register_node(request(registration.clone(), t)),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                if !e.is_retryable() {
                    tracing::error!(node = %node_id, error = %e,
                        "the scheduler refused this node's registration; fix the node's flags or the scheduler");
                }
                return end(e.to_string(), false);
            }
        };
        let interval_ms = reply
            .heartbeat_interval_ms
            .clamp(HEARTBEAT_INTERVAL_MIN_MS, HEARTBEAT_INTERVAL_MAX_MS);
        tracing::info!(node = %node_id, index = reply.index, heartbeat_interval_ms = interval_ms, "registered");
        // A hung replica must not keep this node past its TTL: heartbeats time out after a
        // quarter of the TTL, and the session moves to another replica once heartbeats have gone
        // unanswered for half of it (see `heartbeats_lost`).
        let ttl_ms = if reply.ttl_ms == 0 {
            10_000
        } else {
            reply.ttl_ms
        };
        let hb_timeout = Duration::from_millis((ttl_ms / 4).max(200)).min(t);
        let ttl = Duration::from_millis(ttl_ms);

        // The full report goes first, so the scheduler knows what survived before it hears of
        // anything new.
        let (full_sent, full_done) = oneshot::channel();
        if self
            .reporter
            .send(ReporterControl::Connected {
                client: client.clone(),
                full_sent,
            })
            .await
            .is_err()
        {
            return end("the node is stopping".into(), false);
        }
        if !matches!(tokio::time::timeout(t, full_done).await, Ok(Ok(()))) {
            tracing::warn!(node = %node_id, "full status report not acknowledged; it will be resent");
        }

        let watch_req = pn::WatchAssignmentsRequest {
            node_id: node_id.clone(),
            from_revision: 0,
        };
        // The deadline covers opening the stream, not its life: it is sent as a plain request.
        let mut stream = match call_timeout(
            "WatchAssignments",
            t,
            client.watch_assignments(tonic::Request::new(watch_req)),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => return end(e.to_string(), false),
        };

        let mut established = false;
        let mut failures = 0u32;
        let mut heartbeat = tokio::time::interval(Duration::from_millis(interval_ms));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prev_cpu: Option<(u64, Instant)> = None;
        let mut last_answered = Instant::now();
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if templates.has_changed().unwrap_or(false) {
                        registration.templates = templates.borrow_and_update().clone();
                        if let Err(e) = call_timeout("RegisterNode", t,
                            client.register_node(request(registration.clone(), t))).await {
                            return end(format!("re-registering with new templates failed: {e}"), established);
                        }
                    }
                    let usage = self.measure().await;
                    let now = Instant::now();
                    let cpu_millis = prev_cpu.map_or(0, |(ns, at)| cpu_millis_between(ns, usage.cpu_ns, now - at));
                    prev_cpu = Some((usage.cpu_ns, now));
                    let memory_mib = usage.memory_bytes.div_ceil(MIB);
                    if let Ok(mut g) = self.gauges.lock() {
                        g.set_used(&self.metrics, i64::try_from(cpu_millis).unwrap_or(i64::MAX),
                            i64::try_from(memory_mib).unwrap_or(i64::MAX));
                    }
                    let hb = pn::HeartbeatRequest {
                        node_id: node_id.clone(),
                        used: Some(resources_to_pb(Resources { cpu_millis, memory_mib })),
                        sandboxes_running: usage.running,
                    };
                    let beat = match self.replicas.heartbeats.get() {
                        Some(batcher) => match tokio::time::timeout(hb_timeout, batcher.beat(index, hb)).await {
                            Ok(r) => r,
                            Err(_) => Err(CallError::Timeout {
                                call: "Heartbeat",
                                after_ms: u64::try_from(hb_timeout.as_millis()).unwrap_or(u64::MAX),
                            }),
                        },
                        None => call_timeout("Heartbeat", hb_timeout, client.heartbeat(request(hb, hb_timeout))).await,
                    };
                    match beat {
                        Ok(r) if !r.known => {
                            return end("the scheduler does not know this node (re-registering)".into(), established);
                        }
                        Ok(_) => {
                            failures = 0;
                            last_answered = Instant::now();
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(node = %node_id, error = %e, failures, "heartbeat failed");
                            if heartbeats_lost(failures, last_answered.elapsed(), ttl) {
                                return end(format!("{failures} heartbeats in a row failed: {e}"), established);
                            }
                        }
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(a)) => {
                        if !established && !a.full {
                            tracing::warn!(node = %node_id, "watch from revision 0 did not start with the full set");
                        }
                        established = true;
                        if self.assignments.send(a).await.is_err() {
                            return end("the node is stopping".into(), established);
                        }
                    }
                    Ok(None) => return end("the scheduler closed the assignment stream".into(), established),
                    Err(status) => return end(format!("assignment stream failed: {:?}: {}", status.code(), status.message()), established),
                },
            }
        }
    }

    async fn measure(&self) -> UsageSample {
        let mut sample = UsageSample {
            cpu_ns: 0,
            memory_bytes: 0,
            running: 0,
        };
        for (id, state, _) in self.view.live() {
            if state == ObservedState::Running {
                sample.running += 1;
            }
            if let Ok(u) = self.runtime.usage(id).await {
                sample.cpu_ns = sample.cpu_ns.saturating_add(u.cpu_usage_ns);
                sample.memory_bytes = sample.memory_bytes.saturating_add(u.memory_bytes);
            }
        }
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_parsed_and_checked() {
        assert_eq!(
            parse_servers("a:1, b:2,,").expect("valid"),
            vec!["a:1".to_owned(), "b:2".to_owned()]
        );
        assert!(matches!(parse_servers(" , "), Err(AgentError::NoServers)));
        assert!(matches!(parse_servers("a"), Err(AgentError::BadServer(_))));
        assert!(matches!(
            parse_servers("a:0"),
            Err(AgentError::BadServer(_))
        ));
        assert!(matches!(
            parse_servers(":7070"),
            Err(AgentError::BadServer(_))
        ));
        assert!(parse_servers("http://10.0.0.1:7070").is_ok());
        let many = vec!["h:1"; SERVERS_MAX + 1].join(",");
        assert!(matches!(parse_servers(&many), Err(AgentError::Invalid(_))));
    }

    #[test]
    fn backoff_grows_to_a_ceiling_with_bounded_jitter() {
        for seed in [0, 1, 42, u64::MAX] {
            for attempt in 0..40 {
                let ceiling = (BACKOFF_BASE_MS << attempt.min(20)).min(BACKOFF_MAX_MS);
                let d = backoff_ms(attempt, seed);
                assert!((ceiling / 2..=ceiling).contains(&d), "{attempt}: {d}");
            }
        }
        assert_eq!(backoff_ms(3, 7), backoff_ms(3, 7), "deterministic");
        let spread: std::collections::BTreeSet<_> = (0..50)
            .map(|n| backoff_ms(5, seed_of(&format!("sim-{n}"))))
            .collect();
        assert!(spread.len() > 10, "nodes do not reconnect in lockstep");
    }

    #[test]
    fn a_session_outlasts_one_failed_heartbeat_but_not_half_the_ttl() {
        let ttl = Duration::from_secs(10);
        let s = Duration::from_secs;
        // Interval 1 s, each call timing out after a quarter of the TTL: one failure is ~3.5 s.
        assert!(!heartbeats_lost(1, Duration::from_millis(3_500), ttl));
        assert!(heartbeats_lost(2, Duration::from_millis(6_000), ttl));
        assert!(heartbeats_lost(1, s(5), ttl), "half the TTL unanswered");
        assert!(
            heartbeats_lost(HEARTBEAT_FAILURES_MAX, s(0), ttl),
            "fast failures count too"
        );
        // A long interval: the first failure is past half the TTL already.
        assert!(heartbeats_lost(1, s(60), ttl));
    }

    #[test]
    fn retryable_answers() {
        assert!(is_retryable(tonic::Code::Unavailable));
        assert!(is_retryable(tonic::Code::DeadlineExceeded));
        assert!(!is_retryable(tonic::Code::InvalidArgument));
        assert!(!is_retryable(tonic::Code::Unimplemented));
        assert!(CallError::Timeout {
            call: "x",
            after_ms: 1
        }
        .is_retryable());
    }

    #[test]
    fn cpu_rate_from_samples() {
        let s = Duration::from_secs(1);
        assert_eq!(cpu_millis_between(0, 500_000_000, s), 500);
        assert_eq!(cpu_millis_between(0, 2_000_000_000, s), 2000);
        assert_eq!(
            cpu_millis_between(900, 100, s),
            0,
            "a drop is not negative use"
        );
        assert_eq!(cpu_millis_between(0, 1, Duration::ZERO), 0);
    }
}
