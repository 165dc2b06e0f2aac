//! img2img and inpainting: sampling that starts from an image instead of pure noise, as diffusers'
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` do.
//!
//! - img2img: the image's latents are noised to the level of step `steps − ⌊steps·strength⌋` and
//!   only the remaining steps run.
//! - Inpainting with an inpainting UNet (`in_channels` = 2·latent channels + 1): the mask and the
//!   masked image's latents are concatenated to the latents before `conv_in` at every call.
//! - Inpainting with a plain UNet: after every step the original latents, noised to the next
//!   step's level, are put back outside the mask.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::models::image_processor::{Filter, pil_resize};
use crate::models::vae::Vae;
use crate::preprocess::gray::luma;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

/// What img2img starts from.
#[derive(Debug, Clone)]
pub enum InitSource {
    /// An image [1, 3, H, W] in [0, 1], encoded by the VAE.
    Pixels(Tensor),
    /// Latents [1, C, h, w] as the UNet sees them (scaled), used as they are: hires fix's latent
    /// upscale starts the second pass from the first pass's latents, enlarged.
    Latents(Tensor),
}

/// The image img2img and inpainting start from, prepared at the output size.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The image or latents.
    pub source: InitSource,
    /// How much of the schedule runs (diffusers' `strength`), in (0, 1]: 1 starts from noise.
    pub strength: f64,
    /// Inpainting: where to repaint, [1, 1, H, W] of 0 (keep) and 1 (repaint).
    pub mask: Option<Tensor>,
}

impl InitImage {
    /// Prepares an image (and a mask, white = repaint) as diffusers' `VaeImageProcessor` does:
    /// both resized to `width` x `height` with Lanczos where their size differs, the mask converted
    /// to luma, blurred first by `mask_blur` (Pillow's GaussianBlur at the mask's own size, as
    /// `mask_processor.blur`) when given, and binarised at one half.
    pub fn new(
        image: &RgbImage,
        mask: Option<&RgbImage>,
        mask_blur: Option<f64>,
        (width, height): (usize, usize),
        strength: f64,
        device: &Device,
    ) -> Result<Self> {
        check_strength(strength)?;
        let image = crate::io::image::rgb_to_tensor(&pil_resize(image, width, height, Filter::Lanczos), device)?;
        let mask = mask
            .map(|mask| -> Result<Tensor> {
                // Luma first, then the resize, as Pillow's convert("L") before resize; the three
                // equal channels of the gray image resize as the one channel would.
                let gray = luma(mask);
                let gray = match mask_blur {
                    Some(sigma) => crate::preprocess::blur::gaussian_blur(&gray, sigma),
                    None => gray,
                };
                let gray = RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
                    let v = gray.get_pixel(x, y).0[0];
                    image::Rgb([v, v, v])
                });
                let gray = pil_resize(&gray, width, height, Filter::Lanczos);
                let binary: Vec<f32> =
                    gray.pixels().map(|p| if f32::from(p.0[0]) / 255.0 < 0.5 { 0.0 } else { 1.0 }).collect();
                Ok(Tensor::from_vec(binary, (1, 1, height, width), device)?)
            })
            .transpose()?;
        Ok(Self { source: InitSource::Pixels(image), strength, mask })
    }

    /// Starts img2img from `latents` [1, C, h, w] (no mask: inpainting needs an image).
    pub fn from_latents(latents: Tensor, strength: f64) -> Result<Self> {
        check_strength(strength)?;
        if latents.dims4()?.0 != 1 {
            return Err(Error::invalid(format!(
                "init latents {:?}: give one image's latents [1, C, h, w]",
                latents.dims()
            )));
        }
        Ok(Self { source: InitSource::Latents(latents.to_dtype(DType::F32)?), strength, mask: None })
    }
}

/// Checks a mask blur is a finite, non-negative number of pixels.
pub fn check_mask_blur(pixels: f64) -> Result<()> {
    if !(pixels.is_finite() && (0.0..=256.0).contains(&pixels)) {
        return Err(Error::invalid(format!("mask blur {pixels} must be between 0 and 256 pixels")));
    }
    Ok(())
}

/// Checks a strength is in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid(format!("strength {strength} is outside (0, 1]")));
    }
    Ok(())
}

/// The index of the first timestep that runs for `strength` out of a schedule of `steps` steps,
/// each `order` timesteps long (diffusers' `get_timesteps`: the last ⌊steps·strength⌋ steps run),
/// or `None` when no step would.
pub fn first_step(steps: usize, strength: f64, order: usize) -> Option<usize> {
    let run = ((steps as f64 * strength) as usize).min(steps);
    (run > 0).then_some((steps - run) * order)
}

/// Where sampling from an init image starts.
pub(super) struct ImageStart {
    /// The index of the first step that runs.
    pub first_step: usize,
    /// The starting latents [B, lc, h, w] (f32), noised to the first step's level.
    pub latents: Tensor,
    /// An inpainting UNet's extra input channels [B, 1 + lc, h, w]: the mask and the masked image's
    /// latents (not repeated for guidance).
    pub extra_channels: Option<Tensor>,
    /// A plain UNet's inpainting: what is put back outside the mask after every step.
    pub keep_outside_mask: Option<KeepOutsideMask>,
}

/// What a plain (4-channel) UNet's inpainting puts back outside the mask after every step.
pub(super) struct KeepOutsideMask {
    /// The original image's latents [B, lc, h, w] (f32).
    image_latents: Tensor,
    /// The mask at latent size [1, 1, h, w] (1 = repaint).
    mask: Tensor,
    /// The starting noise [B, lc, h, w], which noises the original to every step's level.
    noise: Tensor,
}

impl KeepOutsideMask {
    /// `latents` after step `step_index` with the original, noised to the level of the next step
    /// (none after the last), put back outside the mask.
    pub fn apply(&self, scheduler: &dyn Scheduler, step_index: usize, latents: &Tensor) -> Result<Tensor> {
        let original = if step_index + 1 < scheduler.timesteps().len() {
            scheduler.add_noise(&self.image_latents, &self.noise, step_index + 1)?
        } else {
            self.image_latents.clone()
        };
        let keep = (1.0 - &self.mask)?;
        Ok((original.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
}

/// Sets up sampling from `init`: which steps run, the starting latents from `noise` [B, lc, h, w],
/// and what inpainting adds. `unet_channels` is the UNet's `in_channels`; the VAE runs in `dtype`.
pub(super) fn start(
    init: &InitImage,
    vae: &Vae,
    unet_channels: usize,
    scheduler: &dyn Scheduler,
    steps: usize,
    noise: &Tensor,
    dtype: DType,
) -> Result<ImageStart> {
    check_strength(init.strength)?;
    let (batch, lc, h, w) = noise.dims4()?;
    let f = vae.config().scale_factor();
    let total = scheduler.timesteps().len();
    let Some(first) = first_step(steps, init.strength, scheduler.order()).filter(|&first| first < total) else {
        return Err(Error::invalid(format!(
            "strength {} leaves no step of {steps} to run (give more steps or a higher strength)",
            init.strength
        )));
    };
    let encode = |pixels: &Tensor| -> Result<Tensor> {
        let latents = vae.encode_mean_latents(&((pixels * 2.0)? - 1.0)?.to_dtype(dtype)?)?;
        Ok(latents.repeat((batch, 1, 1, 1))?)
    };
    let (image, image_latents) = match &init.source {
        InitSource::Pixels(image) => {
            let (_, _, ih, iw) = image.dims4()?;
            if (ih, iw) != (h * f, w * f) {
                return Err(Error::invalid(format!(
                    "the init image is {iw}x{ih} pixels, the generation {}x{}",
                    w * f,
                    h * f
                )));
            }
            (Some(image), encode(image)?)
        }
        InitSource::Latents(latents) => {
            if latents.dims4()? != (1, lc, h, w) {
                return Err(Error::invalid(format!(
                    "the init latents are {:?}, the generation's [1, {lc}, {h}, {w}]",
                    latents.dims()
                )));
            }
            (None, latents.to_device(noise.device())?.repeat((batch, 1, 1, 1))?)
        }
    };
    let noised = || scheduler.add_noise(&image_latents, noise, first);
    let Some(mask) = &init.mask else {
        if unet_channels != lc {
            return Err(Error::invalid(format!(
                "the UNet takes {unet_channels} input channels (an inpainting model): give a mask with the init image"
            )));
        }
        return Ok(ImageStart { first_step: first, latents: noised()?, extra_channels: None, keep_outside_mask: None });
    };
    let Some(image) = image else {
        return Err(Error::invalid("inpainting needs an init image, not init latents"));
    };
    let (_, _, ih, iw) = image.dims4()?;
    let (_, _, mh, mw) = mask.dims4()?;
    if (mh, mw) != (ih, iw) {
        return Err(Error::invalid(format!("the mask is {mw}x{mh} pixels, the init image {iw}x{ih}")));
    }
    // At full strength inpainting starts from pure noise; below it, from the noised image.
    let latents = if init.strength == 1.0 { (noise * scheduler.init_noise_sigma())? } else { noised()? };
    let latent_mask = nearest_resize(mask, h, w)?;
    if unet_channels == 2 * lc + 1 {
        let keep = (1.0 - mask.ge(0.5)?.to_dtype(DType::F32)?)?;
        // diffusers masks the image in [-1, 1] (masked pixels become 0, mid gray); `encode` takes [0, 1].
        let masked = ((image * 2.0)? - 1.0)?.broadcast_mul(&keep)?;
        let masked_image = ((masked + 1.0)? / 2.0)?;
        let masked_latents = encode(&masked_image)?;
        let extra = Tensor::cat(&[&latent_mask.repeat((batch, 1, 1, 1))?, &masked_latents], 1)?;
        Ok(ImageStart { first_step: first, latents, extra_channels: Some(extra), keep_outside_mask: None })
    } else if unet_channels == lc {
        let keep_outside_mask = KeepOutsideMask { image_latents, mask: latent_mask, noise: noise.clone() };
        Ok(ImageStart { first_step: first, latents, extra_channels: None, keep_outside_mask: Some(keep_outside_mask) })
    } else {
        Err(Error::invalid(format!(
            "the UNet takes {unet_channels} input channels; inpainting needs {lc} (a plain model) or {} (an \
             inpainting model)",
            2 * lc + 1
        )))
    }
}

/// `x` [N, C, H, W] resized to `h` x `w` by PyTorch's default `interpolate` (nearest: source index
/// ⌊i · in/out⌋ with the ratio in f32).
fn nearest_resize(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let idx: Vec<u32> = (0..output).map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Ok(Tensor::from_vec(idx, output, x.device())?)
    };
    Ok(x.index_select(&indices(ih, h)?, 2)?.index_select(&indices(iw, w)?, 3)?)
}
