//! Shape and dtype inference: one function shared by the graph builder (which refuses bad
//! nodes with an error) and the e-graph analysis (which marks them invalid for the verifier).

use egg::{Id, Language};

use crate::meta::{Meta, ShapeDisplay, TensorMeta};
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
pub fn infer<'a>(op: &'a Op, get: impl Fn(Id) -> &'a Meta) -> Result<Meta, IrError> {
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
