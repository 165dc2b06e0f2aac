//! Flags of the commands that keep a model resident and run jobs on it (`serve`, `worker`).

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;

use crate::limits::Limits;
use crate::pipeline::LoadOptions;
use crate::server::models_dir::ModelsDir;
use crate::server::runner::RunnerSettings;

/// The model, the models folder, precision and request limits.
#[derive(Debug, Args)]
pub struct ResidentArgs {
    /// The model loaded at start: a diffusers folder or a single-file checkpoint.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// A folder laid out as A1111's models/ (Stable-diffusion/, Lora/, ControlNet/, VAE/,
    /// embeddings/, clip_vision/): its checkpoints are listed and switchable, its LoRAs,
    /// ControlNets and embeddings usable by name (a worker needs the server's, at the same path).
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    #[command(flatten)]
    source: super::source::SourceArgs,
    /// Precision of the networks: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = super::generate::parse_dtype, value_name = "DTYPE")]
    dtype: DType,
    /// Refuse requests for images of more pixels (width x height) than this.
    #[arg(long, default_value_t = 2048 * 2048, value_name = "N")]
    max_pixels: u64,
    /// Refuse requests for more images per batch than this.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_batch: usize,
}

impl ResidentArgs {
    /// The runner's settings.
    pub fn runner(&self) -> anyhow::Result<RunnerSettings> {
        if let Some(dir) = &self.models_dir
            && !dir.is_dir()
        {
            anyhow::bail!("--models-dir {}: not a folder", dir.display());
        }
        Ok(RunnerSettings {
            model: self.model.clone(),
            models_dir: ModelsDir::new(self.models_dir.clone()),
            load: LoadOptions { dtype: self.dtype, files: self.source.options(), ..Default::default() },
            limits: Limits { max_pixels: self.max_pixels, max_batch: self.max_batch, max_memory: None },
        })
    }
}
