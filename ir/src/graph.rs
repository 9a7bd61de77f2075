//! `Graph`: a hash-consed DAG of ops (an `egg::RecExpr`) with per-node metadata, named outputs
//! and the bodies of fused kernels. Model files build it through the methods below, each of
//! which checks shapes and returns an error naming the op and its operands.

use std::collections::{BTreeMap, HashMap};

use egg::{Id, Language, RecExpr, Symbol};

use crate::infer::infer;
use crate::meta::{Meta, TensorMeta};
use crate::op::Float;
use crate::{DType, IrError, Op};

#[derive(Clone, Default)]
pub struct Graph {
    expr: RecExpr<Op>,
    metas: Vec<Meta>,
    memo: HashMap<Op, Id>,
    /// Named results, in order. The same node may carry several names.
    pub outputs: Vec<(String, Id)>,
    /// Bodies of `fused` nodes: expressions over `(arg i)` leaves.
    pub kernels: BTreeMap<String, RecExpr<Op>>,
    /// Where the model's blocks meet, as the models mark them: `boundaries[0]` holds the
    /// streams entering the first block, `boundaries[i]` the streams block `i - 1` leaves
    /// (in the order the next block takes them). Lets a graph be cut into head, block ranges
    /// and tail ([`Graph::part`]). Not kept by passes (they run on the parts).
    pub boundaries: Vec<Vec<Id>>,
    /// Named intermediate values the models expose for analysis (attention K/V/outputs per
    /// layer, each block's modulated input); outputs only when asked for.
    pub taps: Vec<(String, Id)>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::text::print(self))
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node (deduplicated), checking its operands.
    pub fn add(&mut self, op: Op) -> Result<Id, IrError> {
        if let Some(&id) = self.memo.get(&op) {
            return Ok(id);
        }
        let meta = infer(&op, |c| &self.metas[usize::from(c)])?;
        let id = self.expr.add(op.clone());
        self.metas.push(meta);
        self.memo.insert(op, id);
        Ok(id)
    }

    pub fn nodes(&self) -> &[Op] {
        self.expr.as_ref()
    }
    pub fn len(&self) -> usize {
        self.metas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }
    pub fn node(&self, id: Id) -> &Op {
        &self.expr[id]
    }
    pub fn meta(&self, id: Id) -> &Meta {
        &self.metas[usize::from(id)]
    }
    /// The tensor meta of `id`; attributes have none.
    pub fn tensor(&self, id: Id) -> Option<&TensorMeta> {
        self.meta(id).tensor()
    }
    /// The shape of a tensor node (empty for attributes).
    pub fn shape(&self, id: Id) -> &[usize] {
        self.meta(id).shape().unwrap_or(&[])
    }
    pub fn expr(&self) -> &RecExpr<Op> {
        &self.expr
    }

    /// Integer value of an `Int` attribute node.
    pub fn int_attr(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Op::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// Float value of a `Float` (or `Int`) attribute node.
    pub fn float_attr(&self, id: Id) -> Option<f64> {
        match self.node(id) {
            Op::Float(f) => Some(f.get()),
            Op::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// String of a `Name` attribute node.
    pub fn name_attr(&self, id: Id) -> Option<Symbol> {
        match self.node(id) {
            Op::Name(s) => Some(*s),
            _ => None,
        }
    }

    /// Rebuilds a graph from a `RecExpr` whose last node is the `outputs` root, re-checking
    /// every node. Used after e-graph extraction.
    pub fn from_recexpr(
        expr: &RecExpr<Op>,
        output_names: &[String],
        kernels: BTreeMap<String, RecExpr<Op>>,
    ) -> Result<Graph, IrError> {
        let mut g = Graph::new();
        let mut map: Vec<Id> = Vec::with_capacity(expr.as_ref().len());
        for node in expr.as_ref() {
            let n = node.clone().map_children(|c| map[usize::from(c)]);
            let id = match n {
                Op::Outputs(_) => Id::from(usize::MAX),
                n => g.add(n)?,
            };
            map.push(id);
        }
        let root = expr
            .as_ref()
            .last()
            .ok_or_else(|| IrError::Other("empty expression".into()))?;
        let Op::Outputs(outs) = root else {
            return Err(IrError::Other("the root is not an `outputs` node".into()));
        };
        if outs.len() != output_names.len() {
            return Err(IrError::Other(format!(
                "{} outputs but {} names",
                outs.len(),
                output_names.len()
            )));
        }
        for (name, &o) in output_names.iter().zip(outs.iter()) {
            g.outputs.push((name.clone(), map[usize::from(o)]));
        }
        g.kernels = kernels;
        Ok(g)
    }

    /// The graph as one `RecExpr` rooted at an `outputs` node (what the e-graph passes take).
    pub fn to_rooted_recexpr(&self) -> RecExpr<Op> {
        let mut expr = self.expr.clone();
        expr.add(Op::Outputs(
            self.outputs.iter().map(|(_, id)| *id).collect(),
        ));
        expr
    }

    /// Keeps only nodes reachable from the outputs (renumbering them).
    pub fn pruned(&self) -> Result<Graph, IrError> {
        let names: Vec<String> = self.outputs.iter().map(|(n, _)| n.clone()).collect();
        let rooted = self.to_rooted_recexpr();
        let root = rooted.as_ref().last().expect("rooted has a root").clone();
        let expr = root.build_recexpr(|id| rooted[id].clone());
        Graph::from_recexpr(&expr, &names, self.kernels.clone())
    }

    // ------------------------------------------------------------------ attributes

    pub fn int(&mut self, v: i64) -> Id {
        self.add(Op::Int(v)).expect("attributes always infer")
    }
    pub fn float(&mut self, v: f64) -> Id {
        self.add(Op::Float(Float::new(v)))
            .expect("attributes always infer")
    }
    pub fn name(&mut self, s: &str) -> Id {
        self.add(Op::Name(Symbol::from(s)))
            .expect("attributes always infer")
    }
    fn ints(&mut self, vs: &[usize]) -> Vec<Id> {
        vs.iter().map(|&v| self.int(v as i64)).collect()
    }

    // ------------------------------------------------------------------ sources

    /// A runtime argument named like diffusers' forward argument.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<Id, IrError> {
        let mut ch = vec![self.name(name), self.name(dtype.as_str())];
        ch.extend(self.ints(shape));
        self.add(Op::Input(ch.into()))
    }
    /// A checkpoint tensor with the shape the model expects; loading checks the file agrees.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Id, IrError> {
        let mut ch = vec![self.name(name)];
        ch.extend(self.ints(shape));
        self.add(Op::Weight(ch.into()))
    }
    pub fn scalar(&mut self, v: f64) -> Result<Id, IrError> {
        let f = self.float(v);
        self.add(Op::Scalar(f))
    }
    /// Marks `id` as a named result.
    pub fn output(&mut self, name: &str, id: Id) {
        self.outputs.push((name.to_string(), id));
    }
    /// Marks the streams that flow into the next block (see [`Graph::boundaries`]).
    pub fn mark_boundary(&mut self, streams: &[Id]) {
        self.boundaries.push(streams.to_vec());
    }
    /// Exposes an intermediate value under `name` (see [`Graph::taps`]).
    pub fn tap(&mut self, name: impl Into<String>, id: Id) {
        self.taps.push((name.into(), id));
    }
    /// The value tapped as `name`.
    pub fn tapped(&self, name: &str) -> Option<Id> {
        self.taps.iter().find(|(n, _)| n == name).map(|(_, id)| *id)
    }

    // ------------------------------------------------------------------ compute

    pub fn linear(&mut self, x: Id, w: Id) -> Result<Id, IrError> {
        self.add(Op::Linear([x, w]))
    }
    pub fn linear_bias(&mut self, x: Id, w: Id, b: Id) -> Result<Id, IrError> {
        self.add(Op::LinearBias([x, w, b]))
    }
    pub fn attention(
        &mut self,
        q: Id,
        k: Id,
        v: Id,
        heads: usize,
        scale: f64,
    ) -> Result<Id, IrError> {
        let h = self.int(heads as i64);
        let s = self.float(scale);
        self.add(Op::Attention([q, k, v, h, s]))
    }
    pub fn conv2d(
        &mut self,
        x: Id,
        w: Id,
        b: Id,
        stride: usize,
        pad: usize,
    ) -> Result<Id, IrError> {
        let s = self.int(stride as i64);
        let p = self.int(pad as i64);
        self.add(Op::Conv2d([x, w, b, s, p]))
    }
    pub fn add_(&mut self, a: Id, b: Id) -> Result<Id, IrError> {
        self.add(Op::Add([a, b]))
    }
    pub fn sub(&mut self, a: Id, b: Id) -> Result<Id, IrError> {
        self.add(Op::Sub([a, b]))
    }
    pub fn mul(&mut self, a: Id, b: Id) -> Result<Id, IrError> {
        self.add(Op::Mul([a, b]))
    }
    pub fn div(&mut self, a: Id, b: Id) -> Result<Id, IrError> {
        self.add(Op::Div([a, b]))
    }
    pub fn neg(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Neg(x))
    }
    pub fn silu(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Silu(x))
    }
    pub fn gelu_tanh(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::GeluTanh(x))
    }
    pub fn gelu(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Gelu(x))
    }
    pub fn sigmoid(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Sigmoid(x))
    }
    pub fn tanh(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Tanh(x))
    }
    pub fn exp(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Exp(x))
    }
    /// x + c for a constant c.
    pub fn add_scalar(&mut self, x: Id, c: f64) -> Result<Id, IrError> {
        let s = self.scalar(c)?;
        self.add_(x, s)
    }
    /// x * c for a constant c.
    pub fn mul_scalar(&mut self, x: Id, c: f64) -> Result<Id, IrError> {
        let s = self.scalar(c)?;
        self.mul(x, s)
    }
    pub fn layer_norm(&mut self, x: Id, eps: f64) -> Result<Id, IrError> {
        let e = self.float(eps);
        self.add(Op::LayerNorm([x, e]))
    }
    pub fn rms_norm(&mut self, x: Id, eps: f64) -> Result<Id, IrError> {
        let e = self.float(eps);
        self.add(Op::RmsNorm([x, e]))
    }
    pub fn group_norm(&mut self, x: Id, groups: usize, eps: f64) -> Result<Id, IrError> {
        let g = self.int(groups as i64);
        let e = self.float(eps);
        self.add(Op::GroupNorm([x, g, e]))
    }
    pub fn softmax(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Softmax(x))
    }

    // ------------------------------------------------------------------ layout

    /// Reshape; one dimension may be `usize::MAX` to be inferred (like -1 in PyTorch).
    pub fn reshape(&mut self, x: Id, dims: &[usize]) -> Result<Id, IrError> {
        let numel: usize = self.shape(x).iter().product();
        let mut dims = dims.to_vec();
        if let Some(pos) = dims.iter().position(|&d| d == usize::MAX) {
            let known: usize = dims.iter().filter(|&&d| d != usize::MAX).product();
            dims[pos] = numel.checked_div(known).unwrap_or(0);
        }
        if dims.as_slice() == self.shape(x) {
            return Ok(x);
        }
        let mut ch = vec![x];
        ch.extend(self.ints(&dims));
        self.add(Op::Reshape(ch.into()))
    }
    pub fn permute(&mut self, x: Id, perm: &[usize]) -> Result<Id, IrError> {
        let mut ch = vec![x];
        ch.extend(self.ints(perm));
        self.add(Op::Permute(ch.into()))
    }
    pub fn concat(&mut self, axis: usize, xs: &[Id]) -> Result<Id, IrError> {
        let mut ch = vec![self.int(axis as i64)];
        ch.extend_from_slice(xs);
        self.add(Op::Concat(ch.into()))
    }
    pub fn slice(&mut self, x: Id, axis: usize, start: usize, end: usize) -> Result<Id, IrError> {
        let a = self.int(axis as i64);
        let s = self.int(start as i64);
        let e = self.int(end as i64);
        self.add(Op::Slice([x, a, s, e]))
    }
    /// `n` equal chunks along `axis` (like `torch.chunk` with a divisible size).
    pub fn chunk(&mut self, x: Id, n: usize, axis: usize) -> Result<Vec<Id>, IrError> {
        let len = self.shape(x).get(axis).copied().unwrap_or(0);
        if n == 0 || len % n != 0 {
            return Err(IrError::Shape {
                op: "chunk".into(),
                operands: self.meta(x).to_string(),
                reason: format!("cannot split axis {axis} into {n} equal chunks"),
            });
        }
        let step = len / n;
        (0..n)
            .map(|i| self.slice(x, axis, i * step, (i + 1) * step))
            .collect()
    }
    pub fn upsample_nearest(&mut self, x: Id, factor: usize) -> Result<Id, IrError> {
        let f = self.int(factor as i64);
        self.add(Op::UpsampleNearest([x, f]))
    }

    /// Marks `x` [B, S, D] as a token sequence the sharding pass may split along axis 1.
    pub fn seq(&mut self, x: Id) -> Result<Id, IrError> {
        self.add(Op::Seq(x))
    }

    // ------------------------------------------------------------------ embeddings

    pub fn timestep_embedding(
        &mut self,
        t: Id,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        scale: f64,
    ) -> Result<Id, IrError> {
        let d = self.int(dim as i64);
        let f = self.int(flip_sin_to_cos as i64);
        let s = self.float(downscale_freq_shift);
        let sc = self.float(scale);
        self.add(Op::TimestepEmbedding([t, d, f, s, sc]))
    }
    pub fn embedding(&mut self, table: Id, idx: Id) -> Result<Id, IrError> {
        self.add(Op::Embedding([table, idx]))
    }
    pub fn sincos_pos_embed(
        &mut self,
        dim: usize,
        grid_h: usize,
        grid_w: usize,
        base_size: f64,
        interpolation_scale: f64,
    ) -> Result<Id, IrError> {
        let d = self.int(dim as i64);
        let h = self.int(grid_h as i64);
        let w = self.int(grid_w as i64);
        let b = self.float(base_size);
        let i = self.float(interpolation_scale);
        self.add(Op::SinCosPosEmbed([d, h, w, b, i]))
    }
    /// (cos, sin) tables for interleaved multi-axis RoPE.
    pub fn rope_tables(
        &mut self,
        ids: Id,
        theta: f64,
        axes_dims: &[usize],
    ) -> Result<(Id, Id), IrError> {
        let mut ch = vec![ids, self.float(theta)];
        ch.extend(self.ints(axes_dims));
        let cos = self.add(Op::RopeCos(ch.clone().into()))?;
        let sin = self.add(Op::RopeSin(ch.into()))?;
        Ok((cos, sin))
    }
    pub fn rope(&mut self, x: Id, cos: Id, sin: Id) -> Result<Id, IrError> {
        self.add(Op::Rope([x, cos, sin]))
    }
}
