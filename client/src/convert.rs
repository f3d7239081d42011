//! What a person types, as the wire's requests: CPUs (`0.5`, `500m`), constraints
//! (`KEY=VALUE`, `KEY!=VALUE`), `KEY=VALUE` environment entries, restart policies, and sandbox
//! names (`JOB` or `JOB.INDEX`). The syntax is the HTTP API's (`surge_scheduler::api_json`),
//! so a job reads the same from the CLI, a program and `curl`.

use std::collections::BTreeMap;

use surge_proto::jobs as pb;
use surge_scheduler::api_json;
use surge_scheduler::model::parse_cpu;

use crate::ClientError;

/// A job as a person writes it; [`SubmitSpec::to_request`] checks and converts it.
#[derive(Clone, Debug)]
pub struct SubmitSpec {
    pub count: u32,
    /// Cores (`1`, `0.5`) or millicores (`500m`).
    pub cpu: String,
    pub memory_mib: u64,
    pub gang: bool,
    pub priority: i32,
    /// Empty: the token's tenant, or `default` on an open cluster.
    pub tenant: String,
    /// `KEY=VALUE` or `KEY!=VALUE`.
    pub constraints: Vec<String>,
    /// Empty: none (the same key within a tenant returns the first job).
    pub idempotency_key: String,
    pub template: String,
    pub name: String,
    pub spread: bool,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    /// `never` or `on-failure[:MAX_RESTARTS]`.
    pub restart: String,
    /// Empty: a long-lived sandbox (the template's init alone) until stopped or expired.
    pub command: Vec<String>,
    /// `KEY=VALUE` labels for bulk actions.
    pub labels: Vec<String>,
    /// Lifetimes in milliseconds; 0: none.
    pub ttl_ms: u64,
    pub idle_timeout_ms: u64,
    pub lease_ms: u64,
    /// "" (the sandbox user) or "root" (uid 0, no capabilities; checkpointing needs it here).
    pub user: String,
}

impl Default for SubmitSpec {
    fn default() -> Self {
        SubmitSpec {
            count: 1,
            cpu: "1".into(),
            memory_mib: 1024,
            gang: false,
            priority: 0,
            tenant: String::new(),
            constraints: Vec::new(),
            idempotency_key: String::new(),
            template: "busybox".into(),
            name: String::new(),
            spread: false,
            env: Vec::new(),
            restart: "never".into(),
            command: Vec::new(),
            labels: Vec::new(),
            ttl_ms: 0,
            idle_timeout_ms: 0,
            lease_ms: 0,
            user: String::new(),
        }
    }
}

impl SubmitSpec {
    pub fn to_request(&self) -> Result<pb::SubmitJobRequest, ClientError> {
        let bad = |flag: &str, e: String| ClientError::Input(format!("--{flag}: {e}"));
        let cpu_millis = parse_cpu(&self.cpu).map_err(|e| bad("cpu", e.to_string()))?;
        let constraints = self
            .constraints
            .iter()
            .map(|c| {
                api_json::parse_constraint(c).map_err(|e| ClientError::Input(format!("--{e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let env = parse_env(&self.env)?;
        let restart = api_json::parse_restart(&self.restart)
            .map_err(|e| ClientError::Input(format!("--{e}")))?;
        let labels = parse_labels(&self.labels)?;
        Ok(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                count: self.count,
                cpu_millis,
                memory_mib: self.memory_mib,
                template: self.template.clone(),
                command: self.command.clone(),
                env,
                priority: self.priority,
                tenant: self.tenant.clone(),
                gang: self.gang,
                strategy: if self.spread {
                    pb::Strategy::Spread as i32
                } else {
                    pb::Strategy::Binpack as i32
                },
                constraints,
                restart: Some(restart),
                name: self.name.clone(),
                labels,
                ttl_ms: self.ttl_ms,
                idle_timeout_ms: self.idle_timeout_ms,
                lease_ms: self.lease_ms,
                user: self.user.clone(),
            }),
            idempotency_key: self.idempotency_key.clone(),
        })
    }
}

/// `KEY=VALUE` entries as a map; a later entry for the same key wins.
pub fn parse_env(entries: &[String]) -> Result<BTreeMap<String, String>, ClientError> {
    let mut env = BTreeMap::new();
    for e in entries {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| ClientError::Input(format!("--env {e:?}: expected KEY=VALUE")))?;
        if k.is_empty() {
            return Err(ClientError::Input(format!(
                "--env {e:?}: the name before = is empty"
            )));
        }
        env.insert(k.to_string(), v.to_string());
    }
    Ok(env)
}

/// `KEY=VALUE` labels (or selector terms) as a map, each checked.
pub fn parse_labels(entries: &[String]) -> Result<BTreeMap<String, String>, ClientError> {
    let mut out = BTreeMap::new();
    for e in entries {
        let (k, v) = surge_scheduler::lifetime::parse_label(e)
            .map_err(|m| ClientError::Input(format!("--{m}")))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// A duration as a person writes it: `90s`, `10m`, `2h`, `1d`, `500ms` (a bare number is
/// seconds), as milliseconds. 0 and more than 30 days are refused: a flag left out means none.
pub fn parse_duration_ms(flag: &str, s: &str) -> Result<u64, ClientError> {
    let bad = |why: String| ClientError::Input(format!("--{flag} {s:?}: {why}"));
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| bad("write a number and a unit: 500ms, 90s, 10m, 2h, 1d".into()))?;
    let per_ms: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(bad(format!("unknown unit {other:?}; use ms, s, m, h or d"))),
    };
    let ms = n
        .checked_mul(per_ms)
        .ok_or_else(|| bad("too long".into()))?;
    if ms == 0 {
        return Err(bad(
            "must be more than 0 (leave the flag out for none)".into()
        ));
    }
    let max = surge_scheduler::lifetime::LIFETIME_MS_MAX;
    if ms > max {
        return Err(bad(format!("more than the limit of 30 days ({max} ms)")));
    }
    Ok(ms)
}

/// CPUs as millicores, for `--cpu` flags: `None` stays 0 (unchanged).
pub fn cpu_millis(cpu: Option<&str>) -> Result<u64, ClientError> {
    match cpu {
        Some(c) => parse_cpu(c).map_err(|e| ClientError::Input(format!("--cpu: {e}"))),
        None => Ok(0),
    }
}

/// Sandboxes named on a command line: a whole job, or one sandbox of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sandboxes {
    Job(u64),
    One { job: u64, index: u32 },
}

impl Sandboxes {
    /// `JOB` or `JOB.INDEX`.
    pub fn parse(s: &str) -> Result<Sandboxes, ClientError> {
        let bad = || ClientError::Input(format!("{s:?} is not JOB or JOB.INDEX"));
        match s.split_once('.') {
            None => Ok(Sandboxes::Job(s.parse().map_err(|_| bad())?)),
            Some((j, i)) => Ok(Sandboxes::One {
                job: j.parse().map_err(|_| bad())?,
                index: i.parse().map_err(|_| bad())?,
            }),
        }
    }

    /// `JOB.INDEX` only: commands about one sandbox.
    pub fn parse_one(s: &str) -> Result<(u64, u32), ClientError> {
        match Sandboxes::parse(s)? {
            Sandboxes::One { job, index } => Ok((job, index)),
            Sandboxes::Job(_) => Err(ClientError::Input(format!(
                "{s:?} names a whole job; give one sandbox as JOB.INDEX (e.g. {s}.0)"
            ))),
        }
    }

    /// `(job, first index, count)` as `UpdateSandboxesRequest` takes them (count 0: all).
    pub fn range(self) -> (u64, u32, u32) {
        match self {
            Sandboxes::Job(job) => (job, 0, 0),
            Sandboxes::One { job, index } => (job, index, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names() {
        assert_eq!(Sandboxes::parse("7").expect("job"), Sandboxes::Job(7));
        assert_eq!(
            Sandboxes::parse("7.3").expect("one"),
            Sandboxes::One { job: 7, index: 3 }
        );
        assert_eq!(Sandboxes::parse("7.3").expect("one").range(), (7, 3, 1));
        assert_eq!(Sandboxes::Job(7).range(), (7, 0, 0));
        for bad in ["", "x", "7.", ".3", "7.3.1", "-1", "7.-1"] {
            assert!(Sandboxes::parse(bad).is_err(), "{bad:?}");
        }
        let e = Sandboxes::parse_one("7").expect_err("whole job");
        assert!(e.to_string().contains("7.0"), "{e}");
    }

    #[test]
    fn a_spec_becomes_a_request() {
        let spec = SubmitSpec {
            count: 3,
            cpu: "500m".into(),
            constraints: vec!["os=linux".into(), "pool!=gpu".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            restart: "on-failure:2".into(),
            spread: true,
            ..Default::default()
        };
        let r = spec.to_request().expect("valid");
        let j = r.spec.expect("spec");
        assert_eq!((j.count, j.cpu_millis), (3, 500));
        assert_eq!(j.constraints.len(), 2);
        assert_eq!(j.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(j.restart.expect("restart").max_restarts, 2);
        assert_eq!(j.strategy, pb::Strategy::Spread as i32);
    }

    #[test]
    fn bad_specs_say_which_flag() {
        let cases = [
            (
                SubmitSpec {
                    cpu: "lots".into(),
                    ..Default::default()
                },
                "--cpu",
            ),
            (
                SubmitSpec {
                    env: vec!["NOEQUALS".into()],
                    ..Default::default()
                },
                "--env",
            ),
            (
                SubmitSpec {
                    env: vec!["=v".into()],
                    ..Default::default()
                },
                "--env",
            ),
            (
                SubmitSpec {
                    restart: "always".into(),
                    ..Default::default()
                },
                "--restart",
            ),
            (
                SubmitSpec {
                    constraints: vec!["os".into()],
                    ..Default::default()
                },
                "--constraint",
            ),
        ];
        for (spec, flag) in cases {
            let e = spec.to_request().expect_err("refused");
            assert!(e.to_string().starts_with(flag), "{flag}: {e}");
        }
    }
}
