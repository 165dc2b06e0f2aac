//! Images in and out: decoded VAE output to PNG files.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Converts images in [0, 1] ([B, 3, H, W]) to 8-bit RGB, rounding as diffusers' `numpy_to_pil`.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("expected 3-channel images, got {c} channels")));
    }
    let pixels = (images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.clamp(0f32, 1f32)? * 255.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    (0..b)
        .map(|i| {
            let data: Vec<u8> = pixels.get(i)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v as u8).collect();
            image::RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| Error::invalid("image buffer has the wrong size"))
        })
        .collect()
}

/// Writes `img` as a PNG atomically.
pub fn save_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    super::write_atomic(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Format { path: path.into(), message: format!("could not write PNG: {e}") })
    })
}
