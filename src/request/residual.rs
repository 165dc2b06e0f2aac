//! The residual family in a request: ControlNets and T2I-Adapters, each with its condition image
//! (optionally made by a preprocessor first).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::Result;
use crate::control::Control;
use crate::control::residual::condition_tensor;
use crate::control::residual::controlnet::{ControlNetControl, ControlNetSettings, load_controlnet};
use crate::control::residual::t2i_adapter::{T2IAdapterControl, load_t2i_adapter};
use crate::error::ResultExt;
use crate::io::image::load_rgb;
use crate::pipeline::LoadOptions;
use crate::preprocess::{PreprocessKind, apply};

use super::BuildContext;

/// One ControlNet with its condition image.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetSpec {
    /// A diffusers folder or an original ControlNet 1.x file.
    pub path: PathBuf,
    /// The condition image (resized to the output size).
    pub image: PathBuf,
    /// A preprocessor that makes the condition image from `image` first.
    pub preprocess: Option<PreprocessKind>,
    /// Scale, step range, guess mode.
    pub settings: ControlNetSettings,
}

/// One T2I-Adapter with its condition image.
#[derive(Debug, Clone, PartialEq)]
pub struct T2IAdapterSpec {
    /// A diffusers folder or a TencentARC original file.
    pub path: PathBuf,
    /// The condition image (resized to the output size).
    pub image: PathBuf,
    /// A preprocessor that makes the condition image from `image` first.
    pub preprocess: Option<PreprocessKind>,
    /// Feature weight.
    pub scale: f64,
    /// Fraction of the steps (from the start) during which the features are added.
    pub factor: f64,
}

/// Checks the numbers of every spec.
pub(super) fn validate(controlnets: &[ControlNetSpec], adapters: &[T2IAdapterSpec]) -> Result<()> {
    for spec in controlnets {
        spec.settings.check(&spec.path.display().to_string())?;
    }
    for spec in adapters {
        T2IAdapterControl::check_settings(&spec.path.display().to_string(), spec.scale, spec.factor)?;
    }
    Ok(())
}

/// Loads a condition image, runs the preprocessor if any, and fits it to the output size.
fn condition_image(
    path: &Path,
    preprocess: Option<&PreprocessKind>,
    width: usize,
    height: usize,
    options: &LoadOptions,
) -> Result<Tensor> {
    let mut img = load_rgb(path)?;
    if let Some(kind) = preprocess {
        img = apply(kind, &img).context(|| format!("preprocessing {}", path.display()))?;
    }
    condition_tensor(&img, width, height, &options.device)
}

/// Loads every ControlNet and T2I-Adapter with its image for the generation `cx` describes.
pub(super) fn build(
    controlnets: &[ControlNetSpec],
    adapters: &[T2IAdapterSpec],
    cx: &BuildContext,
) -> Result<Vec<Box<dyn Control>>> {
    let (model, options, width, height) = (cx.model, cx.options, cx.width, cx.height);
    let mut controls: Vec<Box<dyn Control>> = Vec::new();
    for spec in controlnets {
        let net = load_controlnet(&spec.path, options, Some(model.unet.config()))
            .context(|| format!("loading ControlNet {}", spec.path.display()))?;
        let image = condition_image(&spec.image, spec.preprocess.as_ref(), width, height, options)?;
        let name = spec.path.display().to_string();
        controls.push(Box::new(ControlNetControl::new(name, Arc::new(net), image, spec.settings)?));
    }
    for spec in adapters {
        let stages = model.unet.config().blocks.len();
        let name = spec.path.display().to_string();
        let adapter = load_t2i_adapter(&spec.path, options, stages, model.vae_scale_factor())
            .context(|| format!("loading T2I-Adapter {name}"))?;
        adapter.config().check_fits(model.unet.config(), &name)?;
        let image = condition_image(&spec.image, spec.preprocess.as_ref(), width, height, options)?;
        controls.push(Box::new(T2IAdapterControl::new(name, &adapter, &image, spec.scale, spec.factor)?));
    }
    Ok(controls)
}
