//! The per-rank `Program`: an ordered list of steps over planned buffers. It is what
//! `ditto compile` writes and what every backend executes; nothing runs a model any other way.

use serde::{Deserialize, Serialize};

pub use ditto_ir::mesh::{Mesh, MeshAxis, SeqMethod};

/// Index into `Program::values`.
pub type ValueId = usize;

/// Where a value's elements live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    /// A planned intermediate buffer (`Program::buffers`).
    Buffer(usize),
    /// A checkpoint tensor (`Program::weights`).
    Weight(usize),
    /// A runtime argument (`Program::inputs`).
    Input(usize),
}

/// A tensor value: its storage and shape. Reshapes are views: several values share storage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub storage: Storage,
    pub shape: Vec<usize>,
}

impl Value {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    pub shape: Vec<usize>,
    /// Element type the caller provides (`f32`, `i64`, ...); the CPU backend takes f32.
    pub dtype: String,
}

impl Binding {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that `len` elements fill this binding; the error names it as a `what`
    /// (`input`, `weight`).
    pub fn check_len(&self, what: &str, len: usize) -> Result<(), String> {
        let n = self.numel();
        if len == n {
            Ok(())
        } else {
            Err(format!(
                "{what} `{}` has {len} elements, the program expects {n} (shape {:?})",
                self.name, self.shape
            ))
        }
    }
}

/// One logical sequence inside a split axis. The axis of a split tensor is a concatenation of
/// segments (e.g. image tokens then text tokens); each segment is padded to `parts * local`
/// rows and split evenly, so a rank holds `local` rows of it, and global rows `>= valid` of
/// the segment are padding (zeros, never attended to as keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    pub local: usize,
    pub valid: usize,
}

/// One instruction of a fused elementwise kernel, in SSA order: instruction `i` defines
/// register `i`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum KInstr {
    Arg(usize),
    Const(f32),
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Div(usize, usize),
    Neg(usize),
    Silu(usize),
    GeluTanh(usize),
    Gelu(usize),
    Sigmoid(usize),
    Tanh(usize),
    Exp(usize),
}

/// A fused elementwise kernel: the last instruction is the result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub name: String,
    pub num_args: usize,
    pub body: Vec<KInstr>,
    /// The body in the IR's expression syntax, for humans.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// out = kernel(args...), each argument broadcast to out's shape.
    Fused {
        kernel: usize,
        args: Vec<ValueId>,
        out: ValueId,
    },
    /// out[m, n] = x[m, k] · w[n, k]ᵀ (+ b).
    Linear {
        x: ValueId,
        w: ValueId,
        b: Option<ValueId>,
        out: ValueId,
        m: usize,
        k: usize,
        n: usize,
    },
    Attention {
        q: ValueId,
        k: ValueId,
        v: ValueId,
        out: ValueId,
        batch: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        head_dim: usize,
        head_dim_v: usize,
        scale: f32,
    },
    LayerNorm {
        x: ValueId,
        out: ValueId,
        rows: usize,
        cols: usize,
        eps: f32,
    },
    RmsNorm {
        x: ValueId,
        out: ValueId,
        rows: usize,
        cols: usize,
        eps: f32,
    },
    GroupNorm {
        x: ValueId,
        out: ValueId,
        n: usize,
        c: usize,
        hw: usize,
        groups: usize,
        eps: f32,
    },
    Softmax {
        x: ValueId,
        out: ValueId,
        rows: usize,
        cols: usize,
    },
    Permute {
        x: ValueId,
        out: ValueId,
        perm: Vec<usize>,
    },
    Concat {
        inputs: Vec<ValueId>,
        axis: usize,
        out: ValueId,
    },
    Slice {
        x: ValueId,
        axis: usize,
        start: usize,
        end: usize,
        out: ValueId,
    },
    Conv2d {
        x: ValueId,
        w: ValueId,
        b: ValueId,
        out: ValueId,
        stride: usize,
        pad: usize,
    },
    UpsampleNearest {
        x: ValueId,
        out: ValueId,
        factor: usize,
    },
    TimestepEmbedding {
        t: ValueId,
        out: ValueId,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
        scale: f32,
    },
    Embedding {
        table: ValueId,
        idx: ValueId,
        out: ValueId,
    },
    SinCosPosEmbed {
        out: ValueId,
        dim: usize,
        grid_h: usize,
        grid_w: usize,
        base_size: f32,
        interpolation_scale: f32,
    },
    RopeTables {
        ids: ValueId,
        theta: f64,
        axes_dims: Vec<usize>,
        out: ValueId,
        /// true: cos table, false: sin table.
        cos: bool,
    },
    Rope {
        x: ValueId,
        cos: ValueId,
        sin: ValueId,
        out: ValueId,
    },
    /// out = this rank's rows of `x` along `axis`: for each segment, rows
    /// `[i * local, (i + 1) * local)` of it (zero past `valid`), `i` = the rank's index on `mesh`.
    Shard {
        x: ValueId,
        out: ValueId,
        axis: usize,
        mesh: MeshAxis,
        parts: usize,
        segments: Vec<Segment>,
    },
    /// Inverse of `Shard`: every member's rows gathered, padding dropped: out has
    /// `sum(valid)` rows along `axis`.
    AllGather {
        x: ValueId,
        out: ValueId,
        axis: usize,
        mesh: MeshAxis,
        parts: usize,
        segments: Vec<Segment>,
    },
    /// Attention whose queries, keys and values are split along the sequence (axis 1) over
    /// the Sp ranks. q: [B, sq, heads * head_dim] local rows, k/v: [B, sk, heads * head_dim]
    /// local rows laid out as `key_segments` (padding rows are masked out). Output: the
    /// local query rows. Heads that do not divide the Ulysses degree are padded inside.
    ///
    /// `Displaced`: the local queries attend to a store of every Sp member's K/V that the
    /// runtime keeps across runs (denoising steps): gathered synchronously in exact mode,
    /// one step stale for the other members in stale mode (DistriFusion), or only the
    /// neighbours' edge rows (PCPP). See `ditto_runtime::parallel::stale`.
    SeqAttention {
        q: ValueId,
        k: ValueId,
        v: ValueId,
        out: ValueId,
        method: SeqMethod,
        batch: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
        key_segments: Vec<Segment>,
    },
    /// out = a constant (a scalar node that no kernel absorbed).
    Fill { out: ValueId, value: f32 },
    /// out = x (a graph output that is a view of another output or of an input/weight).
    Copy { x: ValueId, out: ValueId },
}

impl Step {
    /// The value this step writes.
    pub fn output(&self) -> ValueId {
        match self {
            Step::Fused { out, .. }
            | Step::Linear { out, .. }
            | Step::Attention { out, .. }
            | Step::LayerNorm { out, .. }
            | Step::RmsNorm { out, .. }
            | Step::GroupNorm { out, .. }
            | Step::Softmax { out, .. }
            | Step::Permute { out, .. }
            | Step::Concat { out, .. }
            | Step::Slice { out, .. }
            | Step::Conv2d { out, .. }
            | Step::UpsampleNearest { out, .. }
            | Step::TimestepEmbedding { out, .. }
            | Step::Embedding { out, .. }
            | Step::SinCosPosEmbed { out, .. }
            | Step::RopeTables { out, .. }
            | Step::Rope { out, .. }
            | Step::Fill { out, .. }
            | Step::Copy { out, .. }
            | Step::Shard { out, .. }
            | Step::AllGather { out, .. }
            | Step::SeqAttention { out, .. } => *out,
        }
    }

    /// The values this step reads.
    pub fn operands(&self) -> Vec<ValueId> {
        match self {
            Step::Fused { args, .. } => args.clone(),
            Step::Linear { x, w, b, .. } => {
                let mut v = vec![*x, *w];
                v.extend(b);
                v
            }
            Step::Attention { q, k, v, .. } => vec![*q, *k, *v],
            Step::LayerNorm { x, .. }
            | Step::RmsNorm { x, .. }
            | Step::GroupNorm { x, .. }
            | Step::Softmax { x, .. }
            | Step::Permute { x, .. }
            | Step::Slice { x, .. }
            | Step::UpsampleNearest { x, .. }
            | Step::Copy { x, .. }
            | Step::Shard { x, .. }
            | Step::AllGather { x, .. } => vec![*x],
            Step::SeqAttention { q, k, v, .. } => vec![*q, *k, *v],
            Step::Concat { inputs, .. } => inputs.clone(),
            Step::Conv2d { x, w, b, .. } => vec![*x, *w, *b],
            Step::TimestepEmbedding { t, .. } => vec![*t],
            Step::Embedding { table, idx, .. } => vec![*table, *idx],
            Step::SinCosPosEmbed { .. } | Step::Fill { .. } => vec![],
            Step::RopeTables { ids, .. } => vec![*ids],
            Step::Rope { x, cos, sin, .. } => vec![*x, *cos, *sin],
        }
    }

    /// Short name for profiles and listings.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Fused { .. } => "fused",
            Step::Linear { .. } => "linear",
            Step::Attention { .. } => "attention",
            Step::LayerNorm { .. } => "layer_norm",
            Step::RmsNorm { .. } => "rms_norm",
            Step::GroupNorm { .. } => "group_norm",
            Step::Softmax { .. } => "softmax",
            Step::Permute { .. } => "permute",
            Step::Concat { .. } => "concat",
            Step::Slice { .. } => "slice",
            Step::Conv2d { .. } => "conv2d",
            Step::UpsampleNearest { .. } => "upsample_nearest",
            Step::TimestepEmbedding { .. } => "timestep_embedding",
            Step::Embedding { .. } => "embedding",
            Step::SinCosPosEmbed { .. } => "sincos_pos_embed",
            Step::RopeTables { .. } => "rope_tables",
            Step::Rope { .. } => "rope",
            Step::Fill { .. } => "fill",
            Step::Copy { .. } => "copy",
            Step::Shard { .. } => "shard",
            Step::AllGather { .. } => "all_gather",
            Step::SeqAttention { method, .. } => match method {
                SeqMethod::Ulysses => "ulysses_attention",
                SeqMethod::Ring => "ring_attention",
                SeqMethod::Usp => "usp_attention",
                SeqMethod::Displaced => "displaced_attention",
            },
        }
    }
}

/// A complete per-rank program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub format_version: u32,
    /// The device mesh the program was compiled for; every rank runs the same program and
    /// finds its own rows from its rank (SPMD).
    pub mesh: Mesh,
    pub inputs: Vec<Binding>,
    pub weights: Vec<Binding>,
    /// Capacity of each planned buffer, in elements.
    pub buffers: Vec<usize>,
    pub values: Vec<Value>,
    pub kernels: Vec<Kernel>,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, ValueId)>,
}

pub const FORMAT_VERSION: u32 = 2;

impl Program {
    /// Bytes of planned intermediate buffers at f32 (the memory plan's peak).
    pub fn buffer_bytes(&self) -> usize {
        self.buffers.iter().sum::<usize>() * 4
    }
    /// Bytes of weights at f32.
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .iter()
            .map(|w| w.shape.iter().product::<usize>() * 4)
            .sum()
    }
    /// Bytes the intermediates would take without buffer reuse.
    pub fn unplanned_bytes(&self) -> usize {
        self.steps
            .iter()
            .map(|s| self.values[s.output()].numel() * 4)
            .sum()
    }
    /// Floating-point operations of one execution (GEMMs, attention and convolutions; the
    /// rest is memory-bound and not counted).
    pub fn flops(&self) -> f64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Linear { m, k, n, .. } => 2.0 * (*m * *k * *n) as f64,
                Step::Attention {
                    batch,
                    sq,
                    sk,
                    heads,
                    head_dim,
                    head_dim_v,
                    ..
                } => 2.0 * (*batch * *heads * *sq * *sk * (*head_dim + *head_dim_v)) as f64,
                // Per rank: its query rows against every rank's keys.
                Step::SeqAttention {
                    batch,
                    sq,
                    sk,
                    heads,
                    head_dim,
                    ..
                } => {
                    let parts = self.mesh.sp() as f64;
                    4.0 * (*batch * *heads * *sq * *sk * *head_dim) as f64 * parts
                }
                Step::Conv2d { w, out, .. } => {
                    let ws = &self.values[*w].shape;
                    2.0 * (self.values[*out].numel() * ws[1] * ws[2] * ws[3]) as f64
                }
                _ => 0.0,
            })
            .sum()
    }
}
