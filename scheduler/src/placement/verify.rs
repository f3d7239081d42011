//! The plan applier's re-check (Nomad `nomad/plan_apply.go`): a plan computed at an older snapshot is
//! checked against the newest state, and only what still fits is kept.
//!
//! Jobs are checked in plan order. For each job, its preemptions are applied first (only those whose
//! victims are still running: a victim that already finished freed its room by itself), then its
//! placements, each against the node's current free capacity, cap, schedulability and the job's
//! constraints, the tenant's quota, and the job's still-pending indices. A gang job keeps all of its
//! placements or none. A preemption is kept only if its preemptor kept a placement on that node — an
//! eviction that buys nothing is not worth doing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::placement::engine::normalize_runs;
use crate::placement::feasible;
use crate::placement::{
    IndexRun, JobRequest, NodeView, Placement, PlacementInput, Plan, Preemption, Resources,
};

/// Result of [`verify`]: the part of the plan that may be committed, and what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// `at_index` is the index of the state it was verified against; `unplaced` is carried over.
    pub accepted: Plan,
    pub rejected: Vec<Rejected>,
    pub dropped_preemptions: Vec<Preemption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub placement: Placement,
    pub reason: RejectReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    UnknownNode,
    NodeUnschedulable,
    ConstraintsNotMet,
    NoLongerFits {
        free: Resources,
        needs: Resources,
    },
    NodeCap {
        max: u32,
    },
    /// The job is no longer pending (cancelled or already placed).
    JobNotPending,
    /// Some of the indices are no longer pending (placed by another plan, or twice in this one).
    IndicesNotPending,
    TenantQuota {
        tenant: String,
    },
    /// Another part of the same gang was rejected.
    GangIncomplete,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::UnknownNode => write!(f, "node is gone"),
            RejectReason::NodeUnschedulable => write!(f, "node is down or draining"),
            RejectReason::ConstraintsNotMet => {
                write!(f, "node no longer meets the job's constraints")
            }
            RejectReason::NoLongerFits { free, needs } => {
                write!(f, "node has {free} free, placement needs {needs}")
            }
            RejectReason::NodeCap { max } => write!(f, "node cap of {max} sandboxes reached"),
            RejectReason::JobNotPending => write!(f, "job is no longer pending"),
            RejectReason::IndicesNotPending => write!(f, "sandboxes are no longer pending"),
            RejectReason::TenantQuota { tenant } => write!(f, "tenant {tenant} quota exceeded"),
            RejectReason::GangIncomplete => write!(f, "another part of the gang was rejected"),
        }
    }
}

/// A running allocation run that a preemption may remove.
#[derive(Debug, Clone)]
struct Alive {
    run: IndexRun,
    per: Resources,
    tenant: String,
    gang: bool,
}

/// The newest state as verify consumes it.
#[derive(Debug, Default)]
struct Room {
    /// Node id -> (free, free cap slots).
    nodes: BTreeMap<String, (Resources, u32)>,
    usage: BTreeMap<String, Resources>,
    alive: BTreeMap<(u64, String), Vec<Alive>>,
    pending: BTreeMap<u64, Vec<IndexRun>>,
}

/// Keeps the placements of `plan` that still fit in `current` (the newest state), drops the rest.
/// Pure; see the module docs for the rules.
pub fn verify(plan: &Plan, current: &PlacementInput) -> Verified {
    let mut sorted: Vec<&NodeView> = current.nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.dedup_by(|b, a| a.id == b.id);
    let nodes: BTreeMap<&str, &NodeView> = sorted.into_iter().map(|n| (n.id.as_str(), n)).collect();
    let mut base = Room {
        nodes: nodes
            .iter()
            .map(|(id, n)| (id.to_string(), (n.free(), n.free_slots())))
            .collect(),
        ..Room::default()
    };
    let mut allocated: BTreeMap<u64, Vec<IndexRun>> = BTreeMap::new();
    for a in &current.allocations {
        let u = base.usage.entry(a.tenant.clone()).or_default();
        *u = u.saturating_add(a.per_sandbox.saturating_mul(u64::from(a.count)));
        base.alive
            .entry((a.job, a.node.clone()))
            .or_default()
            .push(Alive {
                run: IndexRun::new(a.first_index, a.count),
                per: a.per_sandbox,
                tenant: a.tenant.clone(),
                gang: a.gang,
            });
        allocated
            .entry(a.job)
            .or_default()
            .push(IndexRun::new(a.first_index, a.count));
    }
    let mut jobs: BTreeMap<u64, &JobRequest> = BTreeMap::new();
    for j in &current.pending {
        jobs.entry(j.id).or_insert(j);
    }
    for (id, j) in &jobs {
        let taken = allocated.get(id).map(Vec::as_slice).unwrap_or(&[]);
        base.pending.insert(*id, normalize_runs(&j.pending, taken));
    }

    // Jobs in the order they first appear in the plan.
    let mut order: Vec<u64> = Vec::new();
    let mut by_job: BTreeMap<u64, (Vec<&Placement>, Vec<&Preemption>)> = BTreeMap::new();
    for (job, placement, preemption) in plan
        .placements
        .iter()
        .map(|p| (p.job, Some(p), None))
        .chain(plan.preemptions.iter().map(|p| (p.by_job, None, Some(p))))
    {
        let entry = by_job.entry(job).or_insert_with(|| {
            order.push(job);
            (Vec::new(), Vec::new())
        });
        entry.0.extend(placement);
        entry.1.extend(preemption);
    }

    let mut out = Verified {
        accepted: Plan {
            at_index: current.at_index,
            unplaced: plan.unplaced.clone(),
            ..Plan::default()
        },
        ..Verified::default()
    };
    for job_id in order {
        let Some((placements, preemptions)) = by_job.remove(&job_id) else {
            continue;
        };
        verify_job(
            job_id,
            jobs.get(&job_id).copied(),
            &placements,
            &preemptions,
            &nodes,
            current,
            &mut base,
            &mut out,
        );
    }
    out
}

/// Checks one job's preemptions and placements against `base`, commits what is kept.
#[allow(clippy::too_many_arguments)]
fn verify_job(
    job_id: u64,
    job: Option<&JobRequest>,
    placements: &[&Placement],
    preemptions: &[&Preemption],
    nodes: &BTreeMap<&str, &NodeView>,
    current: &PlacementInput,
    base: &mut Room,
    out: &mut Verified,
) {
    // 1. Evictions whose victims still run free room, tentatively. They do not lower any tenant's
    //    usage until committed, so quota checks below are conservative and independent of which
    //    evictions are kept.
    let mut room: BTreeMap<&str, (Resources, u32)> = BTreeMap::new();
    let mut alive: BTreeMap<(u64, &str), Vec<Alive>> = BTreeMap::new();
    // (eviction, victim is a gang, room it frees)
    let mut valid: Vec<(&Preemption, bool, Resources)> = Vec::new();
    for &p in preemptions {
        let key = (p.job, p.node.clone());
        let runs = alive
            .entry((p.job, p.node.as_str()))
            .or_insert_with(|| base.alive.get(&key).cloned().unwrap_or_default());
        let victim = IndexRun::new(p.first_index, p.count);
        let (Some(pos), Some(node), Some(&(free, slots))) = (
            runs.iter().position(|a| contains(&a.run, &victim)),
            nodes.get(p.node.as_str()),
            room.get(p.node.as_str())
                .or_else(|| base.nodes.get(&p.node)),
        ) else {
            out.dropped_preemptions.push(p.clone());
            continue;
        };
        let a = runs.remove(pos);
        runs.extend(split_off(&a, &victim));
        let freed = a.per.saturating_mul(u64::from(p.count));
        let free = cap_at(free.saturating_add(freed), &node.allocatable);
        room.insert(p.node.as_str(), (free, slots.saturating_add(p.count)));
        valid.push((p, a.gang, freed));
    }

    // 2. Placements, in order.
    let mut pending = base.pending.get(&job_id).cloned().unwrap_or_default();
    let mut added = Resources::ZERO;
    let mut accepted: Vec<&Placement> = Vec::new();
    let mut rejected: Vec<(&Placement, RejectReason)> = Vec::new();
    for &p in placements {
        match check(p, job, nodes, &mut room, base, added, current, &mut pending) {
            Ok(needs) => {
                added = added.saturating_add(needs);
                accepted.push(p);
            }
            Err(reason) => rejected.push((p, reason)),
        }
    }
    if job.is_some_and(|j| j.gang) && !rejected.is_empty() {
        rejected.extend(
            accepted
                .drain(..)
                .map(|p| (p, RejectReason::GangIncomplete)),
        );
        let position = |p: &Placement| placements.iter().position(|q| *q == p);
        rejected.sort_by_key(|(p, _)| position(p));
    }

    // 3. Keep an eviction only where the preemptor kept a placement on that node — except that a gang
    //    victim is evicted on all its nodes or none, so if one of its evictions is kept, all are.
    let mut kept_nodes: Vec<&str> = accepted.iter().map(|p| p.node.as_str()).collect();
    kept_nodes.sort_unstable();
    kept_nodes.dedup();
    let on_kept = |p: &Preemption| kept_nodes.binary_search(&p.node.as_str()).is_ok();
    let kept_gangs: BTreeSet<u64> = valid
        .iter()
        .filter(|(p, gang, _)| *gang && on_kept(p))
        .map(|(p, _, _)| p.job)
        .collect();
    let (useful, useless): (Vec<_>, Vec<_>) = valid
        .into_iter()
        .partition(|(p, _, _)| on_kept(p) || kept_gangs.contains(&p.job));
    out.dropped_preemptions
        .extend(useless.into_iter().map(|(p, _, _)| p.clone()));

    // 4. Commit. Room of the kept nodes includes their evictions (all useful) and placements; on other
    //    nodes only the kept (gang) evictions free room.
    for node in &kept_nodes {
        if let Some(r) = room.get(node) {
            base.nodes.insert((*node).to_string(), *r);
        }
    }
    for (p, _, freed) in &useful {
        if on_kept(p) {
            continue;
        }
        let allocatable = nodes
            .get(p.node.as_str())
            .map_or(Resources::ZERO, |n| n.allocatable);
        if let Some((free, slots)) = base.nodes.get_mut(&p.node) {
            *free = cap_at(free.saturating_add(*freed), &allocatable);
            *slots = slots.saturating_add(p.count);
        }
    }
    let useful: Vec<&Preemption> = useful.into_iter().map(|(p, _, _)| p).collect();
    for p in &useful {
        let key = (p.job, p.node.clone());
        let Some(runs) = base.alive.get_mut(&key) else {
            continue;
        };
        let victim = IndexRun::new(p.first_index, p.count);
        if let Some(pos) = runs.iter().position(|a| contains(&a.run, &victim)) {
            let a = runs.remove(pos);
            let freed = a.per.saturating_mul(u64::from(p.count));
            runs.extend(split_off(&a, &victim));
            if let Some(u) = base.usage.get_mut(&a.tenant) {
                *u = u.saturating_sub(freed);
            }
        }
    }
    if !accepted.is_empty() {
        if let Some(j) = job {
            let u = base.usage.entry(j.tenant.clone()).or_default();
            *u = u.saturating_add(added);
        }
        base.pending.insert(job_id, pending);
    }
    out.accepted
        .placements
        .extend(accepted.into_iter().cloned());
    out.accepted.preemptions.extend(useful.into_iter().cloned());
    out.rejected
        .extend(rejected.into_iter().map(|(p, reason)| Rejected {
            placement: p.clone(),
            reason,
        }));
}

fn cap_at(r: Resources, cap: &Resources) -> Resources {
    Resources::new(
        r.cpu_millis.min(cap.cpu_millis),
        r.memory_mib.min(cap.memory_mib),
    )
}

fn contains(outer: &IndexRun, inner: &IndexRun) -> bool {
    inner.count > 0 && outer.first_index <= inner.first_index && inner.end() <= outer.end()
}

/// What remains of `a` after removing `victim` (which it contains): up to two runs.
fn split_off(a: &Alive, victim: &IndexRun) -> Vec<Alive> {
    let mut rest = Vec::new();
    if victim.first_index > a.run.first_index {
        let run = IndexRun::new(a.run.first_index, victim.first_index - a.run.first_index);
        rest.push(Alive { run, ..a.clone() });
    }
    if victim.end() < a.run.end() {
        // Both ends lie inside `a.run`, whose indices are u32.
        let first = u32::try_from(victim.end()).unwrap_or(u32::MAX);
        let count = u32::try_from(a.run.end() - victim.end()).unwrap_or(0);
        rest.push(Alive {
            run: IndexRun::new(first, count),
            ..a.clone()
        });
    }
    rest
}

/// One placement against the node's current room (`room` over `base`), the job's constraints and
/// pending indices, and the tenant's quota. On success consumes room and indices and returns the
/// resources used.
#[allow(clippy::too_many_arguments)]
fn check<'p>(
    p: &'p Placement,
    job: Option<&JobRequest>,
    nodes: &BTreeMap<&str, &NodeView>,
    room: &mut BTreeMap<&'p str, (Resources, u32)>,
    base: &Room,
    added: Resources,
    current: &PlacementInput,
    pending: &mut Vec<IndexRun>,
) -> Result<Resources, RejectReason> {
    let job = job.ok_or(RejectReason::JobNotPending)?;
    let node = nodes
        .get(p.node.as_str())
        .ok_or(RejectReason::UnknownNode)?;
    if !feasible::schedulable(node) {
        return Err(RejectReason::NodeUnschedulable);
    }
    if !feasible::satisfies_all(node, &job.constraints) {
        return Err(RejectReason::ConstraintsNotMet);
    }
    let want = IndexRun::new(p.first_index, p.count);
    let pos = pending
        .iter()
        .position(|r| contains(r, &want))
        .ok_or(RejectReason::IndicesNotPending)?;
    let (free, slots) = room
        .get(p.node.as_str())
        .or_else(|| base.nodes.get(&p.node))
        .copied()
        .ok_or(RejectReason::UnknownNode)?;
    if slots < p.count {
        return Err(RejectReason::NodeCap {
            max: node.max_sandboxes.unwrap_or(0),
        });
    }
    let needs = job.per_sandbox.saturating_mul(u64::from(p.count));
    if !needs.fits_in(&free) {
        return Err(RejectReason::NoLongerFits { free, needs });
    }
    if let Some(q) = current.quotas.get(&job.tenant) {
        let used = base.usage.get(&job.tenant).copied().unwrap_or_default();
        if !used
            .saturating_add(added)
            .saturating_add(needs)
            .fits_in(&q.max)
        {
            return Err(RejectReason::TenantQuota {
                tenant: job.tenant.clone(),
            });
        }
    }
    room.insert(
        p.node.as_str(),
        (free.saturating_sub(needs), slots - p.count),
    );
    let run = pending.remove(pos);
    let whole = Alive {
        run,
        per: Resources::ZERO,
        tenant: String::new(),
        gang: false,
    };
    pending.extend(split_off(&whole, &want).into_iter().map(|a| a.run));
    pending.sort_unstable();
    Ok(needs)
}
