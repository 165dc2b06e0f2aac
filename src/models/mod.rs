//! The networks: CLIP text encoder, UNet, VAE and their shared layers.

pub mod attention;
pub mod clip;
pub mod clip_text;
pub mod clip_vision;
pub mod controlnet;
pub mod image_processor;
pub mod nn;
pub mod resnet;
pub mod t2i_adapter;
pub mod unet;
pub mod uni_controlnet;
pub mod vae;
pub mod vae_tiling;
