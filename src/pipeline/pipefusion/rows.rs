//! Which rows of a tensor a rank works on: a patch's band of token (or latent image) rows,
//! and within it the piece a rank of a stage's CFG x sequence-parallel layout holds.
//!
//! Tensors are row-major; the rows are along one axis (`axis`), and the batch is axis 0.
//! A selection is a list of flat `(offset, len)` ranges, in order, so that the selected
//! values can be packed into one message and unpacked at the same places on the other side.

use std::ops::Range;

use ditto_ir::mesh::Mesh;

/// Flat ranges of `shape` covering batch rows `batch` (axis 0), every index of the axes
/// between, rows `rows` of axis `axis` (> 0), and everything after it.
pub(super) fn ranges(
    shape: &[usize],
    axis: usize,
    batch: Range<usize>,
    rows: Range<usize>,
) -> Vec<(usize, usize)> {
    let middle: usize = shape[1..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(batch.len() * middle);
    for b in batch {
        for mid in 0..middle {
            let plane = (b * middle + mid) * n;
            out.push(((plane + rows.start) * inner, rows.len() * inner));
        }
    }
    out
}

/// Slot `i` of `n` rows cut into `parts` equal slots.
pub(super) fn slot(n: usize, parts: usize, i: usize) -> Range<usize> {
    let per = n / parts;
    i * per..(i + 1) * per
}

/// The values at `ranges`, packed.
pub(super) fn gather(data: &[f32], ranges: &[(usize, usize)]) -> Vec<f32> {
    let mut out = Vec::with_capacity(ranges.iter().map(|r| r.1).sum());
    for &(o, n) in ranges {
        out.extend_from_slice(&data[o..o + n]);
    }
    out
}

/// Unpacks `src` (as [`gather`] packed it) into `data` at `ranges`.
pub(super) fn scatter(data: &mut [f32], ranges: &[(usize, usize)], src: &[f32]) {
    let mut at = 0;
    for &(o, n) in ranges {
        data[o..o + n].copy_from_slice(&src[at..at + n]);
        at += n;
    }
}

/// Which rows of a tensor (by its shape) an exchange touches.
pub(super) type RowsOf<'a> = &'a dyn Fn(&[usize]) -> Vec<(usize, usize)>;

/// Number of values `ranges` select.
pub(super) fn count(ranges: &[(usize, usize)]) -> usize {
    ranges.iter().map(|r| r.1).sum()
}

/// What one run of a stage computes: the whole image (a warmup step) or one patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Unit {
    /// `None`: the whole image.
    pub patch: Option<usize>,
}

impl Unit {
    pub(super) fn whole() -> Unit {
        Unit { patch: None }
    }
    pub(super) fn patch(i: usize) -> Unit {
        Unit { patch: Some(i) }
    }
    /// The index messages of this unit carry (0 for the whole image).
    pub(super) fn index(&self) -> usize {
        self.patch.unwrap_or(0)
    }
}

/// Where one rank of a stage sits: the stage's layout (`cfg x ring x ulysses` ranks), the
/// patches, and the rank's index in the stage.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub mesh: Mesh,
    pub patches: usize,
    pub rank: usize,
}

impl Geometry {
    /// The rows of a unit along `axis`, for every batch row: the patch's band, or all.
    pub(super) fn unit_rows(
        &self,
        shape: &[usize],
        axis: usize,
        unit: Unit,
    ) -> Vec<(usize, usize)> {
        let n = shape[axis];
        let rows = match unit.patch {
            Some(i) => slot(n, self.patches, i),
            None => 0..n,
        };
        ranges(shape, axis, 0..shape[0], rows)
    }

    /// The rows of a token stream (`[batch, tokens, ...]`) this rank's programs compute in
    /// a unit: its CFG half of the batch, and its sequence-parallel piece of the unit's
    /// tokens (the program's `Shard` steps take the same rows).
    pub(super) fn own_rows(&self, shape: &[usize], unit: Unit) -> Vec<(usize, usize)> {
        let (c, r, u) = self.mesh.coords(self.rank);
        let sp = self.mesh.sp();
        let member = r * self.mesh.ulysses + u;
        let (parts, index) = match unit.patch {
            Some(i) => (self.patches * sp, i * sp + member),
            None => (sp, member),
        };
        let half = shape[0] / self.mesh.cfg;
        ranges(
            shape,
            1,
            c * half..(c + 1) * half,
            slot(shape[1], parts, index),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_select_batch_rows_and_bands() {
        // [2, 3, 4, 2]: batch 1, rows 1..3 of axis 2, for each of the 3 channels.
        let r = ranges(&[2, 3, 4, 2], 2, 1..2, 1..3);
        assert_eq!(r, vec![(26, 4), (34, 4), (42, 4)]);
        let data: Vec<f32> = (0..48).map(|x| x as f32).collect();
        let packed = gather(&data, &r);
        assert_eq!(
            packed,
            vec![26., 27., 28., 29., 34., 35., 36., 37., 42., 43., 44., 45.]
        );
        let mut back = vec![0.0; 48];
        scatter(&mut back, &r, &packed);
        assert_eq!(back[26], 26.0);
        assert_eq!(back[25], 0.0);
        assert_eq!(count(&r), 12);
    }

    #[test]
    fn own_rows_are_the_cfg_half_and_the_members_piece_of_the_patch() {
        // CFG pair x ulysses 2, 2 patches: a [4, 8, 1] stream; rank 3 is cfg 1, member 1.
        let g = Geometry {
            mesh: Mesh {
                cfg: 2,
                ring: 1,
                ulysses: 2,
            },
            patches: 2,
            rank: 3,
        };
        // Patch 1, member 1 of 2: tokens 6..8 of batch rows 2..4.
        assert_eq!(
            g.own_rows(&[4, 8, 1], Unit::patch(1)),
            vec![(22, 2), (30, 2)]
        );
        // The whole image: tokens 4..8.
        assert_eq!(
            g.own_rows(&[4, 8, 1], Unit::whole()),
            vec![(20, 4), (28, 4)]
        );
        assert_eq!(
            g.unit_rows(&[4, 8, 1], 1, Unit::patch(0)),
            vec![(0, 4), (8, 4), (16, 4), (24, 4)]
        );
    }
}
