//! Data-movement kernels: permute, concat, slice.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;

/// Copies below this many elements stay on the calling thread: they are
/// memory-bound and too short to amortize a fork/join.
const PAR_MIN_COPY: usize = 4 * PAR_MIN_ELEMS;
/// Edge of the square tiles used when the innermost output axis is strided in
/// the input: 32×32 floats keeps both the read and write side in L1.
const TILE: usize = 32;

/// Contiguous row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `out = x.permute(perm).contiguous()` for `x` of shape `shape`: output axis
/// `i` is input axis `perm[i]`, so `out` has shape `shape[perm[i]]`. Any rank.
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize], out: &mut [f32]) {
    debug_assert_eq!(shape.len(), perm.len());
    debug_assert!({
        let mut seen = vec![false; perm.len()];
        perm.iter()
            .all(|&p| p < perm.len() && !std::mem::replace(&mut seen[p], true))
    });
    let total: usize = shape.iter().product();
    debug_assert!(x.len() >= total && out.len() >= total);
    if total == 0 {
        return;
    }
    let out = &mut out[..total];
    let in_strides = strides(shape);

    // (size, input stride) per output axis, in output order. Size-1 axes are
    // dropped, and neighbours that are also neighbours in the input are merged,
    // so e.g. [B,S,H,D]→[B,H,S,D] becomes a 3-D problem with runs of D.
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(perm.len());
    for &p in perm {
        let (size, stride) = (shape[p], in_strides[p]);
        if size == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == stride * size => *last = (last.0 * size, stride),
            _ => dims.push((size, stride)),
        }
    }
    if dims.len() <= 1 {
        // Identity up to unit axes: the merged single axis has stride 1.
        out.copy_from_slice(&x[..total]);
        return;
    }

    let threads = rayon::current_num_threads();
    let par = total >= PAR_MIN_COPY && threads > 1;
    let r = dims.len();
    let (na, sa) = dims[r - 1];
    if sa == 1 || !dims[..r - 1].iter().any(|d| d.1 == 1) {
        // Work is a sequence of innermost output rows ("units"), so it splits
        // evenly at any unit boundary regardless of how small the outer axes are.
        if par {
            let per_task = (PAR_MIN_ELEMS / na).max(1);
            out.par_chunks_mut(na * per_task)
                .enumerate()
                .for_each(|(t, o)| copy_units(x, &dims, t * per_task, o));
        } else {
            copy_units(x, &dims, 0, out);
        }
    } else if par {
        // Tiles span several outer rows, so split along the outermost axis
        // only, in groups of whole indices.
        let (d0, s0) = dims[0];
        let os0 = total / d0;
        let group = d0
            .div_ceil(4 * threads)
            .max(PAR_MIN_ELEMS.div_ceil(os0))
            .min(d0);
        out.par_chunks_mut(group * os0)
            .enumerate()
            .for_each(|(t, o)| {
                let mut sub = dims.clone();
                sub[0].0 = o.len() / os0;
                transpose_tiled(x, t * group * s0, &sub, o);
            });
    } else {
        transpose_tiled(x, 0, &dims, out);
    }
}

/// Advances the multi-index `idx` over axes `(size, stride)` by one, keeping
/// `off` equal to Σ idx·stride.
#[inline]
fn advance(idx: &mut [usize], dims: &[(usize, usize)], off: &mut usize) {
    for d in (0..idx.len()).rev() {
        let (size, stride) = dims[d];
        idx[d] += 1;
        *off += stride;
        if idx[d] < size {
            return;
        }
        *off -= stride * size;
        idx[d] = 0;
    }
}

/// Writes output rows `first..first + out.len()/na` of the permutation
/// described by `dims` ((size, input stride) per output axis, output order),
/// one innermost row at a time: a run copy when that axis is contiguous in the
/// input, a strided gather otherwise.
fn copy_units(x: &[f32], dims: &[(usize, usize)], first: usize, out: &mut [f32]) {
    let r = dims.len();
    let (na, sa) = dims[r - 1];
    let outer = &dims[..r - 1];
    let mut idx = vec![0; r - 1];
    let mut off = 0;
    let mut rem = first;
    for d in (0..r - 1).rev() {
        idx[d] = rem % outer[d].0;
        off += idx[d] * outer[d].1;
        rem /= outer[d].0;
    }
    for o in out.chunks_exact_mut(na) {
        if sa == 1 {
            o.copy_from_slice(&x[off..off + na]);
        } else {
            for (d, s) in o.iter_mut().zip(x[off..].iter().step_by(sa)) {
                *d = *s;
            }
        }
        advance(&mut idx, outer, &mut off);
    }
}

/// Permutation whose innermost output axis `a` is strided in the input while
/// another axis `b` is contiguous there: a transpose between `a` and `b`, done
/// in tiles so reads and writes both stay cache-friendly. The remaining axes
/// are iterated outside the tiles. The input starts at `base`.
fn transpose_tiled(x: &[f32], base: usize, dims: &[(usize, usize)], out: &mut [f32]) {
    let r = dims.len();
    let (na, sa) = dims[r - 1];
    let Some(jb) = dims[..r - 1].iter().position(|d| d.1 == 1) else {
        return copy_units(x, dims, 0, out);
    };
    let ostr = strides(&dims.iter().map(|d| d.0).collect::<Vec<_>>());
    let (nb, ob) = (dims[jb].0, ostr[jb]);
    // (size, input stride, output stride) of the axes outside the tiles.
    let rest: Vec<(usize, usize, usize)> = (0..r - 1)
        .filter(|&i| i != jb)
        .map(|i| (dims[i].0, dims[i].1, ostr[i]))
        .collect();
    let outer: usize = rest.iter().map(|d| d.0).product();
    let mut idx = vec![0; rest.len()];
    let (mut ioff, mut ooff) = (base, 0);
    for _ in 0..outer {
        for b0 in (0..nb).step_by(TILE) {
            let b1 = (b0 + TILE).min(nb);
            for a0 in (0..na).step_by(TILE) {
                let a1 = (a0 + TILE).min(na);
                for ib in b0..b1 {
                    let o = &mut out[ooff + ib * ob + a0..ooff + ib * ob + a1];
                    let src = x[ioff + ib + a0 * sa..].iter().step_by(sa);
                    for (d, s) in o.iter_mut().zip(src) {
                        *d = *s;
                    }
                }
            }
        }
        for d in (0..rest.len()).rev() {
            let (size, is, os) = rest[d];
            idx[d] += 1;
            ioff += is;
            ooff += os;
            if idx[d] < size {
                break;
            }
            ioff -= is * size;
            ooff -= os * size;
            idx[d] = 0;
        }
    }
}

/// Concatenates `inputs` (each `(data, shape)`) along `axis`; all shapes must
/// agree except on `axis`. `out` has the common shape with the summed axis.
pub fn concat(inputs: &[(&[f32], &[usize])], axis: usize, out: &mut [f32]) {
    let Some(&(_, shape0)) = inputs.first() else {
        return;
    };
    debug_assert!(inputs.iter().all(|(_, s)| {
        s.len() == shape0.len()
            && s.iter()
                .zip(shape0)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b)
    }));
    let outer: usize = shape0[..axis].iter().product();
    // Per input: elements contributed to each outer row.
    let blocks: Vec<usize> = inputs
        .iter()
        .map(|(_, s)| s[axis..].iter().product())
        .collect();
    let row: usize = blocks.iter().sum();
    debug_assert!(inputs
        .iter()
        .zip(&blocks)
        .all(|((d, _), &b)| d.len() >= outer * b));
    debug_assert!(out.len() >= outer * row);
    if outer == 0 || row == 0 {
        return;
    }
    let fill = |o: usize, dst: &mut [f32]| {
        let mut at = 0;
        for ((data, _), &b) in inputs.iter().zip(&blocks) {
            dst[at..at + b].copy_from_slice(&data[o * b..(o + 1) * b]);
            at += b;
        }
    };
    let out = &mut out[..outer * row];
    if outer > 1 && out.len() >= PAR_MIN_COPY && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(row)
            .enumerate()
            .with_min_len((PAR_MIN_ELEMS / row).max(1))
            .for_each(|(o, d)| fill(o, d));
    } else {
        for (o, d) in out.chunks_exact_mut(row).enumerate() {
            fill(o, d);
        }
    }
}

/// `out = x[.., start..end, ..]` along `axis` for `x` of shape `shape`.
pub fn slice(x: &[f32], shape: &[usize], axis: usize, start: usize, end: usize, out: &mut [f32]) {
    debug_assert!(axis < shape.len() && start <= end && end <= shape[axis]);
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let in_row = shape[axis] * inner;
    let out_row = end.saturating_sub(start) * inner;
    debug_assert!(x.len() >= outer * in_row && out.len() >= outer * out_row);
    if outer == 0 || out_row == 0 {
        return;
    }
    let out = &mut out[..outer * out_row];
    let fill = |o: usize, dst: &mut [f32]| {
        let from = o * in_row + start * inner;
        dst.copy_from_slice(&x[from..from + out_row]);
    };
    if outer > 1 && out.len() >= PAR_MIN_COPY && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(out_row)
            .enumerate()
            .with_min_len((PAR_MIN_ELEMS / out_row).max(1))
            .for_each(|(o, d)| fill(o, d));
    } else {
        for (o, d) in out.chunks_exact_mut(out_row).enumerate() {
            fill(o, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, f64s, Rng};

    /// Element-by-element permute via explicit multi-indices.
    fn naive_permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f64> {
        let st = strides(shape);
        let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let total: usize = shape.iter().product();
        let mut out = vec![0.0f64; total];
        for (flat, o) in out.iter_mut().enumerate() {
            let mut rem = flat;
            let mut off = 0;
            for i in (0..oshape.len()).rev() {
                off += (rem % oshape[i]) * st[perm[i]];
                rem /= oshape[i];
            }
            *o = x[off] as f64;
        }
        out
    }

    #[test]
    fn permute_matches_reference() {
        let mut rng = Rng::new(31);
        let cases: &[(&[usize], &[usize])] = &[
            (&[5], &[0]),
            (&[3, 4], &[1, 0]),
            (&[3, 4], &[0, 1]),
            (&[2, 5, 3, 4], &[0, 2, 1, 3]), // [B,S,H,D] → [B,H,S,D]
            (&[2, 3, 4, 5], &[3, 2, 1, 0]), // full reversal
            (&[2, 1, 3, 1, 4], &[4, 3, 0, 1, 2]), // unit axes
            (&[2, 3, 3, 2, 2, 4], &[0, 5, 1, 3, 2, 4]), // unpatchify: nhwpqc → nchpwq
            (&[2, 3, 4, 5, 2, 3, 2], &[6, 1, 4, 0, 2, 5, 3]), // rank 7
            (&[70, 90], &[1, 0]),           // tiled transpose with ragged tiles
            (&[4, 300, 16, 72], &[0, 2, 1, 3]), // parallel run copy
            (&[2, 200, 300], &[0, 2, 1]),   // parallel tiled transpose
            (&[40, 3, 600], &[2, 0, 1]),    // transpose with a middle axis
            (&[3, 0, 4], &[2, 1, 0]),       // empty
        ];
        for &(shape, perm) in cases {
            let total: usize = shape.iter().product();
            let x = rng.vec(total);
            let mut out = vec![f32::NAN; total];
            permute(&x, shape, perm, &mut out);
            assert_close(&out, &naive_permute(&x, shape, perm), 0.0);
        }
    }

    #[test]
    fn random_permutes() {
        let mut rng = Rng::new(32);
        for _ in 0..200 {
            let rank = 1 + rng.below(6);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(5)).collect();
            let mut perm: Vec<usize> = (0..rank).collect();
            for i in (1..rank).rev() {
                perm.swap(i, rng.below(i + 1));
            }
            let total: usize = shape.iter().product();
            let x = rng.vec(total);
            let mut out = vec![f32::NAN; total];
            permute(&x, &shape, &perm, &mut out);
            assert_close(&out, &naive_permute(&x, &shape, &perm), 0.0);
        }
    }

    #[test]
    fn concat_matches_reference() {
        let mut rng = Rng::new(33);
        for &(big, axis) in &[(false, 0usize), (false, 1), (false, 2), (true, 1)] {
            let (a_s, b_s, c_s): ([usize; 3], [usize; 3], [usize; 3]) = if big {
                ([64, 300, 8], [64, 100, 8], [64, 1, 8])
            } else {
                let mut a = [2, 3, 4];
                let mut b = [2, 3, 4];
                let mut c = [2, 3, 4];
                a[axis] = 1;
                b[axis] = 3;
                c[axis] = 2;
                (a, b, c)
            };
            let a = rng.vec(a_s.iter().product());
            let b = rng.vec(b_s.iter().product());
            let c = rng.vec(c_s.iter().product());
            let mut o_s = a_s;
            o_s[axis] = a_s[axis] + b_s[axis] + c_s[axis];
            let mut out = vec![f32::NAN; o_s.iter().product()];
            concat(&[(&a, &a_s), (&b, &b_s), (&c, &c_s)], axis, &mut out);
            let mut want = vec![0.0f64; out.len()];
            for i in 0..o_s[0] {
                for j in 0..o_s[1] {
                    for k in 0..o_s[2] {
                        let mut idx = [i, j, k];
                        let (src, s) = if idx[axis] < a_s[axis] {
                            (&a, a_s)
                        } else if idx[axis] < a_s[axis] + b_s[axis] {
                            idx[axis] -= a_s[axis];
                            (&b, b_s)
                        } else {
                            idx[axis] -= a_s[axis] + b_s[axis];
                            (&c, c_s)
                        };
                        want[(i * o_s[1] + j) * o_s[2] + k] =
                            src[(idx[0] * s[1] + idx[1]) * s[2] + idx[2]] as f64;
                    }
                }
            }
            assert_close(&out, &want, 0.0);
        }
    }

    #[test]
    fn slice_matches_reference() {
        let mut rng = Rng::new(34);
        for &(shape, axis, start, end) in &[
            ([4usize, 5, 6], 0usize, 1usize, 3usize),
            ([4, 5, 6], 1, 0, 5),
            ([4, 5, 6], 2, 2, 5),
            ([4, 5, 6], 2, 3, 3),
            ([64, 400, 9], 1, 100, 350),
        ] {
            let x = rng.vec(shape.iter().product());
            let mut o_s = shape;
            o_s[axis] = end - start;
            let mut out = vec![f32::NAN; o_s.iter().product()];
            slice(&x, &shape, axis, start, end, &mut out);
            let mut want = Vec::new();
            for i in 0..shape[0] {
                for j in 0..shape[1] {
                    for k in 0..shape[2] {
                        let v = [i, j, k][axis];
                        if v >= start && v < end {
                            want.push(x[(i * shape[1] + j) * shape[2] + k]);
                        }
                    }
                }
            }
            assert_close(&out, &f64s(&want), 0.0);
        }
    }
}
