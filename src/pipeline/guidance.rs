//! Classifier-free guidance and the learned-sigma split, as the diffusers pipelines do them.
//!
//! With guidance the transformer runs on a batch of 2B: the B unconditional samples (negative
//! prompt, or DiT's null class) first, then the B conditional ones, and the prediction is
//! `uncond + g * (cond - uncond)` in f32, one operation at a time like the PyTorch tensor ops
//! (no fused multiply-add). Learned-sigma models (DiT, PixArt: `out_channels` = 2 x latent
//! channels) predict [epsilon; variance] along the channel axis; only epsilon is kept. Since
//! channels come right after the batch axis, a sample's epsilon is a contiguous prefix of it.

use super::PipelineError;
use crate::HostTensor;

/// How the transformer's output becomes the noise prediction the scheduler steps with.
#[derive(Clone, Copy, Debug)]
pub struct Guidance {
    /// Samples B (the transformer's batch is 2B with CFG).
    pub samples: usize,
    /// `Some(g)`: classifier-free guidance with scale g over a [negative, positive] batch.
    pub cfg_scale: Option<f32>,
    /// Elements of one sample's prediction to keep (all, or the epsilon half).
    pub keep_per_sample: usize,
    /// Elements of one sample of the transformer's output (2x `keep_per_sample` for
    /// learned sigma).
    pub out_per_sample: usize,
}

impl Guidance {
    /// The noise prediction for the B samples, flattened, `keep_per_sample` values each.
    pub fn apply(&self, out: &HostTensor) -> Result<Vec<f32>, PipelineError> {
        let rows = if self.cfg_scale.is_some() {
            2 * self.samples
        } else {
            self.samples
        };
        let per_sample = self.out_per_sample;
        if out.shape.first() != Some(&rows)
            || per_sample * rows != out.data.len()
            || self.keep_per_sample > per_sample
        {
            return Err(PipelineError::Internal(format!(
                "transformer output has shape {:?}; expected a batch of {rows} with {per_sample} values each",
                out.shape
            )));
        }
        let keep = self.keep_per_sample;
        let mut eps = Vec::with_capacity(self.samples * keep);
        for b in 0..self.samples {
            let cond_start = match self.cfg_scale {
                Some(_) => (self.samples + b) * per_sample,
                None => b * per_sample,
            };
            let cond = &out.data[cond_start..cond_start + keep];
            match self.cfg_scale {
                Some(g) => {
                    let uncond = &out.data[b * per_sample..b * per_sample + keep];
                    eps.extend(uncond.iter().zip(cond).map(|(&u, &c)| u + g * (c - u)));
                }
                None => eps.extend_from_slice(cond),
            }
        }
        Ok(eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_negative_first_and_keeps_epsilon() {
        // 2 samples x 2 channels (eps, sigma) x 1 pixel, CFG batch [neg0, neg1, pos0, pos1].
        let out = HostTensor::new(
            vec![4, 2, 1, 1],
            vec![1.0, 9.0, 2.0, 9.0, 3.0, 9.0, 6.0, 9.0],
        );
        let g = Guidance {
            samples: 2,
            cfg_scale: Some(2.0),
            keep_per_sample: 1,
            out_per_sample: 2,
        };
        assert_eq!(
            g.apply(&out).unwrap(),
            vec![1.0 + 2.0 * 2.0, 2.0 + 2.0 * 4.0]
        );
        let g = Guidance {
            samples: 4,
            cfg_scale: None,
            keep_per_sample: 2,
            out_per_sample: 2,
        };
        assert_eq!(g.apply(&out).unwrap(), out.data);
    }
}
