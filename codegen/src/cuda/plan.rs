//! From a [`Program`] to its CUDA kernels and, per step, the launches that run them.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::attention::{self, AttentionSpec};
use super::elementwise::{self, Elementwise, Emitted, Operand};
use super::emit::NAME;
use super::seq_attention::{self, SeqAttentionLayout};
use super::{conv, embed, kernel_hash, layout, norm, CudaError, CudaKernel, StorageDType};
use crate::program::{KInstr, MeshAxis, Program, Step, Storage, ValueId};

/// The CUDA side of a Program: its generated kernels and how each step uses them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaPlan {
    /// Storage type of weights and intermediates.
    pub dtype: StorageDType,
    /// Element type of every value (`Program::values` order): `dtype`, except f32 for the
    /// runtime inputs and values derived from them elementwise (unless a GEMM / convolution /
    /// attention reads them) and RoPE tables. Inputs are uploaded converted to their type.
    pub value_dtypes: Vec<StorageDType>,
    /// Element type of each runtime input (`Program::inputs` order): the runtime converts
    /// the caller's f32 data to it when uploading.
    pub input_dtypes: Vec<StorageDType>,
    /// Bytes to allocate for each planned buffer (its capacity at the widest element type
    /// stored in it).
    pub buffer_bytes: Vec<usize>,
    /// Distinct kernels (by source), each compiled once.
    pub kernels: Vec<CudaKernel>,
    /// One entry per `Program::steps`.
    pub steps: Vec<StepPlan>,
}

/// What runs for one step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Generated kernels to launch, in order: after the library call for a collective (they
    /// rearrange what it gathered), before it for a convolution (they write the column
    /// matrix and the bias the GEMM accumulates onto), otherwise alone.
    pub launches: Vec<Launch>,
    /// Work done by a library or a hand-written kernel of the backend instead.
    pub library: Option<LibraryOp>,
    /// Device scratch the step needs (16-byte aligned; `KArg::Scratch` points at it). For a
    /// collective it receives the gathered data, which the launches then rearrange.
    pub scratch_bytes: usize,
    /// A sequence-parallel attention's pieces in the scratch (see `seq_attention`).
    #[serde(default)]
    pub seq_attention: Option<SeqAttentionLayout>,
}

/// Steps the backend implements itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LibraryOp {
    /// `Step::Linear`: cuBLASLt (bias in the epilogue).
    Gemm,
    /// `Step::Conv2d`, after its launches have written the column matrix `col[N, P, K]`
    /// (P output pixels, K = Ci·kh·kw) to the scratch and the bias to `out`: a batched GEMM
    /// accumulating `out[n] (row-major [Co, P]) += W [Co, K] · col[n]ᵀ` for every image n.
    Conv2d,
    /// `Step::SeqAttention`: the sequence-parallel exchange (Ulysses all-to-all, Ring K/V
    /// passing) around the launches: `launches[0]` (flash attention) once per K/V block,
    /// with Ring `launches[1]` after the first block and `launches[2]` after each other
    /// (the log-sum-exp merges), over the scratch as `StepPlan::seq_attention` lays it out.
    /// Displaced attention has no launches: it runs on the CPU backend. A plain
    /// `Step::Attention` is a launch of the generated kernel.
    Attention,
    /// `Step::AllGather`: NCCL all-gather of `x` into the step's scratch, members in order;
    /// the launches then drop the padding.
    Collective,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// Index into `CudaPlan::kernels`.
    pub kernel: usize,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory (the generated kernels use static shared memory only).
    pub shared_bytes: u32,
    /// The kernel's parameters, in order.
    pub args: Vec<KArg>,
}

/// A kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KArg {
    /// Device pointer to a value's storage (its element type is `value_dtypes[v]`).
    Value(ValueId),
    /// Device pointer to element `offset` of a value (a slice's first element).
    ValueAt { value: ValueId, offset: usize },
    /// Device pointer to the step's scratch.
    Scratch,
    /// Device pointer `bytes` into the step's scratch.
    ScratchAt(usize),
    /// `int`: this rank's index along the mesh axis (Programs are SPMD: one source for
    /// every rank).
    MeshIndex(MeshAxis),
}

/// Collects kernels, deduplicating identical sources and keeping names unique.
#[derive(Default)]
pub(crate) struct Builder {
    kernels: Vec<CudaKernel>,
    by_template: HashMap<u64, usize>,
    names: HashSet<String>,
}

impl Builder {
    /// Adds the kernel whose source is `template` (with [`NAME`] where its name goes),
    /// named `base` (or `base_2`, `base_3`, ... when `base` is taken by another source).
    pub(crate) fn kernel(&mut self, base: &str, template: String) -> usize {
        let key = kernel_hash(&template);
        if let Some(&k) = self.by_template.get(&key) {
            return k;
        }
        let base = sanitize(base);
        let mut name = base.clone();
        let mut i = 2;
        while self.names.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        let source = template.replace(NAME, &name);
        self.names.insert(name.clone());
        self.kernels.push(CudaKernel {
            hash: kernel_hash(&source),
            name,
            source,
        });
        self.by_template.insert(key, self.kernels.len() - 1);
        self.kernels.len() - 1
    }
}

/// A C identifier from a kernel name (fused kernels are already named `k3_add_mul_add`).
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, 'k');
    }
    s
}

/// What a generator sees of the step it works on.
pub(crate) struct Ctx<'a> {
    pub program: &'a Program,
    pub dtypes: &'a [StorageDType],
}

impl Ctx<'_> {
    pub(crate) fn shape(&self, v: ValueId) -> &[usize] {
        &self.program.values[v].shape
    }
    pub(crate) fn numel(&self, v: ValueId) -> usize {
        self.program.values[v].numel()
    }
    pub(crate) fn dtype(&self, v: ValueId) -> StorageDType {
        self.dtypes[v]
    }
}

/// A launch of an emitted kernel over `args`.
pub(crate) fn launch(e: Emitted, args: Vec<KArg>) -> Launch {
    Launch {
        kernel: e.kernel,
        grid: e.grid,
        block: e.block,
        shared_bytes: 0,
        args,
    }
}

/// The kernels of `program` with storage type `dtype` (see [`cuda_plan`]).
pub fn cuda_sources(program: &Program, dtype: StorageDType) -> Result<Vec<CudaKernel>, CudaError> {
    Ok(cuda_plan(program, dtype)?.kernels)
}

/// Generates the CUDA kernels of every step that is not a GEMM, a convolution, attention or
/// a collective, and the launches of every step.
pub fn cuda_plan(program: &Program, dtype: StorageDType) -> Result<CudaPlan, CudaError> {
    check_ids(program)?;
    let (value_dtypes, input_dtypes, buffer_bytes) = value_dtypes(program, dtype);
    let ctx = Ctx {
        program,
        dtypes: &value_dtypes,
    };
    let mut b = Builder::default();
    let mut steps = Vec::with_capacity(program.steps.len());
    for (i, step) in program.steps.iter().enumerate() {
        let plan = step_plan(&mut b, &ctx, step).map_err(|reason| CudaError::Unsupported {
            step: i,
            kind: step.kind().to_string(),
            reason,
        })?;
        steps.push(plan);
    }
    Ok(CudaPlan {
        dtype,
        value_dtypes,
        input_dtypes,
        buffer_bytes,
        kernels: b.kernels,
        steps,
    })
}

/// Every value, kernel and storage index a step names exists (plans are files a user
/// hands us: a bad one is an error, not a panic).
fn check_ids(p: &Program) -> Result<(), CudaError> {
    let bad = |i: usize, s: &Step, reason: String| CudaError::Unsupported {
        step: i,
        kind: s.kind().to_string(),
        reason,
    };
    for (i, s) in p.steps.iter().enumerate() {
        for v in s.operands().into_iter().chain([s.output()]) {
            let Some(val) = p.values.get(v) else {
                return Err(bad(i, s, format!("value {v} does not exist")));
            };
            let ok = match val.storage {
                Storage::Buffer(b) => p.buffers.get(b).is_some_and(|&cap| cap >= val.numel()),
                Storage::Weight(w) => p.weights.get(w).is_some(),
                Storage::Input(x) => p.inputs.get(x).is_some(),
            };
            if !ok {
                return Err(bad(
                    i,
                    s,
                    format!("value {v} has bad storage {:?}", val.storage),
                ));
            }
        }
        if let Step::Fused { kernel, .. } = s {
            if p.kernels.get(*kernel).is_none() {
                return Err(bad(i, s, format!("kernel {kernel} does not exist")));
            }
        }
        if !matches!(p.values[s.output()].storage, Storage::Buffer(_)) {
            return Err(bad(i, s, "writes outside the planned buffers".into()));
        }
    }
    Ok(())
}

/// Where the data a value names came from: a runtime input, a weight, or the step that
/// last wrote its buffer (values of one buffer are views of the same data until the next
/// write, which liveness guarantees comes after their last read).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Input(usize),
    Weight,
    Step(usize),
}

/// Steps that only move or combine their operands elementwise: with f32 operands they keep
/// f32 (unless a library op reads the result).
fn keeps_f32(step: &Step) -> bool {
    matches!(
        step,
        Step::Fused { .. }
            | Step::Copy { .. }
            | Step::Concat { .. }
            | Step::Slice { .. }
            | Step::Permute { .. }
            | Step::Shard { .. }
            | Step::AllGather { .. }
            | Step::UpsampleNearest { .. }
    )
}

/// Element type of each value, and bytes of each buffer.
///
/// Everything is `dtype` except small f32 islands where 16 bits would lose what matters:
/// runtime inputs (timesteps, class labels, position ids, guidance), values computed only
/// from f32 values by elementwise and layout steps (Flux's `timestep * 1000`: bf16 would
/// move t = 730 to 728 and change every high-frequency component of its embedding), and
/// RoPE tables (cos/sin of large angles). GEMMs, convolutions and attention read their
/// operands in `dtype`, so a value a library step reads is `dtype` (an input then is
/// converted when uploaded).
fn value_dtypes(
    p: &Program,
    dtype: StorageDType,
) -> (Vec<StorageDType>, Vec<StorageDType>, Vec<usize>) {
    let is_library = |s: &Step| {
        matches!(
            s,
            Step::Linear { .. }
                | Step::Conv2d { .. }
                | Step::Attention { .. }
                | Step::SeqAttention { .. }
        )
    };
    // Pass 1: the source of every operand, and which sources a library step reads.
    let mut current: Vec<Option<usize>> = vec![None; p.buffers.len()];
    let mut source: Vec<Option<Source>> = vec![None; p.values.len()];
    let mut library_read: HashSet<Source> = HashSet::new();
    let source_of = |st: Storage, current: &[Option<usize>]| match st {
        Storage::Input(i) => Some(Source::Input(i)),
        Storage::Weight(_) => Some(Source::Weight),
        Storage::Buffer(b) => current.get(b).copied().flatten().map(Source::Step),
    };
    for (i, step) in p.steps.iter().enumerate() {
        for v in step.operands() {
            let src = source_of(p.values[v].storage, &current);
            source[v] = source[v].or(src);
            if let (true, Some(src)) = (is_library(step), src) {
                library_read.insert(src);
            }
        }
        let out = step.output();
        if let Storage::Buffer(b) = p.values[out].storage {
            if let Some(c) = current.get_mut(b) {
                *c = Some(i);
            }
        }
        source[out] = Some(Source::Step(i));
    }
    // Pass 2: types in program order (a step's type depends on its operands').
    let mut of_source: HashMap<Source, StorageDType> = HashMap::new();
    for i in 0..p.inputs.len() {
        let src = Source::Input(i);
        let d = if library_read.contains(&src) {
            dtype
        } else {
            StorageDType::F32
        };
        of_source.insert(src, d);
    }
    of_source.insert(Source::Weight, dtype);
    let mut widest = vec![dtype.bytes(); p.buffers.len()];
    for (i, step) in p.steps.iter().enumerate() {
        let ops = step.operands();
        let all_f32 = !ops.is_empty()
            && ops.iter().all(|&v| {
                source[v]
                    .and_then(|s| of_source.get(&s))
                    .copied()
                    .unwrap_or(dtype)
                    == StorageDType::F32
            });
        let d = match step {
            Step::RopeTables { .. } => StorageDType::F32,
            s if keeps_f32(s) && all_f32 && !library_read.contains(&Source::Step(i)) => {
                StorageDType::F32
            }
            _ => dtype,
        };
        of_source.insert(Source::Step(i), d);
        if let Storage::Buffer(b) = p.values[step.output()].storage {
            if let Some(w) = widest.get_mut(b) {
                *w = (*w).max(d.bytes());
            }
        }
    }
    let vd = p
        .values
        .iter()
        .enumerate()
        .map(|(v, val)| match source[v] {
            Some(s) => of_source.get(&s).copied().unwrap_or(dtype),
            None => match val.storage {
                Storage::Input(i) => of_source
                    .get(&Source::Input(i))
                    .copied()
                    .unwrap_or(StorageDType::F32),
                _ => dtype,
            },
        })
        .collect();
    let inputs = (0..p.inputs.len())
        .map(|i| of_source[&Source::Input(i)])
        .collect();
    let bytes = p
        .buffers
        .iter()
        .zip(&widest)
        .map(|(&n, &w)| n * w)
        .collect();
    (vd, inputs, bytes)
}

fn library(op: LibraryOp) -> StepPlan {
    StepPlan {
        library: Some(op),
        ..StepPlan::default()
    }
}

fn launches(l: Vec<Launch>) -> StepPlan {
    StepPlan {
        launches: l,
        ..StepPlan::default()
    }
}

fn step_plan(b: &mut Builder, cx: &Ctx, step: &Step) -> Result<StepPlan, String> {
    let p = cx.program;
    Ok(match step {
        Step::Linear { .. } => library(LibraryOp::Gemm),
        Step::Conv2d {
            x,
            w,
            b: bias,
            out,
            stride,
            pad,
        } => conv::conv2d(b, cx, *x, *w, *bias, *out, *stride, *pad)?,
        Step::Attention {
            q,
            k,
            v,
            out,
            batch,
            sq,
            sk,
            heads,
            head_dim,
            head_dim_v,
            scale,
        } => {
            if head_dim != head_dim_v {
                return Err(format!(
                    "attention with value width {head_dim_v} != key width {head_dim}"
                ));
            }
            let spec = AttentionSpec {
                batch: *batch,
                sq: *sq,
                sk: *sk,
                heads: *heads,
                head_dim: *head_dim,
                scale: *scale,
                dtype: cx.dtype(*q),
                lse: false,
                key_mask: false,
            };
            for (x, rows) in [(*q, sq), (*k, sk), (*v, sk), (*out, sq)] {
                if cx.numel(x) != batch * rows * heads * head_dim || cx.dtype(x) != spec.dtype {
                    return Err(format!(
                        "attention operand {x} holds {} {} values, expected {batch} x {rows} x {heads} x {head_dim} {}",
                        cx.numel(x),
                        cx.dtype(x),
                        spec.dtype
                    ));
                }
            }
            let e = attention::attention_kernel(b, &spec)?;
            launches(vec![launch(
                e,
                vec![
                    KArg::Value(*out),
                    KArg::Value(*q),
                    KArg::Value(*k),
                    KArg::Value(*v),
                ],
            )])
        }
        s @ Step::SeqAttention { .. } => seq_attention::seq_attention(b, cx, s)?,
        Step::Fused { kernel, args, out } => {
            let k = &p.kernels[*kernel];
            if k.num_args != args.len() {
                return Err(format!(
                    "kernel `{}` takes {} arguments, the step passes {}",
                    k.name,
                    k.num_args,
                    args.len()
                ));
            }
            let out_shape = cx.shape(*out);
            let ops = args
                .iter()
                .map(|&a| {
                    Ok(Operand {
                        dtype: cx.dtype(a),
                        base: 0,
                        strides: elementwise::broadcast_strides(cx.shape(a), out_shape)?,
                        base_at_launch: false,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let e = elementwise::emit(
                b,
                &Elementwise {
                    name: &k.name,
                    what: format!("fused elementwise `{}`: {}", k.name, k.source),
                    body: &k.body,
                    out_shape,
                    out_dtype: cx.dtype(*out),
                    args: ops,
                },
            )?;
            let mut a = vec![KArg::Value(*out)];
            a.extend(args.iter().map(|&v| KArg::Value(v)));
            launches(e.map(|e| launch(e, a)).into_iter().collect())
        }
        Step::Copy { x, out } => {
            if cx.numel(*x) != cx.numel(*out) {
                return Err("copy between values of different sizes".into());
            }
            let shape = cx.shape(*out);
            let e = elementwise::emit(
                b,
                &Elementwise {
                    name: "copy",
                    what: "copy (with conversion between storage types)".into(),
                    body: &[KInstr::Arg(0)],
                    out_shape: shape,
                    out_dtype: cx.dtype(*out),
                    args: vec![Operand {
                        dtype: cx.dtype(*x),
                        base: 0,
                        strides: elementwise::contiguous_strides(shape),
                        base_at_launch: false,
                    }],
                },
            )?;
            launches(
                e.map(|e| launch(e, vec![KArg::Value(*out), KArg::Value(*x)]))
                    .into_iter()
                    .collect(),
            )
        }
        Step::Fill { out, value } => {
            let e = elementwise::emit(
                b,
                &Elementwise {
                    name: "fill",
                    what: format!("fill with {value:?}"),
                    body: &[KInstr::Const(*value)],
                    out_shape: cx.shape(*out),
                    out_dtype: cx.dtype(*out),
                    args: vec![],
                },
            )?;
            launches(
                e.map(|e| launch(e, vec![KArg::Value(*out)]))
                    .into_iter()
                    .collect(),
            )
        }
        Step::LayerNorm {
            x,
            out,
            rows,
            cols,
            eps,
        } => launches(norm::row(
            b,
            cx,
            norm::RowOp::LayerNorm(*eps),
            *x,
            *out,
            *rows,
            *cols,
        )?),
        Step::RmsNorm {
            x,
            out,
            rows,
            cols,
            eps,
        } => launches(norm::row(
            b,
            cx,
            norm::RowOp::RmsNorm(*eps),
            *x,
            *out,
            *rows,
            *cols,
        )?),
        Step::Softmax { x, out, rows, cols } => launches(norm::row(
            b,
            cx,
            norm::RowOp::Softmax,
            *x,
            *out,
            *rows,
            *cols,
        )?),
        Step::GroupNorm {
            x,
            out,
            n,
            c,
            hw,
            groups,
            eps,
        } => norm::group_norm(b, cx, *x, *out, *n, *c, *hw, *groups, *eps)?,
        Step::Permute { x, out, perm } => launches(layout::permute(b, cx, *x, *out, perm)?),
        Step::Concat { inputs, axis, out } => launches(layout::concat(b, cx, inputs, *axis, *out)?),
        Step::Slice {
            x,
            axis,
            start,
            end,
            out,
        } => launches(layout::slice(b, cx, *x, *axis, *start, *end, *out)?),
        Step::UpsampleNearest { x, out, factor } => {
            launches(layout::upsample_nearest(b, cx, *x, *out, *factor)?)
        }
        Step::Embedding { table, idx, out } => {
            launches(layout::embedding(b, cx, *table, *idx, *out)?)
        }
        Step::Shard {
            x,
            out,
            axis,
            mesh,
            parts,
            segments,
        } => launches(layout::shard(
            b, cx, *x, *out, *axis, *mesh, *parts, segments,
        )?),
        Step::AllGather {
            x,
            out,
            axis,
            parts,
            segments,
            ..
        } => layout::all_gather(b, cx, *x, *out, *axis, *parts, segments)?,
        Step::TimestepEmbedding {
            t,
            out,
            dim,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale,
        } => launches(embed::timestep_embedding(
            b,
            cx,
            *t,
            *out,
            *dim,
            *flip_sin_to_cos,
            *downscale_freq_shift,
            *scale,
        )?),
        Step::SinCosPosEmbed {
            out,
            dim,
            grid_h,
            grid_w,
            base_size,
            interpolation_scale,
        } => launches(embed::sincos_pos_embed(
            b,
            cx,
            *out,
            *dim,
            *grid_h,
            *grid_w,
            *base_size,
            *interpolation_scale,
        )?),
        Step::RopeTables {
            ids,
            theta,
            axes_dims,
            out,
            cos,
        } => launches(embed::rope_tables(
            b, cx, *ids, *theta, axes_dims, *out, *cos,
        )?),
        Step::Rope { x, cos, sin, out } => launches(embed::rope(b, cx, *x, *cos, *sin, *out)?),
    })
}
