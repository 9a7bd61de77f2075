//! Data movement: permute (strided copy, or a tiled transpose when the contiguous axis moves),
//! concat, slice, nearest upsampling, embedding lookup, and the local halves of the
//! parallel steps (a rank's rows for `shard`, dropping the padding after `all_gather`).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::elementwise::{self, contiguous_strides, Elementwise, Emitted, Operand};
use super::emit::{self, Needs, NAME, THREADS};
use super::plan::{launch, Builder, Ctx, KArg, Launch, LibraryOp, StepPlan};
use super::StorageDType;
use crate::program::{KInstr, MeshAxis, Segment, ValueId};

/// Copies `x` (read through `op`) into `out` of shape `out_shape`.
fn strided_copy(
    b: &mut Builder,
    name: &str,
    what: String,
    out_shape: &[usize],
    out_dtype: StorageDType,
    op: Operand,
) -> Result<Option<Emitted>, String> {
    elementwise::emit(
        b,
        &Elementwise {
            name,
            what,
            body: &[KInstr::Arg(0)],
            out_shape,
            out_dtype,
            args: vec![op],
        },
    )
}

fn copy_launch(e: Option<Emitted>, out: ValueId, x: ValueId) -> Vec<Launch> {
    e.map(|e| launch(e, vec![KArg::Value(out), KArg::Value(x)]))
        .into_iter()
        .collect()
}

pub(crate) fn permute(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    out: ValueId,
    perm: &[usize],
) -> Result<Vec<Launch>, String> {
    let xs = cx.shape(x);
    let os = cx.shape(out);
    let mut seen = vec![false; xs.len()];
    if perm.len() != xs.len()
        || !perm
            .iter()
            .all(|&p| p < xs.len() && !std::mem::replace(&mut seen[p], true))
    {
        return Err(format!(
            "{perm:?} is not a permutation of the axes of {xs:?}"
        ));
    }
    if perm.iter().map(|&p| xs[p]).ne(os.iter().copied()) {
        return Err(format!("permuting {xs:?} by {perm:?} does not give {os:?}"));
    }
    let x_strides = contiguous_strides(xs);
    let strides: Vec<usize> = perm.iter().map(|&p| x_strides[p]).collect();
    let (sizes, st) = coalesce_pair(os, &strides);
    let what = format!("permute {xs:?} -> {os:?} (axes {perm:?})");
    let (xd, od) = (cx.dtype(x), cx.dtype(out));
    let inner_contiguous = *st[1].last().unwrap_or(&1) == 1;
    if !inner_contiguous {
        if let Some(e) = transpose(b, &what, &sizes, &st[1], xd, od)? {
            return Ok(vec![launch(e, vec![KArg::Value(out), KArg::Value(x)])]);
        }
    }
    // The innermost axis stays innermost: row copies, vectorized when rows allow.
    let e = strided_copy(
        b,
        "permute",
        what,
        os,
        od,
        Operand {
            dtype: xd,
            base: 0,
            strides,
            base_at_launch: false,
        },
    )?;
    Ok(copy_launch(e, out, x))
}

/// Coalesced output dims and (out, x) strides over them.
fn coalesce_pair(out_shape: &[usize], x_strides: &[usize]) -> (Vec<usize>, Vec<Vec<usize>>) {
    elementwise::coalesce(
        out_shape,
        &[contiguous_strides(out_shape), x_strides.to_vec()],
    )
}

/// Tiled transpose for permutes that move x's contiguous axis: `sizes` are the coalesced
/// output dims, `xs` x's strides over them. `None` when the grid limits do not fit (the
/// caller falls back to the strided copy).
fn transpose(
    b: &mut Builder,
    what: &str,
    sizes: &[usize],
    xs: &[usize],
    xd: StorageDType,
    od: StorageDType,
) -> Result<Option<Emitted>, String> {
    let r = sizes.len();
    let a = r - 1;
    let Some(bx) = xs.iter().position(|&s| s == 1) else {
        return Ok(None);
    };
    let n: usize = sizes.iter().product();
    let out_strides = contiguous_strides(sizes);
    let (na, nb) = (sizes[a], sizes[bx]);
    let batch: Vec<usize> = (0..r).filter(|&d| d != a && d != bx).collect();
    let z: usize = batch.iter().map(|&d| sizes[d]).product();
    let (gx, gy) = (na.div_ceil(32), nb.div_ceil(32));
    if gy > 65535 || gx > u32::MAX as usize {
        return Ok(None);
    }
    let (it, u) = emit::index_type(n + 64);
    let dtypes: BTreeSet<StorageDType> = [xd, od].into();
    let what = format!(
        "{NAME}: {what}\ntiled transpose through shared memory (32 x 32 tiles, padded against bank\n\
         conflicts): reads walk x's contiguous axis, writes walk out's; out dims {sizes:?}, x strides {xs:?}"
    );
    let mut s = emit::prelude(&what, &dtypes, Needs::default());
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__(256) {NAME}({}, {}) {{\n\
         \x20 __shared__ float tile[32][33];\n\
         \x20 const {it} a0 = ({it})blockIdx.x * 32{u}, b0 = ({it})blockIdx.y * 32{u};\n\
         \x20 for ({it} z = blockIdx.z; z < {z}{u}; z += gridDim.z) {{",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "x", false)
    );
    // Offsets of batch index z in x and out.
    let mut zi = Vec::new();
    let mut zo = Vec::new();
    for (j, &d) in batch.iter().enumerate() {
        let later: usize = batch[j + 1..].iter().map(|&e| sizes[e]).product();
        let mut idx = "z".to_string();
        if later != 1 {
            idx = format!("{idx} / {later}{u}");
        }
        if j > 0 {
            idx = format!("{idx} % {}{u}", sizes[d]);
        }
        let _ = writeln!(s, "    const {it} z{j} = {idx};");
        zi.push(format!("z{j} * {}{u}", xs[d]));
        zo.push(format!("z{j} * {}{u}", out_strides[d]));
    }
    let join = |v: &[String]| {
        if v.is_empty() {
            format!("0{u}")
        } else {
            v.join(" + ")
        }
    };
    let _ = writeln!(
        s,
        "    const {it} xz = {}, oz = {};\n\
         \x20   // Read: consecutive threads take consecutive elements of x (its axis b).\n\
         #pragma unroll\n\
         \x20   for (int k = 0; k < 32; k += 8) {{\n\
         \x20     const {it} a = a0 + threadIdx.y + k, b = b0 + threadIdx.x;\n\
         \x20     if (a < {na}{u} && b < {nb}{u}) tile[threadIdx.y + k][threadIdx.x] = ld(x[xz + a * {sa}{u} + b]);\n\
         \x20   }}\n\
         \x20   __syncthreads();\n\
         \x20   // Write: consecutive threads take consecutive elements of out (its axis a).\n\
         #pragma unroll\n\
         \x20   for (int k = 0; k < 32; k += 8) {{\n\
         \x20     const {it} b = b0 + threadIdx.y + k, a = a0 + threadIdx.x;\n\
         \x20     if (a < {na}{u} && b < {nb}{u}) st(out + oz + b * {ob}{u} + a, tile[threadIdx.x][threadIdx.y + k]);\n\
         \x20   }}\n\
         \x20   __syncthreads();\n\
         \x20 }}\n\
         }}",
        join(&zi),
        join(&zo),
        sa = xs[a],
        ob = out_strides[bx],
    );
    let kernel = b.kernel("permute", s);
    Ok(Some(Emitted {
        kernel,
        grid: [gx as u32, gy as u32, z.min(65535) as u32],
        block: [32, 8, 1],
    }))
}

pub(crate) fn slice(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    axis: usize,
    start: usize,
    end: usize,
    out: ValueId,
) -> Result<Vec<Launch>, String> {
    let xs = cx.shape(x);
    let os = cx.shape(out);
    let ok = axis < xs.len()
        && start <= end
        && end <= xs[axis]
        && os.len() == xs.len()
        && (0..xs.len()).all(|d| os[d] == if d == axis { end - start } else { xs[d] });
    if !ok {
        return Err(format!(
            "slice [{start}, {end}) of axis {axis} of {xs:?} is not {os:?}"
        ));
    }
    let strides = contiguous_strides(xs);
    let e = strided_copy(
        b,
        "slice",
        format!("slice of {os:?} from axis {axis} of {xs:?} (the launch passes x advanced to the first element)"),
        os,
        cx.dtype(out),
        Operand {
            dtype: cx.dtype(x),
            base: start * strides[axis],
            strides: strides.clone(),
            base_at_launch: true,
        },
    )?;
    let at = KArg::ValueAt {
        value: x,
        offset: start * strides[axis],
    };
    Ok(e.map(|e| launch(e, vec![KArg::Value(out), at]))
        .into_iter()
        .collect())
}

/// Nearest upsampling of `[n, c, h, w]` by `f`: the output seen as `[n*c, h, f, w, f]` reads
/// x with strides `[h*w, w, 0, 1, 0]`, a strided copy.
pub(crate) fn upsample_nearest(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    out: ValueId,
    f: usize,
) -> Result<Vec<Launch>, String> {
    let xs = cx.shape(x);
    let os = cx.shape(out);
    if xs.len() != 4 || f == 0 || os != [xs[0], xs[1], xs[2] * f, xs[3] * f] {
        return Err(format!("nearest upsampling of {xs:?} by {f} is not {os:?}"));
    }
    let (h, w) = (xs[2], xs[3]);
    let view = [xs[0] * xs[1], h, f, w, f];
    let e = strided_copy(
        b,
        "upsample_nearest",
        format!("nearest upsampling of {xs:?} by {f}"),
        &view,
        cx.dtype(out),
        Operand {
            dtype: cx.dtype(x),
            base: 0,
            strides: vec![h * w, w, 0, 1, 0],
            base_at_launch: false,
        },
    )?;
    Ok(copy_launch(e, out, x))
}

pub(crate) fn concat(
    b: &mut Builder,
    cx: &Ctx,
    inputs: &[ValueId],
    axis: usize,
    out: ValueId,
) -> Result<Vec<Launch>, String> {
    let os = cx.shape(out);
    if axis >= os.len() || inputs.is_empty() {
        return Err(format!(
            "cannot concatenate {} inputs along axis {axis} of {os:?}",
            inputs.len()
        ));
    }
    let mut total = 0;
    for &v in inputs {
        let s = cx.shape(v);
        if s.len() != os.len() || (0..s.len()).any(|d| d != axis && s[d] != os[d]) {
            return Err(format!(
                "input of shape {s:?} does not concatenate into {os:?}"
            ));
        }
        total += s[axis];
    }
    if total != os[axis] {
        return Err(format!(
            "inputs add up to {total} along axis {axis}, the output has {}",
            os[axis]
        ));
    }
    let n: usize = os.iter().product();
    if n == 0 {
        return Ok(vec![]);
    }
    let inner: usize = os[axis + 1..].iter().product();
    let row: Vec<usize> = inputs.iter().map(|&v| cx.shape(v)[axis] * inner).collect();
    let l: usize = row.iter().sum();
    let od = cx.dtype(out);
    let mut dtypes: BTreeSet<StorageDType> = inputs.iter().map(|&v| cx.dtype(v)).collect();
    dtypes.insert(od);
    let vw = emit::vec_width(dtypes.iter().copied());
    let v = if row.iter().all(|r| r % vw == 0) {
        vw
    } else {
        1
    };
    let (it, u) = emit::index_type(n + v);
    let mut what = format!("{NAME}: along axis {axis} into {os:?}:");
    for &x in inputs {
        let _ = write!(what, " {}{:?}", cx.dtype(x), cx.shape(x));
    }
    let _ = write!(what, "\nout viewed as [outer, {l}]; input j fills its columns of each row; {v} elements per thread");
    let mut s = emit::prelude(
        &what,
        &dtypes,
        Needs {
            vectors: v > 1,
            ..Needs::default()
        },
    );
    let mut params = vec![emit::ptr_param(od, "out", true)];
    for (j, &x) in inputs.iter().enumerate() {
        params.push(emit::ptr_param(cx.dtype(x), &format!("a{j}"), false));
    }
    let units = n / v;
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}) {{\n\
         \x20 const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (t >= {units}{u}) return;\n\
         \x20 const {it} e = t * {v}{u}, o = e / {l}{u}, c = e % {l}{u};\n\
         \x20 float y[{v}];",
        params.join(", ")
    );
    let mut first = 0;
    let live: Vec<usize> = (0..inputs.len()).filter(|&j| row[j] > 0).collect();
    for (pos, &j) in live.iter().enumerate() {
        let load = emit::load(
            "y",
            &if first == 0 {
                format!("a{j} + o * {}{u} + c", row[j])
            } else {
                format!("a{j} + o * {}{u} + (c - {first}{u})", row[j])
            },
            cx.dtype(inputs[j]),
            v,
        );
        let cond = if pos + 1 == live.len() {
            if pos == 0 {
                "  {\n".to_string()
            } else {
                " else {\n".to_string()
            }
        } else if pos == 0 {
            format!("  if (c < {}{u}) {{\n", first + row[j])
        } else {
            format!(" else if (c < {}{u}) {{\n", first + row[j])
        };
        let _ = write!(s, "{cond}    {load}\n  }}");
        first += row[j];
    }
    let _ = writeln!(s, "\n  {}\n}}", emit::store("out + e", "y", od, v));
    let kernel = b.kernel("concat", s);
    let mut args = vec![KArg::Value(out)];
    args.extend(inputs.iter().map(|&v| KArg::Value(v)));
    Ok(vec![launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        args,
    )])
}

/// `out[n, :] = table[idx[n], :]`. Indices arrive as f32 (exact to 2^24); an index that is
/// not a row of the table gives NaN rows. The runtime checks indices on the host before
/// uploading them, as the CPU backend does, so this is a second line of defence.
pub(crate) fn embedding(
    b: &mut Builder,
    cx: &Ctx,
    table: ValueId,
    idx: ValueId,
    out: ValueId,
) -> Result<Vec<Launch>, String> {
    let ts = cx.shape(table);
    if ts.len() != 2 || cx.numel(out) != cx.numel(idx) * ts[1] {
        return Err(format!(
            "embedding table {ts:?}, {} indices and {} outputs do not agree",
            cx.numel(idx),
            cx.numel(out)
        ));
    }
    let (rows, dim) = (ts[0], ts[1]);
    let n = cx.numel(out);
    if n == 0 {
        return Ok(vec![]);
    }
    let (td, id, od) = (cx.dtype(table), cx.dtype(idx), cx.dtype(out));
    let dtypes: BTreeSet<StorageDType> = [td, id, od].into();
    let vw = emit::vec_width([td, od]);
    let v = if dim % vw == 0 { vw } else { 1 };
    let (it, u) = emit::index_type(n.max(rows * dim) + v);
    let what = format!(
        "{NAME}: embedding lookup: out[n, :] = table[idx[n], :], table {td}[{rows}, {dim}], {} indices ({id});\n\
         an index that is not a row gives a NaN row (the runtime checks them on the host first)",
        cx.numel(idx)
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
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}, {}) {{\n\
         \x20 const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (t >= {units}{u}) return;\n\
         \x20 const {it} e = t * {v}{u}, n = e / {dim}{u}, d = e % {dim}{u};\n\
         \x20 const float r = ld(idx[n]);\n\
         \x20 float y[{v}];\n\
         \x20 if (r >= 0.0f && r < {} && r == floorf(r)) {{\n\
         \x20   {}\n\
         \x20 }} else {{\n\
         \x20   for (int j = 0; j < {v}; ++j) y[j] = __int_as_float(0x7fffffff);\n\
         \x20 }}\n\
         \x20 {}\n\
         }}",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(td, "table", false),
        emit::ptr_param(id, "idx", false),
        emit::c_float(rows as f32),
        emit::load("y", &format!("table + ({it})r * {dim}{u} + d"), td, v),
        emit::store("out + e", "y", od, v),
    );
    let kernel = b.kernel("embedding", s);
    Ok(vec![launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        vec![KArg::Value(out), KArg::Value(table), KArg::Value(idx)],
    )])
}

/// `[outer, rows, inner]` around `axis`, checking that `full` and `split` differ only there
/// and that the segments describe them.
fn split_view(
    full: &[usize],
    split: &[usize],
    axis: usize,
    parts: usize,
    segs: &[Segment],
) -> Result<(usize, usize), String> {
    let valid: usize = segs.iter().map(|s| s.valid).sum();
    let local: usize = segs.iter().map(|s| s.local).sum();
    let ok = axis < full.len()
        && full.len() == split.len()
        && parts > 0
        && segs.iter().all(|s| s.valid <= parts * s.local)
        && (0..full.len()).all(|d| {
            if d == axis {
                full[d] == valid && split[d] == local
            } else {
                full[d] == split[d]
            }
        });
    if !ok {
        return Err(format!(
            "full shape {full:?} and split shape {split:?} do not match segments {segs:?} \
             of {parts} parts on axis {axis}"
        ));
    }
    Ok((
        full[..axis].iter().product(),
        full[axis + 1..].iter().product(),
    ))
}

/// `Step::Shard`: this rank's rows of each segment, zero past the segment's valid rows.
/// The rank's index on the mesh axis is a kernel parameter, so every rank shares the source.
#[allow(clippy::too_many_arguments)]
pub(crate) fn shard(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    out: ValueId,
    axis: usize,
    mesh: MeshAxis,
    parts: usize,
    segs: &[Segment],
) -> Result<Vec<Launch>, String> {
    let (outer, inner) = split_view(cx.shape(x), cx.shape(out), axis, parts, segs)?;
    let full: usize = segs.iter().map(|s| s.valid).sum();
    let local: usize = segs.iter().map(|s| s.local).sum();
    let n = outer * local * inner;
    if n == 0 {
        return Ok(vec![]);
    }
    let (xd, od) = (cx.dtype(x), cx.dtype(out));
    let dtypes: BTreeSet<StorageDType> = [xd, od].into();
    let vw = emit::vec_width(dtypes.iter().copied());
    let v = if inner % vw == 0 { vw } else { 1 };
    let (it, u) = emit::index_type(n.max(outer * full * inner) + v);
    let what = format!(
        "{NAME}: this rank's rows of axis {axis} of {:?} -> {:?}, segments (local, valid) {:?};\n\
         member = the rank's index on the mesh axis; rows past a segment's valid rows are zero",
        cx.shape(x),
        cx.shape(out),
        segs.iter().map(|s| (s.local, s.valid)).collect::<Vec<_>>()
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
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}, const int member) {{\n\
         \x20 const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (t >= {units}{u}) return;\n\
         \x20 const {it} e = t * {v}{u}, o = e / {}{u}, r = e / {inner}{u} % {local}{u}, i = e % {inner}{u};\n\
         \x20 long long src = -1;  // element of x, or none (padding)",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "x", false),
        local * inner,
    );
    let (mut d0, mut s0) = (0usize, 0usize);
    let mut first = true;
    for seg in segs {
        if seg.local > 0 {
            let _ = writeln!(
                s,
                "  {}if (r < {}{u}) {{\n\
                 \x20   const long long k = (long long)r - {d0}ll;\n\
                 \x20   const long long n = min(max({}ll - (long long)member * {}ll, 0ll), {}ll);\n\
                 \x20   if (k < n) src = ((long long)o * {full}ll + {s0}ll + (long long)member * {}ll + k) * {inner}ll + (long long)i;\n\
                 \x20 }}",
                if first { "" } else { "else " },
                d0 + seg.local,
                seg.valid,
                seg.local,
                seg.local,
                seg.local,
            );
            first = false;
        }
        d0 += seg.local;
        s0 += seg.valid;
    }
    let _ = writeln!(
        s,
        "  float y[{v}];\n\
         \x20 if (src >= 0) {{\n\
         \x20   {}\n\
         \x20 }} else {{\n\
         \x20   for (int j = 0; j < {v}; ++j) y[j] = 0.0f;\n\
         \x20 }}\n\
         \x20 {}\n\
         }}",
        emit::load("y", "x + src", xd, v),
        emit::store("out + e", "y", od, v)
    );
    let kernel = b.kernel("shard", s);
    Ok(vec![launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        vec![KArg::Value(out), KArg::Value(x), KArg::MeshIndex(mesh)],
    )])
}

/// `Step::AllGather`: NCCL gathers every member's local tensor into scratch (members in
/// order); the kernel puts each segment's valid rows in place. With one member the kernel
/// reads `x` directly.
pub(crate) fn all_gather(
    b: &mut Builder,
    cx: &Ctx,
    x: ValueId,
    out: ValueId,
    axis: usize,
    parts: usize,
    segs: &[Segment],
) -> Result<StepPlan, String> {
    let (outer, inner) = split_view(cx.shape(out), cx.shape(x), axis, parts, segs)?;
    let full: usize = segs.iter().map(|s| s.valid).sum();
    let local: usize = segs.iter().map(|s| s.local).sum();
    let n = outer * full * inner;
    let local_len = outer * local * inner;
    let (xd, od) = (cx.dtype(x), cx.dtype(out));
    let gathered = if parts == 1 {
        KArg::Value(x)
    } else {
        KArg::Scratch
    };
    let mut plan = StepPlan {
        library: (parts > 1).then_some(LibraryOp::Collective),
        scratch_bytes: if parts > 1 {
            parts * local_len * xd.bytes()
        } else {
            0
        },
        ..StepPlan::default()
    };
    if n == 0 {
        return Ok(plan);
    }
    let dtypes: BTreeSet<StorageDType> = [xd, od].into();
    let vw = emit::vec_width(dtypes.iter().copied());
    let v = if inner % vw == 0 { vw } else { 1 };
    let (it, u) = emit::index_type(n.max(parts * local_len) + v);
    let what = format!(
        "{NAME}: all-gather, local part: g holds the {parts} members' {:?} tensors in member order;\n\
         out {:?} gets each segment's valid rows (segments (local, valid) {:?})",
        cx.shape(x),
        cx.shape(out),
        segs.iter().map(|s| (s.local, s.valid)).collect::<Vec<_>>()
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
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}) {{\n\
         \x20 const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (t >= {units}{u}) return;\n\
         \x20 const {it} e = t * {v}{u}, o = e / {}{u}, f = e / {inner}{u} % {full}{u}, i = e % {inner}{u};\n\
         \x20 {it} src = 0;  // element of g: member m's row (k % local) of the segment",
        emit::ptr_param(od, "out", true),
        emit::ptr_param(xd, "g", false),
        full * inner,
    );
    // First local row and first full row of each segment.
    let mut d0 = Vec::with_capacity(segs.len());
    let mut s0 = Vec::with_capacity(segs.len());
    let (mut d, mut f0) = (0usize, 0usize);
    for seg in segs {
        d0.push(d);
        s0.push(f0);
        d += seg.local;
        f0 += seg.valid;
    }
    let live: Vec<usize> = (0..segs.len()).filter(|&i| segs[i].valid > 0).collect();
    for (pos, &si) in live.iter().enumerate() {
        let seg = segs[si];
        let end = s0[si] + seg.valid;
        let head = match (pos == 0, pos + 1 == live.len()) {
            (true, true) => "  {".to_string(),
            (true, false) => format!("  if (f < {end}{u}) {{"),
            (false, false) => format!(" else if (f < {end}{u}) {{"),
            (false, true) => " else {".to_string(),
        };
        let _ = write!(
            s,
            "{head}\n    const {it} k = f - {}{u};\n    src = (k / {l}{u}) * {local_len}{u} + (o * {local}{u} + {}{u} + k % {l}{u}) * {inner}{u} + i;\n  }}",
            s0[si],
            d0[si],
            l = seg.local,
        );
    }
    let _ = writeln!(
        s,
        "\n  float y[{v}];\n  {}\n  {}\n}}",
        emit::load("y", "g + src", xd, v),
        emit::store("out + e", "y", od, v)
    );
    let kernel = b.kernel("all_gather_assemble", s);
    plan.launches.push(launch(
        Emitted {
            kernel,
            grid: [emit::blocks(units, THREADS as usize), 1, 1],
            block: [THREADS, 1, 1],
        },
        vec![KArg::Value(out), gathered],
    ));
    Ok(plan)
}
