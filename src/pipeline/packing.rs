//! Flux's 2x2 latent packing, as `FluxPipeline._pack_latents` / `_unpack_latents`, and the
//! RoPE position ids of `_prepare_latent_image_ids`.
//!
//! Packing turns latents [B, C, H, W] into tokens [B, (H/2)(W/2), 4C]: token `i * W/2 + j`
//! holds the 2x2 block at rows 2i.., columns 2j.., channel `c * 4 + 2 * py + px` (diffusers'
//! `view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5)`).

use crate::HostTensor;

/// [B, C, H, W] -> [B, (H/2)(W/2), 4C]. H and W must be even (checked by the caller).
pub fn pack(latents: &HostTensor) -> HostTensor {
    let [b, c, h, w] = dims4(&latents.shape);
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; latents.data.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h2 * 2 {
                for x in 0..w2 * 2 {
                    let src = ((bi * c + ci) * h + y) * w + x;
                    let token = (y / 2) * w2 + x / 2;
                    let ch = ci * 4 + (y % 2) * 2 + x % 2;
                    out[(bi * h2 * w2 + token) * c * 4 + ch] = latents.data[src];
                }
            }
        }
    }
    HostTensor::new(vec![b, h2 * w2, c * 4], out)
}

/// [B, h2 * w2, 4C] -> [B, C, 2 h2, 2 w2], the inverse of [`pack`].
pub fn unpack(packed: &HostTensor, h2: usize, w2: usize) -> HostTensor {
    let (b, c4) = (packed.shape[0], packed.shape[2]);
    let c = c4 / 4;
    let (h, w) = (h2 * 2, w2 * 2);
    let mut out = vec![0f32; packed.data.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let token = (y / 2) * w2 + x / 2;
                    let ch = ci * 4 + (y % 2) * 2 + x % 2;
                    out[((bi * c + ci) * h + y) * w + x] =
                        packed.data[(bi * h2 * w2 + token) * c4 + ch];
                }
            }
        }
    }
    HostTensor::new(vec![b, c, h, w], out)
}

/// `_prepare_latent_image_ids(h2, w2)`: [h2 * w2, 3] rows of (0, row, column).
pub fn latent_image_ids(h2: usize, w2: usize) -> HostTensor {
    let mut data = Vec::with_capacity(h2 * w2 * 3);
    for i in 0..h2 {
        for j in 0..w2 {
            data.extend_from_slice(&[0.0, i as f32, j as f32]);
        }
    }
    HostTensor::new(vec![h2 * w2, 3], data)
}

/// `text_ids = torch.zeros(T, 3)`: text tokens all sit at position (0, 0, 0).
pub fn text_ids(text_len: usize) -> HostTensor {
    HostTensor::new(vec![text_len, 3], vec![0.0; text_len * 3])
}

fn dims4(shape: &[usize]) -> [usize; 4] {
    match shape {
        &[b, c, h, w] => [b, c, h, w],
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_follows_diffusers_channel_order_and_unpack_inverts_it() {
        // One channel, 2x4 image: token 0 = rows 0-1 x cols 0-1, token 1 = cols 2-3.
        let x = HostTensor::new(vec![1, 1, 2, 4], (0..8).map(|v| v as f32).collect());
        let p = pack(&x);
        assert_eq!(p.shape, vec![1, 2, 4]);
        assert_eq!(p.data, vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        let x = HostTensor::new(vec![2, 3, 4, 6], (0..144).map(|v| v as f32).collect());
        assert_eq!(unpack(&pack(&x), 2, 3), x);
    }

    #[test]
    fn image_ids_are_row_and_column() {
        let ids = latent_image_ids(2, 3);
        assert_eq!(ids.shape, vec![6, 3]);
        assert_eq!(&ids.data[9..12], &[0.0, 1.0, 0.0]);
        assert_eq!(&ids.data[15..18], &[0.0, 1.0, 2.0]);
    }
}
