//! Hires fix's upscalers (A1111's two-pass txt2img): the first pass's result is enlarged, in
//! latent space or as an image, and a second pass runs img2img on it (see
//! [`crate::request::InitImageSpec`], which takes either).

use candle_core::Tensor;
use image::RgbImage;

use crate::models::image_processor::{Filter, pil_resize};
use crate::{Error, Result};

/// How the first pass's result is enlarged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upscaler {
    /// The latents, bilinearly (A1111's "Latent": `interpolate(mode="bilinear")`).
    Latent,
    /// The latents, nearest neighbour (A1111's "Latent (nearest)").
    LatentNearest,
    /// The decoded image with Lanczos (A1111's "Lanczos", and "None": a plain resize).
    Lanczos,
    /// The decoded image, nearest neighbour (A1111's "Nearest").
    Nearest,
}

impl Upscaler {
    /// A1111's names, as `/sdapi/v1/upscalers` and `latent-upscale-modes` list them.
    pub const NAMES: [(&'static str, Upscaler); 5] = [
        ("Latent", Upscaler::Latent),
        ("Latent (nearest)", Upscaler::LatentNearest),
        ("None", Upscaler::Lanczos),
        ("Lanczos", Upscaler::Lanczos),
        ("Nearest", Upscaler::Nearest),
    ];

    /// The upscaler an A1111 name means (without regard to case).
    pub fn parse(name: &str) -> Result<Self> {
        Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.trim())).map(|(_, u)| *u).ok_or_else(|| {
            Error::invalid(format!(
                "unknown hires upscaler `{name}`; available: {}",
                Self::NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Whether it works on latents.
    pub fn is_latent(self) -> bool {
        matches!(self, Upscaler::Latent | Upscaler::LatentNearest)
    }
}

/// `latents` [B, C, h, w] enlarged to `height` x `width` latent pixels (PyTorch's `interpolate`
/// without corner alignment).
pub fn upscale_latents(latents: &Tensor, height: usize, width: usize, upscaler: Upscaler) -> Result<Tensor> {
    Ok(match upscaler {
        Upscaler::LatentNearest => latents.upsample_nearest2d(height, width)?,
        _ => latents.upsample_bilinear2d(height, width, false)?,
    })
}

/// `image` enlarged to `width` x `height` pixels: Pillow's Lanczos (A1111's "Lanczos" and "None"
/// upscalers resize with PIL), or nearest neighbour.
pub fn upscale_image(image: &RgbImage, width: u32, height: u32, upscaler: Upscaler) -> RgbImage {
    match upscaler {
        Upscaler::Nearest | Upscaler::LatentNearest => {
            image::imageops::resize(image, width, height, image::imageops::FilterType::Nearest)
        }
        _ => pil_resize(image, width as usize, height as usize, Filter::Lanczos),
    }
}
