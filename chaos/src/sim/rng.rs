//! The simulator's one source of randomness: SplitMix64, seeded from the run's seed.
//!
//! Small, fast and fully specified (Steele, Lea, Flood: "Fast splittable pseudorandom number
//! generators", OOPSLA 2014), so a seed means the same run on every platform and every version
//! of every dependency. Statistical quality is far beyond what fault scheduling needs.

/// A seeded pseudo-random generator.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        // Modulo bias is below 2^-40 for the spans used here; irrelevant for fault scheduling.
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.range(0, 1000) < per_mille
    }

    /// Uniform in `0..len` (0 when `len` is 0): an index into `len` items. Draws exactly what
    /// `range(0, len)` draws, so a seed's stream is unchanged.
    pub fn index(&mut self, len: usize) -> usize {
        let i = self.range(0, len as u64);
        // `i < len` (or 0), so it fits in a usize.
        usize::try_from(i).unwrap_or(0)
    }

    /// One element of a non-empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.index(items.len());
        Some(items[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_seeds_differ() {
        let a: Vec<u64> = {
            let mut r = SimRng::new(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SimRng::new(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = SimRng::new(8);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn range_stays_in_bounds() {
        let mut r = SimRng::new(1);
        for _ in 0..10_000 {
            let v = r.range(5, 9);
            assert!((5..9).contains(&v));
        }
        assert_eq!(r.range(3, 3), 3);
        assert_eq!(r.pick::<u8>(&[]), None);
    }
}
