//! Flags of the residual control family: ControlNet and T2I-Adapter (both repeatable, combinable).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use crate::control::Control;
use crate::control::residual::condition_tensor;
use crate::control::residual::controlnet::{ControlNetControl, ControlNetSettings, load_controlnet};
use crate::control::residual::t2i_adapter::{T2IAdapterControl, load_t2i_adapter};
use crate::io::image::load_rgb;
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::preprocess::{PreprocessKind, apply};
use candle_core::Tensor;

/// ControlNet and T2I-Adapter flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct ResidualArgs {
    /// A ControlNet (diffusers folder). Repeat for several; their residuals are summed.
    #[arg(long, value_name = "PATH")]
    controlnet: Vec<PathBuf>,
    /// The condition image of each --controlnet, in the same order (resized to the output size).
    #[arg(long, value_name = "PNG")]
    control_image: Vec<PathBuf>,
    /// Residual weight: one value for all ControlNets, or one per --controlnet.
    #[arg(long, value_name = "F")]
    control_scale: Vec<f64>,
    /// Fraction of the steps before a ControlNet starts acting (one value or one per ControlNet).
    #[arg(long, value_name = "F")]
    control_start: Vec<f64>,
    /// Fraction of the steps after which a ControlNet stops (one value or one per ControlNet).
    #[arg(long, value_name = "F")]
    control_end: Vec<f64>,
    /// Make each control image with a preprocessor first (canny, canny-rgb, sobel, grayscale,
    /// invert, scribble, keypoints, ...; see `diffctl preprocess`): once for all or once per ControlNet.
    #[arg(long, value_name = "KIND")]
    control_preprocess: Vec<String>,
    /// Guess mode: ControlNets see only the conditional half, residuals weighted from 0.1 to 1 by depth.
    #[arg(long)]
    control_guess_mode: bool,
    /// A T2I-Adapter (diffusers folder). Repeat for several; their features are summed.
    #[arg(long, value_name = "PATH")]
    t2i_adapter: Vec<PathBuf>,
    /// The condition image of each --t2i-adapter, in the same order.
    #[arg(long, value_name = "PNG")]
    adapter_image: Vec<PathBuf>,
    /// Feature weight: one value for all adapters, or one per --t2i-adapter.
    #[arg(long, value_name = "F")]
    adapter_scale: Vec<f64>,
    /// Make each adapter image with a preprocessor first: once for all or once per adapter.
    #[arg(long, value_name = "KIND")]
    adapter_preprocess: Vec<String>,
    /// Fraction of the steps (from the start) during which adapters act (one value or one per adapter).
    #[arg(long, value_name = "F")]
    adapter_factor: Vec<f64>,
}

/// The value for each of `count` items from a flag given once (for all) or once per item.
fn per_item<T: Clone>(flag: &str, values: &[T], count: usize, default: T) -> anyhow::Result<Vec<T>> {
    match values.len() {
        0 => Ok(vec![default; count]),
        1 => Ok(vec![values[0].clone(); count]),
        n if n == count => Ok(values.to_vec()),
        n => bail!("--{flag} was given {n} times for {count} models (give it once, or once per model)"),
    }
}

fn check_pairs(models: &[PathBuf], images: &[PathBuf], model_flag: &str, image_flag: &str) -> anyhow::Result<()> {
    if models.len() != images.len() {
        bail!(
            "{} --{model_flag} but {} --{image_flag}: give one image per model, in the same order",
            models.len(),
            images.len()
        );
    }
    Ok(())
}

/// Parses preprocessor names (checked before any model is loaded).
fn parse_kinds(flag: &str, kinds: &[String]) -> anyhow::Result<Vec<Option<PreprocessKind>>> {
    kinds.iter().map(|k| Ok(Some(k.parse().with_context(|| format!("--{flag} {k}"))?))).collect()
}

/// Loads a condition image, runs the preprocessor if any, and fits it to the output size.
fn condition_image(
    path: &Path,
    preprocess: Option<&PreprocessKind>,
    width: usize,
    height: usize,
    options: &LoadOptions,
) -> anyhow::Result<Tensor> {
    let mut img = load_rgb(path)?;
    if let Some(kind) = preprocess {
        img = apply(kind, &img).with_context(|| format!("preprocessing {}", path.display()))?;
    }
    Ok(condition_tensor(&img, width, height, &options.device)?)
}

fn label(path: &Path) -> String {
    path.display().to_string()
}

impl ResidualArgs {
    /// Loads every ControlNet and T2I-Adapter with its image for a `width`x`height` generation.
    pub fn build(
        &self,
        model: &StableDiffusion,
        options: &LoadOptions,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Vec<Box<dyn Control>>> {
        check_pairs(&self.controlnet, &self.control_image, "controlnet", "control-image")?;
        check_pairs(&self.t2i_adapter, &self.adapter_image, "t2i-adapter", "adapter-image")?;
        let n = self.controlnet.len();
        let scales = per_item("control-scale", &self.control_scale, n, 1.0)?;
        let starts = per_item("control-start", &self.control_start, n, 0.0)?;
        let ends = per_item("control-end", &self.control_end, n, 1.0)?;
        let preprocess =
            per_item("control-preprocess", &parse_kinds("control-preprocess", &self.control_preprocess)?, n, None)?;
        let mut controls: Vec<Box<dyn Control>> = Vec::new();
        for (i, (path, image)) in self.controlnet.iter().zip(&self.control_image).enumerate() {
            let net = load_controlnet(path, options, Some(model.unet.config()))
                .with_context(|| format!("loading ControlNet {}", path.display()))?;
            let image = condition_image(image, preprocess[i].as_ref(), width, height, options)?;
            let settings = ControlNetSettings {
                scale: scales[i],
                start: starts[i],
                end: ends[i],
                guess_mode: self.control_guess_mode,
            };
            controls.push(Box::new(ControlNetControl::new(label(path), Arc::new(net), image, settings)?));
        }
        let n = self.t2i_adapter.len();
        let scales = per_item("adapter-scale", &self.adapter_scale, n, 1.0)?;
        let factors = per_item("adapter-factor", &self.adapter_factor, n, 1.0)?;
        let preprocess =
            per_item("adapter-preprocess", &parse_kinds("adapter-preprocess", &self.adapter_preprocess)?, n, None)?;
        for (i, (path, image)) in self.t2i_adapter.iter().zip(&self.adapter_image).enumerate() {
            let stages = model.unet.config().blocks.len();
            let adapter = load_t2i_adapter(path, options, stages, model.vae_scale_factor())
                .with_context(|| format!("loading T2I-Adapter {}", path.display()))?;
            adapter.config().check_fits(model.unet.config(), &label(path))?;
            let image = condition_image(image, preprocess[i].as_ref(), width, height, options)?;
            controls.push(Box::new(T2IAdapterControl::new(label(path), &adapter, &image, scales[i], factors[i])?));
        }
        Ok(controls)
    }
}
