//! t75: a cluster with mutual TLS on every link and tenant tokens. It forms, takes a node and
//! runs a job end to end; then every way in without the right credentials is refused with its
//! own answer, each next to a positive control (the same call with the right credentials
//! succeeds), so a guard that lets everything through, or nothing, fails here.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, dump_logs, issue_cert, surge_ok};
use surge_client::{connect as client, Credentials};
use surge_harness::cluster::LocalCluster;
use surge_proto::cluster::{ProposeRequest, RemoveMemberRequest, StatusRequest};
use surge_proto::jobs as pb;
use surge_proto::node::{DrainNodeRequest, ListNodesRequest};
use surge_security::TlsDir;
use tonic::Code;

fn surge(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().expect("run surge")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A new token from `surge token new`, its hash appended to `file`.
fn token(file: &Path, grant: &[&str]) -> String {
    let mut args = vec!["token", "new", "--append", p(file)];
    args.extend_from_slice(grant);
    surge_ok(&args).trim().to_string()
}

fn creds(tls: Option<&TlsDir>, token: Option<&str>) -> Credentials {
    Credentials {
        tls: tls.cloned(),
        token: token.map(str::to_string),
    }
}

fn job_spec(tenant: &str) -> pb::JobSpec {
    pb::JobSpec {
        count: 2,
        cpu_millis: 500,
        memory_mib: 256,
        template: "busybox".into(),
        command: vec!["true".into()],
        tenant: tenant.into(),
        ..Default::default()
    }
}

async fn submit(
    addr: &str,
    c: &Credentials,
    tenant: &str,
    key: &str,
) -> Result<u64, tonic::Status> {
    client::jobs(addr, c)
        .expect("client")
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job_spec(tenant)),
            idempotency_key: key.into(),
        })
        .await
        .map(|r| r.into_inner().job_id)
}

async fn get(addr: &str, c: &Credentials, id: u64) -> Result<pb::Job, tonic::Status> {
    client::jobs(addr, c)
        .expect("client")
        .get_job(pb::GetJobRequest { job_id: id })
        .await
        .map(tonic::Response::into_inner)
}

async fn cancel(addr: &str, c: &Credentials, id: u64) -> Result<pb::Job, tonic::Status> {
    client::jobs(addr, c)
        .expect("client")
        .cancel_job(pb::CancelJobRequest { job_id: id })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(addr: &str, c: &Credentials) -> Result<Vec<pb::Job>, tonic::Status> {
    client::jobs(addr, c)
        .expect("client")
        .list_jobs(pb::ListJobsRequest {
            tenant: String::new(),
            state: 0,
            limit: 1000,
            before_id: 0,
            labels: Default::default(),
        })
        .await
        .map(|r| r.into_inner().jobs)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Refused by the connection itself (the TLS handshake, or a server that closes a plaintext
/// connection), not by an answer of the server's: the status comes from the transport.
fn assert_refused_by_tls<T: std::fmt::Debug>(r: Result<T, tonic::Status>) {
    let s = r.expect_err("the connection must be refused");
    assert!(
        matches!(
            s.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
        ),
        "{s:?}"
    );
    let from_transport = std::error::Error::source(&s)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(from_transport, "not a transport-level refusal: {s:?}");
}

/// What `curl` got from the replica's HTTP port.
#[derive(Debug)]
enum Reply {
    /// An HTTP answer: status and body.
    Http(u16, String),
    /// No HTTP answer at all: the connection itself was refused (curl's exit code, stderr).
    Refused(i32, String),
}

/// One request to the replica's HTTP port with `curl`, trusting the cluster CA `ca`,
/// presenting the certificate and key of the `--tls-dir` `cert` (if any) and a bearer token.
fn curl(url: &str, ca: &Path, cert: Option<&Path>, method: &str, token: Option<&str>) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        "--request",
        method,
    ])
    .args(["--cacert", p(&ca.join("ca.pem"))])
    .args(["--write-out", "\n%{http_code}"]);
    if let Some(dir) = cert {
        cmd.args(["--cert", p(&dir.join("cert.pem"))])
            .args(["--key", p(&dir.join("key.pem"))]);
    }
    if let Some(t) = token {
        cmd.args(["--header", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().expect("run curl (is it installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status: u16 = status.trim().parse().unwrap_or(0);
    match (out.status.code(), status) {
        (Some(0), s) if s > 0 => Reply::Http(s, body.to_string()),
        (code, _) => Reply::Refused(
            code.unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
    }
}

#[track_caller]
fn assert_status(reply: Reply, want: u16) -> String {
    match reply {
        Reply::Http(s, body) if s == want => body,
        other => panic!("expected HTTP {want}, got {other:?}"),
    }
}

/// curl's exit codes for "could not resolve", "could not connect" and "timed out": a server
/// that is down or stuck, not one that refused the peer.
const CURL_NOT_REACHED: [i32; 3] = [6, 7, 28];

#[track_caller]
fn assert_refused(reply: Reply) {
    match reply {
        Reply::Refused(code, stderr) => {
            eprintln!("refused as expected: curl exit {code}: {}", stderr.trim());
            assert!(
                !CURL_NOT_REACHED.contains(&code),
                "the server was not reached at all (curl exit {code}): {stderr}"
            );
        }
        other => panic!("the connection must be refused before any HTTP answer: {other:?}"),
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
    replica: PathBuf,
    node: PathBuf,
    client: TlsDir,
    node_tls: TlsDir,
    /// The cluster CA trusted, but a certificate from another CA presented.
    rogue: TlsDir,
    tokens: PathBuf,
    admin: String,
    alpha: String,
    beta: String,
}

fn pki() -> Pki {
    let mut dir = tempfile::tempdir().expect("temp dir");
    if std::env::var_os("SURGE_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping the test's files in {}", dir.path().display());
    }
    let root = dir.path().to_path_buf();
    let ca = root.join("ca");
    surge_ok(&["cert", "ca", "--out", p(&ca)]);
    let key_mode = std::fs::metadata(ca.join("ca-key.pem"))
        .expect("ca key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "the CA key must be private");
    // Never overwritten by accident.
    let again = surge(&["cert", "ca", "--out", p(&ca)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let (replica, node, client_dir) =
        (root.join("replica"), root.join("node"), root.join("client"));
    issue_cert(&ca, &replica, "replicas", "replica");
    issue_cert(&ca, &node, "node-host", "node");
    issue_cert(&ca, &client_dir, "operator", "client");

    let other_ca = root.join("other-ca");
    surge_ok(&["cert", "ca", "--out", p(&other_ca), "--name", "other"]);
    let rogue = root.join("rogue");
    issue_cert(&other_ca, &rogue, "intruder", "client");
    std::fs::copy(ca.join("ca.pem"), rogue.join("ca.pem")).expect("trust the real CA");

    let tokens = root.join("tokens");
    let admin = token(&tokens, &["--admin"]);
    let alpha = token(&tokens, &["--tenant", "alpha"]);
    let beta = token(&tokens, &["--tenant", "beta"]);
    let file = std::fs::read_to_string(&tokens).expect("tokens file");
    for t in [&admin, &alpha, &beta] {
        assert!(
            !file.contains(t.as_str()),
            "the tokens file must hold hashes only"
        );
    }
    Pki {
        client: TlsDir::load(&client_dir).expect("client tls"),
        node_tls: TlsDir::load(&node).expect("node tls"),
        rogue: TlsDir::load(&rogue).expect("rogue tls"),
        _dir: dir,
        root,
        replica,
        node,
        tokens,
        admin,
        alpha,
        beta,
    }
}

#[test]
fn tokens_without_tls_are_refused_at_start() {
    let pki = pki();
    let port = surge_harness::cluster::free_port().expect("port");
    let listen = format!("127.0.0.1:{port}");
    let out = surge(&[
        "server",
        "--id",
        "1",
        "--listen",
        &listen,
        "--data-dir",
        p(&pki.root.join("data")),
        "--bootstrap",
        &format!("1={listen}"),
        "--tokens",
        p(&pki.tokens),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tokens needs --tls-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_and_tokens_guard_every_link() {
    let pki = pki();
    let data = pki.root.join("cluster");
    std::fs::create_dir_all(&data).expect("cluster dir");
    let admin_c = creds(Some(&pki.client), Some(&pki.admin));
    let mut c = LocalCluster::new(&bin(), &data, 3, None)
        .expect("plan")
        .with_args(&["--tls-dir", p(&pki.replica), "--tokens", p(&pki.tokens)])
        .with_credentials(creds(Some(&pki.client), None));
    c.start_all().expect("start");
    let leader = match c.wait_leader(Duration::from_secs(30)).await {
        Ok(l) => l,
        Err(e) => {
            dump_logs(&c);
            panic!("the TLS cluster formed no leader: {e}");
        }
    };
    // Every replica answers over mutual TLS and agrees (replica-to-replica links work).
    if let Err(e) = c.wait_converged(&c.ids(), Duration::from_secs(30)).await {
        dump_logs(&c);
        panic!("replicas did not converge over TLS: {e}");
    }
    let addr = c.addr(leader).expect("addr");
    let follower = c
        .ids()
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    let faddr = c.addr(follower).expect("addr");

    // A node daemon with a node certificate registers (through any replica) and runs work.
    c.start_sim_nodes(
        "n",
        1,
        &["--tls-dir", p(&pki.node), "--sim-duration-ms", "300"],
    )
    .expect("start node");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = client::nodes(&addr, &admin_c)
            .expect("client")
            .list_nodes(ListNodesRequest {})
            .await
            .expect("list nodes")
            .into_inner()
            .nodes;
        if nodes.iter().any(|n| n.state().name() == "ready") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the TLS node never became ready: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --- end to end: tenant alpha's job runs to completion, submitted through a follower.
    let alpha = creds(Some(&pki.client), Some(&pki.alpha));
    let beta = creds(Some(&pki.client), Some(&pki.beta));
    let id = submit(&faddr, &alpha, "", "a-1")
        .await
        .expect("alpha submits");
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let j = get(&addr, &alpha, id).await.expect("alpha reads its job");
        if j.state().name() == "complete" {
            break j;
        }
        if Instant::now() > deadline {
            dump_logs(&c);
            panic!("job {id} never completed: {j:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        done.spec.as_ref().map(|s| s.tenant.as_str()),
        Some("alpha"),
        "a tenant token submits as its tenant"
    );

    // --- no client certificate: a TLS client that trusts the CA but presents nothing.
    let bare = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(
            std::fs::read(pki.replica.join("ca.pem")).expect("ca"),
        ),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(bare)
        .expect("tls")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let no_cert = surge_proto::cluster::cluster_client::ClusterClient::new(channel)
        .status(StatusRequest {})
        .await;
    assert_refused_by_tls(no_cert);
    // Plaintext to the TLS port is refused too.
    let plain = client::cluster(&addr, &creds(None, Some(&pki.admin)))
        .expect("client")
        .status(StatusRequest {})
        .await;
    assert_refused_by_tls(plain);
    // ... and the CLI says so in one line naming the replica, not an HTTP/2 protocol error.
    let out = surge(&["status", "--server", &addr]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains(&format!("the replica at {addr} requires TLS")),
        "{said}"
    );
    // The converse: a TLS client against a plaintext replica.
    let open_dir = tempfile::tempdir().expect("dir");
    let mut open = LocalCluster::new(
        Path::new(env!("CARGO_BIN_EXE_surge")),
        open_dir.path(),
        1,
        None,
    )
    .expect("cluster");
    open.start_all().expect("start");
    open.wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    let open_addr = open.addr(1).expect("addr");
    let out = surge(&[
        "status",
        "--server",
        &open_addr,
        "--tls-dir",
        p(&pki.root.join("client")),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && said.contains(&format!("the replica at {open_addr} does not speak TLS")),
        "{said}"
    );
    drop(open);
    // --- a certificate from another CA.
    let rogue = client::cluster(&addr, &creds(Some(&pki.rogue), Some(&pki.admin)))
        .expect("client")
        .status(StatusRequest {})
        .await;
    assert_refused_by_tls(rogue);
    // Positive control: the same call with the cluster's client certificate.
    let ok = client::cluster(&addr, &creds(Some(&pki.client), None))
        .expect("client")
        .status(StatusRequest {})
        .await
        .expect("status with a valid certificate");
    assert_eq!(ok.into_inner().leader_id, leader);

    // --- roles: a client certificate cannot use the replicas' internal API (the raw
    // proposal path would bypass every token check), nor a node certificate the job API.
    let propose = client::cluster(&addr, &admin_c)
        .expect("client")
        .propose(ProposeRequest::default())
        .await;
    assert_eq!(code(propose), Code::PermissionDenied);
    let node_jobs = list(&addr, &creds(Some(&pki.node_tls), Some(&pki.admin))).await;
    assert_eq!(code(node_jobs), Code::PermissionDenied);

    // --- no token, a bad token; control: alpha's token.
    let no_token = creds(Some(&pki.client), None);
    assert_eq!(code(get(&addr, &no_token, id).await), Code::Unauthenticated);
    assert_eq!(
        code(submit(&addr, &no_token, "", "x").await),
        Code::Unauthenticated
    );
    let bad = creds(Some(&pki.client), Some("surge_0000"));
    assert_eq!(code(get(&addr, &bad, id).await), Code::Unauthenticated);
    assert_eq!(code(list(&addr, &bad).await), Code::Unauthenticated);
    get(&addr, &alpha, id).await.expect("alpha's token works");

    // --- another tenant's job is not there for beta, exactly like a job that does not exist.
    let missing = get(&addr, &beta, 999_999).await.expect_err("no such job");
    let hidden = get(&addr, &beta, id)
        .await
        .expect_err("beta must not see alpha's job");
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    assert_eq!(
        hidden.message().replace(&id.to_string(), "N"),
        missing.message().replace("999999", "N"),
        "the refusal must not tell an existing job from a missing one"
    );
    let alpha_pending = submit(&addr, &alpha, "alpha", "a-big").await;
    let alpha_pending = alpha_pending.expect("alpha submits as itself");
    assert_eq!(
        code(cancel(&addr, &beta, alpha_pending).await),
        Code::NotFound
    );
    let sandbox = |who: Credentials| {
        let addr = addr.clone();
        async move {
            client::jobs(&addr, &who)
                .expect("client")
                .get_sandbox(pb::GetSandboxRequest {
                    job_id: id,
                    index: 0,
                })
                .await
        }
    };
    assert_eq!(code(sandbox(beta.clone()).await), Code::NotFound);
    sandbox(alpha.clone())
        .await
        .expect("alpha reads its own sandbox");
    assert!(
        list(&addr, &beta)
            .await
            .expect("beta lists")
            .iter()
            .all(|j| j.id != id),
        "beta's listing shows alpha's job"
    );
    assert_eq!(
        code(submit(&addr, &beta, "alpha", "b-as-a").await),
        Code::PermissionDenied,
        "beta cannot submit as alpha"
    );
    let beta_id = submit(&addr, &beta, "", "b-1").await.expect("beta submits");
    assert!(list(&addr, &beta)
        .await
        .expect("list")
        .iter()
        .any(|j| j.id == beta_id));
    // Controls: the owner cancels its own job; the admin sees every tenant's.
    let cancelled = cancel(&addr, &alpha, alpha_pending)
        .await
        .expect("alpha cancels its own");
    assert_eq!(cancelled.id, alpha_pending);
    get(&addr, &admin_c, beta_id)
        .await
        .expect("the admin sees beta's job");

    // --- exec and files: a tenant drives its own sandboxes only, through any replica, and the
    // node's I/O port (mutual TLS) answers replicas only.
    c.start_sim_nodes(
        "io",
        1,
        &[
            "--tls-dir",
            p(&pki.node),
            "--sim-duration-ms",
            "600000",
            "--label",
            "io=yes",
        ],
    )
    .expect("start the io node");
    let mut long = job_spec("alpha");
    long.count = 1;
    long.constraints = vec![pb::Constraint {
        key: "io".into(),
        op: "=".into(),
        value: "yes".into(),
    }];
    let io_job = client::jobs(&faddr, &alpha)
        .expect("client")
        .submit_job(pb::SubmitJobRequest {
            spec: Some(long),
            idempotency_key: "a-io".into(),
        })
        .await
        .expect("alpha submits a long job")
        .into_inner()
        .job_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&addr, &alpha, io_job)
        .await
        .expect("job")
        .counts
        .unwrap_or_default()
        .running
        == 0
    {
        assert!(Instant::now() < deadline, "the io job never ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let as_alpha = surge_client::Client::new(&faddr, alpha.clone()).expect("client");
    let as_beta = surge_client::Client::new(&faddr, beta.clone()).expect("client");
    let run = surge_client::io::Exec::new(["true"]);
    as_alpha
        .exec_output(io_job, 0, &run, None, 1024)
        .await
        .expect("alpha execs in its own sandbox through a follower");
    let hidden = as_beta
        .exec_output(io_job, 0, &run, None, 1024)
        .await
        .expect_err("beta must not exec in alpha's sandbox");
    let missing = as_beta
        .exec_output(999_999, 0, &run, None, 1024)
        .await
        .expect_err("no such job");
    assert_eq!(hidden.code(), Some(Code::NotFound), "{hidden}");
    assert_eq!(
        hidden.to_string().replace(&io_job.to_string(), "N"),
        missing.to_string().replace("999999", "N"),
        "exec must not tell another tenant's sandbox from a missing one"
    );
    let read = as_beta
        .read_file_bytes(io_job, 0, "/etc/passwd", 1024)
        .await
        .expect_err("beta must not read alpha's files");
    assert_eq!(read.code(), Some(Code::NotFound), "{read}");
    // The same for the calls that copy a sandbox: a snapshot into a template and a fork.
    let snap = as_beta
        .snapshot(io_job, 0, "stolen")
        .await
        .expect_err("beta must not snapshot alpha's sandbox");
    assert_eq!(snap.code(), Some(Code::NotFound), "{snap}");
    let fork = as_beta
        .fork(pb::ForkSandboxRequest {
            job_id: io_job,
            index: 0,
            count: 1,
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("beta must not fork alpha's sandbox");
    assert_eq!(fork.code(), Some(Code::NotFound), "{fork}");
    // Copying templates between nodes is an operator's call, not a tenant's.
    let copy = as_alpha
        .copy_template(surge_proto::sandbox::CopyTemplateRequest {
            template: "busybox".into(),
            count: 1,
            ..Default::default()
        })
        .await
        .expect_err("a tenant must not copy templates between nodes");
    assert_eq!(copy.code(), Some(Code::PermissionDenied), "{copy}");
    // The node's own port: a client certificate is refused, plaintext too; the replicas'
    // forwarding above is the positive control.
    let nodes = client::nodes(&addr, &admin_c)
        .expect("client")
        .list_nodes(ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    let node_addr = nodes
        .iter()
        .find(|n| n.node_id == "io-0")
        .map(|n| n.address.clone())
        .expect("io-0 registered its address");
    let start = || {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(surge_proto::sandbox::ExecInput {
            input: Some(surge_proto::sandbox::exec_input::Input::Start(
                run.start(io_job, 0, false),
            )),
        })
        .expect("queue");
        tokio_stream::wrappers::ReceiverStream::new(rx)
    };
    let direct = client::sandbox_io(&node_addr, &creds(Some(&pki.client), Some(&pki.admin)))
        .expect("client")
        .exec(start())
        .await;
    assert_eq!(code(direct), Code::PermissionDenied);
    let plain_node = client::sandbox_io(&node_addr, &creds(None, None))
        .expect("client")
        .exec(start())
        .await;
    assert!(plain_node.is_err(), "plaintext reached the node's I/O port");

    // --- admin-only calls with a tenant token: membership, drain, quota.
    let remove = client::cluster(&addr, &alpha)
        .expect("client")
        .remove_member(RemoveMemberRequest { id: 99 })
        .await;
    assert_eq!(code(remove), Code::PermissionDenied);
    let drain = |who: Credentials| {
        let addr = addr.clone();
        async move {
            client::nodes(&addr, &who)
                .expect("client")
                .drain_node(DrainNodeRequest {
                    node_id: "n-0".into(),
                })
                .await
        }
    };
    assert_eq!(code(drain(alpha.clone()).await), Code::PermissionDenied);
    let quota = |who: Credentials| {
        let addr = addr.clone();
        async move {
            client::jobs(&addr, &who)
                .expect("client")
                .set_quota(pb::SetQuotaRequest {
                    tenant: "alpha".into(),
                    cpu_millis: 1000,
                    memory_mib: 0,
                })
                .await
        }
    };
    assert_eq!(code(quota(alpha.clone()).await), Code::PermissionDenied);
    assert_eq!(code(quota(no_token.clone()).await), Code::Unauthenticated);
    // Controls: the admin token does them.
    quota(admin_c.clone())
        .await
        .expect("the admin sets a quota");
    drain(admin_c.clone())
        .await
        .expect("the admin drains a node");
    let remove = client::cluster(&addr, &admin_c)
        .expect("client")
        .remove_member(RemoveMemberRequest { id: 99 })
        .await;
    if let Err(s) = &remove {
        assert!(
            !matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
            "the admin must get past the guard: {s:?}"
        );
    }

    // --- the HTTP port (/healthz, /metrics, the JSON job API) is mutual TLS too.
    let http_addr = c.replica(leader).expect("replica").http.clone();
    let https = |path: &str| format!("https://{http_addr}{path}");
    let ca = &pki.replica;
    let client_dir = pki.client.dir().to_path_buf();
    let client_cert = Some(client_dir.as_path());
    let health = assert_status(curl(&https("/healthz"), ca, client_cert, "GET", None), 200);
    assert!(health.contains("leader_id"), "{health}");
    let metrics = assert_status(curl(&https("/metrics"), ca, client_cert, "GET", None), 200);
    assert!(metrics.contains("surge_"), "{metrics}");
    // Plain HTTP to the same port gets no HTTP answer (control: the https requests above).
    assert_refused(curl(
        &format!("http://{http_addr}/healthz"),
        ca,
        None,
        "GET",
        None,
    ));
    // No client certificate; a certificate of another CA (which trusts the cluster CA).
    assert_refused(curl(&https("/healthz"), ca, None, "GET", None));
    assert_refused(curl(&https("/metrics"), ca, None, "GET", None));
    assert_refused(curl(&https("/v1/jobs"), ca, None, "GET", Some(&pki.admin)));
    let rogue_dir = pki.rogue.dir().to_path_buf();
    assert_refused(curl(&https("/healthz"), ca, Some(&rogue_dir), "GET", None));
    assert_refused(curl(
        &https("/v1/jobs"),
        ca,
        Some(&rogue_dir),
        "GET",
        Some(&pki.admin),
    ));

    // --- the JSON API takes the same certificate roles and tokens as the gRPC one.
    let path = https(&format!("/v1/jobs/{id}"));
    let get_json = |cert: &Path, token: Option<&str>| curl(&path, ca, Some(cert), "GET", token);
    assert_status(get_json(&client_dir, None), 401);
    assert_status(get_json(&client_dir, Some("nope")), 401);
    assert_status(get_json(&client_dir, Some(&pki.beta)), 404);
    assert_status(curl(&path, ca, client_cert, "DELETE", Some(&pki.beta)), 404);
    // A node certificate may not use the job API, even with the admin token.
    assert_status(get_json(&pki.node, Some(&pki.admin)), 403);
    let body = assert_status(get_json(&client_dir, Some(&pki.alpha)), 200);
    assert!(body.contains("\"alpha\""), "{body}");
    let listed = assert_status(
        curl(&https("/v1/jobs"), ca, client_cert, "GET", Some(&pki.admin)),
        200,
    );
    assert!(listed.contains(&format!("{id}")), "{listed}");
    c.stop_all(Duration::from_secs(3));
}

/// Label operations keep to the caller's tenant: a tenant lists and cancels by label only its
/// own jobs, cannot name another tenant, and another tenant's job is "no job" to its keepalive
/// and wait; an admin's selector reaches every tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_operations_stay_within_the_tenant() {
    use std::collections::BTreeMap;
    let pki = pki();
    let data = pki.root.join("cluster");
    std::fs::create_dir_all(&data).expect("cluster dir");
    let mut c = LocalCluster::new(&bin(), &data, 1, None)
        .expect("plan")
        .with_args(&["--tls-dir", p(&pki.replica), "--tokens", p(&pki.tokens)])
        .with_credentials(creds(Some(&pki.client), None));
    c.start_all().expect("start");
    let leader = match c.wait_leader(Duration::from_secs(30)).await {
        Ok(l) => l,
        Err(e) => {
            dump_logs(&c);
            panic!("no leader: {e}");
        }
    };
    let addr = c.addr(leader).expect("addr");
    let alpha = creds(Some(&pki.client), Some(&pki.alpha));
    let beta = creds(Some(&pki.client), Some(&pki.beta));
    let admin = creds(Some(&pki.client), Some(&pki.admin));
    let exp7 = BTreeMap::from([("run".to_string(), "exp7".to_string())]);
    let submit = |who: &Credentials, key: &str| {
        let (addr, who, key, labels) = (addr.clone(), who.clone(), key.to_string(), exp7.clone());
        async move {
            client::jobs(&addr, &who)
                .expect("client")
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(pb::JobSpec {
                        labels,
                        tenant: String::new(),
                        ..job_spec("")
                    }),
                    idempotency_key: key,
                })
                .await
                .expect("submit")
                .into_inner()
                .job_id
        }
    };
    let a1 = submit(&alpha, "a1").await;
    let a2 = submit(&alpha, "a2").await;
    let b1 = submit(&beta, "b1").await;
    let by_label = |who: &Credentials| {
        let (addr, who, labels) = (addr.clone(), who.clone(), exp7.clone());
        async move {
            client::jobs(&addr, &who)
                .expect("client")
                .list_jobs(pb::ListJobsRequest {
                    limit: 100,
                    labels,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner()
                .jobs
                .iter()
                .map(|j| j.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by_label(&alpha).await,
        vec![a2, a1],
        "alpha sees its own only"
    );
    assert_eq!(by_label(&beta).await, vec![b1]);

    // beta cannot name alpha's tenant, nor touch alpha's job by id.
    let mut beta_api = client::jobs(&addr, &beta).expect("client");
    let refused = beta_api
        .cancel_jobs(pb::CancelJobsRequest {
            labels: exp7.clone(),
            tenant: "alpha".into(),
        })
        .await;
    assert_eq!(code(refused), Code::PermissionDenied);
    let keep = beta_api
        .keepalive(pb::KeepaliveRequest {
            job_id: a1,
            ..Default::default()
        })
        .await;
    let missing = beta_api
        .keepalive(pb::KeepaliveRequest {
            job_id: 999_999,
            ..Default::default()
        })
        .await;
    let (keep, missing) = (
        keep.expect_err("not beta's"),
        missing.expect_err("no such job"),
    );
    assert_eq!(keep.code(), Code::NotFound);
    assert_eq!(
        keep.message().replace(&a1.to_string(), "N"),
        missing.message().replace("999999", "N"),
        "another tenant's job reads exactly as a missing one"
    );
    let wait = beta_api
        .wait_job(pb::WaitJobRequest {
            job_id: a1,
            timeout_ms: 100,
            ..Default::default()
        })
        .await;
    assert_eq!(code(wait), Code::NotFound);

    // alpha's bulk cancel takes alpha's two jobs and leaves beta's.
    let r = client::jobs(&addr, &alpha)
        .expect("client")
        .cancel_jobs(pb::CancelJobsRequest {
            labels: exp7.clone(),
            tenant: String::new(),
        })
        .await
        .expect("alpha cancels by label")
        .into_inner();
    assert_eq!(r.cancelled, 2);
    let b = get(&addr, &beta, b1).await.expect("beta's job");
    assert_eq!(
        b.state().name(),
        "pending",
        "another tenant's job is untouched"
    );
    // An admin's selector spans tenants.
    let r = client::jobs(&addr, &admin)
        .expect("client")
        .cancel_jobs(pb::CancelJobsRequest {
            labels: exp7,
            tenant: String::new(),
        })
        .await
        .expect("admin cancels by label")
        .into_inner();
    assert_eq!((r.cancelled, r.job_ids), (1, vec![b1]));
}
