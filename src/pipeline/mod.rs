//! The generation pipeline: loading a model, encoding prompts, the sampling loop that composes
//! control mechanisms (from noise, or from an image for img2img and inpainting), and VAE decoding.

pub mod handoff;
pub mod hires;
pub mod init_image;
pub mod inpaint_area;
mod prompts;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::control::tokens::TokenVectors;
use crate::control::{ContextInfo, Control, GenerationSetup, StepContext};
use crate::io::model_files::{ModelFiles, SourceOptions};
use crate::io::weights::{TensorStore, TrainableParameters, Weights};
use crate::models::clip_text::ClipTextEncoder;
use crate::models::nn::LayerRegistry;
use crate::models::unet::{Conditioning, DeepCache, Hooks, UNet, UNetControls, UNetInput};
use crate::models::vae::Vae;
use crate::prompt::PromptSyntax;
use crate::schedulers::{self, NoiseSource, Scheduler, SchedulerConfig, SchedulerKind, SigmaSchedule};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

pub use handoff::ContinueFrom;
pub use init_image::{InitImage, InitSource};
pub use prompts::{MicroConditioning, SizeConditioning};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Precision of the networks (latents and scheduler math stay f32); on the CPU, f16/bf16 keep the
    /// layer weights in half precision and compute in f32 (see [`crate::io::weights::precision`]).
    pub dtype: DType,
    /// Device to run on.
    pub device: Device,
    /// What a single-file checkpoint cannot say about itself (tokenizer, configs), and overrides.
    pub files: SourceOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, files: SourceOptions::default() }
    }
}

/// SDXL's second prompt tokenizer and text encoder.
pub struct SecondTextEncoder {
    /// The tokenizer (`tokenizer_2`, padding with `!`).
    pub tokenizer: ClipTokenizer,
    /// The encoder with its projection (`text_encoder_2`, OpenCLIP bigG).
    pub encoder: ClipTextEncoder,
    /// The vectors of placeholder tokens added to this tokenizer (SDXL textual inversion).
    pub token_vectors: TokenVectors,
}

/// A loaded Stable Diffusion model: SD1.x/2.x, or SDXL (two text encoders, pooled and
/// micro-conditioning through the UNet's `add_embedding`).
pub struct StableDiffusion {
    /// The prompt tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The text encoder.
    pub text_encoder: ClipTextEncoder,
    /// SDXL's second tokenizer and text encoder.
    pub text_2: Option<SecondTextEncoder>,
    /// A missing negative prompt means zero negative embeddings (SDXL's
    /// `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
    /// The time ids end in an aesthetic score instead of the target size (the SDXL refiner).
    pub requires_aesthetics_score: bool,
    /// The denoising UNet.
    pub unet: UNet,
    /// The latent autoencoder.
    pub vae: Vae,
    /// The model's scheduler configuration (`scheduler_config.json`).
    pub scheduler_config: SchedulerConfig,
    /// The scheduler class `model_index.json` names, which diffusers prefers over the config's
    /// `_class_name`.
    pub scheduler_class: Option<String>,
    /// The UNet's and text encoder's layers by module path, where weight-level mechanisms (LoRA)
    /// attach (see [`crate::control::weights`]).
    pub layers: LayerRegistry,
    /// The vectors of placeholder tokens added to the tokenizer (see [`crate::control::tokens`]).
    pub token_vectors: TokenVectors,
    /// How prompts are read.
    pub prompt_syntax: PromptSyntax,
    /// The UNet's weights as loaded (memory-mapped), for merging offsets into it.
    unet_weights: Arc<TensorStore>,
    /// The UNet's `config.json` as diffusers writes it, for networks copied from it.
    unet_json: serde_json::Value,
    /// The text encoder's weights as loaded, for reloading it trainable.
    text_weights: Arc<TensorStore>,
    options: LoadOptions,
}

impl StableDiffusion {
    /// Loads a model: a diffusers folder or a single-file SD1.x/2.x checkpoint (see
    /// [`ModelFiles::open`]).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        let mut files = ModelFiles::open(path, &options.files)?;
        let sdxl = files.family() == crate::io::model_files::Family::Sdxl;
        let (text_config, unet_config, vae_config) =
            (&files.text_encoder.config, &files.unet.config, &files.vae.config);
        let unet_config_path = &files.unet.config_path;
        let weights = |store: &Arc<TensorStore>| Weights::new(store.clone(), options.dtype, &options.device);

        let text_width = text_config.hidden_size + files.text_2.as_ref().map_or(0, |t| t.encoder.config.hidden_size);
        if let Some(block) = unet_config.blocks.iter().find(|b| b.cross_attention_dim != text_width) {
            return Err(Error::config(
                unet_config_path,
                format!(
                    "cross_attention_dim {} does not match the text encoders' width {text_width}",
                    block.cross_attention_dim
                ),
            ));
        }
        let latent_channels = vae_config.latent_channels;
        if ![latent_channels, 2 * latent_channels + 1].contains(&unet_config.in_channels) {
            return Err(Error::config(
                unet_config_path,
                format!(
                    "in_channels {} fits neither the VAE's latent_channels {latent_channels} nor an inpainting \
                     UNet's {}",
                    unet_config.in_channels,
                    2 * latent_channels + 1
                ),
            ));
        }
        let layers = LayerRegistry::new();
        let registered = |component: &str, store: &Arc<TensorStore>| -> Weights {
            weights(store).with_layer_registry(&layers.scoped(component))
        };
        let unet = UNet::load(&registered("unet", &files.unet.weights), unet_config)?;
        record_original_names(&layers, unet_config);
        let text_2 = match files.text_2.take() {
            Some(text) => Some(SecondTextEncoder {
                tokenizer: text.tokenizer,
                token_vectors: TokenVectors::default(),
                encoder: ClipTextEncoder::load(
                    &registered("text_encoder_2", &text.encoder.weights),
                    &text.encoder.config,
                )?,
            }),
            None => None,
        };
        Ok(Self {
            text_encoder: ClipTextEncoder::load(&registered("text_encoder", &files.text_encoder.weights), text_config)?,
            text_2,
            force_zeros_for_empty_prompt: files.force_zeros_for_empty_prompt,
            requires_aesthetics_score: files.requires_aesthetics_score,
            unet,
            // An f16 model's VAE runs in f32 where its config asks (SDXL's overflows f16).
            vae: Vae::load(
                &Weights::new(files.vae.weights.clone(), vae_dtype(vae_config, options.dtype), &options.device),
                vae_config,
            )?,
            tokenizer: files.tokenizer,
            scheduler_config: pipeline_scheduler_config(files.scheduler_config, sdxl),
            scheduler_class: files.scheduler_class,
            layers,
            token_vectors: TokenVectors::default(),
            prompt_syntax: PromptSyntax::default(),
            unet_weights: files.unet.weights.clone(),
            unet_json: files.unet.json.clone(),
            text_weights: files.text_encoder.weights.clone(),
            options: options.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// Rebuilds the UNet from its weights plus `offsets` (same names; `conv_in` widened to
    /// `in_channels` with zeros first): IC-Light's merge. The layers re-register, so LoRAs attach
    /// to the merged weights.
    pub fn merge_unet_offsets(&mut self, offsets: &Arc<TensorStore>, in_channels: usize) -> Result<()> {
        let store = Arc::new(TensorStore::with_offsets(self.unet_weights.clone(), offsets.clone())?);
        let mut config = self.unet.config().clone();
        config.in_channels = in_channels;
        let weights = Weights::new(store, self.options.dtype, &self.options.device)
            .with_layer_registry(&self.layers.scoped("unet"));
        self.unet = UNet::load(&weights, &config)?;
        Ok(())
    }

    /// Reloads the UNet, and with `text_encoder` the text encoder, in f32 with every weight a
    /// trainable variable (for fine-tuning the whole model); returns the variables of each, by
    /// their keys in the component's weights. The layers re-register, so hooks and LoRAs find them.
    pub fn make_trainable(&mut self, text_encoder: bool) -> Result<(TrainableParameters, TrainableParameters)> {
        let (unet, text) = (TrainableParameters::new(), TrainableParameters::new());
        let weights = |store: &Arc<TensorStore>, component: &str, params: &TrainableParameters| {
            Weights::new(store.clone(), DType::F32, &self.options.device)
                .with_layer_registry(&self.layers.scoped(component))
                .trainable(params)
        };
        self.unet = UNet::load(&weights(&self.unet_weights, "unet", &unet), self.unet.config())?;
        if text_encoder {
            self.text_encoder =
                ClipTextEncoder::load(&weights(&self.text_weights, "text_encoder", &text), self.text_encoder.config())?;
        }
        Ok((unet, text))
    }

    /// The UNet's `config.json` (as diffusers writes it) and its weights as loaded: what a network
    /// copied from the UNet (a ControlNet to train) starts from.
    pub fn unet_files(&self) -> (&serde_json::Value, &Arc<TensorStore>) {
        (&self.unet_json, &self.unet_weights)
    }

    /// How many image pixels one latent pixel spans.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The scheduler the model's own config names.
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        match &self.scheduler_class {
            Some(class) => SchedulerKind::from_class_name(class),
            None => self.scheduler_config.kind(),
        }
    }
}

/// One generation's sampling request (the library's [`crate::request::Request`] builds it with
/// every mechanism's controls).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (when `None` and guidance is on: the empty text, or zero embeddings
    /// for an SDXL model that says so).
    pub negative_prompt: Option<String>,
    /// SDXL: the second text encoder's prompt (default: `prompt`).
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt (default: `negative_prompt`).
    pub negative_prompt_2: Option<String>,
    /// SDXL: size and crop conditioning.
    pub micro_conditioning: MicroConditioning,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1 or below.
    pub guidance: f64,
    /// The scheduler, or the model's own when `None`.
    pub scheduler: Option<SchedulerKind>,
    /// The sigma schedule, or the scheduler config's own when `None`.
    pub schedule: Option<SigmaSchedule>,
    /// Image width in pixels (ignored when `init_latents` is given).
    pub width: usize,
    /// Image height in pixels (ignored when `init_latents` is given).
    pub height: usize,
    /// Images to generate (ignored when `init_latents` is given).
    pub batch: usize,
    /// Text-encoder layers to skip from the end (diffusers' `clip_skip`).
    pub clip_skip: usize,
    /// Standard-normal starting noise [B, C, h, w], used as diffusers' `latents=` argument (with an
    /// init image: the noise added to it).
    pub init_latents: Option<Tensor>,
    /// The image img2img and inpainting start from, at the output size.
    pub init_image: Option<InitImage>,
    /// Base + refiner: stop at this fraction of the schedule (diffusers' `denoising_end`), for a
    /// refiner to continue from the latents.
    pub denoising_end: Option<f64>,
    /// Refiner: continue from a base's latents (diffusers' `denoising_start`).
    pub continue_from: Option<ContinueFrom>,
    /// Condition latents [1, C', h, w] concatenated to the latents at every UNet call, in both
    /// guidance halves (IC-Light's foreground and background).
    pub concat_latents: Option<Tensor>,
    /// Opt-in DeepCache (an approximation: faster UNet calls between refreshes), fresh for this
    /// generation.
    pub deep_cache: Option<DeepCache>,
}

/// Progress events of a generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// Prompts are encoded and sampling begins.
    Sampling {
        /// Number of denoising steps.
        steps: usize,
    },
    /// A denoising step finished.
    Step {
        /// Steps done so far.
        done: usize,
        /// All steps.
        total: usize,
    },
    /// The VAE decoder is running.
    Decoding,
}

/// Final latents and decoded images.
pub struct Generated {
    /// Latents before VAE decoding [B, C, h, w].
    pub latents: Tensor,
    /// Images in [0, 1], [B, 3, H, W].
    pub images: Tensor,
}

impl StableDiffusion {
    /// Checks the request and returns the starting noise: `init_latents` or fresh noise.
    fn initial_noise(&self, req: &GenerateRequest, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let channels = self.vae.config().latent_channels;
        if let Some(latents) = &req.init_latents {
            let (b, c, h, w) = latents.dims4()?;
            if b == 0 || h == 0 || w == 0 {
                return Err(Error::invalid(format!(
                    "init latents have shape {:?}: nothing to generate",
                    latents.dims()
                )));
            }
            if c != channels {
                return Err(Error::invalid(format!("init latents have {c} channels, the model expects {channels}")));
            }
            return Ok(latents.to_device(self.device())?.to_dtype(DType::F32)?);
        }
        let f = self.vae_scale_factor();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::invalid(format!("{name} {v} must be a positive multiple of {f}")));
            }
        }
        if req.batch == 0 {
            return Err(Error::invalid("batch must be at least 1"));
        }
        noise.sample(&[req.batch, channels, req.height / f, req.width / f], self.device())
    }

    /// Runs the sampling loop with `controls` acting at every stage, then decodes. `noise` supplies
    /// the starting noise (unless the request has it), the noise of stochastic schedulers and any
    /// noise the controls draw; `progress` hears about each step. The controls are finished (their
    /// resources released) however the generation ends.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        controls: &mut [Box<dyn Control>],
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated> {
        let result = (|| {
            let start = self.start(req, controls, noise)?;
            let latents = sample(&self.unet, &self.options, start, controls, noise, progress)?;
            decode(&self.vae, &self.options, latents, progress)
        })();
        finish(controls, result)
    }

    /// [`Self::generate`] for one-shot use (the CLI): the same result, but each network is freed
    /// once its stage is done (the text encoder and the layer registry after prompt encoding, the
    /// UNet after sampling), so peak memory is that of the largest stage instead of the whole model.
    pub fn generate_once(
        self,
        req: &GenerateRequest,
        controls: &mut [Box<dyn Control>],
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated> {
        let result = (|| {
            let (latents, vae, options) = self.sample_freeing(req, controls, noise, progress)?;
            decode(&vae, &options, latents, progress)
        })();
        finish(controls, result)
    }

    /// [`Self::generate_once`] without decoding: the final latents (f32), for a refiner to continue
    /// from (see [`GenerateRequest::denoising_end`]).
    pub fn sample_once(
        self,
        req: &GenerateRequest,
        controls: &mut [Box<dyn Control>],
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        let result = self.sample_freeing(req, controls, noise, progress).map(|(latents, _, _)| latents);
        finish(controls, result)
    }

    /// Prepares and samples, freeing the text encoders and the layer registry after prompt
    /// encoding and the UNet after sampling; returns the latents with what decoding needs.
    fn sample_freeing(
        self,
        req: &GenerateRequest,
        controls: &mut [Box<dyn Control>],
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Tensor, Vae, LoadOptions)> {
        let start = self.start(req, controls, noise)?;
        let Self { text_encoder, text_2, layers, unet, vae, options, .. } = self;
        drop((text_encoder, text_2, layers));
        crate::allocator::release_free_memory();
        let latents = sample(&unet, &options, start, controls, noise, progress)?;
        drop(unet);
        crate::allocator::release_free_memory();
        Ok((latents, vae, options))
    }

    /// Checks the request and prepares sampling: the scheduler, the starting latents, the controls'
    /// preparation (their hook ids checked against the UNet) and the text context (negative and
    /// positive prompts, edited by the controls).
    fn start(
        &self,
        req: &GenerateRequest,
        controls: &mut [Box<dyn Control>],
        noise: &mut dyn NoiseSource,
    ) -> Result<SamplingStart> {
        let kind = match req.scheduler {
            Some(k) => k,
            None => self.default_scheduler()?,
        };
        // SDXL models (added conditioning) take SDXL's align-your-steps table.
        let schedule = req.schedule.map(|s| s.for_model(self.unet.config().add_embedding.is_some()));
        let scheduler = schedulers::build(kind, schedule, &self.scheduler_config, req.steps)?;
        let init = match &req.continue_from {
            Some(_) if req.init_image.is_some() => {
                return Err(Error::invalid("a refiner continues from latents, not from an init image"));
            }
            Some(from) => {
                handoff::check_fraction("the refiner start", from.denoising_start)?;
                from.latents.to_device(self.device())?.to_dtype(DType::F32)?
            }
            None => self.initial_noise(req, noise)?,
        };
        let (batch, _, h, w) = init.dims4()?;
        let guided = req.guidance > 1.0;
        let f = self.vae_scale_factor();
        let (dtype, _) = crate::io::weights::precision(self.options.dtype, &self.options.device);
        // The input channels left for the latents and an inpainting UNet's extra channels once the
        // concatenated condition latents (IC-Light) are counted.
        let in_channels = self.unet.config().in_channels;
        let concat_channels = req.concat_latents.as_ref().map(|c| c.dim(1)).transpose()?.unwrap_or(0);
        let unet_channels = in_channels.checked_sub(concat_channels).ok_or_else(|| {
            Error::invalid(format!(
                "{concat_channels} condition channels, but the UNet takes {in_channels} input channels"
            ))
        })?;
        let image_start = match &req.init_image {
            Some(image) => {
                Some(init_image::start(image, &self.vae, unet_channels, scheduler.as_ref(), req.steps, &init, dtype)?)
            }
            None if unet_channels != self.vae.config().latent_channels => {
                return Err(Error::invalid(format!(
                    "the UNet takes {in_channels} input channels: an inpainting model needs an init image and a mask, \
                     an IC-Light model its condition images"
                )));
            }
            None => None,
        };
        let mut setup = GenerationSetup {
            unet: &self.unet,
            vae: &self.vae,
            layers: &self.layers,
            batch,
            guided,
            image_size: (h * f, w * f),
            latent_size: (h, w),
            dtype,
            device: self.device(),
            noise,
        };
        for control in controls.iter_mut() {
            control.prepare(&mut setup)?;
            let name = control.name().to_string();
            if let Some(hook) = control.hook() {
                Hooks::new(vec![hook]).check(self.unet.hook_points(), &name)?;
            }
        }

        let prompts = self.encode_prompts(req, guided, batch, (h * f, w * f))?;
        let mut context = prompts.context;
        let info =
            ContextInfo { guided, batch, prompt_words: &prompts.prompt_words, negative_words: &prompts.negative_words };
        for control in controls.iter_mut() {
            context = control.edit_context(context, &info)?;
        }
        let mut conditioning = Conditioning::text(context.to_dtype(dtype)?);
        conditioning.pooled = prompts::to_dtype(prompts.pooled, dtype)?;
        conditioning.time_ids = prompts::to_dtype(prompts.time_ids, dtype)?;
        let train_steps = self.scheduler_config.num_train_timesteps.unwrap_or(1000);
        let (first_step, latents, keep_outside_mask) = match (image_start, &req.continue_from) {
            (Some(start), _) => {
                if let Some(extra) = start.extra_channels {
                    let extra = if guided { Tensor::cat(&[&extra, &extra], 0)? } else { extra };
                    conditioning.extra_channels = Some(extra.to_dtype(dtype)?);
                }
                (start.first_step, start.latents, start.keep_outside_mask)
            }
            (None, Some(from)) => {
                // The base's latents are already at this step's noise level.
                let order = scheduler.order();
                (handoff::refiner_start(scheduler.timesteps(), from.denoising_start, train_steps, order), init, None)
            }
            (None, None) => (0, (init * scheduler.init_noise_sigma())?, None),
        };
        if let Some(concat) = &req.concat_latents {
            let (n, _, ch, cw) = concat.dims4()?;
            if n != 1 || (ch, cw) != (h, w) {
                return Err(Error::invalid(format!(
                    "condition latents have shape {:?}, the generation needs [1, C, {h}, {w}]",
                    concat.dims()
                )));
            }
            let rows = if guided { 2 * batch } else { batch };
            let concat = concat.to_dtype(dtype)?.repeat((rows, 1, 1, 1))?;
            conditioning.extra_channels = Some(match conditioning.extra_channels.take() {
                Some(extra) => Tensor::cat(&[&extra, &concat], 1)?,
                None => concat,
            });
        }
        let end_step = match req.denoising_end {
            Some(fraction) => {
                handoff::check_fraction("the base's end", fraction)?;
                handoff::base_end(scheduler.timesteps(), fraction, train_steps)
            }
            None => scheduler.timesteps().len(),
        };
        if end_step <= first_step {
            return Err(Error::invalid(format!(
                "no step of {} runs between the hand-off points (give more steps)",
                req.steps
            )));
        }
        Ok(SamplingStart {
            scheduler,
            first_step,
            end_step,
            latents,
            conditioning,
            guidance: guided.then_some(req.guidance),
            deep_cache: req.deep_cache.clone(),
            keep_outside_mask,
        })
    }
}

/// The dtype the VAE is loaded in: f32 for an f16 model whose VAE config has `force_upcast`.
/// The scheduler config as diffusers' SD1.x/2.x pipelines use it: their constructors turn a
/// `clip_sample` that is (or defaults to, for DDIM and DDPM) true off, so a model whose config asks
/// for clipping samples without it there.
fn pipeline_scheduler_config(mut config: SchedulerConfig, sdxl: bool) -> SchedulerConfig {
    if !sdxl {
        config.clip_sample = Some(false);
    }
    config
}

fn vae_dtype(config: &crate::models::vae::VaeConfig, dtype: DType) -> DType {
    if config.force_upcast && dtype == DType::F16 { DType::F32 } else { dtype }
}

/// Records the UNet layers' module paths in the original single-file layout (as LoRA files made
/// for SDXL name them).
fn record_original_names(layers: &LayerRegistry, config: &crate::models::unet::UNetConfig) {
    let map = crate::io::ldm::KeyMap::unet(config);
    for path in layers.paths() {
        let Some(module) = path.strip_prefix("unet.") else { continue };
        let Some((key, _)) = map.to_checkpoint_key(&format!("{module}.weight")) else { continue };
        let original = key.strip_prefix(crate::io::ldm::UNET_PREFIX).and_then(|k| k.strip_suffix(".weight"));
        if let Some(original) = original.filter(|o| *o != module) {
            layers.add_original_name(&format!("unet.{original}"), &path);
        }
    }
}

/// Finishes every control, then returns `result` (or the first finishing error when it succeeded).
fn finish<T>(controls: &mut [Box<dyn Control>], result: Result<T>) -> Result<T> {
    let mut finished = Ok(());
    for control in controls.iter_mut() {
        let outcome = control.finish();
        if finished.is_ok() {
            finished = outcome;
        }
    }
    let value = result?;
    finished.map(|()| value)
}

/// Where the sampling loop starts from.
struct SamplingStart {
    scheduler: Box<dyn Scheduler>,
    /// The scheduler's index of the first step that runs (0 unless img2img starts part-way).
    first_step: usize,
    /// The scheduler's index after the last step that runs (before the end when a refiner
    /// continues).
    end_step: usize,
    /// The starting latents [B, C, h, w] (f32), at the first step's noise level.
    latents: Tensor,
    /// Text context [B or 2B, L, D] (negative prompts first when guided), in the compute dtype.
    conditioning: Conditioning,
    /// The classifier-free guidance scale, when guidance is on.
    guidance: Option<f64>,
    /// DeepCache's state, when it is on.
    deep_cache: Option<DeepCache>,
    /// Inpainting with a plain UNet: the original put back outside the mask after every step.
    keep_outside_mask: Option<init_image::KeepOutsideMask>,
}

/// The sampling loop: at every step the controls contribute to the UNet's injection points and
/// install their hooks, the UNet predicts, guidance combines, the scheduler steps. Returns the final
/// latents (f32).
fn sample(
    unet: &UNet,
    options: &LoadOptions,
    start: SamplingStart,
    controls: &mut [Box<dyn Control>],
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let SamplingStart {
        mut scheduler,
        first_step,
        end_step,
        mut latents,
        conditioning,
        guidance,
        mut deep_cache,
        keep_outside_mask,
    } = start;
    let (dtype, _) = crate::io::weights::precision(options.dtype, &options.device);
    let batch = latents.dim(0)?;
    let timesteps = scheduler.timesteps()[first_step..end_step].to_vec();
    progress(Progress::Sampling { steps: timesteps.len() });
    for (i, &t) in timesteps.iter().enumerate() {
        let scheduler_step = first_step + i;
        let model_input = if guidance.is_some() { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let model_input = scheduler.scale_model_input(&model_input, scheduler_step)?.to_dtype(dtype)?;
        let t_batch = Tensor::full(t as f32, model_input.dim(0)?, &options.device)?;
        let mut step_conditioning = conditioning.clone();
        for control in controls.iter_mut() {
            if let Some(context) = control.step_context(i, &step_conditioning.context)? {
                step_conditioning.context = context.to_dtype(dtype)?;
            }
        }
        let mut step = StepContext {
            unet,
            scheduler: scheduler.as_ref(),
            noise: &mut *noise,
            step_index: i,
            num_steps: timesteps.len(),
            scheduler_step,
            timestep: t,
            timesteps: &t_batch,
            latents: &model_input,
            conditioning: &step_conditioning,
            guided: guidance.is_some(),
        };
        let mut unet_controls = UNetControls::default();
        for control in controls.iter_mut() {
            unet_controls.merge(control.contribute(&mut step)?)?;
        }
        let hooks = Hooks::new(controls.iter_mut().filter_map(|c| c.hook()).collect());
        let input = UNetInput::new(&model_input, &t_batch, &step_conditioning)
            .with_controls(&unet_controls)
            .with_hooks(hooks)
            .with_deep_cache(deep_cache.as_mut());
        let prediction = unet.forward(input)?.to_dtype(DType::F32)?;
        let prediction = match guidance {
            Some(scale) => {
                let uncond = prediction.narrow(0, 0, batch)?;
                let cond = prediction.narrow(0, batch, batch)?;
                (&uncond + ((cond - &uncond)? * scale)?)?
            }
            None => prediction,
        };
        latents = scheduler.step(&prediction, scheduler_step, &latents, noise)?;
        if let Some(keep) = &keep_outside_mask {
            latents = keep.apply(scheduler.as_ref(), scheduler_step, &latents)?;
        }
        if !crate::models::nn::all_finite(&latents)? {
            return Err(Error::invalid(format!(
                "the latents became NaN or infinite at step {} of {} (a guidance, LoRA or control scale far too \
                 large, or weights that hold NaN)",
                i + 1,
                timesteps.len()
            )));
        }
        for control in controls.iter_mut() {
            control.after_step(i, &latents)?;
        }
        progress(Progress::Step { done: i + 1, total: timesteps.len() });
    }
    Ok(latents)
}

/// Decodes the final latents into images in [0, 1].
fn decode(vae: &Vae, options: &LoadOptions, latents: Tensor, progress: &mut dyn FnMut(Progress)) -> Result<Generated> {
    progress(Progress::Decoding);
    let (dtype, _) = crate::io::weights::precision(options.dtype, &options.device);
    let images = vae.decode_to_unit_range(&latents.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
    Ok(Generated { latents, images })
}
