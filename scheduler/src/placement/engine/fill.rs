//! Choosing nodes for a job's runs: best fit (binpack) and spread, without preemption.

use std::collections::BTreeSet;

use crate::placement::{feasible, rank, Resources, Strategy};

use super::{Engine, JobCtx, CANDIDATES_MAX};

impl Engine<'_> {
    fn fits_on(&self, node: u32, per: &Resources) -> u64 {
        let st = &self.state[node as usize];
        feasible::fits(&st.free, st.slots, per)
    }

    fn holds_template(&self, ctx: &JobCtx<'_>, node: u32) -> bool {
        ctx.template_index
            .is_some_and(|t| self.memberships[node as usize].contains(&t))
    }

    fn score_run(&self, ctx: &JobCtx<'_>, node: u32, k: u64) -> u64 {
        let st = &self.state[node as usize];
        let free_after = st
            .free
            .saturating_sub(ctx.job.per_sandbox.saturating_mul(k));
        let holds = self.holds_template(ctx, node);
        rank::score(
            ctx.job.strategy,
            &free_after,
            &self.nodes[node as usize].allocatable,
            holds,
        )
    }

    /// Places up to `want` sandboxes without preemption; returns how many were placed.
    pub(in crate::placement) fn place_runs(&mut self, ctx: &mut JobCtx<'_>, want: u64) -> u64 {
        match ctx.job.strategy {
            Strategy::Binpack => self.place_binpack(ctx, want),
            Strategy::Spread => self.place_spread(ctx, want),
        }
    }

    /// Best fit: score a bounded set of the tightest-fitting nodes, fill the best one with one run,
    /// repeat. After its run a node is either full for this job or the job is done, so each iteration
    /// makes progress.
    fn place_binpack(&mut self, ctx: &mut JobCtx<'_>, want: u64) -> u64 {
        let per = ctx.job.per_sandbox;
        let class_index = self.classes[ctx.class].index;
        let mut placed = 0;
        // (node, how many fit)
        let mut candidates: Vec<(u32, u64)> = Vec::with_capacity(CANDIDATES_MAX);
        while placed < want {
            candidates.clear();
            let sources = [
                (ctx.template_index, CANDIDATES_MAX / 2),
                (Some(class_index), CANDIDATES_MAX),
            ];
            for (index, limit) in sources {
                let Some(index) = index else { continue };
                for n in self.indices[index].tightest(ctx.dim, &per) {
                    if candidates.len() >= limit {
                        break;
                    }
                    let fit = self.fits_on(n, &per);
                    if fit > 0 && !candidates.iter().any(|c| c.0 == n) {
                        candidates.push((n, fit));
                    }
                }
            }
            let remaining = want - placed;
            let best = candidates
                .iter()
                .map(|&(n, fit)| {
                    let k = fit.min(remaining);
                    (self.score_run(ctx, n, k), std::cmp::Reverse(n), k)
                })
                .max();
            let Some((_, std::cmp::Reverse(node), k)) = best else {
                break;
            };
            self.place_on(ctx, node, k);
            placed += k;
        }
        placed
    }

    /// Spread: take up to `want` of the emptiest fitting nodes (those holding the template first),
    /// rank them by spread score, and share the job between them round-robin — every node gets the
    /// same count, capped by what fits, the remainder one each to the best-ranked. If all of them fill
    /// up, take the next batch.
    fn place_spread(&mut self, ctx: &mut JobCtx<'_>, want: u64) -> u64 {
        let per = ctx.job.per_sandbox;
        let mut placed = 0;
        while placed < want {
            let remaining = want - placed;
            let limit = usize::try_from(remaining).unwrap_or(usize::MAX);
            let mut chosen: BTreeSet<u32> = BTreeSet::new();
            let mut candidates: Vec<u32> = Vec::new();
            let class_index = self.classes[ctx.class].index;
            for idx in ctx
                .template_index
                .into_iter()
                .chain(std::iter::once(class_index))
            {
                for n in self.indices[idx].emptiest(ctx.dim) {
                    if candidates.len() >= limit {
                        break;
                    }
                    if self.fits_on(n, &per) > 0 && chosen.insert(n) {
                        candidates.push(n);
                    }
                }
            }
            if candidates.is_empty() {
                break;
            }
            let mut ranked: Vec<(u64, u32, u64)> = candidates
                .iter()
                .map(|&n| (self.score_run(ctx, n, 1), n, self.fits_on(n, &per)))
                .collect();
            ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let fits: Vec<u64> = ranked.iter().map(|r| r.2).collect();
            let shares = water_fill(&fits, remaining);
            let mut round = 0;
            for ((_, node, _), share) in ranked.iter().zip(shares) {
                self.place_on(ctx, *node, share);
                round += share;
            }
            placed += round;
            if round == 0 {
                break;
            }
        }
        placed
    }
}

/// Round-robin shares: the largest level `L` such that `sum(min(fit_i, L)) <= total`, then one more to
/// each node with room, in order, until `total` is reached. `fits` is in rank order.
pub(super) fn water_fill(fits: &[u64], total: u64) -> Vec<u64> {
    let sum_at = |level: u64| {
        fits.iter()
            .fold(0u64, |acc, &f| acc.saturating_add(f.min(level)))
    };
    let (mut lo, mut hi) = (0u64, fits.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if sum_at(mid) <= total {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut shares: Vec<u64> = fits.iter().map(|&f| f.min(lo)).collect();
    let mut left = total.saturating_sub(shares.iter().sum());
    for (share, &fit) in shares.iter_mut().zip(fits) {
        if left == 0 {
            break;
        }
        if fit > *share {
            *share += 1;
            left -= 1;
        }
    }
    shares
}
