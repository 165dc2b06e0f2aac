//! Uni-ControlNet as a control mechanism: the global adapter's tokens are appended to the text
//! context once (text-embedding injection point), the local adapter's residuals are added to the
//! UNet's skips and mid block at every step (residual injection point), as the official
//! `UniControlNet.apply_model` does.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::condition_tensor;
use crate::control::{ContextInfo, Control, GenerationSetup, StepContext};
use crate::io::uni_controlnet;
use crate::io::weights::Weights;
use crate::models::controlnet::ControlResiduals;
use crate::models::unet::{UNetConfig, UNetControls};
use crate::models::uni_controlnet::{CONDITION_SCALE, GlobalAdapter, LocalAdapter, UniControlNet};
use crate::pipeline::LoadOptions;
use crate::{Error, Result};

/// The local conditions of the public uni.ckpt in channel order, three (RGB) channels each.
pub const LOCAL_CONDITIONS: [&str; 7] = ["canny", "mlsd", "hed", "sketch", "openpose", "midas", "seg"];

/// Loads a Uni-ControlNet file (uni.ckpt layout, `.ckpt` or `.safetensors`) whose adapters fit the
/// `base` UNet.
pub fn load_uni_controlnet(path: &Path, options: &LoadOptions, base: &UNetConfig) -> Result<UniControlNet> {
    let file = uni_controlnet::open(path, base)?;
    let weights = |store| Weights::new(store, options.dtype, &options.device);
    let global = weights(file.store).pp(uni_controlnet::UNI_GLOBAL_PREFIX.trim_end_matches('.'));
    Ok(UniControlNet {
        local: file.local.map(|(config, store)| LocalAdapter::load(&weights(store), &config)).transpose()?,
        global: file.global.map(|config| GlobalAdapter::load(&global, config)).transpose()?,
    })
}

/// The condition maps [1, 3·slots, height, width] in [0, 1] from RGB images placed in their slots
/// (indices into the channel order, e.g. [`LOCAL_CONDITIONS`]), each resized to width x height;
/// empty slots are zero, as the official demo leaves conditions it was not given.
pub fn local_conditions(
    images: &[(usize, image::RgbImage)],
    slots: usize,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut maps = vec![None; slots];
    for (slot, img) in images {
        let entry = maps.get_mut(*slot).ok_or_else(|| {
            Error::invalid(format!("local condition slot {slot} is out of range (the adapter has {slots})"))
        })?;
        if entry.is_some() {
            return Err(Error::invalid(format!("local condition slot {slot} is given twice")));
        }
        *entry = Some(condition_tensor(img, width, height, device)?);
    }
    let zeros = Tensor::zeros((1, 3, height, width), DType::F32, device)?;
    let maps: Vec<Tensor> = maps.into_iter().map(|m| m.unwrap_or_else(|| zeros.clone())).collect();
    Ok(Tensor::cat(&maps, 1)?)
}

/// How a Uni-ControlNet is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UniControlNetSettings {
    /// Weight of the local residuals (the official `local_control_scales`, one for all 13).
    pub local_scale: f64,
    /// Weight of the global tokens (the official `global_strength`), in both CFG halves.
    pub global_scale: f64,
}

impl UniControlNetSettings {
    /// Checks both scales are finite; `name` is for the error.
    pub fn check(&self, name: &str) -> Result<()> {
        for (what, v) in [("local", self.local_scale), ("global", self.global_scale)] {
            if !v.is_finite() {
                return Err(Error::invalid(format!("{name}: {what} scale {v} is not a number")));
            }
        }
        Ok(())
    }
}

impl Default for UniControlNetSettings {
    fn default() -> Self {
        Self { local_scale: 1.0, global_scale: 1.0 }
    }
}

/// One Uni-ControlNet with its conditions.
pub struct UniControlNetControl {
    name: String,
    model: Arc<UniControlNet>,
    /// Condition maps [1, local_channels, 8h, 8w] in [0, 1]; zeros when `None`.
    local: Option<Tensor>,
    /// The global condition's image embedding [1, in_dim]; zeros when `None`.
    global_embeds: Option<Tensor>,
    settings: UniControlNetSettings,
    /// The local adapter's condition features, computed once per generation by `prepare` (the
    /// maps do not change between steps).
    features: Vec<Tensor>,
}

impl UniControlNetControl {
    /// A Uni-ControlNet conditioned on `local` maps [1, local_channels, 8h, 8w] for latents of
    /// h x w, and on `global_embeds` [1, in_dim] (a CLIP `image_embeds`). A condition left out is
    /// zeros, as in the official demo; the unconditional CFG half gets the same maps and the tokens
    /// of a zero embedding. `name` identifies it in errors.
    pub fn new(
        name: String,
        model: Arc<UniControlNet>,
        local: Option<Tensor>,
        global_embeds: Option<Tensor>,
        settings: UniControlNetSettings,
    ) -> Result<Self> {
        settings.check(&name)?;
        match (&model.local, &local) {
            (None, Some(_)) => {
                return Err(Error::invalid(format!("{name}: has no local adapter, but local conditions were given")));
            }
            (Some(adapter), Some(maps)) if maps.dim(1)? != adapter.config().local_channels => {
                return Err(Error::invalid(format!(
                    "{name}: the local adapter takes {} condition channels, got {}",
                    adapter.config().local_channels,
                    maps.dim(1)?
                )));
            }
            _ => {}
        }
        match (&model.global, &global_embeds) {
            (None, Some(_)) => {
                return Err(Error::invalid(format!("{name}: has no global adapter, but a global condition was given")));
            }
            (Some(adapter), Some(e)) if e.dims() != [1, adapter.config().in_dim] => {
                return Err(Error::invalid(format!(
                    "{name}: the global adapter takes an image embedding [1, {}], got {:?}",
                    adapter.config().in_dim,
                    e.dims()
                )));
            }
            _ => {}
        }
        Ok(Self { name, model, local, global_embeds, settings, features: Vec::new() })
    }
}

impl Control for UniControlNetControl {
    fn name(&self) -> &str {
        &self.name
    }

    fn edit_context(&mut self, context: Tensor, info: &ContextInfo) -> Result<Tensor> {
        let Some(adapter) = &self.model.global else { return Ok(context) };
        let c = adapter.config();
        let width = context.dim(2)?;
        if c.in_dim != width {
            return Err(Error::invalid(format!(
                "{}: the global adapter makes {}-wide tokens, the text context is {width} wide",
                self.name, c.in_dim
            )));
        }
        let zeros = Tensor::zeros((1, c.in_dim), context.dtype(), context.device())?;
        let tokens = |embeds: &Tensor| -> Result<Tensor> {
            let t = adapter.forward(&embeds.to_dtype(context.dtype())?)?;
            Ok((t * self.settings.global_scale)?.repeat((info.batch, 1, 1))?)
        };
        let cond = tokens(self.global_embeds.as_ref().unwrap_or(&zeros))?;
        let tokens = if info.guided { Tensor::cat(&[tokens(&zeros)?, cond], 0)? } else { cond };
        Ok(Tensor::cat(&[&context, &tokens], 1)?)
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        let Some(adapter) = &self.model.local else { return Ok(()) };
        let (h, w) = setup.latent_size;
        let size = (h * CONDITION_SCALE, w * CONDITION_SCALE);
        let maps = match &self.local {
            Some(maps) => {
                let (_, _, mh, mw) = maps.dims4()?;
                if (mh, mw) != size {
                    return Err(Error::invalid(format!(
                        "{}: local condition maps are {mw}x{mh}, the latents ({w}x{h}) need {}x{}",
                        self.name, size.1, size.0
                    )));
                }
                maps.to_dtype(setup.dtype)?
            }
            None => Tensor::zeros((1, adapter.config().local_channels, size.0, size.1), setup.dtype, setup.device)?,
        };
        self.features = adapter.features(&maps).map_err(|e| Error::invalid(format!("{}: {e}", self.name)))?;
        Ok(())
    }

    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls> {
        let Some(adapter) = &self.model.local else { return Ok(UNetControls::default()) };
        let residuals = adapter
            .forward(step.latents, step.timesteps, &step.conditioning.context, &self.features)
            .map_err(|e| Error::invalid(format!("{}: {e}", self.name)))?;
        let s = self.settings.local_scale;
        let down = residuals.down.iter().map(|r| Ok((r * s)?)).collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals { down, mid: (residuals.mid * s)? }.into_controls())
    }
}
