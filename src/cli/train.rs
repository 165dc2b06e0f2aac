//! `diffctl train`: fine-tune a model's adapters, or learn a new token, on a folder of captioned
//! images.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::train::controlnet::{ControlNetStart, train_controlnet};
use crate::train::dataset::Dataset;
use crate::train::ip_adapter::{IpAdapterOptions, train_ip_adapter};
use crate::train::optimizer::AdamWConfig;
use crate::train::run::{
    FullOptions, LoraOptions, StepReport, TextualInversionOptions, TrainingOptions, train_full, train_lora,
    train_textual_inversion,
};
use crate::train::schedule::LrSchedule;
use crate::train::t2i_adapter::{T2IAdapterStart, train_t2i_adapter};

/// Arguments of `diffctl train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    kind: TrainKind,
}

/// What to train.
#[derive(Debug, Subcommand)]
enum TrainKind {
    /// LoRA adapters on the UNet's attention projections, written as a kohya .safetensors file
    /// (loads in A1111, ComfyUI, diffusers' load_lora_weights and `diffctl generate --lora`).
    Lora(Box<LoraArgs>),
    /// A new token's embedding vectors (textual inversion), written as a diffusers embedding
    /// (loads in `diffctl generate --embedding`, diffusers' load_textual_inversion and A1111).
    TextualInversion(Box<InversionArgs>),
    /// Every weight of the UNet (and with --train-text-encoder of the text encoder) of a diffusers
    /// folder, written as a diffusers folder (loads in `--model` and diffusers' from_pretrained).
    Full(Box<FullArgs>),
    /// A ControlNet copied from the model's UNet (or an existing one, trained further) on images
    /// paired with condition images, written as a diffusers ControlNet folder (loads in
    /// `--controlnet` and diffusers' ControlNetModel.from_pretrained).
    Controlnet(Box<ControlNetArgs>),
    /// A T2I-Adapter (new, or an existing one trained further) on images paired with condition
    /// images, with the diffusers script's objective (epsilon-prediction models), written as a
    /// diffusers T2IAdapter folder (loads in `--t2i-adapter` and diffusers' T2IAdapter.from_pretrained).
    T2iAdapter(Box<T2IAdapterArgs>),
    /// An IP-Adapter (new, or an existing one trained further): its image projection and the
    /// attention layers' to_k_ip/to_v_ip, each training image its own image prompt, written in the
    /// h94 layout (loads in `--ip-adapter` and diffusers' load_ip_adapter).
    IpAdapter(Box<IpAdapterArgs>),
}

/// Arguments of `diffctl train ip-adapter` (tencent-ailab/IP-Adapter's tutorial_train.py).
#[derive(Debug, Args)]
struct IpAdapterArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The CLIP image-encoder folder (config.json + model.safetensors [+ preprocessor_config.json]).
    #[arg(long, value_name = "DIR")]
    image_encoder: PathBuf,
    /// Train this h94 IP-Adapter file (base, Plus or Full-face) further instead of a new adapter.
    #[arg(long, value_name = "FILE")]
    ip_adapter: Option<PathBuf>,
    /// Image tokens of a new adapter.
    #[arg(long, default_value_t = 4, value_name = "N")]
    tokens: usize,
    /// Train this fraction of examples with a zeroed image embedding.
    #[arg(long, default_value_t = 0.05, value_name = "F")]
    image_dropout: f64,
}

/// Arguments of `diffctl train t2i-adapter` (diffusers' train_t2i_adapter_sdxl.py, for SD1.x/2.x).
#[derive(Debug, Args)]
struct T2IAdapterArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The condition images: a folder holding, for each training image, the file of the same name
    /// (or stem) at the same place.
    #[arg(long, value_name = "DIR")]
    conditioning: PathBuf,
    /// Train this diffusers T2IAdapter folder further instead of a new adapter.
    #[arg(long, value_name = "DIR")]
    t2i_adapter: Option<PathBuf>,
    /// Residual blocks per stage of a new adapter.
    #[arg(long, default_value_t = 2, value_name = "N")]
    res_blocks: usize,
}

/// Arguments of `diffctl train controlnet` (diffusers' train_controlnet.py).
#[derive(Debug, Args)]
struct ControlNetArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The condition images: a folder holding, for each training image, the file of the same name
    /// (or stem) at the same place.
    #[arg(long, value_name = "DIR")]
    conditioning: PathBuf,
    /// Train this diffusers ControlNet folder further instead of a new copy of the UNet.
    #[arg(long, value_name = "DIR")]
    controlnet: Option<PathBuf>,
    /// Channels of the condition images of a new ControlNet.
    #[arg(long, default_value_t = 3, value_name = "N")]
    conditioning_channels: usize,
}

/// Arguments of `diffctl train full`.
#[derive(Debug, Args)]
struct FullArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Also train the text encoder.
    #[arg(long)]
    train_text_encoder: bool,
}

/// Arguments of `diffctl train lora`.
#[derive(Debug, Args)]
struct LoraArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Adapter rank.
    #[arg(long, default_value_t = 4, value_name = "N")]
    rank: usize,
    /// Adapter alpha [default: the rank, i.e. scale 1].
    #[arg(long, value_name = "F")]
    alpha: Option<f64>,
    /// UNet modules that get adapters (PEFT target_modules), comma-separated.
    #[arg(long, default_value = "to_k,to_q,to_v,to_out.0", value_delimiter = ',', value_name = "NAMES")]
    targets: Vec<String>,
}

/// Arguments of `diffctl train textual-inversion` (defaults as diffusers' textual_inversion.py,
/// whose learning rate is 5e-4 after its batch scaling).
#[derive(Debug, Args)]
struct InversionArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The new token, as the captions write it (e.g. "<cat-toy>").
    #[arg(long, value_name = "TOKEN")]
    token: String,
    /// A word of the vocabulary (one token) whose embedding starts the new vectors.
    #[arg(long, value_name = "WORD")]
    initializer: String,
    /// Vectors the token stands for.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vectors: usize,
}

/// The flags every kind shares (defaults as diffusers' training scripts).
#[derive(Debug, Clone, Args)]
struct CommonArgs {
    /// A diffusers model folder or single-file SD1.x/2.x checkpoint to train on (f32).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    #[command(flatten)]
    source: super::source::SourceArgs,
    /// The training images: a folder with metadata.jsonl, kohya `N_name` folders, or images with .txt captions.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Where to write the result (a .safetensors file; a folder for `full`, `controlnet` and `t2i-adapter`).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Square training resolution in pixels.
    #[arg(long, default_value_t = 512, value_name = "PX")]
    resolution: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch_size: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    steps: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-4, value_name = "F")]
    lr: f64,
    /// Learning-rate schedule: constant, constant_with_warmup, linear, cosine.
    #[arg(long, default_value = "constant", value_name = "NAME")]
    lr_scheduler: String,
    /// Steps of linear warm-up from 0.
    #[arg(long, default_value_t = 0, value_name = "N")]
    lr_warmup_steps: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2, value_name = "F")]
    weight_decay: f64,
    /// Gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    max_grad_norm: f64,
    /// min-SNR-γ loss weighting (5 is the paper's choice).
    #[arg(long, value_name = "GAMMA")]
    snr_gamma: Option<f64>,
    /// Offset noise strength (e.g. 0.1).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    noise_offset: f64,
    /// Mirror each image with probability 1/2.
    #[arg(long)]
    random_flip: bool,
    /// Train this fraction of examples with the empty caption (e.g. 0.1 when training from
    /// scratch, so that guidance works).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    caption_dropout: f64,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
    /// Also write the result and a checkpoint (<output stem>.state.safetensors) every N steps; the
    /// checkpoint is written with the final result too.
    #[arg(long, value_name = "N")]
    save_every: Option<usize>,
    /// Continue from a checkpoint of the same run (same data, seed, resolution, batch size and kind
    /// options); --steps is the total to reach.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Append step, loss, learning rate, gradient norm and seconds to this CSV file.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The control kinds' condition images (set from their own flag).
    #[arg(skip)]
    conditioning: Option<PathBuf>,
}

impl CommonArgs {
    fn options(&self) -> anyhow::Result<TrainingOptions> {
        Ok(TrainingOptions {
            resolution: self.resolution,
            batch_size: self.batch_size,
            steps: self.steps,
            optimizer: AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..Default::default() },
            schedule: LrSchedule::from_name(&self.lr_scheduler)?,
            warmup_steps: self.lr_warmup_steps,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            snr_gamma: self.snr_gamma,
            noise_offset: self.noise_offset,
            random_flip: self.random_flip,
            caption_dropout: self.caption_dropout,
            seed: self.seed,
            save_every: self.save_every,
            resume: self.resume.clone(),
        })
    }
}

/// Runs `diffctl train`.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    match &args.kind {
        TrainKind::Lora(args) => {
            let lora = LoraOptions {
                rank: args.rank,
                alpha: args.alpha.unwrap_or(args.rank as f64),
                targets: args.targets.clone(),
            };
            let what = format!("a rank-{} LoRA", lora.rank);
            train(&args.common, &what, |model, data, options, output, on_step| {
                train_lora(model, data, options, &lora, output, on_step)
            })
        }
        TrainKind::TextualInversion(args) => {
            let inversion = TextualInversionOptions {
                token: args.token.clone(),
                initializer: args.initializer.clone(),
                vectors: args.vectors,
            };
            let what = format!("the {} vector(s) of {}", inversion.vectors, inversion.token);
            train(&args.common, &what, |model, data, options, output, on_step| {
                train_textual_inversion(model, data, options, &inversion, output, on_step)
            })
        }
        TrainKind::Full(args) => {
            let full = FullOptions { text_encoder: args.train_text_encoder };
            let what = if full.text_encoder { "the UNet and the text encoder" } else { "the UNet" };
            let source = args.common.model.clone();
            train(&args.common, what, |model, data, options, output, on_step| {
                train_full(model, &source, data, options, &full, output, on_step)
            })
        }
        TrainKind::Controlnet(args) => {
            let start = match &args.controlnet {
                Some(dir) => ControlNetStart::Folder(dir.clone()),
                None => ControlNetStart::FromUnet { conditioning_channels: args.conditioning_channels },
            };
            let mut common = args.common.clone();
            common.conditioning = Some(args.conditioning.clone());
            train(&common, "a ControlNet", |model, data, options, output, on_step| {
                train_controlnet(model, data, options, &start, output, on_step)
            })
        }
        TrainKind::T2iAdapter(args) => {
            let start = match &args.t2i_adapter {
                Some(dir) => T2IAdapterStart::Folder(dir.clone()),
                None => T2IAdapterStart::New { res_blocks: args.res_blocks },
            };
            let mut common = args.common.clone();
            common.conditioning = Some(args.conditioning.clone());
            train(&common, "a T2I-Adapter", |model, data, options, output, on_step| {
                train_t2i_adapter(model, data, options, &start, output, on_step)
            })
        }
        TrainKind::IpAdapter(args) => {
            let ip = IpAdapterOptions {
                image_encoder: args.image_encoder.clone(),
                start: args.ip_adapter.clone(),
                tokens: args.tokens,
                image_dropout: args.image_dropout,
            };
            train(&args.common, "an IP-Adapter", |model, data, options, output, on_step| {
                train_ip_adapter(model, data, options, &ip, output, on_step)
            })
        }
    }
}

/// The part every kind shares: options, data, model, progress bar, loss log, the run.
fn train(
    args: &CommonArgs,
    what: &str,
    run: impl FnOnce(
        &mut StableDiffusion,
        &Dataset,
        &TrainingOptions,
        &std::path::Path,
        &mut dyn FnMut(&StepReport),
    ) -> crate::Result<()>,
) -> anyhow::Result<()> {
    let options = args.options()?;
    let mut data = Dataset::open(&args.data)?;
    if let Some(dir) = &args.conditioning {
        data = data.with_conditions(dir)?;
    }
    let load = LoadOptions { files: args.source.options(), ..Default::default() };
    let mut model =
        StableDiffusion::load(&args.model, &load).with_context(|| format!("loading model {}", args.model.display()))?;
    // A resumed run appends to its log.
    let mut log = match &args.log {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            if file.metadata()?.len() == 0 {
                writeln!(file, "step,loss,lr,grad_norm,seconds")?;
            }
            Some(file)
        }
        None => None,
    };
    eprintln!("training {what} on {} examples for {} steps", data.examples().len(), options.steps);
    let bar = ProgressBar::new(options.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps {msg} {elapsed_precise} (eta {eta})")?
            .progress_chars("=> "),
    );
    let mut log_error = None;
    let mut on_step = |r: &StepReport| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
        if let Some(file) = log.as_mut()
            && log_error.is_none()
        {
            let line = format!("{},{},{},{},{:.3}", r.step, r.loss, r.lr, r.grad_norm, r.elapsed.as_secs_f64());
            log_error = writeln!(file, "{line}").err();
        }
    };
    run(&mut model, &data, &options, &args.output, &mut on_step)?;
    bar.finish();
    if let Some(e) = log_error {
        anyhow::bail!("writing the loss log: {e}");
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
