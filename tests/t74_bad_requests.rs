//! Hostile requests against a real replica, over gRPC: every request type with field values
//! users and broken clients send (empty, huge, out of range, unknown names, bad characters).
//! Each must succeed or be refused with a code that says whose fault it is — InvalidArgument,
//! ResourceExhausted, FailedPrecondition, NotFound, OutOfRange, AlreadyExists — and a reason;
//! never Internal or Unknown (a panic in a handler reaches the client as one of those), and the
//! replica must still serve afterwards.

mod common;

use common::http;
use surge_chaos::sim::SimRng;
use surge_proto::jobs as pb;
use surge_proto::jobs::jobs_client::JobsClient;
use surge_proto::node as pn;
use surge_proto::node::node_api_client::NodeApiClient;
use tonic::transport::Channel;
use tonic::Code;

const ALLOWED: [Code; 6] = [
    Code::InvalidArgument,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::NotFound,
    Code::OutOfRange,
    Code::AlreadyExists,
];

fn string(r: &mut SimRng) -> String {
    match r.range(0, 8) {
        0 => String::new(),
        1 => "..".into(),
        2 => "a b\u{0}c".into(),
        3 => "x".repeat(200),
        4 => "ünïcödé".into(),
        5 => "../../etc/passwd".into(),
        6 => format!("ok-{}", r.range(0, 1_000)),
        _ => "busybox".into(),
    }
}

fn u64_of(r: &mut SimRng) -> u64 {
    match r.range(0, 6) {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << 40,
        3 => r.range(1, 5_000),
        _ => r.next_u64(),
    }
}

fn u32_of(r: &mut SimRng) -> u32 {
    match r.range(0, 5) {
        0 => 0,
        1 => u32::MAX,
        2 => 1_000_001,
        _ => u32::try_from(r.range(1, 20)).unwrap_or(1),
    }
}

fn valid_spec() -> pb::JobSpec {
    pb::JobSpec {
        count: 2,
        cpu_millis: 500,
        memory_mib: 256,
        template: "busybox".into(),
        command: vec!["true".into()],
        tenant: "fuzz".into(),
        ..Default::default()
    }
}

/// A valid spec with one to three fields made hostile.
fn hostile_spec(r: &mut SimRng) -> pb::JobSpec {
    let mut s = valid_spec();
    for _ in 0..r.range(1, 4) {
        match r.range(0, 13) {
            0 => s.count = u32_of(r),
            1 => s.cpu_millis = u64_of(r),
            2 => s.memory_mib = u64_of(r),
            3 => s.template = string(r),
            4 => s.command = (0..r.range(0, 300)).map(|_| string(r)).collect(),
            5 => {
                s.env = (0..r.range(0, 300))
                    .map(|i| (format!("{}{i}", string(r)), string(r)))
                    .collect()
            }
            #[allow(
                clippy::cast_possible_truncation,
                reason = "any i32 will do: the low 32 bits of a random draw"
            )]
            6 => s.priority = r.next_u64() as i32,
            7 => s.tenant = string(r),
            8 => s.gang = true,
            9 => s.strategy = (r.next_u64() % 5) as i32 - 1,
            10 => {
                s.constraints = (0..r.range(0, 40))
                    .map(|_| pb::Constraint {
                        key: string(r),
                        op: ["=", "!=", "<", ""][r.index(4)].into(),
                        value: string(r),
                    })
                    .collect()
            }
            11 => {
                s.restart = Some(pb::RestartPolicy {
                    mode: ["never", "on-failure", "always"][r.index(3)].into(),
                    max_restarts: u32_of(r),
                })
            }
            _ => s.name = string(r),
        }
    }
    s
}

/// What the hostile requests got back.
#[derive(Default)]
struct Findings {
    forbidden: Vec<String>,
    by_code: std::collections::BTreeMap<String, u32>,
}

/// Record a call's outcome; a forbidden code (or a refusal without a reason) is a finding.
fn judge<T>(what: &str, result: Result<T, tonic::Status>, f: &mut Findings) {
    let code = match &result {
        Ok(_) => "Ok".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    *f.by_code.entry(code).or_insert(0) += 1;
    if let Err(status) = result {
        if !ALLOWED.contains(&status.code()) || status.message().trim().is_empty() {
            f.forbidden.push(format!(
                "{what}: {:?} {:?}",
                status.code(),
                status.message()
            ));
        }
    }
}

async fn clients(addr: &str) -> (JobsClient<Channel>, NodeApiClient<Channel>) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (
        JobsClient::new(channel.clone()),
        NodeApiClient::new(channel),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_clear_refusal_and_the_replica_survives() {
    let (cluster, _dir, leader) = common::cluster(1, &[]).await;
    let addr = cluster.addr(leader).expect("address");
    let (mut jobs, mut nodes) = clients(&addr).await;
    let mut r = SimRng::new(0x5eed);
    let mut findings = Findings::default();

    // A real job and node, so some hostile requests hit existing things.
    let real = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(valid_spec()),
            idempotency_key: "real".into(),
        })
        .await
        .expect("a valid job is accepted")
        .into_inner()
        .job_id;

    for i in 0..150 {
        let req = pb::SubmitJobRequest {
            spec: Some(hostile_spec(&mut r)),
            idempotency_key: if r.chance(200) {
                string(&mut r)
            } else {
                format!("k{i}")
            },
        };
        let shown = format!("SubmitJob {req:?}");
        judge(&shown, jobs.submit_job(req).await, &mut findings);
    }
    judge(
        "SubmitJob without a spec",
        jobs.submit_job(pb::SubmitJobRequest::default()).await,
        &mut findings,
    );
    for _ in 0..30 {
        let job_id = if r.chance(300) { real } else { u64_of(&mut r) };
        judge(
            &format!("GetJob {job_id}"),
            jobs.get_job(pb::GetJobRequest { job_id }).await,
            &mut findings,
        );
        let req = pb::UpdateSandboxesRequest {
            job_id,
            first_index: u32_of(&mut r),
            count: u32_of(&mut r),
            action: [0, 1, 2, 3, 4, 77, -1][r.index(7)],
            cpu_millis: if r.chance(500) { u64_of(&mut r) } else { 0 },
            memory_mib: if r.chance(500) { u64_of(&mut r) } else { 0 },
        };
        let shown = format!("UpdateSandboxes {req:?}");
        judge(&shown, jobs.update_sandboxes(req).await, &mut findings);
        // Forks of missing, out-of-range or not-running sandboxes, counts past the cap, keys
        // of any shape: refused with a reason, never a crash.
        let req = pb::ForkSandboxRequest {
            job_id,
            index: u32_of(&mut r),
            count: [0, 1, 64, 65, u32::MAX][r.index(5)],
            idempotency_key: string(&mut r),
            labels: [(string(&mut r), string(&mut r))].into_iter().collect(),
            lease_ms: [0, 1, u64::MAX][r.index(3)],
        };
        let shown = format!("ForkSandbox {req:?}");
        judge(&shown, jobs.fork_sandbox(req).await, &mut findings);
        let req = pb::ListJobsRequest {
            tenant: string(&mut r),
            state: [0, 1, 5, 6, -3][r.index(5)],
            limit: u32_of(&mut r),
            before_id: u64_of(&mut r),
            labels: Default::default(),
        };
        let shown = format!("ListJobs {req:?}");
        judge(&shown, jobs.list_jobs(req).await, &mut findings);
        let req = pb::SetQuotaRequest {
            tenant: string(&mut r),
            cpu_millis: u64_of(&mut r),
            memory_mib: u64_of(&mut r),
        };
        let shown = format!("SetQuota {req:?}");
        judge(&shown, jobs.set_quota(req).await, &mut findings);
    }
    for _ in 0..40 {
        let req = pn::RegisterNodeRequest {
            node_id: string(&mut r),
            address: string(&mut r),
            allocatable: Some(pn::Resources {
                cpu_millis: u64_of(&mut r),
                memory_mib: u64_of(&mut r),
            }),
            os: string(&mut r),
            arch: string(&mut r),
            pool: string(&mut r),
            templates: (0..r.range(0, 3)).map(|_| string(&mut r)).collect(),
            max_sandboxes: u32_of(&mut r),
            runtime: string(&mut r),
            ..Default::default()
        };
        let shown = format!("RegisterNode {req:?}");
        judge(&shown, nodes.register_node(req).await, &mut findings);
        let node_id = string(&mut r);
        judge(
            &format!("Heartbeat {node_id:?}"),
            nodes
                .heartbeat(pn::HeartbeatRequest {
                    node_id: node_id.clone(),
                    ..Default::default()
                })
                .await,
            &mut findings,
        );
        let updates = (0..r.range(0, 5))
            .map(|_| pn::SandboxStatus {
                job_id: if r.chance(500) { real } else { u64_of(&mut r) },
                index: u32_of(&mut r),
                state: [3, 5, 77, 0, 1][r.index(5)],
                generation: u64_of(&mut r),
                ..Default::default()
            })
            .collect();
        let req = pn::ReportStatusRequest {
            node_id: node_id.clone(),
            updates,
            ..Default::default()
        };
        let shown = format!("ReportStatus {req:?}");
        judge(&shown, nodes.report_status(req).await, &mut findings);
        judge(
            &format!("DrainNode {node_id:?}"),
            nodes.drain_node(pn::DrainNodeRequest { node_id }).await,
            &mut findings,
        );
    }
    assert!(
        findings.forbidden.is_empty(),
        "{} request(s) got a code that blames the server, or no reason:\n{}",
        findings.forbidden.len(),
        findings.forbidden.join("\n")
    );
    eprintln!("replies by code: {:?}", findings.by_code);
    // The requests were hostile enough to be refused, and not all of them.
    let count = |c: &str| findings.by_code.get(c).copied().unwrap_or(0);
    assert!(
        count("InvalidArgument") >= 100 && count("Ok") >= 10,
        "{:?}",
        findings.by_code
    );

    // The replica still serves, and still accepts a valid job.
    let again = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(valid_spec()),
            idempotency_key: "after".into(),
        })
        .await
        .expect("the replica still accepts jobs after the hostile requests");
    assert!(again.into_inner().job_id > real);
    drop(cluster);
}

/// Sends whatever bytes it is given as a gRPC message and hands back the reply's bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        let mut out = vec![0; n];
        prost::bytes::Buf::copy_to_slice(src, &mut out);
        Ok(Some(out))
    }
}

/// Bytes that are not protobuf at all get InvalidArgument with the decoder's reason (tonic's
/// own answer would be Internal, which reads like a server fault); the same bytes path carries a
/// valid request through, so the test can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_bytes_are_invalid_argument() {
    let (cluster, _dir, leader) = common::cluster(1, &[]).await;
    let addr = cluster.addr(leader).expect("addr");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = |p: &'static str| tonic::codegen::http::uri::PathAndQuery::from_static(p);
    for (method, bytes) in [
        ("/surge.jobs.Jobs/SubmitJob", vec![0xff, 0xff, 0xff, 0xff]),
        ("/surge.jobs.Jobs/GetJob", vec![0x0a, 0x80]),
        ("/surge.node.NodeApi/Heartbeat", vec![0x08]),
    ] {
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary(tonic::Request::new(bytes), path(method), RawCodec)
            .await
            .expect_err("garbage must be refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{method}: {status:?}"
        );
        assert!(
            status.message().contains("decode"),
            "{method}: {}",
            status.message()
        );
    }
    // Positive control: a real, encoded request through the same raw path is served.
    let valid = prost::Message::encode_to_vec(&pb::SubmitJobRequest {
        spec: Some(valid_spec()),
        idempotency_key: "raw-valid".into(),
    });
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(valid),
        path("/surge.jobs.Jobs/SubmitJob"),
        RawCodec,
    )
    .await
    .expect("a valid request through the raw codec is accepted");
    drop(cluster);
}

/// `{"error": "..."}` with a non-empty message, or the test fails with what came instead.
fn json_error(what: &str, body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body:?}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error: {body}"));
    assert!(!msg.is_empty(), "{what}: empty error");
    msg.to_string()
}

/// The HTTP job API refuses what is not a job with a JSON error and the status that says why:
/// a body that is not a JSON object, a malformed constraint, a body over the cap, unknown paths
/// and methods, a bad query and a bad job id. Control: a valid submission is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_and_non_objects_are_refused() {
    let (cluster, _dir, leader) = common::cluster(1, &[]).await;
    let addr = cluster.replica(leader).expect("replica").http.clone();
    let json = "application/json";

    // Not a JSON object: an array used to create a job.
    for body in ["[1,2,3]", "[]", "7", "null"] {
        let (code, text) = http(&addr, "POST", "/v1/jobs", json, body.as_bytes()).await;
        assert_eq!(code, 400, "{body}: {text}");
        let msg = json_error(body, &text);
        assert!(msg.contains("JSON object"), "{body}: {msg}");
    }
    // A malformed constraint is refused with the syntax, not queued forever.
    for c in ["os==", "=linux", "os"] {
        let body = serde_json::json!({"count": 1, "template": "busybox", "command": ["true"],
                                      "constraints": [c]})
        .to_string();
        let (code, text) = http(&addr, "POST", "/v1/jobs", json, body.as_bytes()).await;
        assert_eq!(code, 400, "{c}: {text}");
        let msg = json_error(c, &text);
        assert!(msg.contains("KEY=VALUE or KEY!=VALUE"), "{c}: {msg}");
    }
    // Over the 1 MiB cap.
    let big = vec![b' '; scheduler_body_max() + 1];
    let (code, text) = http(&addr, "POST", "/v1/jobs", json, &big).await;
    assert_eq!(code, 413, "{text}");
    json_error("oversized body", &text);
    // Unknown path, method not allowed, bad query, bad id, bad content.
    for (method, path, want) in [
        ("GET", "/v2/nothing", 404),
        ("PUT", "/v1/jobs", 405),
        ("PATCH", "/v1/jobs/1", 405),
        ("GET", "/v1/jobs?limit=many", 400),
        ("GET", "/v1/jobs?colour=red", 400),
        ("GET", "/v1/jobs/not-a-number", 400),
        ("GET", "/v1/jobs/424242", 404),
    ] {
        let (code, text) = http(&addr, method, path, json, b"").await;
        assert_eq!(code, want, "{method} {path}: {text}");
        json_error(&format!("{method} {path}"), &text);
    }
    let (code, text) = http(&addr, "POST", "/v1/jobs", "text/plain", b"count=1").await;
    assert_eq!(code, 400, "{text}");
    json_error("not JSON", &text);

    // Control: a valid submission through the same client is created.
    let body = serde_json::json!({"count": 1, "template": "busybox", "command": ["true"],
                                  "constraints": ["os=linux"]})
    .to_string();
    let (code, text) = http(&addr, "POST", "/v1/jobs", json, body.as_bytes()).await;
    assert_eq!(code, 201, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(v["job_id"].as_u64().is_some(), "{text}");
    drop(cluster);
}

fn scheduler_body_max() -> usize {
    surge_scheduler::http::BODY_BYTES_MAX
}
