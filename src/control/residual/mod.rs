//! The residual family: networks that turn a condition image into tensors added to the UNet's skip
//! connections and mid block (ControlNet) or inside its down blocks (T2I-Adapter).

pub mod controlnet;
pub mod t2i_adapter;
pub mod uni_controlnet;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::Result;
use crate::io::image::{load_rgb, rgb_to_tensor};
use crate::preprocess::resize::{ResizeMode, fit};

/// Loads a condition image as [1, 3, height, width] in [0, 1], resized when its size differs, as
/// diffusers' control-image processor does.
pub fn load_condition_image(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img = load_rgb(path)?;
    condition_tensor(&img, width, height, device)
}

/// An RGB image as a condition tensor [1, 3, height, width] in [0, 1], resized (Pillow's Lanczos,
/// as diffusers) when its size differs.
pub fn condition_tensor(img: &image::RgbImage, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let resized = fit(img, width as u32, height as u32, ResizeMode::Stretch)?;
    rgb_to_tensor(&resized, device)
}

/// Whether a mechanism active over the fraction [start, end] of the steps runs at step `index` of
/// `count` (diffusers' `controlnet_keep`: off while i/n < start or (i+1)/n > end).
pub fn active_at(index: usize, count: usize, start: f64, end: f64) -> bool {
    let (i, n) = (index as f64, count as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// Checks a [start, end] step fraction.
pub fn check_step_range(name: &str, start: f64, end: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
        return Err(crate::Error::invalid(format!(
            "{name}: start {start} and end {end} must satisfy 0 <= start < end <= 1"
        )));
    }
    Ok(())
}
