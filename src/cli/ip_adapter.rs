//! Flags of IP-Adapter image prompts (repeatable: several adapters, each with its own images, scale
//! and masks).

use std::path::PathBuf;

use clap::Args;

use crate::control::cross_attention::IpScale;
use crate::request::IpAdapterRequest;

/// IP-Adapter flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct IpAdapterArgs {
    /// IP-Adapter weights in the h94 layout (.safetensors). Repeat for several adapters.
    #[arg(long, value_name = "FILE")]
    ip_adapter: Vec<PathBuf>,
    /// CLIP image-encoder folder (config.json + model.safetensors [+ preprocessor_config.json]): once
    /// for every adapter, or once per adapter that takes --ip-image.
    #[arg(long, value_name = "DIR")]
    image_encoder: Vec<PathBuf>,
    /// Prompt image(s) of one adapter, comma-separated for several (their tokens are joined); one flag
    /// per adapter that takes images, in --ip-adapter order.
    #[arg(long, value_name = "PNG[,PNG..]")]
    ip_image: Vec<String>,
    /// Face embedding of one FaceID adapter (.npy or a safetensors file with one tensor, [D] or
    /// [images, D]); one flag per FaceID adapter, in order.
    #[arg(long, value_name = "FILE")]
    ip_face_embedding: Vec<PathBuf>,
    /// Precomputed inputs of one adapter's projection (diffusers' ip_adapter_image_embeds entry:
    /// [2 (negative, positive), images, ...], as .npy or a one-tensor safetensors file); one per
    /// adapter, replacing --ip-image and --ip-face-embedding.
    #[arg(long, value_name = "FILE")]
    ip_image_embeds: Vec<PathBuf>,
    /// Image-prompt strength: a number, or per-block JSON such as
    /// '{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}' (parts and blocks left
    /// out get 0); once for every adapter or once per adapter [default: 1].
    #[arg(long, value_name = "F|JSON")]
    ip_scale: Vec<String>,
    /// Region mask(s) of one adapter at the output size (white = where its image acts), one per image,
    /// comma-separated; once per adapter in order, `none` for an adapter without masks.
    #[arg(long, value_name = "PNG[,PNG..]|none")]
    ip_mask: Vec<String>,
}

/// A comma-separated list of paths.
fn paths(list: &str) -> Vec<PathBuf> {
    list.split(',').map(|p| PathBuf::from(p.trim())).collect()
}

impl IpAdapterArgs {
    /// The IP-Adapter part of a request, from the flags.
    pub fn request(&self) -> anyhow::Result<IpAdapterRequest> {
        let scales = self.ip_scale.iter().map(|s| s.parse::<IpScale>()).collect::<crate::Result<Vec<_>>>()?;
        let masks =
            self.ip_mask.iter().map(|list| if list.trim() == "none" { None } else { Some(paths(list)) }).collect();
        Ok(IpAdapterRequest {
            adapters: self.ip_adapter.clone(),
            image_encoders: self.image_encoder.clone(),
            images: self.ip_image.iter().map(|list| paths(list)).collect(),
            face_embeddings: self.ip_face_embedding.clone(),
            image_embeds: self.ip_image_embeds.clone(),
            scales,
            masks,
        })
    }
}
