//! Client commands: submit, jobs, job, cancel, nodes, sandboxes (status and members are in
//! `cluster`). Flags and printing; the calls, their retries and the conversions are
//! `surge_client`'s.

use std::io::{IsTerminal, Write};

use serde_json::{json, Value};
use surge_client::{Client, Sandboxes, SubmitSpec};
use surge_harness::output::{json as print_json, table, Output};
use surge_proto::jobs as pb;
use surge_scheduler::api_json;
use surge_scheduler::model::format_cpu;

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Number of identical sandboxes.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// CPUs per sandbox: cores (1, 0.5) or millicores (500m).
    #[arg(long, default_value = "1")]
    cpu: String,
    /// Memory per sandbox in MiB.
    #[arg(long = "mem", default_value_t = 1024)]
    memory_mib: u64,
    /// All sandboxes placed together or none.
    #[arg(long)]
    gang: bool,
    /// Higher wins; may preempt lower priority work.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Tenant (default: the token's tenant, or `default` on an open cluster).
    #[arg(long, default_value = "")]
    tenant: String,
    /// KEY=VALUE or KEY!=VALUE over os, arch, pool and node labels (repeatable).
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// The same key twice (within a tenant) returns the first job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Root filesystem the sandboxes boot from.
    #[arg(long, default_value = "busybox")]
    template: String,
    #[arg(long, default_value = "")]
    name: String,
    /// Spread sandboxes across nodes instead of bin-packing them.
    #[arg(long)]
    spread: bool,
    /// KEY=VALUE environment variables (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// never, or on-failure[:MAX_RESTARTS]
    #[arg(long, default_value = "never")]
    restart: String,
    /// The command each sandbox runs. None: long-lived sandboxes (the template's init alone)
    /// that stay up until stopped, cancelled or expired (--ttl, --idle-timeout, --lease).
    #[arg(last = true)]
    command: Vec<String>,
    /// KEY=VALUE label for bulk actions (`surge cancel --label`, `surge jobs --label`);
    /// repeatable, at most 16.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Longest life of each sandbox from when it starts: 90s, 10m, 1h, up to 30d.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Stop a sandbox after this long without an exec or file call.
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Owner lease: stop the sandboxes unless `surge keepalive JOB` renews within this long.
    #[arg(long)]
    pub lease: Option<String>,
    /// `root`: run as uid 0 in the sandbox, still with no capabilities and no_new_privs.
    /// Checkpointing (`surge pause --checkpoint`) needs it on hosts where root lacks
    /// CAP_SYS_RESOURCE (CRIU cannot dump a process of another uid there).
    #[arg(long, default_value = "")]
    pub user: String,
    /// Return once every sandbox runs (or the job ended, or --wait-timeout passed).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s")]
    pub wait_timeout: String,
}

impl From<SubmitArgs> for SubmitSpec {
    fn from(a: SubmitArgs) -> SubmitSpec {
        SubmitSpec {
            count: a.count,
            cpu: a.cpu,
            memory_mib: a.memory_mib,
            gang: a.gang,
            priority: a.priority,
            tenant: a.tenant,
            constraints: a.constraints,
            idempotency_key: a.idempotency_key.unwrap_or_default(),
            template: a.template,
            name: a.name,
            spread: a.spread,
            env: a.env,
            restart: a.restart,
            command: a.command,
            labels: a.labels,
            // Durations are parsed (and refused) in `submit`, before this conversion.
            ttl_ms: 0,
            idle_timeout_ms: 0,
            lease_ms: 0,
            user: a.user,
        }
    }
}

pub async fn submit(c: &Client, output: Output, args: SubmitArgs) -> anyhow::Result<()> {
    let lives = super::life::lifetimes(&args)?;
    let (wait, wait_timeout) = (args.wait, args.wait_timeout.clone());
    let mut spec = SubmitSpec::from(args);
    (spec.ttl_ms, spec.idle_timeout_ms, spec.lease_ms) = lives;
    let req = spec.to_request()?;
    let r = c.submit(req).await?;
    if wait {
        return super::life::wait_after_submit(c, output, &r, &wait_timeout).await;
    }
    match output {
        Output::Json => {
            print_json(&json!({"job_id": r.job_id, "created": r.created, "index": r.index}))
        }
        Output::Table if r.created => println!("job {} submitted", r.job_id),
        Output::Table => println!(
            "job {} (already submitted with this idempotency key)",
            r.job_id
        ),
    }
    Ok(())
}

pub fn job_json(j: &pb::Job) -> Value {
    serde_json::to_value(api_json::JobJson::from(j)).unwrap_or(Value::Null)
}

fn job_row(j: &pb::Job) -> Vec<String> {
    let spec = j.spec.clone().unwrap_or_default();
    let c = j.counts.unwrap_or_default();
    vec![
        j.id.to_string(),
        spec.tenant,
        j.state().name().to_string(),
        spec.count.to_string(),
        format_cpu(spec.cpu_millis),
        spec.memory_mib.to_string(),
        format!("{}/{}/{}/{}", c.pending, c.running, c.succeeded, c.failed()),
        j.pending_reason.clone(),
    ]
}

const JOB_HEADER: [&str; 8] = [
    "ID",
    "TENANT",
    "STATE",
    "COUNT",
    "CPU",
    "MEM_MIB",
    "PEND/RUN/OK/FAIL",
    "REASON",
];

pub async fn jobs(
    c: &Client,
    output: Output,
    tenant: Option<String>,
    state: Option<String>,
    limit: u32,
    labels: &[String],
) -> anyhow::Result<()> {
    let state = match state.as_deref() {
        None | Some("") => pb::JobState::Unspecified,
        Some(s) => pb::JobState::from_name(s).ok_or_else(|| {
            anyhow::anyhow!(
                "--state: unknown {s:?}; use {}",
                pb::JobState::names().join(", ")
            )
        })?,
    };
    let r = c
        .list_jobs(pb::ListJobsRequest {
            tenant: tenant.unwrap_or_default(),
            state: state as i32,
            limit,
            before_id: 0,
            labels: surge_client::convert::parse_labels(labels)?,
        })
        .await?;
    match output {
        Output::Json => print_json(&Value::Array(r.jobs.iter().map(job_json).collect())),
        Output::Table => table(&JOB_HEADER, &r.jobs.iter().map(job_row).collect::<Vec<_>>()),
    }
    Ok(())
}

fn progress_line(j: &pb::Job) -> String {
    let c = j.counts.unwrap_or_default();
    let total = j.spec.as_ref().map(|s| s.count).unwrap_or(0).max(1);
    let done = c.finished();
    let width = 30usize;
    let filled = usize::try_from(u64::from(done.min(total)) * 30 / u64::from(total)).unwrap_or(0);
    format!(
        "job {} [{}{}] {}  pending {} placed {} running {} done {}/{}",
        j.id,
        "#".repeat(filled),
        "-".repeat(width - filled.min(width)),
        j.state().name(),
        c.pending,
        c.placed,
        c.running,
        done,
        total
    )
}

pub async fn job(c: &Client, output: Output, id: u64, watch: bool) -> anyhow::Result<()> {
    if !watch {
        let j = c.get_job(id).await?;
        match output {
            Output::Json => print_json(&job_json(&j)),
            Output::Table => {
                table(&JOB_HEADER, &[job_row(&j)]);
                if let Some(line) = exits_line(&j) {
                    println!("{line}");
                }
            }
        }
        return Ok(());
    }
    let (addr, mut stream) = c.watch_job(id).await?;
    let tty = std::io::stdout().is_terminal() && output == Output::Table;
    while let Some(j) = c.next(&addr, &mut stream).await? {
        match output {
            Output::Json => println!("{}", job_json(&j)),
            Output::Table if tty => {
                print!("\r\x1b[2K{}", progress_line(&j));
                let _ = std::io::stdout().flush();
            }
            Output::Table => println!("{}", progress_line(&j)),
        }
    }
    if tty {
        println!();
    }
    Ok(())
}

/// `ended: 3 failed (exit 1), 1 failed (signal 9), 4 stopped (ttl-expired)`, or nothing when
/// all went well.
pub fn exits_line(j: &pb::Job) -> Option<String> {
    if j.exits.is_empty() {
        return None;
    }
    let parts: Vec<String> = j
        .exits
        .iter()
        .map(|e| {
            let reason = surge_scheduler::convert::end_reason_name(e.reason);
            match (e.start_failed, reason) {
                (true, _) => format!("{} {} (never started)", e.count, e.state().name()),
                (false, "signal") => {
                    format!(
                        "{} {} (signal {})",
                        e.count,
                        e.state().name(),
                        e.exit_code - 128
                    )
                }
                (false, "" | "exited") => {
                    format!("{} {} (exit {})", e.count, e.state().name(), e.exit_code)
                }
                // ttl-expired, idle-timeout, lease-lost, node-lost, cancelled, ...
                (false, why) => format!("{} {} ({why})", e.count, e.state().name()),
            }
        })
        .collect();
    Some(format!(
        "ended: {}  (see `surge sandbox {}.INDEX` and `surge logs {}.INDEX`)",
        parts.join(", "),
        j.id,
        j.id
    ))
}

async fn get_sandbox(c: &Client, id: &str) -> anyhow::Result<pb::SandboxInfo> {
    let (job_id, index) = Sandboxes::parse_one(id)?;
    Ok(c.get_sandbox(job_id, index).await?)
}

pub fn time_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    let at = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(at) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{ms} ms after the epoch"),
    }
}

/// `surge sandbox JOB.INDEX`: state, node, resources, exit code, times, output tail.
pub async fn sandbox(c: &Client, output: Output, id: &str) -> anyhow::Result<()> {
    let s = get_sandbox(c, id).await?;
    match output {
        Output::Json => print_json(
            &serde_json::to_value(api_json::SandboxJson::from(&s)).unwrap_or(Value::Null),
        ),
        Output::Table => {
            let node = if s.node.is_empty() { "-" } else { &s.node };
            println!("sandbox    {}.{}", s.job_id, s.index);
            println!(
                "state      {} (desired {})",
                s.state().name(),
                s.desired_state().name()
            );
            println!("node       {node}");
            println!(
                "resources  {} CPU, {} MiB",
                format_cpu(s.cpu_millis),
                s.memory_mib
            );
            println!("generation {}  restarts {}", s.generation, s.restarts);
            if s.state() == pb::SandboxState::Checkpointed {
                println!(
                    "checkpoint {:.1} MiB image on node {node} (pinned there; `surge resume` restores it)",
                    f64::from(u32::try_from(s.image_bytes / 1024).unwrap_or(u32::MAX)) / 1024.0
                );
            }
            if !s.message.is_empty()
                && s.state() != pb::SandboxState::Unspecified
                && s.finished_at_ms == 0
            {
                println!("note       {}", s.message);
            }
            if matches!(
                s.state().name(),
                "succeeded" | "failed" | "oom-killed" | "stopped" | "lost" | "cancelled"
            ) {
                if s.start_failed {
                    println!("exit code  none: the command never started");
                } else {
                    println!("exit code  {}", s.exit_code);
                }
            }
            super::life::print_end(&s);
            println!("submitted  {}", time_ms(s.submitted_at_ms));
            println!("finished   {}", time_ms(s.finished_at_ms));
            if !s.message.is_empty() {
                println!("message    {}", s.message);
            }
            if s.log_kept {
                println!("--- last {} bytes of output ---", s.log_tail.len());
                print!("{}", s.log_tail);
                if !s.log_tail.is_empty() && !s.log_tail.ends_with('\n') {
                    println!();
                }
            } else {
                println!("output     {}", no_log_reason(&s));
            }
        }
    }
    Ok(())
}

fn no_log_reason(s: &pb::SandboxInfo) -> String {
    match s.state().name() {
        "pending" | "placed" | "running" | "paused" => {
            "not reported yet (a node reports the tail of stdout/stderr when the sandbox ends)"
                .to_string()
        }
        _ => format!(
            "not kept (a job keeps the output of at most {} sandboxes, failures first)",
            surge_scheduler::outcomes::OUTCOMES_PER_JOB_MAX
        ),
    }
}

/// `surge logs JOB.INDEX`: the tail of stdout/stderr the node reported when the sandbox ended.
pub async fn logs(c: &Client, output: Output, id: &str) -> anyhow::Result<()> {
    let s = get_sandbox(c, id).await?;
    match output {
        Output::Json => print_json(&json!({
            "id": format!("{}.{}", s.job_id, s.index),
            "state": s.state().name(),
            "exit_code": (!s.start_failed).then_some(s.exit_code),
            "start_failed": s.start_failed,
            "log_tail": s.log_tail,
            "log_kept": s.log_kept,
        })),
        Output::Table => {
            if !s.log_kept {
                eprintln!(
                    "sandbox {}.{}: output {}",
                    s.job_id,
                    s.index,
                    no_log_reason(&s)
                );
            }
            print!("{}", s.log_tail);
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

pub async fn cancel(c: &Client, output: Output, id: u64) -> anyhow::Result<()> {
    let j = c.cancel_job(id).await?;
    match output {
        Output::Json => print_json(&job_json(&j)),
        Output::Table => println!("job {} {}", j.id, j.state().name()),
    }
    Ok(())
}

pub async fn nodes(c: &Client, output: Output) -> anyhow::Result<()> {
    let nodes = c.list_nodes().await?;
    let res = |r: Option<surge_proto::node::Resources>| r.unwrap_or_default();
    match output {
        Output::Json => print_json(&Value::Array(
            nodes
                .iter()
                .map(|n| {
                    let (a, b, u) = (res(n.allocatable), res(n.allocated), res(n.used));
                    json!({
                        "node_id": n.node_id, "address": n.address, "state": n.state().name(),
                        "os": n.os, "arch": n.arch, "labels": n.labels, "sandboxes": n.sandboxes,
                        "templates": n.templates, "runtime": n.runtime,
                        "checkpoint": n.labels.get("checkpoint").is_some_and(|v| v == "true"),
                        "allocatable": {"cpu_millis": a.cpu_millis, "memory_mib": a.memory_mib},
                        "allocated": {"cpu_millis": b.cpu_millis, "memory_mib": b.memory_mib},
                        "used": {"cpu_millis": u.cpu_millis, "memory_mib": u.memory_mib},
                    })
                })
                .collect(),
        )),
        Output::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let (a, b, u) = (res(n.allocatable), res(n.allocated), res(n.used));
                    vec![
                        n.node_id.clone(),
                        n.state().name().to_string(),
                        format!(
                            "{}/{}/{}",
                            format_cpu(a.cpu_millis),
                            format_cpu(b.cpu_millis),
                            format_cpu(u.cpu_millis)
                        ),
                        format!("{}/{}/{}", a.memory_mib, b.memory_mib, u.memory_mib),
                        n.sandboxes.to_string(),
                        format!("{}/{}", n.os, n.arch),
                        n.runtime.clone(),
                        n.labels
                            .get("checkpoint")
                            .map_or("no", |v| if v == "true" { "yes" } else { "no" })
                            .to_owned(),
                    ]
                })
                .collect();
            table(
                &[
                    "NODE",
                    "STATE",
                    "CPU ALLOCATABLE/ALLOCATED/USED",
                    "MEM_MIB (SAME)",
                    "SANDBOXES",
                    "OS/ARCH",
                    "RUNTIME",
                    "CHECKPOINT",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// pause, resume or resize sandboxes.
pub async fn update_sandboxes(
    c: &Client,
    output: Output,
    sandbox: &str,
    action: &str,
    cpu: Option<String>,
    memory_mib: Option<u64>,
) -> anyhow::Result<()> {
    let (job_id, first_index, count) = Sandboxes::parse(sandbox)?.range();
    let cpu_millis = surge_client::convert::cpu_millis(cpu.as_deref())?;
    let action = match action {
        "" => pb::SandboxAction::None,
        a => pb::SandboxAction::from_name(a)
            .ok_or_else(|| anyhow::anyhow!("unknown sandbox action {a:?}"))?,
    };
    let j = c
        .update_sandboxes(pb::UpdateSandboxesRequest {
            job_id,
            first_index,
            count,
            action: action as i32,
            cpu_millis,
            memory_mib: memory_mib.unwrap_or(0),
        })
        .await?;
    match output {
        Output::Json => print_json(&job_json(&j)),
        Output::Table => table(&JOB_HEADER, &[job_row(&j)]),
    }
    Ok(())
}

/// `surge fork JOB.INDEX --count N`.
pub async fn fork(c: &Client, output: Output, sandbox: &str, count: u32) -> anyhow::Result<()> {
    let (job_id, index) = Sandboxes::parse_one(sandbox)?;
    let r = c
        .fork(pb::ForkSandboxRequest {
            job_id,
            index,
            count,
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await?;
    match output {
        Output::Json => print_json(
            &json!({"job_id": r.job_id, "created": r.created, "index": r.index, "fork_of": sandbox}),
        ),
        Output::Table => println!("job {}: {count} forks of {job_id}.{index}", r.job_id),
    }
    Ok(())
}

pub async fn drain(c: &Client, output: Output, node: String) -> anyhow::Result<()> {
    let n = c.drain_node(node).await?;
    match output {
        Output::Json => print_json(&json!({"node_id": n.node_id, "state": n.state().name()})),
        Output::Table => println!("node {} {}", n.node_id, n.state().name()),
    }
    Ok(())
}

pub async fn quota(
    c: &Client,
    tenant: String,
    cpu: Option<String>,
    memory_mib: Option<u64>,
) -> anyhow::Result<()> {
    let cpu_millis = surge_client::convert::cpu_millis(cpu.as_deref())?;
    c.set_quota(pb::SetQuotaRequest {
        tenant: tenant.clone(),
        cpu_millis,
        memory_mib: memory_mib.unwrap_or(0),
    })
    .await?;
    if cpu_millis == 0 && memory_mib.unwrap_or(0) == 0 {
        println!("tenant {tenant}: no quota");
    } else {
        println!("tenant {tenant}: quota set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates_to_the_millisecond() {
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(1), "1970-01-01 00:00:00.001 UTC");
        assert_eq!(time_ms(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
        assert_eq!(time_ms(1_796_169_600_000), "2026-12-02 00:00:00.000 UTC");
    }

    #[test]
    fn watch_counts_every_terminal_state_as_done() {
        // Stopped and oom-killed sandboxes are done: the old count (succeeded + failed + lost
        // + cancelled) left such a job short of N/N forever.
        let j = pb::Job {
            id: 9,
            spec: Some(pb::JobSpec {
                count: 4,
                ..Default::default()
            }),
            counts: Some(pb::Counts {
                succeeded: 1,
                stopped: 2,
                oom_killed: 1,
                preempted: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let line = progress_line(&j);
        assert!(line.contains("done 4/4"), "{line}");
        assert!(line.contains(&"#".repeat(30)), "{line}");
    }
}
