//! Flags telling a single-file checkpoint what its weights cannot: shared by `generate` and `convert`.

use std::path::PathBuf;

use clap::Args;

use crate::io::model_files::SourceOptions;

/// `--tokenizer`, `--model-config`, `--prediction-type`.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Tokenizer folder (replaces a diffusers folder's own) [single-file default: the --model-config
    /// folder's tokenizer/, else the bundled CLIP tokenizer].
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Diffusers config files for a non-standard single-file checkpoint (a diffusers model folder, or one
    /// with its unet/, vae/, text_encoder/, scheduler/ configs): head counts and the like that the
    /// weights cannot show.
    #[arg(long, value_name = "DIR")]
    model_config: Option<PathBuf>,
    /// Overrides the scheduler's prediction type: epsilon or v_prediction (single-file SD2.x
    /// checkpoints default to v_prediction, as the 768-v models; SD2 base models need epsilon).
    #[arg(long, value_name = "TYPE", value_parser = ["epsilon", "v_prediction"])]
    prediction_type: Option<String>,
    /// A VAE replacing the model's: a diffusers VAE folder, or one weight file in the original layout
    /// (vae-ft-mse-840000, sdxl_vae, the SDXL fp16-fix VAE) or diffusers names.
    #[arg(long, value_name = "PATH")]
    vae: Option<PathBuf>,
}

impl SourceArgs {
    /// The library's options.
    pub fn options(&self) -> SourceOptions {
        SourceOptions {
            tokenizer: self.tokenizer.clone(),
            model_config: self.model_config.clone(),
            prediction_type: self.prediction_type.clone(),
            vae: self.vae.clone(),
        }
    }
}
