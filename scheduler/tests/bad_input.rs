//! Outside bytes at every boundary of the scheduler: gRPC messages decoded from arbitrary bytes
//! or built from hostile field values, and arbitrary command sequences and bytes applied to the
//! state machine.
//!
//! Properties:
//! - nothing panics;
//! - the edge (`convert` + `validate`) and the state machine agree: what the edge accepts,
//!   apply accepts; what the edge refuses comes with a field and a reason;
//! - a rejected command leaves the state exactly as it was (nothing half-applied);
//! - whatever is applied, no node is overcommitted and no gang job is partly placed, and two
//!   replicas applying the same commands stay byte-identical.

use std::collections::BTreeMap;

use proptest::prelude::*;
use prost::Message;
use surge_proto::jobs as pb;
use surge_proto::node as pn;
use surge_raft::StateMachine;
use surge_scheduler::command::{Command, Rejection, Response, StatusRange};
use surge_scheduler::convert::{job_spec_from_pb, node_spec_from_pb};
use surge_scheduler::model::{NodeState, Resources};
use surge_scheduler::placement::{self, Placement, PlacementParams, Plan, Preemption};
use surge_scheduler::runs::SandboxState;
use surge_scheduler::validate::{self, Invalid};
use surge_scheduler::ClusterState;

const CASES: u32 = 192;

fn reasoned(e: &Invalid) -> bool {
    !e.field.is_empty() && !e.reason.is_empty()
}

/// Strings users get wrong: empty, too long, bad characters, `..`, unicode, plausible names.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9._:/-]{1,12}",
        Just("..".to_string()),
        Just("a/../b".to_string()),
        "[ -~]{0,20}",
        "\\PC{0,8}",
        "[a-z]{129,140}",
    ]
}

fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        1u64..4_096,
        Just(validate::CPU_MILLIS_MAX),
        Just(validate::CPU_MILLIS_MAX + 1),
        Just(validate::MEMORY_MIB_MAX + 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn hostile_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        1u32..16,
        Just(validate::SANDBOXES_PER_JOB_MAX),
        Just(validate::SANDBOXES_PER_JOB_MAX + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn job_spec_pb() -> impl Strategy<Value = pb::JobSpec> {
    let constraint = (
        hostile_string(),
        prop_oneof![Just("="), Just("!="), Just(""), Just("<>"), Just("==")],
        hostile_string(),
    )
        .prop_map(|(key, op, value)| pb::Constraint {
            key,
            op: op.to_string(),
            value,
        });
    let restart = proptest::option::of(
        (
            prop_oneof![Just("never"), Just("on-failure"), Just(""), Just("always")],
            hostile_u32(),
        )
            .prop_map(|(mode, max_restarts)| pb::RestartPolicy {
                mode: mode.to_string(),
                max_restarts,
            }),
    );
    (
        (
            hostile_u32(),
            hostile_u64(),
            hostile_u64(),
            hostile_string(),
        ),
        (
            proptest::collection::vec(hostile_string(), 0..4),
            proptest::collection::btree_map(hostile_string(), hostile_string(), 0..3),
            any::<i32>(),
            hostile_string(),
            any::<bool>(),
            -1i32..3,
        ),
        (
            proptest::collection::vec(constraint, 0..3),
            restart,
            hostile_string(),
            proptest::collection::btree_map(hostile_string(), hostile_string(), 0..3),
            (hostile_u64(), hostile_u64(), hostile_u64()),
        ),
    )
        .prop_map(
            |(
                (count, cpu_millis, memory_mib, template),
                (command, env, priority, tenant, gang, strategy),
                (constraints, restart, name, labels, (ttl_ms, idle_timeout_ms, lease_ms)),
            )| pb::JobSpec {
                count,
                cpu_millis,
                memory_mib,
                template,
                command,
                env: env.into_iter().collect(),
                priority,
                tenant,
                gang,
                strategy,
                constraints,
                restart,
                name,
                labels: labels.into_iter().collect(),
                ttl_ms,
                idle_timeout_ms,
                lease_ms,
                user: String::new(),
            },
        )
}

fn register_pb() -> impl Strategy<Value = pn::RegisterNodeRequest> {
    (
        (
            hostile_string(),
            hostile_string(),
            hostile_u64(),
            hostile_u64(),
        ),
        (
            proptest::collection::btree_map(hostile_string(), hostile_string(), 0..3),
            hostile_string(),
            hostile_string(),
            hostile_string(),
        ),
        (
            proptest::collection::vec(hostile_string(), 0..3),
            hostile_u32(),
            hostile_string(),
        ),
    )
        .prop_map(
            |(
                (node_id, address, cpu, mem),
                (labels, os, arch, pool),
                (templates, max, runtime),
            )| {
                pn::RegisterNodeRequest {
                    node_id,
                    address,
                    allocatable: Some(pn::Resources {
                        cpu_millis: cpu,
                        memory_mib: mem,
                    }),
                    labels: labels.into_iter().collect(),
                    os,
                    arch,
                    pool,
                    templates,
                    max_sandboxes: max,
                    runtime,
                }
            },
        )
}

/// Submit through the edge, then through apply: they must agree.
fn check_submission(spec: pb::JobSpec, key: String) -> Result<(), TestCaseError> {
    let converted =
        job_spec_from_pb(spec).and_then(|s| validate::idempotency_key(&key).map(|()| s));
    match converted {
        Err(e) => prop_assert!(reasoned(&e), "refusal without a reason: {e:?}"),
        Ok(spec) => {
            let mut s = ClusterState::default();
            let r = s.apply_command(
                7,
                Command::SubmitJob {
                    spec,
                    idempotency_key: key,
                    at_ms: 1,
                },
            );
            prop_assert!(
                matches!(
                    r,
                    Response::JobSubmitted {
                        job_id: 7,
                        created: true
                    }
                ),
                "the edge accepted a job the state machine refused: {r:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn submit_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = pb::SubmitJobRequest::decode(bytes.as_slice()) {
            match req.spec {
                None => {}
                Some(spec) => check_submission(spec, req.idempotency_key)?,
            }
        }
    }

    #[test]
    fn hostile_job_specs_are_refused_with_a_reason_or_applied(spec in job_spec_pb(), key in hostile_string()) {
        // Through the wire encoding too: what a client sends is what the server decodes.
        let req = pb::SubmitJobRequest { spec: Some(spec), idempotency_key: key };
        let back = pb::SubmitJobRequest::decode(req.encode_to_vec().as_slice())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &req);
        check_submission(back.spec.unwrap_or_default(), back.idempotency_key)?;
    }

    #[test]
    fn register_bytes_and_hostile_nodes(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                        req in register_pb()) {
        let decoded = pn::RegisterNodeRequest::decode(bytes.as_slice()).ok();
        for r in decoded.into_iter().chain(std::iter::once(req)) {
            match node_spec_from_pb(r) {
                Err(e) => prop_assert!(reasoned(&e), "refusal without a reason: {e:?}"),
                Ok(node) => {
                    let mut s = ClusterState::default();
                    let reply = s.apply_command(3, Command::RegisterNode { node, at_ms: 1 });
                    prop_assert_eq!(reply, Response::NodeRegistered);
                }
            }
        }
    }

    #[test]
    fn other_request_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        // Decoding alone must be total for every request type a replica accepts.
        let _ = pb::CancelJobRequest::decode(bytes.as_slice());
        let _ = pb::UpdateSandboxesRequest::decode(bytes.as_slice());
        let _ = pb::SetQuotaRequest::decode(bytes.as_slice());
        let _ = pb::ListJobsRequest::decode(bytes.as_slice());
        let _ = pn::ReportStatusRequest::decode(bytes.as_slice());
        let _ = pn::HeartbeatRequest::decode(bytes.as_slice());
        let _ = pn::WatchAssignmentsRequest::decode(bytes.as_slice());
        let _ = surge_proto::cluster::ProposeRequest::decode(bytes.as_slice());
        let _ = surge_proto::raft::RaftRequest::decode(bytes.as_slice());
    }
}

// ---------------------------------------------------------------------------------------------
// The state machine

/// Nodes n0..n2 and a few jobs, one a gang, so that commands have something to act on.
fn seeded_state() -> (ClusterState, u64) {
    let mut s = ClusterState::default();
    let mut index = 0;
    let mut next = || {
        index += 1;
        index
    };
    for n in 0..3 {
        let node = surge_scheduler::model::NodeSpec {
            id: format!("n{n}"),
            address: String::new(),
            allocatable: Resources::new(4_000, 8_192),
            labels: BTreeMap::new(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pool: "default".into(),
            templates: vec![],
            max_sandboxes: 0,
            runtime: "sim".into(),
        };
        s.apply_command(next(), Command::RegisterNode { node, at_ms: 0 });
    }
    for (k, (count, gang)) in [(3u32, false), (4, true), (2, false)]
        .into_iter()
        .enumerate()
    {
        let spec = surge_scheduler::model::JobSpec {
            name: String::new(),
            count,
            per_sandbox: Resources::new(1_000, 1_024),
            template: "busybox".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            priority: 0,
            tenant: "t".into(),
            gang,
            strategy: surge_scheduler::model::Strategy::Binpack,
            constraints: vec![],
            restart: surge_scheduler::model::RestartPolicy::Never,
            labels: Default::default(),
            lifetime: Default::default(),
            user: String::new(),
            fork_of: None,
        };
        s.apply_command(
            next(),
            Command::SubmitJob {
                spec,
                idempotency_key: format!("k{k}"),
                at_ms: 0,
            },
        );
    }
    let at = next();
    (s, at)
}

/// A command that is either the one the leader would propose now (`valid`) or a hostile
/// variation: unknown jobs and nodes, ranges past the end, overlapping placements, stale
/// generations, absurd resources.
#[derive(Clone, Debug)]
enum Step {
    Plan {
        mangle: u8,
        job: u64,
        node: u8,
        first: u32,
        count: u32,
    },
    Report {
        job: u64,
        node: u8,
        first: u32,
        count: u32,
        generation: u64,
        state: u8,
    },
    NodeState {
        node: u8,
        state: u8,
    },
    Cancel {
        job: u64,
    },
    Submit {
        count: u32,
        cpu: u64,
        gang: bool,
        key: u8,
    },
    Quota {
        cpu: u64,
    },
    Sandboxes {
        job: u64,
        first: u32,
        count: u32,
        paused: Option<bool>,
        cpu: Option<u64>,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let job = prop_oneof![1u64..12, Just(0), Just(u64::MAX)];
    let range = (
        prop_oneof![0u32..6, Just(u32::MAX)],
        prop_oneof![0u32..6, Just(u32::MAX)],
    );
    prop_oneof![
        4 => (0u8..6, job.clone(), 0u8..4, range.clone()).prop_map(|(mangle, job, node, (first, count))| Step::Plan { mangle, job, node, first, count }),
        3 => (job.clone(), 0u8..4, range.clone(), 0u64..3, 0u8..9).prop_map(|(job, node, (first, count), generation, state)| Step::Report { job, node, first, count, generation, state }),
        1 => (0u8..4, 0u8..3).prop_map(|(node, state)| Step::NodeState { node, state }),
        1 => job.clone().prop_map(|job| Step::Cancel { job }),
        1 => (hostile_u32(), hostile_u64(), any::<bool>(), 0u8..4).prop_map(|(count, cpu, gang, key)| Step::Submit { count, cpu, gang, key }),
        1 => hostile_u64().prop_map(|cpu| Step::Quota { cpu }),
        1 => (job, range, proptest::option::of(any::<bool>()), proptest::option::of(hostile_u64())).prop_map(|(job, (first, count), paused, cpu)| Step::Sandboxes { job, first, count, paused, cpu }),
    ]
}

fn node_name(n: u8) -> String {
    // n3 does not exist.
    format!("n{n}")
}

fn command_of(s: &ClusterState, index: u64, step: &Step) -> Command {
    match step.clone() {
        Step::Plan {
            mangle,
            job,
            node,
            first,
            count,
        } => {
            let mut plan =
                placement::place(&s.placement_input(index - 1, PlacementParams::default()));
            plan.unplaced.clear();
            let extra = Placement {
                job,
                node: node_name(node),
                first_index: first,
                count,
            };
            match mangle {
                0 | 1 => {}
                2 => plan.placements.push(extra),
                3 => {
                    // The same sandboxes placed twice in one plan.
                    if let Some(p) = plan.placements.first().cloned() {
                        plan.placements.push(Placement {
                            node: node_name(node),
                            ..p
                        });
                    }
                }
                4 => plan.preemptions.push(Preemption {
                    job,
                    node: node_name(node),
                    first_index: first,
                    count,
                    by_job: job.wrapping_add(1),
                }),
                _ => {
                    plan = Plan {
                        at_index: index.saturating_sub(50),
                        placements: vec![extra],
                        preemptions: vec![],
                        unplaced: vec![],
                    }
                }
            }
            Command::ApplyPlan {
                plan,
                reasons: vec![(job, "why not".into())],
                at_ms: index,
            }
        }
        Step::Report {
            job,
            node,
            first,
            count,
            generation,
            state,
        } => {
            let state = SandboxState::ALL[usize::from(state) % SandboxState::ALL.len()];
            Command::ReportStatus {
                reports: vec![StatusRange {
                    node: node_name(node),
                    job,
                    first,
                    count,
                    generation,
                    state,
                    exit_code: 1,
                    resources: None,
                }],
                at_ms: index,
            }
        }
        Step::NodeState { node, state } => Command::SetNodeState {
            node: node_name(node),
            state: [NodeState::Ready, NodeState::Down, NodeState::Draining][usize::from(state) % 3],
            at_ms: index,
        },
        Step::Cancel { job } => Command::CancelJob {
            job_id: job,
            at_ms: index,
        },
        Step::Submit {
            count,
            cpu,
            gang,
            key,
        } => {
            let mut spec = match s.jobs.values().next() {
                Some(j) => j.spec.clone(),
                None => {
                    return Command::CancelJob {
                        job_id: 1,
                        at_ms: index,
                    }
                }
            };
            spec.count = count;
            spec.per_sandbox = Resources::new(cpu, 512);
            spec.gang = gang;
            Command::SubmitJob {
                spec,
                idempotency_key: format!("k{key}"),
                at_ms: index,
            }
        }
        Step::Quota { cpu } => Command::SetQuota {
            tenant: "t".into(),
            max: Some(Resources::new(cpu, u64::MAX)),
        },
        Step::Sandboxes {
            job,
            first,
            count,
            paused,
            cpu,
        } => Command::SetSandboxes {
            job_id: job,
            first,
            count,
            paused,
            resources: cpu.map(|c| Resources::new(c, 512)),
        },
    }
}

fn check_invariants(s: &ClusterState) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.overcommitted(), None);
    for j in s.jobs.values() {
        let c = j.counts;
        if j.spec.gang && !j.state.is_terminal() {
            prop_assert!(
                c.placed + c.running + c.paused == 0 || c.pending == 0,
                "gang job {} partly placed: {:?}",
                j.id,
                c
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Group commit must not change meaning: a batch is its commands applied one by one at the
    /// batch's index, with the same replies, hostile commands included.
    #[test]
    fn a_batch_is_its_commands_applied_one_by_one(steps in proptest::collection::vec(step(), 1..20)) {
        let (mut a, index) = seeded_state();
        let mut b = a.clone();
        let commands: Vec<Command> = steps.iter().map(|st| command_of(&a, index, st)).collect();
        let batch = Command::Batch { commands: commands.iter().map(Command::encode).collect() };
        let reply = Response::decode(&a.apply(index, &batch.encode()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let one_by_one: Vec<Response> =
            commands.into_iter().map(|c| b.apply_command(index, c)).collect();
        prop_assert_eq!(reply, Response::Batch(one_by_one));
        prop_assert!(a == b, "the batch left another state than its commands one by one");
        check_invariants(&a)?;
    }

    #[test]
    fn rejected_commands_change_nothing_and_invariants_hold(steps in proptest::collection::vec(step(), 1..30)) {
        let (mut a, first) = seeded_state();
        let mut b = a.clone();
        for (i, st) in steps.iter().enumerate() {
            let index = first + i as u64;
            let command = command_of(&a, index, st);
            let before = a.clone();
            let bytes = command.encode();
            let reply = a.apply(index, &bytes);
            prop_assert_eq!(&reply, &b.apply(index, &bytes), "replicas disagree on {:?}", command);
            let response = Response::decode(&reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Response::Rejected(why) = &response {
                prop_assert!(!why.to_string().is_empty());
                prop_assert!(a == before, "rejected {:?} ({}) but the state changed", command, why);
            }
            check_invariants(&a)?;
        }
        prop_assert_eq!(a.hash(), b.hash());
        // The snapshot restores to the same state.
        let mut c = ClusterState::default();
        c.restore(&a.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(c == a);
    }

    #[test]
    fn arbitrary_command_bytes_are_rejected_whole(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (mut s, index) = seeded_state();
        let before = s.clone();
        let reply = s.apply(index, &bytes);
        let response = Response::decode(&reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if matches!(response, Response::Rejected(_)) {
            prop_assert!(s == before);
        }
        check_invariants(&s)?;
    }

    #[test]
    fn arbitrary_and_damaged_snapshots_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                                   flip in any::<usize>()) {
        let (s, _) = seeded_state();
        let mut c = ClusterState::default();
        if c.restore(&bytes).is_err() {
            prop_assert!(c == ClusterState::default(), "a refused snapshot changed the state");
        }
        // A damaged snapshot payload either fails to decode or decodes to *something*: the
        // frame's checksum (raft's codec) is what rejects it at rest, tested in surge-raft.
        let mut snap = s.snapshot();
        let i = flip % snap.len();
        snap[i] ^= 0x20;
        let _ = ClusterState::default().restore(&snap);
    }
}

#[test]
fn an_unknown_command_is_rejected_as_undecodable() {
    let (mut s, index) = seeded_state();
    let before = s.clone();
    // Variant 200 does not exist (a newer surge's command).
    let mut bytes = 200u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    let reply = Response::decode(&s.apply(index, &bytes)).expect("reply decodes");
    assert!(
        matches!(reply, Response::Rejected(Rejection::Undecodable(_))),
        "{reply:?}"
    );
    assert!(s == before);
}

/// The generator above does reach both outcomes: hostile steps are refused, plain ones applied.
#[test]
fn hostile_steps_are_refused_and_plain_ones_applied() {
    let (mut s, first) = seeded_state();
    let steps = [
        Step::Plan {
            mangle: 0,
            job: 1,
            node: 0,
            first: 0,
            count: 0,
        },
        Step::Cancel { job: 999 },
        Step::Sandboxes {
            job: 2,
            first: u32::MAX,
            count: u32::MAX,
            paused: Some(true),
            cpu: None,
        },
        Step::Report {
            job: 77,
            node: 3,
            first: 0,
            count: 1,
            generation: 0,
            state: 2,
        },
        Step::Submit {
            count: u32::MAX,
            cpu: 1,
            gang: false,
            key: 9,
        },
        Step::Cancel { job: 6 },
    ];
    let (mut refused, mut applied) = (0, 0);
    for (i, st) in steps.iter().enumerate() {
        let index = first + i as u64;
        let before = s.clone();
        let command = command_of(&s, index, st);
        let reply = Response::decode(&s.apply(index, &command.encode())).expect("reply");
        if matches!(reply, Response::Rejected(_)) {
            refused += 1;
            assert!(s == before, "{command:?} was refused but changed the state");
        } else {
            applied += 1;
        }
    }
    assert!(
        refused >= 3 && applied >= 2,
        "refused {refused}, applied {applied}"
    );
}

/// Malformed constraints are refused at submit with the accepted syntax, through the CLI/HTTP
/// string form and through gRPC's parts alike; a job constrained to `os==` would otherwise wait
/// forever for a node whose os is "=".
#[test]
fn malformed_constraints_are_refused_with_the_syntax() {
    let spec_with = |c: pb::Constraint| pb::JobSpec {
        count: 1,
        cpu_millis: 500,
        memory_mib: 64,
        template: "busybox".into(),
        command: vec!["true".into()],
        tenant: "eval".into(),
        constraints: vec![c],
        ..Default::default()
    };
    let submit = |c: pb::Constraint| {
        job_spec_from_pb(spec_with(c)).and_then(|s| validate::job_spec(&s).map(|()| s))
    };
    for text in ["os==", "=linux", "os", "os==linux", "gpu!=a=b", " = "] {
        let refused = match surge_scheduler::api_json::parse_constraint(text) {
            Err(e) => e.to_string(),
            Ok(c) => submit(c)
                .expect_err(&format!("{text:?} must be refused"))
                .to_string(),
        };
        assert!(
            refused.contains("KEY=VALUE or KEY!=VALUE"),
            "{text:?}: {refused}"
        );
    }
    // gRPC carries the parts: an empty key, or `=` with an empty value, is refused the same way.
    for (key, op, value) in [("", "=", "linux"), ("os", "==", ""), ("os", "=", "a b")] {
        let c = pb::Constraint {
            key: key.into(),
            op: op.into(),
            value: value.into(),
        };
        let refused = submit(c).expect_err(&format!("{key:?} {op:?} {value:?}"));
        assert!(
            refused.to_string().contains("KEY=VALUE or KEY!=VALUE"),
            "{refused}"
        );
    }
    // Control: well-formed constraints pass, including `!=` with an empty value (label present).
    for text in ["os=linux", "gpu!=none", "zone=eu-west-1a", "gpu!="] {
        let c = surge_scheduler::api_json::parse_constraint(text).expect("parses");
        submit(c).unwrap_or_else(|e| panic!("{text:?} refused: {e}"));
    }
}
