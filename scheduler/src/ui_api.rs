//! The console's aggregated reads (`/v1/ui/...`), under the job API's TLS and token rules.
//!
//! The browser never receives a per-sandbox list: a job is its counts, its sandboxes grouped by
//! (node, state) and its kept outcomes (at most `outcomes::` bound per job); the heatmap is one
//! compact row per node. Each view is a pure function of the applied state, so it is tested
//! without a server, and each list has a `*_MAX`.
//!
//! | path                   | what                                                          |
//! |------------------------|---------------------------------------------------------------|
//! | `GET /v1/ui/overview`  | replica, leader, term, capacity and counts, jobs waiting and why |
//! | `GET /v1/ui/nodes`     | every node as `[id, state, cpu/mem offered, reserved, used, sandboxes]`, by pool |
//! | `GET /v1/ui/nodes/{id}`| one node: spec, state, templates, its sandboxes by job          |
//! | `GET /v1/ui/jobs/{id}` | one job's sandboxes by node and state, and its outcomes       |
//! | `GET /v1/ui/tenants`   | usage against quota                                           |
//!
//! A tenant's token sees the cluster's aggregates, and of jobs only its own.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::api_json::JobJson;
use crate::capacity::{summarize, Capacity};
use crate::http::{error, HttpState, JobCaller, JobIdParam};
use crate::model::Resources;
use crate::runs::SandboxState;
use crate::service::error::JobApiError;
use crate::service::guard::Caller;
use crate::state::ClusterState;

/// Most nodes in one heatmap answer (the cluster's design size is 10,000).
pub const HEATMAP_NODES_MAX: usize = 20_000;
/// Most jobs waiting listed on the overview.
pub const WAITING_JOBS_MAX: usize = 20;
/// Most (node, state) rows of one job.
pub const JOB_NODE_ROWS_MAX: usize = 500;
/// Most jobs listed on a node's page.
pub const NODE_JOBS_MAX: usize = 500;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/ui/overview", get(overview))
        .route("/v1/ui/nodes", get(nodes))
        .route("/v1/ui/nodes/{node}", get(node))
        .route("/v1/ui/jobs/{id}", get(job))
        .route("/v1/ui/tenants", get(tenants))
}

fn tenant_of(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Admin => None,
        Caller::Tenant(t) => Some(t),
    }
}

/// A job waiting and why (the overview's "jobs waiting" list).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Waiting {
    pub id: u64,
    pub tenant: String,
    pub name: String,
    pub pending: u64,
    pub reason: String,
    pub submitted_at_ms: u64,
}

/// The oldest jobs with pending sandboxes, visible to `tenant` (all with `None`).
pub fn waiting(s: &ClusterState, tenant: Option<&str>) -> (u64, Vec<Waiting>) {
    let mut total = 0;
    let mut out = Vec::new();
    for job in s.jobs.values() {
        if job.state.is_terminal() || job.counts.pending == 0 {
            continue;
        }
        if tenant.is_some_and(|t| t != job.spec.tenant) {
            continue;
        }
        total += 1;
        if out.len() < WAITING_JOBS_MAX {
            out.push(Waiting {
                id: job.id,
                tenant: job.spec.tenant.clone(),
                name: job.spec.name.clone(),
                pending: u64::from(job.counts.pending),
                reason: job.pending_reason.clone(),
                submitted_at_ms: job.submitted_at_ms,
            });
        }
    }
    (total, out)
}

fn res(r: &Resources) -> [u64; 2] {
    [r.cpu_millis, r.memory_mib]
}

/// The heatmap: pools, each with rows `[id, state, cpu_millis, memory_mib (offered),
/// cpu_millis, memory_mib (reserved), cpu_millis, memory_mib (used), sandboxes]`.
pub fn heatmap(s: &ClusterState, used: impl Fn(&str) -> Resources) -> serde_json::Value {
    let usage = s.node_usage();
    let mut pools: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    let mut n = 0;
    for (id, node) in s.nodes.iter().take(HEATMAP_NODES_MAX) {
        let u = usage.get(id).copied().unwrap_or_default();
        let [oc, om] = res(&node.spec.allocatable);
        let [ac, am] = res(&u.allocated);
        let [uc, um] = res(&used(id));
        pools.entry(&node.spec.pool).or_default().push(json!([
            id,
            node.state.as_str(),
            oc,
            om,
            ac,
            am,
            uc,
            um,
            u.sandboxes
        ]));
        n += 1;
    }
    let pools: Vec<_> = pools
        .into_iter()
        .map(|(pool, nodes)| json!({"pool": pool, "nodes": nodes}))
        .collect();
    json!({
        "columns": ["id", "state", "cpu_millis", "memory_mib", "allocated_cpu_millis",
                    "allocated_memory_mib", "used_cpu_millis", "used_memory_mib", "sandboxes"],
        "nodes": n,
        "truncated": s.nodes.len() > n,
        "pools": pools,
    })
}

/// One node's page, its jobs limited to `tenant`'s when a tenant asks.
pub fn node_page(
    s: &ClusterState,
    id: &str,
    used: Resources,
    tenant: Option<&str>,
) -> Option<serde_json::Value> {
    let node = s.nodes.get(id)?;
    let mut jobs: BTreeMap<u64, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for job in s.jobs.values() {
        if job.state.is_terminal() || tenant.is_some_and(|t| t != job.spec.tenant) {
            continue;
        }
        for (_, run) in job.runs.iter() {
            if run.node.as_deref() == Some(id) && run.state.is_active() {
                *jobs
                    .entry(job.id)
                    .or_default()
                    .entry(run.state.as_str())
                    .or_default() += u64::from(run.count);
            }
        }
    }
    let usage = s.node_usage().get(id).copied().unwrap_or_default();
    let total_jobs = jobs.len();
    let jobs: Vec<_> = jobs
        .into_iter()
        .take(NODE_JOBS_MAX)
        .map(|(job, counts)| {
            let tenant = s.jobs.get(&job).map(|j| j.spec.tenant.as_str());
            json!({"job": job, "tenant": tenant, "sandboxes": counts})
        })
        .collect();
    Some(json!({
        "id": id,
        "state": node.state.as_str(),
        "pool": node.spec.pool,
        "address": node.spec.address,
        "os": node.spec.os,
        "arch": node.spec.arch,
        "runtime": node.spec.runtime,
        "labels": node.spec.labels,
        "templates": node.spec.templates,
        "max_sandboxes": node.spec.max_sandboxes,
        "allocatable": node.spec.allocatable,
        "allocated": usage.allocated,
        "used": used,
        "sandboxes": usage.sandboxes,
        "jobs_total": total_jobs,
        "jobs": jobs,
    }))
}

/// One job's sandboxes by (node, state), largest first, and its kept outcomes.
pub fn job_detail(s: &ClusterState, id: u64) -> Option<serde_json::Value> {
    let job = s.jobs.get(&id)?;
    let mut rows: BTreeMap<(String, SandboxState), u64> = BTreeMap::new();
    for (_, run) in job.runs.iter() {
        let node = run.node.clone().unwrap_or_default();
        *rows.entry((node, run.state)).or_default() += u64::from(run.count);
    }
    let total_rows = rows.len();
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let by_node: Vec<_> = rows
        .into_iter()
        .take(JOB_NODE_ROWS_MAX)
        .map(
            |((node, state), count)| json!({"node": node, "state": state.as_str(), "count": count}),
        )
        .collect();
    let outcomes: Vec<_> = job
        .outcomes
        .iter()
        .map(|(index, o)| {
            let exit_code = (o.exit_code != crate::runs::EXIT_NOT_RUN).then_some(o.exit_code);
            // The run at this index says why it ended, while it is still the outcome's run.
            let reason = job
                .runs
                .get(index)
                .filter(|(_, run)| run.generation == o.generation)
                .and_then(|(_, run)| crate::lifetime::end_reason(run))
                .map(|r| r.as_str());
            json!({
                "index": index,
                "node": o.node,
                "state": o.state.as_str(),
                "exit_code": exit_code,
                "reason": reason,
                "message": o.message,
                "output_tail": o.log_tail,
                "at_ms": o.at_ms,
            })
        })
        .collect();
    Some(json!({
        "id": id,
        "rows_total": total_rows,
        "by_node": by_node,
        "outcomes": outcomes,
    }))
}

/// Usage against quota, for every tenant or only `tenant`.
pub fn tenant_rows(c: &Capacity, tenant: Option<&str>) -> serde_json::Value {
    let rows: Vec<_> = c
        .tenants
        .iter()
        .filter(|(name, _)| tenant.is_none_or(|t| t == name.as_str()))
        .map(|(name, t)| json!({"tenant": name, "usage": t}))
        .collect();
    json!({ "tenants": rows, "cluster": c.cluster })
}

async fn overview(State(state): State<HttpState>, JobCaller(caller): JobCaller) -> Response {
    let m = state.replica.raft().metrics().borrow().clone();
    let replicas: Vec<_> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| json!({"id": id, "address": n.addr}))
        .collect();
    let tenant = tenant_of(&caller);
    let leader = state.leader.clone();
    let (applied, mut capacity, (waiting_total, waiting)) = state.replica.read(|s, applied| {
        (
            applied,
            summarize(s, |n| leader.used(n)),
            waiting(s, tenant),
        )
    });
    if let Some(t) = tenant {
        capacity.tenants.retain(|name, _| name == t);
    }
    Json(json!({
        "replica": state.replica.id(),
        "is_leader": state.replica.is_leader(),
        "leader": m.current_leader,
        "term": m.current_term,
        "applied_index": applied,
        "replicas": replicas,
        "capacity": capacity,
        "jobs_waiting": waiting_total,
        "waiting": waiting,
        "at_ms": crate::service::now_ms(),
    }))
    .into_response()
}

async fn nodes(State(state): State<HttpState>, JobCaller(_): JobCaller) -> Response {
    let leader = state.leader.clone();
    Json(state.replica.read(|s, _| heatmap(s, |n| leader.used(n)))).into_response()
}

async fn node(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Path(id): Path<String>,
) -> Response {
    let used = state.leader.used(&id);
    match state
        .replica
        .read(|s, _| node_page(s, &id, used, tenant_of(&caller)))
    {
        Some(v) => Json(v).into_response(),
        None => error(JobApiError::NotFound(format!("no node {id:?}"))),
    }
}

async fn job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
) -> Response {
    // The job API's own read decides whether this caller may see the job.
    let j = match state.jobs.get(&caller, id).await {
        Ok(j) => j,
        Err(e) => return error(e),
    };
    let detail = state.replica.read(|s, _| job_detail(s, id));
    let mut v = detail.unwrap_or_else(|| json!({"by_node": [], "outcomes": []}));
    v["job"] = serde_json::to_value(JobJson::from(&j)).unwrap_or_default();
    Json(v).into_response()
}

async fn tenants(State(state): State<HttpState>, JobCaller(caller): JobCaller) -> Response {
    let leader = state.leader.clone();
    let c = state.replica.read(|s, _| summarize(s, |n| leader.used(n)));
    Json(tenant_rows(&c, tenant_of(&caller))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Response as Reply};
    use crate::state::tests::{node, spec};

    fn cluster(nodes: usize) -> ClusterState {
        let mut s = ClusterState::default();
        for i in 0..nodes {
            let mut n = node(&format!("n{i:05}"), 4);
            n.pool = if i % 2 == 0 { "a" } else { "b" }.into();
            let index = u64::try_from(i).expect("small") + 1;
            s.apply_command(index, Command::RegisterNode { node: n, at_ms: 0 });
        }
        s
    }

    fn submit(s: &mut ClusterState, index: u64, tenant: &str, count: u32) -> u64 {
        match s.apply_command(
            index,
            Command::SubmitJob {
                spec: spec(count, tenant),
                idempotency_key: format!("k{index}"),
                at_ms: 1,
            },
        ) {
            Reply::JobSubmitted { job_id, .. } => job_id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_heatmap_has_one_row_per_node_grouped_by_pool() {
        let s = cluster(1001);
        let h = heatmap(&s, |_| Resources::new(500, 0));
        assert_eq!(h["nodes"], 1001);
        let pools = h["pools"].as_array().expect("pools");
        let rows: usize = pools
            .iter()
            .map(|p| p["nodes"].as_array().expect("rows").len())
            .sum();
        assert_eq!(rows, 1001);
        assert_eq!(pools[0]["pool"], "a");
        assert_eq!(pools[0]["nodes"].as_array().expect("a").len(), 501);
        let row = &pools[0]["nodes"][0];
        assert_eq!(row[0], "n00000");
        assert_eq!(row[1], "ready");
        assert_eq!((row[2].as_u64(), row[6].as_u64()), (Some(4000), Some(500)));
    }

    #[test]
    fn a_big_job_is_rows_by_node_and_state_not_sandboxes() {
        let mut s = cluster(3);
        let job = submit(&mut s, 10, "t", 100_000);
        let runs = &mut s.jobs.get_mut(&job).expect("job").runs;
        runs.update(0, 40_000, |r| {
            r.state = SandboxState::Running;
            r.node = Some("n00001".into());
        });
        let d = job_detail(&s, job).expect("job");
        let rows = d["by_node"].as_array().expect("rows");
        assert_eq!(rows.len(), 2, "{d}");
        assert_eq!(rows[0]["count"], 60_000, "largest first");
        assert_eq!(rows[1]["node"], "n00001");
        assert_eq!(rows[1]["state"], "running");
        assert!(job_detail(&s, job + 1).is_none());
    }

    #[test]
    fn waiting_jobs_are_bounded_and_a_tenant_sees_only_its_own() {
        let mut s = ClusterState::default();
        for i in 0..30 {
            submit(&mut s, 100 + i, if i % 3 == 0 { "x" } else { "y" }, 1);
        }
        let (total, list) = waiting(&s, None);
        assert_eq!((total, list.len()), (30, WAITING_JOBS_MAX));
        let (total, list) = waiting(&s, Some("x"));
        assert_eq!(total, 10);
        assert!(list.iter().all(|w| w.tenant == "x"));
        // The node page hides other tenants' jobs from a tenant.
        let mut s = cluster(1);
        let job = submit(&mut s, 10, "x", 2);
        s.jobs.get_mut(&job).expect("job").runs.update(0, 2, |r| {
            r.state = SandboxState::Running;
            r.node = Some("n00000".into());
        });
        let all = node_page(&s, "n00000", Resources::ZERO, None).expect("node");
        assert_eq!(all["jobs"][0]["sandboxes"]["running"], 2);
        let other = node_page(&s, "n00000", Resources::ZERO, Some("y")).expect("node");
        assert_eq!(other["jobs_total"], 0);
        assert!(node_page(&s, "nope", Resources::ZERO, None).is_none());
    }
}
