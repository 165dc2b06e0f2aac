//! Flags of the residual control family: ControlNet and T2I-Adapter (both repeatable, combinable).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::control::residual::controlnet::{ControlMode, ControlNetSettings};
use crate::preprocess::PreprocessKind;
use crate::request::{ControlNetSpec, Request, T2IAdapterSpec, per_item};

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
    /// How ControlNet residuals weigh against the prompt: balanced; guess (diffusers' guess mode:
    /// the conditional half only, residuals weighted 0.1 to 1 by depth); prompt or controlnet
    /// (sd-webui-controlnet's "My prompt is more important" / "ControlNet is more important":
    /// residual i weighted 0.825^(12-i), controlnet on the conditional half only).
    #[arg(long, default_value = "balanced", value_name = "MODE", value_parser = |s: &str| s.parse::<ControlMode>().map_err(|e| e.to_string()))]
    control_mode: ControlMode,
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

/// Parses preprocessor names.
fn parse_kinds(flag: &str, kinds: &[String]) -> anyhow::Result<Vec<Option<PreprocessKind>>> {
    kinds.iter().map(|k| Ok(Some(k.parse().with_context(|| format!("--{flag} {k}"))?))).collect()
}

impl ResidualArgs {
    /// Adds every ControlNet and T2I-Adapter with its image and settings to `request`.
    pub fn add_to(&self, request: &mut Request) -> anyhow::Result<()> {
        check_pairs(&self.controlnet, &self.control_image, "controlnet", "control-image")?;
        check_pairs(&self.t2i_adapter, &self.adapter_image, "t2i-adapter", "adapter-image")?;
        let n = self.controlnet.len();
        let scales = per_item("--control-scale", &self.control_scale, n, 1.0)?;
        let starts = per_item("--control-start", &self.control_start, n, 0.0)?;
        let ends = per_item("--control-end", &self.control_end, n, 1.0)?;
        let kinds = parse_kinds("control-preprocess", &self.control_preprocess)?;
        let preprocess = per_item("--control-preprocess", &kinds, n, None)?;
        for (i, (path, image)) in self.controlnet.iter().zip(&self.control_image).enumerate() {
            request.controlnets.push(ControlNetSpec {
                path: path.clone(),
                image: image.clone(),
                preprocess: preprocess[i].clone(),
                settings: ControlNetSettings {
                    scale: scales[i],
                    start: starts[i],
                    end: ends[i],
                    mode: self.control_mode,
                },
            });
        }
        let n = self.t2i_adapter.len();
        let scales = per_item("--adapter-scale", &self.adapter_scale, n, 1.0)?;
        let factors = per_item("--adapter-factor", &self.adapter_factor, n, 1.0)?;
        let kinds = parse_kinds("adapter-preprocess", &self.adapter_preprocess)?;
        let preprocess = per_item("--adapter-preprocess", &kinds, n, None)?;
        for (i, (path, image)) in self.t2i_adapter.iter().zip(&self.adapter_image).enumerate() {
            request.t2i_adapters.push(T2IAdapterSpec {
                path: path.clone(),
                image: image.clone(),
                preprocess: preprocess[i].clone(),
                scale: scales[i],
                factor: factors[i],
            });
        }
        Ok(())
    }
}
