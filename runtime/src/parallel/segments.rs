//! Segment arithmetic of split sequences: which rows a mesh member holds, and which of
//! them are padding.
//!
//! A split axis is a concatenation of segments (say image tokens, then text tokens).
//! Segment `i` is padded to `parts * local_i` rows and cut into `parts` equal pieces, so
//! member `m` holds global rows `[m * local_i, (m + 1) * local_i)` of it, and those
//! `>= valid_i` are padding. Locally, a member's rows are its pieces of every segment, in
//! segment order.

use ditto_codegen::Segment;

/// Sum of `local` over the segments: the rows each member holds.
pub fn local_rows(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.local).sum()
}

/// Sum of `valid` over the segments: the rows of the unsplit axis.
pub fn valid_rows(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.valid).sum()
}

/// How many of segment `seg`'s rows held by `member` are real (not padding).
pub fn member_valid(seg: &Segment, member: usize) -> usize {
    seg.valid.saturating_sub(member * seg.local).min(seg.local)
}

/// Validity of each of `member`'s local rows (length [`local_rows`]): `false` marks
/// padding. This is the key mask of attention over split keys.
pub fn member_mask(segments: &[Segment], member: usize) -> Vec<bool> {
    let mut mask = Vec::with_capacity(local_rows(segments));
    for seg in segments {
        let n = member_valid(seg, member);
        mask.extend((0..seg.local).map(|o| o < n));
    }
    mask
}

/// Checks that `segments` can be split over `parts` members: every segment fits in its
/// padded length. (A segment with more padding than one piece is allowed: some members
/// then hold nothing real of it, e.g. 2 text tokens over 4 ranks.)
pub fn check(segments: &[Segment], parts: usize) -> Result<(), String> {
    if parts == 0 {
        return Err("split into 0 parts".into());
    }
    for (i, s) in segments.iter().enumerate() {
        if s.valid > parts * s.local {
            return Err(format!(
                "segment {i} has {} valid rows, more than {parts} parts x {} local rows",
                s.valid, s.local
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_of_padded_segments() {
        // Image 10 over 4 members (local 3, 2 rows of padding), text 3 (local 1, 1 pad).
        let segs = [
            Segment {
                local: 3,
                valid: 10,
            },
            Segment { local: 1, valid: 3 },
        ];
        assert_eq!(local_rows(&segs), 4);
        assert_eq!(valid_rows(&segs), 13);
        assert_eq!(member_mask(&segs, 0), [true, true, true, true]);
        assert_eq!(member_mask(&segs, 2), [true, true, true, true]);
        assert_eq!(member_mask(&segs, 3), [true, false, false, false]);
        assert!(check(&segs, 4).is_ok());
        assert!(check(&segs, 3).is_err());
    }
}
