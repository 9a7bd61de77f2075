//! The op language of ditto's graph IR.
//!
//! Tensor ops are e-nodes of one `egg` language. Attributes (axes, head counts, epsilons, names)
//! are leaf children, as in Tensat, so rewrites can match on them and the e-graph hash-conses
//! them like any other node.

use std::fmt;
use std::str::FromStr;

use egg::{define_language, Id, Symbol};

/// An `f64` attribute stored by its bits so it can be hashed and ordered inside the e-graph.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Float(u64);

impl Float {
    pub fn new(v: f64) -> Self {
        Float(v.to_bits())
    }
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Debug for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl fmt::Display for Float {
    // `{:?}` of an f64 always carries a '.' or an exponent, so the text re-parses as a Float,
    // never as an integer attribute.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl FromStr for Float {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let looks_float = s.contains(['.', 'e', 'E']) || matches!(s, "inf" | "-inf" | "NaN");
        let starts_numeric = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == 'i' || c == 'N');
        if !looks_float || !starts_numeric {
            return Err(());
        }
        s.parse::<f64>().map(Float::new).map_err(|_| ())
    }
}

define_language! {
    // One node of the graph. Children are tensors unless the comment says otherwise.
    pub enum Op {
        // ---- sources ----
        // `input NAME DTYPE d0 d1 ...`: a runtime argument (diffusers' forward-argument name).
        "input" = Input(Box<[Id]>),
        // `weight NAME d0 d1 ...`: a checkpoint tensor, as f32.
        "weight" = Weight(Box<[Id]>),
        // `scalar F`: a 0-d constant; broadcasts against anything.
        "scalar" = Scalar(Id),

        // ---- GEMM-shaped ----
        // `linear x w`: x[..., K] · w[N, K]ᵀ -> [..., N] (PyTorch nn.Linear layout).
        "linear" = Linear([Id; 2]),
        // `linear_bias x w b`: linear plus a bias b[N].
        "linear_bias" = LinearBias([Id; 3]),
        // `attention q k v HEADS SCALE`: q[B,Sq,H*D], k[B,Sk,H*D], v[B,Sk,H*Dv] -> [B,Sq,H*Dv].
        "attention" = Attention([Id; 5]),
        // `conv2d x w b STRIDE PAD`: NCHW, w[O,C,kh,kw], b[O].
        "conv2d" = Conv2d([Id; 5]),

        // ---- elementwise (numpy broadcasting) ----
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "neg" = Neg(Id),
        "silu" = Silu(Id),
        "gelu_tanh" = GeluTanh(Id),
        "gelu" = Gelu(Id),
        "sigmoid" = Sigmoid(Id),
        "tanh" = Tanh(Id),
        "exp" = Exp(Id),

        // ---- normalizations and reductions (over the last axis unless noted) ----
        // `layer_norm x EPS`: no affine; scale/shift are separate elementwise ops.
        "layer_norm" = LayerNorm([Id; 2]),
        // `rms_norm x EPS`: no weight; the weight is a separate `mul`.
        "rms_norm" = RmsNorm([Id; 2]),
        // `group_norm x GROUPS EPS`: x[N,C,...], statistics per (n, group); no affine.
        "group_norm" = GroupNorm([Id; 3]),
        "softmax" = Softmax(Id),

        // ---- layout ----
        // `reshape x d0 d1 ...`: row-major, element count preserved.
        "reshape" = Reshape(Box<[Id]>),
        // `permute x p0 p1 ...`: out.shape[i] = x.shape[p_i].
        "permute" = Permute(Box<[Id]>),
        // `concat AXIS x0 x1 ...`
        "concat" = Concat(Box<[Id]>),
        // `slice x AXIS START END`
        "slice" = Slice([Id; 4]),
        // `upsample_nearest x FACTOR`: NCHW nearest-neighbour upsampling.
        "upsample_nearest" = UpsampleNearest([Id; 2]),

        // ---- embeddings ----
        // `timestep_embedding t DIM FLIP_SIN_TO_COS DOWNSCALE_FREQ_SHIFT SCALE`: t[B] -> [B, DIM].
        "timestep_embedding" = TimestepEmbedding([Id; 5]),
        // `embedding table idx`: table[R, D], idx[...] (integral values) -> [..., D].
        "embedding" = Embedding([Id; 2]),
        // `sincos_pos_embed DIM GRID_H GRID_W BASE_SIZE INTERP_SCALE` -> [GRID_H*GRID_W, DIM].
        "sincos_pos_embed" = SinCosPosEmbed([Id; 5]),
        // `rope_cos ids THETA d0 d1 ...`: ids[S, n_axes] -> [S, sum(d)], pairs interleaved.
        "rope_cos" = RopeCos(Box<[Id]>),
        // `rope_sin ids THETA d0 d1 ...`
        "rope_sin" = RopeSin(Box<[Id]>),
        // `rope x cos sin`: x[B,S,H,D], cos/sin[S,D]; interleaved-pair rotation.
        "rope" = Rope([Id; 3]),

        // ---- sequence parallelism ----
        // `seq x`: marks x[B, S, D] as a token sequence that may be split across ranks
        // along axis 1 (placed by the model builders; an identity otherwise).
        "seq" = Seq(Id),
        // `shard x AXIS MESH PARTS L0 V0 L1 V1 ...`: this rank's rows of x along AXIS. The
        // axis is a concatenation of segments of V_i valid rows; each is padded to
        // PARTS * L_i rows and split evenly (L_i rows per rank, zeros past V_i).
        "shard" = Shard(Box<[Id]>),
        // `all_gather x AXIS MESH PARTS L0 V0 ...`: the inverse of shard (padding dropped).
        "all_gather" = AllGather(Box<[Id]>),
        // `seq_attention q k v HEADS SCALE METHOD L0 V0 ...`: attention of this rank's query
        // rows over every sequence-parallel rank's keys; k/v rows laid out as the segments.
        // METHOD: ulysses, ring or usp.
        "seq_attention" = SeqAttention(Box<[Id]>),

        // ---- formed by passes ----
        // `fused KERNEL a0 a1 ...`: an elementwise kernel whose body is `Graph::kernels[KERNEL]`.
        "fused" = Fused(Box<[Id]>),
        // `arg I`: the I-th argument inside a fused kernel body.
        "arg" = Arg(Id),

        // `outputs o0 o1 ...`: the graph's root; names live in `Graph::outputs`.
        "outputs" = Outputs(Box<[Id]>),

        Int(i64),
        Float(Float),
        Name(Symbol),
    }
}

impl Op {
    /// True for leaves that are attributes, not tensors.
    pub fn is_attribute(&self) -> bool {
        matches!(self, Op::Int(_) | Op::Float(_) | Op::Name(_))
    }

    /// True for ops that map each output element from the elements at the same (broadcast)
    /// index of the operands: what the fusion pass may put in one kernel.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Add(_)
                | Op::Sub(_)
                | Op::Mul(_)
                | Op::Div(_)
                | Op::Neg(_)
                | Op::Silu(_)
                | Op::GeluTanh(_)
                | Op::Gelu(_)
                | Op::Sigmoid(_)
                | Op::Tanh(_)
                | Op::Exp(_)
        )
    }

    /// The name by which the text form and error messages call this op.
    pub fn name(&self) -> String {
        match self {
            Op::Int(i) => i.to_string(),
            Op::Float(f) => f.to_string(),
            Op::Name(s) => s.to_string(),
            other => other.to_string(),
        }
    }
}
