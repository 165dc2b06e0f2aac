//! Input-channel control: condition latents concatenated to the UNet's input at `conv_in` at every
//! call. IC-Light (lllyasviel) relights a foreground this way: its weight files are offsets to every
//! tensor of an SD1.5 UNet whose `conv_in` is widened to take the foreground's latents (`fc`, 8
//! input channels) or the foreground's and the background's (`fbc`, 12). (Inpainting UNets take
//! extra channels too; that lives in [`crate::pipeline::init_image`] because it also decides where
//! sampling starts.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::io::weights::TensorStore;
use crate::models::image_processor::{Filter, pil_resize};
use crate::models::vae::Vae;
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// An IC-Light weight file: offsets to the base UNet's tensors (diffusers names).
pub struct IcLight {
    path: PathBuf,
    offsets: Arc<TensorStore>,
}

impl IcLight {
    /// Opens an offset file (`iclight_sd15_fc.safetensors`, `iclight_sd15_fbc.safetensors`).
    pub fn open(path: &Path) -> Result<Self> {
        let offsets = Arc::new(TensorStore::open(path)?);
        let Some(shape) = offsets.shape("conv_in.weight") else {
            return Err(Error::Format {
                path: path.into(),
                message: "no `conv_in.weight` offset: not an IC-Light file (offsets in diffusers UNet names)".into(),
            });
        };
        if shape.len() != 4 {
            return Err(Error::Format {
                path: path.into(),
                message: format!("`conv_in.weight` has shape {shape:?}, expected a 4-d convolution weight"),
            });
        }
        Ok(Self { path: path.into(), offsets })
    }

    /// The UNet input channels the file expects (latents plus condition latents).
    pub fn input_channels(&self) -> usize {
        self.offsets.shape("conv_in.weight").map_or(0, |s| s[1])
    }

    /// Adds the offsets to `model`'s UNet (its `conv_in` widened with zeros first), as the
    /// official demo merges them.
    pub fn apply(&self, model: &mut StableDiffusion) -> Result<()> {
        let latent = model.vae.config().latent_channels;
        let channels = self.input_channels();
        if channels <= latent || !(channels - latent).is_multiple_of(latent) {
            return Err(Error::Format {
                path: self.path.clone(),
                message: format!(
                    "`conv_in.weight` takes {channels} input channels; IC-Light takes the {latent} latent channels \
                     and {latent} per condition image"
                ),
            });
        }
        model.merge_unet_offsets(&self.offsets, channels)
    }
}

/// Condition latents [1, k·lc, h, w] of `images` (the foreground, then the background) for an
/// output of `width` x `height`, as the IC-Light demo makes them: each image resized to cover the
/// output and center-cropped, scaled by `x / 127 − 1` (so gray 127 is exactly 0), encoded to its
/// VAE posterior mean times the scaling factor, and the images' latents joined along channels.
pub fn condition_latents(
    vae: &Vae,
    images: &[RgbImage],
    (width, height): (usize, usize),
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut latents = Vec::with_capacity(images.len());
    for img in images {
        let fitted = resize_and_center_crop(img, width, height)?;
        let pixels: Vec<f32> = fitted.as_raw().iter().map(|&v| f32::from(v) / 127.0 - 1.0).collect();
        let pixels = Tensor::from_vec(pixels, (height, width, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?;
        let dist = vae.encode(&pixels.contiguous()?.to_dtype(dtype)?)?;
        latents.push((dist.mean.to_dtype(DType::F32)? * vae.config().scaling_factor)?);
    }
    Ok(Tensor::cat(&latents, 1)?)
}

/// The demo's `resize_and_center_crop`: scale by the larger of the two ratios (sizes rounded half
/// to even, as Python's `round`), Lanczos-resize, then crop the centered box (its corners rounded
/// half to even, as Pillow's `crop`).
fn resize_and_center_crop(img: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    let (w0, h0) = (img.width() as f64, img.height() as f64);
    if w0 == 0.0 || h0 == 0.0 || width == 0 || height == 0 {
        return Err(Error::invalid("an IC-Light condition image and the output must be non-empty"));
    }
    let scale = (width as f64 / w0).max(height as f64 / h0);
    let (rw, rh) = ((w0 * scale).round_ties_even() as usize, (h0 * scale).round_ties_even() as usize);
    let resized = pil_resize(img, rw.max(width), rh.max(height), Filter::Lanczos);
    let (rw, rh) = (resized.width() as usize, resized.height() as usize);
    let left = ((rw - width) as f64 / 2.0).round_ties_even() as u32;
    let top = ((rh - height) as f64 / 2.0).round_ties_even() as u32;
    Ok(image::imageops::crop_imm(&resized, left, top, width as u32, height as u32).to_image())
}
