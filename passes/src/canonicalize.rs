//! `canonicalize`: semantics-preserving simplification by equality saturation.
//!
//! Model builders write what the reference PyTorch code does, which leaves layout noise:
//! a reshape of a reshape, a permute undone by the next one, `x * 1.0`, `x + 0.0`, a slice
//! that keeps the whole axis. Removing it here means fusion sees longer elementwise chains
//! and codegen emits fewer copies. The rules (see [`rules`]) run on an
//! `egg::EGraph<Op, ShapeAnalysis>`; the e-graph is bounded (iterations, e-nodes, time) and
//! the pass's notes say which bound, if any, stopped it — a bounded run still yields a
//! correct graph, only a less simplified one. Extraction takes, per e-class, the cheapest
//! node by node count (see [`NodeCount`]); the graph is rebuilt with
//! [`Graph::from_recexpr`], which re-infers and re-checks every node, keeping only what
//! the outputs reach.

pub(crate) mod extract;
pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ditto_ir::{Graph, IrEGraph, IrError, Op, ShapeAnalysis};
use egg::{CostFunction, Id, Language, Runner, SimpleScheduler, StopReason};

use crate::{ordered, retain_used_kernels, Pass, PassError, PassOutcome};

/// Default bound on saturation iterations.
pub const MAX_ITERATIONS: usize = 32;
/// Default bound on e-nodes (the input graph's nodes count too).
pub const MAX_NODES: usize = 500_000;
/// Default bound on wall time spent in the e-graph.
pub const MAX_TIME: Duration = Duration::from_secs(10);

/// Bounds on the e-graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            iterations: MAX_ITERATIONS,
            nodes: MAX_NODES,
            time: MAX_TIME,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Canonicalize {
    pub limits: Limits,
}

impl Canonicalize {
    pub fn with_limits(limits: Limits) -> Self {
        Canonicalize { limits }
    }
}

/// Extraction cost: the size of the term (nodes, shared subterms counted once per use,
/// saturating), then its height. Every rule replaces a term by a strictly smaller one, so
/// the size alone picks the simplified form — until a deep DAG's tree size saturates
/// `usize`, where the height (which never overflows and also strictly drops under every
/// rule) still breaks the tie the right way.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeCount;

impl CostFunction<Op> for NodeCount {
    type Cost = (usize, usize);

    fn cost<C>(&mut self, enode: &Op, mut costs: C) -> Self::Cost
    where
        C: FnMut(Id) -> Self::Cost,
    {
        enode.children().iter().fold((1, 1), |(size, height), &c| {
            let (s, h) = costs(c);
            (size.saturating_add(s), height.max(h.saturating_add(1)))
        })
    }
}

/// egg reports the value it measured (the e-graph's size, the elapsed time); the note names
/// the configured bound as well, so a dump says which limit to raise.
fn describe_stop(reason: Option<&StopReason>, limits: &Limits) -> String {
    match reason {
        Some(StopReason::Saturated) => "saturated".into(),
        Some(StopReason::IterationLimit(_)) => {
            format!("stopped at iteration limit {}", limits.iterations)
        }
        Some(StopReason::NodeLimit(n)) => {
            format!("stopped at node limit {} (reached {n})", limits.nodes)
        }
        Some(StopReason::TimeLimit(s)) => {
            format!("stopped at time limit {:?} (after {s:.3}s)", limits.time)
        }
        Some(StopReason::Other(why)) => format!("stopped: {why}"),
        None => "did not run".into(),
    }
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError> {
        let pass = self.name();
        let names: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();
        // Add node by node, to remember where each e-class first appeared in the input.
        let mut egraph = IrEGraph::new(ShapeAnalysis);
        let mut class_of: Vec<Id> = Vec::with_capacity(g.len() + 1);
        let class = |class_of: &[Id], c: Id| {
            class_of
                .get(usize::from(c))
                .copied()
                .ok_or_else(|| PassError::Failed {
                    pass,
                    reason: format!("%{c} is used before it is defined (or is not a node)"),
                })
        };
        for node in g.nodes() {
            let mut node = node.clone();
            for c in node.children_mut() {
                *c = class(&class_of, *c)?;
            }
            class_of.push(egraph.add(node));
        }
        let outputs = g
            .outputs
            .iter()
            .map(|(_, id)| class(&class_of, *id))
            .collect::<Result<_, _>>()?;
        let root = egraph.add(Op::Outputs(outputs));
        class_of.push(root);
        let rules = rules::rules();
        let runner = Runner::<Op, ShapeAnalysis, ()>::new(ShapeAnalysis)
            .with_egraph(egraph)
            .with_scheduler(SimpleScheduler)
            .with_iter_limit(self.limits.iterations)
            .with_node_limit(self.limits.nodes)
            .with_time_limit(self.limits.time)
            .run(&rules);

        let stop = describe_stop(runner.stop_reason.as_ref(), &self.limits);
        let hit_bound = !matches!(runner.stop_reason, Some(StopReason::Saturated));
        let mut applied: BTreeMap<String, usize> = BTreeMap::new();
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *applied.entry(rule.to_string()).or_default() += n;
            }
        }
        let mut notes = vec![format!(
            "e-graph: {} iterations, {} nodes, {} classes, {stop}",
            runner.iterations.len(),
            runner.egraph.total_size(),
            runner.egraph.number_of_classes(),
        )];
        if hit_bound {
            tracing::warn!(
                pass,
                "e-graph {stop}; the result is correct but may be less simplified"
            );
        }
        notes.push(if applied.is_empty() {
            "rewrites applied: none".to_string()
        } else {
            let list: Vec<String> = applied.iter().map(|(r, n)| format!("{r} x{n}")).collect();
            format!("rewrites applied: {}", list.join(", "))
        });

        let eg = &runner.egraph;
        let best = extract::extract(eg, NodeCount);
        let pick = |id: Id| {
            best.get(&eg.find(id))
                .map(|(_, node)| node.clone())
                .ok_or_else(|| IrError::Other(format!("e-class {id} has no finite cost")))
        };
        // Keep the input's order: an e-class sorts where its first input node was.
        let mut first_seen: HashMap<Id, usize> = HashMap::new();
        for (i, &c) in class_of.iter().enumerate() {
            first_seen.entry(eg.find(c)).or_insert(i);
        }
        let key = |id: Id| first_seen.get(&eg.find(id)).copied().unwrap_or(usize::MAX);
        let mut rebuilt = pick(root)
            .and_then(|root| ordered(&root, pick, key))
            .and_then(|expr| Graph::from_recexpr(&expr, &names, g.kernels.clone()))
            .map_err(|error| PassError::Ir { pass, error })?;
        retain_used_kernels(&mut rebuilt);

        // A rule merging values of different shapes would go unnoticed by the re-inference
        // above (every node is consistent with its new operands); the outputs must not move.
        for ((name, old), (_, new)) in g.outputs.iter().zip(&rebuilt.outputs) {
            if g.meta(*old) != rebuilt.meta(*new) {
                return Err(PassError::Failed {
                    pass,
                    reason: format!(
                        "output `{name}` changed from {} to {}",
                        g.meta(*old),
                        rebuilt.meta(*new)
                    ),
                });
            }
        }
        Ok(PassOutcome::new(rebuilt, notes))
    }
}
