//! The job API as JSON: request and response shapes shared by the HTTP API (`/v1/jobs`) and the
//! CLI's `-o json`, so a script sees the same fields either way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surge_proto::jobs as pb;

use crate::model::{parse_cpu, BadCpu};
use crate::validate;

/// A field of a job submission (JSON body or CLI flag) that does not parse. The messages name
/// the field, the value given and the accepted forms.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Cpu(#[from] BadCpu),
    #[error("cpu {0}: at most three decimals (millicores)")]
    CpuDecimals(f64),
    #[error("cpu {0}: must be more than 0")]
    CpuRange(f64),
    #[error("constraint {0:?}: {syntax}", syntax = validate::CONSTRAINT_SYNTAX)]
    Constraint(String),
    #[error("restart: {0:?} is not a number")]
    RestartCount(String),
    #[error("restart {0:?}: use never or on-failure[:MAX_RESTARTS]")]
    Restart(String),
    #[error("strategy {0:?}: use binpack or spread")]
    Strategy(String),
}

/// CPUs as a number of cores (`0.5`) or a string (`"0.5"`, `"500m"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Cpu {
    Cores(f64),
    Text(String),
}

impl Cpu {
    pub fn millis(&self) -> Result<u64, SpecError> {
        match self {
            Cpu::Text(s) => Ok(parse_cpu(s)?),
            Cpu::Cores(c) if c.is_finite() && *c > 0.0 && *c <= 1_000_000.0 => {
                let millis = (c * 1000.0).round();
                if (millis / 1000.0 - c).abs() > 1e-9 {
                    return Err(SpecError::CpuDecimals(*c));
                }
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "c is in (0, 1e6], so millis is a whole number in [0, 1e9]"
                )]
                let millis = millis as u64;
                Ok(millis)
            }
            Cpu::Cores(c) => Err(SpecError::CpuRange(*c)),
        }
    }
}

fn default_count() -> u32 {
    1
}

fn default_cpu() -> Cpu {
    Cpu::Cores(1.0)
}

fn default_memory() -> u64 {
    1024
}

/// `POST /v1/jobs` body. Unknown fields are refused, so a typo is an error, not a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJson {
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default = "default_cpu")]
    pub cpu: Cpu,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub gang: bool,
    /// `binpack` (default) or `spread`.
    #[serde(default)]
    pub strategy: String,
    /// `KEY=VALUE` or `KEY!=VALUE`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// `never` (default) or `on-failure[:MAX_RESTARTS]`.
    #[serde(default)]
    pub restart: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub idempotency_key: String,
    /// `{"run": "exp7"}`: labels for bulk actions.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Lifetimes in milliseconds (0 or absent: none). See `surge submit --ttl`.
    #[serde(default)]
    pub ttl_ms: u64,
    #[serde(default)]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub lease_ms: u64,
    /// "" (the sandbox user) or "root" (uid 0, no capabilities; needed to checkpoint here).
    #[serde(default)]
    pub user: String,
}

/// `KEY=VALUE` or `KEY!=VALUE` (see [`validate::CONSTRAINT_SYNTAX`]); the parts are checked by
/// the shared validation, which gRPC submissions pass too.
pub fn parse_constraint(s: &str) -> Result<pb::Constraint, SpecError> {
    let (key, op, value) = if let Some((k, v)) = s.split_once("!=") {
        (k, "!=", v)
    } else if let Some((k, v)) = s.split_once('=') {
        (k, "=", v)
    } else {
        return Err(SpecError::Constraint(s.to_string()));
    };
    Ok(pb::Constraint {
        key: key.trim().to_string(),
        op: op.to_string(),
        value: value.trim().to_string(),
    })
}

pub fn parse_restart(s: &str) -> Result<pb::RestartPolicy, SpecError> {
    match s.split_once(':') {
        None if s.is_empty() || s == "never" => Ok(pb::RestartPolicy {
            mode: "never".into(),
            max_restarts: 0,
        }),
        None if s == "on-failure" => Ok(pb::RestartPolicy {
            mode: "on-failure".into(),
            max_restarts: 3,
        }),
        Some(("on-failure", n)) => Ok(pb::RestartPolicy {
            mode: "on-failure".into(),
            max_restarts: n
                .parse()
                .map_err(|_| SpecError::RestartCount(n.to_string()))?,
        }),
        _ => Err(SpecError::Restart(s.to_string())),
    }
}

pub fn parse_strategy(s: &str) -> Result<pb::Strategy, SpecError> {
    match s {
        "" | "binpack" => Ok(pb::Strategy::Binpack),
        "spread" => Ok(pb::Strategy::Spread),
        other => Err(SpecError::Strategy(other.to_string())),
    }
}

impl SubmitJson {
    pub fn into_request(self) -> Result<pb::SubmitJobRequest, SpecError> {
        Ok(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                count: self.count,
                cpu_millis: self.cpu.millis()?,
                memory_mib: self.memory_mib,
                template: self.template,
                command: self.command,
                env: self.env,
                priority: self.priority,
                tenant: self.tenant,
                gang: self.gang,
                strategy: parse_strategy(&self.strategy)? as i32,
                constraints: self
                    .constraints
                    .iter()
                    .map(|c| parse_constraint(c))
                    .collect::<Result<_, _>>()?,
                restart: Some(parse_restart(&self.restart)?),
                name: self.name,
                labels: self.labels,
                ttl_ms: self.ttl_ms,
                idle_timeout_ms: self.idle_timeout_ms,
                lease_ms: self.lease_ms,
                user: self.user,
            }),
            idempotency_key: self.idempotency_key,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CountsJson {
    pub pending: u32,
    pub placed: u32,
    pub running: u32,
    pub paused: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub oom_killed: u32,
    pub lost: u32,
    pub cancelled: u32,
    pub preempted: u32,
    pub stopped: u32,
}

/// Sandboxes that ended in one way other than succeeded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExitJson {
    pub state: String,
    /// `null` when these sandboxes never ran their command (`start_failed`).
    pub exit_code: Option<i32>,
    pub count: u32,
    pub start_failed: bool,
    /// Why they ended: `exited`, `signal`, `ttl-expired`, `node-lost`, ... (see `EndReason`).
    pub reason: String,
}

/// A job as JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobJson {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub tenant: String,
    pub count: u32,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub template: String,
    pub command: Vec<String>,
    pub priority: i32,
    pub gang: bool,
    pub idempotency_key: String,
    pub counts: CountsJson,
    pub pending_reason: String,
    pub submitted_at_ms: u64,
    pub submitted_index: u64,
    pub finished_at_ms: u64,
    /// Non-successful endings grouped by reason, state and exit code, most first.
    pub exits: Vec<ExitJson>,
    pub labels: BTreeMap<String, String>,
    pub ttl_ms: u64,
    pub idle_timeout_ms: u64,
    pub lease_ms: u64,
    /// When the owner's lease runs out (0: no lease).
    pub lease_expires_at_ms: u64,
}

impl From<&pb::Job> for JobJson {
    fn from(j: &pb::Job) -> Self {
        let spec = j.spec.clone().unwrap_or_default();
        let c = j.counts.unwrap_or_default();
        JobJson {
            id: j.id,
            name: spec.name,
            state: j.state().name().to_string(),
            tenant: spec.tenant,
            count: spec.count,
            cpu_millis: spec.cpu_millis,
            memory_mib: spec.memory_mib,
            template: spec.template,
            command: spec.command,
            priority: spec.priority,
            gang: spec.gang,
            idempotency_key: j.idempotency_key.clone(),
            counts: CountsJson {
                pending: c.pending,
                placed: c.placed,
                running: c.running,
                paused: c.paused,
                succeeded: c.succeeded,
                failed: c.failed,
                oom_killed: c.oom_killed,
                lost: c.lost,
                cancelled: c.cancelled,
                preempted: c.preempted,
                stopped: c.stopped,
            },
            pending_reason: j.pending_reason.clone(),
            submitted_at_ms: j.submitted_at_ms,
            submitted_index: j.submitted_index,
            finished_at_ms: j.finished_at_ms,
            exits: j
                .exits
                .iter()
                .map(|e| ExitJson {
                    state: e.state().name().to_string(),
                    exit_code: (!e.start_failed).then_some(e.exit_code),
                    count: e.count,
                    start_failed: e.start_failed,
                    reason: crate::convert::end_reason_name(e.reason).to_string(),
                })
                .collect(),
            labels: spec.labels,
            ttl_ms: spec.ttl_ms,
            idle_timeout_ms: spec.idle_timeout_ms,
            lease_ms: spec.lease_ms,
            lease_expires_at_ms: j.lease_expires_at_ms,
        }
    }
}

/// One sandbox as JSON (`surge sandbox ID -o json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SandboxJson {
    /// `JOB.INDEX`
    pub id: String,
    pub job_id: u64,
    pub index: u32,
    pub state: String,
    pub desired_state: String,
    pub node: String,
    pub generation: u64,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    /// `null` when the command never ran (`start_failed`; `message` says why).
    pub exit_code: Option<i32>,
    pub start_failed: bool,
    pub restarts: u32,
    pub submitted_at_ms: u64,
    pub finished_at_ms: u64,
    pub message: String,
    pub log_tail: String,
    pub log_kept: bool,
    /// Why it ended (`""` while it has not): see `EndReason` in `jobs.proto`.
    pub end_reason: String,
    /// With `end_reason` `signal`: the signal number.
    pub signal: Option<i32>,
    /// The end was the infrastructure's doing (node-lost, runtime-error, preempted).
    pub infrastructure: bool,
    /// TTL deadline (0: none) and last exec/file call (0: not tracked), leader's clock.
    pub expires_at_ms: u64,
    pub last_active_at_ms: u64,
    /// With state "checkpointed": its image's size on `node`.
    pub image_bytes: u64,
}

impl From<&pb::SandboxInfo> for SandboxJson {
    fn from(s: &pb::SandboxInfo) -> Self {
        SandboxJson {
            id: format!("{}.{}", s.job_id, s.index),
            job_id: s.job_id,
            index: s.index,
            state: s.state().name().to_string(),
            desired_state: s.desired_state().name().to_string(),
            node: s.node.clone(),
            generation: s.generation,
            cpu_millis: s.cpu_millis,
            memory_mib: s.memory_mib,
            exit_code: (!s.start_failed).then_some(s.exit_code),
            start_failed: s.start_failed,
            restarts: s.restarts,
            submitted_at_ms: s.submitted_at_ms,
            finished_at_ms: s.finished_at_ms,
            message: s.message.clone(),
            log_tail: s.log_tail.clone(),
            log_kept: s.log_kept,
            end_reason: crate::convert::end_reason_name(s.end_reason).to_string(),
            signal: (s.end_reason == pb::EndReason::Signal as i32).then_some(s.signal),
            infrastructure: s.infrastructure,
            expires_at_ms: s.expires_at_ms,
            last_active_at_ms: s.last_active_at_ms,
            image_bytes: s.image_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_name_the_field_and_the_accepted_forms() {
        let err = |r: Result<u64, SpecError>| r.expect_err("refused").to_string();
        assert_eq!(
            err(Cpu::Cores(0.0001).millis()),
            "cpu 0.0001: at most three decimals (millicores)"
        );
        assert_eq!(
            err(Cpu::Cores(-1.0).millis()),
            "cpu -1: must be more than 0"
        );
        assert_eq!(
            err(Cpu::Text("abc".into()).millis()),
            "bad CPU amount \"abc\": use cores (2, 0.5) or millicores (500m)"
        );
        assert_eq!(
            parse_constraint("os").expect_err("refused").to_string(),
            format!("constraint \"os\": {}", validate::CONSTRAINT_SYNTAX)
        );
        assert_eq!(
            parse_restart("on-failure:x")
                .expect_err("refused")
                .to_string(),
            "restart: \"x\" is not a number"
        );
        assert_eq!(
            parse_restart("always").expect_err("refused").to_string(),
            "restart \"always\": use never or on-failure[:MAX_RESTARTS]"
        );
        assert_eq!(
            parse_strategy("random").expect_err("refused").to_string(),
            "strategy \"random\": use binpack or spread"
        );
    }

    #[test]
    fn submit_json_parses_and_refuses_unknown_fields() {
        let ok: SubmitJson = serde_json::from_str(
            r#"{"count": 3, "cpu": "500m", "memory_mib": 256, "constraints": ["os=linux", "gpu!=none"],
                "restart": "on-failure:2", "strategy": "spread", "command": ["echo", "hi"]}"#,
        )
        .expect("parses");
        let req = ok.into_request().expect("valid");
        let spec = req.spec.expect("spec");
        assert_eq!(spec.cpu_millis, 500);
        assert_eq!(spec.constraints[1].op, "!=");
        assert_eq!(spec.restart.map(|r| r.max_restarts), Some(2));
        assert_eq!(spec.strategy, pb::Strategy::Spread as i32);
        let half: SubmitJson = serde_json::from_str(r#"{"cpu": 0.5}"#).expect("parses");
        assert_eq!(half.cpu.millis(), Ok(500));
        assert!(serde_json::from_str::<SubmitJson>(r#"{"cpus": 2}"#).is_err());
        let bad: SubmitJson = serde_json::from_str(r#"{"cpu": -1}"#).expect("parses");
        assert!(bad.into_request().is_err());
        let bad: SubmitJson = serde_json::from_str(r#"{"strategy": "random"}"#).expect("parses");
        assert!(bad.into_request().is_err());
    }
}
