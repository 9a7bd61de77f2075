//! Extraction by total work, counting every e-class once.
//!
//! Each rank runs its program step after step, so the time of a step is the sum of its ops.
//! A tree cost would count a value once per use (and lose precision on deep graphs); a
//! critical-path cost does not see duplicated work at all, so extraction could compute one
//! attention both gathered and sharded. Here a node's cost is its own plus that of every
//! distinct e-class below it (the set is carried along as a bitset): the greedy DAG extraction
//! of the extraction literature, linear in practice with a worklist.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use ditto_ir::{IrEGraph, Op};
use egg::{Id, Language};

#[derive(Clone)]
struct Best {
    node: Op,
    own: f64,
    total: f64,
    /// Dense indices of the classes this choice depends on (excluding its own).
    below: Rc<Vec<u64>>,
}

/// The chosen node of every e-class reachable with a finite cost, and its total cost.
pub fn extract(eg: &IrEGraph, own: impl Fn(&Op, Id) -> f64) -> HashMap<Id, (f64, Op)> {
    let classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let words = classes.len().div_ceil(64);
    let mut parents: HashMap<Id, Vec<(Id, usize)>> = HashMap::new();
    let mut queue: VecDeque<(Id, usize)> = VecDeque::new();
    for class in eg.classes() {
        for (k, node) in class.nodes.iter().enumerate() {
            for &c in node.children() {
                parents.entry(eg.find(c)).or_default().push((class.id, k));
            }
            if node.is_leaf() {
                queue.push_back((class.id, k));
            }
        }
    }
    let mut best: HashMap<Id, Best> = HashMap::new();
    let mut queued: std::collections::HashSet<(Id, usize)> = queue.iter().copied().collect();
    while let Some((cid, k)) = queue.pop_front() {
        queued.remove(&(cid, k));
        let node = &eg[cid].nodes[k];
        let Some(children) = node
            .children()
            .iter()
            .map(|c| best.get(&eg.find(*c)).map(|b| (eg.find(*c), b)))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let me = index[&cid];
        let mut below = vec![0u64; words];
        for (c, b) in &children {
            let ci = index[c];
            below[ci / 64] |= 1 << (ci % 64);
            for (w, x) in below.iter_mut().zip(b.below.iter()) {
                *w |= x;
            }
        }
        if below[me / 64] & (1 << (me % 64)) != 0 {
            // The choice would depend on this class itself (a cycle through gather/shard).
            continue;
        }
        let own_cost = own(node, cid);
        let mut total = own_cost;
        for (w, &bits) in below.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                total += best.get(&classes[i]).map_or(f64::INFINITY, |b| b.own);
            }
        }
        let better = best.get(&cid).is_none_or(|b| total < b.total);
        if better {
            best.insert(
                cid,
                Best {
                    node: node.clone(),
                    own: own_cost,
                    total,
                    below: Rc::new(below),
                },
            );
            for &p in parents.get(&cid).into_iter().flatten() {
                if queued.insert(p) {
                    queue.push_back(p);
                }
            }
        }
    }
    best.into_iter()
        .map(|(c, b)| (c, (b.total, b.node)))
        .collect()
}
