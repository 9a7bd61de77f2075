//! Bottom-up extraction with a worklist.
//!
//! egg's `Extractor` recomputes every e-class until nothing changes, visiting classes in hash
//! order; on a DiT graph (a chain thousands of ops deep) that is one sweep per level, seconds
//! for a 30-block model. Here a node is (re)costed only when one of its children got
//! cheaper, starting from the leaves, which is linear in practice. Ties keep the node found
//! first; the order is deterministic.

use std::collections::{HashMap, HashSet, VecDeque};

use ditto_ir::{IrEGraph, Op};
use egg::{CostFunction, Id, Language};

/// The cheapest node of every e-class with a finite cost, and that cost.
pub fn extract<CF: CostFunction<Op>>(
    egraph: &IrEGraph,
    mut cost_fn: CF,
) -> HashMap<Id, (CF::Cost, Op)> {
    let mut parents: HashMap<Id, Vec<(Id, usize)>> = HashMap::new();
    let mut queue: VecDeque<(Id, usize)> = VecDeque::new();
    for class in egraph.classes() {
        for (k, node) in class.nodes.iter().enumerate() {
            for &c in node.children() {
                parents
                    .entry(egraph.find(c))
                    .or_default()
                    .push((class.id, k));
            }
            if node.is_leaf() {
                queue.push_back((class.id, k));
            }
        }
    }
    let mut queued: HashSet<(Id, usize)> = queue.iter().copied().collect();
    let mut best: HashMap<Id, (CF::Cost, Op)> = HashMap::new();
    while let Some((cid, k)) = queue.pop_front() {
        queued.remove(&(cid, k));
        let node = &egraph[cid].nodes[k];
        if !node
            .children()
            .iter()
            .all(|c| best.contains_key(&egraph.find(*c)))
        {
            continue;
        }
        let cost = cost_fn.cost(node, |c| best[&egraph.find(c)].0.clone());
        let better = match best.get(&cid) {
            None => true,
            Some((old, _)) => cost < *old,
        };
        if better {
            best.insert(cid, (cost, node.clone()));
            for &p in parents.get(&cid).into_iter().flatten() {
                if queued.insert(p) {
                    queue.push_back(p);
                }
            }
        }
    }
    best
}
