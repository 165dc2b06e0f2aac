//! Region masks for image prompts (diffusers' `IPAdapterMaskProcessor`): a binary mask at the output
//! image's size, downsampled to each attention layer's query grid.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::io::image::load_rgb;
use crate::{Error, Result};

/// A binary region mask [H, W] at the size of the generated image (1 inside the region).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionMask {
    height: usize,
    width: usize,
    values: Vec<f32>,
}

impl RegionMask {
    /// A mask from values in [0, 1], row-major [height, width], binarised at 0.5 as diffusers does.
    pub fn from_values(height: usize, width: usize, values: &[f32]) -> Result<Self> {
        if height == 0 || width == 0 || values.len() != height * width {
            return Err(Error::invalid(format!(
                "a {height}x{width} mask needs {} values, got {}",
                height * width,
                values.len()
            )));
        }
        let values = values.iter().map(|&v| if v >= 0.5 { 1.0 } else { 0.0 }).collect();
        Ok(Self { height, width, values })
    }

    /// Reads a mask image: converted to grayscale with Pillow's luma weights (`convert("L")`) and
    /// binarised at 0.5 (white = inside), like `IPAdapterMaskProcessor.preprocess` on an image that
    /// already has the output size.
    pub fn load(path: &Path) -> Result<Self> {
        let img = load_rgb(path)?;
        let values: Vec<f32> = img
            .pixels()
            .map(|p| {
                let [r, g, b] = p.0.map(u32::from);
                let luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
                luma as f32 / 255.0
            })
            .collect();
        Self::from_values(img.height() as usize, img.width() as usize, &values)
    }

    /// `(height, width)`.
    pub fn size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// The weight of each of a layer's `queries` positions, [1, queries, 1]: the mask resized with
    /// PyTorch's bicubic interpolation to the grid diffusers derives from the query count and the
    /// mask's aspect ratio, flattened, then zero-padded or cut to `queries`
    /// (`IPAdapterMaskProcessor.downsample`).
    pub fn downsample(&self, queries: usize, device: &Device) -> Result<Tensor> {
        let ratio = self.width as f64 / self.height as f64;
        let mut mask_h = ((queries as f64 / ratio).sqrt() as usize).max(1);
        mask_h += usize::from(!queries.is_multiple_of(mask_h));
        let mask_w = (queries / mask_h).max(1);
        let mut values = bicubic(&self.values, self.height, self.width, mask_h, mask_w);
        values.resize(queries, 0.0);
        Ok(Tensor::from_vec(values, (1, queries, 1), device)?)
    }
}

/// PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` of one [h, w] plane to
/// [out_h, out_w] (cubic convolution with A = -0.75, borders clamped), row-major.
fn bicubic(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    // For each output index: the four clamped source indices and their weights.
    let taps = |in_size: usize, out_size: usize| -> Vec<([usize; 4], [f32; 4])> {
        let scale = in_size as f32 / out_size as f32;
        (0..out_size)
            .map(|i| {
                let real = scale * (i as f32 + 0.5) - 0.5;
                let base = real.floor();
                let t = real - base;
                let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
                let index = |k: isize| (base as isize - 1 + k).clamp(0, in_size as isize - 1) as usize;
                ([index(0), index(1), index(2), index(3)], weights)
            })
            .collect()
    };
    let (rows, cols) = (taps(h, out_h), taps(w, out_w));
    let mut out = Vec::with_capacity(out_h * out_w);
    for (ys, wy) in &rows {
        for (xs, wx) in &cols {
            let mut acc = 0f32;
            for (&y, &ky) in ys.iter().zip(wy) {
                let row: f32 = xs.iter().zip(wx).map(|(&x, &kx)| src[y * w + x] * kx).sum();
                acc += row * ky;
            }
            out.push(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_keeps_constant_planes_and_same_size_is_identity() {
        let ones = vec![1f32; 6 * 8];
        assert!(bicubic(&ones, 6, 8, 3, 5).iter().all(|v| (v - 1.0).abs() < 1e-6));
        let ramp: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(bicubic(&ramp, 3, 4, 3, 4), ramp);
    }

    #[test]
    fn downsample_follows_diffusers_grid_and_padding() {
        let mask = RegionMask::from_values(2, 4, &[1.0; 8]).unwrap();
        // 10 queries, ratio 2: mask_h = int(sqrt(5)) = 2, 10 % 2 == 0 → 2x5 = 10.
        let t = mask.downsample(10, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 10, 1]);
        // 9 queries: mask_h = int(sqrt(4.5)) = 2, 9 % 2 != 0 → 3, mask_w = 3.
        let t = mask.downsample(9, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t.len(), 9);
        // 11 queries: 2 + 1 = 3 rows of 3 = 9 values, then two zeros of padding.
        let t = mask.downsample(11, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&t[9..], &[0.0, 0.0]);
    }
}
