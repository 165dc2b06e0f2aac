//! Flags of Uni-ControlNet: one file (uni.ckpt layout), named local condition maps and a global
//! (content) image.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::control::residual::uni_controlnet::{LOCAL_CONDITIONS, UniControlNetSettings};
use crate::request::UniControlNetSpec;

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

impl UniControlNetArgs {
    /// The Uni-ControlNet part of a request, from the flags.
    pub fn request(&self) -> anyhow::Result<Option<UniControlNetSpec>> {
        let Some(path) = &self.uni_controlnet else {
            let given = [
                ("--uni-local", !self.uni_local.is_empty()),
                ("--uni-global-image", self.uni_global_image.is_some()),
                ("--uni-image-encoder", self.uni_image_encoder.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} was given without --uni-controlnet");
            }
            return Ok(None);
        };
        let local = self
            .uni_local
            .iter()
            .map(|arg| match arg.split_once('=') {
                Some((name, png)) => Ok((name.trim().to_string(), PathBuf::from(png))),
                None => bail!("--uni-local {arg}: expected NAME=PNG (NAME one of {})", LOCAL_CONDITIONS.join(", ")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let global = match (&self.uni_global_image, &self.uni_image_encoder) {
            (Some(image), Some(dir)) => Some((image.clone(), dir.clone())),
            (Some(image), None) => bail!(
                "--uni-global-image {} needs --uni-image-encoder DIR (the CLIP vision model the adapter was trained \
                 with)",
                image.display()
            ),
            (None, Some(_)) => bail!("--uni-image-encoder was given without --uni-global-image"),
            (None, None) => None,
        };
        let settings = UniControlNetSettings { local_scale: self.uni_local_scale, global_scale: self.uni_global_scale };
        Ok(Some(UniControlNetSpec { path: path.clone(), local, global, settings }))
    }
}
