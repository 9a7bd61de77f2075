//! Row reductions: layer norm, RMS norm, softmax (one row per block, or per aligned group of
//! lanes for short rows) and group norm (the same row kernel, or a split two-kernel form
//! for the long, few rows of a VAE).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::elementwise::Emitted;
use super::emit::{self, Needs, NAME};
use super::plan::{launch, Builder, Ctx, KArg, Launch, StepPlan};
use super::StorageDType;
use crate::program::ValueId;

#[derive(Clone, Copy, Debug)]
pub(crate) enum RowOp {
    LayerNorm(f32),
    RmsNorm(f32),
    Softmax,
}

impl RowOp {
    fn name(self) -> &'static str {
        match self {
            RowOp::LayerNorm(_) => "layer_norm",
            RowOp::RmsNorm(_) => "rms_norm",
            RowOp::Softmax => "softmax",
        }
    }
}

/// Most threads one row gets; longer rows give each thread several vectors.
const MAX_ROW_THREADS: usize = 512;
/// Most f32 values a thread keeps of its row; longer rows are streamed from memory (three
/// passes, the later ones mostly from L2) instead of spilling registers.
const MAX_CACHED_PER_THREAD: usize = 64;
/// Group norm rows longer than this are split across blocks (VAE rows at 1024 px are
/// 16 channels x 128 x 128 = 262144 elements, in only 32 rows per image).
const GROUP_NORM_ROW_MAX: usize = 8192;
/// Elements per block of the split group norm, and its threads.
const GN_CHUNK: usize = 4096;
const GN_THREADS: usize = 256;

/// How a row kernel divides a row among threads.
#[derive(Clone, Copy, Debug)]
struct RowShape {
    /// Elements per vector (1 when the row length does not divide into 16-byte vectors).
    v: usize,
    /// Vectors per row.
    vecs: usize,
    /// Threads per row: a power of two <= 32 (a lane group), or a multiple of 32 (the block).
    tpr: usize,
    /// Rows per block (256 / tpr for lane groups, else 1).
    rpb: usize,
    /// Vectors each thread keeps in registers (0: streamed).
    items: usize,
}

impl RowShape {
    fn new(cols: usize, dtypes: &BTreeSet<StorageDType>) -> RowShape {
        let vw = emit::vec_width(dtypes.iter().copied());
        let v = if cols % vw == 0 { vw } else { 1 };
        let vecs = cols / v;
        if vecs <= 32 {
            let tpr = vecs.next_power_of_two();
            return RowShape {
                v,
                vecs,
                tpr,
                rpb: 256 / tpr,
                items: 1,
            };
        }
        let items = vecs.div_ceil(MAX_ROW_THREADS);
        if items * v > MAX_CACHED_PER_THREAD {
            return RowShape {
                v,
                vecs,
                tpr: MAX_ROW_THREADS,
                rpb: 1,
                items: 0,
            };
        }
        let tpr = vecs.div_ceil(items).next_multiple_of(32);
        RowShape {
            v,
            vecs,
            tpr,
            rpb: 1,
            items,
        }
    }
    fn block(&self) -> usize {
        self.tpr * self.rpb
    }
    /// Rows handled by aligned lane groups (shuffles only), not whole blocks.
    fn lane_group(&self) -> bool {
        self.tpr <= 32
    }
}

/// Launches of a row kernel for `op` over `rows` x `cols` (`x` and `out` contiguous).
#[allow(clippy::too_many_arguments)]
pub(crate) fn row(
    b: &mut Builder,
    cx: &Ctx,
    op: RowOp,
    x: ValueId,
    out: ValueId,
    rows: usize,
    cols: usize,
) -> Result<Vec<Launch>, String> {
    check_sizes(cx, x, out, rows * cols)?;
    let Some(e) = row_kernel(b, op.name(), op, rows, cols, cx.dtype(x), cx.dtype(out))? else {
        return Ok(vec![]);
    };
    Ok(vec![launch(e, vec![KArg::Value(out), KArg::Value(x)])])
}

fn check_sizes(cx: &Ctx, x: ValueId, out: ValueId, n: usize) -> Result<(), String> {
    if cx.numel(x) != n || cx.numel(out) != n {
        return Err(format!(
            "rows x cols = {n} but the input has {} elements and the output {}",
            cx.numel(x),
            cx.numel(out)
        ));
    }
    Ok(())
}

fn row_kernel(
    b: &mut Builder,
    name: &str,
    op: RowOp,
    rows: usize,
    cols: usize,
    xd: StorageDType,
    od: StorageDType,
) -> Result<Option<Emitted>, String> {
    if rows == 0 || cols == 0 {
        return Ok(None);
    }
    let dtypes: BTreeSet<StorageDType> = [xd, od].into();
    let rs = RowShape::new(cols, &dtypes);
    let block = rs.block();
    let (it, u) = emit::index_type(rows * cols);
    let v = rs.v;
    let what = match op {
        RowOp::LayerNorm(eps) => format!(
            "{NAME}: layer norm over rows of {cols}: out = (x - mean) / sqrt(var + {eps:?}), \
             biased variance, f32 statistics (two passes over registers)"
        ),
        RowOp::RmsNorm(eps) => format!(
            "{NAME}: RMS norm over rows of {cols}: out = x / sqrt(mean(x^2) + {eps:?}), f32 sums"
        ),
        RowOp::Softmax => format!("{NAME}: softmax over rows of {cols}: exp(x - max) / sum, f32"),
    };
    let layout = if rs.items == 0 {
        format!(
            "{rows} rows, one block of {} threads per row, streamed from memory",
            rs.tpr
        )
    } else if rs.lane_group() {
        format!(
            "{rows} rows, {} lanes per row ({} rows per block of {block}), {}-element vectors",
            rs.tpr, rs.rpb, v
        )
    } else {
        format!(
            "{rows} rows, one block of {} threads per row, {} x {v}-element vectors per thread in registers",
            rs.tpr, rs.items
        )
    };
    let what = format!("{what}\n{layout}; x: {xd}, out: {od}");
    let needs = Needs {
        vectors: v > 1,
        warp_reduce: true,
        block_reduce: !rs.lane_group(),
        activations: false,
    };
    let mut s = emit::prelude(&what, &dtypes, needs);
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({block}) {NAME}({}, {}) {{",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "x", false)
    );
    let (sum, max) = if rs.lane_group() {
        (
            format!("group_sum<{}>", rs.tpr),
            format!("group_max<{}>", rs.tpr),
        )
    } else {
        let _ = writeln!(s, "  __shared__ float red[32];");
        (format!("block_sum<{block}>"), format!("block_max<{block}>"))
    };
    let reduce = |f: &str, e: &str| {
        if rs.lane_group() {
            format!("{f}({e})")
        } else {
            format!("{f}({e}, red)")
        }
    };
    let live_guard = rs.lane_group() && rows % rs.rpb != 0;
    if rs.lane_group() {
        let _ = writeln!(
            s,
            "  const {it} lane = threadIdx.x % {tpr}{u};\n  const {it} row = ({it})blockIdx.x * {rpb}{u} + threadIdx.x / {tpr}{u};",
            tpr = rs.tpr,
            rpb = rs.rpb
        );
        if live_guard {
            // Rows past the end still take part in the shuffles (all 32 lanes must), with
            // padding values, and store nothing.
            let _ = writeln!(s, "  const bool live = row < {rows}{u};");
        }
    } else {
        let _ = writeln!(
            s,
            "  const {it} lane = threadIdx.x;\n  const {it} row = blockIdx.x;"
        );
    }
    let _ = writeln!(
        s,
        "  const {}* xr = x + ({row_off});\n  {}* yr = out + ({row_off});",
        xd.c_type(),
        od.c_type(),
        row_off = if live_guard {
            format!("live ? row * {cols}{u} : 0{u}")
        } else {
            format!("row * {cols}{u}")
        }
    );
    let pad = match op {
        RowOp::Softmax => "__int_as_float(0xff800000)",
        _ => "0.0f",
    };
    let cols_f = emit::c_float(cols as f32);
    if rs.items == 0 {
        // Streamed: each pass walks the row again.
        let tpr = rs.tpr;
        let walk = |body: &str| {
            format!(
                "  for ({it} c = lane; c < {vecs}{u}; c += {tpr}{u}) {{\n    float t[{v}];\n    {}\n{body}  }}\n",
                emit::load("t", &format!("xr + c * {v}{u}"), xd, v),
                vecs = rs.vecs
            )
        };
        let store = emit::store(&format!("yr + c * {v}{u}"), "y", od, v);
        match op {
            RowOp::LayerNorm(eps) => {
                s.push_str("  float s = 0.0f;\n");
                s.push_str(&walk(&format!(
                    "    for (int j = 0; j < {v}; ++j) s += t[j];\n"
                )));
                let _ = writeln!(
                    s,
                    "  const float mean = {} / {cols_f};\n  float q = 0.0f;",
                    reduce(&sum, "s")
                );
                s.push_str(&walk(&format!(
                    "    for (int j = 0; j < {v}; ++j) {{ const float d = t[j] - mean; q += d * d; }}\n"
                )));
                let _ = writeln!(
                    s,
                    "  const float rstd = rsqrtf({} / {cols_f} + {});",
                    reduce(&sum, "q"),
                    emit::c_float(eps)
                );
                s.push_str(&walk(&format!(
                    "    float y[{v}];\n    for (int j = 0; j < {v}; ++j) y[j] = (t[j] - mean) * rstd;\n    {store}\n"
                )));
            }
            RowOp::RmsNorm(eps) => {
                s.push_str("  float q = 0.0f;\n");
                s.push_str(&walk(&format!(
                    "    for (int j = 0; j < {v}; ++j) q += t[j] * t[j];\n"
                )));
                let _ = writeln!(
                    s,
                    "  const float rstd = rsqrtf({} / {cols_f} + {});",
                    reduce(&sum, "q"),
                    emit::c_float(eps)
                );
                s.push_str(&walk(&format!(
                    "    float y[{v}];\n    for (int j = 0; j < {v}; ++j) y[j] = t[j] * rstd;\n    {store}\n"
                )));
            }
            RowOp::Softmax => {
                let _ = writeln!(s, "  float m = {pad};");
                s.push_str(&walk(&format!(
                    "    for (int j = 0; j < {v}; ++j) m = fmaxf(m, t[j]);\n"
                )));
                let _ = writeln!(s, "  m = {};\n  float z = 0.0f;", reduce(&max, "m"));
                s.push_str(&walk(&format!(
                    "    for (int j = 0; j < {v}; ++j) z += expf(t[j] - m);\n"
                )));
                let _ = writeln!(s, "  const float inv = 1.0f / {};", reduce(&sum, "z"));
                s.push_str(&walk(&format!(
                    "    float y[{v}];\n    for (int j = 0; j < {v}; ++j) y[j] = expf(t[j] - m) * inv;\n    {store}\n"
                )));
            }
        }
        s.push_str("}\n");
    } else {
        let items = rs.items;
        let tail = items * rs.tpr != rs.vecs;
        let guard = match (live_guard, tail) {
            (false, false) => None,
            (true, false) => Some("live".to_string()),
            (false, true) => Some(format!("c < {}{u}", rs.vecs)),
            (true, true) => Some(format!("live && c < {}{u}", rs.vecs)),
        };
        let vec_index = if items > 1 {
            format!("const {it} c = i * {}{u} + lane;", rs.tpr)
        } else {
            format!("const {it} c = lane;")
        };
        let _ = writeln!(
            s,
            "  float v[{items}][{v}];\n#pragma unroll\n  for (int i = 0; i < {items}; ++i) {{\n    {vec_index}"
        );
        let ld = emit::load("v[i]", &format!("xr + c * {v}{u}"), xd, v);
        match &guard {
            None => {
                let _ = writeln!(s, "    {ld}\n  }}");
            }
            Some(g) => {
                let _ = writeln!(
                    s,
                    "    if ({g}) {{\n      {ld}\n    }} else {{\n      for (int j = 0; j < {v}; ++j) v[i][j] = {pad};\n    }}\n  }}"
                );
            }
        }
        let each = |body: &str| {
            format!("#pragma unroll\n  for (int i = 0; i < {items}; ++i) {{\n#pragma unroll\n    for (int j = 0; j < {v}; ++j) {body}\n  }}\n")
        };
        let write = |expr: &str| {
            let st = emit::store(&format!("yr + c * {v}{u}"), "y", od, v);
            let inner = format!(
                "float y[{v}];\n#pragma unroll\n      for (int j = 0; j < {v}; ++j) y[j] = {expr};\n      {st}"
            );
            match &guard {
                None => format!("#pragma unroll\n  for (int i = 0; i < {items}; ++i) {{\n    {vec_index}\n    {{\n      {inner}\n    }}\n  }}\n"),
                Some(g) => format!("#pragma unroll\n  for (int i = 0; i < {items}; ++i) {{\n    {vec_index}\n    if ({g}) {{\n      {inner}\n    }}\n  }}\n"),
            }
        };
        match op {
            RowOp::LayerNorm(eps) => {
                s.push_str("  float s = 0.0f;\n");
                s.push_str(&each("s += v[i][j];"));
                let _ = writeln!(s, "  const float mean = {} / {cols_f};", reduce(&sum, "s"));
                s.push_str("  float q = 0.0f;\n");
                if tail {
                    // Padding vectors hold 0, which is not the mean: leave them out.
                    let _ = writeln!(
                        s,
                        "#pragma unroll\n  for (int i = 0; i < {items}; ++i) {{\n    {vec_index}\n    if (c < {}{u}) {{\n#pragma unroll\n      for (int j = 0; j < {v}; ++j) {{ const float d = v[i][j] - mean; q += d * d; }}\n    }}\n  }}",
                        rs.vecs
                    );
                } else {
                    s.push_str(&each("{ const float d = v[i][j] - mean; q += d * d; }"));
                }
                let _ = writeln!(
                    s,
                    "  const float rstd = rsqrtf({} / {cols_f} + {});",
                    reduce(&sum, "q"),
                    emit::c_float(eps)
                );
                s.push_str(&write("(v[i][j] - mean) * rstd"));
            }
            RowOp::RmsNorm(eps) => {
                s.push_str("  float q = 0.0f;\n");
                s.push_str(&each("q += v[i][j] * v[i][j];"));
                let _ = writeln!(
                    s,
                    "  const float rstd = rsqrtf({} / {cols_f} + {});",
                    reduce(&sum, "q"),
                    emit::c_float(eps)
                );
                s.push_str(&write("v[i][j] * rstd"));
            }
            RowOp::Softmax => {
                let _ = writeln!(s, "  float m = {pad};");
                s.push_str(&each("m = fmaxf(m, v[i][j]);"));
                let _ = writeln!(s, "  m = {};\n  float z = 0.0f;", reduce(&max, "m"));
                s.push_str(&each("{ v[i][j] = expf(v[i][j] - m); z += v[i][j]; }"));
                let _ = writeln!(s, "  const float inv = 1.0f / {};", reduce(&sum, "z"));
                s.push_str(&write("v[i][j] * inv"));
            }
        }
        s.push_str("}\n");
    }
    let kernel = b.kernel(name, s);
    Ok(Some(Emitted {
        kernel,
        grid: [emit::blocks(rows, rs.rpb), 1, 1],
        block: [block as u32, 1, 1],
    }))
}

/// Group norm over `[n, c, hw]`: the channels of a group and their pixels are one contiguous
/// row of `c / groups * hw` elements, normalized like a layer norm.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    out: ValueId,
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f32,
) -> Result<StepPlan, String> {
    if groups == 0 || c % groups != 0 {
        return Err(format!("{c} channels do not split into {groups} groups"));
    }
    let (rows, cols) = (n * groups, c / groups * hw);
    check_sizes(cx, x, out, rows * cols)?;
    let (xd, od) = (cx.dtype(x), cx.dtype(out));
    let args = vec![KArg::Value(out), KArg::Value(x)];
    if cols <= GROUP_NORM_ROW_MAX {
        let e = row_kernel(b, "group_norm", RowOp::LayerNorm(eps), rows, cols, xd, od)?;
        return Ok(StepPlan {
            launches: e.map(|e| launch(e, args)).into_iter().collect(),
            ..StepPlan::default()
        });
    }
    // Split: per (row, chunk) mean and M2 into scratch, then every chunk merges its row's
    // statistics (Chan et al.) and normalizes.
    let chunks = cols.div_ceil(GN_CHUNK);
    let last = cols - (chunks - 1) * GN_CHUNK;
    let dtypes: BTreeSet<StorageDType> = [xd, od].into();
    let vw = emit::vec_width(dtypes.iter().copied());
    let v = if cols % vw == 0 { vw } else { 1 };
    let items = GN_CHUNK / (GN_THREADS * v);
    let (it, u) = emit::index_type(rows * cols);
    let t = GN_THREADS;
    let needs = Needs {
        vectors: v > 1,
        warp_reduce: true,
        block_reduce: true,
        activations: false,
    };
    let chunk_setup = format!(
        "  const {it} chunk = blockIdx.x, row = blockIdx.y;\n\
         \x20 const {it} n = chunk + 1{u} < {chunks}{u} ? {GN_CHUNK}{u} : {last}{u};  // elements in this chunk\n\
         \x20 const {it} start = row * {cols}{u} + chunk * {GN_CHUNK}{u};\n"
    );
    let elem = format!("const {it} c = (i * {t}{u} + threadIdx.x) * {v}{u};");

    let what = format!(
        "{NAME}: group norm statistics, pass 1 of 2: {rows} rows of {cols} in chunks of {GN_CHUNK};\n\
         stats[row][chunk] = (mean, sum of squared deviations) of the chunk, f32; x: {xd}"
    );
    let mut s = emit::prelude(&what, &[xd].into(), needs);
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({t}) {NAME}(float* __restrict__ stats, {}) {{\n  __shared__ float red[32];\n{chunk_setup}\
         \x20 float v[{items}][{v}];\n\
         #pragma unroll\n\
         \x20 for (int i = 0; i < {items}; ++i) {{\n\
         \x20   {elem}\n\
         \x20   if (c < n) {{\n      {}\n    }} else {{\n      for (int j = 0; j < {v}; ++j) v[i][j] = 0.0f;\n    }}\n\
         \x20 }}\n\
         \x20 float s = 0.0f;\n\
         #pragma unroll\n\
         \x20 for (int i = 0; i < {items}; ++i)\n\
         #pragma unroll\n\
         \x20   for (int j = 0; j < {v}; ++j) s += v[i][j];\n\
         \x20 const float mean = block_sum<{t}>(s, red) / float(n);\n\
         \x20 float q = 0.0f;\n\
         #pragma unroll\n\
         \x20 for (int i = 0; i < {items}; ++i) {{\n\
         \x20   {elem}\n\
         \x20   if (c < n) {{\n\
         #pragma unroll\n\
         \x20     for (int j = 0; j < {v}; ++j) {{ const float d = v[i][j] - mean; q += d * d; }}\n\
         \x20   }}\n\
         \x20 }}\n\
         \x20 const float m2 = block_sum<{t}>(q, red);\n\
         \x20 if (threadIdx.x == 0) {{\n\
         \x20   stats[2{u} * (row * {chunks}{u} + chunk)] = mean;\n\
         \x20   stats[2{u} * (row * {chunks}{u} + chunk) + 1{u}] = m2;\n\
         \x20 }}\n\
         }}",
        emit::ptr_param(xd, "x", false),
        emit::load("v[i]", "x + start + c", xd, v),
    );
    let stats = b.kernel("group_norm_stats", s);

    let what = format!(
        "{NAME}: group norm, pass 2 of 2: merge the row's chunk statistics, then\n\
         out = (x - mean) / sqrt(var + {eps:?}) over {rows} rows of {cols}; x: {xd}, out: {od}"
    );
    let mut s = emit::prelude(
        &what,
        &dtypes,
        Needs {
            vectors: v > 1,
            ..Needs::default()
        },
    );
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({t}) {NAME}({}, {}, const float* __restrict__ stats) {{\n{chunk_setup}\
         \x20 // Every thread merges the same statistics in the same order, so all agree.\n\
         \x20 const float* st = stats + 2{u} * row * {chunks}{u};\n\
         \x20 float count = 0.0f, mean = 0.0f, m2 = 0.0f;\n\
         \x20 for (unsigned int k = 0; k < {chunks}u; ++k) {{\n\
         \x20   const float nb = k + 1u < {chunks}u ? {} : {};\n\
         \x20   const float d = st[2 * k] - mean, total = count + nb;\n\
         \x20   mean += d * (nb / total);\n\
         \x20   m2 += st[2 * k + 1] + d * d * (count * nb / total);\n\
         \x20   count = total;\n\
         \x20 }}\n\
         \x20 const float rstd = rsqrtf(m2 / {} + {});\n\
         #pragma unroll\n\
         \x20 for (int i = 0; i < {items}; ++i) {{\n\
         \x20   {elem}\n\
         \x20   if (c < n) {{\n\
         \x20     float t[{v}], y[{v}];\n\
         \x20     {}\n\
         #pragma unroll\n\
         \x20     for (int j = 0; j < {v}; ++j) y[j] = (t[j] - mean) * rstd;\n\
         \x20     {}\n\
         \x20   }}\n\
         \x20 }}\n\
         }}",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "x", false),
        emit::c_float(GN_CHUNK as f32),
        emit::c_float(last as f32),
        emit::c_float(cols as f32),
        emit::c_float(eps),
        emit::load("t", "x + start + c", xd, v),
        emit::store("out + start + c", "y", od, v),
    );
    let apply = b.kernel("group_norm", s);
    let grid = [chunks as u32, rows as u32, 1];
    let block = [t as u32, 1, 1];
    if rows > 65535 {
        return Err(format!("{rows} rows exceed the grid's y limit"));
    }
    Ok(StepPlan {
        launches: vec![
            Launch {
                kernel: stats,
                grid,
                block,
                shared_bytes: 0,
                args: vec![KArg::Scratch, KArg::Value(x)],
            },
            Launch {
                kernel: apply,
                grid,
                block,
                shared_bytes: 0,
                args: vec![KArg::Value(out), KArg::Value(x), KArg::Scratch],
            },
        ],
        library: None,
        scratch_bytes: rows * chunks * 2 * 4,
        seq_attention: None,
    })
}
