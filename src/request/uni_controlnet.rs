//! A Uni-ControlNet in a request: one file (uni.ckpt layout), named local condition maps and a
//! global (content) image with the CLIP image encoder that embeds it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::control::Control;
use crate::control::cross_attention::{ImagePromptEmbeds, ProjectionInput};
use crate::control::residual::uni_controlnet::{
    LOCAL_CONDITIONS, UniControlNetControl, UniControlNetSettings, load_uni_controlnet, local_conditions,
};
use crate::error::ResultExt;
use crate::io::image::load_rgb;
use crate::models::uni_controlnet::CONDITION_SCALE;

use crate::{Error, Result};

use super::BuildContext;

/// A Uni-ControlNet and its conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct UniControlNetSpec {
    /// The file (uni.ckpt layout, `.ckpt` or `.safetensors`).
    pub path: PathBuf,
    /// Already-detected local condition maps by name, one of [`LOCAL_CONDITIONS`].
    pub local: Vec<(String, PathBuf)>,
    /// The global condition image and the CLIP vision folder that encodes it.
    pub global: Option<(PathBuf, PathBuf)>,
    /// Local and global weights.
    pub settings: UniControlNetSettings,
}

impl UniControlNetSpec {
    /// The channel slot of each local condition, checking names and repeats.
    fn slots(&self) -> Result<Vec<usize>> {
        let mut slots: Vec<usize> = Vec::with_capacity(self.local.len());
        for (name, _) in &self.local {
            let Some(slot) = LOCAL_CONDITIONS.iter().position(|n| *n == name.trim()) else {
                return Err(Error::invalid(format!(
                    "--uni-local: unknown local condition `{name}` (expected one of {})",
                    LOCAL_CONDITIONS.join(", ")
                )));
            };
            if slots.contains(&slot) {
                return Err(Error::invalid(format!("--uni-local {} was given twice", LOCAL_CONDITIONS[slot])));
            }
            slots.push(slot);
        }
        Ok(slots)
    }

    /// Checks the conditions without reading any file.
    pub(super) fn validate(&self) -> Result<()> {
        self.slots()?;
        if self.local.is_empty() && self.global.is_none() {
            return Err(Error::invalid(
                "--uni-controlnet needs conditions: --uni-local NAME=PNG and/or --uni-global-image PNG",
            ));
        }
        self.settings.check(&self.path.display().to_string())
    }

    /// Loads the Uni-ControlNet with its conditions for the generation `cx` describes.
    pub(super) fn build(&self, cx: &mut BuildContext) -> Result<Box<dyn Control>> {
        let (model, options, width, height) = (cx.model, cx.options, cx.width, cx.height);
        let encoders = &mut cx.encoders;
        let slots = self.slots()?;
        let path = &self.path;
        let net = load_uni_controlnet(path, options, model.unet.config())
            .context(|| format!("loading Uni-ControlNet {}", path.display()))?;
        let name = path.display().to_string();

        let local = match (&net.local, self.local.is_empty()) {
            (None, false) => {
                return Err(Error::invalid(format!(
                    "{name}: has no local adapter (`local_adapter.*`), but --uni-local was given"
                )));
            }
            (Some(adapter), false) => {
                let channels = adapter.config().local_channels;
                if channels != 3 * LOCAL_CONDITIONS.len() {
                    return Err(Error::invalid(format!(
                        "{name}: the local adapter takes {channels} condition channels, not the {} of uni.ckpt's \
                         channel layout ({} as RGB maps)",
                        3 * LOCAL_CONDITIONS.len(),
                        LOCAL_CONDITIONS.join(", ")
                    )));
                }
                let f = model.vae_scale_factor();
                let (w, h) = (width / f * CONDITION_SCALE, height / f * CONDITION_SCALE);
                let images = slots
                    .iter()
                    .zip(&self.local)
                    .map(|(slot, (_, p))| Ok((*slot, load_rgb(p)?)))
                    .collect::<Result<Vec<_>>>()?;
                Some(local_conditions(&images, LOCAL_CONDITIONS.len(), w, h, &options.device)?)
            }
            (_, true) => None,
        };
        let global_embeds = match &self.global {
            Some((image, dir)) => {
                let Some(adapter) = &net.global else {
                    return Err(Error::invalid(format!(
                        "{name}: has no global adapter (`global_adapter.*`), but --uni-global-image was given"
                    )));
                };
                let encoder = encoders.get(dir, options)?;
                let (theirs, mine) = (encoder.model.config().projection_dim(), adapter.config().in_dim);
                if theirs != mine {
                    return Err(Error::invalid(format!(
                        "{name}: the global adapter takes image embeddings of width {mine}, the image encoder {} gives \
                         {theirs} (projection_dim): use the encoder it was trained with",
                        dir.display()
                    )));
                }
                let picture = load_rgb(image)?;
                let embeds = ImagePromptEmbeds::from_images(
                    &[picture],
                    &encoder.model,
                    &encoder.processor,
                    ProjectionInput::ImageEmbeds,
                )?;
                Some(embeds.positive)
            }
            None => None,
        };
        Ok(Box::new(UniControlNetControl::new(name, Arc::new(net), local, global_embeds, self.settings)?))
    }
}
