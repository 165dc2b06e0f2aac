//! A VAE given on its own (`--vae`), replacing a model's: a diffusers VAE folder (`config.json` and
//! weights), or one weight file in the original LDM layout (`encoder.down.0.block.0…`, with or
//! without the `first_stage_model.` prefix, as `vae-ft-mse-840000-ema-pruned` or `sdxl_vae` ship)
//! or in diffusers names (`encoder.down_blocks.0.resnets.0…`).

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::diffusers_folder::open_weights_in;
use super::ldm::{KeyMap, VAE_PREFIX};
use super::model_files::Component;
use super::single_file::{infer_vae, merge};
use super::weights::{Rename, TensorStore};
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

/// Opens the VAE at `path`. A single file's structure comes from its shapes; what shapes cannot
/// show (scaling factor, norm groups, `force_upcast`) comes from `base`, the model's own VAE.
pub fn open(path: &Path, base: &Component<VaeConfig>) -> Result<Component<VaeConfig>> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(format!(
                "{}: a VAE folder needs its config.json (a diffusers AutoencoderKL folder)",
                path.display()
            )));
        }
        return Ok(Component {
            config: VaeConfig::load(&config_path)?,
            json: super::read_json(&config_path)?,
            config_path,
            weights: open_weights_in(path)?,
        });
    }
    let store = TensorStore::open(path)?;
    let format_err = |message: String| Error::Format { path: path.into(), message };
    let keys = store.keys();
    let has = |needle: &str| keys.iter().any(|k| k.contains(needle));
    if has("encoder.down_blocks.") {
        // Diffusers names: the model's config, checked against the weights when they load.
        return Ok(Component {
            config: base.config.clone(),
            json: base.json.clone(),
            config_path: path.to_path_buf(),
            weights: Arc::new(store),
        });
    }
    if !has("encoder.down.") {
        return Err(format_err(format!(
            "not a VAE: expected `encoder.down.*` (original layout) or `encoder.down_blocks.*` (diffusers) keys, \
             found {}",
            keys.iter().take(3).copied().collect::<Vec<_>>().join(", ")
        )));
    }
    // The original layout, under the prefix the single-file key map reads.
    let renames = keys
        .iter()
        .filter(|k| !k.starts_with("model.") && !k.starts_with("cond_stage_model.") && !k.starts_with("conditioner."))
        .map(|k| {
            let name = if k.starts_with(VAE_PREFIX) { k.to_string() } else { format!("{VAE_PREFIX}{k}") };
            Rename { name, from: k.to_string(), transform: None }
        })
        .collect();
    let prefixed = store.view(renames, None)?;
    let inferred = infer_vae(&prefixed)?;
    let blocks = inferred["block_out_channels"].as_array().map_or(0, Vec::len);
    // The structure is the file's own (where the base differs, the file wins); only the fields the
    // shapes cannot show come from the base.
    let (json, _) = merge(&base.json, &inferred, blocks);
    let config: VaeConfig = serde_json::from_value(json.clone())
        .map_err(|e| format_err(format!("VAE config from its shapes is invalid: {e}")))?;
    let map = Arc::new(KeyMap::vae(&config));
    Ok(Component {
        weights: Arc::new(map.view(&prefixed)?),
        config,
        json: Value::clone(&json),
        config_path: path.to_path_buf(),
    })
}
