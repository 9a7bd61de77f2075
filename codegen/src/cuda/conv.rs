//! Convolution as an implicit GEMM's two halves that are not the GEMM: the column matrix
//! (im2col) in the step's scratch, and the bias broadcast into the output. The backend's
//! batched GEMM then accumulates `out[n] += W · col[n]ᵀ` (see [`LibraryOp::Conv2d`]).
//!
//! The column matrix is `[N, P, Ci·kh·kw]` (P = output pixels): each row is one output
//! pixel's receptive field in the weight's own `[Ci, kh, kw]` order, so the GEMM reads the
//! weight `[Co, Ci, kh, kw]` as the row-major `[Co, Ci·kh·kw]` matrix it already is and both
//! operands are K-contiguous (the "NT" form a linear layer also uses). The bias rides on the
//! accumulation rather than a GEMM epilogue because it varies along the GEMM's rows (output
//! channels), which cuBLASLt's bias epilogue does not broadcast.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::elementwise::{self, Elementwise, Emitted, Operand};
use super::emit::{self, Needs, NAME, THREADS};
use super::plan::{launch, Builder, Ctx, KArg, Launch, LibraryOp, StepPlan};
use super::StorageDType;
use crate::program::{KInstr, ValueId};

/// Blocks of the im2col grid at most; larger matrices are walked grid-stride.
const MAX_BLOCKS: usize = 1 << 20;

/// The geometry of one convolution step.
struct Geometry {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn of(
        cx: &Ctx,
        x: ValueId,
        w: ValueId,
        b: ValueId,
        out: ValueId,
        stride: usize,
        pad: usize,
    ) -> Result<Geometry, String> {
        let (xs, ws, os) = (cx.shape(x), cx.shape(w), cx.shape(out));
        if xs.len() != 4 || ws.len() != 4 || os.len() != 4 || stride == 0 {
            return Err(format!(
                "convolution of {xs:?} by {ws:?} (stride {stride}) into {os:?} is not a 2-D convolution"
            ));
        }
        let (kh, kw) = (ws[2], ws[3]);
        let span = |size: usize, k: usize| (size + 2 * pad).checked_sub(k).map(|r| r / stride + 1);
        let g = Geometry {
            n: xs[0],
            ci: xs[1],
            h: xs[2],
            w: xs[3],
            co: ws[0],
            kh,
            kw,
            oh: span(xs[2], kh).unwrap_or(0),
            ow: span(xs[3], kw).unwrap_or(0),
        };
        if ws[1] != g.ci || os != [g.n, g.co, g.oh, g.ow] || cx.numel(b) != g.co {
            return Err(format!(
                "convolution of {xs:?} by {ws:?} (stride {stride}, padding {pad}) with {} biases does not give {os:?}",
                cx.numel(b)
            ));
        }
        Ok(g)
    }
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }
    fn depth(&self) -> usize {
        self.ci * self.kh * self.kw
    }
}

/// The plan of a convolution step: im2col into the scratch (the column matrix, in the
/// weight's storage type, which the GEMM reads both operands in), then the bias into
/// `out`, then the library's GEMM.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    w: ValueId,
    bias: ValueId,
    out: ValueId,
    stride: usize,
    pad: usize,
) -> Result<StepPlan, String> {
    let g = Geometry::of(cx, x, w, bias, out, stride, pad)?;
    let mut plan = StepPlan {
        library: Some(LibraryOp::Conv2d),
        scratch_bytes: (g.n * g.pixels() * g.depth() * cx.dtype(w).bytes()).next_multiple_of(16),
        ..StepPlan::default()
    };
    if g.n * g.pixels() * g.depth() == 0 || cx.numel(out) == 0 {
        return Ok(plan);
    }
    let mut l = vec![im2col(b, cx, &g, x, w, stride, pad)];
    let od = cx.dtype(out);
    let view = [g.n, g.co, g.pixels()];
    let fill = elementwise::emit(
        b,
        &Elementwise {
            name: "conv_bias",
            what: format!(
                "convolution bias: out{view:?}[n, c, p] = bias[c] (the GEMM accumulates onto it)"
            ),
            body: &[KInstr::Arg(0)],
            out_shape: &view,
            out_dtype: od,
            args: vec![Operand {
                dtype: cx.dtype(bias),
                base: 0,
                strides: vec![0, 1, 0],
                base_at_launch: false,
            }],
        },
    )?;
    l.extend(fill.map(|e| launch(e, vec![KArg::Value(out), KArg::Value(bias)])));
    plan.launches = l;
    Ok(plan)
}

fn im2col(
    b: &mut Builder,
    cx: &Ctx,
    g: &Geometry,
    x: ValueId,
    w: ValueId,
    stride: usize,
    pad: usize,
) -> Launch {
    let (xd, cd) = (cx.dtype(x), cx.dtype(w));
    let dtypes: BTreeSet<StorageDType> = [xd, cd].into();
    let total = g.n * g.pixels() * g.depth();
    let (it, u) = emit::index_type(total.max(cx.numel(x)) + 1);
    let what = format!(
        "{NAME}: im2col for a {kh} x {kw} convolution (stride {stride}, padding {pad}) of x {xd}[{n}, {ci}, {h}, {w}]:\n\
         col[n, p, (c, ky, kx)] = x[n, c, oy * {stride} + ky - {pad}, ox * {stride} + kx - {pad}] (0 outside), p = oy * {ow} + ox,\n\
         a {cd}[{n}, {p}, {d}] matrix; one thread per element, consecutive threads along a row",
        kh = g.kh,
        kw = g.kw,
        n = g.n,
        ci = g.ci,
        h = g.h,
        w = g.w,
        ow = g.ow,
        p = g.pixels(),
        d = g.depth(),
    );
    let mut s = emit::prelude(&what, &dtypes, Needs::default());
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}) {{\n\
         \x20 for ({it} e = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x; e < {total}{u}; e += ({it})gridDim.x * {THREADS}{u}) {{\n\
         \x20   const {it} k = e % {d}{u}, row = e / {d}{u};\n\
         \x20   const {it} p = row % {p}{u}, n = row / {p}{u};\n\
         \x20   const {it} kx = k % {kw}{u}, ky = (k / {kw}{u}) % {kh}{u}, c = k / {khw}{u};\n\
         \x20   const int iy = (int)((p / {ow}{u}) * {stride}{u} + ky) - {pad};\n\
         \x20   const int ix = (int)((p % {ow}{u}) * {stride}{u} + kx) - {pad};\n\
         \x20   float v = 0.0f;\n\
         \x20   if (iy >= 0 && iy < {h} && ix >= 0 && ix < {w})\n\
         \x20     v = ld(x[((n * {ci}{u} + c) * {h}{u} + ({it})iy) * {w}{u} + ({it})ix]);\n\
         \x20   st(col + e, v);\n\
         \x20 }}\n\
         }}",
        emit::ptr_param(cd, "col", true),
        emit::ptr_param(xd, "x", false),
        d = g.depth(),
        p = g.pixels(),
        kw = g.kw,
        kh = g.kh,
        khw = g.kh * g.kw,
        ow = g.ow,
        h = g.h,
        w = g.w,
        ci = g.ci,
    );
    let kernel = b.kernel("im2col", s);
    launch(
        Emitted {
            kernel,
            grid: [
                emit::blocks(total, THREADS as usize).min(MAX_BLOCKS as u32),
                1,
                1,
            ],
            block: [THREADS, 1, 1],
        },
        vec![KArg::Scratch, KArg::Value(x)],
    )
}
