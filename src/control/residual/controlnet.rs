//! ControlNet as a control mechanism: several may run at once, their residuals summed.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::{active_at, check_step_range};
use crate::control::{Control, GenerationSetup, StepContext};
use crate::io::diffusers_folder::open_weights_in;
use crate::io::original_controlnet;
use crate::io::weights::Weights;
use crate::models::controlnet::{ControlNet, ControlNetConfig, ResidualScale};
use crate::models::unet::{Conditioning, UNetConfig, UNetControls};
use crate::pipeline::LoadOptions;
use crate::{Error, Result};

/// Loads a ControlNet: a diffusers folder (`config.json` + weights), checked first to fit the
/// `base` UNet when one is given, or an original ControlNet 1.x file (`control_model.*`), whose
/// structure is taken from `base`.
pub fn load_controlnet(path: &Path, options: &LoadOptions, base: Option<&UNetConfig>) -> Result<ControlNet> {
    let name = path.display().to_string();
    let (config, store) = if path.is_dir() {
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(format!("{}: missing file", config_path.display())));
        }
        let config = ControlNetConfig::load(&config_path)?;
        if let Some(base) = base {
            config.check_fits(base, &name)?;
        }
        (config, open_weights_in(path)?)
    } else {
        let base = base.ok_or_else(|| {
            Error::invalid(format!("{name}: an original-layout ControlNet file needs the base model's UNet config"))
        })?;
        original_controlnet::open(path, base)?
    };
    ControlNet::load(&Weights::new(store, options.dtype, &options.device), &config)
}

/// How one ControlNet is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlNetSettings {
    /// Residual weight (diffusers' `controlnet_conditioning_scale`).
    pub scale: f64,
    /// Fraction of the steps after which it starts (`control_guidance_start`).
    pub start: f64,
    /// Fraction of the steps after which it stops (`control_guidance_end`).
    pub end: f64,
    /// How the residuals weigh against the prompt.
    pub mode: ControlMode,
}

/// How a ControlNet's residuals weigh against the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// Every residual at the scale, on both guidance halves (diffusers' default,
    /// sd-webui-controlnet's "Balanced").
    #[default]
    Balanced,
    /// diffusers' guess mode: the conditional half only, residuals rising from 0.1 to 1 with depth.
    Guess,
    /// sd-webui-controlnet's "My prompt is more important": residual i at `scale · 0.825^(12 − i)`
    /// (soft injection), on both halves.
    PromptMoreImportant,
    /// sd-webui-controlnet's "ControlNet is more important": the same soft injection on the
    /// conditional half only (the unconditional half gets none).
    ControlNetMoreImportant,
}

impl ControlMode {
    /// The modes by name: `balanced`, `guess`, `prompt` and `controlnet` (the last two are
    /// sd-webui-controlnet's "My prompt is more important" and "ControlNet is more important").
    pub const NAMES: [(&'static str, ControlMode); 4] = [
        ("balanced", ControlMode::Balanced),
        ("guess", ControlMode::Guess),
        ("prompt", ControlMode::PromptMoreImportant),
        ("controlnet", ControlMode::ControlNetMoreImportant),
    ];
}

impl std::str::FromStr for ControlMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s.trim())).map(|(_, m)| *m).ok_or_else(|| {
            Error::invalid(format!(
                "unknown control mode `{s}`; valid: {}",
                Self::NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

impl ControlNetSettings {
    /// Checks the scale is finite and the step range is within [0, 1]; `name` is for the error.
    pub fn check(&self, name: &str) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::invalid(format!("{name}: control scale {} is not a number", self.scale)));
        }
        check_step_range(name, self.start, self.end)
    }
}

impl Default for ControlNetSettings {
    fn default() -> Self {
        Self { scale: 1.0, start: 0.0, end: 1.0, mode: ControlMode::Balanced }
    }
}

/// One ControlNet with its condition image.
pub struct ControlNetControl {
    name: String,
    model: Arc<ControlNet>,
    /// The condition image [1, 3, H, W] in [0, 1].
    image: Tensor,
    /// The condition image for every row the ControlNet runs on, in the compute dtype (made once
    /// per generation by `prepare`).
    batch_image: Option<Tensor>,
    settings: ControlNetSettings,
}

impl ControlNetControl {
    /// A ControlNet conditioned on `image` [1, 3, H, W]; `name` identifies it in errors.
    pub fn new(name: String, model: Arc<ControlNet>, image: Tensor, settings: ControlNetSettings) -> Result<Self> {
        settings.check(&name)?;
        Ok(Self { name, model, image, batch_image: None, settings })
    }
}

impl Control for ControlNetControl {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        let (_, _, ih, iw) = self.image.dims4()?;
        let (h, w) = setup.latent_size;
        let f = self.model.config().downscale_factor();
        if (ih, iw) != (h * f, w * f) {
            return Err(Error::invalid(format!(
                "{}: condition image is {iw}x{ih}, the generation needs {}x{}",
                self.name,
                w * f,
                h * f
            )));
        }
        // Conditional-only modes with guidance show the ControlNet only the conditional half.
        let rows = if setup.guided && !self.conditional_only() { 2 * setup.batch } else { setup.batch };
        self.batch_image = Some(self.image.to_dtype(setup.dtype)?.repeat((rows, 1, 1, 1))?);
        Ok(())
    }

    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls> {
        let s = self.settings;
        if !active_at(step.step_index, step.num_steps, s.start, s.end) {
            return Ok(UNetControls::default());
        }
        let total = step.latents.dim(0)?;
        // Conditional-only modes with guidance give the unconditional half zero residuals.
        let uncond = if self.conditional_only() && step.guided { total / 2 } else { 0 };
        let rows = total - uncond;
        let latents = step.latents.narrow(0, uncond, rows)?;
        // The ControlNet sees the latents alone (an inpainting UNet's extra channels are its own).
        let conditioning = Conditioning { extra_channels: None, ..step.conditioning.narrow(uncond, rows)? };
        let timesteps = step.timesteps.narrow(0, uncond, rows)?;
        let image = self
            .batch_image
            .as_ref()
            .filter(|image| image.dim(0).is_ok_and(|n| n == rows))
            .ok_or_else(|| Error::invalid(format!("{}: used before it was prepared for this batch", self.name)))?;
        let scale = match self.mode() {
            ControlMode::Balanced => ResidualScale::Uniform(s.scale),
            ControlMode::Guess => ResidualScale::Guess(s.scale),
            ControlMode::PromptMoreImportant | ControlMode::ControlNetMoreImportant => ResidualScale::Soft(s.scale),
        };
        let mut residuals = self.model.forward(&latents, &timesteps, &conditioning, image, scale)?;
        if uncond > 0 {
            let pad = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, t], 0)?) };
            residuals.down = residuals.down.iter().map(pad).collect::<Result<_>>()?;
            residuals.mid = pad(&residuals.mid)?;
        }
        Ok(residuals.into_controls())
    }
}

impl ControlNetControl {
    /// The mode: as asked, but guess mode for a ControlNet that pools its conditions (shuffle).
    fn mode(&self) -> ControlMode {
        match self.settings.mode {
            ControlMode::Balanced if self.model.config().global_pool_conditions => ControlMode::Guess,
            mode => mode,
        }
    }

    /// Whether the unconditional half goes without residuals.
    fn conditional_only(&self) -> bool {
        matches!(self.mode(), ControlMode::Guess | ControlMode::ControlNetMoreImportant)
    }
}
