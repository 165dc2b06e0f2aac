//! Images in and out: decoded VAE output to PNG files, and input images read within limits.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use image::{ImageDecoder, ImageEncoder};

use super::input::{MAX_IMAGE_FILE_BYTES, format_bytes, open_regular, too_large};
use super::output::OutputFiles;
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

/// Writes `img` as a PNG, all or nothing (see [`super::output`]).
pub fn save_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let mut outputs = OutputFiles::new();
    stage_png(&mut outputs, path, img)?;
    outputs.commit()
}

/// Stages `img` as the PNG `path` in `outputs`, written when they are committed.
pub fn stage_png(outputs: &mut OutputFiles, path: &Path, img: &image::RgbImage) -> Result<()> {
    outputs.stage(path, |file| {
        let fail = |e: &dyn std::fmt::Display| Error::Format {
            path: path.into(),
            message: format!("could not write PNG: {e}"),
        };
        let mut w = std::io::BufWriter::new(file);
        image::codecs::png::PngEncoder::new(&mut w)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .map_err(|e| fail(&e))?;
        std::io::Write::flush(&mut w).map_err(|e| fail(&e))
    })
}

/// Images wider or taller than this are refused before decoding.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most memory decoding one image may allocate.
pub const MAX_IMAGE_ALLOC: u64 = 1 << 30;

/// Reads an image file as 8-bit RGB (any alpha is dropped), naming the file in errors. Only a
/// regular file of at most [`MAX_IMAGE_FILE_BYTES`] is read, and an image declaring more than
/// [`MAX_IMAGE_SIDE`] pixels a side or needing more than [`MAX_IMAGE_ALLOC`] to decode is refused
/// before anything is allocated for it.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let format_err = |message: String| Error::Format { path: path.into(), message };
    let (file, len) = open_regular(path)?;
    if len > MAX_IMAGE_FILE_BYTES {
        return Err(too_large(path, len, MAX_IMAGE_FILE_BYTES));
    }
    let mut reader =
        image::ImageReader::new(std::io::BufReader::new(file)).with_guessed_format().map_err(|e| Error::io(path, e))?;
    // The sides are checked here, below, to name them in the error; the decoder's own allocations
    // are capped from the start.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits.clone());
    let not_readable = |e: image::ImageError| match e {
        image::ImageError::Limits(e) => format_err(format!(
            "image too large to decode ({e}); images may have at most {MAX_IMAGE_SIDE} pixels a side and need at \
             most {} decoded",
            format_bytes(MAX_IMAGE_ALLOC)
        )),
        e => format_err(format!("not a readable image: {e}")),
    };
    let mut decoder = reader.into_decoder().map_err(not_readable)?;
    let (w, h) = decoder.dimensions();
    let bytes = decoder.total_bytes();
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || bytes > MAX_IMAGE_ALLOC {
        return Err(format_err(format!(
            "image declares {w}x{h} pixels ({} decoded); images may have at most {MAX_IMAGE_SIDE} pixels a side \
             and need at most {} decoded",
            format_bytes(bytes),
            format_bytes(MAX_IMAGE_ALLOC)
        )));
    }
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    decoder.set_limits(limits).map_err(not_readable)?;
    let img = image::DynamicImage::from_decoder(decoder).map_err(not_readable)?;
    Ok(img.to_rgb8())
}

/// An RGB image as a [1, 3, H, W] f32 tensor with values in [0, 1].
pub fn rgb_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}
