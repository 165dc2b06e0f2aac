//! One measurement, run in its own process (the parent starts one per measurement so that each peak
//! RSS is that measurement's alone): load what it needs, time warm-up + timed runs, report the
//! process's peak RSS.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use diffctl::control::cross_attention::{ImagePromptEmbeds, IpAdapter, IpAdapterWeights, IpScale};
use diffctl::control::residual::controlnet::{ControlNetControl, ControlNetSettings, load_controlnet};
use diffctl::control::{Control, GenerationSetup, StepContext};
use diffctl::io::model_files::{ModelFiles, SourceOptions};
use diffctl::io::weights::Weights;
use diffctl::models::clip_text::ClipTextEncoder;
use diffctl::models::nn::LayerRegistry;
use diffctl::models::unet::{Conditioning, DeepCache, UNet, UNetInput};
use diffctl::models::vae::Vae;
use diffctl::noise::SeededNoise;
use diffctl::pipeline::{GenerateRequest, LoadOptions, Progress, StableDiffusion};
use diffctl::schedulers::{self, NoiseSource, SchedulerKind};
use serde::{Deserialize, Serialize};

/// The prompt of the text-encoding and whole-generation measurements.
pub const PROMPT: &str = "a photograph of an astronaut riding a horse on the moon, detailed, 8k";
/// Steps and guidance of the whole generation.
pub const FULL_STEPS: usize = 20;
const GUIDANCE: f64 = 7.5;
/// The tile side of [`Kind::VaeTiled`] in pixels (`--vae-tiling --vae-tile-size 512`; the default
/// tile is the VAE's `sample_size`, which at 1024x1024 on SDXL is one tile, no tiling at all).
pub const VAE_TILE: usize = 512;
/// The context length of the single-step measurements (one 77-token prompt).
const CONTEXT_TOKENS: usize = 77;
/// The UNet timestep of the single-step measurements (as the peers use).
const TIMESTEP: f32 = 500.0;

/// What a child process measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Kind {
    /// Tokenize and encode one prompt (77 tokens).
    Text,
    /// One UNet step, batch 1, 64x64 latents, 77x768 context.
    UnetB1,
    /// One UNet step, batch 2 (classifier-free guidance).
    UnetB2,
    /// VAE decode of one latent to the model's native size (SD1.5 512x512, SDXL 1024x1024).
    Vae,
    /// The same decode in overlapping tiles of [`VAE_TILE`] pixels.
    VaeTiled,
    /// A batch-2 UNet step with one ControlNet, paired with a plain step.
    Controlnet,
    /// A batch-2 UNet step with one base IP-Adapter, paired with a plain step.
    IpAdapter,
    /// A whole 20-step generation at the native size with guidance (text, sampling, decode).
    Full,
    /// The same generation with DeepCache (an opt-in approximation) at [`DEEP_CACHE_INTERVAL`],
    /// branch 0.
    FullDeepCache,
    /// A LoRA training step (rank 16, batch 1, native size; see [`super::train`]).
    TrainLora,
    /// A ControlNet training step (batch 1, native size).
    TrainControlnet,
}

/// The DeepCache interval of [`Kind::FullDeepCache`] (DeepCache's own example uses 3).
pub const DEEP_CACHE_INTERVAL: usize = 3;

impl Kind {
    /// Every measurement, in the order they run.
    pub const ALL: [Kind; 11] = [
        Kind::Text,
        Kind::UnetB1,
        Kind::UnetB2,
        Kind::Vae,
        Kind::VaeTiled,
        Kind::Controlnet,
        Kind::IpAdapter,
        Kind::Full,
        Kind::FullDeepCache,
        Kind::TrainLora,
        Kind::TrainControlnet,
    ];

    /// Whether this is a whole generation (no warm-up, --full-runs times, never in the default set).
    pub fn is_generation(self) -> bool {
        matches!(self, Kind::Full | Kind::FullDeepCache)
    }

    /// Whether this is a training step (never in the default set; `--train` adds both).
    pub fn is_training(self) -> bool {
        matches!(self, Kind::TrainLora | Kind::TrainControlnet)
    }

    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::UnetB1 => "unet-b1",
            Kind::UnetB2 => "unet-b2",
            Kind::Vae => "vae",
            Kind::VaeTiled => "vae-tiled",
            Kind::Controlnet => "controlnet",
            Kind::IpAdapter => "ip-adapter",
            Kind::Full => "full",
            Kind::FullDeepCache => "full-deep-cache",
            Kind::TrainLora => "train-lora",
            Kind::TrainControlnet => "train-controlnet",
        }
    }
}

/// What a child needs to know.
#[derive(Debug, Clone)]
pub struct Job {
    /// The measurement.
    pub kind: Kind,
    /// The diffusers folder.
    pub model: PathBuf,
    /// The ControlNet folder (for [`Kind::Controlnet`]).
    pub controlnet: Option<PathBuf>,
    /// The IP-Adapter file (for [`Kind::IpAdapter`]).
    pub ip_adapter: Option<PathBuf>,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs.
    pub runs: usize,
    /// Compute dtype.
    pub dtype: DType,
    /// Where to run.
    pub device: Device,
    /// Seed of the inputs.
    pub seed: u64,
}

impl Job {
    /// The dtype activations run in (f32 for half-precision weights on the CPU; see
    /// [`diffctl::io::weights::precision`]).
    fn compute_dtype(&self) -> DType {
        diffctl::io::weights::precision(self.dtype, &self.device).0
    }
}

/// What a child reports (one JSON line on stdout).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Seconds of each timed run.
    pub runs: Vec<f64>,
    /// Controls: seconds of the plain step run right before each timed run.
    pub baseline: Vec<f64>,
    /// Named parts in seconds: `load`; for the whole generation also `text + sampling`, `step` (mean),
    /// `decode`.
    pub parts: BTreeMap<String, f64>,
    /// Peak resident set of the process (ru_maxrss), GB.
    pub peak_rss_gb: f64,
    /// The thread count candle's CPU backend uses.
    pub threads: usize,
    /// CPU time of the process over the timed runs divided by their wall time × `threads`: below 1
    /// when cores sat idle (serial code) or other work took them (see `machine_busy`).
    pub cpu_share: f64,
    /// The fraction of the whole machine's CPU time that was busy over the timed runs (all processes,
    /// from /proc/stat): near 1 with a low `cpu_share` means other work competed for the cores.
    pub machine_busy: f64,
    /// A sanity check of the last output (finite, mean |x|).
    pub check: String,
}

/// Marks the child's result line on stdout.
pub const RESULT_TAG: &str = "SD15-BENCH-RESULT ";

fn rusage() -> Option<libc::rusage> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    (unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0).then_some(usage)
}

/// The peak resident set of this process in "GB" as the peers print it: Linux's `ru_maxrss` (KiB)
/// × 10^-6, so one unit is 1.024 × 10^9 bytes (macOS reports bytes: × 10^-9).
pub fn peak_rss_gb() -> f64 {
    // Linux reports kilobytes, macOS bytes.
    let scale = if cfg!(target_os = "macos") { 1e-9 } else { 1e-6 };
    rusage().map_or(f64::NAN, |u| u.ru_maxrss as f64 * scale)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    rusage().map_or(f64::NAN, |u| secs(u.ru_utime) + secs(u.ru_stime))
}

/// The machine's (busy, total) CPU jiffies so far, from /proc/stat (zeros elsewhere).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The wall clock, this process's CPU time and the machine's jiffies at one moment: steps that run
/// inside a library call are timed by the snapshots its progress callback takes.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    at: Instant,
    cpu: f64,
    machine: (u64, u64),
}

impl Usage {
    /// Now.
    pub fn now() -> Self {
        Self { at: Instant::now(), cpu: cpu_seconds(), machine: machine_jiffies() }
    }

    /// Wall seconds since `earlier`.
    pub fn wall_since(&self, earlier: &Usage) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64()
    }
}

/// Accumulates the CPU and wall time of the timed runs, and the machine's busy and total jiffies.
#[derive(Debug, Default)]
pub struct Share {
    cpu: f64,
    wall: f64,
    machine_busy: u64,
    machine_total: u64,
}

impl Share {
    /// Adds the span from `from` to `to`.
    pub fn add(&mut self, from: &Usage, to: &Usage) {
        self.cpu += to.cpu - from.cpu;
        self.wall += to.wall_since(from);
        self.machine_busy += to.machine.0 - from.machine.0;
        self.machine_total += to.machine.1 - from.machine.1;
    }

    /// Runs `f`, adding its CPU and wall time when `timed`; returns `f`'s wall seconds.
    fn time(&mut self, device: &Device, timed: bool, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let start = Usage::now();
        f()?;
        sync(device)?;
        let end = Usage::now();
        if timed {
            self.add(&start, &end);
        }
        Ok(end.wall_since(&start))
    }

    /// Our share of `threads` cores, and the machine's busy fraction.
    pub fn of(&self, threads: usize) -> (f64, f64) {
        (self.cpu / (self.wall * threads as f64), self.machine_busy as f64 / self.machine_total as f64)
    }
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Times `f` `warmup` + `runs` times, printing each run to stderr; returns the timed runs.
fn time_runs(job: &Job, share: &mut Share, label: &str, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    time_runs_after(job, share, label, || Ok(()), |()| f())
}

/// [`time_runs`] where each run first gets its input from `setup`, untimed.
fn time_runs_after<T>(
    job: &Job,
    share: &mut Share,
    label: &str,
    mut setup: impl FnMut() -> Result<T>,
    mut f: impl FnMut(T) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(job.runs);
    for i in 0..job.warmup + job.runs {
        let input = setup()?;
        let s = share.time(&job.device, i >= job.warmup, || f(input))?;
        let what = if i < job.warmup { format!("warm-up {i}") } else { format!("run {}", i - job.warmup) };
        eprintln!("  {label} {what}: {s:.2} s");
        if i >= job.warmup {
            out.push(s);
        }
    }
    Ok(out)
}

fn check(t: &Tensor) -> Result<String> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    let values: Vec<f32> = t.to_vec1()?;
    let finite = values.iter().all(|v| v.is_finite());
    let mean = values.iter().map(|v| f64::from(v.abs())).sum::<f64>() / values.len().max(1) as f64;
    Ok(format!("output {:?}, mean |x| {mean:.4}, {}", t.dims(), if finite { "finite" } else { "NOT FINITE" }))
}

/// The shapes a model's measurements run at: its native image size and the single step's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    /// Image side in pixels (the UNet's `sample_size` times the VAE's scale factor).
    pub image: usize,
    /// Latent side.
    pub latent: usize,
    /// Context width (SDXL: both encoders' widths).
    pub context_dim: usize,
    /// SDXL: the pooled embedding's width (the added embedding's input less six time ids).
    pub pooled_dim: Option<usize>,
}

impl Shapes {
    /// The shapes of the model `files` describe.
    pub fn of(files: &ModelFiles) -> Self {
        let (unet, vae) = (&files.unet.config, &files.vae.config);
        let latent = unet.sample_size.unwrap_or(64);
        Self {
            image: latent * vae.scale_factor(),
            latent,
            context_dim: unet.blocks[0].cross_attention_dim,
            pooled_dim: unet.add_embedding.as_ref().map(|a| a.input_dim - 6 * a.time_id_dim),
        }
    }

    /// "64x64 latents, 77x768 context" and the like, for the table.
    pub fn step_description(&self) -> String {
        format!("{0}x{0} latents, {CONTEXT_TOKENS}x{1} context", self.latent, self.context_dim)
    }
}

/// The single-step inputs: latents [b, 4, h, w], timesteps [b], and the conditioning: context
/// [b, 77, D], and for SDXL pooled embeddings [b, P] and time ids [b, 6] (original size, crop corner,
/// target size as the pipeline gives them).
fn unet_inputs(job: &Job, unet: &UNet, shapes: &Shapes, batch: usize) -> Result<(Tensor, Tensor, Conditioning)> {
    let mut noise = SeededNoise::new(job.seed);
    let c = unet.config();
    let dtype = job.compute_dtype();
    let x = noise.sample(&[batch, c.in_channels, shapes.latent, shapes.latent], &job.device)?.to_dtype(dtype)?;
    let ctx = noise.sample(&[batch, CONTEXT_TOKENS, shapes.context_dim], &job.device)?.to_dtype(dtype)?;
    let t = Tensor::full(TIMESTEP, batch, &job.device)?;
    let mut conditioning = Conditioning::text(ctx);
    if let Some(p) = shapes.pooled_dim {
        conditioning.pooled = Some(noise.sample(&[batch, p], &job.device)?.to_dtype(dtype)?);
        let size = shapes.image as f32;
        let ids = Tensor::new(&[size, size, 0.0, 0.0, size, size], &job.device)?;
        conditioning.time_ids = Some(ids.unsqueeze(0)?.repeat((batch, 1))?.to_dtype(dtype)?);
    }
    Ok((x, t, conditioning))
}

/// Runs `job` in this process.
pub fn run(job: &Job) -> Result<Outcome> {
    let mut out = Outcome { threads: candle_core::utils::get_num_threads(), ..Default::default() };
    let t0 = Instant::now();
    let files = ModelFiles::open(&job.model, &SourceOptions::default())?;
    let shapes = Shapes::of(&files);
    let weights = |store: &Arc<diffctl::io::weights::TensorStore>| Weights::new(store.clone(), job.dtype, &job.device);
    let load_unet = || -> Result<UNet> { Ok(UNet::load(&weights(&files.unet.weights), &files.unet.config)?) };
    let mut last = None;
    let mut share = Share::default();
    match job.kind {
        Kind::TrainLora | Kind::TrainControlnet => {
            // Steps inside the library's training run, timed by its progress reports.
            super::train::run(job, shapes.image, &mut out)?;
            out.peak_rss_gb = peak_rss_gb();
            return Ok(out);
        }
        Kind::Text => {
            let encoder = ClipTextEncoder::load(&weights(&files.text_encoder.weights), &files.text_encoder.config)?;
            out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
            let tokenizer = &files.tokenizer;
            out.runs = time_runs(job, &mut share, "text encoding", || {
                let ids = tokenizer.encode_padded(PROMPT)?;
                let ids = Tensor::from_vec(ids, (1, tokenizer.max_length()), &job.device)?;
                last = Some(encoder.encode(&ids, 0)?);
                Ok(())
            })?;
        }
        Kind::UnetB1 | Kind::UnetB2 => {
            let unet = load_unet()?;
            out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
            let batch = if job.kind == Kind::UnetB1 { 1 } else { 2 };
            let (x, t, conditioning) = unet_inputs(job, &unet, &shapes, batch)?;
            out.runs = time_runs(job, &mut share, &format!("unet b{batch}"), || {
                last = Some(unet.forward(UNetInput::new(&x, &t, &conditioning))?);
                Ok(())
            })?;
        }
        Kind::Vae | Kind::VaeTiled => {
            let mut vae = Vae::load(&weights(&files.vae.weights), &files.vae.config)?;
            if job.kind == Kind::VaeTiled {
                vae.enable_tiling(Some(VAE_TILE))?;
            }
            out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
            let z = SeededNoise::new(job.seed)
                .sample(&[1, vae.config().latent_channels, shapes.latent, shapes.latent], &job.device)?
                .to_dtype(job.compute_dtype())?;
            out.runs = time_runs(job, &mut share, job.kind.name(), || {
                last = Some(vae.decode(&z)?);
                Ok(())
            })?;
        }
        Kind::Controlnet | Kind::IpAdapter => {
            let unet = load_unet()?;
            let vae = Vae::load(&weights(&files.vae.weights), &files.vae.config)?;
            let mut control = load_control(job, &unet, shapes.image)?;
            let (x, t, conditioning) = unet_inputs(job, &unet, &shapes, 2)?;
            let scheduler = schedulers::build(SchedulerKind::Ddim, None, &files.scheduler_config, FULL_STEPS)?;
            let mut noise = SeededNoise::new(job.seed ^ 2);
            let layers = LayerRegistry::new();
            control.prepare(&mut GenerationSetup {
                unet: &unet,
                vae: &vae,
                layers: &layers,
                batch: 1,
                guided: true,
                image_size: (shapes.image, shapes.image),
                latent_size: (x.dim(2)?, x.dim(3)?),
                dtype: job.compute_dtype(),
                device: &job.device,
                noise: &mut noise,
            })?;
            drop(vae);
            out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
            for i in 0..job.warmup + job.runs {
                let timed = i >= job.warmup;
                let plain = share.time(&job.device, timed, || {
                    unet.forward(UNetInput::new(&x, &t, &conditioning))?;
                    Ok(())
                })?;
                let with = share.time(&job.device, timed, || {
                    let mut step = StepContext {
                        unet: &unet,
                        scheduler: scheduler.as_ref(),
                        noise: &mut noise,
                        step_index: 0,
                        num_steps: FULL_STEPS,
                        scheduler_step: 0,
                        timestep: f64::from(TIMESTEP),
                        timesteps: &t,
                        latents: &x,
                        conditioning: &conditioning,
                        guided: true,
                    };
                    let controls = control.contribute(&mut step)?;
                    last = Some(unet.forward(UNetInput::new(&x, &t, &conditioning).with_controls(&controls))?);
                    Ok(())
                })?;
                let what = if i < job.warmup { format!("warm-up {i}") } else { format!("run {}", i - job.warmup) };
                eprintln!("  unet b2 {what}: plain {plain:.2} s, with {} {with:.2} s", job.kind.name());
                if i >= job.warmup {
                    out.baseline.push(plain);
                    out.runs.push(with);
                }
            }
        }
        Kind::Full | Kind::FullDeepCache => {
            drop(files);
            let options = LoadOptions { dtype: job.dtype, device: job.device.clone(), files: SourceOptions::default() };
            let req = GenerateRequest {
                prompt: PROMPT.into(),
                steps: FULL_STEPS,
                guidance: GUIDANCE,
                width: shapes.image,
                height: shapes.image,
                batch: 1,
                deep_cache: (job.kind == Kind::FullDeepCache)
                    .then(|| DeepCache::new(DEEP_CACHE_INTERVAL, 0))
                    .transpose()?,
                ..Default::default()
            };
            let mut marks = Vec::new();
            // As the CLI does: one model per generation, each network freed once its stage is done
            // (`generate_once`), so every run loads the model again, untimed.
            let load = || -> Result<StableDiffusion> {
                let t0 = Instant::now();
                let model = StableDiffusion::load(&job.model, &options)?;
                out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
                Ok(model)
            };
            out.runs = time_runs_after(job, &mut share, "whole generation", load, |model| {
                marks.clear();
                let start = Instant::now();
                let mut progress = |p: Progress| {
                    marks.push((p, start.elapsed().as_secs_f64()));
                    if let Progress::Step { done, total } = p {
                        eprint!("\r    step {done}/{total} at {:.1} s", start.elapsed().as_secs_f64());
                    }
                };
                let generated = model.generate_once(&req, &mut [], &mut SeededNoise::new(job.seed), &mut progress)?;
                eprintln!();
                last = Some(generated.images);
                Ok(())
            })?;
            let at = |f: &dyn Fn(&Progress) -> bool| marks.iter().find(|(p, _)| f(p)).map(|(_, s)| *s);
            let total = out.runs.last().copied().unwrap_or(f64::NAN);
            if let (Some(sampling), Some(decoding)) =
                (at(&|p| matches!(p, Progress::Sampling { .. })), at(&|p| *p == Progress::Decoding))
            {
                out.parts.insert("text + setup".into(), sampling);
                // PNDM's 20 steps are 21 UNet calls (its first step runs twice); Euler's are 20.
                let calls = marks.iter().filter(|(p, _)| matches!(p, Progress::Step { .. })).count();
                out.parts.insert("step (mean)".into(), (decoding - sampling) / calls.max(1) as f64);
                out.parts.insert("decode".into(), total - decoding);
            }
        }
    }
    out.check = match &last {
        Some(t) => check(t)?,
        None => bail!("{}: nothing was run (runs = 0?)", job.kind.name()),
    };
    out.peak_rss_gb = peak_rss_gb();
    (out.cpu_share, out.machine_busy) = share.of(out.threads);
    Ok(out)
}

/// The control of a [`Kind::Controlnet`] or [`Kind::IpAdapter`] job, built once (the IP-Adapter's
/// image tokens and per-layer keys/values are computed here, outside the timed steps, as the
/// pipeline does; its image encoder is not run: the embedding is random).
fn load_control(job: &Job, unet: &UNet, image_size: usize) -> Result<Box<dyn Control>> {
    let mut noise = SeededNoise::new(job.seed ^ 1);
    Ok(match job.kind {
        Kind::Controlnet => {
            let path = job.controlnet.as_ref().context("no ControlNet given")?;
            let options = LoadOptions { dtype: job.dtype, device: job.device.clone(), files: SourceOptions::default() };
            let model = load_controlnet(path, &options, Some(unet.config()))?;
            let image =
                (noise.sample(&[1, 3, image_size, image_size], &job.device)?.abs()? / 3.0)?.clamp(0f32, 1f32)?;
            let name = path.display().to_string();
            Box::new(ControlNetControl::new(name, Arc::new(model), image, ControlNetSettings::default())?)
        }
        Kind::IpAdapter => {
            let path = job.ip_adapter.as_ref().context("no IP-Adapter given")?;
            let weights = IpAdapterWeights::load(path, unet.config(), job.dtype, &job.device)?;
            let positive = noise.sample(&[1, weights.projection().input_dim()], &job.device)?;
            let embeds = ImagePromptEmbeds { negative: positive.zeros_like()?, positive };
            Box::new(IpAdapter::new(&weights, &embeds, &IpScale::default(), None)?)
        }
        other => bail!("{} has no control", other.name()),
    })
}
