//! Latents as safetensors files holding one tensor named `latents` ([B, C, h, w]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The tensor name used in latents files.
pub const LATENTS_KEY: &str = "latents";

/// Reads the `latents` tensor ([B, C, h, w], any float dtype) from a safetensors file, as f32.
pub fn load_latents(path: &Path, device: &Device) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::Format { path: path.into(), message: format!("not a readable safetensors file: {e}") })?;
    let latents =
        tensors.get(LATENTS_KEY).ok_or_else(|| Error::MissingTensor { path: path.into(), key: LATENTS_KEY.into() })?;
    if latents.rank() != 4 {
        return Err(Error::Format {
            path: path.into(),
            message: format!(
                "tensor `latents` has shape {:?}, expected [batch, channels, height, width]",
                latents.dims()
            ),
        });
    }
    Ok(latents.to_dtype(DType::F32)?)
}

/// Writes `latents` atomically to a safetensors file under the name `latents`.
pub fn save_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let latents = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    super::write_atomic(path, |tmp| {
        candle_core::safetensors::save(&std::collections::HashMap::from([(LATENTS_KEY, latents)]), tmp)
            .map_err(|e| Error::Format { path: path.into(), message: format!("could not write latents: {e}") })
    })
}
