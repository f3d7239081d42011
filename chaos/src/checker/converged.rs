//! `converged`: the replicas end in one state, and apply is deterministic.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{ev, fold, Checker, FinalReads, Found, Violation, STATUS_INDEXES_MAX};
use crate::history::{Event, EventType, History, Op, Process};

pub(super) struct Converged {
    found: Found,
    /// Applied index -> the first status at it (at most [`STATUS_INDEXES_MAX`]).
    at_index: BTreeMap<u64, Event>,
    /// Replica -> its last final status.
    last: BTreeMap<u64, Event>,
}

impl Default for Converged {
    fn default() -> Self {
        Converged {
            found: Found::new("converged"),
            at_index: BTreeMap::new(),
            last: BTreeMap::new(),
        }
    }
}

impl Checker for Converged {
    fn observe(&mut self, e: &Event) {
        let Op::ReplicaStatus {
            replica,
            applied_index,
            state_hash,
        } = &e.op
        else {
            return;
        };
        if e.kind == EventType::Invoke {
            return;
        }
        if e.process == Process::Final {
            self.last.insert(*replica, e.clone());
        }
        if e.kind != EventType::Ok {
            return;
        }
        match self.at_index.get(applied_index) {
            Some(other) => {
                if let Op::ReplicaStatus {
                    state_hash: h2,
                    replica: r2,
                    ..
                } = &other.op
                {
                    if h2 != state_hash {
                        self.found.add(
                            || format!("replicas {r2} and {replica} applied up to index {applied_index} but their state hashes differ"),
                            || json!({ "first": ev(other), "second": ev(e) }),
                        );
                    }
                }
            }
            None if self.at_index.len() < STATUS_INDEXES_MAX => {
                self.at_index.insert(*applied_index, e.clone());
            }
            None => {}
        }
    }

    fn finish(&self, _: &FinalReads) -> Option<Violation> {
        let mut found = self.found.clone();
        if self.last.is_empty() {
            found.add(
                || "no final status of any replica".to_string(),
                || Value::Null,
            );
        }
        let finals: Vec<&Event> = self.last.values().collect();
        let agreed = finals.windows(2).all(|w| match (&w[0].op, &w[1].op) {
            (
                Op::ReplicaStatus {
                    applied_index: a,
                    state_hash: x,
                    ..
                },
                Op::ReplicaStatus {
                    applied_index: b,
                    state_hash: y,
                    ..
                },
            ) => a == b && x == y,
            _ => false,
        });
        if finals.iter().any(|e| e.kind != EventType::Ok) || !agreed {
            found.add(
                || {
                    let parts: Vec<String> = finals
                        .iter()
                        .map(|e| match &e.op {
                            Op::ReplicaStatus {
                                replica,
                                applied_index,
                                state_hash,
                            } if e.kind == EventType::Ok => {
                                format!(
                                    "{replica}: applied {applied_index} hash {:.12}",
                                    state_hash
                                )
                            }
                            Op::ReplicaStatus { replica, .. } => format!("{replica}: no answer"),
                            _ => String::new(),
                        })
                        .collect();
                    format!("replicas did not converge: {}", parts.join("; "))
                },
                || json!({ "final_statuses": finals.iter().map(|e| ev(e)).collect::<Vec<_>>() }),
            );
        }
        found.finish()
    }
}

/// Every replica ends at the same applied index with the same state hash; and no two statuses at
/// the same applied index, at any time, disagree on the hash (apply is deterministic).
pub fn converged(h: &History) -> Option<Violation> {
    fold::<Converged>(h)
}
