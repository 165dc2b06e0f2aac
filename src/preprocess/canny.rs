//! Canny edges as OpenCV's `cv2.Canny(img, low, high)` computes them (aperture 3, L1 gradient):
//! 3x3 Sobel with replicated borders, non-maximum suppression with OpenCV's fixed-point
//! 22.5°/67.5° sector test and tie rules, and hysteresis over 8-connected neighbours.

use image::{GrayImage, RgbImage};

use super::gray::luma;
use super::gray_to_rgb;

/// The largest L1 gradient magnitude |dx| + |dy| of a 3x3 Sobel on 8-bit data (4·255 + 4·255).
pub const MAX_THRESHOLD: u16 = 2040;

/// Canny edges of the luma (`cv2.Canny(cv2.cvtColor(img, COLOR_RGB2GRAY), low, high)`): white edges
/// on black, 3 channels. Thresholds are on |dx| + |dy|; callers check `low <= high <= MAX_THRESHOLD`.
pub fn canny(img: &RgbImage, low: u16, high: u16) -> RgbImage {
    gray_to_rgb(&edges(&[luma(img)], low, high))
}

/// Canny edges of the colour image itself, as the ControlNet canny annotator calls
/// `cv2.Canny(rgb, low, high)`: at each pixel OpenCV keeps the channel with the largest gradient.
pub fn canny_rgb(img: &RgbImage, low: u16, high: u16) -> RgbImage {
    let planes: Vec<GrayImage> = (0..3)
        .map(|c| GrayImage::from_fn(img.width(), img.height(), |x, y| image::Luma([img.get_pixel(x, y)[c]])))
        .collect();
    gray_to_rgb(&edges(&planes, low, high))
}

/// 3x3 Sobel derivatives (dx, dy) of one plane with OpenCV's BORDER_REPLICATE, row-major [H*W].
fn sobel_replicate(plane: &GrayImage) -> (Vec<i32>, Vec<i32>) {
    let (w, h) = (plane.width() as i64, plane.height() as i64);
    let at = |x: i64, y: i64| i32::from(plane.get_pixel(x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32).0[0]);
    let mut dx = Vec::with_capacity((w * h) as usize);
    let mut dy = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let col = |x| at(x, y - 1) + 2 * at(x, y) + at(x, y + 1);
            let row = |y| at(x - 1, y) + 2 * at(x, y) + at(x + 1, y);
            dx.push(col(x + 1) - col(x - 1));
            dy.push(row(y + 1) - row(y - 1));
        }
    }
    (dx, dy)
}

/// Canny on one or more planes of equal size (OpenCV's multi-channel rule: per pixel, the first
/// channel with the largest |dx| + |dy|). Returns 255 on edges, 0 elsewhere.
fn edges(planes: &[GrayImage], low: u16, high: u16) -> GrayImage {
    let (w, h) = (planes[0].width() as usize, planes[0].height() as usize);
    let (mut dx, mut dy) = sobel_replicate(&planes[0]);
    let mut mag: Vec<i32> = dx.iter().zip(&dy).map(|(a, b)| a.abs() + b.abs()).collect();
    for plane in &planes[1..] {
        let (cx, cy) = sobel_replicate(plane);
        for i in 0..w * h {
            let m = cx[i].abs() + cy[i].abs();
            if m > mag[i] {
                (mag[i], dx[i], dy[i]) = (m, cx[i], cy[i]);
            }
        }
    }
    // Magnitudes with a one-pixel zero border, as OpenCV's ring buffer sees them.
    let stride = w + 2;
    let mut padded = vec![0i32; stride * (h + 2)];
    for y in 0..h {
        padded[(y + 1) * stride + 1..(y + 1) * stride + 1 + w].copy_from_slice(&mag[y * w..(y + 1) * w]);
    }
    // Map over the padded grid: 0 = may be an edge, 1 = cannot be, 2 = is an edge.
    const TG22: i32 = 13573; // tan(22.5°) in 15-bit fixed point, rounded
    let (low, high) = (i32::from(low), i32::from(high));
    let mut map = vec![1u8; stride * (h + 2)];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let j = (y + 1) * stride + x + 1;
            let m = padded[j];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x], dy[y * w + x]);
            let ax = xs.abs();
            let ay = ys.abs() << 15;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > padded[j - 1] && m >= padded[j + 1]
            } else if ay > tg22x + (ax << 16) {
                m > padded[j - stride] && m >= padded[j + stride]
            } else if (xs ^ ys) < 0 {
                m > padded[j - stride + 1] && m > padded[j + stride - 1]
            } else {
                m > padded[j - stride - 1] && m > padded[j + stride + 1]
            };
            if is_max {
                map[j] = 0;
                if m > high {
                    map[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    while let Some(j) = stack.pop() {
        for n in [j - stride - 1, j - stride, j - stride + 1, j - 1, j + 1, j + stride - 1, j + stride, j + stride + 1]
        {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
    GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([if map[(y as usize + 1) * stride + x as usize + 1] == 2 { 255 } else { 0 }])
    })
}
