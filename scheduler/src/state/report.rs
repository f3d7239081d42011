//! Status reports from node daemons: how sandboxes run and end.

use crate::command::{Rejection, Response, StatusRange};
use crate::outcomes::{Outcome, OutcomeReport, OUTCOMES_PER_COMMAND_MAX};
use crate::runs::SandboxState;

use super::apply::{is_restartable, reschedule};
use super::{ClusterState, STATUS_RANGES_MAX};

impl ClusterState {
    /// Keep what nodes said about how sandboxes ended, for the current run of each only (a
    /// stale node's words about a sandbox it no longer holds are dropped like its status).
    /// Runs before the status ranges are applied, while the runs are still active.
    fn record_outcomes(&mut self, index: u64, outcomes: Vec<OutcomeReport>, at_ms: u64) {
        for o in outcomes {
            let Some(job) = self.jobs.get_mut(&o.job) else {
                continue;
            };
            let Some((_, run)) = job.runs.get(o.index) else {
                continue;
            };
            let live_note = run.generation == o.generation
                && run.node.as_deref() == Some(o.node.as_str())
                && matches!(run.state, SandboxState::Running | SandboxState::Paused)
                && matches!(o.state, SandboxState::Running | SandboxState::Paused);
            if live_note {
                // A node's word about a live sandbox: its checkpoint failed and it runs on.
                let first = o.index;
                let node = o.node.clone();
                let mut changed = false;
                job.runs.update(first, 1, |run| {
                    if run.checkpoint {
                        run.checkpoint = false;
                        run.note = o.message.clone();
                        run.revision = index;
                        changed = true;
                    }
                });
                if changed {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.revision = index;
                    }
                }
                continue;
            }
            let current = run.generation == o.generation
                && run.node.as_deref() == Some(o.node.as_str())
                && run.state.is_active()
                && o.state.is_terminal();
            if !current {
                continue;
            }
            let state = if run.stop {
                SandboxState::Stopped
            } else {
                o.state
            };
            job.outcomes.record(
                o.index,
                Outcome {
                    generation: o.generation,
                    node: o.node,
                    state,
                    exit_code: o.exit_code,
                    message: o.message,
                    log_tail: o.log_tail,
                    at_ms,
                },
            );
        }
    }

    pub(super) fn report_status(
        &mut self,
        index: u64,
        reports: Vec<StatusRange>,
        outcomes: Vec<OutcomeReport>,
        at_ms: u64,
    ) -> Response {
        if reports.len() > STATUS_RANGES_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} status ranges in one command; at most {STATUS_RANGES_MAX}",
                reports.len()
            )));
        }
        if outcomes.len() > OUTCOMES_PER_COMMAND_MAX {
            return Response::Rejected(Rejection::Invalid(format!(
                "{} sandbox outcomes in one command; at most {OUTCOMES_PER_COMMAND_MAX}",
                outcomes.len()
            )));
        }
        self.record_outcomes(index, outcomes, at_ms);
        let mut applied = 0u64;
        let mut ignored = 0u64;
        let mut touched = std::collections::BTreeSet::new();
        // Counts and job states are recomputed once per job after all its ranges, not once per
        // range: a refresh walks every run of the job, and one entry carries the reports of
        // hundreds of nodes about the same job (20,000 ranges x 20,000 runs at 1M sandboxes).
        let mut jobs_touched = std::collections::BTreeSet::new();
        for r in reports {
            let Some(job) = self.jobs.get_mut(&r.job) else {
                ignored += u64::from(r.count);
                continue;
            };
            let policy = job.spec.restart;
            let per = job.spec.per_sandbox;
            let fork_of = job.spec.fork_of;
            let life = job.spec.lifetime;
            let mut node_changed = false;
            job.runs.update(r.first, r.count, |run| {
                // Only the current run of a sandbox on the node it was placed on may report;
                // reports about earlier generations or from elsewhere are stale.
                let current = run.generation == r.generation
                    && run.node.as_deref() == Some(r.node.as_str())
                    && run.state.is_active();
                if !current {
                    ignored += u64::from(run.count);
                    return;
                }
                applied += u64::from(run.count);
                if run.stop && r.state.is_terminal() {
                    // However it ended after the user asked it to stop, it was stopped.
                    run.state = SandboxState::Stopped;
                    run.exit_code = r.exit_code;
                    node_changed = true;
                    return;
                }
                match r.state {
                    SandboxState::Running | SandboxState::Paused => {
                        if run.state == SandboxState::Placed {
                            // It runs: its TTL and idle clock start now (the leader's clock).
                            if life.ttl_ms > 0 && run.expires_ms == 0 {
                                run.expires_ms = at_ms.saturating_add(life.ttl_ms);
                            }
                            if life.idle_timeout_ms > 0 {
                                run.active_ms = at_ms;
                            }
                        }
                        run.state = r.state;
                        if let Some(res) = r.resources {
                            if res != run.resources {
                                run.resources = res;
                                run.revision = index;
                                node_changed = true;
                            }
                        }
                    }
                    SandboxState::Succeeded => {
                        run.state = SandboxState::Succeeded;
                        run.exit_code = r.exit_code;
                        node_changed = true;
                    }
                    SandboxState::Failed | SandboxState::OomKilled => {
                        run.exit_code = r.exit_code;
                        if is_restartable(policy, run.restarts) {
                            run.state = SandboxState::Pending;
                            run.node = None;
                            run.generation += 1;
                            run.restarts += 1;
                            run.resources = per;
                            run.paused = false;
                            run.expires_ms = 0;
                            run.active_ms = 0;
                            run.revision = index;
                        } else {
                            run.state = r.state;
                        }
                        node_changed = true;
                    }
                    SandboxState::Lost => {
                        reschedule(run, per, index, fork_of);
                        node_changed = true;
                    }
                    SandboxState::Stopped => {
                        run.state = SandboxState::Stopped;
                        run.exit_code = r.exit_code;
                        node_changed = true;
                    }
                    SandboxState::Checkpointed if run.checkpoint => {
                        // `exit_code` carries the image's size in KiB (`image_kib_code`).
                        run.state = SandboxState::Checkpointed;
                        run.image_bytes = u64::try_from(r.exit_code).unwrap_or(0) * 1024;
                        run.note.clear();
                        node_changed = true;
                    }
                    SandboxState::Pending
                    | SandboxState::Placed
                    | SandboxState::Cancelled
                    | SandboxState::Checkpointed => {
                        applied -= u64::from(run.count);
                        ignored += u64::from(run.count);
                    }
                }
            });
            jobs_touched.insert(r.job);
            if node_changed {
                touched.insert(r.node);
            }
        }
        for job_id in jobs_touched {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.refresh(index, at_ms);
            }
        }
        for n in touched {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.revision = index;
            }
        }
        self.prune_lifetimes();
        Response::StatusApplied { applied, ignored }
    }
}
