//! LoRA flags of `diffctl generate`: `--lora FILE[:SCALE]` (repeatable), `--lora-mode`, `--strict-lora`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::control::weights::{Lora, LoraMode};
use crate::pipeline::StableDiffusion;

/// A `--lora` value: a file and its multiplier.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    path: PathBuf,
    scale: f64,
}

/// `FILE` or `FILE:SCALE` (the last `:` starts the scale only when a number follows it).
fn parse_lora_spec(s: &str) -> Result<LoraSpec, String> {
    if let Some((path, scale)) = s.rsplit_once(':')
        && let Ok(scale) = scale.parse::<f64>()
    {
        if !scale.is_finite() {
            return Err(format!("LoRA multiplier {scale} is not a finite number"));
        }
        return Ok(LoraSpec { path: path.into(), scale });
    }
    Ok(LoraSpec { path: s.into(), scale: 1.0 })
}

/// LoRA flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct LoraArgs {
    /// A LoRA, LoHa or LoKr file (kohya, diffusers/PEFT or LyCORIS layout; .safetensors, .bin, .pt)
    /// with an optional multiplier, e.g. style.safetensors:0.7. Repeat for several.
    #[arg(long, value_name = "FILE[:SCALE]", value_parser = parse_lora_spec)]
    lora: Vec<LoraSpec>,
    /// How LoRAs are applied: fused (added into the weights once) or unfused (added to each layer's
    /// output at every step, base weights untouched).
    #[arg(long, default_value = "fused", value_name = "MODE", value_parser = |s: &str| s.parse::<LoraMode>().map_err(|e| e.to_string()))]
    lora_mode: LoraMode,
    /// Fail when a LoRA file has keys that match no layer of the model (default: a one-line warning).
    #[arg(long)]
    strict_lora: bool,
}

impl LoraArgs {
    /// Reads every `--lora` and attaches it to `model`.
    pub fn apply(&self, model: &mut StableDiffusion) -> anyhow::Result<()> {
        let device = model.device().clone();
        for (i, spec) in self.lora.iter().enumerate() {
            let lora = Lora::load(&spec.path, &model.layers, &device)?;
            if !lora.unmatched.is_empty() {
                let message = format!(
                    "{} keys of {} match no layer of the model (first: `{}`)",
                    lora.unmatched.len(),
                    spec.path.display(),
                    lora.unmatched[0]
                );
                if self.strict_lora {
                    bail!("{message}");
                }
                eprintln!("warning: {message}; --strict-lora makes this an error");
            }
            let name = format!("{}#{i}", spec.path.display());
            model.attach_lora(&name, &lora, spec.scale, self.lora_mode)?;
        }
        Ok(())
    }
}
