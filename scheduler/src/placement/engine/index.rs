//! Feasibility classes and the free-capacity indexes over their nodes.

use crate::placement::feasible;
use crate::placement::rank::FreeIndex;
use crate::placement::{Constraint, Resources};

use super::{Class, Engine, NodeState, Undo};

impl Engine<'_> {
    /// The feasibility class of a constraint set, built on first use.
    pub(super) fn class_for(&mut self, constraints: &[Constraint]) -> usize {
        // Most jobs give their constraints already sorted (or none): look up without allocating.
        if constraints.windows(2).all(|w| w[0] < w[1]) {
            if let Some(&id) = self.class_ids.get(constraints) {
                return id;
            }
        }
        let mut key = constraints.to_vec();
        key.sort();
        key.dedup();
        if let Some(&id) = self.class_ids.get(&key) {
            return id;
        }
        #[allow(
            clippy::cast_possible_truncation,
            reason = "node numbers are u32 by design; a cluster has far fewer than 2^32 nodes"
        )]
        let members: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&n| feasible::statically_feasible(self.nodes[n as usize], &key))
            .collect();
        let index = self.build_index(&members);
        let id = self.classes.len();
        self.classes.push(Class {
            nodes: members,
            index,
        });
        self.class_ids.insert(key, id);
        id
    }

    /// The index over the class's nodes that hold `template`, if any do.
    pub(super) fn template_index_for(&mut self, class: usize, template: &str) -> Option<usize> {
        if template.is_empty() {
            return None;
        }
        if let Some(&found) = self
            .template_indices
            .get(&class)
            .and_then(|m| m.get(template))
        {
            return found;
        }
        let members: Vec<u32> = self.classes[class]
            .nodes
            .iter()
            .copied()
            .filter(|&n| self.nodes[n as usize].templates.contains(template))
            .collect();
        let found = if members.is_empty() {
            None
        } else {
            Some(self.build_index(&members))
        };
        self.template_indices
            .entry(class)
            .or_default()
            .insert(template.to_string(), found);
        found
    }

    pub(super) fn build_index(&mut self, members: &[u32]) -> usize {
        let id = self.indices.len();
        let entries: Vec<(u32, Resources)> = members
            .iter()
            .filter(|&&n| self.state[n as usize].slots > 0)
            .map(|&n| (n, self.state[n as usize].free))
            .collect();
        self.indices.push(FreeIndex::build(&entries));
        for &n in members {
            self.memberships[n as usize].push(id);
        }
        id
    }

    /// Changes a node's free capacity, keeping every index that holds it in order.
    pub(in crate::placement) fn set_node(&mut self, node: u32, new: NodeState, record: bool) {
        let old = self.state[node as usize];
        if record {
            self.undo.push(Undo::Node { node, state: old });
        }
        for &idx in &self.memberships[node as usize] {
            let index = &mut self.indices[idx];
            if old.slots > 0 {
                index.remove(node, old.free);
            }
            if new.slots > 0 {
                index.insert(node, new.free);
            }
        }
        self.state[node as usize] = new;
        self.epoch += 1;
    }
}
