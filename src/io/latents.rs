//! Latents as safetensors files holding one tensor named `latents` ([B, C, h, w]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::input::{MAX_LATENTS_BYTES, read_limited};
use super::output::{OutputFiles, write_safetensors};
use crate::models::nn::all_finite;
use crate::{Error, Result};

/// The tensor name used in latents files.
pub const LATENTS_KEY: &str = "latents";

/// Reads the `latents` tensor ([B, C, h, w], any float dtype) from a safetensors file, as f32.
///
/// The file must be a regular file of at most [`MAX_LATENTS_BYTES`] whose header names no tensor
/// twice; the tensor must have no zero-sized dimension and only finite values.
pub fn load_latents(path: &Path, device: &Device) -> Result<Tensor> {
    let format = |message: String| Error::Format { path: path.into(), message };
    let bytes = read_limited(path, MAX_LATENTS_BYTES)?;
    super::mapped_safetensors::check_header(&bytes)
        .map_err(|e| format(format!("not a readable safetensors file: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| format(format!("not a readable safetensors file: {e}")))?;
    drop(bytes);
    let latents =
        tensors.get(LATENTS_KEY).ok_or_else(|| Error::MissingTensor { path: path.into(), key: LATENTS_KEY.into() })?;
    if latents.rank() != 4 {
        return Err(format(format!(
            "tensor `latents` has shape {:?}, expected [batch, channels, height, width]",
            latents.dims()
        )));
    }
    if latents.dims().contains(&0) {
        return Err(format(format!(
            "tensor `latents` has shape {:?}: every dimension (batch, channels, height, width) must be at least 1",
            latents.dims()
        )));
    }
    if !latents.dtype().is_float() {
        return Err(format(format!("tensor `latents` is {:?}, expected a float dtype", latents.dtype())));
    }
    let latents = latents.to_dtype(DType::F32)?;
    if !all_finite(&latents)? {
        return Err(format("tensor `latents` holds non-finite values (NaN or infinity)".into()));
    }
    Ok(latents.to_device(device)?)
}

/// Writes `latents` to a safetensors file under the name `latents`, all or nothing.
pub fn save_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let mut outputs = OutputFiles::new();
    stage_latents(&mut outputs, path, latents)?;
    outputs.commit()
}

/// Stages `latents` as the safetensors file `path` in `outputs`, written when they are committed.
pub fn stage_latents(outputs: &mut OutputFiles, path: &Path, latents: &Tensor) -> Result<()> {
    let latents = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    outputs.stage(path, |file| {
        write_safetensors(file, vec![(LATENTS_KEY.to_string(), latents)], None)
            .map_err(|e| Error::Format { path: path.into(), message: format!("could not write latents: {e}") })
    })
}
