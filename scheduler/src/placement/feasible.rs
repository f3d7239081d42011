//! Feasibility: small checkers that answer "can this node take a sandbox of this job?", and the
//! reasons shown when none can.
//!
//! As in Nomad's `scheduler/feasible`, static checks (schedulable, os/arch/pool/labels) are evaluated
//! once per *feasibility class* — the set of jobs with the same constraints — and cached; only the
//! dynamic checks (free resources, cap slots) run per candidate node.

use crate::placement::{Attribute, Constraint, NodeView, Operator, Reason, Resources};

/// Node is up and not draining.
pub(crate) fn schedulable(node: &NodeView) -> bool {
    node.schedulable
}

/// One constraint against the node's attributes. A `!=` on an absent label holds; an `=` does not.
pub(crate) fn satisfies(node: &NodeView, constraint: &Constraint) -> bool {
    let actual: Option<&str> = match &constraint.attribute {
        Attribute::Os => Some(node.os.as_str()),
        Attribute::Arch => Some(node.arch.as_str()),
        Attribute::Pool => Some(node.pool.as_str()),
        Attribute::Label(key) => node.labels.get(key).map(String::as_str),
    };
    let equal = actual == Some(constraint.value.as_str());
    match constraint.operator {
        Operator::Equal => equal,
        Operator::NotEqual => !equal,
    }
}

pub(crate) fn satisfies_all(node: &NodeView, constraints: &[Constraint]) -> bool {
    constraints.iter().all(|c| satisfies(node, c))
}

/// The checks that do not depend on what is running: membership of a feasibility class.
pub(crate) fn statically_feasible(node: &NodeView, constraints: &[Constraint]) -> bool {
    schedulable(node) && satisfies_all(node, constraints)
}

/// How many sandboxes of size `per` the cap and the free resources allow at once.
pub(crate) fn fits(free: &Resources, slots: u32, per: &Resources) -> u64 {
    free.count_fitting(per).min(u64::from(slots))
}

/// Reason when a feasibility class is empty: name the first constraint no schedulable node meets, or
/// say the combination is unsatisfiable.
pub(crate) fn no_feasible_node_reason<'a>(
    nodes: impl Iterator<Item = &'a NodeView> + Clone,
    constraints: &[Constraint],
) -> Reason {
    let mut up = nodes.filter(|n| schedulable(n)).peekable();
    if up.peek().is_none() {
        return Reason::NoNodeWith { constraint: None };
    }
    for c in constraints {
        if !up.clone().any(|n| satisfies(n, c)) {
            return Reason::NoNodeWith {
                constraint: Some(c.clone()),
            };
        }
    }
    Reason::NoNodeWithAll {
        constraints: constraints.to_vec(),
    }
}

/// What the nodes of a feasibility class look like for one sandbox size, after placement stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClassShortage {
    /// Free capacity summed over class nodes with a cap slot left.
    pub(crate) free_uncapped: Resources,
    /// Some node has resources for a sandbox but its cap is reached: (os, max).
    pub(crate) capped: Option<(String, u32)>,
    /// Some node with a free slot has room for a sandbox in resources (so placement is not stuck on
    /// resources alone; used to tell caps from capacity).
    pub(crate) resource_fit_uncapped: bool,
    /// Some class node could hold one sandbox if it were empty.
    pub(crate) big_enough: bool,
    /// The largest allocatable in the class, by cpu then memory.
    pub(crate) largest: Resources,
}

impl ClassShortage {
    pub(crate) fn measure<'a>(
        nodes: impl Iterator<Item = (&'a NodeView, Resources, u32)>,
        per: &Resources,
    ) -> ClassShortage {
        let mut out = ClassShortage {
            free_uncapped: Resources::ZERO,
            capped: None,
            resource_fit_uncapped: false,
            big_enough: false,
            largest: Resources::ZERO,
        };
        for (node, free, slots) in nodes {
            if node.allocatable > out.largest {
                out.largest = node.allocatable;
            }
            if per.fits_in(&node.allocatable) && node.max_sandboxes != Some(0) {
                out.big_enough = true;
            }
            let resource_fit = per.fits_in(&free);
            if slots > 0 {
                out.free_uncapped = out.free_uncapped.saturating_add(free);
                out.resource_fit_uncapped |= resource_fit;
            } else if resource_fit && out.capped.is_none() {
                out.capped = Some((node.os.clone(), node.max_sandboxes.unwrap_or(0)));
            }
        }
        out
    }

    /// Reason for `unplaced` of `wanted` sandboxes of size `per` that did not fit.
    pub(crate) fn reason(&self, per: &Resources, unplaced: u64, wanted: u64) -> Reason {
        if !self.big_enough {
            return Reason::TooLarge {
                per_sandbox: *per,
                largest: self.largest,
            };
        }
        if let (Some((os, max)), false) = (&self.capped, self.resource_fit_uncapped) {
            return Reason::NodeCap {
                os: os.clone(),
                max: *max,
            };
        }
        // Extra capacity the class would need: the unplaced demand minus the free fragments. Exact when
        // nothing is fragmented; a lower bound otherwise (fragments only help if grown in place).
        let demand = per.saturating_mul(unplaced);
        Reason::Insufficient {
            unplaced,
            wanted,
            needs: demand.saturating_sub(self.free_uncapped),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn node(os: &str, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            id: "n".into(),
            allocatable: Resources::new(8_000, 16_384),
            allocated: Resources::ZERO,
            os: os.into(),
            arch: "x86_64".into(),
            pool: "default".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            templates: BTreeSet::new(),
            schedulable: true,
            max_sandboxes: None,
            sandbox_count: 0,
        }
    }

    #[test]
    fn os_arch_pool_equal_and_not_equal() {
        let n = node("linux", &[]);
        assert!(satisfies(&n, &Constraint::equal(Attribute::Os, "linux")));
        assert!(!satisfies(&n, &Constraint::equal(Attribute::Os, "macos")));
        assert!(satisfies(
            &n,
            &Constraint::not_equal(Attribute::Os, "macos")
        ));
        assert!(!satisfies(
            &n,
            &Constraint::not_equal(Attribute::Arch, "x86_64")
        ));
        assert!(satisfies(
            &n,
            &Constraint::equal(Attribute::Pool, "default")
        ));
        assert!(!satisfies(&n, &Constraint::equal(Attribute::Pool, "gpu")));
    }

    #[test]
    fn labels_equal_missing_and_not_equal() {
        let n = node("linux", &[("gpu", "a100")]);
        assert!(satisfies(
            &n,
            &Constraint::equal(Attribute::Label("gpu".into()), "a100")
        ));
        assert!(!satisfies(
            &n,
            &Constraint::equal(Attribute::Label("gpu".into()), "h100")
        ));
        assert!(!satisfies(
            &n,
            &Constraint::equal(Attribute::Label("zone".into()), "a")
        ));
        assert!(satisfies(
            &n,
            &Constraint::not_equal(Attribute::Label("zone".into()), "a")
        ));
        assert!(!satisfies(
            &n,
            &Constraint::not_equal(Attribute::Label("gpu".into()), "a100")
        ));
    }

    #[test]
    fn unschedulable_node_is_not_feasible() {
        let mut n = node("linux", &[]);
        assert!(statically_feasible(&n, &[]));
        n.schedulable = false;
        assert!(!statically_feasible(&n, &[]));
    }

    #[test]
    fn fits_is_min_of_resources_and_cap() {
        let per = Resources::new(1_000, 2_048);
        assert_eq!(fits(&Resources::new(8_000, 16_384), u32::MAX, &per), 8);
        assert_eq!(fits(&Resources::new(8_000, 4_096), u32::MAX, &per), 2);
        assert_eq!(fits(&Resources::new(8_000, 16_384), 2, &per), 2);
        assert_eq!(fits(&Resources::new(999, 16_384), 5, &per), 0);
    }

    #[test]
    fn no_feasible_reason_names_the_constraint() {
        let nodes = [node("linux", &[]), node("macos", &[])];
        let r =
            no_feasible_node_reason(nodes.iter(), &[Constraint::equal(Attribute::Os, "windows")]);
        assert_eq!(r.to_string(), "no node with os=windows");
        let both = [
            Constraint::equal(Attribute::Os, "linux"),
            Constraint::equal(Attribute::Os, "macos"),
        ];
        let r = no_feasible_node_reason(nodes.iter(), &both);
        assert_eq!(r.to_string(), "no node satisfies all of os=linux, os=macos");
        let down: Vec<NodeView> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.schedulable = false;
                n
            })
            .collect();
        let r = no_feasible_node_reason(down.iter(), &[]);
        assert_eq!(r, Reason::NoNodeWith { constraint: None });
    }

    #[test]
    fn shortage_tells_cap_from_capacity() {
        let mut mac = node("macos", &[]);
        mac.max_sandboxes = Some(2);
        let per = Resources::new(1_000, 1_024);
        let capped = ClassShortage::measure([(&mac, mac.allocatable, 0u32)].into_iter(), &per);
        assert_eq!(
            capped.reason(&per, 3, 5).to_string(),
            "node cap: at most 2 macos sandboxes per host"
        );
        let full = ClassShortage::measure([(&mac, Resources::ZERO, 2u32)].into_iter(), &per);
        assert_eq!(
            full.reason(&per, 4_000, 5_000).to_string(),
            "needs 4,000 more CPUs and 4,000 GiB more memory (4,000 of 5,000 sandboxes unplaced)"
        );
        let huge = Resources::new(9_000, 1);
        let r = ClassShortage::measure([(&mac, mac.allocatable, 2u32)].into_iter(), &huge);
        assert_eq!(
            r.reason(&huge, 1, 1),
            Reason::TooLarge {
                per_sandbox: huge,
                largest: mac.allocatable
            }
        );
        assert_eq!(
            r.reason(&huge, 1, 1).to_string(),
            "no feasible node is large enough: job asks 9 CPUs / 1 MiB per sandbox, largest node has 8 CPUs / 16 GiB"
        );
    }
}
