//! The CPU backend: executes a `Program` step by step in f32 over its planned buffers.

use std::sync::Arc;
use std::time::Instant;

use ditto_codegen::{Program, Step, Storage, ValueId};

use super::fused::run_fused;
use super::kernels::{attention, conv, embed, gemm, layout, norm};
use crate::RuntimeError;

/// Weights of a program, in `Program::weights` order, as f32.
pub type Weights = Arc<Vec<Vec<f32>>>;

pub struct CpuExecutor {
    program: Arc<Program>,
    weights: Weights,
    buffers: Vec<Vec<f32>>,
}

/// Time spent per step kind during one run.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub by_kind: Vec<(&'static str, f64, usize)>,
}

impl Profile {
    fn add(&mut self, kind: &'static str, secs: f64) {
        match self.by_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(e) => {
                e.1 += secs;
                e.2 += 1;
            }
            None => self.by_kind.push((kind, secs, 1)),
        }
    }
}

impl CpuExecutor {
    pub fn new(program: Arc<Program>, weights: Weights) -> Result<Self, RuntimeError> {
        if weights.len() != program.weights.len() {
            return Err(RuntimeError::Binding(format!(
                "the program needs {} weights, {} were given",
                program.weights.len(),
                weights.len()
            )));
        }
        for (b, w) in program.weights.iter().zip(weights.iter()) {
            let n: usize = b.shape.iter().product();
            if w.len() != n {
                return Err(RuntimeError::Binding(format!(
                    "weight `{}` has {} elements, the program expects {n}",
                    b.name,
                    w.len()
                )));
            }
        }
        let buffers = program.buffers.iter().map(|&n| vec![0.0; n]).collect();
        Ok(CpuExecutor {
            program,
            weights,
            buffers,
        })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs the program on `inputs` (in `Program::inputs` order) and returns the outputs in
    /// `Program::outputs` order.
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.run_inner(inputs, None)
    }

    /// Like [`run`](Self::run), also timing each step kind.
    pub fn run_profiled(
        &mut self,
        inputs: &[&[f32]],
    ) -> Result<(Vec<Vec<f32>>, Profile), RuntimeError> {
        let mut p = Profile::default();
        let out = self.run_inner(inputs, Some(&mut p))?;
        Ok((out, p))
    }

    fn run_inner(
        &mut self,
        inputs: &[&[f32]],
        mut profile: Option<&mut Profile>,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let program = self.program.clone();
        if inputs.len() != program.inputs.len() {
            return Err(RuntimeError::Binding(format!(
                "the program takes {} inputs, {} were given",
                program.inputs.len(),
                inputs.len()
            )));
        }
        for (b, x) in program.inputs.iter().zip(inputs) {
            let n: usize = b.shape.iter().product();
            if x.len() != n {
                return Err(RuntimeError::Binding(format!(
                    "input `{}` has {} elements, the program expects {n} (shape {:?})",
                    b.name,
                    x.len(),
                    b.shape
                )));
            }
        }
        for step in &program.steps {
            let t0 = profile.as_ref().map(|_| Instant::now());
            self.exec(&program, step, inputs)?;
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p.add(step.kind(), t0.elapsed().as_secs_f64());
            }
        }
        Ok(program
            .outputs
            .iter()
            .map(|(_, v)| self.read(&program, *v, inputs).to_vec())
            .collect())
    }

    fn read<'a>(&'a self, p: &Program, v: ValueId, inputs: &[&'a [f32]]) -> &'a [f32] {
        let val = &p.values[v];
        let n = val.numel();
        match val.storage {
            Storage::Buffer(b) => &self.buffers[b][..n],
            Storage::Weight(w) => &self.weights[w][..n],
            Storage::Input(i) => &inputs[i][..n],
        }
    }

    fn exec(&mut self, p: &Program, step: &Step, inputs: &[&[f32]]) -> Result<(), RuntimeError> {
        let out_v = &p.values[step.output()];
        let Storage::Buffer(ob) = out_v.storage else {
            return Err(RuntimeError::Binding(
                "a step writes outside the planned buffers".into(),
            ));
        };
        let n = out_v.numel();
        // The output buffer is taken out while operands are read: the memory plan guarantees
        // it is not one of them.
        let mut obuf = std::mem::take(&mut self.buffers[ob]);
        let out = &mut obuf[..n];
        let r = |v: ValueId| self.read(p, v, inputs);
        let shape = |v: ValueId| p.values[v].shape.as_slice();
        let mut result = Ok(());
        match step {
            Step::Fused { kernel, args, .. } => {
                let a: Vec<(&[f32], &[usize])> = args.iter().map(|&v| (r(v), shape(v))).collect();
                run_fused(&p.kernels[*kernel], &a, &out_v.shape, out);
            }
            Step::Linear {
                x, w, b, m, k, n, ..
            } => gemm::linear(r(*x), *m, *k, r(*w), *n, b.map(r), out),
            Step::Attention {
                q,
                k,
                v,
                batch,
                sq,
                sk,
                heads,
                head_dim,
                head_dim_v,
                scale,
                ..
            } => {
                if head_dim != head_dim_v {
                    result = Err(RuntimeError::Unsupported(format!(
                        "attention with value width {head_dim_v} != key width {head_dim}"
                    )));
                } else {
                    attention::attention(
                        r(*q),
                        r(*k),
                        r(*v),
                        *batch,
                        *sq,
                        *sk,
                        *heads,
                        *head_dim,
                        *scale,
                        out,
                    )
                }
            }
            Step::LayerNorm {
                x, rows, cols, eps, ..
            } => norm::layer_norm(r(*x), *rows, *cols, *eps, out),
            Step::RmsNorm {
                x, rows, cols, eps, ..
            } => norm::rms_norm(r(*x), *rows, *cols, *eps, out),
            Step::GroupNorm {
                x,
                n,
                c,
                hw,
                groups,
                eps,
                ..
            } => norm::group_norm(r(*x), *n, *c, *hw, *groups, *eps, out),
            Step::Softmax { x, rows, cols, .. } => norm::softmax(r(*x), *rows, *cols, out),
            Step::Permute { x, perm, .. } => layout::permute(r(*x), shape(*x), perm, out),
            Step::Concat {
                inputs: xs, axis, ..
            } => {
                let a: Vec<(&[f32], &[usize])> = xs.iter().map(|&v| (r(v), shape(v))).collect();
                layout::concat(&a, *axis, out)
            }
            Step::Slice {
                x,
                axis,
                start,
                end,
                ..
            } => layout::slice(r(*x), shape(*x), *axis, *start, *end, out),
            Step::Conv2d {
                x,
                w,
                b,
                stride,
                pad,
                ..
            } => {
                let xs = shape(*x);
                let ws = shape(*w);
                conv::conv2d(
                    r(*x),
                    xs[0],
                    xs[1],
                    xs[2],
                    xs[3],
                    r(*w),
                    ws[0],
                    ws[2],
                    ws[3],
                    Some(r(*b)),
                    *stride,
                    *pad,
                    out,
                )
            }
            Step::UpsampleNearest { x, factor, .. } => {
                let xs = shape(*x);
                if *factor == 2 {
                    conv::upsample_nearest2x(r(*x), xs[0], xs[1], xs[2], xs[3], out)
                } else {
                    upsample_nearest(r(*x), xs, *factor, out)
                }
            }
            Step::TimestepEmbedding {
                t,
                dim,
                flip_sin_to_cos,
                downscale_freq_shift,
                scale,
                ..
            } => embed::timestep_embedding(
                r(*t),
                *dim,
                *flip_sin_to_cos,
                *downscale_freq_shift,
                *scale,
                10000.0,
                out,
            ),
            Step::Embedding { table, idx, .. } => {
                let ts = shape(*table);
                if let Err(bad) = embed::embedding(r(*table), ts[0], ts[1], r(*idx), out) {
                    result = Err(RuntimeError::Input(format!(
                        "index {} is out of range for an embedding table of {} rows",
                        r(*idx).get(bad).copied().unwrap_or(f32::NAN),
                        ts[0]
                    )));
                }
            }
            Step::SinCosPosEmbed {
                dim,
                grid_h,
                grid_w,
                base_size,
                interpolation_scale,
                ..
            } => embed::sincos_pos_embed_2d(
                *dim,
                *grid_h,
                *grid_w,
                *base_size,
                *interpolation_scale,
                out,
            ),
            Step::RopeTables {
                ids,
                theta,
                axes_dims,
                cos,
                ..
            } => {
                let s = shape(*ids)[0];
                let d: usize = axes_dims.iter().sum();
                let mut other = vec![0.0; s * d];
                if *cos {
                    embed::rope_cos_sin(r(*ids), s, axes_dims, *theta, out, &mut other)
                } else {
                    embed::rope_cos_sin(r(*ids), s, axes_dims, *theta, &mut other, out)
                }
            }
            Step::Rope { x, cos, sin, .. } => {
                let xs = shape(*x);
                embed::apply_rope(r(*x), xs[0], xs[1], xs[2], xs[3], r(*cos), r(*sin), out)
            }
            Step::Shard { .. } | Step::AllGather { .. } | Step::SeqAttention { .. } => {
                result = Err(RuntimeError::Unsupported(format!(
                    "`{}` needs a communicator",
                    step.kind()
                )));
            }
            Step::Fill { value, .. } => out.fill(*value),
            Step::Copy { x, .. } => out.copy_from_slice(r(*x)),
        }
        self.buffers[ob] = obuf;
        result
    }
}

fn upsample_nearest(x: &[f32], s: &[usize], f: usize, out: &mut [f32]) {
    let (h, w) = (s[2], s[3]);
    let (ho, wo) = (h * f, w * f);
    for (plane, o) in x.chunks(h * w).zip(out.chunks_mut(ho * wo)) {
        for y in 0..ho {
            for xx in 0..wo {
                o[y * wo + xx] = plane[(y / f) * w + xx / f];
            }
        }
    }
}
