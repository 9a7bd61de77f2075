//! Scaled dot-product attention over `[batch, seq, heads·head_dim]` tensors.

use std::cell::Cell;

use rayon::prelude::*;

use super::gemm::gemm_raw;
use super::vmath::softmax_exp_inplace;
use ::gemm::Parallelism;

/// Score-scratch budget per task, in floats (1 MiB, about one core's L2).
/// Every query block re-packs K and V inside the GEMMs, so blocks should be
/// tall; beyond this the scores spill out of L2 between the three passes.
const SCORE_BUDGET: usize = 256 * 1024;
/// Query rows per block stay in this range: fewer rows leave the K/V packing
/// unamortized, more bring no benefit and grow the scratch.
const MIN_BLOCK_ROWS: usize = 32;
const MAX_BLOCK_ROWS: usize = 256;
/// Total multiply-adds (sq·sk·head_dim over all pairs) below which the work is
/// not worth handing to the rayon pool.
const PAR_MIN_WORK: usize = 1 << 15;

thread_local! {
    /// Per-thread score scratch reused across calls, so the hot path does not
    /// allocate. Taken out of the cell while in use, which makes a re-entrant
    /// call merely allocate instead of failing.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A pointer that may be shared across the rayon tasks, each of which writes
/// a disjoint set of elements through it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used to write disjoint elements from different tasks, see the
// call sites.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method (not field access) so closures capture the whole Send wrapper,
    // not the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out = softmax(q·kᵀ · scale) · v`, independently for every (batch, head).
///
/// `q` and `out` are `[batch, sq, heads·head_dim]`, `k` and `v` are
/// `[batch, sk, heads·head_dim]`; head `h` uses columns
/// `h·head_dim..(h+1)·head_dim`. The softmax runs over keys with max
/// subtraction, in f32. With `sk == 0` the output is zero.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    attention_impl(
        q, k, v, batch, sq, sk, heads, head_dim, scale, None, out, None,
    );
}

/// [`attention`] that also writes `lse[batch, heads, sq]`, the natural-log
/// logsumexp of each query's scaled scores (`-inf` when `sk == 0`), which is
/// what is needed to merge partial results over key shards (ring attention).
#[allow(clippy::too_many_arguments)]
pub fn attention_lse(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    attention_impl(
        q,
        k,
        v,
        batch,
        sq,
        sk,
        heads,
        head_dim,
        scale,
        None,
        out,
        Some(lse),
    );
}

/// [`attention`] over a subset of the keys: key `j` takes part iff
/// `key_valid[j]` (`None`: all keys), for every batch, head and query alike.
/// This is how sequence-parallel attention ignores the padding rows of
/// segments that do not divide the degree. Masked keys get a `-inf` score, so
/// they contribute exactly nothing (their value rows are multiplied by 0 and
/// must be finite). When no key is valid, `out` is 0 and `lse` is `-inf` — the
/// neutral element of the ring-attention merge. `lse`, when given, is
/// `[batch, heads, sq]` as in [`attention_lse`].
#[allow(clippy::too_many_arguments)]
pub fn attention_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    key_valid: Option<&[bool]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    attention_impl(
        q, k, v, batch, sq, sk, heads, head_dim, scale, key_valid, out, lse,
    );
}

#[allow(clippy::too_many_arguments)]
fn attention_impl(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    key_valid: Option<&[bool]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    let hd = heads * head_dim;
    // Real asserts: the tasks below access these buffers through raw pointers.
    assert!(q.len() >= batch * sq * hd, "attention: q too short");
    assert!(k.len() >= batch * sk * hd, "attention: k too short");
    assert!(v.len() >= batch * sk * hd, "attention: v too short");
    assert!(out.len() >= batch * sq * hd, "attention: out too short");
    if let Some(l) = &lse {
        assert!(l.len() >= batch * heads * sq, "attention: lse too short");
    }
    if let Some(m) = key_valid {
        assert_eq!(m.len(), sk, "attention: key mask length != sk");
    }
    if batch == 0 || sq == 0 || heads == 0 {
        return;
    }
    // The masked key indices, listed once: padding is a handful of rows, so
    // overwriting their scores is cheaper than testing every score.
    let masked: Vec<usize> = key_valid.map_or_else(Vec::new, |m| {
        m.iter()
            .enumerate()
            .filter(|(_, &ok)| !ok)
            .map(|(j, _)| j)
            .collect()
    });
    // No valid key at all (also sk == 0): every row would be softmax over
    // nothing; define it as the merge identity instead of NaN.
    if sk == 0 || masked.len() == sk {
        out[..batch * sq * hd].fill(0.0);
        if let Some(l) = lse {
            l[..batch * heads * sq].fill(f32::NEG_INFINITY);
        }
        return;
    }

    let pairs = batch * heads;
    let threads = rayon::current_num_threads();
    let mut nblk = sq.div_ceil((SCORE_BUDGET / sk).clamp(MIN_BLOCK_ROWS, MAX_BLOCK_ROWS));
    // Few (batch, head) pairs (e.g. a single image with few heads): split the
    // queries further so every thread gets work.
    if pairs * nblk < 2 * threads {
        nblk = nblk.max(
            (2 * threads)
                .div_ceil(pairs)
                .min(sq.div_ceil(MIN_BLOCK_ROWS)),
        );
    }
    // Even out block sizes instead of leaving a small ragged tail.
    let rows_per = sq.div_ceil(nblk);
    let nblk = sq.div_ceil(rows_per);
    let tasks = pairs * nblk;

    let out_ptr = SharedMut(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SharedMut(l.as_mut_ptr()));

    let run = |t: usize| {
        let (pair, blk) = (t / nblk, t % nblk);
        let (b, h) = (pair / heads, pair % heads);
        let r0 = blk * rows_per;
        let rows = rows_per.min(sq - r0);

        let mut scratch = SCRATCH.with(Cell::take);
        let need = rows * sk + rows;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (scores, inv_sum) = scratch[..need].split_at_mut(rows * sk);

        let q_off = (b * sq + r0) * hd + h * head_dim;
        let kv_off = b * sk * hd + h * head_dim;
        // SAFETY: the views stay inside q/k/scores (lengths asserted above:
        // rows ≤ sq - r0, columns within head h); `scores` is thread-private.
        unsafe {
            gemm_raw(
                rows,
                sk,
                head_dim,
                scores.as_mut_ptr(),
                sk,
                false,
                q.as_ptr().add(q_off),
                hd,
                1,
                k.as_ptr().add(kv_off),
                1,
                hd,
                scale,
                Parallelism::None,
            );
        }

        for (i, row) in scores.chunks_exact_mut(sk).enumerate() {
            for &j in &masked {
                row[j] = f32::NEG_INFINITY;
            }
            // At least one key is valid, so the row max is finite and the
            // masked entries become exp(-inf) = 0.
            let (m, s) = softmax_exp_inplace(row);
            inv_sum[i] = 1.0 / s;
            if let Some(l) = lse_ptr {
                // SAFETY: lse index (b, h, r0 + i) belongs to this task alone
                // and is in bounds (asserted above).
                unsafe { *l.get().add(pair * sq + r0 + i) = m + s.ln() };
            }
        }

        // Normalizing the head_dim-wide output rows is cheaper than the
        // sk-wide probability rows.
        // SAFETY: the destination view is rows r0..r0+rows, columns of head h
        // of batch b — written by this task only and inside `out`; `scores`
        // and `v` are in bounds as above.
        unsafe {
            let dst = out_ptr.get().add(q_off);
            gemm_raw(
                rows,
                head_dim,
                sk,
                dst,
                hd,
                false,
                scores.as_ptr(),
                sk,
                1,
                v.as_ptr().add(kv_off),
                hd,
                1,
                1.0,
                Parallelism::None,
            );
            for (i, &inv) in inv_sum.iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(dst.add(i * hd), head_dim);
                for x in row {
                    *x *= inv;
                }
            }
        }

        SCRATCH.with(|c| c.set(scratch));
    };

    if tasks > 1 && pairs * sq * sk * head_dim >= PAR_MIN_WORK && threads > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, Rng};

    struct Case {
        batch: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        hd: usize,
    }

    /// Returns (out, lse) in f64; keys with `mask[j] == false` are left out
    /// (no valid key: out 0, lse -inf).
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        c: &Case,
        scale: f32,
        mask: Option<&[bool]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let valid = |j: usize| mask.is_none_or(|m| m[j]);
        let hdim = c.heads * c.hd;
        let mut out = vec![0.0f64; c.batch * c.sq * hdim];
        let mut lse = vec![0.0f64; c.batch * c.heads * c.sq];
        let mut s = vec![0.0f64; c.sk];
        for b in 0..c.batch {
            for h in 0..c.heads {
                for i in 0..c.sq {
                    let qi = &q[(b * c.sq + i) * hdim + h * c.hd..][..c.hd];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = &k[(b * c.sk + j) * hdim + h * c.hd..][..c.hd];
                        let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                        *sj = dot * scale as f64;
                    }
                    let m = (0..c.sk)
                        .filter(|&j| valid(j))
                        .map(|j| s[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    if m == f64::NEG_INFINITY {
                        lse[(b * c.heads + h) * c.sq + i] = m;
                        continue;
                    }
                    let z: f64 = (0..c.sk)
                        .filter(|&j| valid(j))
                        .map(|j| (s[j] - m).exp())
                        .sum();
                    lse[(b * c.heads + h) * c.sq + i] = m + z.ln();
                    for d in 0..c.hd {
                        let mut acc = 0.0;
                        for (j, &sj) in s.iter().enumerate().filter(|&(j, _)| valid(j)) {
                            acc +=
                                (sj - m).exp() / z * v[(b * c.sk + j) * hdim + h * c.hd + d] as f64;
                        }
                        out[(b * c.sq + i) * hdim + h * c.hd + d] = acc;
                    }
                }
            }
        }
        (out, lse)
    }

    fn check(c: Case, q_mag: f32, seed: u64) {
        let mut rng = Rng::new(seed);
        let hdim = c.heads * c.hd;
        let q: Vec<f32> = rng
            .vec(c.batch * c.sq * hdim)
            .iter()
            .map(|x| x * q_mag)
            .collect();
        let k = rng.vec(c.batch * c.sk * hdim);
        let v = rng.vec(c.batch * c.sk * hdim);
        let scale = 1.0 / (c.hd as f32).sqrt();
        let (want, want_lse) = naive(&q, &k, &v, &c, scale, None);

        let mut out = vec![f32::NAN; want.len()];
        attention(
            &q, &k, &v, c.batch, c.sq, c.sk, c.heads, c.hd, scale, &mut out,
        );
        assert_close(&out, &want, 1e-5);

        let mut out = vec![f32::NAN; want.len()];
        let mut lse = vec![f32::NAN; want_lse.len()];
        attention_lse(
            &q, &k, &v, c.batch, c.sq, c.sk, c.heads, c.hd, scale, &mut out, &mut lse,
        );
        assert_close(&out, &want, 1e-5);
        assert_close(&lse, &want_lse, 1e-5);

        // The masked entry point with no mask (and with an all-true mask) is
        // the same computation.
        let all = vec![true; c.sk];
        for mask in [None, Some(all.as_slice())] {
            let mut out = vec![f32::NAN; want.len()];
            let mut lse = vec![f32::NAN; want_lse.len()];
            attention_masked(
                &q,
                &k,
                &v,
                c.batch,
                c.sq,
                c.sk,
                c.heads,
                c.hd,
                scale,
                mask,
                &mut out,
                Some(&mut lse),
            );
            assert_close(&out, &want, 1e-5);
            assert_close(&lse, &want_lse, 1e-5);
        }
    }

    /// Masked attention against the f64 reference that leaves the keys out.
    fn check_masked(c: Case, mask: &[bool], seed: u64) {
        let mut rng = Rng::new(seed);
        let hdim = c.heads * c.hd;
        let q = rng.vec(c.batch * c.sq * hdim);
        // Large values in the masked rows: if they leaked into the softmax or
        // the output, the error would show.
        let mut k = rng.vec(c.batch * c.sk * hdim);
        let mut v = rng.vec(c.batch * c.sk * hdim);
        for b in 0..c.batch {
            for (j, _) in mask.iter().enumerate().filter(|(_, &ok)| !ok) {
                let row = (b * c.sk + j) * hdim;
                k[row..row + hdim].fill(30.0);
                v[row..row + hdim].fill(1e6);
            }
        }
        let scale = 1.0 / (c.hd as f32).sqrt();
        let (want, want_lse) = naive(&q, &k, &v, &c, scale, Some(mask));
        let mut out = vec![f32::NAN; want.len()];
        let mut lse = vec![f32::NAN; want_lse.len()];
        attention_masked(
            &q,
            &k,
            &v,
            c.batch,
            c.sq,
            c.sk,
            c.heads,
            c.hd,
            scale,
            Some(mask),
            &mut out,
            Some(&mut lse),
        );
        assert_close(&out, &want, 1e-5);
        if mask.iter().any(|&ok| ok) {
            assert_close(&lse, &want_lse, 1e-5);
        } else {
            assert!(out.iter().all(|&x| x == 0.0));
            assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
        }
        // Without the LSE output the result is the same.
        let mut out2 = vec![f32::NAN; want.len()];
        attention_masked(
            &q,
            &k,
            &v,
            c.batch,
            c.sq,
            c.sk,
            c.heads,
            c.hd,
            scale,
            Some(mask),
            &mut out2,
            None,
        );
        assert_eq!(out, out2);
    }

    #[test]
    fn masked_keys() {
        let case = |batch, sq, sk, heads, hd| Case {
            batch,
            sq,
            sk,
            heads,
            hd,
        };
        // Trailing padding (a segment that does not divide the degree).
        let mut m = vec![true; 16];
        m[13..].fill(false);
        check_masked(case(2, 5, 16, 3, 4), &m, 11);
        // Padding in the middle (image segment padding, then text rows).
        let m: Vec<bool> = (0..19).map(|j| !(10..15).contains(&j)).collect();
        check_masked(case(1, 40, 19, 2, 8), &m, 12);
        // A single valid key.
        let m: Vec<bool> = (0..9).map(|j| j == 4).collect();
        check_masked(case(2, 3, 9, 2, 4), &m, 13);
        // Nothing valid: out 0, lse -inf.
        check_masked(case(2, 3, 6, 2, 4), &[false; 6], 14);
        // Long keys with blocked queries (parallel path).
        let m: Vec<bool> = (0..600).map(|j| j % 7 != 3).collect();
        check_masked(case(1, 70, 600, 2, 16), &m, 15);
    }

    #[test]
    fn small_shapes() {
        check(
            Case {
                batch: 2,
                sq: 5,
                sk: 7,
                heads: 3,
                hd: 4,
            },
            1.0,
            1,
        );
        check(
            Case {
                batch: 1,
                sq: 1,
                sk: 1,
                heads: 1,
                hd: 1,
            },
            1.0,
            2,
        );
        check(
            Case {
                batch: 1,
                sq: 3,
                sk: 1,
                heads: 2,
                hd: 5,
            },
            1.0,
            3,
        );
        check(
            Case {
                batch: 3,
                sq: 1,
                sk: 9,
                heads: 1,
                hd: 16,
            },
            1.0,
            4,
        );
    }

    #[test]
    fn pixart_like_shape() {
        // Cross-attention shape of PixArt (text length 120), shrunk in heads.
        check(
            Case {
                batch: 2,
                sq: 64,
                sk: 120,
                heads: 2,
                hd: 72,
            },
            1.0,
            5,
        );
    }

    #[test]
    fn query_blocking() {
        // 300 queries over two blocks; a long key sequence forces 32-row blocks.
        check(
            Case {
                batch: 1,
                sq: 300,
                sk: 37,
                heads: 2,
                hd: 8,
            },
            1.0,
            6,
        );
        check(
            Case {
                batch: 1,
                sq: 40,
                sk: 9000,
                heads: 1,
                hd: 4,
            },
            1.0,
            7,
        );
    }

    #[test]
    fn large_logits_are_stable() {
        // Scores around ±100 would overflow exp without max subtraction.
        check(
            Case {
                batch: 1,
                sq: 9,
                sk: 33,
                heads: 2,
                hd: 16,
            },
            40.0,
            8,
        );
    }

    #[test]
    fn empty_keys() {
        let mut out = vec![f32::NAN; 2 * 3 * 4];
        let mut lse = vec![0.0f32; 2 * 2 * 3];
        attention_lse(&[0.5; 24], &[], &[], 2, 3, 0, 2, 2, 1.0, &mut out, &mut lse);
        assert!(out.iter().all(|&x| x == 0.0));
        assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
    }
}
