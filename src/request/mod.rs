//! The library's generation request: everything one generation needs — sampling settings and every
//! mechanism with its inputs, as local paths — in one value that the CLI, the HTTP server and
//! library users build. [`Request::prepare`] checks it, applies its model-level parts and builds the
//! controls; [`Request::run_once`] does the whole generation.

pub mod ip_adapter;
pub mod residual;
pub mod uni_controlnet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::control::Control;
use crate::control::input_channels::{IcLight, condition_latents};
use crate::control::self_attention::{ReferenceOnly, ReferenceSettings};
use crate::control::weights::{Lora, LoraControl, LoraMode};
use crate::error::ResultExt;
use crate::io::image::load_rgb;
use crate::io::latents::load_latents;
use crate::limits::{GenerationShape, Limits};
use crate::models::clip_vision::ClipVisionEncoder;
use crate::models::image_processor::{ClipImageProcessor, Filter, pil_resize};
use crate::models::unet::DeepCache;
use crate::noise::SeededNoise;
use crate::pipeline::inpaint_area;
use crate::pipeline::{
    ContinueFrom, GenerateRequest, Generated, InitImage, LoadOptions, MicroConditioning, Progress, StableDiffusion,
};
use crate::prompt::PromptSyntax;
use crate::schedulers::{SchedulerKind, SigmaSchedule};
use crate::{Error, Result};

pub use ip_adapter::IpAdapterRequest;
pub use residual::{ControlNetSpec, T2IAdapterSpec};
pub use uni_controlnet::UniControlNetSpec;

/// A LoRA-family file and its multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The file (kohya, diffusers/PEFT or LyCORIS layout).
    pub path: PathBuf,
    /// Its multiplier.
    pub scale: f64,
}

/// A textual-inversion embedding and the token that names it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSpec {
    /// The file (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`).
    pub path: PathBuf,
    /// The token in prompts (default: the one a diffusers file stores, else the file name).
    pub token: Option<String>,
}

/// A reference image for reference-only control.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSpec {
    /// The reference image (resized to the output size).
    pub image: PathBuf,
    /// Mode, style fidelity and block-selection weights.
    pub settings: ReferenceSettings,
}

/// The image img2img and inpainting start from.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImageSpec {
    /// The image (resized to the output size, which defaults to its own), or a safetensors file
    /// with `latents` [1, C, h, w] to start from without encoding (hires fix's latent upscale; no
    /// mask then).
    pub image: PathBuf,
    /// Inpainting: where to repaint (white), resized to the output size.
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask by this many pixels first (Gaussian sigma, as diffusers'
    /// `mask_processor.blur` and A1111's mask blur).
    pub mask_blur: Option<f64>,
    /// Inpaint only the masked area with this padding in pixels (A1111's "inpaint only masked",
    /// diffusers' `padding_mask_crop`): the area is generated at the output size and pasted back
    /// into the image, whose size the result keeps.
    pub only_masked_padding: Option<usize>,
    /// How much of the schedule runs, in (0, 1] (default: 1 for inpainting; for img2img 0.8, or
    /// 0.3 on SDXL models, as diffusers' pipelines).
    pub strength: Option<f64>,
    /// Inpainting the whole picture: paste the original back outside the (blurred) mask after
    /// decoding, as A1111 does (diffusers leaves the decoded pixels).
    pub keep_unmasked: bool,
}

impl InitImageSpec {
    /// The strength given, or the default for inpainting or img2img (on an SDXL model when `sdxl`).
    pub fn strength(&self, sdxl: bool) -> f64 {
        self.strength.unwrap_or(match (self.mask.is_some(), sdxl) {
            (true, _) => 1.0,
            (false, true) => 0.3,
            (false, false) => 0.8,
        })
    }
}

/// An SDXL refiner that finishes the base model's generation (diffusers' ensemble of experts).
#[derive(Debug, Clone, PartialEq)]
pub struct RefinerSpec {
    /// The refiner model (a diffusers folder).
    pub model: PathBuf,
    /// The fraction of the schedule the base runs before handing over, in (0, 1) (0.8 is usual).
    pub start: f64,
}

/// IC-Light: its offset file and condition images.
#[derive(Debug, Clone, PartialEq)]
pub struct IcLightSpec {
    /// `iclight_sd15_fc.safetensors` or `iclight_sd15_fbc.safetensors` (offsets merged into the
    /// loaded model's UNet, which keeps them).
    pub path: PathBuf,
    /// The cut-out foreground (background gray 127, as the demo's matting leaves it).
    pub foreground: PathBuf,
    /// The background, for the `fbc` model.
    pub background: Option<PathBuf>,
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: Option<String>,
    /// SDXL: the second text encoder's prompt (default: the prompt).
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt (default: the negative prompt).
    pub negative_prompt_2: Option<String>,
    /// SDXL: size and crop conditioning.
    pub micro_conditioning: MicroConditioning,
    /// How prompts are read.
    pub prompt_syntax: PromptSyntax,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    pub guidance: f64,
    /// The scheduler, or the model's own.
    pub scheduler: Option<SchedulerKind>,
    /// The sigma schedule, or the scheduler config's own.
    pub schedule: Option<SigmaSchedule>,
    /// Image width in pixels (default: the model's native size).
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    pub height: Option<usize>,
    /// Images to generate.
    pub batch: usize,
    /// Seed of the starting noise, of stochastic samplers and of every mechanism that samples.
    pub seed: u64,
    /// Text-encoder layers to skip from the end.
    pub clip_skip: usize,
    /// A safetensors file with `latents` [B, C, h, w] of standard-normal starting noise.
    pub init_latents: Option<PathBuf>,
    /// img2img or inpainting: the image to start from.
    pub init_image: Option<InitImageSpec>,
    /// A refiner that finishes the generation (its mechanisms are the base's alone).
    pub refiner: Option<RefinerSpec>,
    /// IC-Light relighting.
    pub ic_light: Option<IcLightSpec>,
    /// Decode in tiles (with this tile side in pixels, or the VAE config's).
    pub vae_tiling: Option<Option<usize>>,
    /// DeepCache (interval, branch): an opt-in approximation.
    pub deep_cache: Option<(usize, usize)>,
    /// LoRAs, attached while this generation runs (the model is left as it was).
    pub loras: Vec<LoraSpec>,
    /// How LoRAs are applied.
    pub lora_mode: LoraMode,
    /// Refuse a LoRA with keys that match no layer (otherwise a warning).
    pub strict_lora: bool,
    /// Textual-inversion embeddings.
    pub embeddings: Vec<EmbeddingSpec>,
    /// ControlNets with their images.
    pub controlnets: Vec<ControlNetSpec>,
    /// T2I-Adapters with their images.
    pub t2i_adapters: Vec<T2IAdapterSpec>,
    /// IP-Adapters with their inputs.
    pub ip_adapters: IpAdapterRequest,
    /// A Uni-ControlNet with its conditions.
    pub uni_controlnet: Option<UniControlNetSpec>,
    /// Reference-only control.
    pub reference: Option<ReferenceSpec>,
    /// Resource limits checked before anything large is allocated.
    pub limits: Limits,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            micro_conditioning: MicroConditioning::default(),
            prompt_syntax: PromptSyntax::default(),
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            schedule: None,
            width: None,
            height: None,
            batch: 1,
            seed: 0,
            clip_skip: 0,
            init_latents: None,
            init_image: None,
            refiner: None,
            ic_light: None,
            vae_tiling: None,
            deep_cache: None,
            loras: Vec::new(),
            lora_mode: LoraMode::default(),
            strict_lora: false,
            embeddings: Vec::new(),
            controlnets: Vec::new(),
            t2i_adapters: Vec::new(),
            ip_adapters: IpAdapterRequest::default(),
            uni_controlnet: None,
            reference: None,
            limits: Limits::default(),
        }
    }
}

/// A message for the user that did not stop the generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Something probably unintended (e.g. LoRA keys that match no layer).
    Warning(String),
    /// What was done (e.g. the token an embedding got).
    Info(String),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Warning(m) => write!(f, "warning: {m}"),
            Notice::Info(m) => f.write_str(m),
        }
    }
}

/// A request made ready against a model: the sampling request and the controls.
pub struct Prepared {
    /// The sampling request.
    pub generate: GenerateRequest,
    /// Every mechanism's control, in the order they act.
    pub controls: Vec<Box<dyn Control>>,
    /// Messages for the user.
    pub notices: Vec<Notice>,
    /// Inpainting only the masked area: what the generated crop is pasted back into.
    pub paste_back: Option<PasteBack>,
}

/// The original image and mask that an only-masked inpainting's result is pasted back into.
pub struct PasteBack {
    image: image::RgbImage,
    mask: image::GrayImage,
    region: inpaint_area::CropBox,
}

impl Prepared {
    /// The images of `generated` as the user gets them: unchanged, or for only-masked inpainting
    /// pasted back into the original image (which then gives the size).
    pub fn postprocess(&self, generated: Generated) -> Result<Generated> {
        let Some(paste) = &self.paste_back else { return Ok(generated) };
        let device = generated.images.device().clone();
        let pasted = crate::io::image::to_rgb8(&generated.images)?
            .iter()
            .map(|crop| {
                let image = inpaint_area::paste_back(&paste.image, &paste.mask, crop, paste.region)?;
                crate::io::image::rgb_to_tensor(&image, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Generated { images: candle_core::Tensor::cat(&pasted, 0)?, ..generated })
    }
}

/// A CLIP image encoder with its preprocessing.
pub(crate) struct ImageEncoder {
    pub(crate) model: ClipVisionEncoder,
    pub(crate) processor: ClipImageProcessor,
}

impl ImageEncoder {
    /// Loads an image-encoder folder with its `preprocessor_config.json` (or CLIP's defaults).
    pub(crate) fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let model = ClipVisionEncoder::from_dir(dir, options.dtype, &options.device)?;
        let config = dir.join("preprocessor_config.json");
        let processor = if config.is_file() {
            ClipImageProcessor::load(&config)?
        } else {
            ClipImageProcessor::for_image_size(model.config().image_size)
        };
        Ok(Self { model, processor })
    }
}

/// Image encoders loaded once per request and shared by every mechanism that names the same folder.
#[derive(Default)]
pub(crate) struct ImageEncoders {
    loaded: HashMap<PathBuf, ImageEncoder>,
}

impl ImageEncoders {
    /// The encoder in `dir`, loading it on first use.
    pub(crate) fn get(&mut self, dir: &Path, options: &LoadOptions) -> Result<&ImageEncoder> {
        if !self.loaded.contains_key(dir) {
            let encoder =
                ImageEncoder::load(dir, options).context(|| format!("loading image encoder {}", dir.display()))?;
            self.loaded.insert(dir.to_path_buf(), encoder);
        }
        Ok(&self.loaded[dir])
    }
}

/// What every mechanism's builder needs: the model it will run on, how to load its files, the
/// image encoders loaded so far and the generation's size in pixels.
pub(crate) struct BuildContext<'a> {
    pub(crate) model: &'a StableDiffusion,
    pub(crate) options: &'a LoadOptions,
    pub(crate) encoders: ImageEncoders,
    pub(crate) width: usize,
    pub(crate) height: usize,
}

/// The value for each of `count` items from a list given once (for all) or once per item; `what`
/// names the list in the error.
pub fn per_item<T: Clone>(what: &str, values: &[T], count: usize, default: T) -> Result<Vec<T>> {
    match values.len() {
        0 => Ok(vec![default; count]),
        1 => Ok(vec![values[0].clone(); count]),
        n if n == count => Ok(values.to_vec()),
        n => Err(Error::invalid(format!(
            "{what} was given {n} times for {count} models (give it once, or once per model)"
        ))),
    }
}

/// Whether an init-image path names a safetensors latents file rather than an image.
fn is_latents_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

fn check_finite(name: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::invalid(format!("{name} {v} is not a finite number")));
    }
    Ok(())
}

impl Request {
    /// Checks what can be checked without any file: counts, ranges, finite numbers.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps must be at least 1"));
        }
        if self.batch == 0 {
            return Err(Error::invalid("batch must be at least 1"));
        }
        self.limits.check_size(self.batch, self.width.unwrap_or(8), self.height.unwrap_or(8))?;
        check_finite("guidance", self.guidance)?;
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v
                && (v == 0 || v % 8 != 0)
            {
                return Err(Error::invalid(format!("{name} {v} is not a positive multiple of 8")));
            }
        }
        if let Some(refiner) = &self.refiner {
            crate::pipeline::handoff::check_fraction("the refiner start", refiner.start)?;
        }
        if let Some(blur) = self.init_image.as_ref().and_then(|init| init.mask_blur) {
            crate::pipeline::init_image::check_mask_blur(blur)?;
        }
        if let Some(strength) = self.init_image.as_ref().and_then(|init| init.strength) {
            crate::pipeline::init_image::check_strength(strength)?;
        }
        for lora in &self.loras {
            check_finite(&format!("LoRA multiplier of {}", lora.path.display()), lora.scale)?;
        }
        if let Some(reference) = &self.reference {
            reference.settings.check()?;
        }
        if let Some((interval, _)) = self.deep_cache
            && interval == 0
        {
            return Err(Error::invalid("the DeepCache interval must be at least 1"));
        }
        residual::validate(&self.controlnets, &self.t2i_adapters)?;
        self.ip_adapters.validate()?;
        if let Some(uni) = &self.uni_controlnet {
            uni.validate()?;
        }
        Ok(())
    }

    /// Applies the request's model-level settings to `model` (prompt syntax, VAE tiling, embeddings)
    /// and builds its controls (LoRAs among them), loading every file it names.
    pub fn prepare(&self, model: &mut StableDiffusion, options: &LoadOptions) -> Result<Prepared> {
        self.validate()?;
        let init_latents = self.init_latents.as_deref().map(|p| load_latents(p, &options.device)).transpose()?;
        model.prompt_syntax = self.prompt_syntax;
        if let Some(tile) = self.vae_tiling {
            model.vae.enable_tiling(tile)?;
        }
        let f = model.vae_scale_factor();
        let start_latents = match &self.init_image {
            Some(init) if is_latents_file(&init.image) => {
                if init.mask.is_some() {
                    return Err(Error::invalid(format!(
                        "{}: inpainting needs an init image, not init latents",
                        init.image.display()
                    )));
                }
                Some(load_latents(&init.image, &options.device)?)
            }
            _ => None,
        };
        let init_pixels = self
            .init_image
            .as_ref()
            .filter(|_| start_latents.is_none())
            .map(|init| -> Result<_> {
                let image = load_rgb(&init.image).context(|| "reading the init image".to_string())?;
                let mask = init
                    .mask
                    .as_deref()
                    .map(|mask| load_rgb(mask).context(|| "reading the inpainting mask".to_string()))
                    .transpose()?;
                Ok((image, mask))
            })
            .transpose()?;
        // The default size: the init image's own, rounded down to whole latent pixels (as diffusers),
        // else the UNet's native one.
        let (default_width, default_height) = match (&init_pixels, &start_latents) {
            (_, Some(latents)) => {
                let (_, _, h, w) = latents.dims4()?;
                (w.saturating_mul(f), h.saturating_mul(f))
            }
            (Some((image, _)), None) => {
                let (w, h) = (image.width() as usize, image.height() as usize);
                if w < f || h < f {
                    return Err(Error::invalid(format!(
                        "the init image {} is {w}x{h} pixels, smaller than one latent pixel ({f}x{f})",
                        self.init_image.as_ref().map(|i| i.image.display().to_string()).unwrap_or_default()
                    )));
                }
                (w - w % f, h - h % f)
            }
            (None, None) => {
                let native = model.unet.config().sample_size.unwrap_or(64).saturating_mul(f);
                (native, native)
            }
        };
        let (batch, width, height) = match &init_latents {
            Some(latents) => {
                let (b, _, h, w) = latents.dims4()?;
                (b, w.saturating_mul(f), h.saturating_mul(f))
            }
            None => (self.batch, self.width.unwrap_or(default_width), self.height.unwrap_or(default_height)),
        };
        self.limits.check_size(batch, width, height)?;
        let vae_config = model.vae.config();
        self.limits.check_memory(&GenerationShape {
            batch,
            width,
            height,
            vae_factor: f,
            unet_channels: model.unet.config().blocks[0].channels,
            vae_channels: vae_config.block_out_channels.first().copied().unwrap_or(128),
            vae_tile: self.vae_tiling.map(|tile| tile.unwrap_or(vae_config.sample_size)),
            guided: self.guidance > 1.0,
        })?;
        let mut paste_back = None;
        let init_image = match (&self.init_image, &init_pixels) {
            (Some(spec), None) => match start_latents {
                Some(latents) => {
                    Some(InitImage::from_latents(latents, spec.strength(model.unet.config().add_embedding.is_some()))?)
                }
                None => None,
            },
            (Some(spec), Some((image, mask))) => {
                let strength = spec.strength(model.unet.config().add_embedding.is_some());
                match (spec.only_masked_padding, mask) {
                    (Some(pad), Some(mask)) => {
                        if mask.dimensions() != image.dimensions() {
                            return Err(Error::invalid(format!(
                                "inpainting only the masked area needs the mask at the image's size: the image is \
                                 {}x{}, the mask {}x{}",
                                image.width(),
                                image.height(),
                                mask.width(),
                                mask.height()
                            )));
                        }
                        let gray = crate::preprocess::gray::luma(mask);
                        let gray = match spec.mask_blur {
                            Some(sigma) => crate::preprocess::blur::gaussian_blur(&gray, sigma),
                            None => gray,
                        };
                        let region = inpaint_area::crop_region(&gray, width, height, pad)?;
                        let gray_rgb = image::DynamicImage::ImageLuma8(gray.clone()).to_rgb8();
                        let image_crop =
                            inpaint_area::resize_and_fill(&inpaint_area::crop(image, region), width, height);
                        let mask_crop =
                            inpaint_area::resize_and_fill(&inpaint_area::crop(&gray_rgb, region), width, height);
                        paste_back = Some(PasteBack { image: image.clone(), mask: gray, region });
                        Some(InitImage::new(
                            &image_crop,
                            Some(&mask_crop),
                            None,
                            (width, height),
                            strength,
                            model.device(),
                        )?)
                    }
                    (Some(_), None) => {
                        return Err(Error::invalid("inpainting only the masked area needs a mask"));
                    }
                    (None, _) => {
                        if let (true, Some(mask)) = (spec.keep_unmasked, mask) {
                            let gray = crate::preprocess::gray::luma(mask);
                            let gray = match spec.mask_blur {
                                Some(sigma) => crate::preprocess::blur::gaussian_blur(&gray, sigma),
                                None => gray,
                            };
                            let gray_rgb = image::DynamicImage::ImageLuma8(gray).to_rgb8();
                            let gray = pil_resize(&gray_rgb, width, height, Filter::Lanczos);
                            paste_back = Some(PasteBack {
                                image: pil_resize(image, width, height, Filter::Lanczos),
                                mask: image::DynamicImage::ImageRgb8(gray).to_luma8(),
                                region: (0, 0, width, height),
                            });
                        }
                        Some(InitImage::new(
                            image,
                            mask.as_ref(),
                            spec.mask_blur,
                            (width, height),
                            strength,
                            model.device(),
                        )?)
                    }
                }
            }
            _ => None,
        };
        let concat_latents = match &self.ic_light {
            Some(spec) => {
                let ic_light = IcLight::open(&spec.path)?;
                let groups = (ic_light.input_channels() / model.vae.config().latent_channels).saturating_sub(1);
                let mut images = vec![load_rgb(&spec.foreground).context(|| "reading the IC-Light foreground".into())?];
                if let Some(background) = &spec.background {
                    images.push(load_rgb(background).context(|| "reading the IC-Light background".into())?);
                }
                if images.len() != groups {
                    return Err(Error::invalid(format!(
                        "{} takes {groups} condition image(s) (foreground{}), {} given",
                        spec.path.display(),
                        if groups == 2 { " and background" } else { "" },
                        images.len()
                    )));
                }
                ic_light.apply(model)?;
                let (dtype, _) = crate::io::weights::precision(options.dtype, &options.device);
                Some(condition_latents(&model.vae, &images, (width, height), dtype, model.device())?)
            }
            None => None,
        };
        let mut notices = Vec::new();
        let device = model.device().clone();
        let mut loras = Vec::with_capacity(self.loras.len());
        for (i, spec) in self.loras.iter().enumerate() {
            let lora = Lora::load(&spec.path, &model.layers, &device)?;
            if let Some(first) = lora.unmatched.first() {
                let message = format!(
                    "{} keys of {} match no layer of the model (first: `{first}`)",
                    lora.unmatched.len(),
                    spec.path.display()
                );
                if self.strict_lora {
                    return Err(Error::invalid(message));
                }
                notices.push(Notice::Warning(format!("{message}; --strict-lora makes this an error")));
            }
            loras.push((format!("{}#{i}", spec.path.display()), lora, spec.scale));
        }
        for spec in &self.embeddings {
            let token = model
                .load_textual_inversion(&spec.path, spec.token.as_deref())
                .context(|| format!("loading embedding {}", spec.path.display()))?;
            notices.push(Notice::Info(format!("embedding {} as `{token}`", spec.path.display())));
        }

        let mut build = BuildContext { model, options, encoders: ImageEncoders::default(), width, height };
        let mut controls: Vec<Box<dyn Control>> = Vec::new();
        if !loras.is_empty() {
            controls.push(Box::new(LoraControl::new(loras, self.lora_mode)));
        }
        controls.extend(residual::build(&self.controlnets, &self.t2i_adapters, &build)?);
        controls.extend(self.ip_adapters.build(&mut build)?);
        if let Some(uni) = &self.uni_controlnet {
            controls.push(uni.build(&mut build)?);
        }
        if let Some(reference) = &self.reference {
            let image = load_rgb(&reference.image).context(|| "reading the reference image".to_string())?;
            controls.push(Box::new(ReferenceOnly::new(image, reference.settings)?));
        }
        let generate = GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            prompt_2: self.prompt_2.clone(),
            negative_prompt_2: self.negative_prompt_2.clone(),
            micro_conditioning: self.micro_conditioning.clone(),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            schedule: self.schedule,
            width,
            height,
            batch: self.batch,
            clip_skip: self.clip_skip,
            init_latents,
            init_image,
            denoising_end: None,
            continue_from: None,
            concat_latents,
            deep_cache: self.deep_cache.map(|(n, branch)| DeepCache::new(n, branch)).transpose()?,
        };
        Ok(Prepared { generate, controls, notices, paste_back })
    }

    /// The whole generation on a model used once (each network freed once its stage is done):
    /// [`Self::prepare`], then sampling with the request's seed, reporting notices and progress;
    /// with a refiner, the base samples up to the hand-off, is freed, and the refiner (loaded with
    /// the same options) finishes from its latents.
    pub fn run_once(
        &self,
        mut model: StableDiffusion,
        options: &LoadOptions,
        notify: &mut dyn FnMut(&Notice),
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated> {
        let mut prepared = self.prepare(&mut model, options)?;
        prepared.notices.iter().for_each(notify);
        let mut noise = SeededNoise::new(self.seed);
        let Some(refiner) = &self.refiner else {
            let generated = model.generate_once(&prepared.generate, &mut prepared.controls, &mut noise, progress)?;
            return prepared.postprocess(generated);
        };
        let Prepared { mut generate, mut controls, .. } = prepared;
        generate.denoising_end = Some(refiner.start);
        let latents = model.sample_once(&generate, &mut controls, &mut noise, progress)?;
        let refiner_model = StableDiffusion::load(&refiner.model, options)
            .context(|| format!("loading the refiner {}", refiner.model.display()))?;
        let finish = GenerateRequest {
            continue_from: Some(ContinueFrom { latents, denoising_start: refiner.start }),
            denoising_end: None,
            init_latents: None,
            init_image: None,
            deep_cache: self.deep_cache.map(|(n, branch)| DeepCache::new(n, branch)).transpose()?,
            ..generate
        };
        refiner_model.generate_once(&finish, &mut [], &mut noise, progress)
    }
}
