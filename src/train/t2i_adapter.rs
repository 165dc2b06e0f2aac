//! T2I-Adapter training (diffusers' `train_t2i_adapter_sdxl.py`, on SD1.x/2.x models as
//! TencentARC's full adapter): a new adapter with PyTorch's default initialisation (or an existing
//! one) trains on images paired with condition images, its features added inside the frozen
//! UNet's down blocks, with the script's objective (cubic timesteps, Euler noise levels, the
//! σ⁻²-weighted error of the denoised latents); the result is a diffusers T2IAdapter folder, which
//! `--t2i-adapter` and diffusers' `T2IAdapter.from_pretrained` load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Var};
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::dataset::Dataset;
use super::init::pytorch_default;
use super::objective::{DenoisingObjective, Target};
use super::run::{
    StepBatch, StepObjective, StepReport, Trainee, TrainingOptions, check, check_conditions, check_output_folder,
    detached, export_metadata, run_steps, write_model_folder,
};
use crate::io::diffusers_folder::open_weights_in;
use crate::io::weights::{TensorStore, TrainableParameters, Weights};
use crate::models::t2i_adapter::{T2IAdapter, T2IAdapterConfig};
use crate::models::unet::UNetControls;
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// Where a T2I-Adapter run starts.
#[derive(Debug, Clone)]
pub enum T2IAdapterStart {
    /// A new full adapter for `model`'s UNet: one stage per down block, of its widths, with this
    /// many residual blocks each.
    New {
        /// Residual blocks per stage (TencentARC's adapters have 2).
        res_blocks: usize,
    },
    /// An existing diffusers T2IAdapter folder, trained further.
    Folder(PathBuf),
}

/// Trains a T2I-Adapter for `model` (frozen; ε-prediction, as the script's objective needs) with
/// `data`, whose examples carry condition images, and writes it to the folder `output`; `on_step`
/// hears of every step.
pub fn train_t2i_adapter(
    model: &StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    start: &T2IAdapterStart,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    check_conditions(data, "T2I-Adapter")?;
    if DenoisingObjective::new(&model.scheduler_config, None)?.target_kind() != Target::Noise {
        return Err(Error::invalid(
            "T2I-Adapter training uses the diffusers script's Euler objective, which needs an epsilon-prediction model; \
             this model predicts v",
        ));
    }
    if options.snr_gamma.is_some() {
        return Err(Error::invalid("min-SNR-γ weighting is not part of the T2I-Adapter objective; drop --snr-gamma"));
    }
    let (config_json, store, label) = match start {
        T2IAdapterStart::New { res_blocks } => {
            let (json, store) = new_adapter(model, *res_blocks, options.seed)?;
            (json, store, "new".to_string())
        }
        T2IAdapterStart::Folder(dir) => {
            let json: Value = crate::io::read_json(&dir.join("config.json"))?;
            (json, open_weights_in(dir)?, dir.display().to_string())
        }
    };
    let trained = match start {
        T2IAdapterStart::Folder(dir) => Some(dir.as_path()),
        T2IAdapterStart::New { .. } => None,
    };
    check_output_folder(output, trained)?;
    let config: T2IAdapterConfig = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::invalid(format!("{label}: invalid T2I-Adapter config: {e}")))?;
    config.check_fits(model.unet.config(), &label)?;
    let factor = model.vae_scale_factor();
    if config.downscale_factor != factor {
        return Err(Error::invalid(format!(
            "{label}: the adapter unshuffles images by {}, the model's latents are {factor} times smaller",
            config.downscale_factor
        )));
    }
    let trainable = TrainableParameters::new();
    let adapter = T2IAdapter::load(&Weights::new(store, DType::F32, model.device()).trainable(&trainable), &config)?;
    let trainee = T2IAdapterTrainee { adapter, config_json, params: trainable.parameters(), start: label };
    run_steps(model, data, None, options, output, &trainee, on_step)
}

/// A new full adapter's config and weights for `model`: channels the UNet's block widths, the
/// VAE's factor as the unshuffle factor, PyTorch's default initialisation seeded by `seed`.
fn new_adapter(model: &StableDiffusion, res_blocks: usize, seed: u64) -> Result<(Value, Arc<TensorStore>)> {
    if res_blocks == 0 {
        return Err(Error::invalid("a T2I-Adapter stage needs at least one residual block"));
    }
    let channels: Vec<usize> = model.unet.config().blocks.iter().map(|b| b.channels).collect();
    let config_json = json!({
        "_class_name": "T2IAdapter",
        "_diffusers_version": model.unet_files().0.get("_diffusers_version").cloned().unwrap_or(json!("0.30.0")),
        "in_channels": 3,
        "channels": channels,
        "num_res_blocks": res_blocks,
        "downscale_factor": model.vae_scale_factor(),
        "adapter_type": "full_adapter",
    });
    let config: T2IAdapterConfig = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::invalid(format!("the new T2I-Adapter's config: {e}")))?;
    let recorder = Arc::new(TensorStore::recorder());
    T2IAdapter::load(&Weights::new(recorder.clone(), DType::F32, model.device()), &config)?;
    let tensors = pytorch_default(&recorder.recorded(), seed, model.device())?;
    Ok((config_json, Arc::new(TensorStore::from_tensors("<new T2I-Adapter>", tensors))))
}

/// Every weight of a T2I-Adapter.
struct T2IAdapterTrainee {
    adapter: T2IAdapter,
    config_json: Value,
    params: Vec<(String, Var)>,
    /// What it started from (`new`, or the folder).
    start: String,
}

impl Trainee for T2IAdapterTrainee {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn objective(&self) -> StepObjective {
        StepObjective::EulerCubic
    }

    fn uses_conditions(&self) -> bool {
        true
    }

    fn controls(&self, batch: &StepBatch<'_>, _rng: &mut StdRng) -> Result<UNetControls> {
        let conditions = batch.conditions.ok_or_else(|| Error::invalid("a T2I-Adapter step needs condition images"))?;
        Ok(UNetControls { down_intrablock_residuals: self.adapter.forward(conditions)?, ..Default::default() })
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        vec![("t2i_adapter_start", self.start.clone())]
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        write_model_folder(output, &self.config_json, detached(&self.params), export_metadata(options, step))
    }
}
