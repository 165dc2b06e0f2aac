//! Flags of Uni-ControlNet: one file (uni.ckpt layout), named local condition maps and a global
//! (content) image.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use crate::control::Control;
use crate::control::cross_attention::{ImagePromptEmbeds, ProjectionInput};
use crate::control::residual::uni_controlnet::{
    LOCAL_CONDITIONS, UniControlNetControl, UniControlNetSettings, load_uni_controlnet, local_conditions,
};
use crate::io::image::load_rgb;
use crate::models::uni_controlnet::CONDITION_SCALE;
use crate::pipeline::{LoadOptions, StableDiffusion};

/// Uni-ControlNet flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct UniControlNetArgs {
    /// A Uni-ControlNet file in the uni.ckpt layout (local_adapter.* and/or global_adapter.*; .ckpt or
    /// .safetensors).
    #[arg(long, value_name = "FILE")]
    uni_controlnet: Option<PathBuf>,
    /// A local condition map as NAME=PNG, NAME one of canny, mlsd, hed, sketch, openpose, midas, seg
    /// (already-detected maps, resized to 8x the latent size); repeat for several. Missing ones are zero.
    #[arg(long, value_name = "NAME=PNG")]
    uni_local: Vec<String>,
    /// The global (content) condition image, encoded by --uni-image-encoder.
    #[arg(long, value_name = "PNG")]
    uni_global_image: Option<PathBuf>,
    /// The CLIP vision folder for --uni-global-image (config.json + model.safetensors [+
    /// preprocessor_config.json]; CLIP ViT-L/14 for the public uni.ckpt).
    #[arg(long, value_name = "DIR")]
    uni_image_encoder: Option<PathBuf>,
    /// Weight of the local residuals.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    uni_local_scale: f64,
    /// Weight of the global tokens.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    uni_global_scale: f64,
}

/// Parses `NAME=PNG` into the condition's channel slot and the path.
fn parse_local(arg: &str) -> anyhow::Result<(usize, PathBuf)> {
    let Some((name, path)) = arg.split_once('=') else {
        bail!("--uni-local {arg}: expected NAME=PNG (NAME one of {})", LOCAL_CONDITIONS.join(", "));
    };
    let Some(slot) = LOCAL_CONDITIONS.iter().position(|n| *n == name.trim()) else {
        bail!("--uni-local {arg}: unknown local condition `{name}` (expected one of {})", LOCAL_CONDITIONS.join(", "));
    };
    Ok((slot, PathBuf::from(path)))
}

impl UniControlNetArgs {
    /// Loads the Uni-ControlNet with its conditions for a `width`x`height` generation.
    pub fn build(
        &self,
        model: &StableDiffusion,
        options: &LoadOptions,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Vec<Box<dyn Control>>> {
        let Some(path) = &self.uni_controlnet else {
            let given = [
                ("--uni-local", !self.uni_local.is_empty()),
                ("--uni-global-image", self.uni_global_image.is_some()),
                ("--uni-image-encoder", self.uni_image_encoder.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} was given without --uni-controlnet");
            }
            return Ok(Vec::new());
        };
        let locals = self.uni_local.iter().map(|a| parse_local(a)).collect::<anyhow::Result<Vec<_>>>()?;
        for (i, (slot, _)) in locals.iter().enumerate() {
            if locals[..i].iter().any(|(s, _)| s == slot) {
                bail!("--uni-local {} was given twice", LOCAL_CONDITIONS[*slot]);
            }
        }
        match (&self.uni_global_image, &self.uni_image_encoder) {
            (Some(image), None) => bail!(
                "--uni-global-image {} needs --uni-image-encoder DIR (the CLIP vision model the adapter was trained \
                 with)",
                image.display()
            ),
            (None, Some(_)) => bail!("--uni-image-encoder was given without --uni-global-image"),
            _ => {}
        }
        if locals.is_empty() && self.uni_global_image.is_none() {
            bail!("--uni-controlnet needs conditions: --uni-local NAME=PNG and/or --uni-global-image PNG");
        }
        let net = load_uni_controlnet(path, options, model.unet.config())
            .with_context(|| format!("loading Uni-ControlNet {}", path.display()))?;
        let name = path.display().to_string();

        let local = match (&net.local, locals.is_empty()) {
            (None, false) => bail!("{name}: has no local adapter (`local_adapter.*`), but --uni-local was given"),
            (Some(adapter), false) => {
                let channels = adapter.config().local_channels;
                if channels != 3 * LOCAL_CONDITIONS.len() {
                    bail!(
                        "{name}: the local adapter takes {channels} condition channels, not the {} of uni.ckpt's \
                         channel layout ({} as RGB maps)",
                        3 * LOCAL_CONDITIONS.len(),
                        LOCAL_CONDITIONS.join(", ")
                    );
                }
                let f = model.vae_scale_factor();
                let (w, h) = (width / f * CONDITION_SCALE, height / f * CONDITION_SCALE);
                let images =
                    locals.iter().map(|(slot, p)| Ok((*slot, load_rgb(p)?))).collect::<crate::Result<Vec<_>>>()?;
                Some(local_conditions(&images, LOCAL_CONDITIONS.len(), w, h, &options.device)?)
            }
            (_, true) => None,
        };
        let global_embeds = match (&self.uni_global_image, &self.uni_image_encoder) {
            (Some(image), Some(dir)) => {
                let Some(adapter) = &net.global else {
                    bail!("{name}: has no global adapter (`global_adapter.*`), but --uni-global-image was given");
                };
                let encoder = super::ip_adapter::load_encoder(dir, options)
                    .with_context(|| format!("loading image encoder {}", dir.display()))?;
                let (theirs, mine) = (encoder.model.config().projection_dim(), adapter.config().in_dim);
                if theirs != mine {
                    bail!(
                        "{name}: the global adapter takes image embeddings of width {mine}, the image encoder {} gives \
                         {theirs} (projection_dim): use the encoder it was trained with",
                        dir.display()
                    );
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
            _ => None,
        };
        let settings = UniControlNetSettings { local_scale: self.uni_local_scale, global_scale: self.uni_global_scale };
        let control = UniControlNetControl::new(name, Arc::new(net), local, global_embeds, settings)?;
        Ok(vec![Box::new(control)])
    }
}
