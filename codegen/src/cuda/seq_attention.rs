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
    let layout = SeqAttentionLayout {
        ulysses: u,
        ring: r,
        heads: hm,
        rows,
        keys,
        q: q_at,
        k: k_at,
        v: v_at,
        mask: region(keys),
        out: region(q_bytes),
        lse: region(lse_bytes),
        acc: region(acc_bytes),
        acc_lse: region(lse_bytes),
        kv_span,
        kv_next: region(if r > 1 { kv_span } else { 0 }),
    };
    let mut args = vec![at(layout.out), at(layout.q), at(layout.k), at(layout.v)];
    if r > 1 {
        args.push(at(layout.lse));
    }
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
