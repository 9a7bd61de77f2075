//! Sequence and CFG sharding on the e-graph.
//!
//! The graph enters with one value per tensor, replicated. The pass seeds every token
//! sequence the model marked (`seq x`) with its equal form `all_gather(shard(x))` over the
//! sequence-parallel ranks (padded to a multiple of the degree), and with CFG parallelism
//! every batch-carrying input with `all_gather(shard(x))` over the CFG pair. Equality
//! saturation then pushes the gathers through every op that works row by row (`rules`), and
//! at each attention offers the gathered form next to Ulysses, Ring and USP. Extraction with
//! the cost model (`cost`) picks, per value, the cheapest equal form: compute on the local
//! rows, gather as late as possible, and the attention method the links favour.

mod cost;
mod dag_extract;
mod rules;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ditto_ir::mesh::{Mesh, SeqMethod};
use ditto_ir::{Graph, IrEGraph, IrError, Meta, Op, ShapeAnalysis, Symbol};
use egg::{Id, Language};

pub use cost::{link_preset, CostModel, Device, Link, ETHERNET, H100, NVLINK, PCIE};

use crate::order::{ordered, retain_used_kernels};
use crate::{Pass, PassError, PassOutcome};
use rules::{Offer, Sweep};

/// Which attention forms the pass may choose from.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodChoice {
    /// The layout the user forced (`--ulysses-degree`/`--ring-degree`): Ulysses when only
    /// Ulysses is > 1, Ring when only Ring is, USP when both are.
    Forced,
    /// Every method (and the gathered form); the cost model picks per attention.
    Auto,
    /// Displaced patch parallelism (DistriFusion, PCPP, PipeFusion's patches): every self-
    /// or joint attention over the split sequence becomes `seq_attention ... displaced`,
    /// whose K/V of the other Sp members may be one denoising step stale. Unlike the other
    /// choices this also shards a mesh whose Sp degree is 1 (seeding the sequences with one
    /// part), so that a 1-part and an M-part program of the same graph have the same
    /// displaced attentions in the same order: PipeFusion runs its warmup steps with the
    /// former and its patch steps with the latter over one shared stale state.
    Stale,
}

#[derive(Clone, Debug)]
pub struct ShardSequence {
    pub mesh: Mesh,
    pub choice: MethodChoice,
    pub device: Device,
    pub link: Link,
    pub max_iterations: usize,
    pub max_nodes: usize,
    pub max_time: Duration,
}

/// What the pass decided, for `ditto compile` and `--report`.
#[derive(Clone, Debug, Default)]
pub struct ShardPlan {
    /// Predicted seconds of one forward on one rank (critical path).
    pub predicted_s: f64,
    /// Per attention, in program order: the chosen form and its predicted seconds.
    pub attentions: Vec<(String, f64)>,
    /// Token rows computed per rank, padded and valid, over all split sequences.
    pub padded_rows: usize,
    pub valid_rows: usize,
}

impl ShardSequence {
    pub fn new(mesh: Mesh, choice: MethodChoice, link: Link) -> Self {
        ShardSequence {
            mesh,
            choice,
            device: H100,
            link,
            max_iterations: 64,
            max_nodes: 2_000_000,
            max_time: Duration::from_secs(30),
        }
    }

    fn offer(&self) -> Offer {
        let m = self.mesh;
        match self.choice {
            MethodChoice::Forced => Offer {
                methods: vec![match (m.ulysses > 1, m.ring > 1) {
                    (true, true) => SeqMethod::Usp,
                    (false, true) => SeqMethod::Ring,
                    _ => SeqMethod::Ulysses,
                }],
                allow_gather: false,
            },
            MethodChoice::Stale => Offer {
                methods: vec![SeqMethod::Displaced],
                allow_gather: false,
            },
            MethodChoice::Auto => {
                let mut methods = vec![SeqMethod::Ulysses, SeqMethod::Ring];
                if m.ulysses > 1 && m.ring > 1 {
                    methods.push(SeqMethod::Usp);
                }
                Offer {
                    methods,
                    allow_gather: true,
                }
            }
        }
    }

    /// Shards `g` and reports the plan. With `MethodChoice::Auto` every attention method
    /// (and the gathered form) is planned on its own and the cheapest whole plan wins, so
    /// all attentions of a model use one method and the comparison is between whole
    /// programs.
    pub fn plan(&self, g: &Graph) -> Result<(Graph, ShardPlan, Vec<String>), PassError> {
        if matches!(self.choice, MethodChoice::Forced | MethodChoice::Stale) {
            return self.plan_with(g, &self.offer());
        }
        let m = self.mesh;
        let mut offers = vec![
            (
                "gather",
                Offer {
                    methods: vec![],
                    allow_gather: true,
                },
            ),
            (
                "ulysses",
                Offer {
                    methods: vec![SeqMethod::Ulysses],
                    allow_gather: false,
                },
            ),
            (
                "ring",
                Offer {
                    methods: vec![SeqMethod::Ring],
                    allow_gather: false,
                },
            ),
        ];
        if m.ulysses > 1 && m.ring > 1 {
            offers.push((
                "usp",
                Offer {
                    methods: vec![SeqMethod::Usp],
                    allow_gather: false,
                },
            ));
        }
        if m.sp() == 1 {
            offers.truncate(1);
        }
        let mut tried = Vec::new();
        let mut best: Option<(Graph, ShardPlan, Vec<String>)> = None;
        for (name, offer) in &offers {
            let planned = self.plan_with(g, offer)?;
            tried.push(format!("{name} {:.3} ms", planned.1.predicted_s * 1e3));
            if best
                .as_ref()
                .is_none_or(|b| planned.1.predicted_s < b.1.predicted_s)
            {
                best = Some(planned);
            }
        }
        let (out, plan, mut notes) = best.ok_or_else(|| PassError::Failed {
            pass: "shard_sequence",
            reason: "no plan".into(),
        })?;
        notes.push(format!(
            "auto: whole plans per attention method: {}",
            tried.join(", ")
        ));
        Ok((out, plan, notes))
    }

    fn plan_with(
        &self,
        g: &Graph,
        offer: &Offer,
    ) -> Result<(Graph, ShardPlan, Vec<String>), PassError> {
        let pass = "shard_sequence";
        let fail = |reason: String| PassError::Failed { pass, reason };
        let m = self.mesh;
        if m.cfg > 2 || m.cfg == 0 || m.sp() == 0 {
            return Err(fail(format!(
                "mesh cfg {} x ring {} x ulysses {}: the CFG degree is 1 or 2, the others at least 1",
                m.cfg, m.ring, m.ulysses
            )));
        }
        let names: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();
        let mut eg = IrEGraph::new(ShapeAnalysis);
        let mut class_of: Vec<Id> = Vec::with_capacity(g.len() + 1);
        for node in g.nodes() {
            let n = node.clone().map_children(|c| class_of[usize::from(c)]);
            class_of.push(eg.add(n));
        }
        let root = eg.add(Op::Outputs(
            g.outputs
                .iter()
                .map(|(_, id)| class_of[usize::from(*id)])
                .collect(),
        ));
        class_of.push(root);

        // Seeds.
        let mut notes = Vec::new();
        if m.cfg == 2 {
            // The batch is that of the model's latents, or, in a part cut out of the model
            // (a pipeline stage, a cached block stack), of the streams it carries in.
            let input_batch = |want: &dyn Fn(&str) -> bool| {
                g.nodes().iter().enumerate().find_map(|(i, n)| match n {
                    Op::Input(ch) if want(&g.node(ch[0]).name()) => {
                        g.shape(Id::from(i)).first().copied()
                    }
                    _ => None,
                })
            };
            let batch = input_batch(&|n| n == "hidden_states")
                .or_else(|| input_batch(&|n| n.starts_with("carry.")))
                .ok_or_else(|| {
                    fail("CFG parallel needs a `hidden_states` (or carried `carry.*`) input".into())
                })?;
            if batch % 2 != 0 {
                return Err(fail(format!(
                    "CFG parallel splits the [negative, positive] batch in two, but the batch is {batch}"
                )));
            }
            for (i, n) in g.nodes().iter().enumerate() {
                let Op::Input(ch) = n else { continue };
                // Position ids (Flux's img_ids/txt_ids) have no batch axis.
                let name = g.node(ch[0]).name();
                let id = Id::from(i);
                if name.ends_with("_ids") || g.shape(id).first() != Some(&batch) {
                    continue;
                }
                seed(&mut eg, class_of[i], 0, "cfg", 2, batch);
            }
        }
        let mut padded_rows = 0;
        let mut valid_rows = 0;
        // Displaced attention shards even over one part (see `MethodChoice::Stale`).
        if m.sp() > 1 || self.choice == MethodChoice::Stale {
            let mut marked = 0;
            for (i, n) in g.nodes().iter().enumerate() {
                if let Op::Seq(_) = n {
                    let s = g.shape(Id::from(i))[1];
                    seed(&mut eg, class_of[i], 1, "sp", m.sp(), s);
                    padded_rows += s.div_ceil(m.sp()) * m.sp();
                    valid_rows += s;
                    marked += 1;
                }
            }
            if marked == 0 {
                return Err(fail(
                    "sequence parallelism needs a token sequence, and this model marks none".into(),
                ));
            }
        }
        eg.rebuild();

        // Saturation.
        let start = Instant::now();
        let mut iterations = 0;
        let stop = loop {
            if iterations >= self.max_iterations {
                break format!("stopped at iteration limit {}", self.max_iterations);
            }
            if eg.total_size() > self.max_nodes {
                break format!("stopped at node limit {}", self.max_nodes);
            }
            if start.elapsed() > self.max_time {
                break format!("stopped at time limit {:?}", self.max_time);
            }
            iterations += 1;
            // Classes in creation order: the input graph's nodes come in topological order.
            let mut snapshot: Vec<(Id, Op)> = eg
                .classes()
                .flat_map(|c| c.nodes.iter().map(move |n| (c.id, n.clone())))
                .collect();
            snapshot.sort_by_key(|(c, _)| *c);
            let mut sweep = Sweep {
                eg: &mut eg,
                changed: false,
                offer,
            };
            for (class, node) in &snapshot {
                sweep.apply(*class, node);
            }
            let changed = sweep.changed;
            eg.rebuild();
            if !changed {
                break "saturated".to_string();
            }
        };
        notes.push(format!(
            "e-graph: {iterations} iterations, {} nodes, {} classes, {stop}",
            eg.total_size(),
            eg.number_of_classes()
        ));

        // Extraction. A forced layout is what the user chose: extraction then only avoids
        // redundant compute (communication costs next to nothing: a link of 1e21 B/s, so it
        // only breaks ties between forms of equal compute, towards fewer bytes, e.g. a CFG
        // gather of local rows rather than of the whole sequence), so every op that can run
        // on the local rows does; the link model prices the chosen plan in the notes.
        let model = CostModel {
            device: self.device,
            link: self.link,
            mesh: m,
        };
        let extraction_model = match self.choice {
            MethodChoice::Auto => model,
            MethodChoice::Forced | MethodChoice::Stale => CostModel {
                link: Link {
                    name: "tie-break",
                    latency_s: 0.0,
                    bytes_per_s: 1e21,
                },
                ..model
            },
        };
        let stale = self.choice == MethodChoice::Stale;
        let best = dag_extract::extract(&eg, |node, class| {
            // Displaced attention is what the user asked for: an attention over gathered
            // queries (the unsharded original) must not win, which it could on one part,
            // where the local and the gathered forms cost the same.
            if stale && rules::attends_gathered_queries(&eg, node) {
                return f64::INFINITY;
            }
            let cost = extraction_model.node_cost(&eg, node, &eg[class].data);
            // On one part the local and the gathered forms of an op cost the same; break
            // the tie towards the local rows, so that the 1-part program has the M-part
            // program's structure (gathers in the same places).
            if stale && !matches!(node, Op::AllGather(_)) && rules::has_sp_gather(&eg, class, None)
            {
                return cost + 1e-12;
            }
            // Gather over the CFG pair before the Sp ranks, not after: the two orders move
            // the same bytes, but with PipeFusion's virtual patches the Sp gather assembles
            // the whole image, so a CFG gather after it would move the whole image per patch.
            if stale && rules::cfg_gather_of_sp_gathered(&eg, node) {
                return cost + 1e-12;
            }
            cost
        });
        let pick = |id: Id| {
            best.get(&eg.find(id))
                .map(|(_, node)| node.clone())
                .ok_or_else(|| IrError::Other(format!("e-class {id} has no finite cost")))
        };
        let mut first_seen: HashMap<Id, usize> = HashMap::new();
        for (i, &c) in class_of.iter().enumerate() {
            first_seen.entry(eg.find(c)).or_insert(i);
        }
        let key = |id: Id| first_seen.get(&eg.find(id)).copied().unwrap_or(usize::MAX);
        let mut out = pick(root)
            .and_then(|r| ordered(&r, pick, key))
            .and_then(|expr| Graph::from_recexpr(&expr, &names, g.kernels.clone()))
            .map_err(|error| PassError::Ir { pass, error })?;
        retain_used_kernels(&mut out);
        for ((name, old), (_, new)) in g.outputs.iter().zip(&out.outputs) {
            if g.meta(*old) != out.meta(*new) {
                return Err(fail(format!(
                    "output `{name}` changed from {} to {}",
                    g.meta(*old),
                    out.meta(*new)
                )));
            }
        }
        let predicted_s = total_cost(&eg, &best, &model, root);

        // The plan, as chosen.
        let mut plan = ShardPlan {
            predicted_s,
            padded_rows,
            valid_rows,
            ..Default::default()
        };
        for n in out.nodes() {
            match n {
                Op::SeqAttention(ch) => {
                    let (qs, ks) = (out.shape(ch[0]), out.shape(ch[1]));
                    let heads = out.int_attr(ch[3]).unwrap_or(1).max(1) as usize;
                    let method = out.node(ch[5]).name();
                    let s = model.seq_attention(
                        SeqMethod::parse(&method).unwrap_or(SeqMethod::Ring),
                        qs[0],
                        qs[1],
                        ks[1],
                        heads,
                        qs[2] / heads,
                    );
                    plan.attentions.push((method, s));
                }
                Op::Attention(ch) => {
                    let split_axis = match out.tensor(ch[0]).map(|t| &t.dist) {
                        Some(ditto_ir::Dist::Split { axis, .. }) => Some(*axis),
                        _ => None,
                    };
                    let (qs, ks) = (out.shape(ch[0]), out.shape(ch[1]));
                    let s = 4.0 * (qs[0] * qs[1] * ks[1] * qs[2]) as f64 / self.device.flops_per_s;
                    let what = match split_axis {
                        Some(1) => "local queries, gathered keys",
                        _ => "whole sequence",
                    };
                    plan.attentions.push((what.to_string(), s));
                }
                _ => {}
            }
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (m, _) in &plan.attentions {
            *counts.entry(m.as_str()).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        notes.push(format!(
            "mesh cfg {} x ring {} x ulysses {} ({} link): attention {}; predicted {:.3} ms per forward per rank",
            m.cfg,
            m.ring,
            m.ulysses,
            self.link.name,
            counts
                .iter()
                .map(|(m, n)| format!("{m} x{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            predicted_s * 1e3
        ));
        notes.push(format!(
            "per attention (predicted us): {}",
            plan.attentions
                .iter()
                .map(|(m, s)| format!("{m} {:.1}", s * 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if padded_rows > valid_rows {
            notes.push(format!(
                "padding: {} token rows computed for {} valid (+{:.1}%)",
                padded_rows,
                valid_rows,
                100.0 * (padded_rows - valid_rows) as f64 / valid_rows.max(1) as f64
            ));
        }
        Ok((out, plan, notes))
    }
}

/// Seconds of the extracted program on one rank under `model` (which may differ from the
/// model extraction ran with): the sum over the distinct chosen values.
fn total_cost(eg: &IrEGraph, best: &HashMap<Id, (f64, Op)>, model: &CostModel, root: Id) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![eg.find(root)];
    let mut total = 0.0;
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        let Some((_, node)) = best.get(&c) else {
            return f64::INFINITY;
        };
        total += model.node_cost(eg, node, &eg[c].data);
        stack.extend(node.children().iter().map(|&k| eg.find(k)));
    }
    total
}

/// Unions `class` (rows along `axis`, `len` of them) with `all_gather(shard(class))`.
fn seed(eg: &mut IrEGraph, class: Id, axis: usize, mesh: &str, parts: usize, len: usize) {
    let a = eg.add(Op::Int(axis as i64));
    let m = eg.add(Op::Name(Symbol::from(mesh)));
    let p = eg.add(Op::Int(parts as i64));
    let l = eg.add(Op::Int(len.div_ceil(parts) as i64));
    let v = eg.add(Op::Int(len as i64));
    let s = eg.add(Op::Shard([class, a, m, p, l, v].into()));
    let g = eg.add(Op::AllGather([s, a, m, p, l, v].into()));
    debug_assert!(!matches!(eg[g].data, Meta::Invalid(_)));
    eg.union(class, g);
}

impl Pass for ShardSequence {
    fn name(&self) -> &'static str {
        "shard_sequence"
    }
    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError> {
        if self.mesh.world_size() == 1 && self.choice != MethodChoice::Stale {
            return Ok(PassOutcome::new(
                g.clone(),
                vec!["one rank: nothing to shard".into()],
            ));
        }
        let (out, _, notes) = self.plan(g)?;
        Ok(PassOutcome::new(out, notes))
    }
}
