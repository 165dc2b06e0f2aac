//! Fitting a control image to the generation size as diffusers' `VaeImageProcessor` does for PIL
//! inputs, with Pillow's Lanczos resampling ([`pil_resize`]): straight to the size
//! (`resize_mode="default"`) or covering it and center-cropped (`resize_mode="crop"`).

use image::RgbImage;

use crate::models::image_processor::{Filter, pil_resize};
use crate::{Error, Result};

/// How an image is fitted to the target size (diffusers' `resize_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// Stretch to exactly width x height (`"default"`, what the ControlNet pipelines use).
    Stretch,
    /// Scale to cover width x height keeping the aspect ratio, then center-crop (`"crop"`).
    Crop,
}

/// Fits `img` to `width` x `height` with `mode`.
pub fn fit(img: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid(format!("cannot resize to {width}x{height}: width and height must be at least 1")));
    }
    match mode {
        ResizeMode::Stretch => Ok(pil_resize(img, width as usize, height as usize, Filter::Lanczos)),
        ResizeMode::Crop => resize_and_crop(img, width, height),
    }
}

/// diffusers' `_resize_and_crop`: scale so the image covers the target (sizes floored as Python's
/// `//`), then paste it centered on a black canvas of the target size.
fn resize_and_crop(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let (iw, ih) = (u64::from(img.width()), u64::from(img.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    let wider = f64::from(width) / f64::from(height) > iw as f64 / ih as f64;
    let (src_w, src_h) = if wider { (w, ih * w / iw) } else { (iw * h / ih, h) };
    if src_w == 0 || src_h == 0 || src_w > u64::from(u16::MAX) || src_h > u64::from(u16::MAX) {
        return Err(Error::invalid(format!(
            "cannot crop a {iw}x{ih} image to {width}x{height}: the scaled image would be {src_w}x{src_h}"
        )));
    }
    let resized = pil_resize(img, src_w as usize, src_h as usize, Filter::Lanczos);
    let (ox, oy) = (w as i64 / 2 - src_w as i64 / 2, h as i64 / 2 - src_h as i64 / 2);
    Ok(RgbImage::from_fn(width, height, |x, y| {
        let (sx, sy) = (i64::from(x) - ox, i64::from(y) - oy);
        if (0..src_w as i64).contains(&sx) && (0..src_h as i64).contains(&sy) {
            *resized.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    }))
}
