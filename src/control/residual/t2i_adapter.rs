//! T2I-Adapter as a control mechanism: features computed once, added inside the UNet's down
//! blocks during the first part of sampling.

use std::path::Path;

use candle_core::Tensor;

use crate::control::{Control, GenerationSetup, StepContext};
use crate::io::diffusers_folder::open_weights_in;
use crate::io::original_t2i_adapter;
use crate::io::weights::Weights;
use crate::models::t2i_adapter::{T2IAdapter, T2IAdapterConfig};
use crate::models::unet::UNetControls;
use crate::pipeline::LoadOptions;
use crate::{Error, Result};

/// Loads a T2I-Adapter: a diffusers folder (`config.json` + weights), or a TencentARC original file
/// whose structure follows the model it is used with (`stages` UNet down blocks, VAE factor
/// `vae_factor`).
pub fn load_t2i_adapter(path: &Path, options: &LoadOptions, stages: usize, vae_factor: usize) -> Result<T2IAdapter> {
    let (config, store) = if path.is_dir() {
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(format!(
                "{}: expected a diffusers T2I-Adapter folder (config.json + diffusion_pytorch_model.safetensors)",
                path.display()
            )));
        }
        (T2IAdapterConfig::load(&config_path)?, open_weights_in(path)?)
    } else {
        original_t2i_adapter::open(path, stages, vae_factor)?
    };
    T2IAdapter::load(&Weights::new(store, options.dtype, &options.device), &config)
}

/// One T2I-Adapter's features for a condition image.
pub struct T2IAdapterControl {
    name: String,
    /// Scaled features, batch 1, one per UNet down block.
    features: Vec<Tensor>,
    /// The features for every row of the UNet batch, in the compute dtype (made once per
    /// generation by `prepare`).
    batch_features: Vec<Tensor>,
    /// Fraction of the steps (from the start) during which the features are added.
    factor: f64,
    /// The model family the adapter is made for (for messages).
    family: &'static str,
}

impl T2IAdapterControl {
    /// Runs `adapter` on `image` [1, 3, H, W] in [0, 1] once; the features are scaled by `scale` and
    /// added during the first `factor` of the steps (diffusers' `adapter_conditioning_factor`).
    pub fn new(name: String, adapter: &T2IAdapter, image: &Tensor, scale: f64, factor: f64) -> Result<Self> {
        Self::check_settings(&name, scale, factor)?;
        let f = adapter.config().downscale_factor;
        let (_, _, h, w) = image.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(Error::invalid(format!("{name}: image {w}x{h} is not a multiple of the adapter's factor {f}")));
        }
        let features = adapter.forward(image)?.into_iter().map(|t| Ok((t * scale)?)).collect::<Result<_>>()?;
        let family = adapter.config().family_name();
        Ok(Self { name, features, batch_features: Vec::new(), factor, family })
    }
}

impl T2IAdapterControl {
    /// Checks a feature weight (finite) and a step fraction (within [0, 1]); `name` is for the error.
    pub fn check_settings(name: &str, scale: f64, factor: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::invalid(format!("{name}: adapter scale {scale} is not a number")));
        }
        if !(0.0..=1.0).contains(&factor) {
            return Err(Error::invalid(format!("{name}: adapter factor {factor} must be within [0, 1]")));
        }
        Ok(())
    }
}

impl Control for T2IAdapterControl {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        // Each feature must have the size of the down-block output it is added to: inside an
        // attention block before its downsampler, after a plain block's downsampler.
        let config = setup.unet.config();
        let (mut h, mut w) = setup.latent_size;
        let last = config.blocks.len().saturating_sub(1);
        for (i, (block, feature)) in config.blocks.iter().zip(&self.features).enumerate() {
            let down = |(h, w): (usize, usize)| if i < last { (h.div_ceil(2), w.div_ceil(2)) } else { (h, w) };
            let at = if block.has_attention { (h, w) } else { down((h, w)) };
            let (_, _, fh, fw) = feature.dims4()?;
            if (fh, fw) != at {
                return Err(Error::invalid(format!(
                    "{}: feature {i} of this {} adapter is {fw}x{fh} but the {} model's down block {i} needs {}x{} \
                     there",
                    self.name,
                    self.family,
                    config.family_name(),
                    at.1,
                    at.0
                )));
            }
            (h, w) = down((h, w));
        }
        let rows = if setup.guided { 2 * setup.batch } else { setup.batch };
        self.batch_features = self
            .features
            .iter()
            .map(|t| Ok(t.to_dtype(setup.dtype)?.repeat((rows, 1, 1, 1))?))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls> {
        if step.step_index as f64 >= (step.num_steps as f64 * self.factor).floor() {
            return Ok(UNetControls::default());
        }
        Ok(UNetControls { down_intrablock_residuals: self.batch_features.clone(), ..Default::default() })
    }
}
