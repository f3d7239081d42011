//! Status reports: sandbox state changes, batched into `ReportStatus` calls.
//!
//! ```text
//!   owner tasks ──ReportEvent──► reporter ──ReportStatus(≤ REPORT_BATCH_MAX, every 100 ms)──► leader
//!   session ──Connected/Disconnected──►  │  after each (re)connect: one `full=true` report first
//! ```
//!
//! [`Outbox`] is the pure part: what is waiting to be sent (one entry per sandbox incarnation, the
//! newest status wins), and the latest status of every sandbox the node holds (what a full report
//! lists). A batch that fails, or that the scheduler accepts only partly, goes back into the outbox
//! unless a newer status for the same incarnation arrived meanwhile. The reporter task keeps at
//! most one call in flight and keeps draining its queue while the call runs, so owners never
//! wait on the network.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use surge_proto::node as pn;
use surge_proto::node::node_api_client::NodeApiClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::activity::{Activity, ACTIVITY_MAX};
use super::connection::{call_timeout, CallError};
use super::metrics::NodeMetrics;
use crate::reconcile::SandboxId;

/// Updates in one `ReportStatus` call (a full report is one call whatever its size).
pub const REPORT_BATCH_MAX: usize = 1_000;
/// Pending updates are flushed at least this often.
pub const REPORT_FLUSH_INTERVAL_MS: u64 = 100;
/// Longest wait between two attempts after failed calls.
pub const REPORT_RETRY_MAX_MS: u64 = 5_000;
/// Incarnations with unsent updates kept while the scheduler is unreachable. Beyond this, final
/// statuses of sandboxes the node has already forgotten are dropped first (the scheduler will
/// then see them missing from the next full report and mark them lost).
pub const REPORT_PENDING_MAX: usize = 200_000;
/// Queue from owner tasks to the reporter.
pub const REPORT_QUEUE_MAX: usize = 4_096;

/// An input of the reporter.
#[derive(Debug)]
pub enum ReportEvent {
    Status(pn::SandboxStatus),
    /// The node released the sandbox: it is no longer part of full reports.
    Forget {
        id: SandboxId,
        generation: u64,
    },
}

/// The session's word to the reporter.
pub enum ReporterControl {
    /// A new session: send a full report first, then fire `full_sent` (dropped if it failed).
    Connected {
        client: NodeApiClient<Channel>,
        full_sent: oneshot::Sender<()>,
    },
    Disconnected,
}

fn id_of(s: &pn::SandboxStatus) -> SandboxId {
    SandboxId::new(s.job_id, s.index)
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: BTreeMap<(SandboxId, u64), pn::SandboxStatus>,
    latest: BTreeMap<SandboxId, pn::SandboxStatus>,
}

impl Outbox {
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn latest(&self, id: SandboxId) -> Option<&pn::SandboxStatus> {
        self.latest.get(&id)
    }

    pub fn record(&mut self, status: pn::SandboxStatus) {
        let id = id_of(&status);
        let newest = self
            .latest
            .get(&id)
            .is_none_or(|l| l.generation <= status.generation);
        if newest {
            self.latest.insert(id, status.clone());
        }
        self.pending.insert((id, status.generation), status);
        if self.pending.len() > REPORT_PENDING_MAX {
            self.trim();
        }
    }

    pub fn forget(&mut self, id: SandboxId, generation: u64) {
        if self
            .latest
            .get(&id)
            .is_some_and(|l| l.generation == generation)
        {
            self.latest.remove(&id);
        }
    }

    fn trim(&mut self) {
        let latest = &self.latest;
        let excess = self.pending.len().saturating_sub(REPORT_PENDING_MAX);
        let dropped: Vec<_> = self
            .pending
            .iter()
            .filter(|((id, generation), _)| {
                latest.get(id).is_none_or(|l| l.generation != *generation)
            })
            .map(|(k, _)| *k)
            .take(excess)
            .collect();
        tracing::warn!(
            dropped = dropped.len(),
            "too many unsent status updates; dropping those of forgotten sandboxes"
        );
        for k in dropped {
            self.pending.remove(&k);
        }
    }

    /// Up to `max` pending updates, in sandbox order.
    pub fn take_batch(&mut self, max: usize) -> Vec<pn::SandboxStatus> {
        let keys: Vec<_> = self.pending.keys().take(max).copied().collect();
        keys.iter().filter_map(|k| self.pending.remove(k)).collect()
    }

    /// Everything the node holds. Pending updates it already carries are dropped; older
    /// incarnations and forgotten sandboxes stay pending (they are sent as changes after it).
    pub fn full_report(&mut self) -> Vec<pn::SandboxStatus> {
        let report: Vec<_> = self.latest.values().cloned().collect();
        for s in &report {
            let key = (id_of(s), s.generation);
            if self.pending.get(&key) == Some(s) {
                self.pending.remove(&key);
            }
        }
        report
    }

    /// The scheduler took the first `accepted` of `sent`; the rest go back unless superseded.
    pub fn settle(&mut self, sent: Vec<pn::SandboxStatus>, accepted: usize) {
        for s in sent.into_iter().skip(accepted) {
            self.pending.entry((id_of(&s), s.generation)).or_insert(s);
        }
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<u32, CallError>> + Send>>;

struct InFlight {
    sent: Vec<pn::SandboxStatus>,
    /// Activity the call carries: back into the next report if it fails.
    active: Vec<pn::SandboxRef>,
    full: Option<oneshot::Sender<()>>,
    future: CallFuture,
}

async fn in_flight_done(f: &mut Option<InFlight>) -> Result<u32, CallError> {
    match f {
        Some(f) => (&mut f.future).await,
        None => std::future::pending().await,
    }
}

/// Inputs of one node's reporter task.
pub struct Reporter {
    pub node_id: String,
    /// Sandboxes used since the last report; taken at every flush and sent with the next call.
    pub activity: Arc<Activity>,
    pub events: mpsc::Receiver<ReportEvent>,
    pub control: mpsc::Receiver<ReporterControl>,
    pub metrics: Arc<NodeMetrics>,
    pub call_timeout: Duration,
}

impl Reporter {
    /// Run until the node stops (`stop` turns true) or every sender is gone.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut outbox = Outbox::default();
        let mut client: Option<NodeApiClient<Channel>> = None;
        // `Some` while a full report is owed to the current session.
        let mut full_owed: Option<Option<oneshot::Sender<()>>> = None;
        let mut in_flight: Option<InFlight> = None;
        let mut flush_due = false;
        let mut failures = 0u32;
        let mut retry_at = Instant::now();
        // Activity not yet accepted by the scheduler (bounded like the set it comes from).
        let mut active: Vec<pn::SandboxRef> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(REPORT_FLUSH_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                ev = self.events.recv() => match ev {
                    None => return,
                    Some(ReportEvent::Status(s)) => outbox.record(s),
                    Some(ReportEvent::Forget { id, generation }) => outbox.forget(id, generation),
                },
                ctl = self.control.recv() => {
                    if let Some(f) = in_flight.take() {
                        outbox.settle(f.sent, 0);
                        merge_active(&mut active, f.active);
                    }
                    match ctl {
                        None => return,
                        Some(ReporterControl::Connected { client: c, full_sent }) => {
                            client = Some(c);
                            full_owed = Some(Some(full_sent));
                            failures = 0;
                            retry_at = Instant::now();
                        }
                        Some(ReporterControl::Disconnected) => {
                            client = None;
                            full_owed = None;
                        }
                    }
                }
                res = in_flight_done(&mut in_flight) => {
                    let Some(f) = in_flight.take() else { continue };
                    match res {
                        Ok(accepted) => {
                            let accepted = usize::try_from(accepted).unwrap_or(usize::MAX).min(f.sent.len());
                            self.metrics.reports_sent.inc();
                            self.metrics.report_updates_sent.inc_by(accepted as u64);
                            if let Some(done) = f.full {
                                let _ = done.send(());
                            }
                            outbox.settle(f.sent, accepted);
                            failures = 0;
                        }
                        Err(e) => {
                            self.metrics.report_failures.inc();
                            tracing::warn!(node = %self.node_id, error = %e, updates = f.sent.len(),
                                "status report failed; will resend");
                            if f.full.is_some() {
                                full_owed = Some(f.full);
                            }
                            outbox.settle(f.sent, 0);
                            merge_active(&mut active, f.active);
                            failures = failures.saturating_add(1);
                            let backoff = REPORT_FLUSH_INTERVAL_MS
                                .saturating_mul(1u64 << failures.min(16))
                                .min(REPORT_RETRY_MAX_MS);
                            retry_at = Instant::now() + Duration::from_millis(backoff);
                        }
                    }
                }
                _ = tick.tick() => {
                    flush_due = true;
                    let used = self.activity.take().into_iter().map(|id| pn::SandboxRef {
                        job_id: id.job,
                        index: id.index,
                    });
                    merge_active(&mut active, used.collect());
                }
            }

            let Some(c) = client.as_ref() else { continue };
            if in_flight.is_some() || Instant::now() < retry_at {
                continue;
            }
            let (sent, full) = if let Some(done) = full_owed.take() {
                (outbox.full_report(), Some(done))
            } else if outbox.pending_len() >= REPORT_BATCH_MAX
                || (flush_due && (outbox.pending_len() > 0 || !active.is_empty()))
            {
                flush_due = false;
                (outbox.take_batch(REPORT_BATCH_MAX), None)
            } else {
                continue;
            };
            let sent_active = std::mem::take(&mut active);
            let request = pn::ReportStatusRequest {
                node_id: self.node_id.clone(),
                updates: sent.clone(),
                full: full.is_some(),
                active: sent_active.clone(),
            };
            let mut c = c.clone();
            let timeout = self.call_timeout;
            let future: CallFuture = Box::pin(async move {
                call_timeout("ReportStatus", timeout, c.report_status(request))
                    .await
                    .map(|r| r.accepted)
            });
            in_flight = Some(InFlight {
                sent,
                active: sent_active,
                // A full report whose caller went away still counts as the session's full report.
                full: full.map(|d| d.unwrap_or_else(|| oneshot::channel().0)),
                future,
            });
        }
    }
}

/// Add `more` to the activity waiting to be sent: sorted, without duplicates, and bounded
/// (past [`ACTIVITY_MAX`] the newest are dropped; that only delays an idle clock's reset).
fn merge_active(active: &mut Vec<pn::SandboxRef>, more: Vec<pn::SandboxRef>) {
    if more.is_empty() {
        return;
    }
    active.extend(more);
    active.sort_unstable_by_key(|a| (a.job_id, a.index));
    active.dedup_by_key(|a| (a.job_id, a.index));
    active.truncate(ACTIVITY_MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_waiting_is_merged_sorted_and_unique() {
        let r = |job_id, index| pn::SandboxRef { job_id, index };
        let mut active = vec![r(2, 0)];
        merge_active(&mut active, vec![r(1, 3), r(2, 0)]);
        assert_eq!(active, vec![r(1, 3), r(2, 0)]);
    }

    fn st(job: u64, index: u32, generation: u64, state: &str) -> pn::SandboxStatus {
        pn::SandboxStatus {
            job_id: job,
            index,
            state: surge_proto::jobs::SandboxState::from_name(state).expect("a state") as i32,
            generation,
            ..Default::default()
        }
    }

    #[test]
    fn newest_status_of_an_incarnation_wins() {
        let mut o = Outbox::default();
        o.record(st(1, 0, 1, "running"));
        o.record(st(1, 0, 1, "succeeded"));
        o.record(st(1, 1, 1, "running"));
        assert_eq!(o.pending_len(), 2);
        let batch = o.take_batch(REPORT_BATCH_MAX);
        assert_eq!(batch[0].state().name(), "succeeded");
        assert_eq!(o.pending_len(), 0);
    }

    #[test]
    fn batches_are_bounded_and_in_order() {
        let mut o = Outbox::default();
        for i in (0..2500).rev() {
            o.record(st(1, i, 1, "running"));
        }
        let first = o.take_batch(REPORT_BATCH_MAX);
        assert_eq!(first.len(), REPORT_BATCH_MAX);
        assert_eq!((first[0].index, first[999].index), (0, 999));
        assert_eq!(o.take_batch(REPORT_BATCH_MAX).len(), 1000);
        assert_eq!(o.take_batch(REPORT_BATCH_MAX).len(), 500);
        assert!(o.take_batch(REPORT_BATCH_MAX).is_empty());
    }

    #[test]
    fn unacknowledged_updates_are_resent_unless_superseded() {
        let mut o = Outbox::default();
        for i in 0..4 {
            o.record(st(1, i, 1, "running"));
        }
        let sent = o.take_batch(10);
        // While the call was in flight, sandbox 1.3 finished.
        o.record(st(1, 3, 1, "succeeded"));
        o.settle(sent, 2); // the scheduler accepted 1.0 and 1.1 only
        let again = o.take_batch(10);
        let got: Vec<_> = again.iter().map(|s| (s.index, s.state().name())).collect();
        assert_eq!(got, vec![(2, "running"), (3, "succeeded")]);
        o.settle(again, 0); // failed: everything comes back
        assert_eq!(o.pending_len(), 2);
    }

    #[test]
    fn full_report_lists_what_the_node_holds() {
        let mut o = Outbox::default();
        o.record(st(1, 0, 1, "running"));
        o.record(st(1, 1, 1, "failed"));
        o.record(st(2, 0, 1, "succeeded"));
        o.forget(SandboxId::new(2, 0), 1);
        o.record(st(1, 0, 2, "running")); // a newer incarnation of 1.0
        o.record(st(1, 0, 1, "failed")); // the old one's exit arrives late: not "latest"
        let full = o.full_report();
        let got: Vec<_> = full
            .iter()
            .map(|s| (s.job_id, s.index, s.generation, s.state().name()))
            .collect();
        assert_eq!(got, vec![(1, 0, 2, "running"), (1, 1, 1, "failed")]);
        // Left to send as changes: the old incarnation's exit and the forgotten sandbox's end.
        let rest: Vec<_> = o
            .take_batch(10)
            .iter()
            .map(|s| (s.job_id, s.index, s.generation))
            .collect();
        assert_eq!(rest, vec![(1, 0, 1), (2, 0, 1)]);
        o.forget(SandboxId::new(1, 0), 1); // wrong generation: kept
        assert!(o.latest(SandboxId::new(1, 0)).is_some());
    }
}
