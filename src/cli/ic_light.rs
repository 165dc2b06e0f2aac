//! IC-Light flags of `diffctl generate`.

use std::path::PathBuf;

use clap::Args;

use crate::request::{IcLightSpec, Request};

/// IC-Light flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct IcLightArgs {
    /// IC-Light relighting (SD1.5): `iclight_sd15_fc.safetensors` (foreground) or
    /// `iclight_sd15_fbc.safetensors` (foreground and background), offsets merged into the UNet.
    #[arg(long, value_name = "FILE", requires = "ic_foreground")]
    ic_light: Option<PathBuf>,
    /// The cut-out foreground (its background gray 127), resized to cover the output and cropped.
    #[arg(long, value_name = "PNG", requires = "ic_light")]
    ic_foreground: Option<PathBuf>,
    /// The background, for the fbc model.
    #[arg(long, value_name = "PNG", requires = "ic_light")]
    ic_background: Option<PathBuf>,
}

impl IcLightArgs {
    /// Adds IC-Light to `request` when it is given.
    pub fn add_to(&self, request: &mut Request) {
        request.ic_light = self
            .ic_light
            .clone()
            .zip(self.ic_foreground.clone())
            .map(|(path, foreground)| IcLightSpec { path, foreground, background: self.ic_background.clone() });
    }
}
