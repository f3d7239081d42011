//! The order jobs are scheduled in: priority first, then dominant resource fairness between tenants,
//! then FIFO within a tenant.
//!
//! # Why DRF
//!
//! Sandboxes mix shapes: an RL rollout fleet is CPU-heavy (1 CPU / 2 GiB), an eval harness loading a
//! model is memory-heavy (1 CPU / 32 GiB). Sharing "fairly" by CPU alone lets a memory-heavy tenant take
//! the whole cluster's memory while looking small, and by memory alone the reverse. Dominant Resource
//! Fairness (Ghodsi et al., "Dominant Resource Fairness: Fair Allocation of Multiple Resource Types",
//! NSDI 2011) compares tenants by their *dominant share* — the largest of their per-dimension shares of
//! the cluster — and always serves the tenant whose dominant share is lowest. It is strategy-proof
//! (a tenant gains nothing by inflating requests), envy-free and Pareto-efficient, which plain
//! per-resource fair share is not.
//!
//! Shares are integers (parts per billion) and ties go to the tenant whose name sorts first, so the
//! order is deterministic. A tenant's share is re-keyed after each of its jobs and after preemption
//! changes another tenant's usage.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::placement::Resources;

/// Parts per billion.
const SHARE_SCALE: u128 = 1_000_000_000;

/// `max(usage.cpu / capacity.cpu, usage.mem / capacity.mem)` in parts per billion. A dimension the
/// cluster does not have counts as fully used by anyone who uses it.
pub(crate) fn dominant_share(usage: &Resources, capacity: &Resources) -> u64 {
    fn share(used: u64, cap: u64) -> u64 {
        if used == 0 {
            return 0;
        }
        if cap == 0 {
            return u64::MAX;
        }
        let ppb = u128::from(used) * SHARE_SCALE / u128::from(cap);
        u64::try_from(ppb).unwrap_or(u64::MAX)
    }
    share(usage.cpu_millis, capacity.cpu_millis).max(share(usage.memory_mib, capacity.memory_mib))
}

/// One job as the ordering sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueuedJob {
    pub(crate) slot: usize,
    pub(crate) priority: i32,
    pub(crate) tenant: usize,
    pub(crate) submitted_index: u64,
    pub(crate) id: u64,
}

#[derive(Debug, Default)]
struct Level {
    /// Per tenant, its jobs in FIFO order.
    queues: BTreeMap<usize, VecDeque<usize>>,
    /// (dominant share, tenant) of tenants with queued jobs.
    ready: BTreeSet<(u64, usize)>,
    share_of: BTreeMap<usize, u64>,
    primed: bool,
}

/// Yields jobs (their `slot`) in scheduling order; shares are supplied by the caller, who owns usage.
#[derive(Debug)]
pub(crate) struct JobOrder {
    levels: Vec<Level>,
    current: usize,
}

impl JobOrder {
    pub(crate) fn new(jobs: &[QueuedJob]) -> JobOrder {
        let mut sorted = jobs.to_vec();
        sorted.sort_by_key(|j| {
            (
                Reverse(j.priority),
                j.tenant,
                j.submitted_index,
                j.id,
                j.slot,
            )
        });
        let mut levels: Vec<Level> = Vec::new();
        let mut last_priority = None;
        for job in sorted {
            if last_priority != Some(job.priority) {
                levels.push(Level::default());
                last_priority = Some(job.priority);
            }
            if let Some(level) = levels.last_mut() {
                level
                    .queues
                    .entry(job.tenant)
                    .or_default()
                    .push_back(job.slot);
            }
        }
        JobOrder { levels, current: 0 }
    }

    /// The next job, or `None` when all have been handed out. `share(tenant)` is the tenant's current
    /// dominant share.
    pub(crate) fn next(&mut self, share: impl Fn(usize) -> u64) -> Option<usize> {
        loop {
            let level = self.levels.get_mut(self.current)?;
            if !level.primed {
                level.primed = true;
                for &tenant in level.queues.keys() {
                    let s = share(tenant);
                    level.share_of.insert(tenant, s);
                    level.ready.insert((s, tenant));
                }
            }
            let Some(&(s, tenant)) = level.ready.iter().next() else {
                self.current += 1;
                continue;
            };
            level.ready.remove(&(s, tenant));
            let queue = level.queues.get_mut(&tenant)?;
            let slot = queue.pop_front()?;
            if queue.is_empty() {
                level.share_of.remove(&tenant);
            } else {
                // Re-keyed by the caller through `update_share` once the job is scheduled; until then it
                // keeps its old key so that it stays in the set.
                level.ready.insert((s, tenant));
            }
            return Some(slot);
        }
    }

    /// A tenant's usage changed: move it to its new place in the current level (if it is queued there).
    pub(crate) fn update_share(&mut self, tenant: usize, share: u64) {
        let Some(level) = self.levels.get_mut(self.current) else {
            return;
        };
        if let Some(old) = level.share_of.get_mut(&tenant) {
            level.ready.remove(&(*old, tenant));
            *old = share;
            level.ready.insert((share, tenant));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dominant_share_takes_the_larger_dimension() {
        let cap = Resources::new(1_000_000, 1_000_000);
        assert_eq!(
            dominant_share(&Resources::new(100_000, 500_000), &cap),
            500_000_000
        );
        assert_eq!(
            dominant_share(&Resources::new(300_000, 0), &cap),
            300_000_000
        );
        assert_eq!(dominant_share(&Resources::ZERO, &Resources::ZERO), 0);
        assert_eq!(
            dominant_share(&Resources::new(1, 0), &Resources::ZERO),
            u64::MAX
        );
    }

    fn job(slot: usize, priority: i32, tenant: usize, submitted_index: u64) -> QueuedJob {
        QueuedJob {
            slot,
            priority,
            tenant,
            submitted_index,
            id: slot as u64,
        }
    }

    #[test]
    fn priority_then_lowest_share_then_fifo() {
        let jobs = [
            job(0, 1, 0, 5),
            job(1, 1, 0, 1),
            job(2, 1, 1, 9),
            job(3, 7, 1, 20),
        ];
        let mut order = JobOrder::new(&jobs);
        // Tenant 0 already uses more than tenant 1.
        let shares = [500u64, 100];
        let mut got = Vec::new();
        while let Some(slot) = order.next(|t| shares[t]) {
            got.push(slot);
        }
        // Priority 7 first; then tenant 1 (lower share) before tenant 0; tenant 0 in FIFO order (1, 0).
        assert_eq!(got, vec![3, 2, 1, 0]);
    }

    #[test]
    fn update_share_reorders_tenants() {
        let jobs = [
            job(0, 0, 0, 1),
            job(1, 0, 0, 2),
            job(2, 0, 1, 1),
            job(3, 0, 1, 2),
        ];
        let mut order = JobOrder::new(&jobs);
        let first = order.next(|t| [10u64, 20][t]);
        assert_eq!(first, Some(0));
        // Tenant 0's job made it the bigger user; tenant 1 goes next twice.
        order.update_share(0, 30);
        assert_eq!(order.next(|_| 0), Some(2));
        order.update_share(1, 25);
        assert_eq!(order.next(|_| 0), Some(3));
        assert_eq!(order.next(|_| 0), Some(1));
        assert_eq!(order.next(|_| 0), None);
    }
}
