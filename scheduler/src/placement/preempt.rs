//! Preemption: when a job does not fit, evict strictly lower-priority work so that it does.
//!
//! Rules, and why:
//!
//! - Only allocations of *strictly* lower priority, marked preemptible, and not in cool-down are
//!   victims. Equal priority never preempts, otherwise two equal jobs could evict each other forever.
//! - Cool-down: a job preempted at Raft index `p` is immune until `p + preemption_cooldown_entries`.
//!   Without it, a job that was evicted, rescheduled elsewhere and evicted again ping-pongs around the
//!   cluster — the "preemption storm" Kueue users report. Indices, not wall time, keep this pure.
//! - At most `max_preemptions_per_cycle` sandboxes are evicted per plan, so one bad plan cannot tear
//!   down the cluster.
//! - Victims on a node go lowest priority first; among equals, non-gang before gang (evicting a gang
//!   means evicting all of it), then the largest sandboxes first (fewest evictions for the room), then
//!   the newest job. Nodes are chosen by (highest victim priority, evictions per placed sandbox): the
//!   cheapest damage first.
//! - A gang victim is evicted whole, on every node, and counts whole against the bound: evicting part
//!   of a gang would leave a partial gang running.
//! - A gang preemptor preempts only if that makes the whole gang fit; the caller rolls back evictions
//!   and placements together otherwise.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeSet;

use crate::placement::engine::{Engine, JobCtx, NodeState, Undo, WorkAlloc};
use crate::placement::feasible;
use crate::placement::{Preemption, Resources};

/// Sort key of a node's allocations in victim order (see the module docs).
pub(crate) fn victim_order_key(
    a: &WorkAlloc,
    allocatable: &Resources,
) -> (i32, bool, Reverse<u64>, Reverse<u64>, Reverse<u32>) {
    let share = |used: u64, cap: u64| {
        if cap == 0 {
            0
        } else {
            u64::try_from(u128::from(used) * 1_000_000 / u128::from(cap)).unwrap_or(u64::MAX)
        }
    };
    let size = share(a.per.cpu_millis, allocatable.cpu_millis)
        .max(share(a.per.memory_mib, allocatable.memory_mib));
    (
        a.priority,
        a.gang,
        Reverse(size),
        Reverse(a.job),
        Reverse(a.first_index),
    )
}

/// What evicting on one node would achieve.
#[derive(Debug, Clone)]
struct NodeEviction {
    node: u32,
    place: u64,
    evictions: u64,
    max_priority: i32,
    /// (allocation, sandboxes evicted from its tail) for non-gang victims.
    partial: Vec<(u32, u32)>,
    /// Gang victims, evicted whole.
    gangs: Vec<u64>,
}

impl NodeEviction {
    /// Cheapest damage first: lowest highest-victim-priority, then fewest evictions per placed sandbox,
    /// then more placed, then node order.
    fn cmp_cost(&self, other: &NodeEviction) -> Ordering {
        let ratio =
            |a: &NodeEviction, b: &NodeEviction| u128::from(a.evictions) * u128::from(b.place);
        self.max_priority
            .cmp(&other.max_priority)
            .then_with(|| ratio(self, other).cmp(&ratio(other, self)))
            .then_with(|| other.place.cmp(&self.place))
            .then_with(|| self.node.cmp(&other.node))
    }
}

fn ceil_div(a: u64, b: u64) -> Option<u64> {
    if a == 0 {
        Some(0)
    } else if b == 0 {
        None
    } else {
        Some(a.div_ceil(b))
    }
}

impl Engine<'_> {
    fn can_be_victim(&self, a: &WorkAlloc, priority: i32) -> bool {
        a.eligible && a.count > 0 && a.priority < priority
    }

    fn gang_remaining(&self, job: u64) -> u64 {
        self.gang_allocs.get(&job).map_or(0, |ids| {
            ids.iter()
                .map(|&i| u64::from(self.allocs[i as usize].count))
                .sum()
        })
    }

    /// A gang victim is evictable only if every one of its allocations is.
    fn gang_evictable(&self, job: u64, priority: i32) -> bool {
        self.gang_allocs.get(&job).is_some_and(|ids| {
            ids.iter().all(|&i| {
                let a = &self.allocs[i as usize];
                a.count == 0 || self.can_be_victim(a, priority)
            })
        })
    }

    /// Evictions on `node` that let up to `want` sandboxes of the job fit, spending at most `budget`.
    fn simulate(
        &self,
        ctx: &JobCtx<'_>,
        node: u32,
        want: u64,
        budget: u64,
    ) -> Option<NodeEviction> {
        let per = ctx.job.per_sandbox;
        let priority = ctx.job.priority;
        let allocatable = self.nodes[node as usize].allocatable;
        let NodeState {
            mut free,
            mut slots,
        } = self.state[node as usize];
        let base = feasible::fits(&free, slots, &per);
        let mut out = NodeEviction {
            node,
            place: 0,
            evictions: 0,
            max_priority: i32::MIN,
            partial: Vec::new(),
            gangs: Vec::new(),
        };
        let mut gangs_seen: BTreeSet<u64> = BTreeSet::new();
        for &id in &self.allocs_by_node[node as usize] {
            if feasible::fits(&free, slots, &per) >= want || out.evictions >= budget {
                break;
            }
            let a = &self.allocs[id as usize];
            if !self.can_be_victim(a, priority) {
                continue;
            }
            let freed: u64;
            if a.gang {
                if !gangs_seen.insert(a.job) || !self.gang_evictable(a.job, priority) {
                    continue;
                }
                let cost = self.gang_remaining(a.job);
                if out.evictions + cost > budget {
                    continue;
                }
                // Everything of this gang on this node is freed at once.
                let mut here = Resources::ZERO;
                let mut here_count = 0u64;
                for &other in &self.allocs_by_node[node as usize] {
                    let o = &self.allocs[other as usize];
                    if o.job == a.job {
                        here = here.saturating_add(o.per.saturating_mul(u64::from(o.count)));
                        here_count += u64::from(o.count);
                    }
                }
                free = free.saturating_add(here);
                slots = slots.saturating_add(u32::try_from(here_count).unwrap_or(u32::MAX));
                out.evictions += cost;
                out.gangs.push(a.job);
                freed = here_count;
            } else {
                let need = per.saturating_mul(want).saturating_sub(free);
                let need_slots = want.saturating_sub(u64::from(slots));
                // Evict just enough of this run to cover the dimensions it can help with.
                let mut e = need_slots;
                if let Some(n) = ceil_div(need.cpu_millis, a.per.cpu_millis) {
                    e = e.max(n);
                }
                if let Some(n) = ceil_div(need.memory_mib, a.per.memory_mib) {
                    e = e.max(n);
                }
                let e = e.min(u64::from(a.count)).min(budget - out.evictions);
                if e == 0 {
                    continue;
                }
                free = free.saturating_add(a.per.saturating_mul(e));
                slots = slots.saturating_add(u32::try_from(e).unwrap_or(u32::MAX));
                out.evictions += e;
                out.partial.push((id, u32::try_from(e).unwrap_or(u32::MAX)));
                freed = e;
            }
            if freed > 0 {
                out.max_priority = out.max_priority.max(a.priority);
            }
            // A snapshot whose allocations claim more than `allocated` must not make room out of thin
            // air.
            free = Resources::new(
                free.cpu_millis.min(allocatable.cpu_millis),
                free.memory_mib.min(allocatable.memory_mib),
            );
        }
        out.place = feasible::fits(&free, slots, &per).min(want);
        (out.place > base && out.evictions > 0).then_some(out)
    }

    /// Evicts on nodes of the job's class to place up to `want` more sandboxes; returns how many were
    /// placed (including on capacity freed elsewhere by whole-gang evictions).
    pub(crate) fn preempt_for(&mut self, ctx: &mut JobCtx<'_>, want: u64) -> u64 {
        let budget_total = u64::from(self.input.params.max_preemptions_per_cycle);
        if self.preempted >= budget_total {
            return 0;
        }
        match self.min_victim_priority {
            Some(min) if min < ctx.job.priority => {}
            _ => return 0,
        }
        let budget = budget_total - self.preempted;
        let mut options: Vec<NodeEviction> = self.classes[ctx.class]
            .nodes
            .iter()
            .filter(|&&n| !self.allocs_by_node[n as usize].is_empty())
            .filter_map(|&n| self.simulate(ctx, n, want, budget))
            .collect();
        options.sort_by(NodeEviction::cmp_cost);

        let mut placed = 0;
        for option in options {
            let remaining = want - placed;
            let budget = budget_total.saturating_sub(self.preempted);
            if remaining == 0 || budget == 0 {
                break;
            }
            // Re-simulate on the current state; trim to what is actually reachable so no eviction is
            // wasted on a target the node cannot reach.
            let Some(mut plan) = self.simulate(ctx, option.node, remaining, budget) else {
                continue;
            };
            if plan.place < remaining {
                if let Some(trimmed) = self.simulate(ctx, option.node, plan.place, budget) {
                    if trimmed.place == plan.place {
                        plan = trimmed;
                    }
                }
            }
            let by_job = ctx.job.id;
            for &(alloc, e) in &plan.partial {
                self.evict(alloc, e, by_job);
            }
            for &job in &plan.gangs {
                let ids = self.gang_allocs.get(&job).cloned().unwrap_or_default();
                for alloc in ids {
                    let count = self.allocs[alloc as usize].count;
                    self.evict(alloc, count, by_job);
                }
            }
            let k = self
                .fits_on_node(option.node, &ctx.job.per_sandbox)
                .min(remaining);
            self.place_on(ctx, option.node, k);
            placed += k;
            if !plan.gangs.is_empty() && placed < want {
                // Whole-gang evictions freed room on other nodes too.
                placed += self.place_runs(ctx, want - placed);
            }
        }
        placed
    }

    fn fits_on_node(&self, node: u32, per: &Resources) -> u64 {
        let st = &self.state[node as usize];
        feasible::fits(&st.free, st.slots, per)
    }

    /// Evicts the last `count` sandboxes of an allocation and frees their room.
    fn evict(&mut self, alloc: u32, count: u32, by_job: u64) {
        let a = self.allocs[alloc as usize].clone();
        let count = count.min(a.count);
        if count == 0 {
            return;
        }
        self.undo.push(Undo::Alloc {
            alloc,
            count: a.count,
        });
        self.allocs[alloc as usize].count = a.count - count;
        let freed = a.per.saturating_mul(u64::from(count));
        let allocatable = self.nodes[a.node as usize].allocatable;
        let st = self.state[a.node as usize];
        let free = st.free.saturating_add(freed);
        let free = Resources::new(
            free.cpu_millis.min(allocatable.cpu_millis),
            free.memory_mib.min(allocatable.memory_mib),
        );
        self.set_node(
            a.node,
            NodeState {
                free,
                slots: st.slots.saturating_add(count),
            },
            true,
        );
        self.add_tenant_usage(a.tenant, freed, false);
        self.preempted += u64::from(count);
        self.plan.preemptions.push(Preemption {
            job: a.job,
            node: self.nodes[a.node as usize].id.clone(),
            first_index: a.first_index + (a.count - count),
            count,
            by_job,
        });
    }
}
