use super::*;
use crate::history::{EventType as T, NodeSample, Process as P, SandboxHolders};

fn submit(key: &str) -> Op {
    Op::Submit {
        key: key.into(),
        replica: 1,
        gang: false,
        count: 1,
        cpu_millis: 500,
        memory_mib: 256,
    }
}

fn acked(key: &str, job_id: u64) -> Op {
    Op::Submitted {
        key: key.into(),
        job_id,
        created: true,
    }
}

fn job(id: u64, key: &str) -> JobSample {
    JobSample {
        id,
        key: key.into(),
        count: 1,
        cpu_millis: 500,
        memory_mib: 256,
        state: "running".into(),
        running: 1,
        ..JobSample::default()
    }
}

fn gang(id: u64, count: u32, active: u32, pending: u32) -> JobSample {
    JobSample {
        id,
        key: format!("g{id}"),
        gang: true,
        count,
        cpu_millis: 1000,
        memory_mib: 512,
        state: if active > 0 { "running" } else { "pending" }.into(),
        running: active,
        pending,
        ..JobSample::default()
    }
}

fn node(id: &str, allocated_cpu: u64) -> NodeSample {
    NodeSample {
        id: id.into(),
        state: "ready".into(),
        allocatable_cpu_millis: 4000,
        allocatable_memory_mib: 8192,
        allocated_cpu_millis: allocated_cpu,
        allocated_memory_mib: 0,
        sandboxes: 0,
        labels: BTreeMap::new(),
    }
}

fn labelled(id: &str, allocated_cpu: u64, class: &str) -> NodeSample {
    NodeSample {
        labels: [("chaos".to_string(), class.to_string())].into(),
        ..node(id, allocated_cpu)
    }
}

fn reads(jobs: &[JobSample]) -> Vec<(u64, P, T, Op)> {
    (1..=3)
        .map(|r| {
            (
                100,
                P::Final,
                T::Ok,
                Op::ReadJobs {
                    replica: r,
                    jobs: jobs.to_vec(),
                },
            )
        })
        .collect()
}

fn healthy(mut events: Vec<(u64, P, T, Op)>, finals: &[JobSample]) -> History {
    events.extend(reads(finals));
    History::from_events(events)
}

fn checked(h: &History, name: &str) -> Option<Violation> {
    let (_, check) = CHECKERS.iter().find(|(n, _)| *n == name).expect("checker");
    check(h)
}

#[test]
fn a_sandbox_on_two_live_nodes_is_a_violation() {
    let sample = |doubles| Op::ReadAssignments {
        replica: 1,
        checked: 40,
        running: 0,
        doubles,
        stale: vec![],
    };
    let clean = healthy(vec![(1, P::Sampler, T::Ok, sample(vec![]))], &[]);
    assert_eq!(checked(&clean, "one_live_node_per_sandbox"), None);
    let double = SandboxHolders {
        job: 7,
        index: 3,
        nodes: vec!["n1".into(), "n2".into()],
    };
    let bad = healthy(
        vec![
            (1, P::Sampler, T::Ok, sample(vec![])),
            (2, P::Sampler, T::Ok, sample(vec![double])),
        ],
        &[],
    );
    let v = checked(&bad, "one_live_node_per_sandbox").expect("a violation");
    assert_eq!(v.count, 1);
    assert!(v.message.contains("7.3"), "{}", v.message);
}

#[test]
fn acknowledged_once_passes_a_clean_history_with_retries() {
    let h = healthy(
        vec![
            (1, P::Client(0), T::Invoke, submit("a")),
            (
                2,
                P::Client(0),
                T::Info,
                Op::Error {
                    about: "a".into(),
                    error: "timeout".into(),
                },
            ),
            (3, P::Client(0), T::Invoke, submit("a")),
            (4, P::Client(0), T::Ok, acked("a", 7)),
            // Unknown outcome, never acknowledged, and not applied: allowed.
            (5, P::Client(1), T::Invoke, submit("b")),
            (
                6,
                P::Client(1),
                T::Info,
                Op::Error {
                    about: "b".into(),
                    error: "timeout".into(),
                },
            ),
        ],
        &[job(7, "a")],
    );
    assert_eq!(acknowledged_once(&h), None);
}

#[test]
fn acknowledged_once_finds_a_lost_submission() {
    let h = healthy(
        vec![
            (1, P::Client(0), T::Invoke, submit("a")),
            (2, P::Client(0), T::Ok, acked("a", 7)),
            (3, P::Client(0), T::Invoke, submit("b")),
            (4, P::Client(0), T::Ok, acked("b", 9)),
        ],
        &[job(7, "a")],
    );
    let v = acknowledged_once(&h).expect("violation");
    assert_eq!(v.count, 3, "missing on each of 3 replicas: {v:?}");
    assert!(
        v.message.contains("\"b\"") && v.message.contains("missing"),
        "{}",
        v.message
    );
    assert_eq!(v.counterexample["ack"]["job_id"], 9);
}

#[test]
fn acknowledged_once_finds_a_duplicate_and_a_changed_id() {
    let h = healthy(
        vec![
            (1, P::Client(0), T::Invoke, submit("a")),
            (2, P::Client(0), T::Ok, acked("a", 7)),
            (3, P::Client(0), T::Invoke, submit("a")),
            (4, P::Client(0), T::Ok, acked("a", 8)),
        ],
        &[job(7, "a"), job(8, "a")],
    );
    let v = acknowledged_once(&h).expect("violation");
    assert!(
        v.message
            .contains("acknowledged as job 7 and later as job 8"),
        "{}",
        v.message
    );
    // One changed id, plus the key applied twice on each replica.
    assert_eq!(v.count, 4);
}

#[test]
fn acknowledged_once_finds_a_phantom_job_and_a_silent_replica() {
    let mut events = vec![
        (1, P::Client(0), T::Invoke, submit("a")),
        (2, P::Client(0), T::Ok, acked("a", 7)),
    ];
    events.extend(reads(&[job(7, "a"), job(12, "zzz")]));
    events.push((
        200,
        P::Final,
        T::Fail,
        Op::ReadJobs {
            replica: 4,
            jobs: Vec::new(),
        },
    ));
    let v = acknowledged_once(&History::from_events(events)).expect("violation");
    assert!(v.message.contains("which no client sent"), "{}", v.message);
    assert_eq!(v.count, 4, "3 phantoms and one replica that did not answer");
}

#[test]
fn cancels_durable_finds_an_undone_cancel() {
    let cancelled = Op::Cancelled {
        job_id: 7,
        state: "cancelled".into(),
    };
    let ok = healthy(
        vec![(1, P::Client(0), T::Ok, cancelled.clone())],
        &[JobSample {
            state: "cancelled".into(),
            ..job(7, "a")
        }],
    );
    assert_eq!(cancels_durable(&ok), None);
    let bad = healthy(vec![(1, P::Client(0), T::Ok, cancelled)], &[job(7, "a")]);
    let v = cancels_durable(&bad).expect("violation");
    assert!(v.message.contains("\"running\""), "{}", v.message);
}

#[test]
fn no_overcommit_finds_an_overfull_node() {
    let read = |cpu| Op::ReadNodes {
        replica: 2,
        nodes: vec![node("n-1", 1000), node("n-2", cpu)],
    };
    let ok = History::from_events(vec![(1, P::Sampler, T::Ok, read(4000))]);
    assert_eq!(no_overcommit(&ok), None);
    let bad = History::from_events(vec![
        (1, P::Sampler, T::Ok, read(4000)),
        (2, P::Sampler, T::Ok, read(4500)),
    ]);
    let v = no_overcommit(&bad).expect("violation");
    assert_eq!(v.counterexample["node"]["id"], "n-2");
    assert_eq!(v.counterexample["sample_index"], 1);
}

#[test]
fn gang_all_or_nothing_finds_a_partial_gang() {
    let read = |j| Op::ReadJobs {
        replica: 1,
        jobs: vec![j],
    };
    let ok = History::from_events(vec![
        (1, P::Watch, T::Ok, read(gang(5, 4, 0, 4))),
        (2, P::Watch, T::Ok, read(gang(5, 4, 4, 0))),
    ]);
    assert_eq!(gang_all_or_nothing(&ok), None);
    let bad = History::from_events(vec![
        (1, P::Watch, T::Ok, read(gang(5, 4, 4, 0))),
        (2, P::Watch, T::Ok, read(gang(5, 4, 3, 1))),
    ]);
    let v = gang_all_or_nothing(&bad).expect("violation");
    assert!(
        v.message.contains("3 active and 1 pending"),
        "{}",
        v.message
    );
    // A plain job may be partly placed.
    let plain = History::from_events(vec![(
        1,
        P::Sampler,
        T::Ok,
        read(JobSample {
            gang: false,
            ..gang(6, 4, 3, 1)
        }),
    )]);
    assert_eq!(gang_all_or_nothing(&plain), None);
}

fn status(replica: u64, applied_index: u64, hash: &str) -> Op {
    Op::ReplicaStatus {
        replica,
        applied_index,
        state_hash: hash.into(),
    }
}

#[test]
fn converged_finds_diverged_replicas() {
    let ok = History::from_events(vec![
        (1, P::Final, T::Ok, status(1, 50, "aa")),
        (1, P::Final, T::Ok, status(2, 50, "aa")),
    ]);
    assert_eq!(converged(&ok), None);
    let lagging = History::from_events(vec![
        (1, P::Final, T::Ok, status(1, 50, "aa")),
        (1, P::Final, T::Ok, status(2, 49, "bb")),
    ]);
    assert!(converged(&lagging)
        .expect("violation")
        .message
        .contains("did not converge"));
    // Same index, different state: apply is not deterministic.
    let forked = History::from_events(vec![
        (1, P::Final, T::Ok, status(1, 50, "aa")),
        (1, P::Final, T::Ok, status(2, 50, "bb")),
    ]);
    let v = converged(&forked).expect("violation");
    assert!(v.message.contains("state hashes differ"), "{}", v.message);
    let silent = History::from_events(vec![
        (1, P::Final, T::Ok, status(1, 50, "aa")),
        (1, P::Final, T::Fail, status(2, 0, "")),
    ]);
    assert!(converged(&silent)
        .expect("violation")
        .message
        .contains("2: no answer"));
}

#[test]
fn liveness_finds_a_placeable_job_left_pending() {
    let healed = (
        100,
        P::Faults,
        T::Info,
        Op::Healed {
            liveness_bound_ms: 1000,
        },
    );
    let pending = Op::ReadJobs {
        replica: 1,
        jobs: vec![JobSample {
            pending: 1,
            running: 0,
            state: "pending".into(),
            ..job(7, "a")
        }],
    };
    let placed = Op::ReadJobs {
        replica: 1,
        jobs: vec![job(7, "a")],
    };
    let free = Op::ReadNodes {
        replica: 1,
        nodes: vec![node("n-1", 0)],
    };
    let full = Op::ReadNodes {
        replica: 1,
        nodes: vec![node("n-1", 4000)],
    };
    // Placed within the bound.
    let ok = History::from_events(vec![
        healed.clone(),
        (200, P::Liveness, T::Ok, pending.clone()),
        (201, P::Liveness, T::Ok, free.clone()),
        (700, P::Liveness, T::Ok, placed),
        (701, P::Liveness, T::Ok, free.clone()),
    ]);
    assert_eq!(liveness(&ok), None);
    // Pending, but nothing has room: not placeable, so not a violation.
    let no_room = History::from_events(vec![
        healed.clone(),
        (200, P::Liveness, T::Ok, pending.clone()),
        (201, P::Liveness, T::Ok, full),
    ]);
    assert_eq!(liveness(&no_room), None);
    // Pending with room until the bound passed.
    let stuck = History::from_events(vec![
        healed,
        (200, P::Liveness, T::Ok, pending.clone()),
        (201, P::Liveness, T::Ok, free.clone()),
        (1050, P::Liveness, T::Ok, pending),
        (1051, P::Liveness, T::Ok, free),
    ]);
    let v = liveness(&stuck).expect("violation");
    assert!(
        v.message.contains("job 7") && v.message.contains("950 ms"),
        "{}",
        v.message
    );
    assert_eq!(
        v.counterexample["free_capacity"][0]["free_cpu_millis"],
        4000
    );
    // Never healed.
    assert!(liveness(&History::default()).is_some());
}

#[test]
fn placeable_honours_label_constraints() {
    // The container node is full; the simulated one has room but the wrong label.
    let nodes = vec![
        labelled("sim", 0, "sim"),
        labelled("ctr", 4000, "container"),
    ];
    let container_job = JobSample {
        pending: 1,
        running: 0,
        state: "pending".into(),
        constraints: vec!["chaos=container".into()],
        ..job(7, "a")
    };
    assert!(!placeable(&container_job, &nodes));
    let sim_job = JobSample {
        constraints: vec!["chaos=sim".into()],
        ..container_job.clone()
    };
    assert!(placeable(&sim_job, &nodes));
    // `!=` holds on a node without the label, `=` does not.
    let unlabelled = vec![node("n", 0)];
    let not_ctr = JobSample {
        constraints: vec!["chaos!=container".into()],
        ..container_job.clone()
    };
    assert!(placeable(&not_ctr, &unlabelled));
    assert!(!placeable(&container_job, &unlabelled));
    assert!(placeable(&not_ctr, &nodes));
}

#[test]
fn placeable_counts_a_gang_across_nodes() {
    let nodes = vec![
        node("a", 2000),
        node("b", 2000),
        NodeSample {
            state: "down".into(),
            ..node("c", 0)
        },
    ];
    // 2 free CPUs on each of a and b: a gang of 4 x 1 CPU fits across them, 5 does not.
    assert!(placeable(&gang(1, 4, 0, 4), &nodes));
    assert!(!placeable(&gang(1, 5, 0, 5), &nodes));
    assert!(!placeable(
        &JobSample {
            state: "cancelled".into(),
            ..gang(1, 4, 0, 4)
        },
        &nodes
    ));
    assert!(checked(&History::default(), "liveness").is_some());
}

#[test]
fn one_pass_finds_what_each_checker_finds() {
    // One history that breaks several properties at once.
    let mut events = vec![
        (1, P::Client(0), T::Invoke, submit("a")),
        (2, P::Client(0), T::Ok, acked("a", 7)),
        (3, P::Client(0), T::Ok, acked("a", 8)),
        (
            4,
            P::Watch,
            T::Ok,
            Op::ReadJobs {
                replica: 1,
                jobs: vec![gang(5, 4, 3, 1)],
            },
        ),
        (
            5,
            P::Sampler,
            T::Ok,
            Op::ReadNodes {
                replica: 1,
                nodes: vec![node("n-1", 4500)],
            },
        ),
    ];
    events.extend(reads(&[job(7, "a")]));
    let h = History::from_events(events);
    let each: Vec<Violation> = CHECKERS.iter().filter_map(|(_, c)| c(&h)).collect();
    let names: Vec<&str> = each.iter().map(|v| v.checker.as_str()).collect();
    assert!(
        [
            "acknowledged_once",
            "no_overcommit",
            "gang_all_or_nothing",
            "converged"
        ]
        .iter()
        .all(|n| names.contains(n)),
        "{names:?}"
    );
    assert_eq!(check_all(&h), each);
}

#[test]
fn samples_keep_every_job_a_sample_checker_judges() {
    use crate::history::in_flight;
    // A partial gang (gang_all_or_nothing) and a pending job (liveness) are kept.
    assert!(in_flight(&gang(5, 4, 3, 1)));
    assert!(in_flight(&JobSample {
        pending: 1,
        running: 0,
        ..job(7, "a")
    }));
    // A job with nothing pending or on a node can break neither.
    let done = JobSample {
        running: 0,
        cancelled: 1,
        state: "cancelled".into(),
        ..job(8, "b")
    };
    assert!(!in_flight(&done));
    assert!(!placeable(&done, &[node("n-1", 0)]));
}

#[test]
fn a_key_keeps_a_bounded_number_of_operations() {
    let mut events = vec![];
    for t in 0..(KEY_EVENTS_MAX as u64 * 3) {
        events.push((t, P::Client(0), T::Invoke, submit("a")));
    }
    events.push((10_000, P::Client(0), T::Ok, acked("a", 7)));
    events.extend(reads(&[]));
    let v = acknowledged_once(&History::from_events(events)).expect("a lost submission");
    let shown = v.counterexample["operations_on_key"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(shown, KEY_EVENTS_MAX);
    assert_eq!(
        v.counterexample["operations_not_shown"],
        KEY_EVENTS_MAX as u64 * 2 + 1
    );
}
