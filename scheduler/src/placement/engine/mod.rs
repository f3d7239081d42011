//! The placement loop: working state over a snapshot, job by job, with an undo log so that a gang (or
//! anything else tentative) can be rolled back exactly.
//!
//! # Cost
//!
//! Let N be nodes, C the distinct constraint sets among pending jobs, R the node runs emitted.
//!
//! - Setup: sort nodes by id, O(N log N); tenant usage and victim lists from allocations.
//! - Per feasibility class, once: the static checks over all nodes, O(N), and a [`FreeIndex`] over the
//!   feasible ones (bulk-built from sorted input). The same for (class, template) on first use.
//! - Per run: a range scan of the index from the job's size upward that stops after
//!   [`CANDIDATES_MAX`] nodes that fit, exact scores for those, then one node update, O(log N) per index
//!   holding the node. Bounding the candidates is what Nomad does too (its `LimitIterator` scores only
//!   a handful of nodes for batch jobs); because the scan starts at the tightest fit in the job's
//!   dominant dimension, the candidates are the fullest nodes that still fit, which is where best fit
//!   looks anyway.
//!
//! So a 100,000-sandbox job on 10,000 nodes costs O(N log N) to set up plus ~800 runs, and 10,000 small
//! jobs cost a few index operations each — never O(N) per job (except when a job's class is new, or in
//! the degenerate case of a scan that must skip many nodes lacking the other dimension).

use std::collections::{BTreeMap, BTreeSet};

mod fill;
mod index;
#[cfg(test)]
mod tests;

use crate::placement::fairshare::{dominant_share, JobOrder, QueuedJob};
use crate::placement::feasible::{self, ClassShortage};
use crate::placement::rank::{Dim, FreeIndex};
use crate::placement::{
    Allocation, Constraint, IndexRun, JobRequest, NodeView, Placement, PlacementInput, Plan,
    Reason, Resources, Unplaced,
};

/// Nodes scored per run (from the class index; a job with a template also gets up to half of them from
/// the nodes holding its template).
pub(crate) const CANDIDATES_MAX: usize = 8;

/// Compute a plan for `input`. Pure and deterministic; see the module docs of `placement`.
pub fn place(input: &PlacementInput) -> Plan {
    let mut engine = Engine::new(input);
    engine.run();
    engine.plan
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeState {
    pub(super) free: Resources,
    pub(super) slots: u32,
}

/// A running allocation in the working state; `count` shrinks when its tail is evicted.
#[derive(Debug, Clone)]
pub(super) struct WorkAlloc {
    pub(super) job: u64,
    pub(super) node: u32,
    pub(super) first_index: u32,
    pub(super) count: u32,
    pub(super) per: Resources,
    pub(super) priority: i32,
    pub(super) tenant: usize,
    pub(super) gang: bool,
    /// Preemptible and not in cool-down.
    pub(super) eligible: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Undo {
    Node { node: u32, state: NodeState },
    Alloc { alloc: u32, count: u32 },
    Tenant { tenant: usize, usage: Resources },
}

#[derive(Debug)]
pub(super) struct Class {
    /// Statically feasible nodes, ascending index.
    pub(super) nodes: Vec<u32>,
    pub(super) index: usize,
}

#[derive(Debug)]
pub(super) struct Tenant {
    pub(super) name: String,
    pub(super) usage: Resources,
    pub(super) quota: Option<Resources>,
}

/// The job being scheduled.
#[derive(Debug)]
pub(super) struct JobCtx<'a> {
    pub(super) job: &'a JobRequest,
    pub(super) tenant: usize,
    pub(super) class: usize,
    pub(super) template_index: Option<usize>,
    pub(super) dim: Dim,
    /// Pending indices, sorted and disjoint, minus what is already allocated.
    runs: Vec<IndexRun>,
    cursor_run: usize,
    cursor_offset: u32,
}

impl JobCtx<'_> {
    /// Takes the next `k` pending indices as runs.
    fn take_indices(&mut self, mut k: u64) -> Vec<IndexRun> {
        let mut out = Vec::new();
        while k > 0 {
            let Some(run) = self.runs.get(self.cursor_run) else {
                break;
            };
            let left = run.count - self.cursor_offset;
            let n = u32::try_from(k).unwrap_or(u32::MAX).min(left);
            out.push(IndexRun::new(run.first_index + self.cursor_offset, n));
            k -= u64::from(n);
            if n == left {
                self.cursor_run += 1;
                self.cursor_offset = 0;
            } else {
                self.cursor_offset += n;
            }
        }
        out
    }

    fn cursor(&self) -> (usize, u32) {
        (self.cursor_run, self.cursor_offset)
    }

    fn reset_cursor(&mut self, cursor: (usize, u32)) {
        (self.cursor_run, self.cursor_offset) = cursor;
    }
}

pub(super) struct Engine<'a> {
    pub(super) input: &'a PlacementInput,
    /// Nodes sorted by id, duplicates dropped.
    pub(super) nodes: Vec<&'a NodeView>,
    pub(super) state: Vec<NodeState>,
    pub(super) indices: Vec<FreeIndex>,
    /// Node -> indices it belongs to.
    pub(super) memberships: Vec<Vec<usize>>,
    pub(super) classes: Vec<Class>,
    class_ids: BTreeMap<Vec<Constraint>, usize>,
    /// (class -> template -> index over the class's nodes holding it).
    template_indices: BTreeMap<usize, BTreeMap<String, Option<usize>>>,
    pub(super) allocs: Vec<WorkAlloc>,
    /// Node -> its allocations in victim order (see `preempt.rs`).
    pub(super) allocs_by_node: Vec<Vec<u32>>,
    /// Gang job -> its allocations.
    pub(super) gang_allocs: BTreeMap<u64, Vec<u32>>,
    /// Lowest priority among evictable allocations; a job at or below it cannot preempt.
    pub(super) min_victim_priority: Option<i32>,
    pub(super) tenants: Vec<Tenant>,
    tenant_ids: BTreeMap<&'a str, usize>,
    /// Tenants whose usage changed during the current job (for DRF re-keying).
    dirty_tenants: BTreeSet<usize>,
    /// Allocated runs per job, so a pending index that is already running is never placed again.
    allocated_runs: BTreeMap<u64, Vec<IndexRun>>,
    pub(super) capacity: Resources,
    pub(super) undo: Vec<Undo>,
    /// Bumped on every node change; keys the shortage cache.
    epoch: u64,
    shortage_cache: BTreeMap<(usize, Resources), (u64, ClassShortage)>,
    pub(super) preempted: u64,
    pub(super) plan: Plan,
}

impl<'a> Engine<'a> {
    pub(super) fn new(input: &'a PlacementInput) -> Engine<'a> {
        let mut sorted: Vec<&NodeView> = input.nodes.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|b, a| a.id == b.id);
        let nodes = sorted;
        #[allow(
            clippy::cast_possible_truncation,
            reason = "node numbers are u32 by design; a cluster has far fewer than 2^32 nodes"
        )]
        let node_ids: BTreeMap<&str, u32> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i as u32))
            .collect();
        let state: Vec<NodeState> = nodes
            .iter()
            .map(|n| NodeState {
                free: n.free(),
                slots: n.free_slots(),
            })
            .collect();
        let capacity = nodes
            .iter()
            .filter(|n| n.schedulable)
            .fold(Resources::ZERO, |acc, n| acc.saturating_add(n.allocatable));

        // Tenants: every name in quotas, allocations and pending jobs, in name order.
        let mut names: BTreeSet<&str> = input.quotas.keys().map(String::as_str).collect();
        names.extend(input.allocations.iter().map(|a| a.tenant.as_str()));
        names.extend(input.pending.iter().map(|j| j.tenant.as_str()));
        let tenant_ids: BTreeMap<&str, usize> =
            names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut tenants: Vec<Tenant> = names
            .iter()
            .map(|n| Tenant {
                name: (*n).to_string(),
                usage: Resources::ZERO,
                quota: input.quotas.get(*n).map(|q| q.max),
            })
            .collect();

        let pending_jobs: BTreeSet<u64> = input.pending.iter().map(|j| j.id).collect();
        let mut allocated_runs: BTreeMap<u64, Vec<IndexRun>> = BTreeMap::new();
        let mut allocs = Vec::new();
        let mut allocs_by_node: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
        let mut gang_allocs: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let mut min_victim_priority: Option<i32> = None;
        for a in &input.allocations {
            let tenant = tenant_ids.get(a.tenant.as_str()).copied().unwrap_or(0);
            if let Some(t) = tenants.get_mut(tenant) {
                t.usage = t
                    .usage
                    .saturating_add(a.per_sandbox.saturating_mul(u64::from(a.count)));
            }
            if pending_jobs.contains(&a.job) {
                allocated_runs
                    .entry(a.job)
                    .or_default()
                    .push(IndexRun::new(a.first_index, a.count));
            }
            let Some(&node) = node_ids.get(a.node.as_str()) else {
                continue;
            };
            if a.count == 0 {
                continue;
            }
            let eligible = a.preemptible && !in_cooldown(input, a);
            if eligible {
                min_victim_priority =
                    Some(min_victim_priority.map_or(a.priority, |m| m.min(a.priority)));
            }
            #[allow(
                clippy::cast_possible_truncation,
                reason = "allocation numbers are u32 by design; one per (job, node) row, far fewer than 2^32"
            )]
            let id = allocs.len() as u32;
            allocs.push(WorkAlloc {
                job: a.job,
                node,
                first_index: a.first_index,
                count: a.count,
                per: a.per_sandbox,
                priority: a.priority,
                tenant,
                gang: a.gang,
                eligible,
            });
            allocs_by_node[node as usize].push(id);
            if a.gang {
                gang_allocs.entry(a.job).or_default().push(id);
            }
        }
        for (node, list) in allocs_by_node.iter_mut().enumerate() {
            let allocatable = nodes[node].allocatable;
            list.sort_by_key(|&i| {
                crate::placement::preempt::victim_order_key(&allocs[i as usize], &allocatable)
            });
        }
        Engine {
            input,
            memberships: vec![Vec::new(); nodes.len()],
            nodes,
            state,
            indices: Vec::new(),
            classes: Vec::new(),
            class_ids: BTreeMap::new(),
            template_indices: BTreeMap::new(),
            allocs,
            allocs_by_node,
            gang_allocs,
            min_victim_priority,
            tenants,
            tenant_ids,
            dirty_tenants: BTreeSet::new(),
            allocated_runs,
            capacity,
            undo: Vec::new(),
            epoch: 0,
            shortage_cache: BTreeMap::new(),
            preempted: 0,
            plan: Plan {
                at_index: input.at_index,
                ..Plan::default()
            },
        }
    }

    fn run(&mut self) {
        let input = self.input;
        // Duplicate job ids: the first in input order is scheduled, the others are rejected.
        let mut seen = BTreeSet::new();
        let mut queued = Vec::new();
        for (slot, job) in input.pending.iter().enumerate() {
            if !seen.insert(job.id) {
                self.plan.unplaced.push(Unplaced {
                    job: job.id,
                    count: job.pending_count(),
                    reason: Reason::Invalid {
                        why: format!("duplicate request for job {}", job.id),
                    },
                });
                continue;
            }
            queued.push(QueuedJob {
                slot,
                priority: job.priority,
                tenant: self.tenant_of(&job.tenant),
                submitted_index: job.submitted_index,
                id: job.id,
            });
        }
        let mut order = JobOrder::new(&queued);
        loop {
            let next = {
                let tenants = &self.tenants;
                let capacity = self.capacity;
                order.next(|t| {
                    tenants
                        .get(t)
                        .map_or(0, |t| dominant_share(&t.usage, &capacity))
                })
            };
            let Some(slot) = next else { break };
            let Some(job) = input.pending.get(slot) else {
                break;
            };
            self.schedule_job(job);
            for tenant in std::mem::take(&mut self.dirty_tenants) {
                let share = dominant_share(&self.tenants[tenant].usage, &self.capacity);
                order.update_share(tenant, share);
            }
        }
    }

    fn tenant_of(&self, name: &str) -> usize {
        self.tenant_ids.get(name).copied().unwrap_or(0)
    }

    fn unplaced(&mut self, job: u64, count: u64, reason: Reason) {
        if count > 0 {
            self.plan.unplaced.push(Unplaced { job, count, reason });
        }
    }

    fn schedule_job(&mut self, job: &'a JobRequest) {
        let taken = self
            .allocated_runs
            .get(&job.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let runs = normalize_runs(&job.pending, taken);
        let wanted: u64 = runs.iter().map(|r| u64::from(r.count)).sum();
        if wanted == 0 {
            return;
        }
        if job.per_sandbox.is_zero() {
            let why = "each sandbox must ask for some CPU or memory".to_string();
            return self.unplaced(job.id, wanted, Reason::Invalid { why });
        }
        let class = self.class_for(&job.constraints);
        if self.classes[class].nodes.is_empty() {
            let reason =
                feasible::no_feasible_node_reason(self.nodes.iter().copied(), &job.constraints);
            return self.unplaced(job.id, wanted, reason);
        }
        let tenant = self.tenant_of(&job.tenant);
        let allowed = self.quota_allows(tenant, &job.per_sandbox);
        let target = wanted.min(allowed);
        let quota_reason = |t: &Tenant| Reason::Quota {
            tenant: t.name.clone(),
            used: t.usage,
            max: t.quota.unwrap_or(Resources::ZERO),
            held: wanted - target,
        };
        if job.gang && target < wanted {
            let reason = quota_reason(&self.tenants[tenant]);
            return self.unplaced(job.id, wanted, reason);
        }
        let template_index = self.template_index_for(class, &job.template);
        let dim = Dim::dominant(&job.per_sandbox, &self.capacity);
        let class_index = self.classes[class].index;
        for index in template_index.into_iter().chain([class_index]) {
            self.indices[index].prepare(dim);
        }
        let mut ctx = JobCtx {
            job,
            tenant,
            class,
            template_index,
            dim,
            runs,
            cursor_run: 0,
            cursor_offset: 0,
        };

        let undo_mark = self.undo.len();
        let placements_mark = self.plan.placements.len();
        let preemptions_mark = self.plan.preemptions.len();
        let preempted_mark = self.preempted;
        let cursor_mark = ctx.cursor();

        let mut placed = self.place_runs(&mut ctx, target);
        if placed < target {
            placed += self.preempt_for(&mut ctx, target - placed);
        }

        if job.gang && placed < target {
            self.rollback(undo_mark);
            self.plan.placements.truncate(placements_mark);
            self.plan.preemptions.truncate(preemptions_mark);
            self.preempted = preempted_mark;
            ctx.reset_cursor(cursor_mark);
            return self.unplaced(
                job.id,
                wanted,
                Reason::GangDoesNotFit {
                    count: wanted,
                    placeable: placed,
                },
            );
        }
        self.undo.clear();
        if target < wanted {
            let reason = quota_reason(&self.tenants[tenant]);
            self.unplaced(job.id, wanted - target, reason);
        }
        if placed < target {
            let reason = self
                .shortage(&ctx)
                .reason(&job.per_sandbox, target - placed, wanted);
            self.unplaced(job.id, target - placed, reason);
        }
    }

    /// How many sandboxes of size `per` the tenant's quota still admits.
    fn quota_allows(&self, tenant: usize, per: &Resources) -> u64 {
        match self.tenants.get(tenant) {
            Some(Tenant {
                quota: Some(max),
                usage,
                ..
            }) => {
                if usage.fits_in(max) {
                    max.saturating_sub(*usage).count_fitting(per)
                } else {
                    0
                }
            }
            _ => u64::MAX,
        }
    }

    /// Shortage figures for the job's class, cached until a node changes.
    fn shortage(&mut self, ctx: &JobCtx<'_>) -> ClassShortage {
        let key = (ctx.class, ctx.job.per_sandbox);
        if let Some((epoch, s)) = self.shortage_cache.get(&key) {
            if *epoch == self.epoch {
                return s.clone();
            }
        }
        let nodes = &self.nodes;
        let state = &self.state;
        let s = ClassShortage::measure(
            self.classes[ctx.class].nodes.iter().map(|&n| {
                let st = state[n as usize];
                (nodes[n as usize], st.free, st.slots)
            }),
            &ctx.job.per_sandbox,
        );
        self.shortage_cache.insert(key, (self.epoch, s.clone()));
        s
    }

    pub(super) fn add_tenant_usage(&mut self, tenant: usize, delta: Resources, add: bool) {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return;
        };
        self.undo.push(Undo::Tenant {
            tenant,
            usage: t.usage,
        });
        t.usage = if add {
            t.usage.saturating_add(delta)
        } else {
            t.usage.saturating_sub(delta)
        };
        self.dirty_tenants.insert(tenant);
    }

    fn rollback(&mut self, mark: usize) {
        while self.undo.len() > mark {
            let Some(entry) = self.undo.pop() else { break };
            match entry {
                Undo::Node { node, state } => self.set_node(node, state, false),
                Undo::Alloc { alloc, count } => self.allocs[alloc as usize].count = count,
                Undo::Tenant { tenant, usage } => self.tenants[tenant].usage = usage,
            }
        }
    }

    /// Places `k` sandboxes of the job on `node` (which must have room) and records the runs.
    pub(super) fn place_on(&mut self, ctx: &mut JobCtx<'_>, node: u32, k: u64) {
        if k == 0 {
            return;
        }
        let per = ctx.job.per_sandbox;
        let st = self.state[node as usize];
        let used = per.saturating_mul(k);
        let slots = st
            .slots
            .saturating_sub(u32::try_from(k).unwrap_or(u32::MAX));
        self.set_node(
            node,
            NodeState {
                free: st.free.saturating_sub(used),
                slots,
            },
            true,
        );
        self.add_tenant_usage(ctx.tenant, used, true);
        let node_id = &self.nodes[node as usize].id;
        for run in ctx.take_indices(k) {
            self.plan.placements.push(Placement {
                job: ctx.job.id,
                node: node_id.clone(),
                first_index: run.first_index,
                count: run.count,
            });
        }
    }
}

fn in_cooldown(input: &PlacementInput, a: &Allocation) -> bool {
    input.preempted_at.get(&a.job).is_some_and(|&p| {
        input.at_index < p.saturating_add(input.params.preemption_cooldown_entries)
    })
}

/// Sorts and merges `pending`, then removes every index in `taken`. Runs past `u32::MAX` are clipped.
pub(crate) fn normalize_runs(pending: &[IndexRun], taken: &[IndexRun]) -> Vec<IndexRun> {
    // Common case: one clean run, nothing of the job running yet.
    if let ([run], []) = (pending, taken) {
        if run.count > 0 && run.end() <= u64::from(u32::MAX) {
            return vec![*run];
        }
    }
    let merge = |runs: &[IndexRun]| -> Vec<(u64, u64)> {
        let mut spans: Vec<(u64, u64)> = runs
            .iter()
            .filter(|r| r.count > 0)
            .map(|r| (u64::from(r.first_index), r.end().min(u64::from(u32::MAX))))
            .filter(|(s, e)| s < e)
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (s, e) in spans {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    };
    let pending = merge(pending);
    let taken = merge(taken);
    let mut out = Vec::with_capacity(pending.len());
    let mut t = 0;
    for (mut s, e) in pending {
        while t < taken.len() && taken[t].1 <= s {
            t += 1;
        }
        let mut j = t;
        while s < e {
            match taken.get(j) {
                Some(&(ts, te)) if ts < e => {
                    if ts > s {
                        out.push((s, ts));
                    }
                    s = s.max(te);
                    j += 1;
                }
                _ => {
                    out.push((s, e));
                    s = e;
                }
            }
        }
    }
    out.into_iter()
        .filter_map(|(s, e)| {
            let first = u32::try_from(s).ok()?;
            let count = u32::try_from(e - s).ok()?;
            Some(IndexRun::new(first, count))
        })
        .collect()
}
