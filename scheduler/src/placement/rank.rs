//! Ranking: which feasible node is best for a run of sandboxes, and the free-capacity index that keeps
//! the search away from O(nodes) per run.
//!
//! # Scores
//!
//! The fit score is Nomad's `ScoreFitBinPack` / `ScoreFitSpread` (`nomad/structs/funcs.go`), which is the
//! "BestFit v3" formula from Google's datacenter scheduling work
//! (<http://www.columbia.edu/~cs2035/courses/ieor4405.S13/datacenter_scheduling.ppt>):
//!
//! ```text
//! free_cpu, free_mem = fraction of the node's allocatable left free AFTER placing the run, in [0, 1]
//! total   = 10^free_cpu + 10^free_mem                 in [2, 20]
//! binpack = 20 - total                                in [0, 18]   (18 = node ends exactly full)
//! spread  = total - 2                                 in [0, 18]   (18 = node stays empty)
//! ```
//!
//! The exponential punishes leaving one dimension idle: a node left at 10% cpu / 90% memory free scores
//! worse than one left at 50% / 50%, so best fit also balances the two dimensions. We evaluate the node
//! *after the whole run* `k = min(fits, remaining)` is placed, i.e. we prefer the node that ends fullest
//! (for identical sandboxes this equals Nomad's per-sandbox greedy choice, only without the loop).
//!
//! To stay deterministic across machines we use no floats: `10^x` comes from a 1,025-entry integer table
//! (x in steps of 1/1024) built at compile time with fixed-point arithmetic. The fit score is in
//! millionths of Nomad's unit, `0..=18_000_000`. The final score blends it with template locality, both
//! normalised to `0..=SCORE_MAX`:
//!
//! ```text
//! score = (3 * fit * SCORE_MAX / 18_000_000 + 1 * (SCORE_MAX if node holds the template else 0)) / 4
//! ```
//!
//! so locality is worth a quarter of the range: it wins between nodes of similar fit, but a node that is
//! a much better fit (by more than a third of the fit range) still wins without the template.

use std::collections::BTreeSet;

use crate::placement::{Resources, Strategy};

/// Upper bound of [`score`].
pub(crate) const SCORE_MAX: u64 = 1_000_000;
/// Upper bound of the fit part, Nomad's 18.0 in millionths.
pub(crate) const FIT_SCORE_MAX: u64 = 18_000_000;
const LOCALITY_WEIGHT: u64 = 1;
const FIT_WEIGHT: u64 = 3;

const POW10_STEPS: u64 = 1024;
/// 10^(1/1024) in Q48 fixed point.
const POW10_STEP_Q48: u128 = 282_108_618_623_976;

/// `POW10_PPM[k] = round(10^(k/1024) * 1e6)`, k in 0..=1024.
static POW10_PPM: [u64; 1025] = build_pow10_table();

const fn build_pow10_table() -> [u64; 1025] {
    let mut table = [0u64; 1025];
    let one_q48: u128 = 1 << 48;
    let mut acc: u128 = one_q48;
    let mut k = 0;
    while k <= 1024 {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "round(10^(k/1024) * 1e6) is at most 1e7; try_from is not const"
        )]
        let ppm = ((acc * 1_000_000 + (one_q48 >> 1)) >> 48) as u64;
        table[k] = ppm;
        acc = (acc * POW10_STEP_Q48 + (one_q48 >> 1)) >> 48;
        k += 1;
    }
    table
}

/// Free fraction of one dimension in 1/1024 steps, rounded down. A dimension the node does not have at
/// all counts as full (it cannot make the node look emptier than it is).
fn free_steps(free: u64, capacity: u64) -> usize {
    if capacity == 0 {
        return 0;
    }
    let free = free.min(capacity);
    let steps = match free.checked_mul(POW10_STEPS) {
        Some(scaled) => scaled / capacity,
        // At most POW10_STEPS because `free <= capacity`.
        None => u64::try_from((u128::from(free) * u128::from(POW10_STEPS)) / u128::from(capacity))
            .unwrap_or(POW10_STEPS),
    };
    // `steps <= 1024` because `free <= capacity`.
    steps.min(POW10_STEPS) as usize
}

fn pow10_total(free_after: &Resources, allocatable: &Resources) -> u64 {
    let cpu = free_steps(free_after.cpu_millis, allocatable.cpu_millis);
    let mem = free_steps(free_after.memory_mib, allocatable.memory_mib);
    POW10_PPM[cpu] + POW10_PPM[mem]
}

/// Nomad `ScoreFitBinPack`, in millionths: `0..=FIT_SCORE_MAX`, higher when the node ends fuller.
pub(crate) fn binpack_fit(free_after: &Resources, allocatable: &Resources) -> u64 {
    20_000_000u64
        .saturating_sub(pow10_total(free_after, allocatable))
        .min(FIT_SCORE_MAX)
}

/// Nomad `ScoreFitSpread`, in millionths: `0..=FIT_SCORE_MAX`, higher when the node stays emptier.
pub(crate) fn spread_fit(free_after: &Resources, allocatable: &Resources) -> u64 {
    pow10_total(free_after, allocatable)
        .saturating_sub(2_000_000)
        .min(FIT_SCORE_MAX)
}

/// Final bounded score in `0..=SCORE_MAX`; see the module docs for the formula.
pub(crate) fn score(
    strategy: Strategy,
    free_after: &Resources,
    allocatable: &Resources,
    holds_template: bool,
) -> u64 {
    let fit = match strategy {
        Strategy::Binpack => binpack_fit(free_after, allocatable),
        Strategy::Spread => spread_fit(free_after, allocatable),
    };
    let fit_norm = fit * SCORE_MAX / FIT_SCORE_MAX;
    let locality = if holds_template { SCORE_MAX } else { 0 };
    (FIT_WEIGHT * fit_norm + LOCALITY_WEIGHT * locality) / (FIT_WEIGHT + LOCALITY_WEIGHT)
}

/// Which dimension a job's index scan is ordered by: its dominant one relative to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    Cpu,
    Memory,
}

impl Dim {
    /// The dimension in which `per` is the larger share of `capacity` (cpu on a tie).
    pub(crate) fn dominant(per: &Resources, capacity: &Resources) -> Dim {
        let cpu = u128::from(per.cpu_millis) * u128::from(capacity.memory_mib);
        let mem = u128::from(per.memory_mib) * u128::from(capacity.cpu_millis);
        if cpu >= mem {
            Dim::Cpu
        } else {
            Dim::Memory
        }
    }
}

/// Nodes ordered by free capacity, by (free cpu, free memory) and — built on first use, since most
/// jobs are CPU-dominant — by (free memory, free cpu).
///
/// Best fit wants "the node with the least free that still fits": a range scan from the job's size
/// upward in its dominant dimension, so nodes that are too full are never visited. Spread wants the
/// emptiest: the same sets scanned from the top. Updating one node is two `O(log n)` operations per
/// ordering per index holding it. Only nodes with a free cap slot are present.
#[derive(Debug, Default)]
pub(crate) struct FreeIndex {
    by_cpu: BTreeSet<(u64, u64, u32)>,
    by_mem: Option<BTreeSet<(u64, u64, u32)>>,
}

impl FreeIndex {
    pub(crate) fn build(entries: &[(u32, Resources)]) -> FreeIndex {
        let mut by_cpu: Vec<(u64, u64, u32)> = entries
            .iter()
            .map(|(n, r)| (r.cpu_millis, r.memory_mib, *n))
            .collect();
        // Sorted input lets `BTreeSet::from_iter` bulk-build instead of inserting one by one.
        by_cpu.sort_unstable();
        FreeIndex {
            by_cpu: by_cpu.into_iter().collect(),
            by_mem: None,
        }
    }

    /// Makes sure the ordering for `dim` exists (call before scanning by it).
    pub(crate) fn prepare(&mut self, dim: Dim) {
        if dim == Dim::Memory && self.by_mem.is_none() {
            let mut by_mem: Vec<(u64, u64, u32)> =
                self.by_cpu.iter().map(|&(c, m, n)| (m, c, n)).collect();
            by_mem.sort_unstable();
            self.by_mem = Some(by_mem.into_iter().collect());
        }
    }

    pub(crate) fn insert(&mut self, node: u32, free: Resources) {
        self.by_cpu.insert((free.cpu_millis, free.memory_mib, node));
        if let Some(by_mem) = &mut self.by_mem {
            by_mem.insert((free.memory_mib, free.cpu_millis, node));
        }
    }

    pub(crate) fn remove(&mut self, node: u32, free: Resources) {
        self.by_cpu
            .remove(&(free.cpu_millis, free.memory_mib, node));
        if let Some(by_mem) = &mut self.by_mem {
            by_mem.remove(&(free.memory_mib, free.cpu_millis, node));
        }
    }

    /// The ordering for `dim`; falls back to cpu order if `prepare` was not called.
    fn ordering(&self, dim: Dim) -> (&BTreeSet<(u64, u64, u32)>, Dim) {
        match (dim, &self.by_mem) {
            (Dim::Memory, Some(by_mem)) => (by_mem, Dim::Memory),
            _ => (&self.by_cpu, Dim::Cpu),
        }
    }

    /// Nodes whose free capacity in `dim` is at least `min`'s, tightest first.
    pub(crate) fn tightest(&self, dim: Dim, min: &Resources) -> impl Iterator<Item = u32> + '_ {
        let (set, dim) = self.ordering(dim);
        let start = match dim {
            Dim::Cpu => min.cpu_millis,
            Dim::Memory => min.memory_mib,
        };
        set.range((start, 0, 0)..).map(|e| e.2)
    }

    /// Nodes from the most free in `dim` down.
    pub(crate) fn emptiest(&self, dim: Dim) -> impl Iterator<Item = u32> + '_ {
        self.ordering(dim).0.iter().rev().map(|e| e.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow10_table_matches_float_within_one_ppm() {
        for k in 0..=1024u32 {
            let exact = 10f64.powf(f64::from(k) / 1024.0) * 1e6;
            let got = POW10_PPM[k as usize] as f64;
            assert!((got - exact).abs() <= 1.0, "k={k}: {got} vs {exact}");
        }
    }

    #[test]
    fn binpack_bounds_full_and_empty() {
        let cap = Resources::new(128_000, 512 * 1024);
        assert_eq!(binpack_fit(&Resources::ZERO, &cap), FIT_SCORE_MAX);
        assert_eq!(binpack_fit(&cap, &cap), 0);
        assert_eq!(spread_fit(&cap, &cap), FIT_SCORE_MAX);
        assert_eq!(spread_fit(&Resources::ZERO, &cap), 0);
    }

    #[test]
    fn binpack_prefers_balanced_leftover() {
        let cap = Resources::new(100_000, 100_000);
        // Same total free, one balanced, one skewed: the exponential makes the skewed one worse.
        let balanced = binpack_fit(&Resources::new(50_000, 50_000), &cap);
        let skewed = binpack_fit(&Resources::new(10_000, 90_000), &cap);
        assert!(balanced > skewed, "{balanced} <= {skewed}");
    }

    #[test]
    fn locality_weighs_a_quarter() {
        let cap = Resources::new(100_000, 100_000);
        let free = Resources::new(50_000, 50_000);
        let without = score(Strategy::Binpack, &free, &cap, false);
        let with = score(Strategy::Binpack, &free, &cap, true);
        assert_eq!(with - without, SCORE_MAX / 4);
        assert!(score(Strategy::Binpack, &Resources::ZERO, &cap, true) <= SCORE_MAX);
    }

    #[test]
    fn index_scans_tightest_and_emptiest() {
        let idx = FreeIndex::build(&[
            (0, Resources::new(4_000, 100)),
            (1, Resources::new(1_000, 100)),
            (2, Resources::new(8_000, 100)),
            (3, Resources::new(500, 100)),
        ]);
        let tight: Vec<u32> = idx.tightest(Dim::Cpu, &Resources::new(1_000, 0)).collect();
        assert_eq!(tight, vec![1, 0, 2]);
        let empty: Vec<u32> = idx.emptiest(Dim::Cpu).collect();
        assert_eq!(empty, vec![2, 0, 1, 3]);
        let mut idx = idx;
        idx.prepare(Dim::Memory);
        idx.remove(1, Resources::new(1_000, 100));
        idx.insert(1, Resources::new(1_000, 900));
        let by_mem: Vec<u32> = idx.tightest(Dim::Memory, &Resources::new(0, 200)).collect();
        assert_eq!(by_mem, vec![1]);
    }
}
