//! Ring attention: every member keeps its queries while the K/V blocks travel around the
//! ring; partial results are merged with their log-sum-exp (online softmax), in f32.

use crate::comm::{CommError, Communicator, Group};
use crate::cpu::kernels::attention::attention_masked;

/// Point-to-point tag of the K/V rotation ("ring" in ASCII, high half). Messages are
/// matched per (sender, tag) in FIFO order, and every member sends its blocks in step
/// order, so one tag serves all steps and all ring attentions of a program.
pub(crate) const RING_TAG: u64 = 0x7269_6e67 << 32;

/// Shapes of one ring attention (per member).
#[derive(Clone, Copy, Debug)]
pub struct RingShape {
    pub batch: usize,
    /// Query rows of this member.
    pub sq: usize,
    /// Key rows of one block (equal on every member).
    pub sk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `out` = attention of this member's queries `q` `[batch, sq, heads * head_dim]` over the
/// keys of every member of `group`; `k`/`v` are this member's block
/// `[batch, sk, heads * head_dim]`, and `key_valid(m)` is the key mask of member `m`'s
/// block (by index in `group`).
///
/// Step `s` computes on the block of member `(me - s) mod P` while it is forwarded to
/// `me + 1` (and the next one received from `me - 1`); P - 1 transfers in all.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention(
    comm: &mut dyn Communicator,
    group: &Group,
    me: usize,
    shape: RingShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: impl Fn(usize) -> Vec<bool>,
    out: &mut [f32],
) -> Result<(), CommError> {
    let RingShape {
        batch,
        sq,
        sk,
        heads,
        head_dim,
        scale,
    } = shape;
    let p = group.size();
    let blk = batch * sk * heads * head_dim;
    let (next_rank, prev_rank) = (group.ranks[(me + 1) % p], group.ranks[(me + p - 1) % p]);

    // K and V travel together in one buffer: one message per step instead of two.
    let mut cur = Vec::with_capacity(2 * blk);
    cur.extend_from_slice(&k[..blk]);
    cur.extend_from_slice(&v[..blk]);
    let mut next = vec![0.0f32; if p > 1 { 2 * blk } else { 0 }];

    let mut lse = vec![f32::NEG_INFINITY; batch * heads * sq];
    let mut out_b = vec![0.0f32; batch * sq * heads * head_dim];
    let mut lse_b = vec![0.0f32; lse.len()];
    for step in 0..p {
        // The transfer is issued before the compute on the current block, the order that
        // lets a backend with asynchronous sends overlap the two.
        if step + 1 < p {
            comm.sendrecv(next_rank, &cur, prev_rank, &mut next, RING_TAG)?;
        }
        let owner = (me + p - step) % p;
        let mask = key_valid(owner);
        let (kb, vb) = cur.split_at(blk);
        // An all-padding block contributes nothing and is not computed at all; an
        // all-valid one skips the masking pass.
        if mask.iter().any(|&ok| ok) {
            let mask_arg = (!mask.iter().all(|&ok| ok)).then_some(mask.as_slice());
            // The first block writes the accumulators directly.
            let (o, l) = if step == 0 {
                (&mut *out, &mut lse[..])
            } else {
                (&mut out_b[..], &mut lse_b[..])
            };
            attention_masked(
                q,
                kb,
                vb,
                batch,
                sq,
                sk,
                heads,
                head_dim,
                scale,
                mask_arg,
                o,
                Some(l),
            );
            if step > 0 {
                merge(out, &mut lse, &out_b, &lse_b, batch, sq, heads, head_dim);
            }
        } else if step == 0 {
            out.fill(0.0);
        }
        if step + 1 < p {
            std::mem::swap(&mut cur, &mut next);
        }
    }
    Ok(())
}

/// Folds a partial result `(out_b, lse_b)` into the running `(out, lse)`:
/// `out -= sigmoid(lse_b - lse) * (out - out_b)`, `lse -= logsigmoid(lse - lse_b)`,
/// written with `max + log1p(exp(-|d|))` so no `exp` overflows. A `-inf` LSE (no valid
/// key yet / in the block) is the identity: the other side is taken as is.
/// `out`/`out_b` are `[batch, sq, heads * head_dim]`, `lse`/`lse_b` `[batch, heads, sq]`.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    out: &mut [f32],
    lse: &mut [f32],
    out_b: &[f32],
    lse_b: &[f32],
    batch: usize,
    sq: usize,
    heads: usize,
    head_dim: usize,
) {
    let hd = heads * head_dim;
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..sq {
                let li = (b * heads + h) * sq + i;
                let (l, lb) = (lse[li], lse_b[li]);
                if lb == f32::NEG_INFINITY {
                    continue;
                }
                let o = (b * sq + i) * hd + h * head_dim;
                let (dst, src) = (&mut out[o..o + head_dim], &out_b[o..o + head_dim]);
                if l == f32::NEG_INFINITY {
                    dst.copy_from_slice(src);
                    lse[li] = lb;
                    continue;
                }
                let w = sigmoid(lb - l);
                for (x, &y) in dst.iter_mut().zip(src) {
                    *x -= w * (*x - y);
                }
                lse[li] = l.max(lb) + (-(l - lb).abs()).exp().ln_1p();
            }
        }
    }
}

/// Logistic function without overflow for large |x|.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merging the halves of a key set equals attention over the whole set.
    #[test]
    fn merge_of_halves_is_full_attention() {
        let (b, sq, sk, h, d) = (2, 3, 8, 2, 4);
        let gen = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let q = gen(b * sq * h * d, 1);
        let k = gen(b * sk * h * d, 2);
        let v = gen(b * sk * h * d, 3);
        let mut full = vec![0.0; q.len()];
        let mut full_lse = vec![0.0; b * h * sq];
        attention_masked(
            &q,
            &k,
            &v,
            b,
            sq,
            sk,
            h,
            d,
            0.5,
            None,
            &mut full,
            Some(&mut full_lse),
        );
        // Halves as separate key sets: keys [0, 4) and [4, 8) of every batch.
        let half = |x: &[f32], lo: usize| -> Vec<f32> {
            (0..b)
                .flat_map(|bb| x[(bb * sk + lo) * h * d..(bb * sk + lo + sk / 2) * h * d].to_vec())
                .collect()
        };
        let mut acc = vec![0.0; q.len()];
        let mut acc_lse = vec![f32::NEG_INFINITY; full_lse.len()];
        for lo in [0, sk / 2] {
            let (kh, vh) = (half(&k, lo), half(&v, lo));
            let mut o = vec![0.0; q.len()];
            let mut l = vec![0.0; full_lse.len()];
            attention_masked(
                &q,
                &kh,
                &vh,
                b,
                sq,
                sk / 2,
                h,
                d,
                0.5,
                None,
                &mut o,
                Some(&mut l),
            );
            merge(&mut acc, &mut acc_lse, &o, &l, b, sq, h, d);
        }
        for (x, y) in acc.iter().zip(&full) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        for (x, y) in acc_lse.iter().zip(&full_lse) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
