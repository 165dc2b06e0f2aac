//! Jobs run on a resident model: what the server's generation thread and each Redis worker do
//! with a stored job (switch model, or build the library request and generate, writing the
//! images with their infotexts into the job's folder).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use super::jobs::{Finished, GenerationSpec, JobSpec, JobState};
use super::models_dir::{Entry, Kind, ModelsDir, strip_hash};
use super::monitor::{INTERRUPTED, JobMonitor};
use crate::Error;
use crate::io::model_files::SourceOptions;
use crate::limits::Limits;
use crate::noise::SeededNoise;
use crate::pipeline::hires::{Upscaler, upscale_image, upscale_latents};
use crate::pipeline::{Generated, LoadOptions, Progress, StableDiffusion};
use crate::request::Request;

/// What a runner loads models with.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The model loaded at start.
    pub model: PathBuf,
    /// The models folder.
    pub models_dir: ModelsDir,
    /// Precision and how single-file checkpoints are read.
    pub load: LoadOptions,
    /// Generation limits.
    pub limits: Limits,
}

/// A model the server can load: listed, or the startup model.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The entry.
    pub entry: Entry,
    /// Its SHA-256 once known (files only).
    pub sha256: Option<String>,
}

impl Checkpoint {
    /// A1111's title: `name [shorthash]` once the hash is known, else the name.
    pub fn title(&self) -> String {
        match &self.sha256 {
            Some(hash) => format!("{} [{}]", self.entry.name, &hash[..10]),
            None => self.entry.name.clone(),
        }
    }
}

impl RunnerSettings {
    /// The startup model's entry (listed in the models folder, or outside it).
    pub fn startup_entry(&self) -> Entry {
        self.models_dir
            .list(Kind::Checkpoint)
            .into_iter()
            .find(|e| same_path(&e.path, &self.model))
            .unwrap_or_else(|| Entry::outside(&self.model))
    }

    /// Every loadable checkpoint with the hashes known so far: the startup model first when it is
    /// outside the models folder.
    pub fn checkpoints(&self, hashes: &HashMap<PathBuf, String>) -> Vec<Checkpoint> {
        let mut entries = self.models_dir.list(Kind::Checkpoint);
        let startup = self.startup_entry();
        if !entries.iter().any(|e| same_path(&e.path, &startup.path)) {
            entries.insert(0, startup);
        }
        entries.into_iter().map(|entry| Checkpoint { sha256: hashes.get(&entry.path).cloned(), entry }).collect()
    }

    /// The checkpoint a title names (`name [hash]`, name, stem or hash prefix), or an error
    /// naming the choices.
    pub fn find_checkpoint(&self, title: &str, hashes: &HashMap<PathBuf, String>) -> Result<Checkpoint, String> {
        let all = self.checkpoints(hashes);
        let wanted = title.trim();
        let bare = strip_hash(wanted);
        let by_hash = |c: &&Checkpoint| c.sha256.as_deref().is_some_and(|h| wanted.len() >= 8 && h.starts_with(wanted));
        let found = all
            .iter()
            .find(|c| c.title() == wanted)
            .or_else(|| all.iter().find(|c| c.entry.is_named(bare)))
            .or_else(|| all.iter().find(by_hash));
        found.cloned().ok_or_else(|| {
            format!(
                "no checkpoint is titled `{wanted}`; available: {}",
                all.iter().map(Checkpoint::title).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// A job's failure: its message and whether the request caused it.
#[derive(Debug)]
pub struct JobError {
    /// What went wrong.
    pub message: String,
    /// Whether the request caused it (a 4xx) rather than the server.
    pub client_error: bool,
}

impl From<Error> for JobError {
    fn from(e: Error) -> Self {
        let client_error = matches!(e, Error::InvalidArgument(_));
        Self { message: e.to_string(), client_error }
    }
}

/// Where a running job is: generation `iteration`, `step` of `steps`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// The generation (of `n_iter`).
    pub iteration: usize,
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub steps: usize,
}

/// How a job is watched while it runs.
pub struct Watch<'a> {
    /// Set to stop the job at its next step.
    pub cancel: Arc<AtomicBool>,
    /// Where each step's latents are kept for previews.
    pub latents: Arc<Mutex<Option<Tensor>>>,
    /// Told after every step.
    pub report: &'a mut dyn FnMut(StepReport),
}

/// A resident model and the embeddings already added to it.
pub struct Runner {
    settings: RunnerSettings,
    checkpoint: Checkpoint,
    model: Option<StableDiffusion>,
    embeddings: HashSet<PathBuf>,
}

impl Runner {
    /// Loads the startup model.
    pub fn load(settings: RunnerSettings) -> anyhow::Result<Self> {
        let checkpoint = Checkpoint { entry: settings.startup_entry(), sha256: None };
        let model = load_model(&checkpoint.entry.path, &settings.load)?;
        Ok(Self { settings, checkpoint, model: Some(model), embeddings: HashSet::new() })
    }

    /// The settings.
    pub fn settings(&self) -> &RunnerSettings {
        &self.settings
    }

    /// The resident checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// A1111's default image side for the resident model: 512, or an SDXL model's native size.
    pub fn default_size(&self) -> usize {
        match &self.model {
            Some(model) if self.is_sdxl() => model.unet.config().sample_size.unwrap_or(128) * model.vae_scale_factor(),
            _ => 512,
        }
    }

    /// Whether the resident model is an SDXL model.
    pub fn is_sdxl(&self) -> bool {
        self.model.as_ref().is_some_and(|m| m.unet.config().add_embedding.is_some())
    }

    /// Runs `job` with its files in `dir`; `resolve` turns a model title into a checkpoint.
    pub fn run(
        &mut self,
        job: &JobSpec,
        resolve: &dyn Fn(&str) -> Result<Checkpoint, String>,
        dir: &Path,
        watch: Watch,
    ) -> (JobState, Finished) {
        let cancel = watch.cancel.clone();
        let result = match job {
            JobSpec::LoadModel { title } => resolve(title)
                .map_err(|message| JobError { message, client_error: true })
                .and_then(|c| self.switch(&c))
                .map(|()| Finished::default()),
            JobSpec::Generate(spec) => match spec.checkpoint.as_deref().map(resolve).transpose() {
                Ok(wanted) => {
                    let previous = self.checkpoint.clone();
                    let result =
                        wanted.map_or(Ok(()), |c| self.switch(&c)).and_then(|()| self.generate(spec, dir, watch));
                    if spec.restore_checkpoint
                        && let Err(e) = self.switch(&previous)
                    {
                        eprintln!("diffctl: switching back to {}: {}", previous.entry.name, e.message);
                    }
                    result
                }
                Err(message) => Err(JobError { message, client_error: true }),
            },
        };
        match result {
            Ok(finished) => (JobState::Done, finished),
            Err(_) if cancel.load(Ordering::Relaxed) => {
                (JobState::Cancelled, Finished { error: Some(INTERRUPTED.into()), ..Default::default() })
            }
            Err(JobError { message, client_error }) => {
                (JobState::Failed, Finished { error: Some(message), client_error, ..Default::default() })
            }
        }
    }

    /// Makes `wanted` the resident model (the old one is freed first; on failure the old one is
    /// loaded again so the runner keeps working).
    fn switch(&mut self, wanted: &Checkpoint) -> Result<(), JobError> {
        if same_path(&wanted.entry.path, &self.checkpoint.entry.path) && self.model.is_some() {
            return Ok(());
        }
        self.model = None;
        self.embeddings.clear();
        crate::allocator::release_free_memory();
        match load_model(&wanted.entry.path, &self.settings.load) {
            Ok(model) => {
                self.model = Some(model);
                self.checkpoint = wanted.clone();
                Ok(())
            }
            Err(e) => {
                self.model = load_model(&self.checkpoint.entry.path, &self.settings.load).ok();
                Err(JobError { message: format!("{e:#}"), client_error: false })
            }
        }
    }

    fn generate(&mut self, spec: &GenerationSpec, dir: &Path, mut watch: Watch) -> Result<Finished, JobError> {
        let model_name = self.checkpoint.entry.stem.clone();
        let Some(model) = self.model.as_mut() else {
            return Err(JobError {
                message: "no model is loaded (the last switch failed)".into(),
                client_error: false,
            });
        };
        let (load, limits) = (&self.settings.load, self.settings.limits);
        let mut finished = Finished::default();
        for iteration in 0..spec.n_iter {
            (watch.report)(StepReport { iteration, step: 0, steps: spec.steps });
            let request = spec.request(dir, iteration, limits)?;
            let generated = run_request(model, &mut self.embeddings, load, &request, iteration, &mut watch)?;
            let mut images = crate::io::image::to_rgb8(&generated.images)?;
            if let Some(hires) = &spec.hires {
                let upscaler = Upscaler::parse(&hires.upscaler)?;
                for (i, image) in images.iter_mut().enumerate() {
                    let seed = request.seed.wrapping_add(i as u64);
                    let input = hires_input(model, &generated.latents, i, image, hires, upscaler, dir, iteration)?;
                    let second = spec.hires_request(dir, &input, seed, limits)?;
                    let refined = run_request(model, &mut self.embeddings, load, &second, iteration, &mut watch)?;
                    *image = crate::io::image::to_rgb8(&refined.images)?.remove(0);
                }
            }
            for (i, image) in images.iter().enumerate() {
                let seed = request.seed.wrapping_add(i as u64);
                let infotext = spec.infotext(seed, &model_name);
                let name = format!("output-{iteration}-{i}.png");
                crate::io::output::write_bytes(&dir.join(&name), &super::png::encode(image, Some(&infotext))?)?;
                finished.images.push(name);
                finished.seeds.push(seed);
                finished.infotexts.push(infotext);
            }
        }
        Ok(finished)
    }
}

/// Runs one library request on the resident model under the job's watch (its monitor among the
/// controls, progress reported as generation `iteration`); embeddings are added to the model once
/// and remembered in `embeddings`.
fn run_request(
    model: &mut StableDiffusion,
    embeddings: &mut HashSet<PathBuf>,
    load: &LoadOptions,
    request: &Request,
    iteration: usize,
    watch: &mut Watch,
) -> crate::Result<Generated> {
    let mut request = request.clone();
    request.embeddings.retain(|e| !embeddings.contains(&e.path));
    let mut prepared = request.prepare(model, load)?;
    embeddings.extend(request.embeddings.iter().map(|e| e.path.clone()));
    prepared.controls.push(Box::new(JobMonitor::new(watch.cancel.clone(), watch.latents.clone())));
    let mut noise = SeededNoise::new(request.seed);
    let report = &mut *watch.report;
    let mut on_progress = |p: Progress| {
        if let Progress::Step { done, total } = p {
            report(StepReport { iteration, step: done, steps: total });
        }
    };
    let generated = model.generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut on_progress)?;
    prepared.postprocess(generated)
}

/// Writes hires fix's second-pass input for image `i` of a first pass into `dir` (its latents
/// or its image, enlarged) and returns the file name.
#[allow(clippy::too_many_arguments)]
fn hires_input(
    model: &StableDiffusion,
    latents: &Tensor,
    i: usize,
    image: &image::RgbImage,
    hires: &super::jobs::HiresSpec,
    upscaler: Upscaler,
    dir: &Path,
    iteration: usize,
) -> crate::Result<String> {
    if upscaler.is_latent() {
        let f = model.vae_scale_factor();
        let one = latents.narrow(0, i, 1)?;
        let enlarged = upscale_latents(&one, hires.height / f, hires.width / f, upscaler)?;
        let name = format!("hires-{iteration}-{i}.safetensors");
        crate::io::latents::save_latents(&dir.join(&name), &enlarged)?;
        Ok(name)
    } else {
        let enlarged = upscale_image(image, hires.width as u32, hires.height as u32, upscaler);
        let name = format!("hires-{iteration}-{i}.png");
        crate::io::image::save_png(&dir.join(&name), &enlarged)?;
        Ok(name)
    }
}

/// Loads a model; `--model-config` and `--tokenizer` describe single-file checkpoints only (a
/// diffusers folder has its own).
fn load_model(path: &Path, load: &LoadOptions) -> anyhow::Result<StableDiffusion> {
    let files = if path.is_dir() {
        SourceOptions { model_config: None, tokenizer: None, ..load.files.clone() }
    } else {
        load.files.clone()
    };
    let options = LoadOptions { files, ..load.clone() };
    StableDiffusion::load(path, &options).map_err(|e| anyhow::anyhow!("loading model {}: {e}", path.display()))
}

/// Whether two paths name the same file.
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
