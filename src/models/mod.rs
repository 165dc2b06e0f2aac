//! The networks: CLIP text encoder, UNet, VAE and their shared layers.

pub mod attention;
pub mod clip_text;
pub mod controlnet;
pub mod nn;
pub mod resnet;
pub mod t2i_adapter;
pub mod unet;
pub mod vae;
