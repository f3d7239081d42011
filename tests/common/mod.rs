//! Shared helpers of the cluster tests: real `surge server` processes on loopback.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use surge_client::open as client;
use surge_harness::cluster::LocalCluster;
use surge_proto::jobs as pb;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_surge"))
}

/// A started cluster of `n` replicas with a leader, plus the temp dir that holds its data.
/// `SURGE_TEST_KEEP=1` keeps the replicas' data dirs and logs for a post-mortem.
pub async fn cluster(n: u64, args: &[&str]) -> (LocalCluster, tempfile::TempDir, u64) {
    let mut dir = tempfile::tempdir().expect("temp dir");
    if std::env::var_os("SURGE_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping cluster data in {}", dir.path().display());
    }
    let mut c = LocalCluster::new(&bin(), dir.path(), n, None)
        .expect("plan cluster")
        .with_args(args);
    c.start_all().expect("start replicas");
    let leader = wait_leader(&mut c).await;
    (c, dir, leader)
}

pub async fn wait_leader(c: &mut LocalCluster) -> u64 {
    match c.wait_leader(Duration::from_secs(30)).await {
        Ok(l) => l,
        Err(e) => {
            dump_logs(c);
            panic!("no leader: {e}");
        }
    }
}

pub fn dump_logs(c: &LocalCluster) {
    for id in c.ids() {
        eprintln!("--- replica {id} ---\n{}", c.log_tail(id, 30));
    }
}

pub fn job(key: &str, count: u32) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            count,
            cpu_millis: 1000,
            memory_mib: 512,
            template: "busybox".into(),
            command: vec!["true".into()],
            tenant: "test".into(),
            ..Default::default()
        }),
        idempotency_key: key.into(),
    }
}

/// Submit `keys` through `addr` with `concurrency` clients; each key is retried (as a real
/// client would) until acknowledged or `deadline` passes. Returns key -> job id of the acks.
pub async fn submit_all(
    addr: &str,
    keys: Vec<String>,
    concurrency: usize,
    deadline: Duration,
) -> BTreeMap<String, u64> {
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(keys));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let started = std::time::Instant::now();
            let mut c = client::jobs(&addr).expect("client");
            loop {
                let Some(key) = queue.lock().await.pop() else {
                    break;
                };
                loop {
                    match c.submit_job(job(&key, 1)).await {
                        Ok(r) => {
                            acked.insert(key.clone(), r.into_inner().job_id);
                            break;
                        }
                        Err(e) if started.elapsed() < deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("submission {key} never acknowledged: {e}"),
                    }
                }
            }
            acked
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        all.extend(t.await.expect("submitter"));
    }
    all
}

/// Every job of tenant `test` on replica `addr` (after a linearizable read there).
pub async fn jobs_on(addr: &str) -> Vec<pb::Job> {
    let mut c = client::jobs(addr).expect("client");
    c.list_jobs(pb::ListJobsRequest {
        tenant: "test".into(),
        state: 0,
        limit: 10_000,
        before_id: 0,
        labels: Default::default(),
    })
    .await
    .expect("list jobs")
    .into_inner()
    .jobs
}

/// Assert that every acknowledged key is on the replica exactly once, with the acknowledged id.
pub async fn assert_all_present_once(addr: &str, acked: &BTreeMap<String, u64>) {
    let jobs = jobs_on(addr).await;
    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for j in &jobs {
        by_key
            .entry(j.idempotency_key.as_str())
            .or_default()
            .push(j.id);
    }
    for (key, ids) in &by_key {
        assert_eq!(
            ids.len(),
            1,
            "key {key} applied {} times: {ids:?}",
            ids.len()
        );
    }
    for (key, id) in acked {
        assert_eq!(
            by_key.get(key.as_str()),
            Some(&vec![*id]),
            "acknowledged submission {key} (job {id}) missing on {addr}"
        );
    }
}

/// Submit one job; its id.
/// Through the retrying client: a leader change mid-test (a busy CI machine) is waited out, as
/// any client would.
pub async fn submit_spec(addr: &str, spec: pb::JobSpec, key: &str) -> u64 {
    surge_client::Client::open(addr)
        .expect("client")
        .submit(pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: key.into(),
        })
        .await
        .expect("submit")
        .job_id
}

/// One job as the replica at `addr` sees it.
pub async fn get_job(addr: &str, id: u64) -> pb::Job {
    surge_client::Client::open(addr)
        .expect("client")
        .get_job(id)
        .await
        .expect("get job")
}

/// `surge` with arguments; its stdout, or a panic with its stderr.
pub fn surge_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .expect("run surge");
    assert!(
        out.status.success(),
        "surge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue a certificate for 127.0.0.1 with `surge cert issue` from the CA in `ca`.
pub fn issue_cert(ca: &Path, out: &Path, name: &str, role: &str) {
    let utf8 = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    surge_ok(&[
        "cert",
        "issue",
        "--ca",
        &utf8(ca),
        "--out",
        &utf8(out),
        "--name",
        name,
        "--role",
        role,
        "--san",
        "127.0.0.1",
    ]);
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); the status and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    // A body over the cap may be refused before it is read; the answer still comes.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
