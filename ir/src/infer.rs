//! Shape and dtype inference: one function shared by the graph builder (which refuses bad
//! nodes with an error) and the e-graph analysis (which marks them invalid for the verifier).

use egg::{Id, Language};

use crate::meta::{Dist, Meta, ShapeDisplay, TensorMeta, MESH_AXES};
use crate::{DType, IrError, Op};

/// Numpy broadcasting of two shapes, or `None` when they are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

struct Ctx<'a, F: Fn(Id) -> &'a Meta> {
    op: &'a Op,
    get: F,
}

impl<'a, F: Fn(Id) -> &'a Meta> Ctx<'a, F> {
    fn err(&self, reason: impl Into<String>) -> IrError {
        let operands: Vec<String> = self
            .op
            .children()
            .iter()
            .map(|&c| (self.get)(c).to_string())
            .collect();
        IrError::Shape {
            op: self.op.name(),
            operands: operands.join(", "),
            reason: reason.into(),
        }
    }
    fn tensor(&self, id: Id) -> Result<&'a TensorMeta, IrError> {
        match (self.get)(id) {
            Meta::Tensor(t) => Ok(t),
            other => Err(self.err(format!("expected a tensor operand, found `{other}`"))),
        }
    }
    fn int(&self, id: Id) -> Result<i64, IrError> {
        match (self.get)(id) {
            Meta::Int(i) => Ok(*i),
            other => Err(self.err(format!("expected an integer attribute, found `{other}`"))),
        }
    }
    fn usize(&self, id: Id) -> Result<usize, IrError> {
        let i = self.int(id)?;
        usize::try_from(i).map_err(|_| self.err(format!("attribute {i} must not be negative")))
    }
    fn float(&self, id: Id) -> Result<f64, IrError> {
        match (self.get)(id) {
            Meta::Float(x) => Ok(*x),
            Meta::Int(i) => Ok(*i as f64),
            other => Err(self.err(format!("expected a float attribute, found `{other}`"))),
        }
    }
    fn name(&self, id: Id) -> Result<String, IrError> {
        match (self.get)(id) {
            Meta::Name(s) => Ok(s.to_string()),
            other => Err(self.err(format!("expected a name attribute, found `{other}`"))),
        }
    }
    fn dims(&self, ids: &[Id]) -> Result<Vec<usize>, IrError> {
        ids.iter().map(|&i| self.usize(i)).collect()
    }
}

fn f32_tensor(shape: Vec<usize>) -> Meta {
    Meta::Tensor(TensorMeta::new(shape, DType::F32))
}

/// Infers the meta of `op` given its children's metas.
pub fn infer<'a>(op: &'a Op, get: impl Fn(Id) -> &'a Meta + Copy) -> Result<Meta, IrError> {
    let mut meta = infer_shape(op, get)?;
    if let Meta::Tensor(t) = &mut meta {
        if t.dist == Dist::Replicated {
            t.dist = propagate_dist(op, get, &t.shape);
        }
    }
    Ok(meta)
}

/// Where the output of `op` lives when an operand is split: ops that work row by row keep
/// the split (on the same axis, counted from the right for broadcasting operands), layout
/// ops move it, gathers end it. An annotation for dumps and the cost model.
fn propagate_dist<'a>(op: &'a Op, get: impl Fn(Id) -> &'a Meta, out: &[usize]) -> Dist {
    let split_of = |id: Id| match get(id) {
        Meta::Tensor(t) => match &t.dist {
            Dist::Split { .. } => Some((t.shape.len(), t.dist.clone())),
            Dist::Replicated => None,
        },
        _ => None,
    };
    let first_split = |ids: &[Id]| ids.iter().find_map(|&i| split_of(i));
    let realign = |(rank, d): (usize, Dist)| match d {
        Dist::Split {
            axis,
            parts,
            mesh_axis,
        } if out.len() + axis >= rank => Dist::Split {
            axis: out.len() + axis - rank,
            parts,
            mesh_axis,
        },
        _ => Dist::Replicated,
    };
    match op {
        Op::AllGather(_) | Op::Outputs(_) => Dist::Replicated,
        Op::Permute(ch) => match split_of(ch[0]) {
            Some((
                _,
                Dist::Split {
                    axis,
                    parts,
                    mesh_axis,
                },
            )) => {
                let perm: Vec<i64> = ch[1..]
                    .iter()
                    .filter_map(|&p| match get(p) {
                        Meta::Int(i) => Some(*i),
                        _ => None,
                    })
                    .collect();
                match perm.iter().position(|&p| p as usize == axis) {
                    Some(a) => Dist::Split {
                        axis: a,
                        parts,
                        mesh_axis,
                    },
                    None => Dist::Replicated,
                }
            }
            _ => Dist::Replicated,
        },
        Op::Reshape(ch) => match (split_of(ch[0]), get(ch[0])) {
            (Some((_, d @ Dist::Split { axis, .. })), Meta::Tensor(x))
                if out.len() > axis && x.shape[..=axis] == out[..=axis] =>
            {
                d
            }
            _ => Dist::Replicated,
        },
        Op::Concat(ch) => first_split(&ch[1..]).map(realign).unwrap_or_default(),
        other => first_split(other.children())
            .map(realign)
            .unwrap_or_default(),
    }
}

/// (local, valid) row counts of the segments in `ids` (pairs of integer attributes).
fn segments<'a, F: Fn(Id) -> &'a Meta>(
    c: &Ctx<'a, F>,
    ids: &[Id],
    parts: usize,
) -> Result<Vec<(usize, usize)>, IrError> {
    if ids.is_empty() || ids.len() % 2 != 0 {
        return Err(c.err("segments must be pairs `LOCAL VALID`"));
    }
    let segs: Vec<(usize, usize)> = ids
        .chunks(2)
        .map(|p| Ok((c.usize(p[0])?, c.usize(p[1])?)))
        .collect::<Result<_, IrError>>()?;
    for &(local, valid) in &segs {
        if parts == 0 || valid == 0 || local != valid.div_ceil(parts) {
            return Err(c.err(format!(
                "segment of {valid} rows over {parts} ranks must hold {} rows per rank, not {local}",
                valid.div_ceil(parts.max(1))
            )));
        }
    }
    Ok(segs)
}

fn mesh_axis<'a, F: Fn(Id) -> &'a Meta>(c: &Ctx<'a, F>, id: Id) -> Result<usize, IrError> {
    let name = c.name(id)?;
    MESH_AXES.iter().position(|&m| m == name).ok_or_else(|| {
        c.err(format!(
            "unknown mesh axis `{name}` (expected one of {MESH_AXES:?})"
        ))
    })
}

fn infer_shape<'a>(op: &'a Op, get: impl Fn(Id) -> &'a Meta) -> Result<Meta, IrError> {
    let c = Ctx { op, get };
    match op {
        Op::Int(i) => Ok(Meta::Int(*i)),
        Op::Float(f) => Ok(Meta::Float(f.get())),
        Op::Name(s) => Ok(Meta::Name(*s)),
        Op::Input(ch) => {
            if ch.len() < 2 {
                return Err(c.err("input needs a name and a dtype"));
            }
            c.name(ch[0])?;
            let dtype: DType = c.name(ch[1])?.parse().map_err(|e: String| c.err(e))?;
            Ok(Meta::Tensor(TensorMeta::new(c.dims(&ch[2..])?, dtype)))
        }
        Op::Weight(ch) => {
            if ch.is_empty() {
                return Err(c.err("weight needs a name"));
            }
            c.name(ch[0])?;
            Ok(f32_tensor(c.dims(&ch[1..])?))
        }
        Op::Scalar(v) => {
            c.float(*v)?;
            Ok(f32_tensor(vec![]))
        }
        Op::Linear([x, w]) | Op::LinearBias([x, w, _]) => {
            let x = c.tensor(*x)?;
            let w = c.tensor(*w)?;
            if w.shape.len() != 2 {
                return Err(c.err("the weight must be 2-D [out, in]"));
            }
            let k = *x
                .shape
                .last()
                .ok_or_else(|| c.err("x must have at least one axis"))?;
            if k != w.shape[1] {
                return Err(c.err(format!(
                    "x has {k} features but the weight expects {}",
                    w.shape[1]
                )));
            }
            if let Op::LinearBias([_, _, b]) = op {
                let b = c.tensor(*b)?;
                if b.shape != [w.shape[0]] {
                    return Err(c.err(format!("the bias must be [{}]", w.shape[0])));
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("checked non-empty") = w.shape[0];
            Ok(f32_tensor(shape))
        }
        Op::Attention([q, k, v, heads, scale]) => {
            let (q, k, v) = (c.tensor(*q)?, c.tensor(*k)?, c.tensor(*v)?);
            let heads = c.usize(*heads)?;
            c.float(*scale)?;
            if q.shape.len() != 3 || k.shape.len() != 3 || v.shape.len() != 3 {
                return Err(c.err("q, k, v must be [B, S, heads*head_dim]"));
            }
            if q.shape[0] != k.shape[0] || k.shape[0] != v.shape[0] {
                return Err(c.err("q, k, v batch sizes differ"));
            }
            if k.shape[1] != v.shape[1] {
                return Err(c.err("k and v sequence lengths differ"));
            }
            if q.shape[2] != k.shape[2] {
                return Err(c.err("q and k widths differ"));
            }
            if heads == 0 || q.shape[2] % heads != 0 || v.shape[2] % heads != 0 {
                return Err(c.err(format!("{heads} heads do not divide the widths")));
            }
            Ok(f32_tensor(vec![q.shape[0], q.shape[1], v.shape[2]]))
        }
        Op::Conv2d([x, w, b, stride, pad]) => {
            let (x, w, b) = (c.tensor(*x)?, c.tensor(*w)?, c.tensor(*b)?);
            let (stride, pad) = (c.usize(*stride)?, c.usize(*pad)?);
            if x.shape.len() != 4 || w.shape.len() != 4 {
                return Err(c.err("conv2d takes x[N,C,H,W] and w[O,C,kh,kw]"));
            }
            if x.shape[1] != w.shape[1] {
                return Err(c.err(format!(
                    "x has {} channels, the weight expects {}",
                    x.shape[1], w.shape[1]
                )));
            }
            if b.shape != [w.shape[0]] {
                return Err(c.err(format!("the bias must be [{}]", w.shape[0])));
            }
            if stride == 0 {
                return Err(c.err("stride must be positive"));
            }
            let (kh, kw) = (w.shape[2], w.shape[3]);
            let (h, wd) = (x.shape[2] + 2 * pad, x.shape[3] + 2 * pad);
            if h < kh || wd < kw {
                return Err(c.err("the kernel is larger than the padded input"));
            }
            Ok(f32_tensor(vec![
                x.shape[0],
                w.shape[0],
                (h - kh) / stride + 1,
                (wd - kw) / stride + 1,
            ]))
        }
        Op::Add([a, b]) | Op::Sub([a, b]) | Op::Mul([a, b]) | Op::Div([a, b]) => {
            let (a, b) = (c.tensor(*a)?, c.tensor(*b)?);
            let shape = broadcast_shapes(&a.shape, &b.shape)
                .ok_or_else(|| c.err("shapes do not broadcast"))?;
            Ok(f32_tensor(shape))
        }
        Op::Neg(x)
        | Op::Silu(x)
        | Op::GeluTanh(x)
        | Op::Gelu(x)
        | Op::Sigmoid(x)
        | Op::Tanh(x)
        | Op::Exp(x)
        | Op::Softmax(x) => Ok(f32_tensor(c.tensor(*x)?.shape.clone())),
        Op::LayerNorm([x, eps]) | Op::RmsNorm([x, eps]) => {
            let x = c.tensor(*x)?;
            c.float(*eps)?;
            if x.shape.is_empty() {
                return Err(c.err("cannot normalize a scalar"));
            }
            Ok(f32_tensor(x.shape.clone()))
        }
        Op::GroupNorm([x, groups, eps]) => {
            let x = c.tensor(*x)?;
            let groups = c.usize(*groups)?;
            c.float(*eps)?;
            if x.shape.len() < 2 {
                return Err(c.err("group_norm takes x[N, C, ...]"));
            }
            if groups == 0 || x.shape[1] % groups != 0 {
                return Err(c.err(format!(
                    "{groups} groups do not divide {} channels",
                    x.shape[1]
                )));
            }
            Ok(f32_tensor(x.shape.clone()))
        }
        Op::Reshape(ch) => {
            let x = c.tensor(
                *ch.first()
                    .ok_or_else(|| c.err("reshape needs an operand"))?,
            )?;
            let dims = c.dims(&ch[1..])?;
            if dims.iter().product::<usize>() != x.numel() {
                return Err(c.err(format!(
                    "cannot reshape {} elements to {}",
                    x.numel(),
                    ShapeDisplay(&dims)
                )));
            }
            Ok(Meta::Tensor(TensorMeta::new(dims, x.dtype)))
        }
        Op::Permute(ch) => {
            let x = c.tensor(
                *ch.first()
                    .ok_or_else(|| c.err("permute needs an operand"))?,
            )?;
            let perm = c.dims(&ch[1..])?;
            let mut seen = vec![false; perm.len()];
            if perm.len() != x.shape.len()
                || perm
                    .iter()
                    .any(|&p| p >= perm.len() || std::mem::replace(&mut seen[p], true))
            {
                return Err(c.err(format!(
                    "{perm:?} is not a permutation of {} axes",
                    x.shape.len()
                )));
            }
            let shape = perm.iter().map(|&p| x.shape[p]).collect();
            Ok(Meta::Tensor(TensorMeta::new(shape, x.dtype)))
        }
        Op::Concat(ch) => {
            if ch.len() < 2 {
                return Err(c.err("concat needs an axis and at least one operand"));
            }
            let axis = c.usize(ch[0])?;
            let first = c.tensor(ch[1])?;
            if axis >= first.shape.len() {
                return Err(c.err(format!("axis {axis} out of range")));
            }
            let mut shape = first.shape.clone();
            shape[axis] = 0;
            for &t in &ch[1..] {
                let t = c.tensor(t)?;
                let same_rank = t.shape.len() == shape.len();
                if !same_rank || (0..shape.len()).any(|i| i != axis && t.shape[i] != first.shape[i])
                {
                    return Err(c.err(format!("operands differ outside axis {axis}")));
                }
                shape[axis] += t.shape[axis];
            }
            Ok(f32_tensor(shape))
        }
        Op::Slice([x, axis, start, end]) => {
            let x = c.tensor(*x)?;
            let (axis, start, end) = (c.usize(*axis)?, c.usize(*start)?, c.usize(*end)?);
            if axis >= x.shape.len() || start >= end || end > x.shape[axis] {
                return Err(c.err(format!("bad slice axis {axis} [{start}, {end})")));
            }
            let mut shape = x.shape.clone();
            shape[axis] = end - start;
            Ok(Meta::Tensor(TensorMeta::new(shape, x.dtype)))
        }
        Op::UpsampleNearest([x, factor]) => {
            let x = c.tensor(*x)?;
            let f = c.usize(*factor)?;
            if x.shape.len() != 4 || f == 0 {
                return Err(c.err("upsample_nearest takes x[N,C,H,W] and a positive factor"));
            }
            Ok(f32_tensor(vec![
                x.shape[0],
                x.shape[1],
                x.shape[2] * f,
                x.shape[3] * f,
            ]))
        }
        Op::TimestepEmbedding([t, dim, flip, shift, scale]) => {
            let t = c.tensor(*t)?;
            let dim = c.usize(*dim)?;
            c.int(*flip)?;
            c.float(*shift)?;
            c.float(*scale)?;
            if t.shape.len() != 1 {
                return Err(c.err("timesteps must be 1-D [B]"));
            }
            Ok(f32_tensor(vec![t.shape[0], dim]))
        }
        Op::Embedding([table, idx]) => {
            let table = c.tensor(*table)?;
            let idx = c.tensor(*idx)?;
            if table.shape.len() != 2 {
                return Err(c.err("the table must be 2-D [rows, dim]"));
            }
            let mut shape = idx.shape.clone();
            shape.push(table.shape[1]);
            Ok(f32_tensor(shape))
        }
        Op::SinCosPosEmbed([dim, gh, gw, base, interp]) => {
            let (dim, gh, gw) = (c.usize(*dim)?, c.usize(*gh)?, c.usize(*gw)?);
            c.float(*base)?;
            c.float(*interp)?;
            if dim % 4 != 0 {
                return Err(c.err("the embedding width must be a multiple of 4"));
            }
            Ok(f32_tensor(vec![gh * gw, dim]))
        }
        Op::RopeCos(ch) | Op::RopeSin(ch) => {
            if ch.len() < 3 {
                return Err(c.err("rope tables need ids, theta and axis widths"));
            }
            let ids = c.tensor(ch[0])?;
            c.float(ch[1])?;
            let dims = c.dims(&ch[2..])?;
            if ids.shape.len() != 2 || ids.shape[1] != dims.len() {
                return Err(c.err(format!("ids must be [S, {}]", dims.len())));
            }
            if dims.iter().any(|d| d % 2 != 0) {
                return Err(c.err("axis widths must be even"));
            }
            Ok(f32_tensor(vec![ids.shape[0], dims.iter().sum()]))
        }
        Op::Rope([x, cos, sin]) => {
            let (x, cos, sin) = (c.tensor(*x)?, c.tensor(*cos)?, c.tensor(*sin)?);
            if x.shape.len() != 4 {
                return Err(c.err("rope takes x[B, S, H, D]"));
            }
            let want = [x.shape[1], x.shape[3]];
            if cos.shape != want || sin.shape != want {
                return Err(c.err(format!("cos/sin must be {}", ShapeDisplay(&want))));
            }
            Ok(f32_tensor(x.shape.clone()))
        }
        Op::Seq(x) => {
            let x = c.tensor(*x)?;
            if x.shape.len() != 3 {
                return Err(c.err("a token sequence is [B, S, D]"));
            }
            Ok(Meta::Tensor(x.clone()))
        }
        Op::Shard(ch) | Op::AllGather(ch) => {
            if ch.len() < 6 {
                return Err(c.err("expected x AXIS MESH PARTS and segments"));
            }
            let x = c.tensor(ch[0])?;
            let axis = c.usize(ch[1])?;
            let mesh = mesh_axis(&c, ch[2])?;
            let parts = c.usize(ch[3])?;
            let segs = segments(&c, &ch[4..], parts)?;
            if axis >= x.shape.len() {
                return Err(c.err(format!("axis {axis} out of range")));
            }
            let local: usize = segs.iter().map(|s| s.0).sum();
            let valid: usize = segs.iter().map(|s| s.1).sum();
            let shard = matches!(op, Op::Shard(_));
            let (have, want) = if shard {
                (valid, local)
            } else {
                (local, valid)
            };
            if x.shape[axis] != have {
                return Err(c.err(format!(
                    "axis {axis} has {} rows but the segments need {have}",
                    x.shape[axis]
                )));
            }
            let mut shape = x.shape.clone();
            shape[axis] = want;
            let mut t = TensorMeta::new(shape, x.dtype);
            if shard {
                t.dist = Dist::Split {
                    axis,
                    parts,
                    mesh_axis: mesh,
                };
            }
            Ok(Meta::Tensor(t))
        }
        Op::SeqAttention(ch) => {
            if ch.len() < 8 {
                return Err(c.err("expected q k v HEADS SCALE METHOD and key segments"));
            }
            let (q, k, v) = (c.tensor(ch[0])?, c.tensor(ch[1])?, c.tensor(ch[2])?);
            let heads = c.usize(ch[3])?;
            c.float(ch[4])?;
            let method = c.name(ch[5])?;
            if crate::mesh::SeqMethod::parse(method.as_str()).is_none() {
                let known: Vec<&str> = crate::mesh::SeqMethod::ALL
                    .iter()
                    .map(|m| m.as_str())
                    .collect();
                return Err(c.err(format!("unknown method `{method}` ({})", known.join(", "))));
            }
            if ch[6..].len() % 2 != 0 {
                return Err(c.err("key segments must be pairs `LOCAL VALID`"));
            }
            let key_rows: usize = ch[6..]
                .chunks(2)
                .map(|p| c.usize(p[0]))
                .sum::<Result<usize, _>>()?;
            if q.shape.len() != 3 || k.shape != v.shape || k.shape.len() != 3 {
                return Err(c.err("q, k, v must be [B, S, heads*head_dim], k and v alike"));
            }
            if q.shape[0] != k.shape[0] || q.shape[2] != k.shape[2] {
                return Err(c.err("q and k differ in batch or width"));
            }
            if heads == 0 || q.shape[2] % heads != 0 {
                return Err(c.err(format!("{heads} heads do not divide the widths")));
            }
            if k.shape[1] != key_rows {
                return Err(c.err(format!(
                    "k has {} rows but the key segments hold {key_rows}",
                    k.shape[1]
                )));
            }
            Ok(f32_tensor(q.shape.clone()))
        }
        Op::Fused(ch) => {
            if ch.is_empty() {
                return Err(c.err("fused needs a kernel name"));
            }
            c.name(ch[0])?;
            let mut shape: Vec<usize> = vec![];
            for &a in &ch[1..] {
                let t = c.tensor(a)?;
                shape = broadcast_shapes(&shape, &t.shape)
                    .ok_or_else(|| c.err("arguments do not broadcast"))?;
            }
            Ok(f32_tensor(shape))
        }
        Op::Arg(i) => {
            c.usize(*i)?;
            // Only meaningful inside a kernel body, where the kernel's arguments give shapes.
            Ok(f32_tensor(vec![]))
        }
        Op::Outputs(ch) => {
            for &o in ch.iter() {
                c.tensor(o)?;
            }
            Ok(Meta::Outputs)
        }
    }
}
