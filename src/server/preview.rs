//! Live previews: latents to RGB by A1111's "Approx cheap" linear map (one 4×3 matrix per model
//! family), at latent resolution.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// SD1.x/2.x latent channels to RGB (A1111's `sd_samplers_common` cheap approximation).
const SD1: [[f32; 3]; 4] =
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];
/// SDXL latent channels to RGB.
const SDXL: [[f32; 3]; 4] =
    [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]];

/// [`cheap_preview`] as a base64 PNG, for the progress route and the events; `None` where there is
/// none.
pub fn preview_base64(latents: &Tensor, sdxl: bool) -> Option<String> {
    let image = cheap_preview(latents, sdxl).ok().flatten()?;
    super::png::encode(&image, None).ok().map(|bytes| super::images::encode_base64(&bytes))
}

/// The first image of `latents` [B, 4, h, w] as an h×w RGB preview; `None` for latents of another
/// channel count.
pub fn cheap_preview(latents: &Tensor, sdxl: bool) -> Result<Option<image::RgbImage>> {
    let (_, c, h, w) = latents.dims4()?;
    if c != 4 {
        return Ok(None);
    }
    let coefficients = if sdxl { SDXL } else { SD1 };
    let matrix = Tensor::new(&coefficients, &Device::Cpu)?;
    let first = latents.get(0)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?; // [4, h, w]
    let rgb = first.reshape((4, h * w))?.t()?.matmul(&matrix)?; // [h*w, 3]
    let pixels = ((rgb + 1.0)? * 127.5)?.clamp(0.0, 255.0)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = pixels.into_iter().map(|v| v.round() as u8).collect();
    Ok(image::RgbImage::from_raw(w as u32, h as u32, bytes))
}
