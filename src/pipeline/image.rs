//! Decoded images to 8-bit pixels and PNG files.
//!
//! Pixels follow diffusers' `VaeImageProcessor.postprocess` + `numpy_to_pil`:
//! `(x / 2 + 0.5).clamp(0, 1)` in f32, then `(v * 255).round()` (numpy rounds half to even).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

use super::PipelineError;
use crate::HostTensor;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// One value of a [-1, 1] image as an 8-bit channel.
pub fn to_u8(x: f32) -> u8 {
    let v = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    // NaN fails the clamp's comparisons and stays NaN; `as u8` maps it to 0.
    (v * 255.0).round_ties_even() as u8
}

/// Tiles a batch of images [B, C, H, W] (C = 3, or 1 for grey) into `rows` x `cols` cells in
/// row-major order, each scaled up `upscale` times (nearest neighbour). Cells past B stay
/// black.
pub fn grid(
    images: &HostTensor,
    rows: usize,
    cols: usize,
    upscale: usize,
) -> Result<RgbImage, PipelineError> {
    let &[b, c, h, w] = images.shape.as_slice() else {
        return Err(PipelineError::Request(format!(
            "an image batch must be [B, C, H, W], got {:?}",
            images.shape
        )));
    };
    if c != 3 && c != 1 {
        return Err(PipelineError::Request(format!(
            "cannot write {c}-channel images as PNG (need 3 for RGB or 1 for grey)"
        )));
    }
    if rows * cols < b || upscale == 0 {
        return Err(PipelineError::Request(format!(
            "a {rows}x{cols} grid at upscale {upscale} cannot hold {b} images"
        )));
    }
    let (cell_h, cell_w) = (h * upscale, w * upscale);
    let (width, height) = (cols * cell_w, rows * cell_h);
    let mut pixels = vec![0u8; width * height * 3];
    for n in 0..b {
        let (r, col) = (n / cols, n % cols);
        for y in 0..cell_h {
            for x in 0..cell_w {
                let (sy, sx) = (y / upscale, x / upscale);
                let dst = ((r * cell_h + y) * width + col * cell_w + x) * 3;
                for k in 0..3 {
                    let ch = if c == 1 { 0 } else { k };
                    pixels[dst + k] = to_u8(images.data[((n * c + ch) * h + sy) * w + sx]);
                }
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

/// Writes `img` as an 8-bit RGB PNG.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<(), PipelineError> {
    let io_err = |e: &dyn std::fmt::Display| PipelineError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (w, h) = (
        u32::try_from(img.width).map_err(|e| io_err(&e))?,
        u32::try_from(img.height).map_err(|e| io_err(&e))?,
    );
    let file = File::create(path).map_err(|e| io_err(&e))?;
    let mut out = BufWriter::new(file);
    PngEncoder::new(&mut out)
        .write_image(&img.pixels, w, h, ExtendedColorType::Rgb8)
        .map_err(|e| io_err(&e))?;
    std::io::Write::flush(&mut out).map_err(|e| io_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_conversion_matches_diffusers() {
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(5.0), 255);
        assert_eq!(to_u8(0.0), 128); // 127.5 rounds half to even
        assert_eq!(to_u8(f32::NAN), 0);
    }

    #[test]
    fn grid_places_and_scales_cells() {
        // Two 1x1 RGB images in a 1x2 grid, upscaled 2x.
        let t = HostTensor::new(vec![2, 3, 1, 1], vec![1.0, -1.0, -1.0, -1.0, 1.0, -1.0]);
        let g = grid(&t, 1, 2, 2).unwrap();
        assert_eq!((g.width, g.height), (4, 2));
        assert_eq!(&g.pixels[0..3], &[255, 0, 0]);
        assert_eq!(&g.pixels[(4 + 3) * 3..(4 + 3) * 3 + 3], &[0, 255, 0]);
        assert!(grid(&t, 1, 1, 1).is_err());
        let four = HostTensor::new(vec![1, 4, 1, 1], vec![0.0; 4]);
        assert!(grid(&four, 1, 1, 1).is_err());
    }
}
