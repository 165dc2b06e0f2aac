//! SDXL flags of `diffctl generate`: the second encoder's prompts and the size and crop
//! conditioning.

use clap::Args;

use crate::pipeline::{MicroConditioning, SizeConditioning};
use crate::request::{RefinerSpec, Request};

/// SDXL flags of `diffctl generate` (ignored by SD1.x/2.x models).
#[derive(Debug, Args)]
pub struct SdxlArgs {
    /// SDXL: the prompt for the second text encoder [default: --prompt].
    #[arg(long, value_name = "TEXT")]
    prompt_2: Option<String>,
    /// SDXL: the negative prompt for the second text encoder [default: --negative-prompt].
    #[arg(long, value_name = "TEXT")]
    negative_prompt_2: Option<String>,
    /// SDXL: the size the image is said to have had before cropping [default: the output size].
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    original_size: Option<(usize, usize)>,
    /// SDXL: the top-left corner of the crop, as X,Y pixels [default: 0,0].
    #[arg(long, value_name = "X,Y", value_parser = parse_corner)]
    crop_top_left: Option<(usize, usize)>,
    /// SDXL: the size the image is said to be made at [default: the output size].
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    target_size: Option<(usize, usize)>,
    /// SDXL: the negative prompt's original size (with --negative-target-size) [default: as the prompt's].
    #[arg(long, value_name = "WxH", value_parser = parse_size, requires = "negative_target_size")]
    negative_original_size: Option<(usize, usize)>,
    /// SDXL: the negative prompt's crop corner [default: 0,0].
    #[arg(long, value_name = "X,Y", value_parser = parse_corner, requires = "negative_original_size")]
    negative_crop_top_left: Option<(usize, usize)>,
    /// SDXL: the negative prompt's target size (with --negative-original-size).
    #[arg(long, value_name = "WxH", value_parser = parse_size, requires = "negative_original_size")]
    negative_target_size: Option<(usize, usize)>,
    /// SDXL: a refiner model (folder) that finishes the generation from the base's latents
    /// (diffusers' ensemble of experts).
    #[arg(long, value_name = "PATH")]
    refiner: Option<std::path::PathBuf>,
    /// SDXL: the fraction of the schedule the base runs before the refiner takes over.
    #[arg(long, default_value_t = 0.8, value_name = "F", requires = "refiner")]
    refiner_start: f64,
    /// SDXL refiner: the aesthetic score the image is conditioned on [default: 6].
    #[arg(long, value_name = "F")]
    aesthetic_score: Option<f64>,
    /// SDXL refiner: the negative prompt's aesthetic score [default: 2.5].
    #[arg(long, value_name = "F")]
    negative_aesthetic_score: Option<f64>,
}

/// `WxH` as (height, width).
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT"))?;
    let number = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("`{s}` is not WIDTHxHEIGHT"));
    Ok((number(h)?, number(w)?))
}

/// `X,Y` as (top, left).
fn parse_corner(s: &str) -> Result<(usize, usize), String> {
    let (x, y) = s.split_once(',').ok_or_else(|| format!("`{s}` is not X,Y"))?;
    let number = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("`{s}` is not X,Y"));
    Ok((number(y)?, number(x)?))
}

impl SdxlArgs {
    /// Sets the SDXL fields of `request`.
    pub fn add_to(&self, request: &mut Request) {
        request.prompt_2 = self.prompt_2.clone();
        request.refiner = self.refiner.clone().map(|model| RefinerSpec { model, start: self.refiner_start });
        request.negative_prompt_2 = self.negative_prompt_2.clone();
        request.micro_conditioning = MicroConditioning {
            original_size: self.original_size,
            crop_top_left: self.crop_top_left.unwrap_or((0, 0)),
            target_size: self.target_size,
            negative: self.negative_original_size.zip(self.negative_target_size).map(|(original_size, target_size)| {
                SizeConditioning {
                    original_size,
                    crop_top_left: self.negative_crop_top_left.unwrap_or((0, 0)),
                    target_size,
                }
            }),
            aesthetic_score: self.aesthetic_score,
            negative_aesthetic_score: self.negative_aesthetic_score,
        };
    }
}
