//! Jobs as the server stores them: what to generate (its input images as files in the job's
//! folder) or which model to load, and how each ended. A stored job becomes the library's
//! [`Request`] only when it runs, so a restarted server replays it exactly.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::control::cross_attention::IpScale;
use crate::control::residual::controlnet::ControlNetSettings;
use crate::limits::Limits;
use crate::prompt::PromptSyntax;
use crate::request::{ControlNetSpec, EmbeddingSpec, InitImageSpec, LoraSpec, Request, T2IAdapterSpec};
use crate::schedulers::{SamplerChoice, SigmaSchedule};

/// A job's id: unique across restarts (time and a counter).
pub type JobId = String;

/// What a job does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobSpec {
    /// Generate images.
    Generate(Box<GenerationSpec>),
    /// Make the model with this title the resident one.
    LoadModel {
        /// The model's title (as `sd-models` lists it).
        title: String,
    },
}

/// One generation as the APIs describe it: A1111's settings with every file resolved to a path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationSpec {
    /// The prompt the model reads (LoRA tags removed).
    pub prompt: String,
    /// The prompt as the client wrote it (for the infotext).
    pub written_prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// How prompts are read: `a1111` or `diffusers`.
    pub prompt_syntax: String,
    /// The sampler as the client named it (A1111's name, reported back).
    pub sampler_name: String,
    /// The sigma schedule's name (`None`: the sampler's own or its name's suffix).
    pub schedule: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Images per generation.
    pub batch_size: usize,
    /// Generations, one after the other, each with the seed advanced by `batch_size`.
    pub n_iter: usize,
    /// The first generation's seed.
    pub seed: u64,
    /// Text-encoder layers skipped from the end.
    pub clip_skip: usize,
    /// img2img and inpainting.
    pub init: Option<InitSpec>,
    /// LoRA files and multipliers.
    pub loras: Vec<(PathBuf, f64)>,
    /// Embedding files whose names the prompts use (each file's name is its token, as in A1111).
    pub embeddings: Vec<PathBuf>,
    /// ControlNet, T2I-Adapter and IP-Adapter units.
    pub units: Vec<ControlUnit>,
    /// The model title to run on (`None`: the resident one).
    pub checkpoint: Option<String>,
    /// Switch back to the previous model afterwards (A1111's `override_settings_restore_afterwards`).
    pub restore_checkpoint: bool,
    /// Hires fix: a second, img2img pass on the enlarged result.
    pub hires: Option<HiresSpec>,
}

/// Hires fix's second pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HiresSpec {
    /// The upscaler's A1111 name.
    pub upscaler: String,
    /// The final width.
    pub width: usize,
    /// The final height.
    pub height: usize,
    /// The second pass's steps.
    pub steps: usize,
    /// The second pass's denoising strength.
    pub strength: f64,
}

/// The image an img2img job starts from, in the job's folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitSpec {
    /// The init image's file name.
    pub image: String,
    /// The mask's file name (white repaints).
    pub mask: Option<String>,
    /// Mask blur in pixels.
    pub mask_blur: Option<f64>,
    /// Inpaint only the masked area with this padding.
    pub only_masked_padding: Option<usize>,
    /// Denoising strength.
    pub strength: f64,
    /// Paste the original back outside the mask (A1111 does, whole picture or only masked).
    pub keep_unmasked: bool,
}

impl InitSpec {
    /// img2img from the job's `init.png` at `strength`, without a mask yet (a mask pastes the
    /// original back outside it, as A1111 does).
    pub fn new(strength: f64) -> Self {
        Self {
            image: "init.png".into(),
            mask: None,
            mask_blur: None,
            only_masked_padding: None,
            keep_unmasked: true,
            strength,
        }
    }
}

/// A control unit (sd-webui-controlnet's), its image in the job's folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlUnit {
    /// Which mechanism the model file is.
    pub kind: UnitKind,
    /// The model file or folder.
    pub model: PathBuf,
    /// The (preprocessed) control image's file name.
    pub image: String,
    /// Its weight.
    pub weight: f64,
    /// Fraction of the steps where it starts acting.
    pub guidance_start: f64,
    /// Fraction of the steps where it stops acting.
    pub guidance_end: f64,
    /// A ControlNet's control mode (the library's name: balanced, prompt, controlnet).
    pub mode: String,
}

/// The mechanism behind a control unit's model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum UnitKind {
    /// A ControlNet (residuals into the UNet's skips).
    ControlNet,
    /// A T2I-Adapter.
    T2IAdapter,
    /// An IP-Adapter with the CLIP image encoder it needs.
    IpAdapter {
        /// The image-encoder folder.
        image_encoder: PathBuf,
    },
}

/// How a job ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Being run.
    Running,
    /// Finished with its images.
    Done,
    /// Failed with an error.
    Failed,
    /// Interrupted or abandoned by its client.
    Cancelled,
}

impl JobState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state a stored name means.
    pub fn parse(name: &str) -> Option<Self> {
        [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed, JobState::Cancelled]
            .into_iter()
            .find(|s| s.as_str() == name)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// What a finished job produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Finished {
    /// The images' file names in the job's folder.
    pub images: Vec<String>,
    /// Each image's seed.
    pub seeds: Vec<u64>,
    /// Each image's A1111 infotext.
    pub infotexts: Vec<String>,
    /// Why the job failed (`None` when it did not).
    pub error: Option<String>,
    /// Whether the error was the request's fault (a 4xx) rather than the server's.
    pub client_error: bool,
}

/// The folder of job `id` under the state directory.
pub fn job_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("jobs").join(id)
}

impl GenerationSpec {
    /// The library request for generation `iteration` (of `n_iter`), input files in `dir`.
    pub fn request(&self, dir: &Path, iteration: usize, limits: Limits) -> Result<Request> {
        let (scheduler, suffix) = SamplerChoice::parse(&self.sampler_name)?;
        let schedule = self.schedule.as_deref().map(str::parse::<SigmaSchedule>).transpose()?;
        let mut request = Request {
            prompt: self.prompt.clone(),
            negative_prompt: Some(self.negative_prompt.clone()),
            prompt_syntax: self.prompt_syntax.parse::<PromptSyntax>()?,
            steps: self.steps,
            guidance: self.cfg_scale,
            scheduler: Some(scheduler),
            schedule: schedule.or(suffix),
            width: Some(self.width),
            height: Some(self.height),
            batch: self.batch_size,
            seed: self.seed_of(iteration),
            clip_skip: self.clip_skip,
            init_image: self.init.as_ref().map(|init| InitImageSpec {
                image: dir.join(&init.image),
                mask: init.mask.as_ref().map(|m| dir.join(m)),
                mask_blur: init.mask_blur,
                only_masked_padding: init.only_masked_padding,
                strength: Some(init.strength),
                keep_unmasked: init.keep_unmasked,
            }),
            loras: self.loras.iter().map(|(path, scale)| LoraSpec { path: path.clone(), scale: *scale }).collect(),
            embeddings: self
                .embeddings
                .iter()
                .map(|path| EmbeddingSpec {
                    path: path.clone(),
                    token: path.file_stem().map(|s| s.to_string_lossy().into_owned()),
                })
                .collect(),
            limits,
            ..Request::default()
        };
        for unit in &self.units {
            let image = dir.join(&unit.image);
            match &unit.kind {
                UnitKind::ControlNet => request.controlnets.push(ControlNetSpec {
                    path: unit.model.clone(),
                    image,
                    preprocess: None,
                    settings: ControlNetSettings {
                        scale: unit.weight,
                        start: unit.guidance_start,
                        end: unit.guidance_end,
                        mode: unit.mode.parse()?,
                    },
                }),
                // A T2I-Adapter acts from the start; its guidance end is the fraction it acts for.
                UnitKind::T2IAdapter => request.t2i_adapters.push(T2IAdapterSpec {
                    path: unit.model.clone(),
                    image,
                    preprocess: None,
                    scale: unit.weight,
                    factor: unit.guidance_end,
                }),
                UnitKind::IpAdapter { image_encoder } => {
                    let ip = &mut request.ip_adapters;
                    ip.adapters.push(unit.model.clone());
                    ip.image_encoders.push(image_encoder.clone());
                    ip.images.push(vec![image]);
                    ip.scales.push(IpScale::Uniform(unit.weight));
                }
            }
        }
        Ok(request)
    }

    /// The library request of hires fix's second pass for one image: img2img from `input` (in
    /// `dir`: the enlarged image or latents) at the hires size, with `seed`.
    pub fn hires_request(&self, dir: &Path, input: &str, seed: u64, limits: Limits) -> Result<Request> {
        let hires = self.hires.as_ref().ok_or_else(|| crate::Error::invalid("no hires fix was asked for"))?;
        let first = self.request(dir, 0, limits)?;
        Ok(Request {
            steps: hires.steps,
            width: Some(hires.width),
            height: Some(hires.height),
            batch: 1,
            seed,
            init_image: Some(InitImageSpec {
                image: dir.join(input),
                mask: None,
                mask_blur: None,
                only_masked_padding: None,
                strength: Some(hires.strength),
                keep_unmasked: false,
            }),
            ..first
        })
    }

    /// The seed of generation `iteration`: A1111 advances it by the batch size.
    pub fn seed_of(&self, iteration: usize) -> u64 {
        self.seed.wrapping_add((iteration * self.batch_size) as u64)
    }

    /// The A1111 infotext of the image with `seed` run on `model`.
    pub fn infotext(&self, seed: u64, model: &str) -> String {
        let mut text = self.written_prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        let mut fields = vec![format!("Steps: {}", self.steps), format!("Sampler: {}", self.sampler_name)];
        let suffix = SamplerChoice::parse(&self.sampler_name).ok().and_then(|(_, s)| s);
        if let Some(schedule) = self.schedule.as_deref().and_then(|s| s.parse().ok()).or(suffix) {
            fields.push(format!("Schedule type: {}", schedule_label(schedule)));
        }
        fields.push(format!("CFG scale: {}", self.cfg_scale));
        fields.push(format!("Seed: {seed}"));
        fields.push(format!("Size: {}x{}", self.width, self.height));
        fields.push(format!("Model: {model}"));
        if let Some(hires) = &self.hires {
            fields.push(format!("Denoising strength: {}", hires.strength));
            fields.push(format!("Hires resize: {}x{}", hires.width, hires.height));
            fields.push(format!("Hires steps: {}", hires.steps));
            fields.push(format!("Hires upscaler: {}", hires.upscaler));
        }
        if let Some(init) = &self.init {
            fields.push(format!("Denoising strength: {}", init.strength));
            if let Some(blur) = init.mask_blur {
                fields.push(format!("Mask blur: {blur}"));
            }
        }
        if self.clip_skip > 0 {
            fields.push(format!("Clip skip: {}", self.clip_skip + 1));
        }
        for unit in &self.units {
            let name = unit.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            fields.push(format!(
                "ControlNet: \"Model: {name}, Weight: {}, Guidance Start: {}, Guidance End: {}\"",
                unit.weight, unit.guidance_start, unit.guidance_end
            ));
        }
        fields.push(format!("Version: diffctl {}", env!("CARGO_PKG_VERSION")));
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }
}

/// A1111's label of a sigma schedule ("Karras", "SGM Uniform", ...).
pub fn schedule_label(schedule: SigmaSchedule) -> &'static str {
    match schedule {
        SigmaSchedule::Normal => "Uniform",
        SigmaSchedule::Karras => "Karras",
        SigmaSchedule::Exponential => "Exponential",
        SigmaSchedule::SgmUniform => "SGM Uniform",
        SigmaSchedule::Simple => "Simple",
        SigmaSchedule::Beta => "Beta",
        SigmaSchedule::AlignYourSteps(_) => "Align Your Steps",
    }
}
