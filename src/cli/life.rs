//! Lifetime commands: `surge wait`, `surge keepalive`, `surge cancel --label`, and what
//! `surge submit` and `surge sandbox` add for them (lifetime flags, `--wait`, the end reason).

use serde_json::{json, Value};
use surge_client::convert::{parse_duration_ms, parse_labels};
use surge_client::{Client, Sandboxes};
use surge_harness::output::{json as print_json, Output};
use surge_proto::jobs as pb;
use surge_scheduler::api_json;
use surge_scheduler::convert::end_reason_name;

use super::client::{job_json, SubmitArgs};

/// `--ttl`, `--idle-timeout`, `--lease` as milliseconds (0: not given).
pub fn lifetimes(a: &SubmitArgs) -> anyhow::Result<(u64, u64, u64)> {
    let ms = |flag: &str, v: &Option<String>| match v {
        Some(v) => parse_duration_ms(flag, v),
        None => Ok(0),
    };
    Ok((
        ms("ttl", &a.ttl)?,
        ms("idle-timeout", &a.idle_timeout)?,
        ms("lease", &a.lease)?,
    ))
}

/// The end reason lines of `surge sandbox`.
pub fn print_end(s: &pb::SandboxInfo) {
    let reason = end_reason_name(s.end_reason);
    if !reason.is_empty() {
        let kind = if s.infrastructure {
            "infrastructure"
        } else {
            "not infrastructure"
        };
        match s.end_reason {
            r if r == pb::EndReason::Signal as i32 => {
                println!("ended      {reason} {} ({kind})", s.signal)
            }
            _ => println!("ended      {reason} ({kind})"),
        }
    }
    if s.expires_at_ms != 0 {
        println!("expires    {}", super::client::time_ms(s.expires_at_ms));
    }
    if s.last_active_at_ms != 0 {
        println!("active     {}", super::client::time_ms(s.last_active_at_ms));
    }
}

fn wait_json(r: &pb::WaitJobReply) -> Value {
    json!({
        "outcome": outcome_name(r.outcome),
        "job": r.job.as_ref().map(job_json),
        "sandbox": r.sandbox.as_ref().map(|s| serde_json::to_value(api_json::SandboxJson::from(s)).unwrap_or(Value::Null)),
    })
}

fn outcome_name(o: i32) -> &'static str {
    match pb::WaitOutcome::try_from(o) {
        Ok(pb::WaitOutcome::Met) => "met",
        Ok(pb::WaitOutcome::Ended) => "ended",
        Ok(pb::WaitOutcome::TimedOut) | Err(_) => "timed-out",
    }
}

/// Print a wait's outcome; an outcome other than "met" is an error exit (1 ended, 2 timeout).
fn finish_wait(output: Output, what: &str, r: &pb::WaitJobReply) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&wait_json(r)),
        Output::Table => {
            let state = r.job.as_ref().map_or("", |j| j.state().name());
            println!("{what}: {} (job {state})", outcome_name(r.outcome));
        }
    }
    match pb::WaitOutcome::try_from(r.outcome) {
        Ok(pb::WaitOutcome::Met) => Ok(()),
        Ok(pb::WaitOutcome::Ended) => std::process::exit(1),
        _ => std::process::exit(2),
    }
}

pub async fn wait(
    c: &Client,
    output: Output,
    id: &str,
    timeout: &str,
    ended: bool,
) -> anyhow::Result<()> {
    let timeout_ms = parse_duration_ms("timeout", timeout)?;
    let (job_id, index) = match Sandboxes::parse(id)? {
        Sandboxes::Job(j) => (j, None),
        Sandboxes::One { job, index } => (job, Some(index)),
    };
    let until = if ended {
        pb::WaitFor::Ended
    } else {
        pb::WaitFor::Running
    };
    let r = c
        .wait_job(pb::WaitJobRequest {
            job_id,
            index,
            timeout_ms,
            until: until as i32,
        })
        .await?;
    finish_wait(output, id, &r)
}

/// `surge submit --wait`: the submission's reply, then wait until every sandbox runs.
pub async fn wait_after_submit(
    c: &Client,
    output: Output,
    r: &pb::SubmitJobReply,
    timeout: &str,
) -> anyhow::Result<()> {
    let timeout_ms = parse_duration_ms("wait-timeout", timeout)?;
    if output == Output::Table {
        println!(
            "job {} submitted; waiting for its sandboxes to run",
            r.job_id
        );
    }
    let w = c
        .wait_job(pb::WaitJobRequest {
            job_id: r.job_id,
            index: None,
            timeout_ms,
            until: pb::WaitFor::Running as i32,
        })
        .await?;
    finish_wait(output, &r.job_id.to_string(), &w)
}

pub async fn keepalive(
    c: &Client,
    output: Output,
    id: &str,
    ttl: Option<String>,
) -> anyhow::Result<()> {
    let ttl_ms = match ttl {
        Some(t) => parse_duration_ms("ttl", &t)?,
        None => 0,
    };
    let (job_id, first_index, count) = match Sandboxes::parse(id)? {
        Sandboxes::Job(j) => (j, 0, 0),
        Sandboxes::One { job, index } => (job, index, 1),
    };
    let j = c
        .keepalive(pb::KeepaliveRequest {
            job_id,
            first_index,
            count,
            ttl_ms,
        })
        .await?;
    match output {
        Output::Json => print_json(&job_json(&j)),
        Output::Table if j.lease_expires_at_ms != 0 => println!(
            "job {} {}; lease until {}",
            j.id,
            j.state().name(),
            super::client::time_ms(j.lease_expires_at_ms)
        ),
        Output::Table => println!("job {} {}", j.id, j.state().name()),
    }
    Ok(())
}

pub async fn cancel_by_label(c: &Client, output: Output, labels: &[String]) -> anyhow::Result<()> {
    let labels = parse_labels(labels)?;
    let r = c
        .cancel_jobs(pb::CancelJobsRequest {
            labels,
            tenant: String::new(),
        })
        .await?;
    match output {
        Output::Json => print_json(&json!({
            "cancelled": r.cancelled,
            "job_ids": r.job_ids,
            "index": r.index,
        })),
        Output::Table => println!("cancelled {} jobs", r.cancelled),
    }
    Ok(())
}
