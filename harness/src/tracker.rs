//! One burst followed to its end: when it was all placed, when 50/90/99% and then all of it had
//! started, and when all of it had finished. `surge bench burst` and `surge dev --demo` both
//! count with this, so "running" and "done" mean the same in both (they used to differ: the
//! demo's "done" ignored stopped sandboxes, the bench waited for exactly N running).
//!
//! Pure: the caller feeds it counts and the time since submission.

use surge_proto::jobs::Counts;

/// Shares of a burst whose start times are recorded: a slow tail (a few starved nodes) looks
/// different from a slow pipeline.
pub const STARTED_SHARES: [f64; 3] = [0.5, 0.9, 0.99];

#[derive(Clone, Debug, Default)]
pub struct BurstTracker {
    pub count: u32,
    /// Seconds from submission until nothing was pending.
    pub placed_s: Option<f64>,
    /// Seconds until each share of [`STARTED_SHARES`] had started (running or finished).
    pub started_share_s: [Option<f64>; 3],
    /// Seconds until every sandbox had started (running or finished).
    pub started_s: Option<f64>,
    /// Seconds until every sandbox had finished ([`Counts::finished`]).
    pub done_s: Option<f64>,
    /// The latest counts.
    pub last: Counts,
}

impl BurstTracker {
    pub fn new(count: u32) -> BurstTracker {
        BurstTracker {
            count,
            ..Default::default()
        }
    }

    /// Sandboxes that have started: running now, paused, or finished.
    pub fn started(c: &Counts) -> u32 {
        c.running + c.paused + c.finished()
    }

    /// Record the counts seen `elapsed_s` seconds after submission.
    pub fn update(&mut self, elapsed_s: f64, c: Counts) {
        let started = Self::started(&c);
        if self.placed_s.is_none() && c.pending == 0 {
            self.placed_s = Some(elapsed_s);
        }
        for (at, share) in self.started_share_s.iter_mut().zip(STARTED_SHARES) {
            if at.is_none() && f64::from(started) >= share * f64::from(self.count) {
                *at = Some(elapsed_s);
            }
        }
        if self.started_s.is_none() && started >= self.count {
            self.started_s = Some(elapsed_s);
        }
        if self.done_s.is_none() && c.finished() >= self.count {
            self.done_s = Some(elapsed_s);
        }
        self.last = c;
    }

    /// A progress bar: `#` finished, `=` running, `-` placed, `.` pending.
    pub fn bar(&self, label: &str) -> String {
        let c = self.last;
        let finished = c.finished();
        let width = 30u64;
        let total = u64::from(self.count.max(1));
        let placed = u64::from(self.count - c.pending.min(self.count));
        let fill = |n: u64| usize::try_from(n.min(total) * width / total).unwrap_or(0);
        let (d, r, p) = (
            fill(u64::from(finished)),
            fill(u64::from(c.running)),
            fill(placed),
        );
        let bar: String = (0..30usize)
            .map(|i| {
                if i < d {
                    '#'
                } else if i < d + r {
                    '='
                } else if i < p {
                    '-'
                } else {
                    '.'
                }
            })
            .collect();
        format!(
            "{label:<5} [{bar}] placed {placed:>7}  running {:>7}  done {finished:>7}/{}",
            c.running, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pending: u32, running: u32, succeeded: u32, stopped: u32) -> Counts {
        Counts {
            pending,
            running,
            succeeded,
            stopped,
            ..Default::default()
        }
    }

    #[test]
    fn milestones_are_reached_once_in_order() {
        let mut t = BurstTracker::new(10);
        t.update(0.1, counts(10, 0, 0, 0));
        assert_eq!(t.placed_s, None);
        t.update(0.2, counts(0, 5, 0, 0));
        assert_eq!(t.placed_s, Some(0.2));
        assert_eq!(t.started_share_s, [Some(0.2), None, None]);
        t.update(0.3, counts(0, 10, 0, 0));
        assert_eq!(t.started_s, Some(0.3));
        assert_eq!(t.started_share_s, [Some(0.2), Some(0.3), Some(0.3)]);
        t.update(0.4, counts(0, 3, 7, 0));
        assert_eq!(t.done_s, None);
        t.update(0.5, counts(0, 0, 10, 0));
        assert_eq!(t.done_s, Some(0.5));
        t.update(0.6, counts(0, 0, 10, 0));
        assert_eq!(
            (t.placed_s, t.started_s, t.done_s),
            (Some(0.2), Some(0.3), Some(0.5))
        );
    }

    #[test]
    fn stopped_oom_killed_and_lost_sandboxes_are_done() {
        // The old demo counted succeeded+failed+oom+lost+cancelled: a stopped job never ended.
        let mut t = BurstTracker::new(4);
        let c = Counts {
            succeeded: 1,
            stopped: 1,
            oom_killed: 1,
            lost: 1,
            ..Default::default()
        };
        t.update(1.0, c);
        assert_eq!(t.done_s, Some(1.0));
        assert_eq!(t.started_s, Some(1.0));
        assert!(t.bar("x").contains("done       4/4"), "{}", t.bar("x"));
    }

    #[test]
    fn preemptions_are_not_finished_sandboxes() {
        let mut t = BurstTracker::new(2);
        let c = Counts {
            pending: 2,
            preempted: 2,
            ..Default::default()
        };
        t.update(1.0, c);
        assert_eq!(t.done_s, None);
        assert_eq!(t.started_s, None);
    }
}
