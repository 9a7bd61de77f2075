//! The rewrite rules of `canonicalize`. Each one is semantics-preserving, and each one only
//! merges two e-classes whose analysis data (shape, dtype, distribution) is identical: an
//! identity like `x * 1` can still change a value's shape through broadcasting or its dtype
//! (an `i64` input times `1.0` is `f32`), so the appliers consult the [`ShapeAnalysis`].
//!
//! All rules are exact in f32, with one IEEE nuance: `x + 0.0 -> x` keeps `-0.0` where the
//! original produced `+0.0` (the two compare equal; every ML compiler makes this trade).
//!
//! Rules whose operands have a fixed arity are egg patterns with a [`ConditionalApplier`];
//! rules over variadic nodes (`reshape x d0 d1 ...`, `permute x p0 p1 ...`) use a small
//! custom [`Searcher`] that inspects e-nodes directly and an [`Applier`] that rebuilds the
//! replacement from attribute e-classes that already exist.

use ditto_ir::infer::infer;
use ditto_ir::{IrEGraph, Meta, Op, ShapeAnalysis};
use egg::{
    Applier, ConditionalApplier, Id, Pattern, PatternAst, Rewrite, SearchMatches, Searcher, Subst,
    Symbol, Var,
};

pub type IrRewrite = Rewrite<Op, ShapeAnalysis>;

/// The rule set, in a fixed order.
pub fn rules() -> Vec<IrRewrite> {
    vec![
        structural("reshape-reshape", reshape_of_reshape, Build::Reshape),
        structural("reshape-identity", reshape_identity, Build::Operand),
        structural("permute-permute", permute_of_permute, Build::Permute),
        structural("permute-identity", permute_identity, Build::Operand),
        constant("mul-one-right", "(mul ?x (scalar ?c))", 1.0),
        constant("mul-one-left", "(mul (scalar ?c) ?x)", 1.0),
        constant("add-zero-right", "(add ?x (scalar ?c))", 0.0),
        constant("add-zero-left", "(add (scalar ?c) ?x)", 0.0),
        constant("sub-zero", "(sub ?x (scalar ?c))", 0.0),
        constant("div-one", "(div ?x (scalar ?c))", 1.0),
        pattern_rule("neg-neg", "(neg (neg ?x))", same_meta_as_x),
        pattern_rule("slice-whole", "(slice ?x ?a ?s ?e)", slice_is_whole),
        structural("concat-of-slices", concat_of_slices, Build::Operand),
    ]
}

// ---------------------------------------------------------------- helpers

fn var(s: &str) -> Var {
    s.parse().expect("rule variables are well-formed")
}

fn int_of(eg: &IrEGraph, id: Id) -> Option<i64> {
    match eg[id].data {
        Meta::Int(i) => Some(i),
        _ => None,
    }
}

fn number_of(eg: &IrEGraph, id: Id) -> Option<f64> {
    match eg[id].data {
        Meta::Int(i) => Some(i as f64),
        Meta::Float(f) => Some(f),
        _ => None,
    }
}

/// True when `x` has exactly the analysis data of the matched e-class (a tensor).
fn same_meta(eg: &IrEGraph, eclass: Id, x: Id) -> bool {
    matches!(eg[eclass].data, Meta::Tensor(_)) && eg[x].data == eg[eclass].data
}

// ---------------------------------------------------------------- pattern rules

type Cond = dyn Fn(&mut IrEGraph, Id, &Subst) -> bool + Send + Sync;

fn pattern_rule(
    name: &str,
    lhs: &str,
    condition: impl Fn(&mut IrEGraph, Id, &Subst) -> bool + Send + Sync + 'static,
) -> IrRewrite {
    let searcher: Pattern<Op> = lhs.parse().expect("rule patterns are well-formed");
    let applier: Pattern<Op> = "?x".parse().expect("rule patterns are well-formed");
    let condition: Box<Cond> = Box::new(condition);
    Rewrite::new(
        name,
        searcher,
        ConditionalApplier {
            condition: CondFn(condition),
            applier,
        },
    )
    .expect("rule variables are bound")
}

/// `op x (scalar c)` -> `x` when `c == value` and the shapes/dtypes agree.
fn constant(name: &str, lhs: &str, value: f64) -> IrRewrite {
    let c = var("?c");
    pattern_rule(name, lhs, move |eg, eclass, subst| {
        let is_value = subst
            .get(c)
            .and_then(|&c| number_of(eg, c))
            .is_some_and(|v| v == value);
        is_value && same_meta_as_x(eg, eclass, subst)
    })
}

fn same_meta_as_x(eg: &mut IrEGraph, eclass: Id, subst: &Subst) -> bool {
    subst
        .get(var("?x"))
        .is_some_and(|&x| same_meta(eg, eclass, x))
}

/// `slice x AXIS 0 len(x, AXIS)` is `x`.
fn slice_is_whole(eg: &mut IrEGraph, eclass: Id, subst: &Subst) -> bool {
    let get = |v: &str| subst.get(var(v)).copied();
    let (Some(x), Some(a), Some(s), Some(e)) = (get("?x"), get("?a"), get("?s"), get("?e")) else {
        return false;
    };
    let (Some(a), Some(s), Some(e)) = (int_of(eg, a), int_of(eg, s), int_of(eg, e)) else {
        return false;
    };
    let len = usize::try_from(a)
        .ok()
        .and_then(|a| eg[x].data.shape().and_then(|sh| sh.get(a).copied()));
    s == 0 && len.is_some_and(|len| i64::try_from(len) == Ok(e)) && same_meta(eg, eclass, x)
}

/// A boxed closure as an egg [`egg::Condition`].
struct CondFn(Box<Cond>);

impl egg::Condition<Op, ShapeAnalysis> for CondFn {
    fn check(&self, egraph: &mut IrEGraph, eclass: Id, subst: &Subst) -> bool {
        (self.0)(egraph, eclass, subst)
    }
}

// ---------------------------------------------------------------- structural rules

/// What a structural rule found in one e-node: the operand `x` of the replacement and, for
/// a rebuilt node, its attribute e-classes (which already exist in the e-graph).
struct Found {
    x: Id,
    attrs: Vec<Id>,
}

/// What replaces the matched e-class.
#[derive(Clone, Copy)]
enum Build {
    /// `x` itself.
    Operand,
    /// `reshape x attrs...`.
    Reshape,
    /// `permute x attrs...`.
    Permute,
}

type FindFn = fn(&IrEGraph, Id, &Op) -> Vec<Found>;

fn structural(name: &str, find: FindFn, build: Build) -> IrRewrite {
    Rewrite::new(name, NodeSearcher(find), NodeApplier(build)).expect("no pattern variables")
}

// Substitutions carry the replacement: numeric var 0 is `x`, 1.. are the attributes.
fn encode(f: Found) -> Subst {
    let mut s = Subst::with_capacity(f.attrs.len() + 1);
    s.insert(Var::from(0u32), f.x);
    for (i, a) in (1u32..).zip(f.attrs) {
        s.insert(Var::from(i), a);
    }
    s
}

struct NodeSearcher(FindFn);

impl Searcher<Op, ShapeAnalysis> for NodeSearcher {
    fn search_eclass_with_limit(
        &self,
        egraph: &IrEGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, Op>> {
        let substs: Vec<Subst> = egraph[eclass]
            .iter()
            .flat_map(|node| (self.0)(egraph, eclass, node))
            .take(limit)
            .map(encode)
            .collect();
        (!substs.is_empty()).then_some(SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

struct NodeApplier(Build);

impl Applier<Op, ShapeAnalysis> for NodeApplier {
    fn apply_one(
        &self,
        egraph: &mut IrEGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<Op>>,
        _rule_name: Symbol,
    ) -> Vec<Id> {
        let Some(&x) = subst.get(Var::from(0u32)) else {
            return vec![];
        };
        let new = match self.0 {
            Build::Operand => x,
            kind => {
                let mut ch = vec![x];
                ch.extend((1u32..).map_while(|i| subst.get(Var::from(i)).copied()));
                let node = match kind {
                    Build::Reshape => Op::Reshape(ch.into()),
                    _ => Op::Permute(ch.into()),
                };
                // Check the replacement before adding it, so a refused rewrite leaves the
                // e-graph untouched (and saturation detectable).
                match infer(&node, |c| &egraph[c].data) {
                    Ok(m) if m == egraph[eclass].data => egraph.add(node),
                    _ => return vec![],
                }
            }
        };
        if !same_meta(egraph, eclass, new) {
            return vec![];
        }
        if egraph.union(eclass, new) {
            vec![eclass]
        } else {
            vec![]
        }
    }
}

/// `reshape (reshape x A) B` -> `reshape x B`.
fn reshape_of_reshape(eg: &IrEGraph, _eclass: Id, node: &Op) -> Vec<Found> {
    let Op::Reshape(outer) = node else {
        return vec![];
    };
    let Some((&inner, dims)) = outer.split_first() else {
        return vec![];
    };
    eg[inner]
        .iter()
        .filter_map(|n| match n {
            Op::Reshape(ch) => ch.first().map(|&x| Found {
                x,
                attrs: dims.to_vec(),
            }),
            _ => None,
        })
        .collect()
}

/// `reshape x (shape of x)` -> `x`.
fn reshape_identity(eg: &IrEGraph, eclass: Id, node: &Op) -> Vec<Found> {
    match node {
        Op::Reshape(ch) => ch
            .first()
            .filter(|&&x| same_meta(eg, eclass, x))
            .map(|&x| Found { x, attrs: vec![] })
            .into_iter()
            .collect(),
        _ => vec![],
    }
}

/// `permute (permute x P) Q` -> `permute x R` with `R[i] = P[Q[i]]`: the outer permute's
/// axis `i` is the inner result's axis `Q[i]`, which is `x`'s axis `P[Q[i]]`. The attribute
/// e-class of `R[i]` is the inner node's child at `1 + Q[i]`, so no new leaves are needed.
fn permute_of_permute(eg: &IrEGraph, _eclass: Id, node: &Op) -> Vec<Found> {
    let Op::Permute(outer) = node else {
        return vec![];
    };
    let Some((&inner, q_ids)) = outer.split_first() else {
        return vec![];
    };
    let Some(q) = q_ids
        .iter()
        .map(|&i| int_of(eg, i).and_then(|v| usize::try_from(v).ok()))
        .collect::<Option<Vec<usize>>>()
    else {
        return vec![];
    };
    eg[inner]
        .iter()
        .filter_map(|n| match n {
            Op::Permute(ch) if ch.len() == q.len() + 1 => {
                let attrs = q
                    .iter()
                    .map(|&qi| ch.get(1 + qi).copied())
                    .collect::<Option<Vec<Id>>>()?;
                Some(Found { x: ch[0], attrs })
            }
            _ => None,
        })
        .collect()
}

/// `permute x 0 1 ... n-1` -> `x`.
fn permute_identity(eg: &IrEGraph, eclass: Id, node: &Op) -> Vec<Found> {
    let Op::Permute(ch) = node else {
        return vec![];
    };
    let Some((&x, perm)) = ch.split_first() else {
        return vec![];
    };
    let identity = perm
        .iter()
        .enumerate()
        .all(|(i, &p)| int_of(eg, p).is_some_and(|v| usize::try_from(v) == Ok(i)));
    if identity && same_meta(eg, eclass, x) {
        vec![Found { x, attrs: vec![] }]
    } else {
        vec![]
    }
}

/// `concat A (slice x A 0 e1) (slice x A e1 e2) ... (slice x A ek len)` -> `x`: adjacent
/// slices that cover `x` along the concatenation axis put back together (a model that
/// marks a joint stream's parts as separate streams, as Flux's single blocks do for
/// pipeline stages, splits and rejoins it at every block).
fn concat_of_slices(eg: &IrEGraph, eclass: Id, node: &Op) -> Vec<Found> {
    let Op::Concat(ch) = node else {
        return vec![];
    };
    let Some((&axis, parts)) = ch.split_first() else {
        return vec![];
    };
    let Some(axis) = int_of(eg, axis) else {
        return vec![];
    };
    // The (x, start, end) of each slice along `axis` an operand's e-class holds.
    let slices = |class: Id| -> Vec<(Id, i64, i64)> {
        eg[class]
            .iter()
            .filter_map(|n| match n {
                Op::Slice([x, a, s, e]) if int_of(eg, *a) == Some(axis) => {
                    Some((eg.find(*x), int_of(eg, *s)?, int_of(eg, *e)?))
                }
                _ => None,
            })
            .collect()
    };
    let Some(&first) = parts.first() else {
        return vec![];
    };
    let mut found = Vec::new();
    for (x, start, mut end) in slices(first) {
        if start != 0 {
            continue;
        }
        let covers = parts[1..].iter().all(|&p| {
            match slices(p).into_iter().find(|&(y, s, _)| y == x && s == end) {
                Some((_, _, e)) => {
                    end = e;
                    true
                }
                None => false,
            }
        });
        let len = usize::try_from(axis)
            .ok()
            .and_then(|a| eg[x].data.shape().and_then(|sh| sh.get(a).copied()));
        let whole = len.is_some_and(|len| i64::try_from(len) == Ok(end));
        if covers && whole && same_meta(eg, eclass, x) {
            found.push(Found { x, attrs: vec![] });
        }
    }
    found
}
