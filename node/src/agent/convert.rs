//! The node API's messages <-> the reconciler's types. Pure: every function here maps plain data.
//!
//! The scheduler speaks `surge.node` (`Sandbox`, `Assignments`, `SandboxStatus`); the reconciler
//! speaks `reconcile::{DesiredSandbox, ObservedSandbox}`. [`DesiredSet`] folds the watch stream
//! (a full set, then changes) into the complete desired set the reconciler needs.

use std::collections::BTreeMap;

use surge_proto::jobs::SandboxState as Ss;
use surge_proto::node as pn;

use crate::reconcile::{
    DesiredSandbox, DesiredState, ObservedSandbox, ObservedState, Resources, SandboxId,
    SandboxSpec, StopReason,
};
use crate::runtime::ExitReport;

/// Bytes of log output carried in one status report (stdout and stderr together).
pub const LOG_TAIL_REPORT_MAX_BYTES: usize = 4 * 1024;

/// Exit status reported for an OOM kill when the runtime does not know one (128 + SIGKILL).
const OOM_EXIT_CODE: i32 = 137;

/// A sandbox from the scheduler that this node cannot act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("sandbox {id}: desired_state {state} is not one of RUNNING, PAUSED, STOPPED, CHECKPOINTED; the scheduler is newer than this node, upgrade the node")]
    UnknownDesiredState { id: SandboxId, state: i32 },
    #[error("sandbox {id}: no resources given; the scheduler must send cpu_millis and memory_mib")]
    MissingResources { id: SandboxId },
}

pub fn resources_from_pb(r: &pn::Resources) -> Resources {
    Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
    }
}

pub fn resources_to_pb(r: Resources) -> pn::Resources {
    pn::Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
    }
}

pub fn desired_state_from_pb(id: SandboxId, s: i32) -> Result<DesiredState, ConvertError> {
    match Ss::try_from(s) {
        Ok(Ss::Running) => Ok(DesiredState::Running),
        Ok(Ss::Paused) => Ok(DesiredState::Paused),
        Ok(Ss::Stopped) => Ok(DesiredState::Stopped),
        Ok(Ss::Checkpointed) => Ok(DesiredState::Checkpointed),
        _ => Err(ConvertError::UnknownDesiredState { id, state: s }),
    }
}

/// One assigned sandbox. The job's initial request is not on the wire; the current resources
/// stand in for it (the spec's figures are informational, limits come from `resources`).
pub fn desired_from_pb(s: &pn::Sandbox) -> Result<DesiredSandbox, ConvertError> {
    let id = SandboxId::new(s.job_id, s.index);
    let resources = s
        .resources
        .as_ref()
        .map(resources_from_pb)
        .ok_or(ConvertError::MissingResources { id })?;
    // `env` is a map on the wire (no order); sort it so equal sets compare equal.
    let mut env: Vec<(String, String)> =
        s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.sort();
    Ok(DesiredSandbox {
        id,
        generation: s.generation,
        revision: s.revision,
        desired_state: desired_state_from_pb(id, s.desired_state)?,
        spec: SandboxSpec {
            template: s.template.clone(),
            command: s.command.clone(),
            env,
            cpu_millis: resources.cpu_millis,
            memory_mib: resources.memory_mib,
            user: s.user.clone(),
        },
        resources,
    })
}

/// What applying one `Assignments` message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AppliedAssignments {
    /// Sandboxes added or changed (or, for a full set, the size of the new set).
    pub upserted: usize,
    pub removed: usize,
    /// Entries skipped because this node cannot understand them (see [`ConvertError`]).
    pub rejected: Vec<ConvertError>,
}

/// The node's complete desired set, folded from the watch stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DesiredSet {
    sandboxes: BTreeMap<SandboxId, DesiredSandbox>,
    /// Revision of the last message applied.
    revision: u64,
    /// A `full` message was applied since this process started: only then may the reconciler stop
    /// sandboxes that are missing from the set.
    complete: bool,
}

impl DesiredSet {
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.sandboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sandboxes.is_empty()
    }

    pub fn get(&self, id: SandboxId) -> Option<&DesiredSandbox> {
        self.sandboxes.get(&id)
    }

    pub fn to_vec(&self) -> Vec<DesiredSandbox> {
        self.sandboxes.values().cloned().collect()
    }

    /// The sandboxes, borrowed (what a reconcile pass reads).
    pub fn iter(&self) -> impl Iterator<Item = &DesiredSandbox> {
        self.sandboxes.values()
    }

    /// Fold one message in.
    ///
    /// * `full`: the set is replaced. An entry the node cannot understand keeps its previous
    ///   desired state when there is one (so a newer scheduler cannot make this node stop a sandbox
    ///   by accident), and is otherwise left out.
    /// * changes: an upsert older than what is held (lower `(generation, revision)`) is ignored, as
    ///   is a removal of an older generation than the one held: messages of a lagging replica must
    ///   not undo newer ones.
    pub fn apply(&mut self, msg: &pn::Assignments) -> AppliedAssignments {
        let mut out = AppliedAssignments::default();
        if msg.full {
            let previous = std::mem::take(&mut self.sandboxes);
            for s in &msg.sandboxes {
                match desired_from_pb(s) {
                    Ok(d) => {
                        self.sandboxes.insert(d.id, d);
                    }
                    Err(e) => {
                        let id = SandboxId::new(s.job_id, s.index);
                        if let Some(old) = previous.get(&id) {
                            self.sandboxes.insert(id, old.clone());
                        }
                        out.rejected.push(e);
                    }
                }
            }
            out.upserted = self.sandboxes.len();
            self.complete = true;
        } else {
            for s in &msg.sandboxes {
                match desired_from_pb(s) {
                    Ok(d) => {
                        let newer = self.sandboxes.get(&d.id).is_none_or(|old| {
                            (d.generation, d.revision) >= (old.generation, old.revision)
                        });
                        if newer {
                            self.sandboxes.insert(d.id, d);
                            out.upserted += 1;
                        }
                    }
                    Err(e) => out.rejected.push(e),
                }
            }
            for s in &msg.removed {
                let id = SandboxId::new(s.job_id, s.index);
                if self
                    .sandboxes
                    .get(&id)
                    .is_some_and(|old| s.generation >= old.generation)
                {
                    self.sandboxes.remove(&id);
                    out.removed += 1;
                }
            }
        }
        self.revision = self.revision.max(msg.revision);
        out
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// stdout then stderr, at most `max` bytes in all. Each stream gets half, and what one does not
/// use goes to the other, so a sandbox that only writes to one stream keeps the full tail of it.
pub fn log_tail(stdout: &str, stderr: &str, max: usize) -> String {
    let half = max / 2;
    let err_budget = stderr.len().min(max.saturating_sub(stdout.len().min(half)));
    let err = tail_str(stderr, err_budget);
    let out = tail_str(stdout, max - err.len());
    let mut s = String::with_capacity(out.len() + err.len());
    s.push_str(out);
    s.push_str(err);
    s
}

fn stop_message(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Requested => "stopped by the node at the scheduler's request",
        StopReason::Unassigned => "stopped by the node: no longer assigned to it",
        StopReason::Superseded => "stopped by the node: the scheduler asked for a newer generation",
    }
}

/// The status of a live sandbox: running or paused, with its current reservation.
pub fn status_live(
    id: SandboxId,
    generation: u64,
    resources: Resources,
    paused: bool,
) -> pn::SandboxStatus {
    pn::SandboxStatus {
        job_id: id.job,
        index: id.index,
        state: if paused { Ss::Paused } else { Ss::Running } as i32,
        resources: Some(resources_to_pb(resources)),
        generation,
        ..Default::default()
    }
}

/// The status of a live (or last-known) sandbox, without logs.
pub fn status_from_observed(o: &ObservedSandbox) -> pn::SandboxStatus {
    let image_bytes = match o.state {
        ObservedState::Checkpointed { image_bytes } => image_bytes,
        _ => 0,
    };
    let (state, exit_code, message) = match &o.state {
        ObservedState::Checkpointed { .. } => (Ss::Checkpointed, 0, String::new()),
        ObservedState::Starting | ObservedState::Running => (Ss::Running, 0, String::new()),
        ObservedState::Paused => (Ss::Paused, 0, String::new()),
        ObservedState::Exited { code: 0 } => (Ss::Succeeded, 0, String::new()),
        ObservedState::Exited { code } => (Ss::Failed, *code, String::new()),
        ObservedState::Failed { reason } => (Ss::Failed, 0, reason.clone()),
        ObservedState::OomKilled => (
            Ss::OomKilled,
            OOM_EXIT_CODE,
            "killed by the kernel for exceeding its memory limit".to_owned(),
        ),
    };
    pn::SandboxStatus {
        job_id: o.id.job,
        index: o.id.index,
        state: state as i32,
        exit_code,
        message,
        resources: Some(resources_to_pb(o.resources)),
        log_tail: String::new(),
        generation: o.generation,
        start_failed: false,
        image_bytes,
    }
}

/// The status of an ended sandbox. `stopped` says why the node stopped it, when it did.
pub fn status_from_exit(
    report: &ExitReport,
    resources: Resources,
    stopped: Option<StopReason>,
) -> pn::SandboxStatus {
    let observed = ObservedSandbox {
        id: report.id,
        generation: report.generation,
        revision: 0,
        state: report.state.clone(),
        resources,
        owned: true,
    };
    let mut status = status_from_observed(&observed);
    if let Some(code) = report.code {
        if status.state() != Ss::Succeeded {
            status.exit_code = code;
        }
    }
    if stopped == Some(StopReason::Requested) {
        // Asked for: a stop, not a failure, whatever the exit status (143 after SIGTERM).
        status.state = Ss::Stopped as i32;
        status.exit_code = report.code.unwrap_or(status.exit_code);
    }
    if let Some(reason) = stopped {
        status.message = if status.message.is_empty() {
            stop_message(reason).to_owned()
        } else {
            format!("{}; {}", stop_message(reason), status.message)
        };
    }
    status.log_tail = log_tail(
        &report.stdout_tail,
        &report.stderr_tail,
        LOG_TAIL_REPORT_MAX_BYTES,
    );
    status
}

/// A sandbox that failed to start (the runtime's message says why).
pub fn status_start_failed(
    id: SandboxId,
    generation: u64,
    resources: Resources,
    message: String,
) -> pn::SandboxStatus {
    pn::SandboxStatus {
        job_id: id.job,
        index: id.index,
        state: Ss::Failed as i32,
        exit_code: 0,
        message,
        resources: Some(resources_to_pb(resources)),
        log_tail: String::new(),
        generation,
        start_failed: true,
        image_bytes: 0,
    }
}

/// A sandbox the runtime lost track of (its record vanished while it ran).
pub fn status_lost(
    id: SandboxId,
    generation: u64,
    resources: Resources,
    message: String,
) -> pn::SandboxStatus {
    pn::SandboxStatus {
        state: Ss::Lost as i32,
        ..status_start_failed(id, generation, resources, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb(job: u64, index: u32, generation: u64, revision: u64, state: &str) -> pn::Sandbox {
        pn::Sandbox {
            job_id: job,
            index,
            desired_state: Ss::from_name(state).map_or(99, |s| s as i32),
            resources: Some(pn::Resources {
                cpu_millis: 500,
                memory_mib: 256,
            }),
            template: "busybox".into(),
            command: vec!["sh".into(), "-c".into(), "exit 0".into()],
            env: [
                ("B".to_owned(), "2".to_owned()),
                ("A".to_owned(), "1".to_owned()),
            ]
            .into_iter()
            .collect(),
            generation,
            revision,
            user: String::new(),
        }
    }

    fn msg(
        revision: u64,
        full: bool,
        add: Vec<pn::Sandbox>,
        removed: Vec<pn::Sandbox>,
    ) -> pn::Assignments {
        pn::Assignments {
            revision,
            full,
            sandboxes: add,
            removed,
        }
    }

    #[test]
    fn sandbox_maps_to_desired() {
        let d = desired_from_pb(&pb(42, 7, 3, 5, "paused")).expect("valid");
        assert_eq!(d.id, SandboxId::new(42, 7));
        assert_eq!((d.generation, d.revision), (3, 5));
        assert_eq!(d.desired_state, DesiredState::Paused);
        assert_eq!(
            d.resources,
            Resources {
                cpu_millis: 500,
                memory_mib: 256
            }
        );
        assert_eq!(d.spec.template, "busybox");
        assert_eq!(d.spec.command[2], "exit 0");
        assert_eq!(
            d.spec.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            "env is sorted"
        );
        assert_eq!(
            desired_from_pb(&pb(1, 0, 1, 1, "hibernating")),
            Err(ConvertError::UnknownDesiredState {
                id: SandboxId::new(1, 0),
                state: 99
            })
        );
        let mut none = pb(1, 0, 1, 1, "running");
        none.resources = None;
        assert!(matches!(
            desired_from_pb(&none),
            Err(ConvertError::MissingResources { .. })
        ));
    }

    #[test]
    fn desired_set_folds_full_then_changes() {
        let mut set = DesiredSet::default();
        assert!(!set.is_complete());
        // Changes before the first full set are kept but do not make the set complete.
        set.apply(&msg(1, false, vec![pb(9, 0, 1, 1, "running")], vec![]));
        assert!(!set.is_complete());
        let applied = set.apply(&msg(
            2,
            true,
            (0..3).map(|i| pb(1, i, 1, 1, "running")).collect(),
            vec![],
        ));
        assert_eq!(applied.upserted, 3);
        assert!(set.is_complete());
        assert!(set.get(SandboxId::new(9, 0)).is_none(), "full replaces");
        // An update, a stale update (ignored), a removal, and a stale removal (ignored).
        set.apply(&msg(
            3,
            false,
            vec![pb(1, 0, 1, 2, "paused"), pb(1, 1, 1, 0, "stopped")],
            vec![pb(1, 2, 1, 1, "running")],
        ));
        assert_eq!(
            set.get(SandboxId::new(1, 0)).map(|d| d.desired_state),
            Some(DesiredState::Paused)
        );
        assert_eq!(
            set.get(SandboxId::new(1, 1)).map(|d| d.desired_state),
            Some(DesiredState::Running),
            "an older revision does not overwrite a newer one"
        );
        assert!(set.get(SandboxId::new(1, 2)).is_none());
        set.apply(&msg(4, false, vec![pb(1, 3, 2, 1, "running")], vec![]));
        let r = set.apply(&msg(5, false, vec![], vec![pb(1, 3, 1, 1, "running")]));
        assert_eq!(r.removed, 0, "removal of an older generation is ignored");
        assert_eq!(set.len(), 3);
        assert_eq!(set.revision(), 5);
    }

    #[test]
    fn full_set_keeps_previous_state_of_entries_it_cannot_read() {
        let mut set = DesiredSet::default();
        set.apply(&msg(1, true, vec![pb(1, 0, 1, 1, "running")], vec![]));
        let r = set.apply(&msg(
            2,
            true,
            vec![pb(1, 0, 1, 2, "frozen"), pb(1, 1, 1, 1, "frozen")],
            vec![],
        ));
        assert_eq!(r.rejected.len(), 2);
        assert_eq!(set.len(), 1);
        assert_eq!(set.get(SandboxId::new(1, 0)).map(|d| d.revision), Some(1));
    }

    #[test]
    fn log_tails_are_bounded_and_share_the_budget() {
        assert_eq!(log_tail("hi\n", "", 4096), "hi\n");
        assert_eq!(log_tail("out", "err", 4096), "outerr");
        let long = "x".repeat(10_000) + "END";
        let t = log_tail(&long, "", 4096);
        assert_eq!(t.len(), 4096);
        assert!(t.ends_with("END"));
        let both = log_tail(&long, &long, 4096);
        assert_eq!(both.len(), 4096);
        assert_eq!(both.matches("END").count(), 2);
        // Only a short stderr: stdout gets the rest.
        let t = log_tail(&long, "boom", 4096);
        assert_eq!(t.len(), 4096);
        assert!(t.ends_with("ENDboom"));
        // Never splits a character.
        let wide = "é".repeat(3000);
        let t = log_tail(&wide, "", 4097);
        assert!(t.len() <= 4097 && t.chars().all(|c| c == 'é'));
    }

    #[test]
    fn exits_map_to_report_states() {
        let id = SandboxId::new(3, 1);
        let res = Resources {
            cpu_millis: 100,
            memory_mib: 64,
        };
        let exit = |state, code| ExitReport {
            id,
            generation: 2,
            state,
            code,
            stdout_tail: "hi\n".into(),
            stderr_tail: "oops\n".into(),
        };
        let ok = status_from_exit(&exit(ObservedState::Exited { code: 0 }, Some(0)), res, None);
        assert_eq!(
            (ok.state().name(), ok.exit_code, ok.generation),
            ("succeeded", 0, 2)
        );
        assert_eq!(ok.log_tail, "hi\noops\n");
        let bad = status_from_exit(&exit(ObservedState::Exited { code: 3 }, Some(3)), res, None);
        assert_eq!((bad.state().name(), bad.exit_code), ("failed", 3));
        let oom = status_from_exit(&exit(ObservedState::OomKilled, None), res, None);
        assert_eq!((oom.state().name(), oom.exit_code), ("oom-killed", 137));
        let stopped = status_from_exit(
            &exit(ObservedState::Exited { code: 143 }, Some(143)),
            res,
            Some(StopReason::Unassigned),
        );
        assert_eq!((stopped.state().name(), stopped.exit_code), ("failed", 143));
        assert!(stopped.message.contains("no longer assigned"));
        let requested = status_from_exit(
            &exit(ObservedState::Exited { code: 143 }, Some(143)),
            res,
            Some(StopReason::Requested),
        );
        assert_eq!(
            (requested.state().name(), requested.exit_code),
            ("stopped", 143)
        );
        assert_eq!(requested.log_tail, "hi\noops\n");
        let failed = status_from_exit(
            &exit(
                ObservedState::Failed {
                    reason: "no crun".into(),
                },
                None,
            ),
            res,
            None,
        );
        assert_eq!(
            (failed.state().name(), failed.message.as_str()),
            ("failed", "no crun")
        );
        assert_eq!(
            status_from_observed(&ObservedSandbox {
                id,
                generation: 1,
                revision: 1,
                state: ObservedState::Paused,
                resources: res,
                owned: false
            })
            .state(),
            Ss::Paused
        );
        assert_eq!(status_lost(id, 1, res, "gone".into()).state(), Ss::Lost);
    }
}
