//! Applying the lifetime commands: activity (`Touch`), renewals (`Keepalive`), the leader's
//! expiries (`Expire`) and bulk cancellation by label (`CancelJobs`). See `crate::lifetime`.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Rejection, Response, CANCELLED_IDS_MAX};
use crate::lifetime::{self, Expiry, EXPIRIES_PER_COMMAND_MAX, TOUCH_RANGES_MAX};
use crate::model::JobId;
use crate::runs::SandboxState;
use crate::validate;

use super::ClusterState;

impl ClusterState {
    /// Forget jobs that ended from the deadline index (walks the index only).
    pub(super) fn prune_lifetimes(&mut self) {
        let jobs = &self.jobs;
        self.lifetimes
            .retain(|id| jobs.get(id).is_some_and(|j| !j.state.is_terminal()));
    }

    pub(super) fn touch(&mut self, ranges: Vec<(JobId, u32, u32)>, at_ms: u64) -> Response {
        if ranges.len() > TOUCH_RANGES_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} ranges in one touch; at most {TOUCH_RANGES_MAX}",
                ranges.len()
            )));
        }
        let mut applied = 0u64;
        let mut ignored = 0u64;
        for (job_id, first, count) in ranges {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                ignored += u64::from(count);
                continue;
            };
            // Only jobs with an idle timeout keep an idle clock: the others store nothing.
            if job.spec.lifetime.idle_timeout_ms == 0 {
                ignored += u64::from(count);
                continue;
            }
            job.runs.update(first, count, |run| {
                if run.state == SandboxState::Running && !run.stop {
                    run.active_ms = run.active_ms.max(at_ms);
                    applied += u64::from(run.count);
                } else {
                    ignored += u64::from(run.count);
                }
            });
        }
        Response::StatusApplied { applied, ignored }
    }

    pub(super) fn keepalive(
        &mut self,
        job_id: JobId,
        first: u32,
        count: u32,
        ttl_ms: Option<u64>,
        at_ms: u64,
    ) -> Response {
        if let Some(ttl) = ttl_ms {
            if let Err(e) = validate::lifetime_ms("ttl_ms", ttl).and_then(|()| {
                (ttl > 0).then_some(()).ok_or_else(|| validate::Invalid {
                    field: "ttl_ms".into(),
                    reason: "must be more than 0".into(),
                })
            }) {
                return Response::Rejected(Rejection::Invalid(e.to_string()));
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if let Some(refusal) = super::apply::out_of_range(job, first, count) {
            return refusal;
        }
        if job.state.is_terminal() {
            return Response::Done;
        }
        if job.spec.lifetime.lease_ms > 0 {
            let renewed = at_ms.saturating_add(job.spec.lifetime.lease_ms);
            job.lease_expires_ms = job.lease_expires_ms.max(renewed);
        }
        if let Some(ttl) = ttl_ms {
            let expires = at_ms.saturating_add(ttl);
            job.runs.update(first, count, |run| {
                if run.state.is_active() && !run.stop {
                    run.expires_ms = expires;
                }
            });
            self.lifetimes.insert(job_id);
        }
        Response::Done
    }

    pub(super) fn expire(&mut self, index: u64, expiries: Vec<Expiry>, at_ms: u64) -> Response {
        if expiries.len() > EXPIRIES_PER_COMMAND_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} expiries in one command; at most {EXPIRIES_PER_COMMAND_MAX}",
                expiries.len()
            )));
        }
        let mut stopped = 0u64;
        let mut nodes = BTreeSet::new();
        let mut jobs = BTreeSet::new();
        for e in expiries {
            let Some(job) = self.jobs.get_mut(&e.job) else {
                continue;
            };
            // Decided again on the time the entry carries: the same answer on every replica,
            // and a deadline a keepalive moved meanwhile is no longer due.
            let (life, lease) = (job.spec.lifetime, job.lease_expires_ms);
            job.runs.update(e.first, e.count, |run| {
                if lifetime::due_with(life, lease, run, at_ms) != Some(e.cause) {
                    return;
                }
                stopped += u64::from(run.count);
                run.stop_cause = e.cause;
                run.revision = index;
                if let Some(n) = &run.node {
                    nodes.insert(n.clone());
                }
                match run.state {
                    // Nothing runs (yet): ended at once. A placed one may be starting on its
                    // node, which then stops it as no longer assigned.
                    SandboxState::Pending | SandboxState::Placed => {
                        run.state = SandboxState::Stopped;
                    }
                    _ => run.stop = true,
                }
            });
            jobs.insert(e.job);
        }
        for id in jobs {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.refresh(index, at_ms);
            }
        }
        for n in nodes {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        self.prune_lifetimes();
        Response::Expired { stopped }
    }

    pub(super) fn cancel_jobs(
        &mut self,
        index: u64,
        tenant: Option<&str>,
        selector: &BTreeMap<String, String>,
        at_ms: u64,
    ) -> Response {
        if selector.is_empty() {
            return Response::Rejected(Rejection::Invalid(
                "labels: an empty selector would cancel every job; give at least one KEY=VALUE"
                    .into(),
            ));
        }
        if let Err(e) = validate::labels(selector) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        let matching: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .filter(|j| tenant.is_none_or(|t| j.spec.tenant == t))
            .filter(|j| lifetime::matches(&j.spec.labels, selector))
            .map(|j| j.id)
            .collect();
        for &id in &matching {
            self.cancel_job(index, id, at_ms);
        }
        self.prune_lifetimes();
        let count = matching.len() as u64;
        let mut job_ids = matching;
        job_ids.truncate(CANCELLED_IDS_MAX);
        Response::JobsCancelled { count, job_ids }
    }
}

/// What the leader's core proposes for the jobs of the deadline index at `now_ms` (at most
/// [`EXPIRIES_PER_COMMAND_MAX`] ranges; the rest are found again on the next check).
pub fn expiries(s: &ClusterState, now_ms: u64) -> Vec<Expiry> {
    let mut out = Vec::new();
    for id in &s.lifetimes {
        if out.len() >= EXPIRIES_PER_COMMAND_MAX {
            break;
        }
        if let Some(job) = s.jobs.get(id) {
            lifetime::expiries_of(job, now_ms, &mut out);
        }
    }
    out.truncate(EXPIRIES_PER_COMMAND_MAX);
    out
}

/// Whether a job has an idle timeout (touches of other jobs are not worth an entry).
pub fn tracks_idle(s: &ClusterState, job: JobId) -> bool {
    s.jobs
        .get(&job)
        .is_some_and(|j| j.spec.lifetime.idle_timeout_ms > 0 && !j.state.is_terminal())
}
