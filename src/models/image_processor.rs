//! transformers' `CLIPImageProcessor` (its PIL backend): resize the shortest edge with Pillow's
//! resampling filters, center crop, rescale, normalize with the stored mean and std.
//!
//! The resize reproduces Pillow's 8-bit two-pass convolution (fixed-point coefficients, horizontal
//! pass first, each pass rounded and clipped to 0..=255), so the resized pixels equal Pillow's.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// OpenAI CLIP's normalisation mean (transformers' `OPENAI_CLIP_MEAN`, digits as stored there).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalisation std (transformers' `OPENAI_CLIP_STD`, digits as stored there).
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// A Pillow resampling filter (`PIL.Image.Resampling`, stored as `resample` in configs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Filter {
    /// 1: Lanczos (a = 3).
    Lanczos,
    /// 2: triangle.
    Bilinear,
    /// 3: cubic convolution, a = -0.5.
    Bicubic,
    /// 4: box.
    Box,
    /// 5: Hamming-windowed sinc.
    Hamming,
}

impl Filter {
    /// The filter stored as `resample` = `code`.
    pub fn from_pil(code: u64) -> Option<Self> {
        Some(match code {
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        use std::f64::consts::PI;
        let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * PI).sin() / (x * PI) };
        match self {
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output index: the first input index and the fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow rounds with a C cast, which truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> =
                (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) / filterscale)).collect();
            let total: f64 = weights.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 { (-0.5 + w * one) as i64 } else { (0.5 + w * one) as i64 }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass over interleaved RGB `src` of `w` x `h` pixels, along x (`horizontal`) or y, to
/// `out_size` pixels on that axis; rounded and clipped to 8 bits like Pillow's passes.
fn resample_pass(src: &[u8], w: usize, h: usize, out_size: usize, horizontal: bool, filter: Filter) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let (in_size, (ow, oh)) = if horizontal { (w, (out_size, h)) } else { (h, (w, out_size)) };
    let coeffs = coefficients(in_size, out_size, filter);
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let acc = k.iter().enumerate().fold(half, |acc, (i, &kw)| {
                    let (sx, sy) = if horizontal { (start + i, y) } else { (x, start + i) };
                    acc + i64::from(src[(sy * w + sx) * 3 + c]) * kw
                });
                out[(y * ow + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// Resizes an RGB image to `width` x `height` as Pillow 13's `Image.resize(size, filter)` does: two
/// separable passes, each rounded to 8 bits, the horizontal one first unless the height shrinks by more
/// than twice as many pixels as the width does (Pillow PR 9549; fitted on 6771 sizes, 3 filters).
pub fn pil_resize(img: &image::RgbImage, width: usize, height: usize, filter: Filter) -> image::RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let vertical_first = height < h0 && (h0 - height) as i64 > 2 * (w0 as i64 - width as i64);
    let mut data = img.as_raw().clone();
    let (mut w, mut h) = (w0, h0);
    for horizontal in if vertical_first { [false, true] } else { [true, false] } {
        let (current, target) = if horizontal { (w, width) } else { (h, height) };
        if current != target {
            data = resample_pass(&data, w, h, target, horizontal, filter);
            if horizontal { w = target } else { h = target }
        }
    }
    image::RgbImage::from_raw(w as u32, h as u32, data).expect("buffer sized from the dimensions")
}

/// A `size` or `crop_size` entry: a number or a dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeEntry {
    Square(usize),
    ShortestEdge { shortest_edge: usize },
    Exact { height: usize, width: usize },
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default = "dtrue")]
    do_resize: bool,
    #[serde(default)]
    size: Option<SizeEntry>,
    #[serde(default)]
    resample: Option<u64>,
    #[serde(default = "dtrue")]
    do_center_crop: bool,
    #[serde(default)]
    crop_size: Option<SizeEntry>,
    #[serde(default = "dtrue")]
    do_rescale: bool,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default = "dtrue")]
    do_normalize: bool,
    #[serde(default)]
    image_mean: Option<Vec<f32>>,
    #[serde(default)]
    image_std: Option<Vec<f32>>,
}

fn dtrue() -> bool {
    true
}

/// How the image is resized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// The shorter side becomes this many pixels, keeping the aspect ratio.
    ShortestEdge(usize),
    /// Exactly `(height, width)`.
    Exact(usize, usize),
}

/// The preprocessing of a `preprocessor_config.json` (`CLIPImageProcessor`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// Resize target and filter (none when `do_resize` is false).
    pub resize: Option<(Resize, Filter)>,
    /// Center crop `(height, width)`, zero-padded when the image is smaller.
    pub crop: Option<(usize, usize)>,
    /// Factor from 8-bit values (usually 1/255).
    pub rescale: Option<f64>,
    /// Per-channel mean and std.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ClipImageProcessor {
    /// `CLIPImageProcessor(size=image_size, crop_size=image_size)`: what diffusers builds when an
    /// image encoder comes without a preprocessor config.
    pub fn for_image_size(image_size: usize) -> Self {
        Self {
            resize: Some((Resize::ShortestEdge(image_size), Filter::Bicubic)),
            crop: Some((image_size, image_size)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// Reads a `preprocessor_config.json`; fields it lacks take `CLIPImageProcessor`'s defaults.
    pub fn load(path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::io::read_json(path)?;
        let filter = match raw.resample {
            None => Filter::Bicubic,
            Some(code) => Filter::from_pil(code).ok_or_else(|| {
                Error::config(path, format!("unsupported `resample` {code} (supported: 1, 2, 3, 4, 5)"))
            })?,
        };
        let resize = raw.do_resize.then(|| {
            let target = match raw.size {
                None => Resize::ShortestEdge(224),
                Some(SizeEntry::Square(s) | SizeEntry::ShortestEdge { shortest_edge: s }) => Resize::ShortestEdge(s),
                Some(SizeEntry::Exact { height, width }) => Resize::Exact(height, width),
            };
            (target, filter)
        });
        let crop = raw.do_center_crop.then_some(match raw.crop_size {
            None => (224, 224),
            Some(SizeEntry::Square(s) | SizeEntry::ShortestEdge { shortest_edge: s }) => (s, s),
            Some(SizeEntry::Exact { height, width }) => (height, width),
        });
        let channels = |v: Option<Vec<f32>>, default: [f32; 3], field: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) => <[f32; 3]>::try_from(v.as_slice())
                    .map_err(|_| Error::config(path, format!("`{field}` has {} values, expected 3", v.len()))),
            }
        };
        let normalize = if raw.do_normalize {
            Some((channels(raw.image_mean, CLIP_MEAN, "image_mean")?, channels(raw.image_std, CLIP_STD, "image_std")?))
        } else {
            None
        };
        let rescale = raw.do_rescale.then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0));
        let processor = Self { resize, crop, rescale, normalize };
        if let Some((Resize::ShortestEdge(0) | Resize::Exact(0, _) | Resize::Exact(_, 0), _)) = processor.resize {
            return Err(Error::config(path, "`size` must be positive"));
        }
        if matches!(processor.crop, Some((0, _) | (_, 0))) {
            return Err(Error::config(path, "`crop_size` must be positive"));
        }
        Ok(processor)
    }

    /// The `(height, width)` of what [`Self::preprocess`] returns for an image of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let resized = self.resize.map_or((height, width), |(target, _)| resized_size(target, height, width));
        self.crop.unwrap_or(resized)
    }

    /// `pixel_values` [1, 3, H, W] (f32) of an RGB image.
    pub fn preprocess(&self, img: &image::RgbImage, device: &Device) -> Result<Tensor> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::invalid("cannot preprocess an empty image"));
        }
        let img = match self.resize {
            Some((target, filter)) => {
                let (h, w) = resized_size(target, img.height() as usize, img.width() as usize);
                if (h, w) == (img.height() as usize, img.width() as usize) {
                    img.clone()
                } else {
                    pil_resize(img, w.max(1), h.max(1), filter)
                }
            }
            None => img.clone(),
        };
        let (h0, w0) = (img.height() as usize, img.width() as usize);
        let (h, w) = self.crop.unwrap_or((h0, w0));
        // transformers crops at ((H - h) / 2, (W - w) / 2) and pads a smaller image with zeros, centred
        // at (ceil((h - H) / 2), ceil((w - W) / 2)).
        let offset = |from: usize, to: usize| -> isize {
            if from >= to { ((from - to) / 2) as isize } else { -((to - from).div_ceil(2) as isize) }
        };
        let (top, left) = (offset(h0, h), offset(w0, w));
        let mut values = vec![0f32; 3 * h * w];
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = (y as isize + top, x as isize + left);
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < h0 && (sx as usize) < w0;
                for c in 0..3 {
                    let v = if inside { img.get_pixel(sx as u32, sy as u32)[c] } else { 0 };
                    // transformers rescales in f64, then casts to f32 before normalising in f32.
                    let mut v = match self.rescale {
                        Some(s) => (f64::from(v) * s) as f32,
                        None => f32::from(v),
                    };
                    if let Some((mean, std)) = &self.normalize {
                        v = (v - mean[c]) / std[c];
                    }
                    values[(c * h + y) * w + x] = v;
                }
            }
        }
        Ok(Tensor::from_vec(values, (1, 3, h, w), device)?)
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: `(height, width)`.
fn resized_size(target: Resize, height: usize, width: usize) -> (usize, usize) {
    match target {
        Resize::Exact(h, w) => (h, w),
        Resize::ShortestEdge(s) => {
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            let new_long = (s as f64 * long as f64 / short as f64) as usize;
            if width <= height { (new_long, s) } else { (s, new_long) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_identity_and_coefficients_sum_to_one() {
        let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([(x * 40) as u8, (y * 60) as u8, 7]));
        assert_eq!(pil_resize(&img, 5, 4, Filter::Bicubic), img);
        for filter in [Filter::Bicubic, Filter::Bilinear, Filter::Lanczos, Filter::Box, Filter::Hamming] {
            for (_, k) in coefficients(17, 5, filter) {
                let sum: i64 = k.iter().sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{filter:?}");
            }
        }
    }

    #[test]
    fn shortest_edge_keeps_aspect_ratio_truncating() {
        assert_eq!(resized_size(Resize::ShortestEdge(32), 48, 64), (32, 42));
        assert_eq!(resized_size(Resize::ShortestEdge(32), 100, 30), (106, 32));
    }
}
