//! The rewrites of sequence and CFG sharding, as hand-written matchers over the e-graph.
//!
//! Every rule adds an equal form of an existing e-class: an op applied to a gathered value
//! equals the gather of the op applied to the local rows (`op(G(y)) = G(op(y))`) whenever the
//! op works row by row along the gathered axis; at attention the equal forms are the gathered
//! ("gather K/V") form and the sequence-parallel forms (Ulysses, Ring, USP). Conditions
//! depend on shapes and attribute values, which is why these are matchers in Rust rather than
//! pattern rules.

use ditto_ir::mesh::SeqMethod;
use ditto_ir::{IrEGraph, Meta, Op, Symbol};
use egg::{Id, Language};

/// A gather found in an e-class: `all_gather y AXIS MESH PARTS segs...`.
#[derive(Clone, Debug)]
pub struct Gather {
    pub y: Id,
    pub axis: usize,
    pub mesh: Id,
    pub parts: Id,
    /// The segment attribute classes (pairs LOCAL VALID).
    pub segs: Vec<Id>,
}

impl Gather {
    fn same_layout(&self, other: &Gather, eg: &IrEGraph) -> bool {
        eg.find(self.mesh) == eg.find(other.mesh)
            && eg.find(self.parts) == eg.find(other.parts)
            && self.segs.len() == other.segs.len()
            && self
                .segs
                .iter()
                .zip(&other.segs)
                .all(|(a, b)| eg.find(*a) == eg.find(*b))
    }
    fn mesh_name(&self, eg: &IrEGraph) -> String {
        match &eg[self.mesh].data {
            Meta::Name(s) => s.to_string(),
            _ => String::new(),
        }
    }
    fn seg_values(&self, eg: &IrEGraph) -> Vec<(usize, usize)> {
        self.segs
            .chunks(2)
            .map(|p| (int(eg, p[0]), int(eg, p[1])))
            .collect()
    }
}

fn int(eg: &IrEGraph, id: Id) -> usize {
    match eg[id].data {
        Meta::Int(i) => i.max(0) as usize,
        _ => 0,
    }
}

fn shape(eg: &IrEGraph, id: Id) -> Vec<usize> {
    eg[id].data.shape().unwrap_or(&[]).to_vec()
}

/// Gathers in the class of `id` (one per distinct local class and axis).
pub fn gathers(eg: &IrEGraph, id: Id) -> Vec<Gather> {
    let mut seen = std::collections::HashSet::new();
    eg[id]
        .nodes
        .iter()
        .filter_map(|n| match n {
            Op::AllGather(ch) if ch.len() >= 6 => Some(Gather {
                y: ch[0],
                axis: int(eg, ch[1]),
                mesh: ch[2],
                parts: ch[3],
                segs: ch[4..].to_vec(),
            }),
            _ => None,
        })
        .filter(|g| seen.insert((eg.find(g.y), g.axis, eg.find(g.mesh))))
        .collect()
}

/// Whether `node` is an attention whose queries are gathered along the sequence over the
/// Sp ranks (the unsharded form of an attention that has a sharded one).
pub fn attends_gathered_queries(eg: &IrEGraph, node: &Op) -> bool {
    let Op::Attention([q, ..]) = node else {
        return false;
    };
    has_sp_gather(eg, *q, Some(1))
}

/// Whether `node` gathers over the CFG pair a value that is itself gathered over the Sp
/// ranks (rather than gathering the local rows over the pair first).
pub fn cfg_gather_of_sp_gathered(eg: &IrEGraph, node: &Op) -> bool {
    let Op::AllGather(ch) = node else {
        return false;
    };
    let name = match ch.get(2).map(|&m| &eg[m].data) {
        Some(Meta::Name(s)) => s.to_string(),
        _ => return false,
    };
    name == "cfg" && has_sp_gather(eg, ch[0], None)
}

/// Whether the class of `id` is the gather of local rows over the Sp ranks (along `axis`,
/// or any axis): it has a sharded form.
pub fn has_sp_gather(eg: &IrEGraph, id: Id, axis: Option<usize>) -> bool {
    gathers(eg, id)
        .iter()
        .any(|g| axis.is_none_or(|a| g.axis == a) && g.mesh_name(eg) == "sp")
}

/// Shards in the class of `id`: (x, axis, mesh, parts, segs).
fn shards(eg: &IrEGraph, id: Id) -> Vec<Gather> {
    eg[id]
        .nodes
        .iter()
        .filter_map(|n| match n {
            Op::Shard(ch) if ch.len() >= 6 => Some(Gather {
                y: ch[0],
                axis: int(eg, ch[1]),
                mesh: ch[2],
                parts: ch[3],
                segs: ch[4..].to_vec(),
            }),
            _ => None,
        })
        .collect()
}

/// What attention forms the sharding may offer.
#[derive(Clone, Debug)]
pub struct Offer {
    /// Sequence-parallel methods to add at each self-attention.
    pub methods: Vec<SeqMethod>,
    /// Whether the gathered form (every rank computes its queries against all keys after
    /// gathering K and V) may be kept for self-attention.
    pub allow_gather: bool,
}

/// One pass of every rule over a snapshot of the e-graph. Unions happen at once (egg merges
/// the node lists immediately), so a sweep in input order pushes a gather through a whole
/// chain of ops rather than one op per sweep.
pub struct Sweep<'a> {
    pub eg: &'a mut IrEGraph,
    pub changed: bool,
    pub offer: &'a Offer,
}

impl Sweep<'_> {
    fn add(&mut self, op: Op) -> Option<Id> {
        let id = self.eg.add(op);
        match self.eg[id].data {
            Meta::Invalid(_) => None,
            _ => Some(id),
        }
    }
    fn int(&mut self, v: usize) -> Id {
        self.eg.add(Op::Int(v as i64))
    }
    fn gather(&mut self, y: Id, axis: usize, like: &Gather, segs: &[Id]) -> Option<Id> {
        let a = self.int(axis);
        let mut ch = vec![y, a, like.mesh, like.parts];
        ch.extend_from_slice(segs);
        self.add(Op::AllGather(ch.into()))
    }
    fn shard(&mut self, x: Id, axis: usize, like: &Gather, segs: &[Id]) -> Option<Id> {
        let a = self.int(axis);
        let mut ch = vec![x, a, like.mesh, like.parts];
        ch.extend_from_slice(segs);
        self.add(Op::Shard(ch.into()))
    }
    fn union(&mut self, a: Id, b: Id) {
        self.changed |= self.eg.union(a, b);
    }

    /// Records `class = G(op)` where `op` is built from the local rows.
    fn push(&mut self, class: Id, local: Option<Id>, axis: usize, like: &Gather, segs: &[Id]) {
        let Some(local) = local else { return };
        let Some(g) = self.gather(local, axis, like, segs) else {
            return;
        };
        // A gather is injective: if the class already is the gather of some local rows
        // with this layout, those rows are `local`. Merging at once keeps one local class
        // per layout; otherwise every alternative form of an attention would start its own
        // copy of the rest of the model within the sweep.
        let new = Gather {
            y: local,
            axis,
            mesh: like.mesh,
            parts: like.parts,
            segs: segs.to_vec(),
        };
        for old in gathers(self.eg, class) {
            if old.axis == axis && old.same_layout(&new, self.eg) {
                self.union(old.y, local);
            }
        }
        self.union(class, g);
    }

    /// Applies every rule to `node` of e-class `class`.
    pub fn apply(&mut self, class: Id, node: &Op) {
        let rank = |eg: &IrEGraph, id: Id| shape(eg, id).len();
        match node {
            // `seq` marks a token stream and computes nothing: a CFG gather under it moves
            // over it, so that the stream's Sp shard can be taken of the local batch half.
            Op::Neg(x)
            | Op::Seq(x)
            | Op::Silu(x)
            | Op::GeluTanh(x)
            | Op::Gelu(x)
            | Op::Sigmoid(x)
            | Op::Tanh(x)
            | Op::Exp(x) => {
                for g in gathers(self.eg, *x) {
                    let local = self.add(node.clone().map_children(|_| g.y));
                    self.push(class, local, g.axis, &g, &g.segs);
                }
            }
            Op::LayerNorm([x, _]) | Op::RmsNorm([x, _]) | Op::Softmax(x) => {
                let last = rank(self.eg, *x).saturating_sub(1);
                for g in gathers(self.eg, *x).into_iter().filter(|g| g.axis != last) {
                    let local =
                        self.add(node.clone().map_children(|c| if c == *x { g.y } else { c }));
                    self.push(class, local, g.axis, &g, &g.segs);
                }
            }
            Op::Linear([x, ..]) | Op::LinearBias([x, ..]) => {
                let last = rank(self.eg, *x).saturating_sub(1);
                for g in gathers(self.eg, *x).into_iter().filter(|g| g.axis != last) {
                    let mut n = node.clone();
                    n.children_mut()[0] = g.y;
                    let local = self.add(n);
                    self.push(class, local, g.axis, &g, &g.segs);
                }
            }
            Op::TimestepEmbedding(ch) => {
                for g in gathers(self.eg, ch[0]).into_iter().filter(|g| g.axis == 0) {
                    let mut n = node.clone();
                    n.children_mut()[0] = g.y;
                    let local = self.add(n);
                    self.push(class, local, 0, &g, &g.segs);
                }
            }
            Op::Embedding([table, idx]) => {
                for g in gathers(self.eg, *idx) {
                    let local = self.add(Op::Embedding([*table, g.y]));
                    self.push(class, local, g.axis, &g, &g.segs);
                }
            }
            Op::Add([a, b]) | Op::Sub([a, b]) | Op::Mul([a, b]) | Op::Div([a, b]) => {
                self.binary(class, node, *a, *b, true);
                self.binary(class, node, *b, *a, false);
            }
            Op::Reshape(ch) => {
                let xs = shape(self.eg, ch[0]);
                let dims: Vec<usize> = ch[1..].iter().map(|&d| int(self.eg, d)).collect();
                for g in gathers(self.eg, ch[0]) {
                    // Only reshapes that keep every axis up to the split one move rows as
                    // whole units.
                    if dims.len() <= g.axis || xs[..=g.axis] != dims[..=g.axis] {
                        continue;
                    }
                    let local_rows: usize = g.seg_values(self.eg).iter().map(|s| s.0).sum();
                    let mut new_ch = vec![g.y];
                    for (i, &d) in dims.iter().enumerate() {
                        new_ch.push(self.int(if i == g.axis { local_rows } else { d }));
                    }
                    let local = self.add(Op::Reshape(new_ch.into()));
                    self.push(class, local, g.axis, &g, &g.segs);
                }
            }
            Op::Permute(ch) => {
                let perm: Vec<usize> = ch[1..].iter().map(|&d| int(self.eg, d)).collect();
                for g in gathers(self.eg, ch[0]) {
                    let Some(to) = perm.iter().position(|&p| p == g.axis) else {
                        continue;
                    };
                    let mut n = node.clone();
                    n.children_mut()[0] = g.y;
                    let local = self.add(n);
                    self.push(class, local, to, &g, &g.segs);
                }
            }
            Op::Slice([x, axis, start_id, end_id]) => {
                let (s_axis, start, end) = (
                    int(self.eg, *axis),
                    int(self.eg, *start_id),
                    int(self.eg, *end_id),
                );
                for g in gathers(self.eg, *x) {
                    if s_axis != g.axis {
                        let local = self.add(Op::Slice([g.y, *axis, *start_id, *end_id]));
                        self.push(class, local, g.axis, &g, &g.segs);
                        continue;
                    }
                    // A slice along the split axis must take whole segments.
                    let segs = g.seg_values(self.eg);
                    let (mut valid_at, mut local_at) = (vec![0], vec![0]);
                    for &(l, v) in &segs {
                        valid_at.push(valid_at.last().copied().unwrap_or(0) + v);
                        local_at.push(local_at.last().copied().unwrap_or(0) + l);
                    }
                    let (Some(i0), Some(i1)) = (
                        valid_at.iter().position(|&o| o == start),
                        valid_at.iter().position(|&o| o == end),
                    ) else {
                        continue;
                    };
                    if i0 >= i1 {
                        continue;
                    }
                    let (ls, le) = (self.int(local_at[i0]), self.int(local_at[i1]));
                    let local = self.add(Op::Slice([g.y, *axis, ls, le]));
                    let kept = g.segs[2 * i0..2 * i1].to_vec();
                    self.push(class, local, g.axis, &g, &kept);
                }
            }
            Op::Concat(ch) => self.concat(class, ch),
            Op::Rope([x, cos, sin]) => {
                for g in gathers(self.eg, *x).into_iter().filter(|g| g.axis == 1) {
                    let (Some(c), Some(s)) = (
                        self.shard(*cos, 0, &g, &g.segs),
                        self.shard(*sin, 0, &g, &g.segs),
                    ) else {
                        continue;
                    };
                    let local = self.add(Op::Rope([g.y, c, s]));
                    self.push(class, local, 1, &g, &g.segs);
                }
            }
            Op::Attention([q, k, v, heads, scale]) => {
                self.attention(class, *q, *k, *v, *heads, *scale)
            }
            Op::SeqAttention(ch) => {
                // Batch halves (CFG) are independent: push their gathers through.
                let (gq, gk, gv) = (
                    gathers(self.eg, ch[0]),
                    gathers(self.eg, ch[1]),
                    gathers(self.eg, ch[2]),
                );
                for a in gq.iter().filter(|g| g.axis == 0) {
                    let same = |gs: &[Gather]| {
                        gs.iter()
                            .find(|g| g.axis == 0 && g.same_layout(a, self.eg))
                            .cloned()
                    };
                    let (Some(b), Some(c)) = (same(&gk), same(&gv)) else {
                        continue;
                    };
                    let mut n = ch.to_vec();
                    n[0] = a.y;
                    n[1] = b.y;
                    n[2] = c.y;
                    let local = self.add(Op::SeqAttention(n.into()));
                    self.push(class, local, 0, a, &a.segs);
                }
            }
            Op::Shard(ch) => {
                let me = Gather {
                    y: ch[0],
                    axis: int(self.eg, ch[1]),
                    mesh: ch[2],
                    parts: ch[3],
                    segs: ch[4..].to_vec(),
                };
                for g in gathers(self.eg, ch[0]) {
                    if g.axis == me.axis && g.same_layout(&me, self.eg) {
                        // shard(G(y)) = y
                        self.union(class, g.y);
                    } else if g.axis != me.axis && g.mesh_name(self.eg) != me.mesh_name(self.eg) {
                        // Sharding another axis commutes with the gather.
                        let inner = self.shard(g.y, me.axis, &me, &me.segs);
                        self.push(class, inner, g.axis, &g, &g.segs);
                    }
                }
            }
            Op::AllGather(ch) => {
                let me = Gather {
                    y: ch[0],
                    axis: int(self.eg, ch[1]),
                    mesh: ch[2],
                    parts: ch[3],
                    segs: ch[4..].to_vec(),
                };
                for s in shards(self.eg, ch[0]) {
                    if s.axis == me.axis && s.same_layout(&me, self.eg) {
                        // G(shard(x)) = x
                        self.union(class, s.y);
                    }
                }
                // A gather is injective: two gathers of one value with one layout gather
                // the same local rows. Without this, every alternative form of an attention
                // would start its own copy of the rest of the model.
                for g in gathers(self.eg, class) {
                    if g.axis == me.axis && g.same_layout(&me, self.eg) {
                        self.union(g.y, me.y);
                    }
                }
            }
            _ => {}
        }
    }

    /// `bin(G(x), other)` → `G(bin(x, other'))` where `other'` is the other operand's
    /// matching local rows (its own gather, itself if broadcast along the axis, or a shard).
    fn binary(&mut self, class: Id, node: &Op, split: Id, other: Id, split_is_left: bool) {
        let out = shape(self.eg, self.eg.find(class));
        let (rs, ro) = (shape(self.eg, split).len(), shape(self.eg, other));
        for g in gathers(self.eg, split) {
            let axis_out = out.len() + g.axis - rs;
            let Some(axis_o) = (axis_out + ro.len()).checked_sub(out.len()) else {
                // `other` has no such axis: it broadcasts.
                self.binary_with(class, node, &g, other, split_is_left, axis_out);
                continue;
            };
            if ro[axis_o] == 1 {
                self.binary_with(class, node, &g, other, split_is_left, axis_out);
            } else if let Some(go) = gathers(self.eg, other)
                .into_iter()
                .find(|go| go.axis == axis_o && go.same_layout(&g, self.eg))
            {
                self.binary_with(class, node, &g, go.y, split_is_left, axis_out);
            } else if ro[axis_o] == out[axis_out] {
                if let Some(s) = self.shard(other, axis_o, &g, &g.segs) {
                    self.binary_with(class, node, &g, s, split_is_left, axis_out);
                }
            }
        }
    }

    fn binary_with(
        &mut self,
        class: Id,
        node: &Op,
        g: &Gather,
        other: Id,
        left: bool,
        axis: usize,
    ) {
        let (a, b) = if left { (g.y, other) } else { (other, g.y) };
        let local = self.add(match node {
            Op::Add(_) => Op::Add([a, b]),
            Op::Sub(_) => Op::Sub([a, b]),
            Op::Mul(_) => Op::Mul([a, b]),
            _ => Op::Div([a, b]),
        });
        self.push(class, local, axis, g, &g.segs);
    }

    fn concat(&mut self, class: Id, ch: &[Id]) {
        let axis = int(self.eg, ch[0]);
        'first: for first in gathers(self.eg, ch[1]) {
            let mut locals = vec![first.y];
            let mut segs = first.segs.clone();
            for &x in &ch[2..] {
                let found = gathers(self.eg, x).into_iter().find(|g| {
                    g.axis == first.axis
                        && self.eg.find(g.mesh) == self.eg.find(first.mesh)
                        && self.eg.find(g.parts) == self.eg.find(first.parts)
                        && (axis == first.axis || g.same_layout(&first, self.eg))
                });
                let Some(g) = found else {
                    continue 'first;
                };
                locals.push(g.y);
                if axis == first.axis {
                    segs.extend_from_slice(&g.segs);
                }
            }
            let mut n = vec![ch[0]];
            n.extend(locals);
            let local = self.add(Op::Concat(n.into()));
            self.push(class, local, first.axis, &first, &segs);
        }
    }

    fn attention(&mut self, class: Id, q: Id, k: Id, v: Id, heads: Id, scale: Id) {
        for g in gathers(self.eg, q) {
            let kv = |eg: &IrEGraph, x: Id| {
                gathers(eg, x).into_iter().find(|o| {
                    o.axis == g.axis
                        && eg.find(o.mesh) == eg.find(g.mesh)
                        && eg.find(o.parts) == eg.find(g.parts)
                })
            };
            let (gk, gv) = (kv(self.eg, k), kv(self.eg, v));
            if g.axis == 0 {
                // Batch halves: attention is per sample.
                if let (Some(gk), Some(gv)) = (gk, gv) {
                    if gk.same_layout(&g, self.eg) && gv.same_layout(&g, self.eg) {
                        let local = self.add(Op::Attention([g.y, gk.y, gv.y, heads, scale]));
                        self.push(class, local, 0, &g, &g.segs);
                    }
                }
                continue;
            }
            if g.axis != 1 {
                continue;
            }
            let self_attention =
                matches!((&gk, &gv), (Some(a), Some(b)) if a.same_layout(b, self.eg));
            // Local queries against the full keys: cross-attention to replicated text, or
            // the gathered form of self-attention.
            if !self_attention || self.offer.allow_gather {
                let local = self.add(Op::Attention([g.y, k, v, heads, scale]));
                self.push(class, local, 1, &g, &g.segs);
            }
            if let (true, Some(gk), Some(gv)) = (self_attention, gk, gv) {
                for &method in &self.offer.methods.clone() {
                    let m = self.eg.add(Op::Name(Symbol::from(method.as_str())));
                    let mut ch = vec![g.y, gk.y, gv.y, heads, scale, m];
                    ch.extend_from_slice(&gk.segs);
                    let local = self.add(Op::SeqAttention(ch.into()));
                    self.push(class, local, 1, &g, &g.segs);
                }
            }
        }
    }
}
