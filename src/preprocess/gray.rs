//! Grayscale maps: OpenCV's `cvtColor(COLOR_RGB2GRAY)` luma and the control images built from it.

use image::{GrayImage, RgbImage};

use super::gray_to_rgb;

/// Luma of every pixel exactly as OpenCV's 8-bit `cvtColor(img, COLOR_RGB2GRAY)`:
/// `(9798 R + 19235 G + 3735 B + 2^14) >> 15` (the 0.299/0.587/0.114 weights in 15-bit fixed point).
pub fn luma(img: &RgbImage) -> GrayImage {
    GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0.map(u32::from);
        image::Luma([((9798 * r + 19235 * g + 3735 * b + (1 << 14)) >> 15) as u8])
    })
}

/// The luma as a 3-channel image (gray, gray, gray).
pub fn grayscale(img: &RgbImage) -> RgbImage {
    gray_to_rgb(&luma(img))
}

/// Lineart-like inversion: `255 - luma`, so dark strokes on white become white strokes on black.
pub fn invert(img: &RgbImage) -> RgbImage {
    let mut gray = luma(img);
    gray.pixels_mut().for_each(|p| p.0[0] = 255 - p.0[0]);
    gray_to_rgb(&gray)
}

/// Scribble map: white where `luma > threshold`, black elsewhere.
pub fn scribble(img: &RgbImage, threshold: u8) -> RgbImage {
    let mut gray = luma(img);
    gray.pixels_mut().for_each(|p| p.0[0] = if p.0[0] > threshold { 255 } else { 0 });
    gray_to_rgb(&gray)
}
