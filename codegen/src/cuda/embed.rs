//! Embeddings and rotary position encoding: sinusoidal timestep embedding, 2-D sin-cos
//! position tables, RoPE cos/sin tables and RoPE itself (interleaved pairs). The formulas
//! and their f32/f64 split follow the CPU backend (runtime/src/cpu/kernels/embed.rs).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::elementwise::Emitted;
use super::emit::{self, Needs, NAME, THREADS};
use super::plan::{launch, Builder, Ctx, KArg, Launch};
use super::StorageDType;
use crate::program::ValueId;

/// The common head of a one-thread-per-output-element kernel: `e` is the element.
fn per_element_head(s: &mut String, params: &[String], units: usize, it: &str, u: &str) {
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}) {{\n\
         \x20 const {it} e = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (e >= {units}{u}) return;",
        params.join(", ")
    );
}

fn one_launch(kernel: usize, units: usize, args: Vec<KArg>) -> Vec<Launch> {
    vec![launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        args,
    )]
}

/// Sinusoidal timestep embedding (diffusers' `get_timestep_embedding`, max period 10000):
/// `freq_i = exp(-ln(10000) * i / (half - shift))`, `arg = scale * t * freq_i`, sin and cos
/// halves (cos first with `flip_sin_to_cos`), a zero column when `dim` is odd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn timestep_embedding(
    b: &mut Builder,
    cx: &Ctx,
    t: ValueId,
    out: ValueId,
    dim: usize,
    flip: bool,
    shift: f32,
    scale: f32,
) -> Result<Vec<Launch>, String> {
    let n = cx.numel(t);
    if cx.numel(out) != n * dim {
        return Err(format!(
            "{n} timesteps x {dim} is not the output's {} elements",
            cx.numel(out)
        ));
    }
    if n * dim == 0 {
        return Ok(vec![]);
    }
    let half = dim / 2;
    let (td, od) = (cx.dtype(t), cx.dtype(out));
    let (it, u) = emit::index_type(n * dim);
    let neg_log = (-(10000f64).ln()) as f32;
    let denom = (half as f64 - shift as f64) as f32;
    let (first, second) = if flip {
        ("cosf", "sinf")
    } else {
        ("sinf", "cosf")
    };
    let what = format!(
        "{NAME}: timestep embedding: {n} timesteps ({td}) -> [{n}, {dim}] ({od}), \
         freq_i = exp({neg_log:?} * i / {denom:?}),\narg = {scale:?} * t * freq_i, \
         [{first}(arg), {second}(arg)]{}",
        if dim % 2 == 1 { ", last column 0" } else { "" }
    );
    let mut s = emit::prelude(&what, &[td, od].into(), Needs::default());
    per_element_head(
        &mut s,
        &[
            emit::ptr_param(od, "out", true),
            emit::ptr_param(td, "t", false),
        ],
        n * dim,
        it,
        u,
    );
    // An odd `dim` leaves its last column 0.
    let (open, close) = if dim % 2 == 1 {
        (format!("  if (k < {}{u}) {{\n", 2 * half), "  }\n")
    } else {
        ("  {\n".to_string(), "  }\n")
    };
    let _ = write!(
        s,
        "  const {it} row = e / {dim}{u}, k = e % {dim}{u};\n  float y = 0.0f;\n{open}\
         \x20   const {it} i = k < {half}{u} ? k : k - {half}{u};\n\
         \x20   const float freq = expf(({} * float(i)) / {});\n\
         \x20   const float arg = {} * (ld(t[row]) * freq);\n\
         \x20   y = k < {half}{u} ? {first}(arg) : {second}(arg);\n\
         {close}\
         \x20 st(out + e, y);\n\
         }}\n",
        emit::c_float(neg_log),
        emit::c_float(denom),
        emit::c_float(scale),
    );
    let kernel = b.kernel("timestep_embedding", s);
    Ok(one_launch(
        kernel,
        n * dim,
        vec![KArg::Value(out), KArg::Value(t)],
    ))
}

/// The 2-D sin-cos position table `[grid_h * grid_w, dim]`: the first half of each row
/// encodes the column coordinate, the second the row coordinate, each as
/// `[sin(pos * w_j), cos(pos * w_j)]` with `w_j = 10000^(-j / (dim / 4))` (f64, as the CPU
/// backend; the table is computed once).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sincos_pos_embed(
    b: &mut Builder,
    cx: &Ctx,
    out: ValueId,
    dim: usize,
    gh: usize,
    gw: usize,
    base_size: f32,
    interp: f32,
) -> Result<Vec<Launch>, String> {
    let n = gh * gw * dim;
    if dim % 4 != 0 || cx.numel(out) != n {
        return Err(format!(
            "a {gh} x {gw} table of width {dim} (a multiple of 4) is not the output's {} elements",
            cx.numel(out)
        ));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    let od = cx.dtype(out);
    let half = dim / 2;
    let q = half / 2;
    let (it, u) = emit::index_type(n);
    // The grid step in f32, as the CPU: `(n / base_size) as f32`.
    let dh = (gh as f64 / base_size as f64) as f32;
    let dw = (gw as f64 / base_size as f64) as f32;
    let what = format!(
        "{NAME}: 2-D sin-cos position table [{gh} x {gw}, {dim}] ({od}), base size {base_size:?}, \
         interpolation scale {interp:?}"
    );
    let mut s = emit::prelude(&what, &[od].into(), Needs::default());
    per_element_head(&mut s, &[emit::ptr_param(od, "out", true)], n, it, u);
    let _ = writeln!(
        s,
        "  const {it} tok = e / {dim}{u}, k = e % {dim}{u};\n\
         \x20 const {it} kk = k % {half}{u}, j = kk % {q}{u};\n\
         \x20 // Column coordinate in the first half of the row, row coordinate in the second.\n\
         \x20 const float pos = k < {half}{u} ? float(tok % {gw}{u}) / {} / {} : float(tok / {gw}{u}) / {} / {};\n\
         \x20 const double w = 1.0 / pow(10000.0, double(j) / {});\n\
         \x20 const double a = double(pos) * w;\n\
         \x20 st(out + e, float(kk < {q}{u} ? sin(a) : cos(a)));\n\
         }}",
        emit::c_float(dw),
        emit::c_float(interp),
        emit::c_float(dh),
        emit::c_float(interp),
        emit::c_double(half as f64 / 2.0),
    );
    let kernel = b.kernel("sincos_pos_embed", s);
    Ok(one_launch(kernel, n, vec![KArg::Value(out)]))
}

/// RoPE tables `[seq, sum(axes_dims)]` from position ids `[seq, axes]`: for axis `a` of
/// width `d`, columns `2j` and `2j + 1` hold `cos` (or `sin`) of `id_a * theta^(-2j / d)`
/// (f64 angles, as the CPU backend).
pub(crate) fn rope_tables(
    b: &mut Builder,
    cx: &Ctx,
    ids: ValueId,
    theta: f64,
    axes: &[usize],
    out: ValueId,
    cos: bool,
) -> Result<Vec<Launch>, String> {
    let seq = cx.shape(ids).first().copied().unwrap_or(0);
    let width: usize = axes.iter().sum();
    if axes.iter().any(|d| d % 2 != 0)
        || cx.numel(ids) != seq * axes.len()
        || cx.numel(out) != seq * width
    {
        return Err(format!(
            "ids {:?}, axes {axes:?} (even widths) and a table of {} elements do not agree",
            cx.shape(ids),
            cx.numel(out)
        ));
    }
    let n = seq * width;
    if n == 0 {
        return Ok(vec![]);
    }
    let (id, od) = (cx.dtype(ids), cx.dtype(out));
    let (it, u) = emit::index_type(n);
    let f = if cos { "cos" } else { "sin" };
    let what = format!(
        "{NAME}: RoPE {f} table [{seq}, {width}] ({od}) from ids [{seq}, {}] ({id}), axes {axes:?}, theta {theta:?}",
        axes.len()
    );
    let mut s = emit::prelude(&what, &[id, od].into(), Needs::default());
    per_element_head(
        &mut s,
        &[
            emit::ptr_param(od, "out", true),
            emit::ptr_param(id, "ids", false),
        ],
        n,
        it,
        u,
    );
    let _ = writeln!(
        s,
        "  const {it} p = e / {width}{u}, k = e % {width}{u};\n  {it} axis = 0, at = 0, d = 1;"
    );
    let mut at = 0;
    let live: Vec<usize> = (0..axes.len()).filter(|&a| axes[a] > 0).collect();
    for (pos, &a) in live.iter().enumerate() {
        let head = match (pos == 0, pos + 1 == live.len()) {
            (true, true) => "  {".to_string(),
            (true, false) => format!("  if (k < {}{u}) {{", at + axes[a]),
            (false, false) => format!(" else if (k < {}{u}) {{", at + axes[a]),
            (false, true) => " else {".to_string(),
        };
        let _ = write!(
            s,
            "{head} axis = {a}{u}; at = {at}{u}; d = {}{u}; }}",
            axes[a]
        );
        at += axes[a];
    }
    let _ = writeln!(
        s,
        "\n  const double j2 = double((k - at) / 2{u} * 2{u});\n\
         \x20 const double freq = 1.0 / pow({}, j2 / double(d));\n\
         \x20 const double a = double(ld(ids[p * {}{u} + axis])) * freq;\n\
         \x20 st(out + e, float({f}(a)));\n\
         }}",
        emit::c_double(theta),
        axes.len(),
    );
    let kernel = b.kernel(if cos { "rope_cos" } else { "rope_sin" }, s);
    Ok(one_launch(
        kernel,
        n,
        vec![KArg::Value(out), KArg::Value(ids)],
    ))
}

/// RoPE on `x [batch, seq, heads, head_dim]` with tables `[seq, head_dim]`, interleaved
/// pairs: `(x0, x1) -> (x0 c0 - x1 s0, x1 c1 + x0 s1)`.
pub(crate) fn rope(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    cos: ValueId,
    sin: ValueId,
    out: ValueId,
) -> Result<Vec<Launch>, String> {
    let xs = cx.shape(x);
    if xs.len() != 4 || xs[3] % 2 != 0 {
        return Err(format!(
            "RoPE needs x as [batch, seq, heads, even head_dim], not {xs:?}"
        ));
    }
    let (seq, heads, hd) = (xs[1], xs[2], xs[3]);
    let n = cx.numel(x);
    if cx.numel(out) != n || cx.numel(cos) != seq * hd || cx.numel(sin) != seq * hd {
        return Err(format!(
            "RoPE of {xs:?} needs [{seq}, {hd}] tables and an output of {n} elements"
        ));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    let (xd, cd, sd, od) = (cx.dtype(x), cx.dtype(cos), cx.dtype(sin), cx.dtype(out));
    let dtypes: BTreeSet<StorageDType> = [xd, cd, sd, od].into();
    let vw = emit::vec_width(dtypes.iter().copied());
    let v = if hd % vw == 0 { vw } else { 2 };
    let (it, u) = emit::index_type(n + v);
    let what = format!(
        "{NAME}: RoPE, interleaved pairs, x {xd}{xs:?}, cos {cd} / sin {sd} [{seq}, {hd}], out {od};\n\
         one thread per {v} consecutive elements of a head"
    );
    let mut s = emit::prelude(
        &what,
        &dtypes,
        Needs {
            vectors: v > 1,
            ..Needs::default()
        },
    );
    let units = n / v;
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}, {}, {}) {{\n\
         \x20 const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (t >= {units}{u}) return;\n\
         \x20 const {it} e = t * {v}{u}, d = e % {hd}{u}, s = e / {} % {seq}{u};\n\
         \x20 float xv[{v}], c[{v}], sn[{v}], y[{v}];\n\
         \x20 {}\n  {}\n  {}\n\
         #pragma unroll\n\
         \x20 for (int j = 0; j < {v}; j += 2) {{\n\
         \x20   y[j] = xv[j] * c[j] - xv[j + 1] * sn[j];\n\
         \x20   y[j + 1] = xv[j + 1] * c[j + 1] + xv[j] * sn[j + 1];\n\
         \x20 }}\n\
         \x20 {}\n\
         }}",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "x", false),
        emit::ptr_param(cd, "cos_t", false),
        emit::ptr_param(sd, "sin_t", false),
        format_args!("{}{u}", heads * hd),
        emit::load("xv", "x + e", xd, v),
        emit::load("c", &format!("cos_t + s * {hd}{u} + d"), cd, v),
        emit::load("sn", &format!("sin_t + s * {hd}{u} + d"), sd, v),
        emit::store("out + e", "y", od, v),
    );
    let kernel = b.kernel("rope", s);
    Ok(vec![launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        vec![
            KArg::Value(out),
            KArg::Value(x),
            KArg::Value(cos),
            KArg::Value(sin),
        ],
    )])
}
