//! `Shard` and `AllGather`: moving between a full tensor and one member's rows of a split
//! axis (see [`segments`](super::segments) for the layout).
//!
//! Both view the tensor as `[outer, axis, inner]` (products of the dimensions before and
//! after the split axis), so any axis is handled by the same row copies: a "row" is
//! `inner` contiguous elements.

use ditto_codegen::Segment;

use super::segments;

/// A tensor seen as `[outer, rows, inner]` around its split axis.
#[derive(Clone, Copy, Debug)]
pub struct AxisView {
    pub outer: usize,
    pub inner: usize,
}

impl AxisView {
    pub fn new(shape: &[usize], axis: usize) -> AxisView {
        AxisView {
            outer: shape[..axis].iter().product(),
            inner: shape[axis + 1..].iter().product(),
        }
    }
}

/// Checks the shapes of a split: `full` has `sum(valid)` rows on `axis`, `split` has
/// `sum(local)`, everything else is equal, and the segments fit `parts`.
pub fn check_shapes(
    full: &[usize],
    split: &[usize],
    axis: usize,
    parts: usize,
    segs: &[Segment],
) -> Result<(), String> {
    if full.len() != split.len() {
        return Err(format!(
            "full shape {full:?} and split shape {split:?} differ in rank"
        ));
    }
    if axis >= full.len() {
        return Err(format!("axis {axis} is out of range for shape {full:?}"));
    }
    segments::check(segs, parts)?;
    for (d, (&f, &s)) in full.iter().zip(split).enumerate() {
        let ok = if d == axis {
            f == segments::valid_rows(segs) && s == segments::local_rows(segs)
        } else {
            f == s
        };
        if !ok {
            return Err(format!(
                "full shape {full:?} and split shape {split:?} do not match segments \
                 {segs:?} on axis {axis}"
            ));
        }
    }
    Ok(())
}

/// `out` = member `index`'s rows of `x` (see `Step::Shard`): per segment, rows
/// `[index * local, (index + 1) * local)`, zero past `valid`.
pub fn shard(x: &[f32], view: AxisView, segs: &[Segment], index: usize, out: &mut [f32]) {
    let inner = view.inner;
    let (full_rows, local_rows) = (segments::valid_rows(segs), segments::local_rows(segs));
    for o in 0..view.outer {
        let src = &x[o * full_rows * inner..(o + 1) * full_rows * inner];
        let dst = &mut out[o * local_rows * inner..(o + 1) * local_rows * inner];
        let (mut s0, mut d0) = (0, 0);
        for seg in segs {
            let n = segments::member_valid(seg, index);
            let (real, pad) = dst[d0 * inner..(d0 + seg.local) * inner].split_at_mut(n * inner);
            if n > 0 {
                // (Only then: a member holding nothing of a segment may start past its end.)
                let from = (s0 + index * seg.local) * inner;
                real.copy_from_slice(&src[from..from + n * inner]);
            }
            pad.fill(0.0);
            s0 += seg.valid;
            d0 += seg.local;
        }
    }
}

/// Inverse of [`shard`] over all members: `gathered` is the members' local tensors
/// concatenated in member order (what `all_gather` returns); `out` gets every segment's
/// valid rows back in place, padding dropped.
pub fn assemble(
    gathered: &[f32],
    members: usize,
    view: AxisView,
    segs: &[Segment],
    out: &mut [f32],
) {
    let inner = view.inner;
    let (full_rows, local_rows) = (segments::valid_rows(segs), segments::local_rows(segs));
    let local_len = view.outer * local_rows * inner;
    for o in 0..view.outer {
        let dst = &mut out[o * full_rows * inner..(o + 1) * full_rows * inner];
        for m in 0..members {
            let src = &gathered[m * local_len + o * local_rows * inner..][..local_rows * inner];
            let (mut s0, mut d0) = (0, 0);
            for seg in segs {
                let n = segments::member_valid(seg, m);
                if n > 0 {
                    let to = (d0 + m * seg.local) * inner;
                    dst[to..to + n * inner].copy_from_slice(&src[s0 * inner..(s0 + n) * inner]);
                }
                s0 += seg.local;
                d0 += seg.valid;
            }
        }
    }
}

/// Member `member`'s part of [`assemble`]: its local rows `local` go to their places in
/// `out` (the full tensor), padding dropped; the other members' rows are left as they are.
/// This is a virtual rank's all-gather (`parallel::stale`).
pub fn assemble_member(
    local: &[f32],
    view: AxisView,
    segs: &[Segment],
    member: usize,
    out: &mut [f32],
) {
    let inner = view.inner;
    let (full_rows, local_rows) = (segments::valid_rows(segs), segments::local_rows(segs));
    for o in 0..view.outer {
        let dst = &mut out[o * full_rows * inner..(o + 1) * full_rows * inner];
        let src = &local[o * local_rows * inner..(o + 1) * local_rows * inner];
        let (mut s0, mut d0) = (0, 0);
        for seg in segs {
            let n = segments::member_valid(seg, member);
            if n > 0 {
                let to = (d0 + member * seg.local) * inner;
                dst[to..to + n * inner].copy_from_slice(&src[s0 * inner..(s0 + n) * inner]);
            }
            s0 += seg.local;
            d0 += seg.valid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_assemble_round_trip_middle_axis() {
        // [2, 5 + 3, 2] split in 3: segments (local 2, valid 5), (local 1, valid 3).
        let segs = [
            Segment { local: 2, valid: 5 },
            Segment { local: 1, valid: 3 },
        ];
        let shape = [2, 8, 2];
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let view = AxisView::new(&shape, 1);
        let parts = 3;
        let local_len = 2 * 3 * 2;
        let mut gathered = vec![f32::NAN; parts * local_len];
        for m in 0..parts {
            shard(
                &x,
                view,
                &segs,
                m,
                &mut gathered[m * local_len..][..local_len],
            );
        }
        // Member 2 holds image row 4 and a padding row, then text row 2 (global row 7).
        assert_eq!(
            &gathered[2 * local_len..2 * local_len + 6],
            &[8.0, 9.0, 0.0, 0.0, 14.0, 15.0]
        );
        let mut back = vec![f32::NAN; 32];
        assemble(&gathered, parts, view, &segs, &mut back);
        assert_eq!(back, x);
        // Member by member (a virtual rank's gather) gives the same.
        let mut one_by_one = vec![f32::NAN; 32];
        for m in 0..parts {
            let local = &gathered[m * local_len..][..local_len];
            assemble_member(local, view, &segs, m, &mut one_by_one);
        }
        assert_eq!(one_by_one, x);
    }
}
