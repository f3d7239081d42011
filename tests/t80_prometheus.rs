//! Monitoring: the shipped Prometheus config, alert rules and Grafana dashboard, against a real
//! Prometheus (Debian's `prometheus` package, installed by `scripts/setup`) scraping real
//! replicas and a real `surge node` process.
//!
//! Skipped, with a message, only where the package cannot be installed.

mod common;
mod ops;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ops::*;
use serde_json::Value;
use surge_client::open as client;
use surge_harness::cluster::free_port;

/// How long Prometheus may take to be ready, and then to show each series.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(30);
/// Sandboxes of the submitted job.
const JOB_SANDBOXES: u32 = 3;
/// Simulated nodes in the one `surge node` process.
const SIM_NODES: u32 = 5;

fn deploy() -> std::path::PathBuf {
    repo().join("deploy")
}

fn dashboard() -> Value {
    let path = deploy().join("grafana/surge.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard's panels (rows included), with the panel title.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "panel {title:?} has an empty query"
                );
                out.push((title.clone(), expr.to_string()));
            }
            if let Some(inner) = p["panels"].as_array() {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        d["panels"].as_array().expect("dashboard has panels"),
        &mut out,
    );
    out
}

/// Every `expr` of the alert and recording rules (a line-based read of our own file: each
/// `expr:` is either inline or a `>-` block indented below it).
fn rule_exprs(alerts_yml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = alerts_yml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        if let Some(rest) = l.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest == ">-" || rest == "|" {
                let indent = lines[i].len() - l.len();
                let mut block = String::new();
                i += 1;
                while i < lines.len() {
                    let next = lines[i];
                    let ni = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && ni <= indent {
                        break;
                    }
                    block.push_str(next.trim());
                    block.push(' ');
                    i += 1;
                }
                out.push(block);
                continue;
            }
            out.push(rest.to_string());
        }
        i += 1;
    }
    out
}

#[test]
fn rules_config_and_dashboard_pass_the_checkers() {
    let Some(promtool) = debian_tool("promtool") else {
        return;
    };
    let prom = deploy().join("prometheus");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&prom),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("SUCCESS"), "promtool check rules: {said}");
    // Every alert fires on the synthetic series of alerts_test.yml and stays quiet on a healthy
    // cluster.
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&prom),
    );
    // The scrape config as shipped, with its file_sd targets in place.
    let dir = tempfile::tempdir().expect("temp dir");
    write_prometheus_config(dir.path(), &["127.0.0.1:7080"], &["127.0.0.1:7090"], None);
    run_ok(
        Command::new(&promtool)
            .args(["check", "config", "prometheus.yml"])
            .current_dir(dir.path()),
    );

    let names: BTreeSet<String> =
        rule_exprs(&std::fs::read_to_string(prom.join("alerts.yml")).expect("read alerts.yml"))
            .iter()
            .flat_map(|e| surge_metric_names(e))
            .collect();
    // The alerts the issue asks for, by the metric they watch.
    for needed in [
        "surge_raft_is_leader",
        "surge_raft_apply_lag_entries",
        "surge_scheduler_pending_sandboxes",
        "surge_scheduler_nodes_down",
        "surge_node_sandboxes",
        // Utilisation at its limit with work waiting, queue wait p99, nodes down in numbers.
        "surge_cluster_cpu_cores",
        "surge_cluster_memory_bytes",
        "surge_cluster_sandboxes",
        "surge_scheduler_queue_wait_seconds_bucket",
        "surge_cluster_nodes",
    ] {
        assert!(
            names.contains(needed),
            "no rule watches {needed}: {names:?}"
        );
    }

    let d = dashboard();
    assert_eq!(d["uid"], "surge-cluster");
    let exprs = dashboard_exprs(&d);
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|(_, e)| surge_metric_names(e))
        .collect();
    for needed in [
        "surge_raft_leader_id",
        "surge_raft_term",
        "surge_raft_commit_index",
        "surge_raft_applied_index",
        "surge_raft_apply_lag_entries",
        "surge_raft_proposals_total",
        "surge_raft_proposal_duration_seconds_bucket",
        "surge_scheduler_placements_total",
        "surge_scheduler_placement_duration_seconds_bucket",
        "surge_scheduler_pending_sandboxes",
        "surge_scheduler_nodes_ready",
        "surge_scheduler_nodes_down",
        "surge_node_sandboxes",
        "surge_pool_cpu_cores",
        "surge_tenant_allocated_cpu_cores",
        "surge_tenant_quota_cpu_cores",
        "surge_scheduler_queue_wait_seconds_bucket",
        "surge_scheduler_tenant_preemptions_total",
        "surge_cluster_nodes",
        "surge_cluster_sandboxes",
    ] {
        assert!(used.contains(needed), "the dashboard shows no {needed}");
    }
}

/// Lay out deploy/prometheus/ as shipped in `dir`, with file_sd targets; `scrape_interval`
/// replaces the shipped 15 s (a test cannot wait for several 15 s scrapes).
fn write_prometheus_config(
    dir: &Path,
    servers: &[&str],
    nodes: &[&str],
    scrape_interval: Option<&str>,
) {
    write_shipped_config(dir, "prometheus.yml", servers, nodes, scrape_interval);
}

/// [`write_prometheus_config`] from the shipped file `shipped` (`prometheus-tls.yml` for a
/// cluster with `--tls-dir`), installed as `dir/prometheus.yml`.
fn write_shipped_config(
    dir: &Path,
    shipped: &str,
    servers: &[&str],
    nodes: &[&str],
    scrape_interval: Option<&str>,
) {
    let prom = deploy().join("prometheus");
    let mut config = std::fs::read_to_string(prom.join(shipped))
        .unwrap_or_else(|e| panic!("read {shipped}: {e}"));
    if let Some(every) = scrape_interval {
        for key in ["scrape_interval", "evaluation_interval"] {
            let from = format!("{key}: 15s");
            assert!(config.contains(&from), "{shipped} has no `{from}`");
            config = config.replace(&from, &format!("{key}: {every}"));
        }
        config = config.replace("scrape_timeout: 10s", &format!("scrape_timeout: {every}"));
    }
    std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
    std::fs::copy(prom.join("alerts.yml"), dir.join("alerts.yml")).expect("copy alerts.yml");
    std::fs::create_dir_all(dir.join("targets")).expect("targets dir");
    for (file, targets) in [("surge-servers.json", servers), ("surge-nodes.json", nodes)] {
        let sd = serde_json::json!([{ "targets": targets, "labels": { "cluster": "t80" } }]);
        std::fs::write(dir.join("targets").join(file), sd.to_string()).expect("write targets");
    }
}

struct Prometheus {
    addr: String,
    log: std::path::PathBuf,
    proc: Guarded,
}

impl Prometheus {
    fn start(bin: &Path, dir: &Path) -> Prometheus {
        let port = free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("prometheus.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let proc = Guarded::spawn(
            "prometheus",
            Command::new(bin)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("log"))
                .stderr(logf),
        );
        Prometheus { addr, log, proc }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            self.proc.assert_running(&self.log);
            if let Ok((200, _)) = http_get(&self.addr, "/-/ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in {PROMETHEUS_WAIT:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET an API path; the `data` of a `"status": "success"` answer.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) = http_get(&self.addr, path)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body:.200}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("HTTP {code}: {body:.300}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Wait until `promql` returns a sample whose value satisfies `ok`; return that value.
    fn wait_value(&self, promql: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let last = match self.query(promql) {
                Ok(result) => {
                    let values: Vec<f64> = result
                        .iter()
                        .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                        .collect();
                    if let Some(v) = values.iter().copied().find(|v| ok(*v)) {
                        return v;
                    }
                    format!("{values:?}")
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "{what}: `{promql}` never satisfied in {PROMETHEUS_WAIT:?}; last result {last}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_replicas_and_nodes() {
    let Some(prometheus) = debian_tool("prometheus") else {
        return;
    };
    let (mut c, dir, leader) = cluster(3, &[]).await;
    let node_metrics = format!("127.0.0.1:{}", free_port().expect("port"));
    c.start_sim_nodes(
        "sim",
        SIM_NODES,
        &["--metrics", &node_metrics, "--sim-duration-ms", "600000"],
    )
    .expect("start sim nodes");

    let replica_metrics: Vec<String> = c
        .ids()
        .iter()
        .map(|id| c.replica(*id).expect("replica").http.clone())
        .collect();
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("prometheus dir");
    let servers: Vec<&str> = replica_metrics.iter().map(String::as_str).collect();
    write_prometheus_config(&prom_dir, &servers, &[&node_metrics], Some("1s"));
    let mut p = Prometheus::start(&prometheus, &prom_dir);
    p.wait_ready();

    let addr = c.addr(leader).expect("leader addr");
    // A quota, so the tenant's quota series exist (4 cores; memory unlimited).
    client::jobs(&addr)
        .expect("client")
        .set_quota(surge_proto::jobs::SetQuotaRequest {
            tenant: "test".into(),
            cpu_millis: 4000,
            memory_mib: 0,
        })
        .await
        .expect("set quota");
    let job_id = client::jobs(&addr)
        .expect("client")
        .submit_job(job("t80", JOB_SANDBOXES))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    assert!(job_id > 0);

    // Every target is scraped.
    p.wait_value(
        r#"count(up{job="surge-server"} == 1)"#,
        "3 replicas up",
        |v| v == 3.0,
    );
    p.wait_value(r#"up{job="surge-node"}"#, "node daemon up", |v| v == 1.0);
    // The key series, with the values this cluster must have.
    p.wait_value(
        r#"max(surge_raft_leader_id{job="surge-server"})"#,
        "leader",
        |v| v == leader as f64,
    );
    p.wait_value(
        r#"sum(surge_raft_is_leader{job="surge-server"})"#,
        "exactly one replica leads",
        |v| v == 1.0,
    );
    p.wait_value(
        r#"min(surge_raft_commit_index{job="surge-server"})"#,
        "commit index on every replica",
        |v| v > 0.0,
    );
    // Through the recording rule of alerts.yml: the leader's view, not a follower's stale 0.
    p.wait_value(
        "surge:scheduler_nodes_ready:leader",
        "nodes ready (recording rule)",
        |v| v == f64::from(SIM_NODES),
    );
    p.wait_value(
        r#"sum(surge_node_sandboxes{job="surge-node", state="running"})"#,
        "sandboxes running",
        |v| v == f64::from(JOB_SANDBOXES),
    );
    p.wait_value(
        r#"sum(surge_scheduler_placements_total{job="surge-server"})"#,
        "placements",
        |v| v >= f64::from(JOB_SANDBOXES),
    );
    p.wait_value(
        r#"sum(surge_scheduler_placement_duration_seconds_count{job="surge-server"})"#,
        "placement latency observed",
        |v| v >= 1.0,
    );
    let p99 = p.wait_value(
        r#"histogram_quantile(0.99, sum by (le) (surge_scheduler_placement_duration_seconds_bucket{job="surge-server"}))"#,
        "placement latency p99",
        |v| v.is_finite() && v > 0.0,
    );
    assert!(p99 < 60.0, "placement p99 {p99} s");

    // The capacity series: every replica exports them, labelled by role; the leader's count
    // what this cluster holds.
    p.wait_value(
        r#"count(surge_cluster_nodes{job="surge-server", state="ready"})"#,
        "capacity series on every replica",
        |v| v == 3.0,
    );
    p.wait_value(
        r#"count(surge_cluster_nodes{job="surge-server", role="follower", state="ready"})"#,
        "followers labelled",
        |v| v == 2.0,
    );
    p.wait_value(
        r#"max(surge_cluster_nodes{job="surge-server", role="leader", state="ready"})"#,
        "nodes ready (capacity series)",
        |v| v == f64::from(SIM_NODES),
    );
    p.wait_value(
        r#"max(surge_cluster_sandboxes{job="surge-server", role="leader", state="running"})"#,
        "sandboxes running (capacity series)",
        |v| v == f64::from(JOB_SANDBOXES),
    );
    p.wait_value(
        r#"max(surge_cluster_jobs{job="surge-server", role="leader", state="running"})"#,
        "the job running",
        |v| v == 1.0,
    );
    // The job reserves 1 CPU and 512 MiB per sandbox.
    p.wait_value(
        r#"max(surge_cluster_cpu_cores{job="surge-server", role="leader", kind="allocated"})"#,
        "CPU reserved",
        |v| v == f64::from(JOB_SANDBOXES),
    );
    p.wait_value(
        r#"sum(surge_pool_memory_bytes{job="surge-server", role="leader", kind="allocated"})"#,
        "memory reserved per pool",
        |v| v == f64::from(JOB_SANDBOXES) * 512.0 * 1024.0 * 1024.0,
    );
    p.wait_value(
        r#"max(surge_tenant_allocated_cpu_cores{job="surge-server", role="leader", tenant="test"})"#,
        "the tenant's reservation",
        |v| v == f64::from(JOB_SANDBOXES),
    );
    p.wait_value(
        r#"max(surge_tenant_quota_cpu_cores{job="surge-server", role="leader", tenant="test"})"#,
        "the tenant's quota",
        |v| v == 4.0,
    );
    p.wait_value(
        r#"sum(surge_scheduler_tenant_preemptions_total{job="surge-server", tenant="test"})"#,
        "preemptions per tenant, initialised at 0",
        |v| v == 0.0,
    );
    p.wait_value(
        "surge:cluster_cpu_allocated:ratio",
        "utilisation (recording rule)",
        |v| v > 0.0 && v <= 1.0,
    );
    for until in ["placed", "running"] {
        p.wait_value(
            &format!(
                r#"sum(surge_scheduler_queue_wait_seconds_count{{job="surge-server", tenant="test", priority="0", until="{until}"}})"#
            ),
            &format!("queue wait until {until} observed per sandbox"),
            |v| v == f64::from(JOB_SANDBOXES),
        );
    }

    // alerts.yml loaded and evaluating: every rule healthy, and on this healthy cluster the
    // critical alerts stay quiet.
    let rules = p.api("/api/v1/rules").expect("rules");
    let mut n_rules = 0;
    for g in rules["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().expect("rules") {
            n_rules += 1;
            assert_eq!(r["health"], "ok", "rule unhealthy: {r}");
        }
    }
    assert!(n_rules >= 10, "only {n_rules} rules loaded");
    let firing = p.query(r#"ALERTS{alertstate="firing"}"#).expect("alerts");
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );

    // The dashboard and the rules query only metrics the binaries export, and every dashboard
    // query is valid PromQL that returns data here.
    let mut families = Vec::new();
    for target in replica_metrics.iter().chain([&node_metrics]) {
        let (code, text) = http_get(target, "/metrics").expect("scrape");
        assert_eq!(code, 200);
        families.extend(metric_families(&text));
    }
    let alerts_yml =
        std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).expect("alerts.yml");
    for expr in rule_exprs(&alerts_yml) {
        for name in surge_metric_names(&expr) {
            assert!(
                family_of(&name, &families).is_some(),
                "alerts.yml queries {name}, which no replica or node exports"
            );
        }
    }
    let d = dashboard();
    let mut empty = Vec::new();
    for (title, expr) in dashboard_exprs(&d) {
        for name in surge_metric_names(&expr) {
            assert!(
                family_of(&name, &families).is_some(),
                "dashboard panel {title:?} queries {name}, which no replica or node exports"
            );
        }
        let concrete = expr.replace("$__rate_interval", "1m");
        let result = p
            .query(&concrete)
            .unwrap_or_else(|e| panic!("panel {title:?}: `{concrete}` is refused: {e}"));
        if result.is_empty() {
            empty.push(title);
        }
    }
    // rate() over a counter that has not moved, or OOM kills that never happened, may be empty;
    // the state panels must not be.
    for must in [
        "Leader",
        "Term",
        "Commit and applied index",
        "Pending sandboxes",
        "Nodes ready",
        "Live sandboxes per node daemon",
        "Cluster utilisation",
        "Nodes by state",
        "Sandboxes and jobs by state",
        "Tenant CPU reserved against quota",
    ] {
        assert!(
            !empty.iter().any(|t| t == must),
            "dashboard panel {must:?} shows nothing on a live cluster (empty: {empty:?})"
        );
    }

    drop(p);
    c.stop_all(Duration::from_secs(5));
}

/// With `--tls-dir` the replicas' HTTP port takes only clients with a certificate of the
/// cluster CA: the shipped `prometheus-tls.yml`, with a client certificate laid out as ansible
/// installs it (`surge-tls/` beside the config), scrapes them. (The refusals of clients without
/// a certificate are t75's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_tls_replicas_with_its_certificate() {
    let Some(prometheus) = debian_tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let path = |p: &str| root.join(p).to_str().expect("utf-8 path").to_string();
    surge_ok(&["cert", "ca", "--out", &path("ca")]);
    let issue = |out: &str, name: &str, role: &str| {
        issue_cert(&root.join("ca"), &root.join(out), name, role);
    };
    issue("replica", "r", "replica");
    issue("client", "operator", "client");
    issue("prometheus/surge-tls", "prometheus", "client");
    let client_tls = surge_security::TlsDir::load(&root.join("client")).expect("client tls");

    std::fs::create_dir_all(root.join("cluster")).expect("cluster dir");
    let mut c = surge_harness::cluster::LocalCluster::new(&bin(), &root.join("cluster"), 1, None)
        .expect("plan")
        .with_args(&["--tls-dir", &path("replica")])
        .with_credentials(surge_client::Credentials {
            tls: Some(client_tls),
            token: None,
        });
    c.start_all().expect("start");
    let leader = wait_leader(&mut c).await;
    let metrics = c.replica(leader).expect("replica").http.clone();

    let prom_dir = root.join("prometheus");
    write_shipped_config(
        &prom_dir,
        "prometheus-tls.yml",
        &[&metrics],
        &[],
        Some("1s"),
    );
    let promtool = debian_tool("promtool").expect("promtool comes with prometheus");
    let checked = Command::new(promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&prom_dir)
        .output()
        .expect("run promtool");
    assert!(
        checked.status.success(),
        "promtool check config prometheus-tls.yml: {}",
        String::from_utf8_lossy(&checked.stdout)
    );
    let mut p = Prometheus::start(&prometheus, &prom_dir);
    p.wait_ready();
    p.wait_value(r#"up{job="surge-server"}"#, "the TLS replica is up", |v| {
        v == 1.0
    });
    p.wait_value(
        r#"surge_raft_is_leader{job="surge-server"}"#,
        "its metrics over https",
        |v| v == 1.0,
    );
    c.stop_all(Duration::from_secs(3));
}
