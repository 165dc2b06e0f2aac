//! ControlNet 1.x files in their original layout (`control_model.*`, `.pth`/`.safetensors`), as
//! lllyasviel publishes them: the structure is the base UNet's input half, so the config comes from
//! the base model; the condition-embedding widths are read from the file.

use std::path::Path;
use std::sync::Arc;

use super::ldm::{CONTROLNET_PREFIX, KeyMap};
use super::weights::TensorStore;
use crate::models::controlnet::ControlNetConfig;
use crate::models::unet::UNetConfig;
use crate::{Error, Result};

/// Whether `store` holds an original-layout ControlNet.
pub fn is_original_controlnet(store: &TensorStore) -> bool {
    store.contains(&format!("{CONTROLNET_PREFIX}input_hint_block.0.weight"))
}

/// Opens an original-layout ControlNet file for a model whose UNet is `base`: its config and its
/// tensors under diffusers names.
pub fn open(path: &Path, base: &UNetConfig) -> Result<(ControlNetConfig, Arc<TensorStore>)> {
    let store = TensorStore::open(path)?;
    if !is_original_controlnet(&store) {
        return Err(Error::Format {
            path: path.into(),
            message: format!(
                "not a ControlNet: no `{CONTROLNET_PREFIX}input_hint_block.*` tensors (and not a diffusers ControlNet folder)"
            ),
        });
    }
    // input_hint_block: convolutions at even indices; channels change at 0 and at every stride-2
    // convolution (indices 4, 8, ...); the last convolution maps to the UNet's width.
    let conv_out = |index: usize| -> Option<Vec<usize>> {
        store.shape(&format!("{CONTROLNET_PREFIX}input_hint_block.{index}.weight")).map(<[usize]>::to_vec)
    };
    let first =
        conv_out(0).filter(|s| s.len() == 4).ok_or_else(|| store.missing("control_model.input_hint_block.0.weight"))?;
    let mut channels = vec![first[0]];
    let mut last = 0;
    while conv_out(last + 2).is_some() {
        last += 2;
    }
    for index in (4..last).step_by(4) {
        let shape =
            conv_out(index).ok_or_else(|| store.missing(&format!("control_model.input_hint_block.{index}.weight")))?;
        channels.push(shape[0]);
    }
    if last < 2 || (last / 2 - 1) != 2 * (channels.len() - 1) {
        return Err(Error::Format {
            path: path.into(),
            message: format!("unexpected `input_hint_block` layout (last convolution at index {last})"),
        });
    }
    let config = ControlNetConfig::for_base(base, first[1], channels);
    let view = Arc::new(KeyMap::controlnet(&config)).view(&store)?;
    Ok((config, Arc::new(view)))
}
