//! Conversions between the gRPC messages and the domain model. Requests are validated here,
//! at the edge, so a bad request never reaches the log.

use surge_proto::jobs as pb;
use surge_proto::node as pn;

use crate::lifetime::{end_reason, EndReason};
use crate::model::{
    constraint, constraint_key, Counts, Job, JobSpec, JobState, Node, NodeSpec, NodeState,
    Operator, Resources, RestartPolicy, Strategy,
};
use crate::runs::{SandboxState, EXIT_NOT_RUN};
use crate::state::NodeUsage;
use crate::validate::{self, Invalid};

pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_TEMPLATE: &str = "busybox";

/// A sandbox's state on the wire.
pub fn sandbox_state_to_pb(s: SandboxState) -> pb::SandboxState {
    match s {
        SandboxState::Pending => pb::SandboxState::Pending,
        SandboxState::Placed => pb::SandboxState::Placed,
        SandboxState::Running => pb::SandboxState::Running,
        SandboxState::Paused => pb::SandboxState::Paused,
        SandboxState::Succeeded => pb::SandboxState::Succeeded,
        SandboxState::Failed => pb::SandboxState::Failed,
        SandboxState::OomKilled => pb::SandboxState::OomKilled,
        SandboxState::Lost => pb::SandboxState::Lost,
        SandboxState::Cancelled => pb::SandboxState::Cancelled,
        SandboxState::Stopped => pb::SandboxState::Stopped,
        SandboxState::Checkpointed => pb::SandboxState::Checkpointed,
    }
}

/// The scheduler's state for a wire value (`None`: unspecified or unknown).
pub fn sandbox_state_from_pb(s: i32) -> Option<SandboxState> {
    Some(match pb::SandboxState::try_from(s).ok()? {
        pb::SandboxState::Unspecified => return None,
        pb::SandboxState::Pending => SandboxState::Pending,
        pb::SandboxState::Placed => SandboxState::Placed,
        pb::SandboxState::Running => SandboxState::Running,
        pb::SandboxState::Paused => SandboxState::Paused,
        pb::SandboxState::Succeeded => SandboxState::Succeeded,
        pb::SandboxState::Failed => SandboxState::Failed,
        pb::SandboxState::OomKilled => SandboxState::OomKilled,
        pb::SandboxState::Lost => SandboxState::Lost,
        pb::SandboxState::Cancelled => SandboxState::Cancelled,
        pb::SandboxState::Stopped => SandboxState::Stopped,
        pb::SandboxState::Checkpointed => SandboxState::Checkpointed,
    })
}

pub fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Complete => pb::JobState::Complete,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// A job-state filter: `Ok(None)` for unspecified (any state).
pub fn job_state_from_pb(s: i32) -> Result<Option<JobState>, Invalid> {
    Ok(Some(match pb::JobState::try_from(s) {
        Ok(pb::JobState::Unspecified) => return Ok(None),
        Ok(pb::JobState::Pending) => JobState::Pending,
        Ok(pb::JobState::Running) => JobState::Running,
        Ok(pb::JobState::Complete) => JobState::Complete,
        Ok(pb::JobState::Failed) => JobState::Failed,
        Ok(pb::JobState::Cancelled) => JobState::Cancelled,
        Err(_) => {
            return Err(invalid(
                "state",
                format!(
                    "unknown job state {s}; use {}",
                    pb::JobState::names().join(", ")
                ),
            ))
        }
    }))
}

fn node_state_to_pb(s: NodeState) -> pn::NodeState {
    match s {
        NodeState::Ready => pn::NodeState::Ready,
        NodeState::Down => pn::NodeState::Down,
        NodeState::Draining => pn::NodeState::Draining,
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

pub fn job_spec_from_pb(spec: pb::JobSpec) -> Result<JobSpec, Invalid> {
    let strategy = match pb::Strategy::try_from(spec.strategy) {
        Ok(pb::Strategy::Binpack) => Strategy::Binpack,
        Ok(pb::Strategy::Spread) => Strategy::Spread,
        Err(_) => {
            return Err(invalid(
                "strategy",
                format!("unknown strategy {}", spec.strategy),
            ))
        }
    };
    let mut constraints = Vec::with_capacity(spec.constraints.len());
    for c in spec.constraints {
        let not_equal = match c.op.as_str() {
            "=" | "==" | "" => false,
            "!=" => true,
            other => {
                return Err(invalid(
                    "constraints",
                    format!("unknown operator {other:?}; use = or !="),
                ))
            }
        };
        constraints.push(constraint(&c.key, not_equal, &c.value));
    }
    let restart = match spec.restart {
        None => RestartPolicy::Never,
        Some(r) => match r.mode.as_str() {
            "" | "never" => RestartPolicy::Never,
            "on-failure" => RestartPolicy::OnFailure {
                max_restarts: r.max_restarts,
            },
            other => {
                return Err(invalid(
                    "restart.mode",
                    format!("unknown restart mode {other:?}; use never or on-failure"),
                ))
            }
        },
    };
    let or_default = |s: String, d: &str| if s.is_empty() { d.to_string() } else { s };
    let spec = JobSpec {
        name: spec.name,
        count: spec.count,
        per_sandbox: Resources::new(spec.cpu_millis, spec.memory_mib),
        template: or_default(spec.template, DEFAULT_TEMPLATE),
        command: spec.command,
        env: spec.env,
        priority: spec.priority,
        tenant: or_default(spec.tenant, DEFAULT_TENANT),
        gang: spec.gang,
        strategy,
        constraints,
        restart,
        labels: spec.labels,
        lifetime: crate::lifetime::Lifetime {
            ttl_ms: spec.ttl_ms,
            idle_timeout_ms: spec.idle_timeout_ms,
            lease_ms: spec.lease_ms,
        },
        user: spec.user,
    };
    if !matches!(spec.user.as_str(), "" | "root") {
        return Err(invalid(
            "user",
            format!(
                "unknown user {:?}; use root or leave it empty (the sandbox user)",
                spec.user
            ),
        ));
    }
    validate::job_spec(&spec)?;
    Ok(spec)
}

pub fn job_spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        count: spec.count,
        cpu_millis: spec.per_sandbox.cpu_millis,
        memory_mib: spec.per_sandbox.memory_mib,
        template: spec.template.clone(),
        command: spec.command.clone(),
        env: spec.env.clone(),
        priority: spec.priority,
        tenant: spec.tenant.clone(),
        gang: spec.gang,
        strategy: match spec.strategy {
            Strategy::Binpack => pb::Strategy::Binpack as i32,
            Strategy::Spread => pb::Strategy::Spread as i32,
        },
        constraints: spec
            .constraints
            .iter()
            .map(|c| pb::Constraint {
                key: constraint_key(c).to_string(),
                op: match c.operator {
                    Operator::Equal => "=".into(),
                    Operator::NotEqual => "!=".into(),
                },
                value: c.value.clone(),
            })
            .collect(),
        restart: Some(match spec.restart {
            RestartPolicy::Never => pb::RestartPolicy {
                mode: "never".into(),
                max_restarts: 0,
            },
            RestartPolicy::OnFailure { max_restarts } => pb::RestartPolicy {
                mode: "on-failure".into(),
                max_restarts,
            },
        }),
        name: spec.name.clone(),
        labels: spec.labels.clone(),
        ttl_ms: spec.lifetime.ttl_ms,
        idle_timeout_ms: spec.lifetime.idle_timeout_ms,
        lease_ms: spec.lifetime.lease_ms,
        user: spec.user.clone(),
    }
}

/// The wire's enum for a reason.
pub fn end_reason_to_pb(r: Option<EndReason>) -> pb::EndReason {
    match r {
        None => pb::EndReason::Unspecified,
        Some(EndReason::Exited) => pb::EndReason::Exited,
        Some(EndReason::Signal) => pb::EndReason::Signal,
        Some(EndReason::OomKilled) => pb::EndReason::OomKilled,
        Some(EndReason::TtlExpired) => pb::EndReason::TtlExpired,
        Some(EndReason::IdleTimeout) => pb::EndReason::IdleTimeout,
        Some(EndReason::LeaseLost) => pb::EndReason::LeaseLost,
        Some(EndReason::NodeLost) => pb::EndReason::NodeLost,
        Some(EndReason::Preempted) => pb::EndReason::Preempted,
        Some(EndReason::Stopped) => pb::EndReason::Stopped,
        Some(EndReason::Cancelled) => pb::EndReason::Cancelled,
        Some(EndReason::RuntimeError) => pb::EndReason::RuntimeError,
    }
}

/// The reason's name as the CLI and the JSON API print it (`ttl-expired`; `""` when none).
pub fn end_reason_name(r: i32) -> &'static str {
    match pb::EndReason::try_from(r) {
        Ok(pb::EndReason::Exited) => "exited",
        Ok(pb::EndReason::Signal) => "signal",
        Ok(pb::EndReason::OomKilled) => "oom-killed",
        Ok(pb::EndReason::TtlExpired) => "ttl-expired",
        Ok(pb::EndReason::IdleTimeout) => "idle-timeout",
        Ok(pb::EndReason::LeaseLost) => "lease-lost",
        Ok(pb::EndReason::NodeLost) => "node-lost",
        Ok(pb::EndReason::Preempted) => "preempted",
        Ok(pb::EndReason::Stopped) => "stopped",
        Ok(pb::EndReason::Cancelled) => "cancelled",
        Ok(pb::EndReason::RuntimeError) => "runtime-error",
        Ok(pb::EndReason::Unspecified) | Err(_) => "",
    }
}

fn counts_to_pb(c: &Counts) -> pb::Counts {
    pb::Counts {
        pending: c.pending,
        placed: c.placed,
        running: c.running,
        succeeded: c.succeeded,
        failed: c.failed,
        lost: c.lost,
        preempted: c.preempted,
        cancelled: c.cancelled,
        paused: c.paused,
        oom_killed: c.oom_killed,
        stopped: c.stopped,
        checkpointed: c.checkpointed,
    }
}

/// Kinds of ending listed per job by [`exits_of`].
pub const EXIT_SUMMARIES_MAX: usize = 16;

/// Sandboxes that ended other than succeeded, grouped by state and exit code, most first.
pub fn exits_of(job: &Job) -> Vec<pb::ExitSummary> {
    type Key = (Option<EndReason>, SandboxState, i32);
    let mut by: std::collections::BTreeMap<Key, u32> = Default::default();
    for (_, run) in job.runs.iter() {
        if run.state.is_terminal() && run.state != SandboxState::Succeeded {
            let n = by
                .entry((end_reason(run), run.state, run.exit_code))
                .or_default();
            *n = n.saturating_add(run.count);
        }
    }
    let mut out: Vec<pb::ExitSummary> = by
        .into_iter()
        .map(|((reason, state, exit_code), count)| pb::ExitSummary {
            state: sandbox_state_to_pb(state) as i32,
            exit_code: wire_exit_code(exit_code),
            count,
            start_failed: exit_code == EXIT_NOT_RUN,
            reason: end_reason_to_pb(reason) as i32,
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.count));
    out.truncate(EXIT_SUMMARIES_MAX);
    out
}

/// One sandbox of a job (`None`: no such index).
pub fn sandbox_to_pb(job: &Job, index: u32) -> Option<pb::SandboxInfo> {
    let (_, run) = job.runs.get(index)?;
    let outcome = job.outcomes.get(index);
    let reason = end_reason(run);
    let desired = if run.stop {
        pb::SandboxState::Stopped
    } else if run.checkpoint && !run.restore {
        pb::SandboxState::Checkpointed
    } else if run.paused {
        pb::SandboxState::Paused
    } else {
        pb::SandboxState::Running
    };
    let finished_at_ms = match outcome {
        Some(o) => o.at_ms,
        None if run.state.is_terminal() => job.finished_at_ms,
        None => 0,
    };
    Some(pb::SandboxInfo {
        job_id: job.id,
        index,
        state: sandbox_state_to_pb(run.state) as i32,
        node: run.node.clone().unwrap_or_default(),
        generation: run.generation,
        cpu_millis: run.resources.cpu_millis,
        memory_mib: run.resources.memory_mib,
        desired_state: desired as i32,
        exit_code: wire_exit_code(run.exit_code),
        restarts: run.restarts,
        submitted_at_ms: job.submitted_at_ms,
        finished_at_ms,
        message: match outcome {
            Some(o) => o.message.clone(),
            None => run.note.clone(),
        },
        log_tail: outcome.map(|o| o.log_tail.clone()).unwrap_or_default(),
        log_kept: outcome.is_some(),
        start_failed: run.exit_code == EXIT_NOT_RUN,
        end_reason: end_reason_to_pb(reason) as i32,
        signal: if reason == Some(EndReason::Signal) {
            run.exit_code - 128
        } else {
            0
        },
        infrastructure: reason.is_some_and(EndReason::is_infrastructure),
        expires_at_ms: run.expires_ms,
        last_active_at_ms: run.active_ms,
        image_bytes: run.image_bytes,
    })
}

/// The exit code as the wire carries it: 0 for a command that never ran (`start_failed`).
fn wire_exit_code(exit_code: i32) -> i32 {
    if exit_code == EXIT_NOT_RUN {
        0
    } else {
        exit_code
    }
}

pub fn job_to_pb(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id,
        spec: Some(job_spec_to_pb(&job.spec)),
        idempotency_key: job.idempotency_key.clone(),
        state: job_state_to_pb(job.state) as i32,
        counts: Some(counts_to_pb(&job.counts)),
        pending_reason: job.pending_reason.clone(),
        submitted_at_ms: job.submitted_at_ms,
        submitted_index: job.submitted_index,
        finished_at_ms: job.finished_at_ms,
        exits: exits_of(job),
        lease_expires_at_ms: job.lease_expires_ms,
    }
}

fn resources_from_pb(r: Option<pn::Resources>) -> Resources {
    r.map(|r| Resources::new(r.cpu_millis, r.memory_mib))
        .unwrap_or_default()
}

fn resources_to_pb(r: Resources) -> pn::Resources {
    pn::Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
    }
}

pub fn node_spec_from_pb(req: pn::RegisterNodeRequest) -> Result<NodeSpec, Invalid> {
    let or_default = |s: String, d: &str| if s.is_empty() { d.to_string() } else { s };
    let spec = NodeSpec {
        id: req.node_id,
        address: req.address,
        allocatable: resources_from_pb(req.allocatable),
        labels: req.labels,
        os: or_default(req.os, "linux"),
        arch: or_default(req.arch, std::env::consts::ARCH),
        pool: or_default(req.pool, "default"),
        templates: req.templates,
        max_sandboxes: req.max_sandboxes,
        runtime: req.runtime,
    };
    validate::node_spec(&spec)?;
    Ok(spec)
}

pub fn node_to_pb(node: &Node, usage: NodeUsage, used: Resources) -> pn::NodeInfo {
    pn::NodeInfo {
        node_id: node.spec.id.clone(),
        address: node.spec.address.clone(),
        state: node_state_to_pb(node.state) as i32,
        allocatable: Some(resources_to_pb(node.spec.allocatable)),
        allocated: Some(resources_to_pb(usage.allocated)),
        used: Some(resources_to_pb(used)),
        labels: node.spec.labels.clone(),
        os: node.spec.os.clone(),
        arch: node.spec.arch.clone(),
        sandboxes: usage.sandboxes,
        templates: node.spec.templates.clone(),
        runtime: node.spec.runtime.clone(),
    }
}

/// A node's complete desired set at `revision`, as the watch stream sends it.
pub fn assignments_to_pb(
    state: &crate::state::ClusterState,
    node: &str,
    revision: u64,
) -> pn::Assignments {
    let sandboxes = state
        .assignments_of(node)
        .into_iter()
        .filter_map(|a| {
            let job = state.jobs.get(&a.job)?;
            Some(assignment_to_pb(&a, &job.spec))
        })
        .collect();
    pn::Assignments {
        revision,
        full: true,
        sandboxes,
        removed: Vec::new(),
    }
}

/// One sandbox of a node's desired set, of a job with `spec`.
pub fn assignment_to_pb(a: &crate::state::Assignment, spec: &JobSpec) -> pn::Sandbox {
    pn::Sandbox {
        job_id: a.job,
        index: a.index,
        desired_state: if a.stop {
            pb::SandboxState::Stopped
        } else if a.checkpoint {
            pb::SandboxState::Checkpointed
        } else if a.paused {
            pb::SandboxState::Paused
        } else {
            pb::SandboxState::Running
        } as i32,
        resources: Some(resources_to_pb(a.resources)),
        template: spec.template.clone(),
        command: spec.command.clone(),
        env: spec.env.clone(),
        generation: a.generation,
        revision: a.revision,
        user: spec.user.clone(),
    }
}
