//! The replicated cluster state and its deterministic `apply`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::{Command, Rejection, Response};
use crate::model::{Counts, Job, JobId, JobSpec, JobState, Node, NodeSpec, NodeState};
use crate::validate;

/// Everything the scheduler replicates. Maps are ordered so the encoding — and so the state
/// hash — is canonical: two replicas that applied the same log prefix encode to the same bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub jobs: BTreeMap<JobId, Job>,
    /// `(tenant, idempotency key)` -> the job it created.
    pub idempotency: BTreeMap<(String, String), JobId>,
}

impl ClusterState {
    /// Apply one command at log `index`. Pure: same state, index and command, same result.
    pub fn apply_command(&mut self, index: u64, command: Command) -> Response {
        match command {
            Command::RegisterNode { node, at_ms } => self.register_node(index, node, at_ms),
            Command::SubmitJob {
                spec,
                idempotency_key,
                at_ms,
            } => self.submit_job(index, spec, idempotency_key, at_ms),
            Command::CancelJob { job_id, at_ms } => self.cancel_job(job_id, at_ms),
        }
    }

    fn register_node(&mut self, index: u64, spec: NodeSpec, at_ms: u64) -> Response {
        if let Err(e) = validate::node_spec(&spec) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        match self.nodes.get_mut(&spec.id) {
            Some(node) => {
                node.spec = spec;
                if node.state == NodeState::Down {
                    node.state = NodeState::Ready;
                }
            }
            None => {
                self.nodes.insert(
                    spec.id.clone(),
                    Node {
                        spec,
                        state: NodeState::Ready,
                        allocated: Default::default(),
                        registered_at_ms: at_ms,
                        registered_index: index,
                    },
                );
            }
        }
        Response::NodeRegistered
    }

    fn submit_job(&mut self, index: u64, spec: JobSpec, key: String, at_ms: u64) -> Response {
        if let Err(e) = validate::job_spec(&spec).and_then(|()| validate::idempotency_key(&key)) {
            return Response::Rejected(Rejection::Invalid(e.to_string()));
        }
        let dedup_key = (spec.tenant.clone(), key);
        if let Some(&job_id) = self.idempotency.get(&dedup_key) {
            return Response::JobSubmitted {
                job_id,
                created: false,
            };
        }
        // The log index is unique and increasing: a deterministic id every replica agrees on.
        let job_id = index;
        let counts = Counts {
            pending: spec.count,
            ..Counts::default()
        };
        self.jobs.insert(
            job_id,
            Job {
                id: job_id,
                spec,
                idempotency_key: dedup_key.1.clone(),
                state: JobState::Pending,
                counts,
                pending_reason: "waiting for the scheduler".to_string(),
                submitted_at_ms: at_ms,
                submitted_index: index,
                finished_at_ms: 0,
            },
        );
        self.idempotency.insert(dedup_key, job_id);
        Response::JobSubmitted {
            job_id,
            created: true,
        }
    }

    fn cancel_job(&mut self, job_id: JobId, at_ms: u64) -> Response {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Response::Rejected(Rejection::NoSuchJob(job_id));
        };
        if !job.state.is_terminal() {
            let c = &mut job.counts;
            // Sandboxes not yet finished are cancelled; finished ones keep their outcome.
            c.cancelled += c.pending + c.placed + c.running;
            c.pending = 0;
            c.placed = 0;
            c.running = 0;
            job.state = JobState::Cancelled;
            job.pending_reason.clear();
            job.finished_at_ms = at_ms;
        }
        Response::JobCancelled {
            job: Box::new(job.clone()),
        }
    }

    /// Canonical encoding of the whole state (snapshot payload).
    pub fn encode(&self) -> Vec<u8> {
        surge_raft::codec::to_bytes(self)
    }

    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.encode());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl surge_raft::StateMachine for ClusterState {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let response = match surge_raft::codec::from_bytes::<Command>(command) {
            Ok(c) => self.apply_command(index, c),
            Err(e) => Response::Rejected(Rejection::Undecodable(e.to_string())),
        };
        response.encode()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.encode()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = surge_raft::codec::from_bytes(snapshot)
            .map_err(|e| format!("scheduler state does not decode: {e}"))?;
        Ok(())
    }

    fn state_hash(&self) -> String {
        self.hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Resources, RestartPolicy, Strategy};
    use proptest::prelude::*;
    use proptest::strategy::Strategy as _;
    use surge_raft::StateMachine;

    pub(crate) fn spec(count: u32, tenant: &str) -> JobSpec {
        JobSpec {
            name: String::new(),
            count,
            per_sandbox: Resources::new(1000, 2048),
            template: "busybox".into(),
            command: vec!["true".into()],
            env: Default::default(),
            priority: 0,
            tenant: tenant.into(),
            gang: false,
            strategy: Strategy::Binpack,
            constraints: vec![],
            restart: RestartPolicy::Never,
        }
    }

    fn submit(s: &mut ClusterState, index: u64, key: &str) -> Response {
        s.apply_command(
            index,
            Command::SubmitJob {
                spec: spec(10, "eval"),
                idempotency_key: key.into(),
                at_ms: 1000,
            },
        )
    }

    #[test]
    fn same_key_twice_gives_the_first_job() {
        let mut s = ClusterState::default();
        assert_eq!(
            submit(&mut s, 5, "k1"),
            Response::JobSubmitted {
                job_id: 5,
                created: true
            }
        );
        assert_eq!(
            submit(&mut s, 9, "k1"),
            Response::JobSubmitted {
                job_id: 5,
                created: false
            }
        );
        assert_eq!(s.jobs.len(), 1);
        // the same key in another tenant is another job
        let other = s.apply_command(
            11,
            Command::SubmitJob {
                spec: spec(1, "train"),
                idempotency_key: "k1".into(),
                at_ms: 0,
            },
        );
        assert_eq!(
            other,
            Response::JobSubmitted {
                job_id: 11,
                created: true
            }
        );
    }

    #[test]
    fn invalid_submission_is_rejected_and_changes_nothing() {
        let mut s = ClusterState::default();
        let before = s.hash();
        let r = s.apply_command(
            1,
            Command::SubmitJob {
                spec: spec(0, "eval"),
                idempotency_key: "k".into(),
                at_ms: 0,
            },
        );
        assert!(
            matches!(r, Response::Rejected(Rejection::Invalid(_))),
            "{r:?}"
        );
        assert_eq!(s.hash(), before);
    }

    #[test]
    fn undecodable_command_is_rejected_without_change() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "a");
        let before = s.hash();
        // variant 200 does not exist: a command from a newer version
        let reply = s.apply(2, &[200, 0, 0, 0, 1, 2, 3]);
        let r = Response::decode(&reply).expect("reply decodes");
        assert!(
            matches!(r, Response::Rejected(Rejection::Undecodable(_))),
            "{r:?}"
        );
        assert_eq!(s.hash(), before);
    }

    #[test]
    fn cancel_moves_unfinished_sandboxes_to_cancelled() {
        let mut s = ClusterState::default();
        submit(&mut s, 1, "a");
        let r = s.apply_command(
            2,
            Command::CancelJob {
                job_id: 1,
                at_ms: 7,
            },
        );
        let Response::JobCancelled { job } = r else {
            panic!("{r:?}")
        };
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.counts.cancelled, 10);
        assert_eq!(job.counts.pending, 0);
        assert_eq!(job.finished_at_ms, 7);
        assert_eq!(
            s.apply_command(
                3,
                Command::CancelJob {
                    job_id: 99,
                    at_ms: 7
                }
            ),
            Response::Rejected(Rejection::NoSuchJob(99))
        );
    }

    #[test]
    fn snapshot_restores_an_identical_state() {
        let mut s = ClusterState::default();
        for i in 1..50 {
            submit(&mut s, i, &format!("k{}", i % 17));
        }
        let mut t = ClusterState::default();
        t.restore(&s.snapshot()).expect("restore");
        assert_eq!(t, s);
        assert_eq!(t.hash(), s.hash());
        assert!(t.restore(&[1, 2, 3]).is_err());
    }

    fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
        prop_oneof![
            (0u32..5, "[a-c]{1,2}", 0u64..1000).prop_map(|(count, key, at_ms)| {
                Command::SubmitJob {
                    spec: spec(count, "t"),
                    idempotency_key: key,
                    at_ms,
                }
            }),
            (0u64..40, 0u64..1000).prop_map(|(job_id, at_ms)| Command::CancelJob { job_id, at_ms }),
        ]
    }

    proptest! {
        /// Apply is deterministic: two replicas applying the same log agree byte for byte, and
        /// arbitrary bytes never panic.
        #[test]
        fn apply_is_deterministic(commands in proptest::collection::vec(arb_command(), 0..40),
                                  junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut a = ClusterState::default();
            let mut b = ClusterState::default();
            for (i, c) in commands.iter().enumerate() {
                let ra = a.apply(i as u64 + 1, &c.encode());
                let rb = b.apply(i as u64 + 1, &c.encode());
                prop_assert_eq!(ra, rb);
            }
            let ra = a.apply(1000, &junk);
            let rb = b.apply(1000, &junk);
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(a.hash(), b.hash());
            // every idempotency entry points at a job with that key
            for ((tenant, key), id) in &a.idempotency {
                let job = &a.jobs[id];
                prop_assert_eq!(&job.spec.tenant, tenant);
                prop_assert_eq!(&job.idempotency_key, key);
            }
        }
    }
}
