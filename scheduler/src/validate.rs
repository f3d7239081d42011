//! Validation at the API edge: every request is checked and capped here, with an error a user
//! can act on, before anything is proposed. The state machine re-checks the same rules on apply
//! (a command from an older or buggy proposer must not corrupt the state).

use std::collections::BTreeMap;

use crate::model::{
    constraint_key, Constraint, JobSpec, NodeSpec, Operator, Resources, RestartPolicy,
};

pub const SANDBOXES_PER_JOB_MAX: u32 = 1_000_000;
/// 1,024 cores per sandbox.
pub const CPU_MILLIS_MAX: u64 = 1_024_000;
/// 4 TiB per sandbox.
pub const MEMORY_MIB_MAX: u64 = 4 * 1024 * 1024;
pub const COMMAND_ARGS_MAX: usize = 256;
pub const ARG_BYTES_MAX: usize = 4096;
pub const ENV_VARS_MAX: usize = 256;
pub const CONSTRAINTS_MAX: usize = 32;
pub const LABELS_MAX: usize = 64;
pub const TEMPLATES_PER_NODE_MAX: usize = 1024;
pub const NAME_BYTES_MAX: usize = 128;
pub const RESTARTS_MAX: u32 = 1000;
/// A node up to 64k cores and 64 TiB.
pub const NODE_CPU_MILLIS_MAX: u64 = 65_536_000;
pub const NODE_MEMORY_MIB_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Names (tenants, templates, node ids, label keys, idempotency keys): 1..=128 bytes of
/// `[A-Za-z0-9._:/-]`, no `..`.
pub fn name(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > NAME_BYTES_MAX {
        return Err(invalid(
            field,
            format!("is {} bytes; at most {NAME_BYTES_MAX}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
    {
        return Err(invalid(
            field,
            format!("{value:?} contains {c:?}; use letters, digits and . _ - : /"),
        ));
    }
    if value.contains("..") {
        return Err(invalid(field, format!("{value:?} must not contain \"..\"")));
    }
    Ok(())
}

fn resources(field: &str, r: Resources, cpu_max: u64, mem_max: u64) -> Result<(), Invalid> {
    if r.cpu_millis == 0 {
        return Err(invalid(
            format!("{field}.cpu"),
            "must be more than 0 (e.g. 0.5 or 500m)",
        ));
    }
    if r.cpu_millis > cpu_max {
        return Err(invalid(
            format!("{field}.cpu"),
            format!(
                "{} CPUs is more than the limit of {}",
                r.cpu_millis / 1000,
                cpu_max / 1000
            ),
        ));
    }
    if r.memory_mib == 0 {
        return Err(invalid(
            format!("{field}.memory_mib"),
            "must be more than 0",
        ));
    }
    if r.memory_mib > mem_max {
        return Err(invalid(
            format!("{field}.memory_mib"),
            format!(
                "{} MiB is more than the limit of {mem_max} MiB",
                r.memory_mib
            ),
        ));
    }
    Ok(())
}

/// The accepted constraint syntax, quoted in every refusal of one.
pub const CONSTRAINT_SYNTAX: &str = "write KEY=VALUE or KEY!=VALUE, where KEY is os, arch, pool \
     or a node label key and VALUE is letters, digits and . _ - : / (e.g. os=linux, gpu!=none)";

/// A constraint placement can match: a key that is a name, `=` with a non-empty value, or `!=`
/// (satisfied when the attribute differs or, for a label, is absent) with a value that may be
/// empty. The value takes the characters of a name: `os==linux` would otherwise become a job
/// waiting forever for a node whose os is `=linux`.
fn constraints(list: &[Constraint]) -> Result<(), Invalid> {
    if list.len() > CONSTRAINTS_MAX {
        return Err(invalid(
            "constraints",
            format!("{} given; at most {CONSTRAINTS_MAX}", list.len()),
        ));
    }
    for (i, c) in list.iter().enumerate() {
        let field = format!("constraints[{i}]");
        let with_syntax = |e: Invalid| invalid(&field, format!("{} ({CONSTRAINT_SYNTAX})", e));
        name("key", constraint_key(c)).map_err(with_syntax)?;
        match (c.operator, c.value.is_empty()) {
            (Operator::Equal, true) => {
                return Err(with_syntax(invalid("value", "must not be empty")));
            }
            (Operator::NotEqual, true) => {}
            (_, false) => name("value", &c.value).map_err(with_syntax)?,
        }
    }
    Ok(())
}

fn env(vars: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if vars.len() > ENV_VARS_MAX {
        return Err(invalid(
            "env",
            format!("{} variables; at most {ENV_VARS_MAX}", vars.len()),
        ));
    }
    for (k, v) in vars {
        let ok_key = !k.is_empty()
            && k.len() <= NAME_BYTES_MAX
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        if !ok_key {
            return Err(invalid(
                format!("env.{k}"),
                "names are letters, digits and _, not starting with a digit",
            ));
        }
        if v.len() > ARG_BYTES_MAX || v.contains('\0') {
            return Err(invalid(
                format!("env.{k}"),
                format!("value must be at most {ARG_BYTES_MAX} bytes, no NUL"),
            ));
        }
    }
    Ok(())
}

pub fn job_spec(spec: &JobSpec) -> Result<(), Invalid> {
    if spec.count == 0 || spec.count > SANDBOXES_PER_JOB_MAX {
        return Err(invalid(
            "count",
            format!(
                "{} sandboxes; a job has 1 to {SANDBOXES_PER_JOB_MAX}",
                spec.count
            ),
        ));
    }
    resources(
        "per_sandbox",
        spec.per_sandbox,
        CPU_MILLIS_MAX,
        MEMORY_MIB_MAX,
    )?;
    name("tenant", &spec.tenant)?;
    name("template", &spec.template)?;
    if !spec.name.is_empty() {
        name("name", &spec.name)?;
    }
    if spec.command.len() > COMMAND_ARGS_MAX {
        return Err(invalid(
            "command",
            format!(
                "{} arguments; at most {COMMAND_ARGS_MAX}",
                spec.command.len()
            ),
        ));
    }
    if let Some(a) = spec
        .command
        .iter()
        .find(|a| a.len() > ARG_BYTES_MAX || a.contains('\0'))
    {
        return Err(invalid(
            "command",
            format!(
                "argument of {} bytes; each at most {ARG_BYTES_MAX}, no NUL",
                a.len()
            ),
        ));
    }
    env(&spec.env)?;
    constraints(&spec.constraints)?;
    if let RestartPolicy::OnFailure { max_restarts } = spec.restart {
        if max_restarts > RESTARTS_MAX {
            return Err(invalid(
                "restart.max_restarts",
                format!("at most {RESTARTS_MAX}"),
            ));
        }
    }
    labels(&spec.labels)?;
    lifetime(&spec.lifetime)?;
    Ok(())
}

/// A label key or value: 1..=63 bytes of `[A-Za-z0-9._-]` (a key may also hold `/`), starting
/// and ending with a letter or digit (Kubernetes' label syntax, minus its prefixes).
pub fn label(key: &str, value: &str) -> Result<(), Invalid> {
    use crate::lifetime::LABEL_BYTES_MAX;
    for (what, s, extra) in [("key", key, '/'), ("value", value, '-')] {
        let field = if what == "key" {
            "labels".to_string()
        } else {
            format!("labels.{key}")
        };
        if s.is_empty() || s.len() > LABEL_BYTES_MAX {
            return Err(invalid(
                field,
                format!("label {what} {s:?} must be 1 to {LABEL_BYTES_MAX} bytes"),
            ));
        }
        let ok_char =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || c == extra;
        let ends_ok = s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !s.chars().all(ok_char) || !ends_ok {
            return Err(invalid(
                field,
                format!(
                    "label {what} {s:?}: use letters, digits and . _ - (a key also /), \
                     starting and ending with a letter or digit (e.g. run=exp7)"
                ),
            ));
        }
    }
    Ok(())
}

/// Labels of a job, or a selector: at most [`crate::lifetime::JOB_LABELS_MAX`] valid pairs.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    use crate::lifetime::JOB_LABELS_MAX;
    if labels.len() > JOB_LABELS_MAX {
        return Err(invalid(
            "labels",
            format!("{} labels; at most {JOB_LABELS_MAX}", labels.len()),
        ));
    }
    labels.iter().try_for_each(|(k, v)| label(k, v))
}

/// A duration of a lifetime: 0 (none) or 1 s ..= 30 days.
pub fn lifetime_ms(field: &str, ms: u64) -> Result<(), Invalid> {
    use crate::lifetime::{LEASE_MS_MIN, LIFETIME_MS_MAX};
    if ms == 0 {
        return Ok(());
    }
    if ms < LEASE_MS_MIN {
        return Err(invalid(
            field,
            format!("{ms} ms is too short; at least {LEASE_MS_MIN} ms (1s), or omit it for none"),
        ));
    }
    if ms > LIFETIME_MS_MAX {
        return Err(invalid(
            field,
            format!("{ms} ms is more than the limit of {LIFETIME_MS_MAX} ms (30 days)"),
        ));
    }
    Ok(())
}

pub fn lifetime(l: &crate::lifetime::Lifetime) -> Result<(), Invalid> {
    lifetime_ms("ttl_ms", l.ttl_ms)?;
    lifetime_ms("idle_timeout_ms", l.idle_timeout_ms)?;
    lifetime_ms("lease_ms", l.lease_ms)
}

pub fn node_spec(spec: &NodeSpec) -> Result<(), Invalid> {
    name("node_id", &spec.id)?;
    if spec.address.len() > 256 {
        return Err(invalid("address", "too long"));
    }
    resources(
        "allocatable",
        spec.allocatable,
        NODE_CPU_MILLIS_MAX,
        NODE_MEMORY_MIB_MAX,
    )?;
    for (field, v) in [("os", &spec.os), ("arch", &spec.arch), ("pool", &spec.pool)] {
        name(field, v)?;
    }
    if spec.labels.len() > LABELS_MAX {
        return Err(invalid("labels", format!("at most {LABELS_MAX}")));
    }
    for (k, v) in &spec.labels {
        name(&format!("labels.{k}"), k)?;
        if v.len() > NAME_BYTES_MAX {
            return Err(invalid(format!("labels.{k}"), "value too long"));
        }
    }
    if spec.templates.len() > TEMPLATES_PER_NODE_MAX {
        return Err(invalid(
            "templates",
            format!("at most {TEMPLATES_PER_NODE_MAX}"),
        ));
    }
    for t in &spec.templates {
        name("templates", t)?;
    }
    Ok(())
}

/// Idempotency keys: the same rules as names, 1..=128 bytes.
pub fn idempotency_key(key: &str) -> Result<(), Invalid> {
    name("idempotency_key", key)
}
