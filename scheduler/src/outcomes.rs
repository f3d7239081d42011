//! How sandboxes ended, in words: the exit message and the tail of stdout/stderr that a node
//! reports with each terminal state, kept in the replicated state for `surge sandbox` and
//! `surge logs`.
//!
//! Exit codes are kept for every sandbox already (in its [`Run`](crate::runs::Run)); the text is
//! what could bloat the Raft log and the snapshot, so it is bounded three ways:
//!
//! * per sandbox: [`TAIL_BYTES_MAX`] of output (the end, where the error usually is) and
//!   [`MESSAGE_BYTES_MAX`] of message;
//! * per job: [`OUTCOMES_PER_JOB_MAX`] sandboxes keep their text. Failures are worth more than
//!   successes, so once the job is full a failure evicts a success (the highest index, so the
//!   choice is deterministic), and a success is dropped. A 100,000-sandbox job therefore holds at
//!   most 32 x ~2.3 KiB = ~75 KiB of text, whatever its size, and a thousand such jobs ~75 MiB;
//! * per command: [`OUTCOMES_PER_COMMAND_MAX`] texts in one `ReportStatusOutcomes` entry, so a burst
//!   of ten thousand sandboxes ending at once is never a 20 MiB log entry (the leader also drops,
//!   before proposing, texts the job would not keep: [`Outcomes::would_keep`]).
//!
//! Everything here runs inside `apply`: plain data, no clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::JobId;
use crate::runs::SandboxState;

/// Bytes of stdout/stderr kept per sandbox (the last ones).
pub const TAIL_BYTES_MAX: usize = 2 * 1024;
/// Bytes of the node's message kept per sandbox (the first ones).
pub const MESSAGE_BYTES_MAX: usize = 256;
/// Sandboxes per job whose message and output are kept.
pub const OUTCOMES_PER_JOB_MAX: usize = 32;
/// Texts one status command may carry.
pub const OUTCOMES_PER_COMMAND_MAX: usize = 256;

/// A node's word on how one run of one sandbox ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeReport {
    pub node: String,
    pub job: JobId,
    pub index: u32,
    pub generation: u64,
    pub state: SandboxState,
    pub exit_code: i32,
    pub message: String,
    pub log_tail: String,
}

/// What the state keeps of one ended sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub generation: u64,
    pub node: String,
    pub state: SandboxState,
    pub exit_code: i32,
    pub message: String,
    pub log_tail: String,
    /// The proposer's clock when the report was committed.
    pub at_ms: u64,
}

impl Outcome {
    fn is_success(&self) -> bool {
        is_success(self.state)
    }
}

fn is_success(state: SandboxState) -> bool {
    matches!(state, SandboxState::Succeeded | SandboxState::Stopped)
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max` bytes of `text`, cut at a character boundary.
pub fn head(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The kept outcomes of one job, by sandbox index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    by_index: BTreeMap<u32, Outcome>,
}

impl Outcomes {
    pub fn get(&self, index: u32) -> Option<&Outcome> {
        self.by_index.get(&index)
    }

    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Outcome)> {
        self.by_index.iter().map(|(i, o)| (*i, o))
    }

    /// The highest-indexed success, the one a failure evicts when the job is full.
    fn evictable(&self) -> Option<u32> {
        self.by_index
            .iter()
            .rev()
            .find(|(_, o)| o.is_success())
            .map(|(i, _)| *i)
    }

    /// Whether [`Outcomes::record`] would keep a text for sandbox `index` ending in `state`.
    pub fn would_keep(&self, index: u32, state: SandboxState) -> bool {
        self.by_index.contains_key(&index)
            || self.by_index.len() < OUTCOMES_PER_JOB_MAX
            || (!is_success(state) && self.evictable().is_some())
    }

    /// Keep `outcome` for sandbox `index` within the caps (a later run of the same index
    /// replaces the earlier one). Texts are cut to their caps here too, so the bound holds
    /// whatever the proposer sent.
    pub fn record(&mut self, index: u32, mut outcome: Outcome) {
        if !self.would_keep(index, outcome.state) {
            return;
        }
        if !self.by_index.contains_key(&index) && self.by_index.len() >= OUTCOMES_PER_JOB_MAX {
            if let Some(evict) = self.evictable() {
                self.by_index.remove(&evict);
            }
        }
        outcome.log_tail = tail(&outcome.log_tail, TAIL_BYTES_MAX).to_owned();
        outcome.message = head(&outcome.message, MESSAGE_BYTES_MAX).to_owned();
        self.by_index.insert(index, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn outcome(state: SandboxState, text: &str) -> Outcome {
        Outcome {
            generation: 0,
            node: "n".into(),
            state,
            exit_code: 0,
            message: text.into(),
            log_tail: text.into(),
            at_ms: 0,
        }
    }

    #[test]
    fn texts_are_cut_to_their_caps_at_char_boundaries() {
        let mut o = Outcomes::default();
        let long = "é".repeat(TAIL_BYTES_MAX); // 2 bytes each
        o.record(0, outcome(SandboxState::Failed, &format!("{long}END")));
        let kept = o.get(0).expect("kept");
        assert!(kept.log_tail.len() <= TAIL_BYTES_MAX);
        assert!(
            kept.log_tail.ends_with("END"),
            "the end of the output is kept"
        );
        assert!(kept.message.len() <= MESSAGE_BYTES_MAX);
        assert!(
            kept.message.starts_with('é'),
            "the start of the message is kept"
        );
    }

    #[test]
    fn failures_evict_successes_when_the_job_is_full() {
        let mut o = Outcomes::default();
        let max = u32::try_from(OUTCOMES_PER_JOB_MAX).expect("a small cap");
        for i in 0..max {
            o.record(i, outcome(SandboxState::Succeeded, "ok"));
        }
        o.record(1000, outcome(SandboxState::Succeeded, "ok"));
        assert!(o.get(1000).is_none(), "a success past the cap is dropped");
        o.record(2000, outcome(SandboxState::Failed, "boom"));
        assert_eq!(o.len(), OUTCOMES_PER_JOB_MAX);
        assert!(o.get(2000).is_some(), "a failure takes a success's place");
        assert!(o.get(max - 1).is_none(), "the highest-indexed success went");
        // a restarted sandbox's new outcome replaces its old one without growing the map
        o.record(0, outcome(SandboxState::Failed, "again"));
        assert_eq!(o.len(), OUTCOMES_PER_JOB_MAX);
        assert_eq!(o.get(0).map(|x| x.message.as_str()), Some("again"));
    }

    proptest! {
        /// Whatever arrives, a job never keeps more than its cap, and failures are never
        /// dropped while successes hold a slot.
        #[test]
        fn never_past_the_cap(reports in proptest::collection::vec((0u32..200, any::<bool>()), 0..300)) {
            let mut o = Outcomes::default();
            for (index, failed) in reports {
                let state = if failed { SandboxState::Failed } else { SandboxState::Succeeded };
                let had_success = o.iter().any(|(_, x)| x.is_success());
                o.record(index, outcome(state, "x"));
                prop_assert!(o.len() <= OUTCOMES_PER_JOB_MAX);
                if failed && had_success {
                    prop_assert!(o.get(index).is_some());
                }
            }
        }
    }
}
