//! `diffctl generate`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::io::image::{stage_png, to_rgb8};
use crate::io::latents::stage_latents;
use crate::io::output::{OutputFiles, check_output_path};
use crate::limits::Limits;
use crate::pipeline::{LoadOptions, Progress, StableDiffusion};
use crate::prompt::PromptSyntax;
use crate::request::{InitImageSpec, Request};
use crate::schedulers::{SamplerChoice, SigmaSchedule};

/// Arguments of `diffctl generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers model folder (with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    /// or a single-file SD1.x/2.x checkpoint (.safetensors, .ckpt) [default: the built-in 32x32 emoji
    /// model, which draws Fluent Emoji from their names, e.g. "red apple"].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    #[command(flatten)]
    source: super::source::SourceArgs,
    /// What to draw. Taken literally and truncated at 77 tokens, as diffusers does (see --prompt-syntax).
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long, value_name = "TEXT")]
    negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    guidance: f64,
    /// Sampler: ddim, euler, euler-a, heun, dpm2, dpm2-a, lms, dpmpp-2m, dpmpp-2m-sde, dpmpp-3m-sde, dpmpp-2s-a,
    /// dpmpp-sde, unipc, deis, pndm, lcm, tcd, ddpm, or an A1111 name ("DPM++ 2M", "Euler a", "PLMS", ...), optionally
    /// with a schedule suffix ("DPM++ 2M Karras", dpmpp-2m-karras) [default: the model's scheduler_config.json].
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// Sigma schedule: normal, karras, exponential, sgm_uniform, simple, beta, align-your-steps (10 steps; the
    /// SD1.5 or SDXL table by model) [default: the scheduler config's own].
    #[arg(long, value_name = "NAME")]
    schedule: Option<String>,
    /// Image width in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long, value_name = "W")]
    width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long, value_name = "H")]
    height: Option<usize>,
    /// Images to generate.
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Seed of the starting noise and of stochastic samplers [default: random, printed].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Skip this many final text-encoder layers (diffusers' clip_skip).
    #[arg(long, default_value_t = 0, value_name = "N")]
    clip_skip: usize,
    /// Starting noise: a safetensors file with a tensor `latents` [B,4,h,w] of standard-normal
    /// values, used like diffusers' `latents=` (batch, width and height follow from it).
    #[arg(long, value_name = "FILE")]
    init_latents: Option<PathBuf>,
    /// img2img: start from this image (resized to --width x --height, which default to its own
    /// size) instead of pure noise; with --mask, inpainting. A .safetensors file with `latents`
    /// [1, C, h, w] starts from those latents (hires fix's latent upscale).
    #[arg(long, value_name = "PNG")]
    init_image: Option<PathBuf>,
    /// How much of the schedule runs from the init image, in (0, 1]: low keeps the image, 1 redraws
    /// it [default: 0.8, or 1 with --mask].
    #[arg(long, value_name = "F", requires = "init_image")]
    strength: Option<f64>,
    /// Inpainting: repaint where this image is white (resized to the output size, binarised at
    /// half gray). An inpainting model gets mask and masked image as extra input channels; a plain
    /// model keeps the original outside the mask after every step.
    #[arg(long, value_name = "PNG", requires = "init_image")]
    mask: Option<PathBuf>,
    /// Blur the mask by this many pixels before it is resized and binarised (Pillow's
    /// GaussianBlur, as diffusers' mask_processor.blur and A1111's mask blur).
    #[arg(long, value_name = "PX", requires = "mask")]
    mask_blur: Option<f64>,
    /// What inpainting generates: the whole image, or only the masked area (A1111's "inpaint only
    /// masked", diffusers' padding_mask_crop: the area around the mask is generated at
    /// --width x --height and pasted back through the mask; the output keeps the image's size).
    #[arg(long, default_value = "whole", value_name = "AREA", value_parser = ["whole", "masked"], requires = "mask")]
    inpaint_area: String,
    /// Inpainting the whole picture: paste the original back outside the (blurred) mask after
    /// decoding, as A1111 does (diffusers and the default leave the decoded pixels everywhere).
    #[arg(long, requires = "mask")]
    keep_unmasked: bool,
    /// Pixels of context around the mask for --inpaint-area masked.
    #[arg(long, default_value_t = 32, value_name = "PX")]
    inpaint_padding: usize,
    /// Where to write the image (PNG); with --batch N > 1, NAME-0.png, NAME-1.png, ...
    #[arg(long, default_value = "output.png", value_name = "PNG")]
    output: PathBuf,
    /// Also write the final latents (before VAE decoding) to this safetensors file.
    #[arg(long, value_name = "FILE")]
    output_latents: Option<PathBuf>,
    #[command(flatten)]
    residual: super::residual::ResidualArgs,
    #[command(flatten)]
    ip_adapter: super::ip_adapter::IpAdapterArgs,
    #[command(flatten)]
    uni_controlnet: super::uni_controlnet::UniControlNetArgs,
    #[command(flatten)]
    lora: super::lora::LoraArgs,
    #[command(flatten)]
    embedding: super::embedding::EmbeddingArgs,
    #[command(flatten)]
    reference: super::reference::ReferenceArgs,
    #[command(flatten)]
    sdxl: super::sdxl::SdxlArgs,
    #[command(flatten)]
    ic_light: super::ic_light::IcLightArgs,
    /// How prompts are read: diffusers (literal, truncated at 77 tokens) or a1111 ((word:1.3),
    /// (word), [word], \( escapes, BREAK, prompts of any length in 75-token chunks).
    #[arg(long, default_value = "diffusers", value_name = "SYNTAX", value_parser = |s: &str| s.parse::<PromptSyntax>().map_err(|e| e.to_string()))]
    prompt_syntax: PromptSyntax,
    /// Decode the image in overlapping tiles (diffusers' `enable_tiling`): bounded memory for large
    /// images; slightly different pixels than a one-pass decode.
    #[arg(long)]
    vae_tiling: bool,
    /// Tile side in pixels for --vae-tiling (default: the VAE config's sample_size).
    #[arg(long, value_name = "PX", requires = "vae_tiling")]
    vae_tile_size: Option<usize>,
    /// Precision of the networks: f32, f16 or bf16 (on the CPU, f16/bf16 keep the layer weights in
    /// half precision, halving their memory, and compute in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype, value_name = "DTYPE")]
    dtype: DType,
    /// Opt-in approximation (DeepCache): run the whole UNet only every N-th call and, in between,
    /// only its shallow branch around the deep feature kept from the last whole call. Faster, with
    /// slightly different images; 1 is the same as leaving it off.
    #[arg(long, value_name = "N")]
    deep_cache: Option<usize>,
    /// The shallow branch for --deep-cache (DeepCache's cache_branch_id): branch B recomputes the
    /// down path through skip connection B (0: conv_in's output); higher is slower and closer to
    /// the exact UNet.
    #[arg(long, default_value_t = 0, value_name = "B", requires = "deep_cache")]
    deep_cache_branch: usize,
    /// Refuse images of more pixels (width x height) than this.
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_PIXELS, value_name = "N")]
    max_pixels: u64,
    /// Refuse batches of more images than this.
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_BATCH, value_name = "N")]
    max_batch: usize,
    /// Refuse generations whose activations are estimated to need more than this many GB
    /// [default: the memory available when the generation starts].
    #[arg(long, value_name = "GB")]
    max_memory: Option<f64>,
}

pub(super) fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype `{other}` (expected f32, f16 or bf16)")),
    }
}

/// The PNG paths for `count` images: `output` itself for one, numbered siblings for more. An
/// `output` that names a directory is refused (images are written only to the file names asked for).
fn image_paths(output: &Path, count: usize) -> anyhow::Result<Vec<PathBuf>> {
    let names_dir = output.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    if names_dir || output.file_name().is_none() || output.is_dir() {
        anyhow::bail!("--output {}: is a directory; give the PNG file to write, such as DIR/out.png", output.display());
    }
    if count == 1 {
        return Ok(vec![output.to_path_buf()]);
    }
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
    Ok((0..count).map(|i| output.with_file_name(format!("{stem}-{i}.png"))).collect())
}

/// `--max-memory GB` in bytes.
fn max_memory(gb: Option<f64>) -> anyhow::Result<Option<u64>> {
    match gb {
        Some(gb) if !(gb.is_finite() && gb > 0.0) => anyhow::bail!("--max-memory {gb} is not a positive number of GB"),
        Some(gb) => Ok(Some((gb * 1e9) as u64)),
        None => Ok(None),
    }
}

/// Runs `diffctl generate`: the flags become one library [`Request`]; this prints its notices and
/// progress and writes the outputs.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let (scheduler, suffix) = match args.scheduler.as_deref().map(SamplerChoice::parse).transpose()? {
        Some((kind, suffix)) => (Some(kind), suffix),
        None => (None, None),
    };
    let schedule = match (suffix, args.schedule.as_deref().map(str::parse::<SigmaSchedule>).transpose()?) {
        (Some(a), Some(b)) if a != b => anyhow::bail!("--scheduler names the {a} schedule but --schedule is {b}"),
        (a, b) => b.or(a),
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut request = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        prompt_syntax: args.prompt_syntax,
        steps: args.steps,
        guidance: args.guidance,
        scheduler,
        schedule,
        width: args.width,
        height: args.height,
        batch: args.batch,
        seed,
        clip_skip: args.clip_skip,
        init_latents: args.init_latents.clone(),
        init_image: args.init_image.as_ref().map(|image| InitImageSpec {
            image: image.clone(),
            mask: args.mask.clone(),
            mask_blur: args.mask_blur,
            only_masked_padding: (args.inpaint_area == "masked").then_some(args.inpaint_padding),
            strength: args.strength,
            keep_unmasked: args.keep_unmasked,
        }),
        vae_tiling: args.vae_tiling.then_some(args.vae_tile_size),
        deep_cache: args.deep_cache.map(|n| (n, args.deep_cache_branch)),
        ip_adapters: args.ip_adapter.request()?,
        uni_controlnet: args.uni_controlnet.request()?,
        limits: Limits {
            max_pixels: args.max_pixels,
            max_batch: args.max_batch,
            max_memory: max_memory(args.max_memory)?,
        },
        ..Request::default()
    };
    args.residual.add_to(&mut request)?;
    args.lora.add_to(&mut request);
    args.embedding.add_to(&mut request);
    args.reference.add_to(&mut request)?;
    args.sdxl.add_to(&mut request);
    args.ic_light.add_to(&mut request);
    request.validate()?;
    // Unusable output paths are refused before any work (and checked again when written).
    for path in image_paths(&args.output, args.batch)?.iter().chain(args.output_latents.as_ref()) {
        check_output_path(path)?;
    }

    let options = LoadOptions { dtype: args.dtype, files: args.source.options(), ..Default::default() };
    let model_path = match &args.model {
        Some(path) => path.clone(),
        None => crate::io::default_model::default_model().context("writing the built-in model to the cache")?,
    };
    let model = StableDiffusion::load(&model_path, &options)
        .with_context(|| format!("loading model {}", model_path.display()))?;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})")?
            .progress_chars("=> "),
    );
    let mut on_progress = |p: Progress| match p {
        Progress::Sampling { steps } => {
            bar.set_length(steps as u64);
            bar.set_message("sampling");
        }
        Progress::Step { done, .. } => bar.set_position(done as u64),
        Progress::Decoding => bar.set_message("decoding"),
    };
    let generated = request.run_once(model, &options, &mut |notice| eprintln!("{notice}"), &mut on_progress)?;
    bar.finish_and_clear();

    // Every output is staged in a temporary file beside it and all are moved into place together
    // only once all were written: a failure leaves none of them behind.
    let mut outputs = OutputFiles::new();
    if let Some(path) = &args.output_latents {
        stage_latents(&mut outputs, path, &generated.latents)?;
    }
    let images = to_rgb8(&generated.images)?;
    let paths = image_paths(&args.output, images.len())?;
    for (img, path) in images.iter().zip(&paths) {
        stage_png(&mut outputs, path, img)?;
    }
    outputs.commit()?;
    for path in &paths {
        eprintln!("wrote {} (seed {seed})", path.display());
    }
    Ok(())
}
