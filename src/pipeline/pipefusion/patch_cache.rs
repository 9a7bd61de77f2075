//! Step caching on PipeFusion's patches: the decision on stage 0 (per patch, or for the
//! whole image in a warmup step) and the cached residuals on the last stage.
//!
//! The rules are those of [`super::super::cache`] (TeaCache: accumulate the rescaled
//! relative change of block 0's modulated input, skip while under the threshold, always
//! compute the first and last steps; First-Block-Cache: skip the later blocks while block
//! 0's residual changes less than the threshold since the last computed step), applied to
//! each patch's rows with each patch's own state: patches reach stage 0 one at a time, and
//! a patch decided on cannot wait for the others. A warmup step decides once for the whole
//! image and sets every patch's state alike, which is what the serial run does.
//!
//! The front's outputs are gathered over the stage's ranks, so every rank of stage 0
//! decides alike without a collective.

use std::collections::BTreeMap;

use super::super::cache::{
    carried, continued, l1_sums, prefixed, ratio, sub_all, CachePolicy, TeaCacheRescale, FIRST_IN,
};
use super::super::PipelineError;
use super::rows::{Geometry, RowsOf, Unit};
use crate::HostTensor;

/// The decision state of stage 0.
pub(super) struct Decider {
    policy: CachePolicy,
    rescale: TeaCacheRescale,
    /// TeaCache: the front output holding block 0's modulated input.
    modulated: Option<String>,
    patches: usize,
    /// TeaCache: the modulated input as last seen, per patch rows (full size).
    previous: Option<HostTensor>,
    seen: Vec<bool>,
    accumulated: Vec<f64>,
    /// First-Block-Cache: block 0's residual at each patch's last computed step.
    first_residual: Option<Vec<HostTensor>>,
    /// Whether the last stage holds a residual for each patch (it was computed once).
    computed_once: Vec<bool>,
    /// Per step, per patch: computed, and the number compared with the threshold.
    pub(super) log: Vec<Vec<(bool, Option<f64>)>>,
}

impl Decider {
    pub(super) fn new(
        policy: CachePolicy,
        rescale: Option<TeaCacheRescale>,
        modulated: Option<String>,
        patches: usize,
    ) -> Decider {
        Decider {
            policy,
            rescale: rescale.unwrap_or_else(TeaCacheRescale::identity),
            modulated,
            patches,
            previous: None,
            seen: vec![false; patches],
            accumulated: vec![0.0; patches],
            first_residual: None,
            computed_once: vec![false; patches],
            log: Vec::new(),
        }
    }

    /// The patches a unit covers.
    fn covered(&self, unit: Unit) -> Vec<usize> {
        match unit.patch {
            Some(i) => vec![i],
            None => (0..self.patches).collect(),
        }
    }

    /// Whether to compute the block stack for `unit` at `step` of `num_steps`, from the
    /// front's outputs; logs the decision.
    pub(super) fn decide(
        &mut self,
        step: usize,
        num_steps: usize,
        unit: Unit,
        front: &BTreeMap<String, HostTensor>,
        geo: &Geometry,
    ) -> Result<bool, PipelineError> {
        let covered = self.covered(unit);
        let ready = covered.iter().all(|&i| self.computed_once[i]);
        let (compute, indicator) = match self.policy {
            CachePolicy::None => (true, None),
            CachePolicy::TeaCache { threshold } => {
                let name = self.modulated.as_deref().unwrap_or_default();
                let m = front.get(name).ok_or_else(|| {
                    PipelineError::Internal(format!("the PipeFusion front gave no `{name}`"))
                })?;
                let rows = geo.unit_rows(&m.shape, 1, unit);
                let seen = covered.iter().all(|&i| self.seen[i]);
                let prev = self.previous.get_or_insert_with(|| {
                    HostTensor::new(m.shape.clone(), vec![0.0; m.data.len()])
                });
                let (mut num, mut den) = (0.0, 0.0);
                for &(o, n) in &rows {
                    let (a, b) = l1_sums(&m.data[o..o + n], &prev.data[o..o + n]);
                    num += a;
                    den += b;
                }
                for &(o, n) in &rows {
                    prev.data[o..o + n].copy_from_slice(&m.data[o..o + n]);
                }
                let acc = self.accumulated[covered[0]];
                let last = step + 1 == num_steps;
                let (compute, acc, ind) = if seen && ready && step > 0 && !last {
                    let a = acc + self.rescale.eval(ratio(num, den));
                    if a < threshold {
                        (false, a, Some(a))
                    } else {
                        (true, 0.0, Some(a))
                    }
                } else {
                    (true, 0.0, None)
                };
                for &i in &covered {
                    self.accumulated[i] = acc;
                    self.seen[i] = true;
                }
                (compute, ind)
            }
            CachePolicy::FirstBlock { threshold } => {
                let first_in = prefixed(front, FIRST_IN);
                let first_out = carried(front);
                let r1 = sub_all(&first_out, &continued(&first_in, &first_out)?);
                let diff = match (&self.first_residual, ready) {
                    (Some(prev), true) => {
                        let (mut num, mut den) = (0.0, 0.0);
                        for (a, b) in r1.iter().zip(prev) {
                            for &(o, n) in &geo.unit_rows(&a.shape, 1, unit) {
                                let (x, y) = l1_sums(&a.data[o..o + n], &b.data[o..o + n]);
                                num += x;
                                den += y;
                            }
                        }
                        Some(ratio(num, den))
                    }
                    _ => None,
                };
                let compute = !diff.is_some_and(|d| d < threshold);
                if compute {
                    let prev = self.first_residual.get_or_insert_with(|| {
                        r1.iter()
                            .map(|t| HostTensor::new(t.shape.clone(), vec![0.0; t.data.len()]))
                            .collect()
                    });
                    for (a, b) in r1.iter().zip(prev.iter_mut()) {
                        for &(o, n) in &geo.unit_rows(&a.shape, 1, unit) {
                            b.data[o..o + n].copy_from_slice(&a.data[o..o + n]);
                        }
                    }
                }
                (compute, diff)
            }
        };
        if compute {
            for &i in &covered {
                self.computed_once[i] = true;
            }
        }
        if self.log.len() <= step {
            self.log
                .resize_with(step + 1, || vec![(true, None); self.patches]);
        }
        for &i in &covered {
            self.log[step][i] = (compute, indicator);
        }
        Ok(compute)
    }
}

/// The last stage's residuals: per stream, what the skipped blocks added to their input
/// the last time each patch was computed (this rank's rows only).
#[derive(Default)]
pub(super) struct Residuals {
    streams: Option<Vec<HostTensor>>,
}

impl Residuals {
    /// After computing `unit`: residual = stack output - the base it continues.
    pub(super) fn store(
        &mut self,
        base: &[HostTensor],
        out: &[HostTensor],
        rows_of: RowsOf,
    ) -> Result<(), PipelineError> {
        let base = continued(base, out)?;
        let res = self.streams.get_or_insert_with(|| {
            out.iter()
                .map(|t| HostTensor::new(t.shape.clone(), vec![0.0; t.data.len()]))
                .collect()
        });
        for ((r, o), b) in res.iter_mut().zip(out).zip(&base) {
            for (off, n) in rows_of(&o.shape) {
                for k in off..off + n {
                    r.data[k] = o.data[k] - b.data[k];
                }
            }
        }
        Ok(())
    }

    /// For a skipped `unit`: the stack output estimated as base + residual (this rank's
    /// rows; the others are left as zeros, which its programs do not read).
    pub(super) fn apply(
        &self,
        base: &[HostTensor],
        rows_of: RowsOf,
    ) -> Result<Vec<HostTensor>, PipelineError> {
        let res = self.streams.as_ref().ok_or_else(|| {
            PipelineError::Internal("a patch was skipped before it was ever computed".into())
        })?;
        let base = continued(base, res)?;
        Ok(res
            .iter()
            .zip(&base)
            .map(|(r, b)| {
                let mut t = HostTensor::new(r.shape.clone(), vec![0.0; r.data.len()]);
                for (off, n) in rows_of(&r.shape) {
                    for k in off..off + n {
                        t.data[k] = b.data[k] + r.data[k];
                    }
                }
                t
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ditto_ir::mesh::Mesh;

    fn geo() -> Geometry {
        Geometry {
            mesh: Mesh::default(),
            patches: 2,
            rank: 0,
        }
    }

    fn front(name: &str, values: &[f32]) -> BTreeMap<String, HostTensor> {
        BTreeMap::from([(
            name.to_string(),
            HostTensor::new(vec![1, values.len(), 1], values.to_vec()),
        )])
    }

    #[test]
    fn teacache_decides_per_patch_on_its_own_rows() {
        let identity = TeaCacheRescale::identity();
        let mut d = Decider::new(
            CachePolicy::TeaCache { threshold: 0.5 },
            Some(identity),
            Some("m".into()),
            2,
        );
        let g = geo();
        // Step 0 (warmup, whole image): always computed.
        assert!(d
            .decide(0, 4, Unit::whole(), &front("m", &[1., 1., 1., 1.]), &g)
            .unwrap());
        // Step 1: patch 0's rows barely change (0.1 < 0.5), patch 1's double (1.0).
        let x = front("m", &[1.1, 1.1, 2., 2.]);
        assert!(!d.decide(1, 4, Unit::patch(0), &x, &g).unwrap());
        assert!(d.decide(1, 4, Unit::patch(1), &x, &g).unwrap());
        // Step 2: patch 0 accumulates (0.1 + 0.45 >= 0.5): computed, its sum restarts;
        // patch 1 is unchanged: skipped.
        let y = front("m", &[1.6, 1.6, 2., 2.]);
        assert!(d.decide(2, 4, Unit::patch(0), &y, &g).unwrap());
        assert!(!d.decide(2, 4, Unit::patch(1), &y, &g).unwrap());
        // The last step always computes.
        assert!(d.decide(3, 4, Unit::patch(1), &y, &g).unwrap());
        let (skipped, sum) = d.log[1][0];
        assert!(
            !skipped && (sum.unwrap() - 0.1).abs() < 1e-6,
            "{:?}",
            d.log[1]
        );
        assert_eq!(d.log[1][1], (true, Some(1.0)));
        assert!(!d.log[2][1].0);
    }

    #[test]
    fn first_block_cache_compares_each_patch_with_its_last_computed_residual() {
        let mut d = Decider::new(CachePolicy::FirstBlock { threshold: 0.2 }, None, None, 2);
        let g = geo();
        // Block 0's input (first_in) and output (carry): residual = out - in.
        let run = |d: &mut Decider, step: usize, unit: Unit, residual: [f32; 4]| {
            let mut f = front(&format!("{FIRST_IN}0"), &[1., 1., 1., 1.]);
            let out: Vec<f32> = residual.iter().map(|r| 1.0 + r).collect();
            f.insert("carry.0".into(), HostTensor::new(vec![1, 4, 1], out));
            d.decide(step, 5, unit, &f, &g).unwrap()
        };
        assert!(run(&mut d, 0, Unit::whole(), [1., 1., 1., 1.]));
        // Patch 0's residual moves 10%, patch 1's 50%.
        assert!(!run(&mut d, 1, Unit::patch(0), [1.1, 1.1, 1.5, 1.5]));
        assert!(run(&mut d, 1, Unit::patch(1), [1.1, 1.1, 1.5, 1.5]));
        // Patch 0 is compared with step 0's residual (its last computed), patch 1 with
        // step 1's.
        assert!(run(&mut d, 2, Unit::patch(0), [1.3, 1.3, 1.5, 1.5]));
        assert!(!run(&mut d, 2, Unit::patch(1), [1.3, 1.3, 1.5, 1.5]));
    }
}
