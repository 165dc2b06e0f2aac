//! Flags of IP-Adapter image prompts (repeatable: several adapters, each with its own images, scale
//! and masks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::control::Control;
use crate::control::cross_attention::ip_adapter::read_embedding_file;
use crate::control::cross_attention::{
    ImagePromptEmbeds, IpAdapter, IpAdapterWeights, IpScale, ProjectionInput, RegionMask,
};
use crate::control::weights::LoraMode;
use crate::io::image::load_rgb;
use crate::models::clip_vision::ClipVisionEncoder;
use crate::models::image_processor::ClipImageProcessor;
use crate::pipeline::{LoadOptions, StableDiffusion};

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

/// The value for item `i` of `count` from a flag given once (for all) or once per item.
fn per_item<'a, T>(flag: &str, values: &'a [T], count: usize, what: &str) -> anyhow::Result<Vec<Option<&'a T>>> {
    match values.len() {
        0 => Ok(vec![None; count]),
        1 => Ok(vec![Some(&values[0]); count]),
        n if n == count => Ok(values.iter().map(Some).collect()),
        n => bail!("--{flag} was given {n} times for {count} {what} (give it once, or once per {what})"),
    }
}

/// An image encoder with its preprocessing.
pub(super) struct Encoder {
    pub(super) model: ClipVisionEncoder,
    pub(super) processor: ClipImageProcessor,
}

/// Loads an image-encoder folder with its `preprocessor_config.json` (or CLIP's defaults).
pub(super) fn load_encoder(dir: &Path, options: &LoadOptions) -> anyhow::Result<Encoder> {
    let model = ClipVisionEncoder::from_dir(dir, options.dtype, &options.device)?;
    let config = dir.join("preprocessor_config.json");
    let processor = if config.is_file() {
        ClipImageProcessor::load(&config)?
    } else {
        ClipImageProcessor::for_image_size(model.config().image_size)
    };
    Ok(Encoder { model, processor })
}

impl IpAdapterArgs {
    /// Builds one control per --ip-adapter for images of `width` x `height` pixels, attaching the
    /// attention LoRA of FaceID adapters to `model` (fused, multiplier 1, as diffusers does).
    pub fn build(
        &self,
        model: &mut StableDiffusion,
        options: &LoadOptions,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Vec<Box<dyn Control>>> {
        let count = self.ip_adapter.len();
        if count == 0 {
            let given = [
                ("--ip-image", self.ip_image.len()),
                ("--ip-face-embedding", self.ip_face_embedding.len()),
                ("--ip-image-embeds", self.ip_image_embeds.len()),
                ("--ip-scale", self.ip_scale.len()),
                ("--ip-mask", self.ip_mask.len()),
                ("--image-encoder", self.image_encoder.len()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, n)| *n > 0) {
                bail!("{flag} was given without --ip-adapter");
            }
            return Ok(Vec::new());
        }
        let adapters = self
            .ip_adapter
            .iter()
            .map(|p| IpAdapterWeights::load(p, model.unet.config(), options.dtype, &options.device))
            .collect::<crate::Result<Vec<_>>>()?;
        for (i, lora) in adapters.iter().enumerate().filter_map(|(i, a)| Some((i, a.lora()?))) {
            model
                .attach_lora(&format!("ip-adapter-{i}"), &lora, 1.0, LoraMode::Fused)
                .with_context(|| format!("attaching the LoRA of {}", lora.path.display()))?;
        }
        let embeds = self.prompt_embeds(&adapters, options)?;
        let masks = self.masks(&adapters, &embeds, width, height)?;
        let scales = per_item("ip-scale", &self.ip_scale, count, "adapters")?;
        adapters
            .iter()
            .zip(embeds)
            .zip(masks)
            .zip(scales)
            .map(|(((weights, embeds), masks), scale)| {
                let scale = scale.map(|s| s.parse::<IpScale>()).transpose()?.unwrap_or_default();
                let control = IpAdapter::new(weights, &embeds, &scale, masks)?;
                Ok(Box::new(control) as Box<dyn Control>)
            })
            .collect()
    }

    /// Each adapter's projection inputs, from --ip-image-embeds, or --ip-image with the image encoder
    /// and --ip-face-embedding.
    fn prompt_embeds(
        &self,
        adapters: &[IpAdapterWeights],
        options: &LoadOptions,
    ) -> anyhow::Result<Vec<ImagePromptEmbeds>> {
        let device = &options.device;
        if !self.ip_image_embeds.is_empty() {
            if self.ip_image_embeds.len() != adapters.len() {
                bail!(
                    "--ip-image-embeds was given {} times for {} adapters (give one file per --ip-adapter)",
                    self.ip_image_embeds.len(),
                    adapters.len()
                );
            }
            if !self.ip_image.is_empty() || !self.ip_face_embedding.is_empty() {
                bail!("--ip-image-embeds replaces --ip-image and --ip-face-embedding: give one or the other");
            }
            return adapters
                .iter()
                .zip(&self.ip_image_embeds)
                .map(|(a, path)| {
                    let t = read_embedding_file(path, device)?;
                    ImagePromptEmbeds::from_diffusers(&t, a.projection().input())
                        .with_context(|| format!("{}", path.display()))
                })
                .collect();
        }
        let takes_images: Vec<&IpAdapterWeights> =
            adapters.iter().filter(|a| a.projection().input() != ProjectionInput::FaceEmbedding).collect();
        let faceid = adapters.len() - takes_images.len();
        if self.ip_image.len() != takes_images.len() {
            bail!(
                "--ip-image was given {} times for {} adapter(s) that take images (one per adapter, images of \
                 one adapter comma-separated)",
                self.ip_image.len(),
                takes_images.len()
            );
        }
        if self.ip_face_embedding.len() != faceid {
            bail!(
                "--ip-face-embedding was given {} times for {faceid} FaceID adapter(s)",
                self.ip_face_embedding.len()
            );
        }
        let encoder_dirs =
            per_item("image-encoder", &self.image_encoder, takes_images.len(), "adapters that take images")?;
        let mut encoders: HashMap<PathBuf, Encoder> = HashMap::new();
        let (mut images, mut faces) = (self.ip_image.iter(), self.ip_face_embedding.iter());
        let mut dirs = encoder_dirs.into_iter();
        adapters
            .iter()
            .map(|a| {
                let projection = a.projection();
                if projection.input() == ProjectionInput::FaceEmbedding {
                    let path = faces.next().expect("counted above");
                    let t = read_embedding_file(path, device)?;
                    let embeds =
                        ImagePromptEmbeds::from_face_embeddings(&t).with_context(|| format!("{}", path.display()))?;
                    let dim = embeds.positive.dim(1)?;
                    if dim != projection.input_dim() {
                        bail!(
                            "{}: the face embedding is {dim} wide, the FaceID adapter {} expects {}",
                            path.display(),
                            a.path().display(),
                            projection.input_dim()
                        );
                    }
                    return Ok(embeds);
                }
                let list = images.next().expect("counted above");
                let Some(dir) = dirs.next().flatten() else {
                    bail!(
                        "{}: a {} IP-Adapter needs --image-encoder DIR (the CLIP vision model it was trained with)",
                        a.path().display(),
                        projection.variant()
                    );
                };
                if !encoders.contains_key(dir) {
                    let encoder = load_encoder(dir, options)
                        .with_context(|| format!("loading image encoder {}", dir.display()))?;
                    encoders.insert(dir.clone(), encoder);
                }
                let encoder = &encoders[dir];
                let (width, what) = match projection.input() {
                    ProjectionInput::ImageEmbeds => (encoder.model.config().projection_dim(), "projection_dim"),
                    _ => (encoder.model.config().hidden_size, "hidden_size"),
                };
                if width != projection.input_dim() {
                    bail!(
                        "{}: the {} adapter reads {} of width {}, but the image encoder {} gives {width} ({what}): \
                         use the image encoder the adapter was trained with",
                        a.path().display(),
                        projection.variant(),
                        projection.input(),
                        projection.input_dim(),
                        dir.display()
                    );
                }
                let pictures = paths(list).iter().map(|p| load_rgb(p)).collect::<crate::Result<Vec<_>>>()?;
                Ok(ImagePromptEmbeds::from_images(&pictures, &encoder.model, &encoder.processor, projection.input())?)
            })
            .collect()
    }

    /// Each adapter's masks, checked against its image count and the output size.
    fn masks(
        &self,
        adapters: &[IpAdapterWeights],
        embeds: &[ImagePromptEmbeds],
        width: usize,
        height: usize,
    ) -> anyhow::Result<Vec<Option<Vec<RegionMask>>>> {
        if self.ip_mask.is_empty() {
            return Ok(vec![None; adapters.len()]);
        }
        if self.ip_mask.len() != adapters.len() {
            bail!(
                "--ip-mask was given {} times for {} adapters (once per --ip-adapter, `none` for an adapter \
                 without masks)",
                self.ip_mask.len(),
                adapters.len()
            );
        }
        adapters
            .iter()
            .zip(embeds)
            .zip(&self.ip_mask)
            .map(|((a, e), list)| {
                if list.trim() == "none" {
                    return Ok(None);
                }
                let files = paths(list);
                let images = e.images()?;
                if files.len() != images {
                    bail!(
                        "{}: {} mask(s) for {images} prompt image(s); give one mask per image",
                        a.path().display(),
                        files.len()
                    );
                }
                let masks = files
                    .iter()
                    .map(|p| {
                        let mask = RegionMask::load(p)?;
                        if mask.size() != (height, width) {
                            bail!(
                                "{}: the mask is {}x{}, the image being generated is {width}x{height}; masks must \
                                 have the output size",
                                p.display(),
                                mask.size().1,
                                mask.size().0
                            );
                        }
                        Ok(mask)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(Some(masks))
            })
            .collect()
    }
}
