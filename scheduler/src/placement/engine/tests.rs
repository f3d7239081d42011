use super::fill::water_fill;
use super::*;
use crate::placement::Strategy;

#[test]
fn normalize_merges_and_subtracts() {
    let pending = [
        IndexRun::new(10, 5),
        IndexRun::new(0, 4),
        IndexRun::new(3, 3),
        IndexRun::new(20, 0),
    ];
    assert_eq!(
        normalize_runs(&pending, &[]),
        vec![IndexRun::new(0, 6), IndexRun::new(10, 5)]
    );
    let taken = [IndexRun::new(2, 2), IndexRun::new(12, 10)];
    assert_eq!(
        normalize_runs(&pending, &taken),
        vec![
            IndexRun::new(0, 2),
            IndexRun::new(4, 2),
            IndexRun::new(10, 2)
        ]
    );
}

#[test]
fn water_fill_is_round_robin_capped_by_fit() {
    assert_eq!(water_fill(&[10, 10, 10], 7), vec![3, 2, 2]);
    assert_eq!(water_fill(&[1, 10, 10], 7), vec![1, 3, 3]);
    assert_eq!(water_fill(&[1, 2], 10), vec![1, 2]);
    assert_eq!(water_fill(&[5, 5, 5], 2), vec![1, 1, 0]);
}

#[test]
fn take_indices_spans_runs() {
    let job = JobRequest {
        id: 1,
        tenant: "t".into(),
        priority: 0,
        pending: vec![],
        per_sandbox: Resources::new(1, 1),
        template: String::new(),
        gang: false,
        strategy: Strategy::Binpack,
        constraints: vec![],
        submitted_index: 0,
    };
    let mut ctx = JobCtx {
        job: &job,
        tenant: 0,
        class: 0,
        template_index: None,
        dim: Dim::Cpu,
        runs: vec![IndexRun::new(0, 3), IndexRun::new(10, 3)],
        cursor_run: 0,
        cursor_offset: 0,
    };
    assert_eq!(ctx.take_indices(2), vec![IndexRun::new(0, 2)]);
    assert_eq!(
        ctx.take_indices(3),
        vec![IndexRun::new(2, 1), IndexRun::new(10, 2)]
    );
    assert_eq!(ctx.take_indices(5), vec![IndexRun::new(12, 1)]);
    assert_eq!(ctx.take_indices(1), vec![]);
}
