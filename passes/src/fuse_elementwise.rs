//! `fuse_elementwise`: every elementwise op ends up inside a `fused` node.
//!
//! A DiT block is GEMMs, norms and attention glued together by short elementwise chains
//! (modulation `x * (1 + scale) + shift`, gating, residual adds, activations). Run one op
//! at a time, each link of a chain reads and writes a whole activation tensor; fused, the
//! chain reads its inputs once and writes one result. After this pass the runtime only
//! ever sees `fused` for elementwise work, so both backends need one elementwise path.
//!
//! A group is a connected set of elementwise nodes with one root, where every member other
//! than the root has all its consumers inside the group, so no intermediate value is
//! needed outside. Graph outputs are always roots. The group's arguments are its
//! non-elementwise operands (inputs, weights, GEMM/norm/attention results, reshapes, other
//! groups' roots); `scalar` constants are inlined as `(scalar F)`. The body is a `RecExpr`
//! over `(arg i)` leaves, stored in `Graph::kernels` under a readable name built from its
//! ops (`k0_add_mul_add`); groups with identical bodies share one kernel.
//!
//! Bodies are trees laid out exactly as egg's s-expression parser lays them out, so a graph
//! re-parsed from its text has equal kernels. A member used twice inside its group (a
//! diamond) is therefore written twice in the body; when that would make a body larger than
//! [`MAX_BODY_NODES`], the shared member becomes a root of its own group instead; so does a
//! member deeper than [`MAX_BODY_DEPTH`].

use std::collections::HashMap;

use ditto_ir::infer::broadcast_shapes;
use ditto_ir::{DType, Graph, Id, Meta, Op, RecExpr, TensorMeta};
use egg::Language;

use crate::{pruned_in_order, Pass, PassError, PassOutcome};

/// Largest kernel body (in `RecExpr` nodes) that duplicating a shared member may produce.
pub const MAX_BODY_NODES: u64 = 1024;
/// Deepest kernel body (ops from the root to an argument). Bodies are printed and parsed as
/// s-expressions by recursive code in egg, so a 20 000-op chain must not become one body;
/// real chains are a few ops long.
pub const MAX_BODY_DEPTH: u32 = 64;
/// How many op names a kernel name lists before it abbreviates.
const NAME_OPS: usize = 5;

#[derive(Debug, Clone, Copy, Default)]
pub struct FuseElementwise;

struct Group {
    root: usize,
    /// Upper bound on the body's size (nodes), counting duplicated members.
    size: u64,
}

/// A built kernel body: the tree, the graph values bound to `(arg i)`, its ops in order.
struct Body {
    expr: RecExpr<Op>,
    args: Vec<Id>,
    ops: Vec<String>,
}

impl Pass for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse_elementwise"
    }

    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError> {
        let pass = self.name();
        let nodes = g.nodes();
        let n = nodes.len();

        let mut is_output = vec![false; n];
        for (_, id) in &g.outputs {
            if let Some(o) = is_output.get_mut(usize::from(*id)) {
                *o = true;
            }
        }
        // Live nodes (reaching an output), and the live uses of each node, once per operand
        // slot (so `mul x x` uses x twice). Dead nodes are left alone and pruned at the end.
        let mut live = is_output.clone();
        let mut users: Vec<Vec<usize>> = vec![vec![]; n];
        for i in (0..n).rev() {
            if !live[i] {
                continue;
            }
            for &c in nodes[i].children() {
                let c = usize::from(c);
                if let (Some(l), Some(u)) = (live.get_mut(c), users.get_mut(c)) {
                    *l = true;
                    u.push(i);
                }
            }
        }

        // Grouping, consumers first (nodes are in topological order). `paths[i]` is the
        // number of root-to-i paths in the group: how often i's subtree appears in the body.
        let mut group_of: Vec<Option<usize>> = vec![None; n];
        let mut paths: Vec<u64> = vec![0; n];
        let mut depth: Vec<u32> = vec![0; n];
        let mut groups: Vec<Group> = vec![];
        for i in (0..n).rev() {
            let node = &nodes[i];
            if !node.is_elementwise() || !live[i] {
                continue;
            }
            let weight = 1 + 2 * node.children().len() as u64;
            let joined = match users[i].split_first() {
                Some((&first, rest)) if !is_output[i] => group_of[first]
                    .filter(|&gi| rest.iter().all(|&u| group_of[u] == Some(gi)))
                    .and_then(|gi| {
                        let p = users[i]
                            .iter()
                            .fold(0u64, |acc, &u| acc.saturating_add(paths[u]));
                        let size = groups[gi].size.saturating_add(p.saturating_mul(weight));
                        let d = users[i].iter().map(|&u| depth[u]).max().unwrap_or(0) + 1;
                        let fits = (p <= 1 || size <= MAX_BODY_NODES) && d <= MAX_BODY_DEPTH;
                        fits.then_some((gi, p, size, d))
                    }),
                _ => None,
            };
            match joined {
                Some((gi, p, size, d)) => {
                    group_of[i] = Some(gi);
                    paths[i] = p;
                    depth[i] = d;
                    groups[gi].size = size;
                }
                None => {
                    group_of[i] = Some(groups.len());
                    paths[i] = 1;
                    depth[i] = 1;
                    groups.push(Group {
                        root: i,
                        size: weight,
                    });
                }
            }
        }

        // Bodies, and the groups whose fused node would not have the root's meta.
        let mut bodies: Vec<Option<Body>> = Vec::with_capacity(groups.len());
        let mut unfused = 0usize;
        for (gi, grp) in groups.iter().enumerate() {
            let body = build_body(g, grp.root, gi, &group_of)
                .map_err(|reason| PassError::Failed { pass, reason })?;
            let fused_shape = body.args.iter().try_fold(vec![], |acc: Vec<usize>, &a| {
                g.meta(a).shape().and_then(|s| broadcast_shapes(&acc, s))
            });
            let fused_meta = fused_shape.map(|s| Meta::Tensor(TensorMeta::new(s, DType::F32)));
            if fused_meta.as_ref() == Some(g.meta(Id::from(grp.root))) {
                bodies.push(Some(body));
            } else {
                unfused += body.ops.len();
                bodies.push(None);
            }
        }

        // Kernel names: reuse an existing kernel with the same body, else a fresh name.
        let mut kernels = g.kernels.clone();
        let mut by_body: HashMap<RecExpr<Op>, String> = kernels
            .iter()
            .map(|(name, body)| (body.clone(), name.clone()))
            .collect();
        let mut next = 0usize;
        let mut kernel_of: Vec<Option<String>> = vec![None; groups.len()];
        // Groups were found consumers-first; number kernels producers-first, as they run.
        for (gi, body) in bodies.iter().enumerate().rev() {
            let Some(body) = body else { continue };
            let name = if let Some(name) = by_body.get(&body.expr) {
                name.clone()
            } else {
                let name = loop {
                    let candidate = kernel_name(next, &body.ops);
                    next += 1;
                    if !kernels.contains_key(&candidate) {
                        break candidate;
                    }
                };
                kernels.insert(name.clone(), body.expr.clone());
                by_body.insert(body.expr.clone(), name.clone());
                name
            };
            kernel_of[gi] = Some(name);
        }

        // Emit: roots of fused groups become `fused` nodes, other members disappear.
        let mut out = Graph::new();
        let mut map: Vec<Option<Id>> = vec![None; n];
        let mut fused_nodes = 0usize;
        for (i, node) in nodes.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let gi = group_of[i];
            let fused = gi.and_then(|gi| bodies[gi].as_ref().map(|b| (gi, b)));
            let new_op = match fused {
                Some((gi, body)) if groups[gi].root == i => {
                    let name = kernel_of[gi].as_deref().ok_or_else(|| PassError::Failed {
                        pass,
                        reason: format!("internal: group of %{i} has no kernel"),
                    })?;
                    let mut ch = vec![out.name(name)];
                    for a in &body.args {
                        ch.push(
                            lookup(&map, *a)
                                .map_err(|reason| PassError::Failed { pass, reason })?,
                        );
                    }
                    fused_nodes += 1;
                    Op::Fused(ch.into())
                }
                Some(_) => continue,
                None => {
                    let mut missing = None;
                    let op = node.clone().map_children(|c| {
                        lookup(&map, c).unwrap_or_else(|e| {
                            missing = Some(e);
                            c
                        })
                    });
                    if let Some(reason) = missing {
                        return Err(PassError::Failed { pass, reason });
                    }
                    op
                }
            };
            let id = out
                .add(new_op)
                .map_err(|error| PassError::Ir { pass, error })?;
            if fused.is_some() && out.meta(id) != g.meta(Id::from(i)) {
                return Err(PassError::Failed {
                    pass,
                    reason: format!(
                        "fused node for %{i} has {} instead of {}",
                        out.meta(id),
                        g.meta(Id::from(i))
                    ),
                });
            }
            map[i] = Some(id);
        }
        for (name, id) in &g.outputs {
            let id = lookup(&map, *id).map_err(|reason| PassError::Failed { pass, reason })?;
            out.output(name, id);
        }
        out.kernels = kernels;
        let out = pruned_in_order(&out).map_err(|error| PassError::Ir { pass, error })?;

        let members = bodies.iter().flatten().map(|b| b.ops.len()).sum::<usize>();
        let mut notes = vec![format!(
            "fused {members} elementwise nodes into {fused_nodes} groups using {} kernels",
            out.kernels.len()
        )];
        if unfused > 0 {
            notes.push(format!(
                "kept {unfused} elementwise nodes unfused: the fused node's shape would differ"
            ));
        }
        Ok(PassOutcome::new(out, notes))
    }
}

fn lookup(map: &[Option<Id>], old: Id) -> Result<Id, String> {
    map.get(usize::from(old))
        .copied()
        .flatten()
        .ok_or_else(|| format!("internal: %{old} used before it was emitted"))
}

/// `k7_mul_add_silu`; long chains list the first ops and how many more there are.
fn kernel_name(index: usize, ops: &[String]) -> String {
    let mut name = format!("k{index}");
    for op in ops.iter().take(NAME_OPS) {
        name.push('_');
        name.push_str(op);
    }
    if ops.len() > NAME_OPS {
        name.push_str(&format!("_and{}", ops.len() - NAME_OPS));
    }
    name
}

/// Builds the body of group `gi` rooted at `root`: a post-order tree (children left to
/// right, every occurrence written out), which is exactly how egg parses the printed form.
/// Arguments are numbered by first occurrence.
fn build_body(
    g: &Graph,
    root: usize,
    gi: usize,
    group_of: &[Option<usize>],
) -> Result<Body, String> {
    enum Step {
        Enter(Id),
        Exit(Id),
    }
    let mut expr = RecExpr::default();
    let mut args: Vec<Id> = vec![];
    let mut arg_index: HashMap<Id, usize> = HashMap::new();
    let mut ops = vec![];
    let mut values: Vec<Id> = vec![];
    let mut stack = vec![Step::Enter(Id::from(root))];
    while let Some(step) = stack.pop() {
        match step {
            Step::Enter(id) => {
                let node = g.node(id);
                if group_of.get(usize::from(id)).copied().flatten() == Some(gi) {
                    stack.push(Step::Exit(id));
                    stack.extend(node.children().iter().rev().map(|&c| Step::Enter(c)));
                } else if let Op::Scalar(c) = node {
                    let v = g
                        .float_attr(*c)
                        .ok_or_else(|| format!("scalar %{id} has no numeric value"))?;
                    let f = expr.add(Op::Float(ditto_ir::Float::new(v)));
                    values.push(expr.add(Op::Scalar(f)));
                } else {
                    let k = *arg_index.entry(id).or_insert_with(|| {
                        args.push(id);
                        args.len() - 1
                    });
                    let k = expr.add(Op::Int(k as i64));
                    values.push(expr.add(Op::Arg(k)));
                }
            }
            Step::Exit(id) => {
                let node = g.node(id);
                let arity = node.children().len();
                let start = values
                    .len()
                    .checked_sub(arity)
                    .ok_or_else(|| format!("internal: operands of %{id} missing"))?;
                let kids = values.split_off(start);
                let mut j = 0;
                let built = node.clone().map_children(|_| {
                    j += 1;
                    kids[j - 1]
                });
                ops.push(node.to_string());
                values.push(expr.add(built));
            }
        }
    }
    Ok(Body { expr, args, ops })
}
