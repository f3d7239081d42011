use super::*;
use crate::model::{NodeSpec, Resources};

fn node(id: &str, state: NodeState, templates: &[&str], labels: &[(&str, &str)]) -> Node {
    Node {
        spec: NodeSpec {
            id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
            allocatable: Resources {
                cpu_millis: 1000,
                memory_mib: 1024,
            },
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pool: String::new(),
            templates: templates.iter().map(|t| (*t).into()).collect(),
            max_sandboxes: 0,
            runtime: "container".into(),
        },
        state,
        registered_at_ms: 0,
        registered_index: 1,
        revision: 1,
    }
}

fn cluster() -> BTreeMap<String, Node> {
    [
        node("a", NodeState::Down, &["busybox", "py"], &[]),
        node("b", NodeState::Ready, &["busybox", "py"], &[("gpu", "no")]),
        node("c", NodeState::Ready, &["busybox"], &[("gpu", "yes")]),
        node("d", NodeState::Ready, &["busybox"], &[("gpu", "yes")]),
        node("e", NodeState::Draining, &["busybox"], &[("gpu", "yes")]),
        node("f", NodeState::Ready, &["busybox"], &[("gpu", "no")]),
    ]
    .into_iter()
    .map(|n| (n.spec.id.clone(), n))
    .collect()
}

fn req(to: &[&str], labels: &[(&str, &str)], count: u32) -> pb::CopyTemplateRequest {
    pb::CopyTemplateRequest {
        template: "py".into(),
        to: to.iter().map(|t| (*t).into()).collect(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        count,
        source: String::new(),
    }
}

fn ids(plan: &CopyPlan) -> Vec<&str> {
    plan.targets.iter().map(|t| t.node_id.as_str()).collect()
}

#[test]
fn the_source_is_a_ready_node_that_holds_the_template() {
    let plan = plan_copy(&cluster(), &req(&["c"], &[], 0)).expect("plan");
    // a holds it too, but is down.
    assert_eq!(plan.source.node_id, "b");
    assert_eq!(ids(&plan), vec!["c"]);
    let mut r = req(&["c"], &[], 0);
    r.source = "a".into();
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::Unavailable(_))
    ));
    r.source = "c".into();
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::Unavailable(_))
    ));
    r.source = "zz".into();
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::NotFound(_))
    ));
    let mut r = req(&["c"], &[], 0);
    r.template = "nowhere".into();
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::Unavailable(_))
    ));
}

#[test]
fn named_targets_are_checked_and_holders_skipped() {
    let plan = plan_copy(&cluster(), &req(&["d", "b", "c", "d"], &[], 0)).expect("plan");
    assert_eq!(ids(&plan), vec!["d", "c"]);
    assert_eq!(plan.skipped.len(), 1);
    assert_eq!(plan.skipped[0].0, "b");
    assert!(matches!(
        plan_copy(&cluster(), &req(&["e"], &[], 0)),
        Err(CopyRefused::Unavailable(_))
    ));
    assert!(matches!(
        plan_copy(&cluster(), &req(&["nope"], &[], 0)),
        Err(CopyRefused::NotFound(_))
    ));
}

#[test]
fn labels_and_count_select_ready_nodes_lacking_it() {
    let plan = plan_copy(&cluster(), &req(&[], &[("gpu", "yes")], 0)).expect("plan");
    // e matches but drains; nothing that holds it is a target.
    assert_eq!(ids(&plan), vec!["c", "d"]);
    let plan = plan_copy(&cluster(), &req(&[], &[], 2)).expect("plan");
    assert_eq!(ids(&plan), vec!["c", "d"]);
    let plan = plan_copy(&cluster(), &req(&[], &[("gpu", "no")], 5)).expect("plan");
    assert_eq!(ids(&plan), vec!["f"]);
    let plan = plan_copy(&cluster(), &req(&[], &[("gpu", "maybe")], 0)).expect("plan");
    assert!(plan.targets.is_empty());
}

#[test]
fn requests_say_where_once() {
    assert!(matches!(
        plan_copy(&cluster(), &req(&[], &[], 0)),
        Err(CopyRefused::Invalid(_))
    ));
    assert!(matches!(
        plan_copy(&cluster(), &req(&["c"], &[], 3)),
        Err(CopyRefused::Invalid(_))
    ));
    let mut r = req(&["c"], &[], 0);
    r.template = "../etc".into();
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::Invalid(_))
    ));
    let many: Vec<String> = (0..=COPY_TARGETS_MAX).map(|i| format!("n{i}")).collect();
    let mut r = req(&[], &[], 0);
    r.to = many;
    assert!(matches!(
        plan_copy(&cluster(), &r),
        Err(CopyRefused::Invalid(_))
    ));
}
