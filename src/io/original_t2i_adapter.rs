//! T2I-Adapter files in TencentARC's original layout (`conv_in`, `body.N...`, `.pth`/`.safetensors`),
//! read under diffusers names (the correspondence of diffusers' `convert_original_t2i_adapter.py`).
//! The files carry no config: the stage count comes from the base UNet (one feature per down block)
//! and the pixel-unshuffle factor from its VAE; widths and depths are read from the tensor shapes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::weights::{Rename, TensorStore};
use crate::models::t2i_adapter::{AdapterType, T2IAdapterConfig};
use crate::{Error, Result};

/// `body.{index}.{rest}` split into its index and the rest.
fn body_entry(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("body.")?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// Opens an original-layout adapter for a model with `stages` UNet down blocks whose VAE shrinks
/// images by `vae_factor`: its config and its tensors under diffusers names.
pub fn open(path: &Path, stages: usize, vae_factor: usize) -> Result<(T2IAdapterConfig, Arc<TensorStore>)> {
    let store = TensorStore::open(path)?;
    let format = |message: String| Error::Format { path: path.into(), message };
    let out_channels = |key: &str| -> Result<usize> {
        store.shape(key).and_then(|s| s.first().copied()).ok_or_else(|| store.missing(key))
    };
    let in_channels = |key: &str| -> Result<usize> {
        store.shape(key).and_then(|s| s.get(1).copied()).ok_or_else(|| store.missing(key))
    };
    let bodies = store.keys().iter().filter_map(|k| body_entry(k).map(|(i, _)| i)).max().map(|m| m + 1).unwrap_or(0);
    let light = store.contains("body.0.body.0.block1.weight");
    if bodies == 0 || (!light && !store.contains("conv_in.weight")) {
        return Err(format(
            "not a T2I-Adapter: no `conv_in` / `body.N` tensors (and not a diffusers adapter folder)".into(),
        ));
    }
    let unshuffled = if light { in_channels("body.0.in_conv.weight")? } else { in_channels("conv_in.weight")? };
    let (adapter_type, channels, num_res_blocks) = if light {
        let channels =
            (0..bodies - 1).map(|s| out_channels(&format!("body.{s}.out_conv.weight"))).collect::<Result<_>>()?;
        let res_blocks = (0..).take_while(|r| store.contains(&format!("body.0.body.{r}.block1.weight"))).count();
        (AdapterType::LightAdapter, channels, res_blocks)
    } else {
        if bodies % stages != 0 {
            return Err(format(format!("{bodies} resnets do not split into the base UNet's {stages} stages")));
        }
        let res_blocks = bodies / stages;
        let channels = (0..stages)
            .map(|s| out_channels(&format!("body.{}.block1.weight", s * res_blocks)))
            .collect::<Result<_>>()?;
        (AdapterType::FullAdapter, channels, res_blocks)
    };
    let config = T2IAdapterConfig {
        in_channels: unshuffled / (vae_factor * vae_factor),
        channels,
        num_res_blocks,
        downscale_factor: vae_factor,
        adapter_type,
    };
    let mut names = HashMap::new();
    let renames = store
        .keys()
        .into_iter()
        .map(|key| {
            let name = match body_entry(key) {
                None => format!("adapter.{key}"),
                Some((i, rest)) if light => match rest.strip_prefix("body.") {
                    Some(resnet) => format!("adapter.body.{i}.resnets.{resnet}"),
                    None => format!("adapter.body.{i}.{rest}"),
                },
                Some((i, rest)) if rest.starts_with("in_conv.") => {
                    format!("adapter.body.{}.{rest}", i / num_res_blocks)
                }
                Some((i, rest)) => format!("adapter.body.{}.resnets.{}.{rest}", i / num_res_blocks, i % num_res_blocks),
            };
            names.insert(name.clone(), key.to_string());
            Rename { name, from: key.to_string(), transform: None }
        })
        .collect();
    let view = store.view(renames, Some(Arc::new(move |name: &str| names.get(name).cloned())))?;
    Ok((config, Arc::new(view)))
}
