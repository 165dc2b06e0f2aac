//! The 5-point face keypoint map InstantID conditions its IdentityNet on (`draw_kps` in InstantID's
//! pipeline): limbs from each point to the nose as filled ellipses (half-length × 4 px, rotated to
//! the limb, whole degrees) at 60 % intensity, then a filled circle of radius 10 on every point.
//!
//! JSON format: `{"width": W, "height": H, "kps": [[x, y], ... 5 points]}` in pixels, points in
//! InsightFace order (left eye, right eye, nose, left and right mouth corner); `width`/`height` are
//! optional when an image gives the size.

use std::path::Path;

use image::RgbImage;
use serde_json::Value;

use super::draw::{ellipse_poly, fill_circle, fill_convex_poly};
use crate::{Error, Result};

/// InstantID's point colours (RGB), one per keypoint; a limb takes the colour of its outer point.
pub const COLORS: [[u8; 3]; 5] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]];
/// Limbs as (outer point, nose) pairs, drawn in this order.
const LIMBS: [(usize, usize); 4] = [(0, 2), (1, 2), (3, 2), (4, 2)];
/// Half-width of a limb ellipse in pixels (InstantID's `stickwidth`).
const STICK_WIDTH: i32 = 4;
/// Radius of the point circles.
const POINT_RADIUS: i32 = 10;
/// Coordinates beyond this magnitude are rejected (OpenCV's fixed-point drawing would overflow).
const MAX_COORD: f64 = 1e6;

/// Five face keypoints and, when the file gives it, the canvas size they refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceKeypoints {
    /// Canvas size (width, height) from the JSON, if present.
    pub size: Option<(u32, u32)>,
    /// The points as (x, y) pixel coordinates.
    pub points: [[f64; 2]; 5],
}

/// The largest canvas side a keypoints file may ask for (8192² RGB is 200 MB).
pub const MAX_CANVAS: u64 = 8192;

/// Reads a keypoints JSON file, naming the offending field in errors.
pub fn load(path: &Path) -> Result<FaceKeypoints> {
    let value: Value = crate::io::read_json(path)?;
    parse(&value).map_err(|message| Error::config(path, message))
}

fn parse(value: &Value) -> std::result::Result<FaceKeypoints, String> {
    let obj = value.as_object().ok_or("expected a JSON object with `kps` (and optional `width`, `height`)")?;
    if let Some(key) = obj.keys().find(|k| !["width", "height", "kps"].contains(&k.as_str())) {
        return Err(format!("unknown field `{key}` (expected `width`, `height`, `kps`)"));
    }
    let dim = |key: &str| -> std::result::Result<Option<u32>, String> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n @ 1..=MAX_CANVAS) => Ok(Some(n as u32)),
                _ => Err(format!("`{key}`: expected a whole number of pixels in 1..={MAX_CANVAS}, found {v}")),
            },
        }
    };
    let size = match (dim("width")?, dim("height")?) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        _ => return Err("give both `width` and `height`, or neither".into()),
    };
    let kps = obj.get("kps").ok_or("missing field `kps` (5 [x, y] points)")?;
    let list = kps.as_array().ok_or_else(|| format!("`kps`: expected a list of 5 [x, y] points, found {kps}"))?;
    if list.len() != 5 {
        return Err(format!("`kps`: expected 5 [x, y] points, found {}", list.len()));
    }
    let mut points = [[0.0; 2]; 5];
    for (i, (point, item)) in points.iter_mut().zip(list).enumerate() {
        let xy = item.as_array().filter(|a| a.len() == 2);
        let xy = xy.ok_or_else(|| format!("`kps[{i}]`: expected [x, y], found {item}"))?;
        for (c, (out, v)) in point.iter_mut().zip(xy).enumerate() {
            *out = v.as_f64().filter(|f| f.abs() <= MAX_COORD).ok_or_else(|| {
                format!("`kps[{i}][{c}]`: expected a number of pixels within ±{MAX_COORD}, found {v}")
            })?;
        }
    }
    Ok(FaceKeypoints { size, points })
}

/// Draws the keypoint map on a black `width` x `height` canvas exactly as InstantID's `draw_kps`
/// (OpenCV rasterisation, truncating conversions where Python's `int()` truncates).
pub fn draw(width: u32, height: u32, points: &[[f64; 2]; 5]) -> RgbImage {
    let mut canvas = RgbImage::new(width, height);
    for &(a, b) in &LIMBS {
        let (p, q) = (points[a], points[b]);
        let (dx, dy) = (p[0] - q[0], p[1] - q[1]);
        let length = (dx * dx + dy * dy).sqrt();
        let angle = dy.atan2(dx).to_degrees();
        let center = (((p[0] + q[0]) / 2.0) as i32, ((p[1] + q[1]) / 2.0) as i32);
        let polygon = ellipse_poly(center, ((length / 2.0) as i32, STICK_WIDTH), angle as i32, (0, 360), 1);
        fill_convex_poly(&mut canvas, &polygon, COLORS[a]);
    }
    // `(out_img * 0.6).astype(np.uint8)`: every drawn channel is 0 or 255, and 255 * 0.6 == 153.
    canvas.pixels_mut().for_each(|p| p.0 = p.0.map(|v| (f64::from(v) * 0.6) as u8));
    for (point, color) in points.iter().zip(COLORS) {
        fill_circle(&mut canvas, (point[0] as i32, point[1] as i32), POINT_RADIUS, color);
    }
    canvas
}
