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

/// Reads an image file as 8-bit RGB (any alpha is dropped), naming the file in errors.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    if path.is_dir() {
        return Err(Error::invalid(format!("{}: is a directory, expected an image file", path.display())));
    }
    let reader = image::ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| Error::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| Error::Format { path: path.into(), message: format!("not a readable image: {e}") })?;
    Ok(img.to_rgb8())
}

/// An RGB image as a [1, 3, H, W] f32 tensor with values in [0, 1].
pub fn rgb_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}
