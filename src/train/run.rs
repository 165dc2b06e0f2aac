//! Training runs on a loaded model, LoRA adapters or a textual-inversion token: batches from a
//! [`Dataset`], the denoising objective, AdamW with clipping and a learning-rate schedule, a report
//! per step, the result written every `save_every` steps and at the end (atomically: a crash leaves
//! the previous file whole).
//!
//! Every random draw of step s (the batch's flips, the VAE sample, the noise, the timesteps) comes
//! from generators seeded by (seed, s), and the example order of epoch e from (seed, e), so a run is
//! reproducible from its seed, and a checkpoint (the adapters, AdamW's moments and the step, written
//! beside the output as `<name>.state.safetensors` whenever the adapters are) resumes it exactly:
//! the resumed run ends with the same weights as one that never stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::adafactor::Adafactor;
use super::buckets::{BucketOrder, Buckets};
use super::dataset::Dataset;
use super::ema::Ema;
use super::init::pytorch_default;
use super::lora::{Algorithm, FactorShape, LoraAdapters};
use super::objective::DenoisingObjective;
use super::optimizer::{AdamW, AdamWConfig, Optimizer, OptimizerKind, clip_grad_norm};
use super::schedule::LrSchedule;
use crate::io::diffusers_folder::DiffusersFolder;
use crate::io::image::{save_png, to_rgb8};
use crate::io::output::OutputFiles;
use crate::models::unet::{Conditioning, UNetControls, UNetInput};
use crate::noise::SeededNoise;
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::schedulers::NoiseSource;
use crate::{Error, Result};

/// How a training run goes, whatever it trains (defaults: diffusers' training scripts').
#[derive(Debug, Clone)]
pub struct TrainingOptions {
    /// Square training resolution in pixels.
    pub resolution: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// AdamW's hyper-parameters (`lr` is the base rate of the schedule; Adafactor uses `lr` and
    /// `weight_decay`).
    pub optimizer: AdamWConfig,
    /// AdamW, or Adafactor for memory.
    pub optimizer_kind: OptimizerKind,
    /// The learning-rate schedule after the warm-up.
    pub schedule: LrSchedule,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// Gradient-norm clipping.
    pub max_grad_norm: Option<f64>,
    /// min-SNR-γ loss weighting.
    pub snr_gamma: Option<f64>,
    /// Offset noise: this times a per-channel draw is added to the noise.
    pub noise_offset: f64,
    /// Mirror each image with probability 1/2.
    pub random_flip: bool,
    /// Aspect-ratio buckets instead of square crops (see [`super::buckets`]).
    pub aspect_buckets: bool,
    /// The chance that an example is trained with the empty caption, so that the model also
    /// learns the unconditional prediction classifier-free guidance needs (0.1 is usual when
    /// training from scratch).
    pub caption_dropout: f64,
    /// The seed of every draw.
    pub seed: u64,
    /// Also write the result (and the checkpoint) every this many steps.
    pub save_every: Option<usize>,
    /// A checkpoint to continue from (see [`state_path`]).
    pub resume: Option<PathBuf>,
    /// Batches whose gradients are summed (each loss divided by this) before every optimiser step:
    /// an effective batch of this times `batch_size`.
    pub gradient_accumulation: usize,
    /// Export an exponential moving average of the weights with this decay (see [`Ema`]).
    pub ema_decay: Option<f64>,
    /// Sample images while training.
    pub samples: Option<Samples>,
}

/// Sample images drawn while training, to watch it learn.
#[derive(Debug, Clone)]
pub struct Samples {
    /// Draw them every this many steps (and at the end).
    pub every: usize,
    /// One image per prompt.
    pub prompts: Vec<String>,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
}

impl Default for TrainingOptions {
    fn default() -> Self {
        Self {
            resolution: 512,
            batch_size: 1,
            steps: 1000,
            optimizer: AdamWConfig::default(),
            optimizer_kind: OptimizerKind::AdamW,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            snr_gamma: None,
            noise_offset: 0.0,
            random_flip: false,
            aspect_buckets: false,
            caption_dropout: 0.0,
            seed: 0,
            save_every: None,
            resume: None,
            gradient_accumulation: 1,
            ema_decay: None,
            samples: None,
        }
    }
}

/// The adapters a LoRA run trains (defaults: diffusers' `train_text_to_image_lora.py`).
#[derive(Debug, Clone)]
pub struct LoraOptions {
    /// LoRA, LoHa or LoKr.
    pub algorithm: Algorithm,
    /// Adapter rank.
    pub rank: usize,
    /// Adapter alpha (the delta is scaled by alpha / rank).
    pub alpha: f64,
    /// The UNet modules that get adapters (PEFT `target_modules`).
    pub targets: Vec<String>,
    /// Also adapt the text encoder's attention projections ([`TEXT_ENCODER_TARGETS`]).
    pub text_encoder: bool,
}

/// The text-encoder modules that get adapters when it trains too (diffusers' `text_lora_config`).
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

impl Default for LoraOptions {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Lora,
            rank: 4,
            alpha: 4.0,
            targets: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec(),
            text_encoder: false,
        }
    }
}

/// What a full fine-tuning run trains besides the whole UNet.
#[derive(Debug, Clone, Default)]
pub struct FullOptions {
    /// Also train the whole text encoder.
    pub text_encoder: bool,
}

/// The new token a textual-inversion run learns (diffusers' `textual_inversion.py`).
#[derive(Debug, Clone)]
pub struct TextualInversionOptions {
    /// The placeholder the captions use (e.g. `<cat-toy>`).
    pub token: String,
    /// A word of the vocabulary, one token, whose embedding starts every vector.
    pub initializer: String,
    /// Vectors the placeholder stands for.
    pub vectors: usize,
}

/// One finished step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps done, from 1.
    pub step: usize,
    /// Steps in the run.
    pub steps: usize,
    /// The step's loss.
    pub loss: f32,
    /// The learning rate it used.
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// Time since the run started.
    pub elapsed: Duration,
}

/// Trains LoRA adapters on `model`'s UNet with `data` and writes them to `output` (kohya
/// safetensors); `on_step` hears of every step. The adapters are detached from the model when the
/// run ends, however it ends.
pub fn train_lora(
    model: &StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    lora: &LoraOptions,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    crate::io::output::check_output_path(output)?;
    let trainee = LoraTrainee::attach(model, options.seed, lora)?;
    let result = run_steps(model, data, None, options, output, &trainee, on_step);
    trainee.detach(model);
    result
}

/// Learns the vectors of a new token from `data` (whose captions use it) through `model`'s frozen
/// text encoder and UNet, and writes them to `output` as a diffusers embedding
/// (`{token: [vectors, D]}` safetensors, which `--embedding`, diffusers' `load_textual_inversion`
/// and A1111 load); `on_step` hears of every step.
pub fn train_textual_inversion(
    model: &StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    inversion: &TextualInversionOptions,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    crate::io::output::check_output_path(output)?;
    let mut tokenizer = model.tokenizer.clone();
    let initializer = tokenizer.encode_words(&inversion.initializer)?;
    let [initializer] = initializer.as_slice() else {
        return Err(Error::invalid(format!(
            "the initializer `{}` must be a single token of the vocabulary; it is {} tokens",
            inversion.initializer,
            initializer.len()
        )));
    };
    tokenizer.add_placeholder(&inversion.token, inversion.vectors)?;
    if !data.examples().iter().any(|e| e.caption.contains(&inversion.token)) {
        return Err(Error::invalid(format!("no caption mentions the placeholder `{}`", inversion.token)));
    }
    let ids = Tensor::new(&[[*initializer]], model.device())?;
    let row = model.text_encoder.token_embeddings(&ids)?.squeeze(0)?;
    let vectors = Var::from_tensor(&row.repeat((inversion.vectors, 1))?.to_dtype(candle_core::DType::F32)?)?;
    let trainee = InversionTrainee { tokenizer, vectors, options: inversion.clone() };
    run_steps(model, data, None, options, output, &trainee, on_step)
}

/// Fine-tunes every weight of the UNet (and with `full.text_encoder` of the text encoder) of the
/// diffusers folder `source`, loaded as `model` (in f32), and writes the model to the folder
/// `output` in the same layout (the trained weights as safetensors, every other file copied), which
/// diffusers and `--model` load; `on_step` hears of every step.
pub fn train_full(
    model: &mut StableDiffusion,
    source: &Path,
    data: &Dataset,
    options: &TrainingOptions,
    full: &FullOptions,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    let trainee = FullTrainee::new(model, source, output, full)?;
    run_steps(model, data, None, options, output, &trainee, on_step)
}

/// Refuses options a run cannot use, before any work.
pub(super) fn check(model: &StableDiffusion, options: &TrainingOptions) -> Result<()> {
    if model.text_2.is_some() {
        return Err(Error::invalid(
            "training SDXL models is not supported yet (its second text encoder, pooled embedding and time ids); \
             train on an SD1.x/2.x model",
        ));
    }
    if !(0.0..=1.0).contains(&options.caption_dropout) {
        return Err(Error::invalid(format!("the caption dropout {} must be in [0, 1]", options.caption_dropout)));
    }
    if options.batch_size == 0 || options.steps == 0 || options.resolution == 0 {
        return Err(Error::invalid("the batch size, the step count and the resolution must each be at least 1"));
    }
    let factor = model.vae_scale_factor();
    if !options.resolution.is_multiple_of(8 * factor) {
        return Err(Error::invalid(format!(
            "the resolution {} must be a multiple of {} (the VAE's factor {factor} times the UNet's 8)",
            options.resolution,
            8 * factor
        )));
    }
    Ok(())
}

/// Refuses an output folder that is the folder being trained (`trained`), or exists as something
/// else than a folder, or whose parent is missing, before any work.
pub(super) fn check_output_folder(output: &Path, trained: Option<&Path>) -> Result<()> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(Error::invalid(format!("{}: the folder for the output does not exist", parent.display())));
    }
    match std::fs::symlink_metadata(output) {
        Ok(m) if !m.is_dir() => {
            Err(Error::invalid(format!("{}: the output must be a folder; a file is there", output.display())))
        }
        Ok(_) if trained.is_some_and(|t| same_folder(t, output)) => Err(Error::invalid(format!(
            "{}: the output folder is what is being trained; write the result elsewhere",
            output.display()
        ))),
        _ => Ok(()),
    }
}

/// Whether two existing paths are the same folder.
fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The text context [B, 77, D] of `captions` through the model's tokenizer and text encoder.
fn text_context(model: &StableDiffusion, captions: &[&str]) -> Result<Tensor> {
    let ids = captions.iter().map(|c| model.tokenizer.encode_padded(c)).collect::<Result<Vec<_>>>()?;
    let ids = Tensor::from_vec(ids.concat(), (captions.len(), model.tokenizer.max_length()), model.device())?;
    model.text_encoder.encode(&ids, 0)
}

/// What one kind of run trains: its variables, how a caption becomes the UNet's context through
/// them, what identifies the run in a checkpoint, and how the result is written.
pub(super) trait Trainee {
    /// The trainable variables by name.
    fn parameters(&self) -> Vec<(String, Var)>;
    /// The text context [B, 77, D] of `captions` (the model's own encoding, unless the run trains
    /// what a caption becomes).
    fn context(&self, model: &StableDiffusion, captions: &[&str]) -> Result<Tensor> {
        text_context(model, captions)
    }
    /// How the run noises its latents and scores the prediction.
    fn objective(&self) -> StepObjective {
        StepObjective::Uniform
    }
    /// Whether plain text-to-image samples show what the run trains (they do not for the control
    /// kinds or textual inversion, whose effect needs their own input).
    fn samples_show_training(&self) -> bool {
        false
    }
    /// Whether a batch brings its examples' condition images (the control kinds).
    fn uses_conditions(&self) -> bool {
        false
    }
    /// What this run adds to the UNet's pass over `batch` (residuals, an extra attention stream);
    /// `rng` is the step's generator, for the run's own draws.
    fn controls(&self, _batch: &StepBatch<'_>, _rng: &mut StdRng) -> Result<UNetControls> {
        Ok(UNetControls::default())
    }
    /// What a checkpoint of this run records of it (beside the training options).
    fn identity(&self) -> Vec<(&'static str, String)>;
    /// Writes the result to `output` after `step` steps.
    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()>;
}

/// One step's batch as the UNet sees it.
pub(super) struct StepBatch<'a> {
    /// The training data.
    pub data: &'a Dataset,
    /// The examples of the batch, by index into the data.
    pub indices: &'a [usize],
    /// The UNet's input: the noised latents [B, C, h, w].
    pub noisy: &'a Tensor,
    /// Their timesteps [B].
    pub timesteps: &'a Tensor,
    /// The text conditioning.
    pub conditioning: &'a Conditioning,
    /// The condition images [B, 3, R, R] in [0, 1], where the trainee asks for them.
    pub conditions: Option<&'a Tensor>,
}

/// How a step noises the latents and scores the model's prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepObjective {
    /// Most scripts': uniform timesteps, DDPM noising, the ε or v target, mean squared error
    /// (min-SNR-γ weighted if asked).
    Uniform,
    /// The T2I-Adapter script's: cubic timesteps `(1 − u³)·T` (mostly high noise, where structure
    /// forms), Euler noise levels, the σ⁻²-weighted error of the denoised latents (see
    /// [`DenoisingObjective::euler_denoised_loss`]).
    EulerCubic,
}

/// LoRA adapters on the UNet, and maybe on the text encoder.
pub(super) struct LoraTrainee {
    unet: LoraAdapters,
    text: Option<LoraAdapters>,
    options: LoraOptions,
}

impl LoraTrainee {
    /// Attaches new adapters to `model`'s layers, initialised from `seed` as PEFT initialises them:
    /// LoRA "gaussian" (which diffusers' scripts ask for): down ~ N(0, 1/r), up = 0; LoHa: w1a, w1b
    /// and w2a kaiming-uniform, w2b = 0; LoKr: w1 = 0, w2 (or its factors) kaiming-uniform.
    pub(super) fn attach(model: &StableDiffusion, seed: u64, lora: &LoraOptions) -> Result<Self> {
        let device = model.device().clone();
        let mut init_noise = SeededNoise::new(seed);
        let mut draws = 0u64;
        let mut init = |_: &str, factors: &[FactorShape]| -> Result<Vec<Tensor>> {
            let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &device);
            if lora.algorithm == Algorithm::Lora {
                let down = (init_noise.sample(&factors[0].shape, &device)? / lora.rank as f64)?;
                return Ok(vec![down, zeros(&factors[1].shape)?]);
            }
            draws += 1;
            let named: Vec<(String, Vec<usize>)> =
                factors.iter().map(|f| (format!("{}.weight", f.peft), f.shape.clone())).collect();
            let mut uniform = pytorch_default(&named, seed.wrapping_add(draws), &device)?;
            factors
                .iter()
                .map(|f| match f.peft {
                    "hada_w2_b" | "lokr_w1" => Ok(zeros(&f.shape)?),
                    _ => {
                        uniform.remove(&format!("{}.weight", f.peft)).ok_or_else(|| Error::invalid("no initial value"))
                    }
                })
                .collect()
        };
        let shape = (lora.algorithm, lora.rank, lora.alpha);
        let unet = LoraAdapters::attach(&model.layers, "unet.", &lora.targets, shape, &mut init)?;
        let text = if lora.text_encoder {
            let targets = TEXT_ENCODER_TARGETS.map(String::from);
            match LoraAdapters::attach(&model.layers, "text_encoder.", &targets, shape, &mut init) {
                Ok(text) => Some(text),
                Err(e) => {
                    unet.detach(&model.layers);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Self { unet, text, options: lora.clone() })
    }

    /// Takes the adapters off `model`'s layers.
    pub(super) fn detach(&self, model: &StableDiffusion) {
        self.unet.detach(&model.layers);
        if let Some(text) = &self.text {
            text.detach(&model.layers);
        }
    }
}

impl Trainee for LoraTrainee {
    fn samples_show_training(&self) -> bool {
        true
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut params = self.unet.parameters();
        params.extend(self.text.iter().flat_map(LoraAdapters::parameters));
        params
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        let mut identity = vec![
            ("rank", self.options.rank.to_string()),
            ("alpha", self.options.alpha.to_string()),
            ("targets", self.options.targets.join(",")),
        ];
        if self.options.text_encoder {
            identity.push(("text_encoder", "true".to_string()));
        }
        if self.options.algorithm != Algorithm::Lora {
            identity.push(("algorithm", self.options.algorithm.name().to_string()));
        }
        identity
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        let module = match self.options.algorithm {
            Algorithm::Lora => "networks.lora",
            Algorithm::Loha | Algorithm::Lokr => "lycoris.kohya",
        };
        let mut metadata = HashMap::from([
            ("ss_network_module".to_string(), module.to_string()),
            ("ss_network_dim".to_string(), self.options.rank.to_string()),
            ("ss_network_alpha".to_string(), self.options.alpha.to_string()),
            ("ss_steps".to_string(), step.to_string()),
            ("ss_seed".to_string(), options.seed.to_string()),
            ("ss_resolution".to_string(), format!("({0}, {0})", options.resolution)),
            ("diffctl_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        if self.options.algorithm != Algorithm::Lora {
            let args = format!("{{\"algo\": \"{}\"}}", self.options.algorithm.name());
            metadata.insert("ss_network_args".to_string(), args);
        }
        let mut tensors = self.unet.kohya_tensors()?;
        if let Some(text) = &self.text {
            tensors.extend(text.kohya_tensors()?);
        }
        write_tensors(output, tensors, metadata)
    }
}

/// A placeholder token's vectors, entering the text encoder at the token injection point.
struct InversionTrainee {
    tokenizer: crate::tokenizer::ClipTokenizer,
    vectors: Var,
    options: TextualInversionOptions,
}

impl Trainee for InversionTrainee {
    fn parameters(&self) -> Vec<(String, Var)> {
        vec![(self.options.token.clone(), self.vectors.clone())]
    }

    fn context(&self, model: &StableDiffusion, captions: &[&str]) -> Result<Tensor> {
        let ids = captions.iter().map(|c| self.tokenizer.encode_padded(c)).collect::<Result<Vec<_>>>()?;
        let ids = Tensor::from_vec(ids.concat(), (captions.len(), self.tokenizer.max_length()), model.device())?;
        let embeddings = model.text_encoder.token_embeddings_with(&ids, Some(self.vectors.as_tensor()))?;
        model.text_encoder.encode_embeddings(&embeddings, 0)
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        vec![
            ("token", self.options.token.clone()),
            ("initializer", self.options.initializer.clone()),
            ("vectors", self.options.vectors.to_string()),
        ]
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        let vectors = vec![(self.options.token.clone(), self.vectors.as_tensor().detach())];
        write_tensors(output, vectors, run_metadata(options, step))
    }
}

/// Every weight of the UNet, and maybe of the text encoder.
pub(super) struct FullTrainee {
    source: DiffusersFolder,
    unet: Vec<(String, Var)>,
    text: Vec<(String, Var)>,
    options: FullOptions,
}

impl FullTrainee {
    /// Makes the UNet (and with `full.text_encoder` the text encoder) of `model`, loaded from the
    /// diffusers folder `source`, trainable; the result goes to the folder `output`.
    pub(super) fn new(model: &mut StableDiffusion, source: &Path, output: &Path, full: &FullOptions) -> Result<Self> {
        let source = DiffusersFolder::open(source)?;
        check_output_folder(output, Some(source.root()))?;
        let (unet, text) = model.make_trainable(full.text_encoder)?;
        Ok(Self { source, unet: unet.parameters(), text: text.parameters(), options: full.clone() })
    }

    /// The components whose weights are trained (and so written, not copied).
    fn trained_components(&self) -> &'static [&'static str] {
        if self.options.text_encoder { &["unet", "text_encoder"] } else { &["unet"] }
    }
}

impl Trainee for FullTrainee {
    fn samples_show_training(&self) -> bool {
        true
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let named = |prefix: &str, params: &[(String, Var)]| {
            params.iter().map(|(k, v)| (format!("{prefix}.{k}"), v.clone())).collect::<Vec<_>>()
        };
        [named("unet", &self.unet), named("text_encoder", &self.text)].concat()
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        vec![("text_encoder", self.options.text_encoder.to_string())]
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        let trained = self.trained_components();
        let mut files = OutputFiles::new();
        for (relative, from) in self.source.files()? {
            let component = relative.parent().and_then(Path::to_str).unwrap_or_default();
            let name = relative.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if trained.contains(&component) && is_weights_file(name) {
                continue;
            }
            let to = output.join(&relative);
            create_folder(to.parent().unwrap_or(output))?;
            files.stage(&to, |file| {
                let mut reader = std::fs::File::open(&from).map_err(|e| Error::io(&from, e))?;
                std::io::copy(&mut reader, file).map_err(|e| Error::io(&from, e))?;
                Ok(())
            })?;
        }
        let weights = [
            ("unet", "diffusion_pytorch_model.safetensors", &self.unet),
            ("text_encoder", "model.safetensors", &self.text),
        ];
        for (component, file_name, params) in weights.into_iter().filter(|(c, ..)| trained.contains(c)) {
            create_folder(&output.join(component))?;
            let path = output.join(component).join(file_name);
            let tensors = detached(params);
            files.stage(&path, |file| {
                crate::io::output::write_safetensors(file, tensors, Some(export_metadata(options, step)))
                    .map_err(|message| Error::Format { path: path.clone(), message })
            })?;
        }
        files.commit()
    }
}

/// The run's step, seed and diffctl version, as an exported file's metadata.
pub(super) fn run_metadata(options: &TrainingOptions, step: usize) -> HashMap<String, String> {
    HashMap::from([
        ("diffctl_steps".to_string(), step.to_string()),
        ("diffctl_seed".to_string(), options.seed.to_string()),
        ("diffctl_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ])
}

/// The metadata of an exported diffusers weight file: [`run_metadata`] and PyTorch's `format` tag
/// (which diffusers' loaders expect).
pub(super) fn export_metadata(options: &TrainingOptions, step: usize) -> HashMap<String, String> {
    let mut metadata = run_metadata(options, step);
    metadata.insert("format".to_string(), "pt".to_string());
    metadata
}

/// The current values of `params`, detached, by name: what an export or a checkpoint writes.
pub(super) fn detached(params: &[(String, Var)]) -> Vec<(String, Tensor)> {
    params.iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect()
}

/// Writes a diffusers model folder of one network (a ControlNet, a T2I-Adapter): `config` as
/// `config.json` and `tensors` (diffusers names) with `metadata` as
/// `diffusion_pytorch_model.safetensors`, both or neither (staged, then renamed).
pub fn write_model_folder(
    output: &Path,
    config: &serde_json::Value,
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    create_folder(output)?;
    let mut files = OutputFiles::new();
    let config_path = output.join("config.json");
    let config = serde_json::to_string_pretty(config).map_err(|e| Error::invalid(format!("the model config: {e}")))?;
    files.stage(&config_path, |file| {
        std::io::Write::write_all(file, config.as_bytes()).map_err(|e| Error::io(&config_path, e))
    })?;
    let path = output.join("diffusion_pytorch_model.safetensors");
    files.stage(&path, |file| {
        crate::io::output::write_safetensors(file, tensors, Some(metadata))
            .map_err(|message| Error::Format { path: path.clone(), message })
    })?;
    files.commit()
}

/// Refuses a dataset without a condition image for every example, for the `kind` that needs them.
pub(super) fn check_conditions(data: &Dataset, kind: &str) -> Result<()> {
    match data.examples().iter().find(|e| e.condition.is_none()) {
        Some(example) => Err(Error::invalid(format!(
            "{}: {kind} training needs a condition image for every training image",
            example.image.display()
        ))),
        None => Ok(()),
    }
}

/// Whether a component's file holds weights (safetensors, PyTorch pickles, shard indexes).
fn is_weights_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin") || name.contains(".index")
}

/// Creates `dir` (and its parents) if absent.
pub(super) fn create_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// DreamBooth's prior preservation: every batch of instance images is followed by as many class
/// images (captioned with the class prompt), whose loss is added times `weight`.
#[derive(Debug, Clone)]
pub struct PriorPreservation {
    /// The class images.
    pub class_data: Dataset,
    /// The class half's loss weight (diffusers' `prior_loss_weight`).
    pub weight: f64,
}

/// The steps of a run on `data` (and `prior`'s class images): batches, the objective, the
/// optimiser, reports, samples, checkpoints and exports.
pub(super) fn run_steps(
    model: &StableDiffusion,
    data: &Dataset,
    prior: Option<&PriorPreservation>,
    options: &TrainingOptions,
    output: &Path,
    trainee: &dyn Trainee,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    if options.samples.is_some() && !trainee.samples_show_training() {
        return Err(Error::invalid(
            "sample images show what lora, dreambooth and full runs train; this kind changes nothing a plain prompt \
             shows",
        ));
    }
    let run = Run {
        model,
        data,
        prior,
        options,
        trainee,
        objective: DenoisingObjective::new(&model.scheduler_config, options.snr_gamma)?,
    };
    let params = trainee.parameters();
    let mut optimizer: Box<dyn Optimizer> = match options.optimizer_kind {
        OptimizerKind::AdamW => Box::new(AdamW::new(params.clone(), options.optimizer)?),
        OptimizerKind::Adafactor => {
            Box::new(Adafactor::new(params.clone(), options.optimizer.lr, options.optimizer.weight_decay)?)
        }
    };
    let mut ema = options.ema_decay.map(|decay| Ema::new(&params, decay)).transpose()?;
    let instance = if options.aspect_buckets {
        let buckets = Buckets::new(data, options.resolution, 8 * model.vae_scale_factor())?;
        InstanceOrder::Buckets(BucketOrder::new(buckets, options.batch_size, options.seed))
    } else {
        InstanceOrder::Examples(EpochOrder::new(data.examples().len(), options.seed))
    };
    let mut orders =
        Orders { instance, class: prior.map(|p| EpochOrder::new(p.class_data.examples().len(), !options.seed)) };
    let identity = run_identity(options, data, prior, trainee);
    let first = match &options.resume {
        Some(path) => resume(path, options.steps, &identity, &params, optimizer.as_mut(), ema.as_mut())?,
        None => 0,
    };
    let micro_batches = options.gradient_accumulation.max(1);
    for _ in 0..first * micro_batches {
        orders.next_batch(options);
    }
    let started = Instant::now();
    for step in first..options.steps {
        let mut grads: Option<GradStore> = None;
        let mut loss = 0f32;
        for micro in 0..micro_batches {
            let mut micro_loss = run.micro_batch_loss(&mut orders, step * micro_batches + micro)?;
            if micro_batches > 1 {
                micro_loss = (micro_loss / micro_batches as f64)?;
            }
            loss += micro_loss.to_scalar::<f32>()?;
            let micro_grads = micro_loss.backward()?;
            grads = Some(match grads {
                None => micro_grads,
                Some(sum) => add_gradients(sum, micro_grads, &params)?,
            });
        }
        let mut grads = grads.ok_or_else(|| Error::invalid("a step needs at least one batch"))?;
        let grad_norm = clip_grad_norm(&params, &mut grads, options.max_grad_norm)?;
        let lr = options.optimizer.lr * options.schedule.factor(step, options.steps, options.warmup_steps);
        optimizer.set_lr(lr);
        optimizer.step(&grads)?;
        if let Some(ema) = ema.as_mut() {
            ema.update(&params)?;
        }
        let done = step + 1;
        on_step(&StepReport { step: done, steps: options.steps, loss, lr, grad_norm, elapsed: started.elapsed() });
        let every = |n: Option<usize>| n.is_some_and(|n| n > 0 && done.is_multiple_of(n));
        let last = done == options.steps;
        if last || every(options.save_every) || every(options.samples.as_ref().map(|s| s.every)) {
            // The averaged weights are what a run exports and shows.
            if let Some(ema) = ema.as_mut() {
                ema.swap(&params)?;
            }
            let result = (|| -> Result<()> {
                if let Some(samples) = options.samples.as_ref().filter(|s| last || every(Some(s.every))) {
                    write_samples(model, options, samples, done, output)?;
                }
                if last || every(options.save_every) {
                    trainee.export(options, done, output)?;
                }
                Ok(())
            })();
            if let Some(ema) = ema.as_mut() {
                ema.swap(&params)?;
            }
            result?;
            if last || every(options.save_every) {
                save_state(&params, optimizer.as_ref(), ema.as_ref(), &identity, &state_path(output))?;
            }
        }
    }
    Ok(())
}

/// What every micro-batch of a run reads.
struct Run<'a> {
    model: &'a StableDiffusion,
    data: &'a Dataset,
    prior: Option<&'a PriorPreservation>,
    options: &'a TrainingOptions,
    trainee: &'a dyn Trainee,
    objective: DenoisingObjective,
}

/// The example orders of a run: the training data's (example by example, or batch by batch from
/// aspect-ratio buckets) and, with prior preservation, the class images'.
struct Orders {
    instance: InstanceOrder,
    class: Option<EpochOrder>,
}

/// How the training examples are ordered.
enum InstanceOrder {
    /// Square crops: any examples batch together.
    Examples(EpochOrder),
    /// Each batch from one aspect-ratio bucket.
    Buckets(BucketOrder),
}

/// One batch's examples.
struct BatchExamples {
    /// The training examples.
    instance: Vec<usize>,
    /// Their size (width, height).
    size: (usize, usize),
    /// As many class images (with prior preservation).
    class: Vec<usize>,
}

impl Orders {
    /// The next batch (of `options.batch_size` examples, or fewer at the end of a bucket).
    fn next_batch(&mut self, options: &TrainingOptions) -> BatchExamples {
        let (instance, size) = match &mut self.instance {
            InstanceOrder::Examples(order) => {
                ((0..options.batch_size).map(|_| order.next()).collect(), (options.resolution, options.resolution))
            }
            InstanceOrder::Buckets(order) => order.next_batch(),
        };
        let class = match self.class.as_mut() {
            Some(order) => instance.iter().map(|_| order.next()).collect(),
            None => Vec::new(),
        };
        BatchExamples { instance, size, class }
    }
}

impl Run<'_> {
    /// The loss of micro-batch `micro` of the run (its draws seeded by the run's seed and `micro`):
    /// the next examples (and class images), their captions (some dropped), the noise and
    /// timesteps, the trainee's controls, the UNet's prediction against the objective's target.
    fn micro_batch_loss(&self, orders: &mut Orders, micro: usize) -> Result<Tensor> {
        let Self { model, data, prior, options, trainee, ref objective } = *self;
        let device = model.device().clone();
        let mut rng = StdRng::seed_from_u64(step_seed(options.seed, micro));
        let mut noise = SeededNoise::new(rng.random());
        let BatchExamples { instance: indices, size, class } = orders.next_batch(options);
        let flips: Vec<bool> = indices.iter().map(|_| options.random_flip && rng.random_bool(0.5)).collect();
        let batch_of = |load: &dyn Fn(usize, bool) -> Result<Tensor>| -> Result<Tensor> {
            let tensors = indices.iter().zip(&flips).map(|(&i, &flip)| load(i, flip)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&tensors, 0)?)
        };
        let mut images = batch_of(&|i, flip| data.image(i, size, flip, &device))?;
        let conditions = if trainee.uses_conditions() {
            Some(batch_of(&|i, flip| data.condition(i, size, flip, &device))?)
        } else {
            None
        };
        let mut captions: Vec<&str> = indices
            .iter()
            .map(|&i| {
                let dropped = options.caption_dropout > 0.0 && rng.random_bool(options.caption_dropout);
                if dropped { "" } else { data.examples()[i].caption.as_str() }
            })
            .collect();
        if let Some(prior) = prior {
            let class_images =
                class.iter().map(|&i| prior.class_data.image(i, size, false, &device)).collect::<Result<Vec<_>>>()?;
            images = Tensor::cat(&[images, Tensor::stack(&class_images, 0)?], 0)?;
            captions.extend(class.iter().map(|&i| prior.class_data.examples()[i].caption.as_str()));
        }
        let context = trainee.context(model, &captions)?;
        let latents = model.vae.encode_to_latents(&images, &mut noise)?;
        let mut eps = noise.sample(latents.dims(), &device)?;
        if options.noise_offset != 0.0 {
            let (b, c, _, _) = latents.dims4()?;
            eps = eps.broadcast_add(&(noise.sample(&[b, c, 1, 1], &device)? * options.noise_offset)?)?;
        }
        let steps_trained = objective.num_train_timesteps();
        let kind = trainee.objective();
        let timesteps: Vec<usize> = (0..images.dim(0)?)
            .map(|_| match kind {
                StepObjective::Uniform => rng.random_range(0..steps_trained),
                StepObjective::EulerCubic => {
                    let u: f64 = rng.random();
                    (((1.0 - u.powi(3)) * steps_trained as f64) as usize).min(steps_trained - 1)
                }
            })
            .collect();
        let t = Tensor::new(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), &device)?;
        let (input, noisy) = match kind {
            StepObjective::Uniform => (objective.add_noise(&latents, &eps, &timesteps)?, None),
            StepObjective::EulerCubic => {
                let (noisy, input) = objective.euler_noisy(&latents, &eps, &timesteps)?;
                (input, Some(noisy))
            }
        };
        let conditioning = Conditioning::text(context);
        let batch = StepBatch {
            data,
            indices: &indices,
            noisy: &input,
            timesteps: &t,
            conditioning: &conditioning,
            conditions: conditions.as_ref(),
        };
        let controls = trainee.controls(&batch, &mut rng)?;
        let prediction = model.unet.forward(UNetInput::new(&input, &t, &conditioning).with_controls(&controls))?;
        Ok(match (&noisy, prior) {
            (None, None) => objective.loss(&prediction, &objective.target(&latents, &eps, &timesteps)?, &timesteps)?,
            (None, Some(prior)) => {
                let target = objective.target(&latents, &eps, &timesteps)?;
                objective.prior_preservation_loss(&prediction, &target, &timesteps, prior.weight)?
            }
            (Some(noisy), _) => objective.euler_denoised_loss(&prediction, noisy, &latents, &timesteps)?,
        })
    }
}

/// `sum` with the gradients of `more` added, variable by variable.
fn add_gradients(mut sum: GradStore, more: GradStore, params: &[(String, Var)]) -> Result<GradStore> {
    for (_, var) in params {
        if let Some(g) = more.get(var.as_tensor()) {
            let total = match sum.get(var.as_tensor()) {
                Some(s) => (s.detach() + g.detach())?,
                None => g.detach(),
            };
            sum.insert(var.as_tensor(), total);
        }
    }
    Ok(sum)
}

/// Writes the sample images of step `step`: each prompt generated with the model as trained so far,
/// at the training resolution, seeded by the run's seed, as `<output stem>-samples/step-NNNNNN-K.png`.
fn write_samples(
    model: &StableDiffusion,
    options: &TrainingOptions,
    samples: &Samples,
    step: usize,
    output: &Path,
) -> Result<()> {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = output.with_file_name(format!("{stem}-samples"));
    create_folder(&dir)?;
    for (k, prompt) in samples.prompts.iter().enumerate() {
        let request = GenerateRequest {
            prompt: prompt.clone(),
            steps: samples.steps,
            guidance: samples.guidance,
            width: options.resolution,
            height: options.resolution,
            batch: 1,
            ..Default::default()
        };
        let generated = model.generate(&request, &mut [], &mut SeededNoise::new(options.seed), &mut |_| {})?;
        for image in to_rgb8(&generated.images)? {
            save_png(&dir.join(format!("step-{step:06}-{k}.png")), &image)?;
        }
    }
    Ok(())
}

/// Writes `tensors` with `metadata` to `path` as safetensors, atomically.
pub(super) fn write_tensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    crate::io::output::write_file(path, |file| {
        crate::io::output::write_safetensors(file, tensors, Some(metadata))
            .map_err(|message| Error::Format { path: path.into(), message })
    })
}

/// Where the checkpoint of a run writing `output` goes: `<stem>.state.safetensors` beside it.
pub fn state_path(output: &Path) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!("{stem}.state.safetensors"))
}

/// What a checkpoint records of the run, each of which a resumed run must share.
fn run_identity(
    options: &TrainingOptions,
    data: &Dataset,
    prior: Option<&PriorPreservation>,
    trainee: &dyn Trainee,
) -> Vec<(&'static str, String)> {
    let mut identity = vec![
        ("seed", options.seed.to_string()),
        ("resolution", options.resolution.to_string()),
        ("batch_size", options.batch_size.to_string()),
        ("examples", data.examples().len().to_string()),
        ("caption_dropout", options.caption_dropout.to_string()),
    ];
    if options.gradient_accumulation > 1 {
        identity.push(("gradient_accumulation", options.gradient_accumulation.to_string()));
    }
    if let Some(decay) = options.ema_decay {
        identity.push(("ema_decay", decay.to_string()));
    }
    if options.aspect_buckets {
        identity.push(("aspect_buckets", "true".to_string()));
    }
    if options.optimizer_kind == OptimizerKind::Adafactor {
        identity.push(("optimizer", "adafactor".to_string()));
    }
    if let Some(prior) = prior {
        identity.push(("class_examples", prior.class_data.examples().len().to_string()));
        identity.push(("prior_loss_weight", prior.weight.to_string()));
    }
    identity.extend(trainee.identity());
    identity
}

/// Writes the checkpoint: the trained variables (`param.<name>`), AdamW's moments (`adam.<name>`)
/// and in the metadata the step and the run's identity.
fn save_state(
    params: &[(String, Var)],
    optimizer: &dyn Optimizer,
    ema: Option<&Ema>,
    identity: &[(&'static str, String)],
    path: &Path,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> =
        detached(params).into_iter().map(|(name, t)| (format!("param.{name}"), t)).collect();
    let prefix = optimizer.checkpoint_prefix();
    tensors.extend(optimizer.state().into_iter().map(|(name, t)| (format!("{prefix}{name}"), t)));
    if let Some(ema) = ema {
        tensors.extend(ema.state(params).into_iter().map(|(name, t)| (format!("ema.{name}"), t)));
    }
    let mut metadata: HashMap<String, String> = identity.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    metadata.insert("step".into(), optimizer.steps().to_string());
    write_tensors(path, tensors, metadata)
}

/// Loads the checkpoint at `path` into the adapters and the optimiser: the step to go on from.
fn resume(
    path: &Path,
    steps: usize,
    identity: &[(&'static str, String)],
    params: &[(String, Var)],
    optimizer: &mut dyn Optimizer,
    ema: Option<&mut Ema>,
) -> Result<usize> {
    let bad = |message: String| Error::Format { path: path.into(), message };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a checkpoint: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    for (key, value) in identity {
        let saved = metadata.get(*key).ok_or_else(|| {
            bad(format!(
                "no `{key}` in its metadata: a checkpoint of a run with other options, or not a diffctl checkpoint"
            ))
        })?;
        if saved != value {
            return Err(bad(format!("it was trained with {key} {saved}, this run has {value}")));
        }
    }
    // Options recorded only when used (so that older checkpoints still resume) must not be in the
    // checkpoint unless this run uses them too.
    let mut extra: Vec<_> =
        metadata.iter().filter(|(k, _)| *k != "step" && !identity.iter().any(|(i, _)| i == k)).collect();
    extra.sort();
    if let Some((key, value)) = extra.first() {
        return Err(bad(format!("it was trained with {key} {value}, which this run does not set")));
    }
    let step: usize =
        metadata.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no step count in its metadata".into()))?;
    if step >= steps {
        return Err(bad(format!("it has already trained {step} steps, and this run asks for {steps}")));
    }
    let tensors = candle_core::safetensors::load_buffer(
        &bytes,
        params.first().map_or(&candle_core::Device::Cpu, |(_, v)| v.device()),
    )?;
    for (name, var) in params {
        let key = format!("param.{name}");
        let saved = tensors.get(&key).ok_or_else(|| bad(format!("no `{key}`")))?;
        if saved.dims() != var.dims() {
            return Err(bad(format!("`{key}` is {:?}, the adapter {:?}", saved.dims(), var.dims())));
        }
        var.set(saved)?;
    }
    let with_prefix = |prefix: &str| -> HashMap<String, Tensor> {
        tensors.iter().filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t.clone()))).collect()
    };
    optimizer.restore(&with_prefix(optimizer.checkpoint_prefix()), step).map_err(|e| bad(e.to_string()))?;
    if let Some(ema) = ema {
        ema.restore(params, &with_prefix("ema."), step).map_err(|e| bad(e.to_string()))?;
    }
    Ok(step)
}

/// The seed of step `step`'s draws.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Example indices epoch after epoch, each epoch a permutation seeded by (seed, epoch).
struct EpochOrder {
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    position: usize,
}

impl EpochOrder {
    fn new(len: usize, seed: u64) -> Self {
        let mut order = Self { seed, epoch: 0, order: (0..len).collect(), position: 0 };
        order.shuffle();
        order
    }

    fn shuffle(&mut self) {
        self.order.sort_unstable();
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch.wrapping_mul(0xd1b5_4a32_d192_ed03)));
        self.order.shuffle(&mut rng);
    }

    fn next(&mut self) -> usize {
        if self.position == self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        self.position += 1;
        self.order[self.position - 1]
    }
}
