//! Node order and pruning shared by the passes.
//!
//! Passes rebuild graphs; these helpers keep only what the outputs reach and keep the input's
//! order wherever they can, so `NN-pass.ir` dumps of consecutive passes diff line by line.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use ditto_ir::{Graph, Id, IrError, Op, RecExpr};
use egg::Language;

/// Keeps only the kernels some `fused` node of `g` refers to.
pub(crate) fn retain_used_kernels(g: &mut Graph) {
    let used: std::collections::BTreeSet<String> = g
        .nodes()
        .iter()
        .filter_map(|n| match n {
            ditto_ir::Op::Fused(ch) => ch.first().map(|&k| g.node(k).name()),
            _ => None,
        })
        .collect();
    g.kernels.retain(|name, _| used.contains(name));
}

/// The nodes reachable from `root`, each once, children before parents, `root` last.
///
/// Among the nodes whose operands are ready, the one with the smallest `key` comes first;
/// passes key nodes by their position in the input graph, so a rewritten graph keeps the
/// input's order wherever it can and consecutive dumps diff cleanly. A node keyed
/// `usize::MAX` (new, no position) goes right after its latest operand. (`Graph::pruned`,
/// through egg's `build_recexpr`, renumbers depth-first from the last operand instead.)
pub(crate) fn ordered(
    root: &Op,
    get: impl Fn(Id) -> Result<Op, IrError>,
    key: impl Fn(Id) -> usize,
) -> Result<RecExpr<Op>, IrError> {
    // The reachable nodes.
    let mut nodes: HashMap<Id, Op> = HashMap::new();
    let mut todo: Vec<Id> = root.children().to_vec();
    while let Some(id) = todo.pop() {
        if nodes.contains_key(&id) {
            continue;
        }
        let node = get(id)?;
        todo.extend(node.children().iter().filter(|c| !nodes.contains_key(c)));
        nodes.insert(id, node);
    }
    // Kahn's algorithm with a priority queue on (key, id).
    let mut waiting: HashMap<Id, usize> = HashMap::new();
    let mut dependents: HashMap<Id, Vec<Id>> = HashMap::new();
    let mut ready = BinaryHeap::new();
    for (&id, node) in &nodes {
        let children: HashSet<Id> = node.children().iter().copied().collect();
        for &c in &children {
            dependents.entry(c).or_default().push(id);
        }
        if children.is_empty() {
            let k = key(id);
            ready.push(Reverse((if k == usize::MAX { 0 } else { k }, id)));
        } else {
            waiting.insert(id, children.len());
        }
    }
    let mut expr = RecExpr::default();
    let mut new_id: HashMap<Id, Id> = HashMap::new();
    let map = |node: &Op, new_id: &HashMap<Id, Id>| -> Result<Op, IrError> {
        let mut node = node.clone();
        for c in node.children_mut() {
            *c = *new_id
                .get(c)
                .ok_or_else(|| IrError::Other(format!("%{c} is part of a cycle")))?;
        }
        Ok(node)
    };
    let mut priority: HashMap<Id, usize> = HashMap::new();
    while let Some(Reverse((p, id))) = ready.pop() {
        let node = nodes
            .get(&id)
            .ok_or_else(|| IrError::Other(format!("%{id} vanished")))?;
        new_id.insert(id, expr.add(map(node, &new_id)?));
        priority.insert(id, p);
        for &d in dependents.get(&id).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    waiting.remove(&d);
                    let k = match key(d) {
                        usize::MAX => nodes.get(&d).map_or(0, |n| {
                            let ps = n.children().iter().filter_map(|c| priority.get(c));
                            ps.copied().max().unwrap_or(0)
                        }),
                        k => k,
                    };
                    ready.push(Reverse((k, d)));
                }
            }
        }
    }
    if let Some(id) = waiting.keys().min() {
        return Err(IrError::Other(format!("%{id} is part of a cycle")));
    }
    expr.add(map(root, &new_id)?);
    Ok(expr)
}

/// A graph's nodes reachable from its outputs, in their current order (see [`ordered`]),
/// with only the kernels still referred to.
pub(crate) fn pruned_in_order(g: &Graph) -> Result<Graph, IrError> {
    let names: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();
    let root = Op::Outputs(g.outputs.iter().map(|(_, id)| *id).collect());
    let expr = ordered(&root, |id| Ok(g.node(id).clone()), usize::from)?;
    let mut out = Graph::from_recexpr(&expr, &names, g.kernels.clone())?;
    retain_used_kernels(&mut out);
    Ok(out)
}
