//! `Step::SeqAttention` (Ulysses, Ring, USP) on the GPU: the local attention on tensor
//! cores, around an exchange the runtime does.
//!
//! After the Ulysses all-to-all a rank holds `U` members' rows for its share of the heads;
//! Ring attention then passes the `R` members' K/V blocks around. The plan gives the
//! kernels for what happens in between, and where each piece lives in the step's scratch
//! ([`SeqAttentionLayout`]): the runtime writes the (exchanged) q, k, v and the current
//! block's key mask there, launches the flash-attention kernel once per K/V block, and
//! with `R > 1` folds each block's output into an f32 accumulator by its log-sum-exp
//! (`merge_first` for the first block, `merge` for the others: the online softmax across
//! blocks, as the CPU backend's Ring attention does it).

use std::collections::BTreeSet;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::attention::{self, AttentionSpec};
use super::elementwise::Emitted;
use super::emit::{self, Needs, NAME, THREADS};
use super::plan::{launch, Builder, Ctx, KArg, LibraryOp, StepPlan};
use super::StorageDType;
use crate::program::{Mesh, SeqMethod, Step};

/// Where a sequence-parallel attention's pieces live in its step's scratch (byte offsets,
/// 256-aligned), and the shape the local attention sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqAttentionLayout {
    /// Ulysses members (heads exchanged for rows) and Ring members (K/V blocks passed on).
    pub ulysses: usize,
    pub ring: usize,
    /// Heads of this rank after the all-to-all (padded up to a multiple of `ulysses`).
    pub heads: usize,
    /// Query rows and keys per block after the all-to-all (`ulysses` members' rows).
    pub rows: usize,
    pub keys: usize,
    /// q `[B, rows, heads*D]`, k / v `[B, keys, heads*D]`, in the storage type.
    pub q: usize,
    pub k: usize,
    pub v: usize,
    /// `[keys]` bytes, 0 = padding.
    pub mask: usize,
    /// One block's output `[B, rows, heads*D]` (storage type) and, with `ring > 1`, its
    /// log-sum-exp `[B, heads, rows]` f32.
    pub out: usize,
    pub lse: usize,
    /// With `ring > 1`: the f32 accumulator `[B, rows, heads*D]` (the result) and its
    /// log-sum-exp.
    pub acc: usize,
    pub acc_lse: usize,
    /// Bytes from `k` to the end of `v` (one K/V block, as it travels around the ring),
    /// and with `ring > 1` where the next block arrives while this one is attended to.
    pub kv_span: usize,
    pub kv_next: usize,
    /// With `ulysses > 1`, for exchanging on the device: the all-to-all's send and receive
    /// areas, `ulysses` chunks of `a2a_chunk` bytes each (a chunk is q, k, v of one member's
    /// heads, or on the way back one member's rows of the output, `a2a_out_chunk` bytes).
    pub a2a_send: usize,
    pub a2a_recv: usize,
    pub a2a_chunk: usize,
    pub a2a_out_chunk: usize,
}

/// Where the launches of a sequence-parallel attention are in `StepPlan::launches`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqAttentionLaunches {
    /// Flash attention of one K/V block (its last argument is the block's key mask).
    pub attention: usize,
    /// With Ring: the first block's merge and the later blocks'.
    pub merge_first: Option<usize>,
    pub merge: Option<usize>,
    /// With Ulysses (exchange on the device): q, k, v packed per member into the send
    /// area, the received rows interleaved into `q`/`k`/`v`, the result split per member
    /// into the send area, and the received heads unpacked into the output value.
    pub pack: Option<[usize; 3]>,
    pub interleave: Option<[usize; 3]>,
    pub deinterleave: Option<usize>,
    pub unpack: Option<usize>,
    /// Without Ulysses (exchange on the device): the result converted into the output.
    pub finish: Option<usize>,
}

impl SeqAttentionLayout {
    /// The launch indices of a plan with this layout (the order `seq_attention` emits).
    pub fn launches(&self) -> SeqAttentionLaunches {
        let mut next = 1;
        let mut take = |n: usize| {
            let i = next;
            next += n;
            i
        };
        let ring = self.ring > 1;
        let merge_first = ring.then(|| take(1));
        let merge = ring.then(|| take(1));
        let ulysses = self.ulysses > 1;
        let pack = ulysses.then(|| {
            let i = take(3);
            [i, i + 1, i + 2]
        });
        let interleave = ulysses.then(|| {
            let i = take(3);
            [i, i + 1, i + 2]
        });
        let deinterleave = ulysses.then(|| take(1));
        let unpack = ulysses.then(|| take(1));
        let finish = (!ulysses).then(|| take(1));
        SeqAttentionLaunches {
            attention: 0,
            merge_first,
            merge,
            pack,
            interleave,
            deinterleave,
            unpack,
            finish,
        }
    }

    /// The area holding the attention's result: the f32 accumulator with Ring, else the
    /// one block's output (storage type).
    pub fn result(&self) -> usize {
        if self.ring > 1 {
            self.acc
        } else {
            self.out
        }
    }
}

/// Ulysses and Ring members of `method` on `mesh`.
pub fn seq_groups(method: SeqMethod, mesh: &Mesh) -> Option<(usize, usize)> {
    match method {
        SeqMethod::Ulysses => Some((mesh.sp(), 1)),
        SeqMethod::Ring => Some((1, mesh.sp())),
        SeqMethod::Usp => Some((mesh.ulysses, mesh.ring)),
        SeqMethod::Displaced => None,
    }
}

fn at(offset: usize) -> KArg {
    KArg::ScratchAt(offset)
}

pub(crate) fn seq_attention(b: &mut Builder, cx: &Ctx, step: &Step) -> Result<StepPlan, String> {
    let Step::SeqAttention {
        q,
        k,
        v,
        out,
        method,
        batch,
        sq,
        sk,
        heads,
        head_dim,
        scale,
        ..
    } = *step
    else {
        return Err("not a sequence-parallel attention".into());
    };
    let Some((u, r)) = seq_groups(method, &cx.program.mesh) else {
        // Displaced attention keeps K/V across runs: the CPU backend runs it.
        return Ok(StepPlan {
            library: Some(LibraryOp::Attention),
            ..StepPlan::default()
        });
    };
    let dtype = cx.dtype(q);
    let hm = if u > 1 { heads.div_ceil(u) } else { heads };
    let (rows, keys) = (sq * u, sk * u);
    let spec = AttentionSpec {
        batch,
        sq: rows,
        sk: keys,
        heads: hm,
        head_dim,
        scale,
        dtype,
        lse: r > 1,
        key_mask: true,
    };
    let e = attention::attention_kernel(b, &spec)?;
    let mut offset = 0usize;
    let mut region = |bytes: usize| {
        let o = offset;
        offset += bytes.next_multiple_of(256);
        o
    };
    let width = hm * head_dim;
    let q_bytes = batch * rows * width * dtype.bytes();
    let kv_bytes = batch * keys * width * dtype.bytes();
    let lse_bytes = if r > 1 { batch * hm * rows * 4 } else { 0 };
    let acc_bytes = if r > 1 { batch * rows * width * 4 } else { 0 };
    let (q_at, k_at, v_at) = (region(q_bytes), region(kv_bytes), region(kv_bytes));
    let kv_span = v_at + kv_bytes - k_at;
    // One member's q, k, v (its own rows, one member's heads) in the all-to-all.
    let (nq, nk) = (batch * sq * width, batch * sk * width);
    let a2a_chunk = if u > 1 {
        (nq + 2 * nk) * dtype.bytes()
    } else {
        0
    };
    let layout = SeqAttentionLayout {
        ulysses: u,
        ring: r,
        heads: hm,
        rows,
        keys,
        q: q_at,
        k: k_at,
        v: v_at,
        mask: region(r * keys),
        out: region(q_bytes),
        lse: region(lse_bytes),
        acc: region(acc_bytes),
        acc_lse: region(lse_bytes),
        kv_span,
        kv_next: region(if r > 1 { kv_span } else { 0 }),
        a2a_send: region(u * a2a_chunk),
        a2a_recv: region(u * a2a_chunk),
        a2a_chunk,
        a2a_out_chunk: nq * dtype.bytes(),
    };
    let mut args = vec![at(layout.out), at(layout.q), at(layout.k), at(layout.v)];
    if r > 1 {
        args.push(at(layout.lse));
    }
    // The mask area holds every ring member's block mask; the runtime points this
    // argument at the current block's.
    args.push(at(layout.mask));
    let mut launches = vec![launch(e, args)];
    if r > 1 {
        for first in [true, false] {
            let m = merge_kernel(b, batch, rows, hm, head_dim, dtype, first);
            launches.push(launch(
                m,
                vec![
                    at(layout.acc),
                    at(layout.acc_lse),
                    at(layout.out),
                    at(layout.lse),
                ],
            ));
        }
    }
    let geo = Heads {
        batch,
        heads,
        head_dim,
        members: u,
        per_member: hm,
    };
    let result_dtype = if r > 1 { StorageDType::F32 } else { dtype };
    if u > 1 {
        let chunk_elems = nq + 2 * nk;
        for (x, part) in [(q, 0), (k, nq), (v, nq + nk)] {
            let rows = if part == 0 { sq } else { sk };
            let e = ulysses_copy(b, &geo, Copy::Pack, rows, chunk_elems, cx.dtype(x), dtype);
            launches.push(launch(
                e,
                vec![at(layout.a2a_send + part * dtype.bytes()), KArg::Value(x)],
            ));
        }
        for (dst, part, rows) in [
            (layout.q, 0, sq),
            (layout.k, nq, sk),
            (layout.v, nq + nk, sk),
        ] {
            let e = ulysses_copy(b, &geo, Copy::Interleave, rows, chunk_elems, dtype, dtype);
            launches.push(launch(
                e,
                vec![at(dst), at(layout.a2a_recv + part * dtype.bytes())],
            ));
        }
        let e = ulysses_copy(b, &geo, Copy::Deinterleave, sq, nq, result_dtype, dtype);
        launches.push(launch(e, vec![at(layout.a2a_send), at(layout.result())]));
        let e = ulysses_copy(b, &geo, Copy::Unpack, sq, nq, dtype, cx.dtype(out));
        launches.push(launch(e, vec![KArg::Value(out), at(layout.a2a_recv)]));
    } else {
        let e = ulysses_copy(b, &geo, Copy::Finish, sq, 0, result_dtype, cx.dtype(out));
        launches.push(launch(e, vec![KArg::Value(out), at(layout.result())]));
    }
    Ok(StepPlan {
        launches,
        library: Some(LibraryOp::Attention),
        scratch_bytes: offset,
        seq_attention: Some(layout),
    })
}

/// Folds one K/V block's attention output `o` (log-sum-exp `lse`) into the accumulator:
/// `acc = (acc·e^l + o·e^lb) / (e^l + e^lb)`, written as `acc -= σ(lb - l)·(acc - o)`, and
/// `l = log(e^l + e^lb)`. The first block is copied. A thread per row of one head.
fn merge_kernel(
    b: &mut Builder,
    batch: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    dtype: StorageDType,
    first: bool,
) -> Emitted {
    let n = batch * heads * rows;
    let (it, u) = emit::index_type(batch * rows * heads * head_dim + 1);
    let dtypes: BTreeSet<StorageDType> = [StorageDType::F32, dtype].into();
    let what = format!(
        "{NAME}: Ring attention: {} K/V block's output o {dtype}[{batch}, {rows}, {heads}x{head_dim}] \
         and log-sum-exp [{batch}, {heads}, {rows}]\ninto the f32 accumulator and its log-sum-exp \
         (online softmax across blocks); a thread per row of one head",
        if first { "copy the first" } else { "merge one more" }
    );
    let mut s = emit::prelude(&what, &dtypes, Needs::default());
    let body = if first {
        format!(
            "  for ({it} d = 0; d < {head_dim}{u}; ++d) acc[base + d] = ld(o[base + d]);\n\
             \x20 acc_lse[r] = lse[r];"
        )
    } else {
        format!(
            "  const float lb = lse[r], l = acc_lse[r];\n\
             \x20 if (lb == __int_as_float(0xff800000)) return;  // the block is all padding\n\
             \x20 if (l == __int_as_float(0xff800000)) {{\n\
             \x20   for ({it} d = 0; d < {head_dim}{u}; ++d) acc[base + d] = ld(o[base + d]);\n\
             \x20   acc_lse[r] = lb;\n\
             \x20   return;\n\
             \x20 }}\n\
             \x20 const float w = 1.0f / (1.0f + expf(l - lb));\n\
             \x20 for ({it} d = 0; d < {head_dim}{u}; ++d) acc[base + d] -= w * (acc[base + d] - ld(o[base + d]));\n\
             \x20 acc_lse[r] = fmaxf(l, lb) + log1pf(expf(-fabsf(l - lb)));"
        )
    };
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}(float* __restrict__ acc, \
         float* __restrict__ acc_lse, {}, const float* __restrict__ lse) {{\n\
         \x20 const {it} r = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n\
         \x20 if (r >= {n}{u}) return;\n\
         \x20 const {it} i = r % {rows}{u}, h = (r / {rows}{u}) % {heads}{u}, b = r / ({rows}{u} * {heads}{u});\n\
         \x20 const {it} base = ((b * {rows}{u} + i) * {heads}{u} + h) * {head_dim}{u};\n\
         {body}\n\
         }}",
        emit::ptr_param(dtype, "o", false),
    );
    let kernel = b.kernel(
        if first {
            "ring_merge_first"
        } else {
            "ring_merge"
        },
        s,
    );
    Emitted {
        kernel,
        grid: [emit::blocks(n, THREADS as usize), 1, 1],
        block: [THREADS, 1, 1],
    }
}

/// The heads of a sequence-parallel attention and how they are dealt to the Ulysses
/// members (the runtime's `HeadSplit`).
struct Heads {
    batch: usize,
    heads: usize,
    head_dim: usize,
    members: usize,
    per_member: usize,
}

/// The copies around the Ulysses all-to-all on the device (the CPU backend's
/// `ulysses::scatter` / `gather` in memory layout).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// `x [B, rows, H*D]` -> `send[j][B, rows, W]`: member j's heads (zeros for padding
    /// heads), chunk j at `j * chunk` elements.
    Pack,
    /// `recv[m][B, rows, W]` -> `[B, members*rows, W]`: member m's rows, member-major per
    /// batch element.
    Interleave,
    /// `[B, members*rows, W]` -> `send[m][B, rows, W]`: the inverse of `Interleave`.
    Deinterleave,
    /// `recv[j][B, rows, W]` -> `out [B, rows, H*D]`: member j's real heads.
    Unpack,
    /// `[B, rows, H*D]` -> `out`, converting the element type.
    Finish,
}

/// One thread per element of the destination (for `Pack`, of the send area).
fn ulysses_copy(
    b: &mut Builder,
    g: &Heads,
    kind: Copy,
    rows: usize,
    chunk: usize,
    src_dtype: StorageDType,
    dst_dtype: StorageDType,
) -> Emitted {
    let (u, w, hd) = (g.members, g.per_member * g.head_dim, g.heads * g.head_dim);
    let n = match kind {
        Copy::Pack | Copy::Deinterleave | Copy::Interleave => u * g.batch * rows * w,
        Copy::Unpack | Copy::Finish => g.batch * rows * hd,
    };
    let (it, us) = emit::index_type(n.max(u * chunk) + 1);
    let dtypes: BTreeSet<StorageDType> = [src_dtype, dst_dtype].into();
    let (name, what, body) = match kind {
        Copy::Pack => (
            "ulysses_pack",
            format!("x [{}, {rows}, {hd}] -> send[j][{}, {rows}, {w}]: member j's heads, chunks {chunk} apart", g.batch, g.batch),
            format!(
                "const {it} c = e % {w}{us}, row = (e / {w}{us}) % ({b}{us} * {rows}{us}), j = e / ({b}{us} * {rows}{us} * {w}{us});\n\
                 \x20   const {it} col = j * {w}{us} + c;\n\
                 \x20   st(dst + j * {chunk}{us} + row * {w}{us} + c, col < {hd}{us} ? ld(src[row * {hd}{us} + col]) : 0.0f);",
                b = g.batch
            ),
        ),
        Copy::Interleave => (
            "ulysses_interleave",
            format!("recv[m][{}, {rows}, {w}] (chunks {chunk} apart) -> [{}, {u} x {rows}, {w}]", g.batch, g.batch),
            format!(
                "const {it} c = e % {w}{us}, s = (e / {w}{us}) % {rows}{us}, m = (e / ({rows}{us} * {w}{us})) % {u}{us}, b = e / ({u}{us} * {rows}{us} * {w}{us});\n\
                 \x20   st(dst + e, ld(src[m * {chunk}{us} + (b * {rows}{us} + s) * {w}{us} + c]));"
            ),
        ),
        Copy::Deinterleave => (
            "ulysses_deinterleave",
            format!("[{}, {u} x {rows}, {w}] -> send[m][{}, {rows}, {w}] (chunks {chunk} apart)", g.batch, g.batch),
            format!(
                "const {it} c = e % {w}{us}, s = (e / {w}{us}) % {rows}{us}, m = (e / ({rows}{us} * {w}{us})) % {u}{us}, b = e / ({u}{us} * {rows}{us} * {w}{us});\n\
                 \x20   st(dst + m * {chunk}{us} + (b * {rows}{us} + s) * {w}{us} + c, ld(src[e]));"
            ),
        ),
        Copy::Unpack => (
            "ulysses_unpack",
            format!("recv[j][{}, {rows}, {w}] (chunks {chunk} apart) -> out [{}, {rows}, {hd}]: member j's real heads", g.batch, g.batch),
            format!(
                "const {it} col = e % {hd}{us}, row = e / {hd}{us}, j = col / {w}{us}, c = col % {w}{us};\n\
                 \x20   st(dst + e, ld(src[j * {chunk}{us} + row * {w}{us} + c]));"
            ),
        ),
        Copy::Finish => (
            "seq_attention_out",
            format!("[{}, {rows}, {hd}] -> out, {src_dtype} to {dst_dtype}", g.batch),
            "st(dst + e, ld(src[e]));".to_string(),
        ),
    };
    let what =
        format!("{NAME}: sequence-parallel attention: {what}; a thread per destination element");
    let mut s = emit::prelude(&what, &dtypes, Needs::default());
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}, {}) {{\n\
         \x20 for ({it} e = ({it})blockIdx.x * {THREADS}{us} + threadIdx.x; e < {n}{us}; e += ({it})gridDim.x * {THREADS}{us}) {{\n\
         \x20   {body}\n\
         \x20 }}\n\
         }}",
        emit::ptr_param(dst_dtype, "dst", true),
        emit::ptr_param(src_dtype, "src", false),
    );
    let kernel = b.kernel(name, s);
    Emitted {
        kernel,
        grid: [emit::blocks(n, THREADS as usize).min(1 << 20), 1, 1],
        block: [THREADS, 1, 1],
    }
}
