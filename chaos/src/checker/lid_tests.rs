use super::*;
use crate::history::{EventType as T, Process as P};

fn copy(node: &str, job: u64, index: u32, generation: u64) -> HostCopy {
    HostCopy {
        node: node.into(),
        job,
        index,
        generation,
    }
}

fn read(copies: Vec<HostCopy>) -> (P, T, Op) {
    (P::Sampler, T::Ok, Op::ReadHosts { copies })
}

fn checkpoint(job_id: u64, index: u32) -> (P, T, Op) {
    (
        P::Client(0),
        T::Invoke,
        Op::Lid {
            job_id,
            sandbox_index: index,
            action: "checkpoint".into(),
            replica: 1,
        },
    )
}

fn history(steps: Vec<(P, T, Op)>) -> History {
    History::from_events(
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (p, t, op))| (100 * i as u64, p, t, op))
            .collect(),
    )
}

fn restores(h: &History) -> u64 {
    let mut c = RestoredOnce::default();
    for e in &h.events {
        c.observe(e);
    }
    c.restores
}

#[test]
fn a_checkpoint_then_one_restore_on_the_same_node_passes() {
    let h = history(vec![
        read(vec![copy("n1", 7, 0, 0), copy("n2", 8, 0, 0)]),
        checkpoint(7, 0),
        read(vec![copy("n2", 8, 0, 0)]),
        read(vec![]),
        read(vec![copy("n1", 7, 0, 0)]),
        // Two checkpoints, two restores.
        checkpoint(7, 0),
        read(vec![]),
        read(vec![copy("n1", 7, 0, 0)]),
        // A new run elsewhere (a reschedule, new generation) is no double.
        read(vec![copy("n2", 7, 0, 1), copy("n1", 7, 0, 0)]),
    ]);
    assert_eq!(checkpoint_restored_once(&h), None);
    assert_eq!(restores(&h), 2);
}

#[test]
fn an_image_restored_twice_fails() {
    let h = history(vec![
        read(vec![copy("n1", 7, 0, 0)]),
        checkpoint(7, 0),
        read(vec![]),
        read(vec![copy("n1", 7, 0, 0)]),
        read(vec![]),
        read(vec![copy("n1", 7, 0, 0)]),
    ]);
    let v = checkpoint_restored_once(&h).expect("a second restore of one image is caught");
    assert_eq!(v.checker, "checkpoint_restored_once");
    assert_eq!(v.count, 1);
    assert!(
        v.message.contains("no checkpoint asked for"),
        "{}",
        v.message
    );
}

#[test]
fn a_run_on_two_nodes_at_once_fails() {
    let h = history(vec![
        checkpoint(7, 0),
        read(vec![copy("n1", 7, 0, 3), copy("n2", 7, 0, 3)]),
    ]);
    let v = checkpoint_restored_once(&h).expect("a double is caught");
    assert!(v.message.contains("at once"), "{}", v.message);
}

#[test]
fn a_restore_on_another_node_fails() {
    let h = history(vec![
        read(vec![copy("n1", 7, 0, 0)]),
        checkpoint(7, 0),
        read(vec![]),
        read(vec![copy("n2", 7, 0, 0)]),
    ]);
    let v = checkpoint_restored_once(&h).expect("a restore away from the image is caught");
    assert!(
        v.message.contains("checkpointed on node n1"),
        "{}",
        v.message
    );
}

#[test]
fn a_fork_away_from_its_source_node_fails() {
    let forked = |job_id, node: &str| {
        (
            P::Client(0),
            T::Ok,
            Op::Forked {
                key: format!("f{job_id}"),
                source_job: 7,
                source_index: 0,
                job_id,
                node: node.into(),
            },
        )
    };
    let good = history(vec![
        forked(9, "n1"),
        read(vec![
            copy("n1", 7, 0, 0),
            copy("n1", 9, 0, 0),
            copy("n1", 9, 1, 0),
        ]),
    ]);
    assert_eq!(checkpoint_restored_once(&good), None);
    let bad = history(vec![
        forked(9, "n1"),
        read(vec![copy("n1", 7, 0, 0), copy("n2", 9, 1, 0)]),
    ]);
    let v = checkpoint_restored_once(&bad).expect("a fork off its source's node is caught");
    assert!(v.message.contains("fork 9.1"), "{}", v.message);
}

#[test]
fn lid_events_read_back_from_a_history_file() {
    let h = history(vec![
        checkpoint(7, 0),
        read(vec![copy("n1", 7, 0, 0)]),
        (
            P::Client(0),
            T::Invoke,
            Op::Fork {
                key: "f".into(),
                job_id: 7,
                sandbox_index: 0,
                count: 2,
                replica: 1,
            },
        ),
    ]);
    for e in &h.events {
        let line = serde_json::to_string(e).expect("serialize");
        let back: Event = serde_json::from_str(&line).expect("a history line reads back");
        assert_eq!(&back, e);
    }
}
