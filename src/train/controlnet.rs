//! ControlNet training (diffusers' `train_controlnet.py`): a ControlNet copied from the model's
//! UNet (`ControlNetModel.from_unet`) or an existing one trains on images paired with condition
//! images, its residuals added to the frozen UNet's skips; the result is a diffusers ControlNet
//! folder (`config.json` + `diffusion_pytorch_model.safetensors`), which `--controlnet` and
//! diffusers' `ControlNetModel.from_pretrained` load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use serde_json::Value;

use super::dataset::Dataset;
use super::init::pytorch_default;
use super::run::{
    StepBatch, StepReport, Trainee, TrainingOptions, check, check_conditions, check_output_folder, detached,
    export_metadata, run_steps, write_model_folder,
};
use crate::io::diffusers_folder::open_weights_in;
use crate::io::weights::{TensorStore, TrainableParameters, Weights};
use crate::models::controlnet::{ControlNet, ControlNetConfig, ResidualScale};
use crate::models::unet::UNetControls;
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// diffusers' default condition-embedding channels; a model whose latents are 2^k times smaller
/// than its images uses the first k + 1 (each step after the first halves the size).
const EMBEDDING_CHANNELS: [usize; 4] = [16, 32, 96, 256];

/// The UNet tensors a ControlNet copies: its input half and embeddings.
const COPIED_PREFIXES: [&str; 6] =
    ["conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block."];

/// Where a ControlNet run starts.
#[derive(Debug, Clone)]
pub enum ControlNetStart {
    /// A new ControlNet copied from the model's UNet, for condition images of this many channels.
    FromUnet {
        /// Channels of the condition image (3 for RGB).
        conditioning_channels: usize,
    },
    /// An existing diffusers ControlNet folder, trained further.
    Folder(PathBuf),
}

/// Trains a ControlNet on `model` (frozen) with `data`, whose examples carry condition images (see
/// [`Dataset::with_conditions`]), and writes it to the folder `output`; `on_step` hears of every
/// step.
pub fn train_controlnet(
    model: &StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    start: &ControlNetStart,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    check_conditions(data, "ControlNet")?;
    let (config_json, store, label) = match start {
        ControlNetStart::FromUnet { conditioning_channels } => {
            let (json, store) = copy_of_unet(model, *conditioning_channels, options.seed)?;
            (json, store, "unet".to_string())
        }
        ControlNetStart::Folder(dir) => {
            let config_path = dir.join("config.json");
            let json: Value = crate::io::read_json(&config_path)?;
            (json, open_weights_in(dir)?, dir.display().to_string())
        }
    };
    let trained = match start {
        ControlNetStart::Folder(dir) => Some(dir.as_path()),
        ControlNetStart::FromUnet { .. } => None,
    };
    check_output_folder(output, trained)?;
    let config = ControlNetConfig::from_json(&config_json.to_string(), Path::new(&label))?;
    config.check_fits(model.unet.config(), &label)?;
    let factor = model.vae_scale_factor();
    if config.downscale_factor() != factor {
        return Err(Error::invalid(format!(
            "{label}: the ControlNet's condition embedding shrinks images {} times, the model's latents are {factor} \
             times smaller",
            config.downscale_factor()
        )));
    }
    let trainable = TrainableParameters::new();
    // The variables are copies: the store's tensors go once the ControlNet is built.
    let controlnet = ControlNet::load(&Weights::new(store, DType::F32, model.device()).trainable(&trainable), &config)?;
    let trainee = ControlNetTrainee { controlnet, config_json, params: trainable.parameters(), start: label };
    run_steps(model, data, None, options, output, &trainee, on_step)
}

/// A new ControlNet's config and weights from `model`'s UNet, as diffusers' `from_unet` makes them:
/// the UNet's input half copied; the condition embedding with PyTorch's default initialisation
/// (seeded by `seed`) but its last convolution zero; the zero convolutions zero.
fn copy_of_unet(model: &StableDiffusion, conditioning_channels: usize, seed: u64) -> Result<(Value, Arc<TensorStore>)> {
    let (unet_json, unet_store) = model.unet_files();
    let factor = model.vae_scale_factor();
    if !factor.is_power_of_two() || factor.trailing_zeros() as usize >= EMBEDDING_CHANNELS.len() {
        return Err(Error::invalid(format!("no ControlNet condition embedding for a VAE factor of {factor}")));
    }
    let embedding = EMBEDDING_CHANNELS[..=factor.trailing_zeros() as usize].to_vec();
    let config = ControlNetConfig::json_from_unet(unet_json, conditioning_channels, &embedding);
    let mut tensors = HashMap::new();
    for key in unet_store.keys() {
        if COPIED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            tensors.insert(key.to_string(), unet_store.load(key, DType::F32, model.device())?);
        }
    }
    let device = model.device();
    let prefix = "controlnet_cond_embedding";
    let mut embedding_layers = vec![(format!("{prefix}.conv_in"), embedding[0], conditioning_channels)];
    for i in 0..embedding.len() - 1 {
        embedding_layers.push((format!("{prefix}.blocks.{}", 2 * i), embedding[i], embedding[i]));
        embedding_layers.push((format!("{prefix}.blocks.{}", 2 * i + 1), embedding[i + 1], embedding[i]));
    }
    let shapes: Vec<(String, Vec<usize>)> = embedding_layers
        .iter()
        .flat_map(|(name, out, inp)| {
            [(format!("{name}.weight"), vec![*out, *inp, 3, 3]), (format!("{name}.bias"), vec![*out])]
        })
        .collect();
    tensors.extend(pytorch_default(&shapes, seed, device)?);
    let blocks = &model.unet.config().blocks;
    let mut zeros = |name: String, out: usize, inp: usize, k: usize| -> Result<()> {
        tensors.insert(format!("{name}.weight"), Tensor::zeros((out, inp, k, k), DType::F32, device)?);
        tensors.insert(format!("{name}.bias"), Tensor::zeros(out, DType::F32, device)?);
        Ok(())
    };
    zeros(format!("{prefix}.conv_out"), blocks[0].channels, embedding[embedding.len() - 1], 3)?;
    // One zero convolution per skip: conv_in's, each layer's, each downsampler's.
    let mut skips = vec![blocks[0].channels];
    for (i, block) in blocks.iter().enumerate() {
        skips.extend(std::iter::repeat_n(block.channels, block.layers));
        if i + 1 < blocks.len() {
            skips.push(block.channels);
        }
    }
    for (i, &ch) in skips.iter().enumerate() {
        zeros(format!("controlnet_down_blocks.{i}"), ch, ch, 1)?;
    }
    let last = blocks[blocks.len() - 1].channels;
    zeros("controlnet_mid_block".into(), last, last, 1)?;
    Ok((config, Arc::new(TensorStore::from_tensors("<new ControlNet>", tensors))))
}

/// Every weight of a ControlNet.
struct ControlNetTrainee {
    controlnet: ControlNet,
    config_json: Value,
    params: Vec<(String, Var)>,
    /// What it started from (`unet`, or the folder).
    start: String,
}

impl Trainee for ControlNetTrainee {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn uses_conditions(&self) -> bool {
        true
    }

    fn controls(&self, batch: &StepBatch<'_>, _rng: &mut StdRng) -> Result<UNetControls> {
        let conditions = batch.conditions.ok_or_else(|| Error::invalid("a ControlNet step needs condition images"))?;
        let residuals = self.controlnet.forward(
            batch.noisy,
            batch.timesteps,
            batch.conditioning,
            conditions,
            ResidualScale::Uniform(1.0),
        )?;
        Ok(residuals.into_controls())
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        vec![("controlnet_start", self.start.clone())]
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        write_model_folder(output, &self.config_json, detached(&self.params), export_metadata(options, step))
    }
}
