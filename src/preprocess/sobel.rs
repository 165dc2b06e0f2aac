//! The high-frequency map AnyDoor feeds its ControlNet (`sobel` in AnyDoor's
//! datasets/data_utils.py), at the image's own resolution and without an object mask.
//!
//! Per channel: `cv2.Sobel` x and y (3x3, BORDER_REFLECT_101), `convertScaleAbs` (|g| saturated to
//! 255), `addWeighted(gx, 0.5, gy, 0.5, 0)` (rounded half to even); then the maximum over the
//! channels, zeroed below `threshold`, and the image itself scaled by that map:
//! `uint8(float32(map) / 255 * float32(image))`. AnyDoor computes this on a 256x256 resize of
//! the masked object and resizes the result back; resize first to reproduce that scale.

use image::RgbImage;

/// AnyDoor's default threshold (`thresh = 50`).
pub const DEFAULT_THRESHOLD: u8 = 50;

/// The high-frequency map of `img`: image detail kept where the Sobel response is at least
/// `threshold`, black elsewhere.
pub fn high_frequency(img: &RgbImage, threshold: u8) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let reflect = |i: i64, n: i64| -> u32 {
        if n == 1 {
            0
        } else if i < 0 {
            -i as u32
        } else if i >= n {
            (2 * n - 2 - i) as u32
        } else {
            i as u32
        }
    };
    let at = |x: i64, y: i64, c: usize| i32::from(img.get_pixel(reflect(x, w), reflect(y, h))[c]);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        let response = (0..3)
            .map(|c| {
                let col = |x| at(x, y - 1, c) + 2 * at(x, y, c) + at(x, y + 1, c);
                let row = |y| at(x - 1, y, c) + 2 * at(x, y, c) + at(x + 1, y, c);
                let gx = (col(x + 1) - col(x - 1)).abs().min(255);
                let gy = (row(y + 1) - row(y - 1)).abs().min(255);
                let sum = gx + gy;
                // (gx + gy) / 2 rounded half to even, as OpenCV rounds addWeighted's float result.
                (sum >> 1) + (sum & 1 & (sum >> 1))
            })
            .max()
            .unwrap_or(0);
        let response = if response < i32::from(threshold) { 0 } else { response };
        let scale = response as f32 / 255.0;
        image::Rgb(img.get_pixel(x as u32, y as u32).0.map(|v| (scale * f32::from(v)) as u8))
    })
}
