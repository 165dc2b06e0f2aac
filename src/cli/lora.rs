//! LoRA flags of `diffctl generate`: `--lora FILE[:SCALE]` (repeatable), `--lora-mode`, `--strict-lora`.

use clap::Args;

use crate::control::weights::LoraMode;
use crate::request::{LoraSpec, Request};

/// `FILE` or `FILE:SCALE` (the last `:` starts the scale only when a number follows it; the request
/// refuses a scale that is not finite).
fn parse_lora_spec(s: &str) -> Result<LoraSpec, String> {
    if let Some((path, scale)) = s.rsplit_once(':')
        && let Ok(scale) = scale.parse::<f64>()
    {
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
    /// Adds every `--lora` and the LoRA options to `request`.
    pub fn add_to(&self, request: &mut Request) {
        request.loras.extend(self.lora.iter().cloned());
        request.lora_mode = self.lora_mode;
        request.strict_lora = self.strict_lora;
    }
}
