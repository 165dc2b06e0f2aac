//! Noise schedulers, one file per family, behind one trait; formulas and config handling follow
//! diffusers' scheduler classes.
//!
//! INTERFACE (fixed; implementations live in sibling files):
//! - [`SchedulerConfig`]: the fields of a diffusers `scheduler_config.json` that change the math,
//!   each `Option` so that a field missing from the file takes the chosen class's own default,
//!   exactly as diffusers' `from_config` does.
//! - [`SchedulerKind`]: the samplers by CLI name (`ddim`, `euler`, `euler-a`, `heun`, `dpm2`,
//!   `dpm2-a`, `lms`, `dpmpp-2m`, `dpmpp-2m-sde`, `dpmpp-3m-sde`, `dpmpp-2s-a`, `dpmpp-sde`, `unipc`,
//!   `deis`, `pndm`, `lcm`, `tcd`, `ddpm`) and the mapping from a config's `_class_name`.
//! - [`SigmaSchedule`]: the noise-level schedule as a separate axis (Karras, exponential, beta,
//!   sgm_uniform, simple, align-your-steps), applied through the class's own config flags or as
//!   given timesteps, as diffusers does.
//! - [`SamplerChoice::parse`]: our names and A1111's sampler names (`DPM++ 2M Karras`) into a
//!   sampler and an optional schedule.
//! - [`Scheduler`]: the per-run object the sampling loop drives.
//! - [`NoiseSource`]: where ancestral samplers get fresh noise (seeded RNG in the CLI, replayed noise
//!   in parity tests).

use candle_core::Tensor;

use crate::Result;

/// A source of standard-normal noise for schedulers that inject noise during sampling.
pub trait NoiseSource {
    /// A tensor of standard-normal samples with `shape`, f32, on `device`.
    fn sample(&mut self, shape: &[usize], device: &candle_core::Device) -> Result<Tensor>;
}

/// A noise scheduler configured for one run of `num_inference_steps`.
pub trait Scheduler {
    /// The model timesteps visited, in order (floats: some schedulers interpolate).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation that initial standard-normal latents are scaled by (1 for the
    /// schedulers that work in sample space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the denoising model input at step `step_index` (the identity unless the scheduler
    /// works in sigma space).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// diffusers' `scheduler.order`: how many entries of [`Scheduler::timesteps`] one denoising
    /// step spans (2 for Heun and DPM2, whose timesteps repeat for their second model call);
    /// img2img skips whole steps, `order` entries at a time.
    fn order(&self) -> usize {
        1
    }
    /// Forward noising to the noise level of step `step_index` (diffusers' `scheduler.add_noise` at
    /// that step's timestep): `original` and `noise` [B, C, h, w], in the scheduler's own space
    /// (`sqrt(ᾱ)·x + sqrt(1 − ᾱ)·ε`, or `x + σ·ε` for the schedulers that work in sigma space).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// One denoising step from `sample` given `model_output` at step `step_index`; returns the
    /// previous (less noisy) sample. `noise` is used only by stochastic schedulers.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

pub(crate) mod betas;
mod ddim;
mod ddpm;
mod deis;
mod dpm_solver;
mod dpmpp_2s_ancestral;
mod dpmpp_sde;
mod euler;
mod euler_ancestral;
mod heun;
mod kdpm2;
mod kdpm2_ancestral;
mod lcm;
mod lms;
mod names;
mod pndm;
mod schedule;
mod sigmas;
mod tcd;
mod unipc;
mod x0_limit;

pub use names::SamplerChoice;
pub use schedule::{AysModel, SigmaSchedule};

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::Error;

/// The samplers, by their CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `ddim`: DDIMScheduler (deterministic, eta = 0).
    Ddim,
    /// `euler`: EulerDiscreteScheduler.
    Euler,
    /// `euler-a`: EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// `heun`: HeunDiscreteScheduler (second order, two model calls per step).
    Heun,
    /// `dpm2`: KDPM2DiscreteScheduler (second order, two model calls per step).
    Dpm2,
    /// `dpm2-a`: KDPM2AncestralDiscreteScheduler (stochastic, two model calls per step).
    Dpm2Ancestral,
    /// `lms`: LMSDiscreteScheduler (linear multistep, order 4).
    Lms,
    /// `dpmpp-2m`: DPMSolverMultistepScheduler with the config's own settings.
    DpmPp2m,
    /// `dpmpp-2m-sde`: DPMSolverMultistepScheduler with `algorithm_type` sde-dpmsolver++, order 2.
    DpmPp2mSde,
    /// `dpmpp-3m-sde`: DPMSolverMultistepScheduler with `algorithm_type` sde-dpmsolver++, order 3.
    DpmPp3mSde,
    /// `dpmpp-2s-a`: k-diffusion's `sample_dpmpp_2s_ancestral` (no diffusers class) on
    /// EulerDiscreteScheduler's sigmas; two model calls per step but the last.
    DpmPp2sAncestral,
    /// `dpmpp-sde`: DPMSolverSDEScheduler (stochastic, two model calls per step; its noise comes from
    /// the [`NoiseSource`], not torchsde's Brownian tree).
    DpmPpSde,
    /// `unipc`: UniPCMultistepScheduler (bh2 unless the config says otherwise).
    UniPc,
    /// `deis`: DEISMultistepScheduler.
    Deis,
    /// `pndm`: PNDMScheduler.
    Pndm,
    /// `lcm`: LCMScheduler.
    Lcm,
    /// `tcd`: TCDScheduler (eta = 0.3, diffusers' default).
    Tcd,
    /// `ddpm`: DDPMScheduler.
    Ddpm,
}

impl SchedulerKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [SchedulerKind; 18] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Heun,
        SchedulerKind::Dpm2,
        SchedulerKind::Dpm2Ancestral,
        SchedulerKind::Lms,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mSde,
        SchedulerKind::DpmPp3mSde,
        SchedulerKind::DpmPp2sAncestral,
        SchedulerKind::DpmPpSde,
        SchedulerKind::UniPc,
        SchedulerKind::Deis,
        SchedulerKind::Pndm,
        SchedulerKind::Lcm,
        SchedulerKind::Tcd,
        SchedulerKind::Ddpm,
    ];

    /// The CLI name (`ddim`, `euler-a`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Dpm2 => "dpm2",
            SchedulerKind::Dpm2Ancestral => "dpm2-a",
            SchedulerKind::Lms => "lms",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mSde => "dpmpp-2m-sde",
            SchedulerKind::DpmPp3mSde => "dpmpp-3m-sde",
            SchedulerKind::DpmPp2sAncestral => "dpmpp-2s-a",
            SchedulerKind::DpmPpSde => "dpmpp-sde",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Deis => "deis",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Tcd => "tcd",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    /// The diffusers class this kind reproduces (for `dpmpp-2s-a`, which has none, the class whose
    /// sigmas it samples on).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler | SchedulerKind::DpmPp2sAncestral => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Dpm2 => "KDPM2DiscreteScheduler",
            SchedulerKind::Dpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mSde | SchedulerKind::DpmPp3mSde => {
                "DPMSolverMultistepScheduler"
            }
            SchedulerKind::DpmPpSde => "DPMSolverSDEScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Deis => "DEISMultistepScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Tcd => "TCDScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
        }
    }

    /// The kind for a diffusers `_class_name` (a `DPMSolverMultistepScheduler` config keeps its own
    /// algorithm, order and sigma flags under `dpmpp-2m`).
    pub fn from_class_name(class_name: &str) -> Result<Self> {
        Ok(match class_name {
            "DDIMScheduler" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "HeunDiscreteScheduler" => SchedulerKind::Heun,
            "KDPM2DiscreteScheduler" => SchedulerKind::Dpm2,
            "KDPM2AncestralDiscreteScheduler" => SchedulerKind::Dpm2Ancestral,
            "LMSDiscreteScheduler" => SchedulerKind::Lms,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            "DPMSolverSDEScheduler" => SchedulerKind::DpmPpSde,
            "UniPCMultistepScheduler" => SchedulerKind::UniPc,
            "DEISMultistepScheduler" => SchedulerKind::Deis,
            "PNDMScheduler" => SchedulerKind::Pndm,
            "LCMScheduler" => SchedulerKind::Lcm,
            "TCDScheduler" => SchedulerKind::Tcd,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            other => {
                let mut classes: Vec<&str> = Self::ALL
                    .iter()
                    .filter(|k| **k != SchedulerKind::DpmPp2sAncestral)
                    .map(|k| k.class_name())
                    .collect();
                classes.dedup();
                return Err(Error::invalid(format!(
                    "unsupported scheduler class `{other}`; supported classes: {} (or pick a scheduler by \
                     name: {})",
                    classes.join(", "),
                    Self::names()
                )));
            }
        })
    }

    pub(crate) fn names() -> String {
        Self::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// A sampler name alone (ours or A1111's); a name with a schedule suffix such as
    /// `DPM++ 2M Karras` is an error here: parse it with [`SamplerChoice::parse`].
    fn from_str(s: &str) -> Result<Self> {
        match SamplerChoice::parse(s)? {
            (kind, None) => Ok(kind),
            (_, Some(schedule)) => Err(Error::invalid(format!(
                "`{s}` names a sampler and the `{schedule}` schedule; give the sampler alone here"
            ))),
        }
    }
}

/// The fields of a diffusers `scheduler_config.json` that change the math.
///
/// Every field is optional: a missing field (or JSON `null`) takes the default of the class that
/// [`build`] instantiates, as diffusers' `from_config` does for a config loaded from disk. Fields a
/// class does not know are ignored by that class, again as in diffusers (e.g. `clip_sample` for
/// Euler, `rescale_betas_zero_snr` for PNDM). Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class the file was written for.
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample` (where the class supports it).
    pub prediction_type: Option<String>,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub skip_prk_steps: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    /// Dynamic thresholding of the x₀ estimate (DDIM and DDPM; an error for the other classes
    /// that would apply it).
    pub thresholding: Option<bool>,
    /// The quantile of |x₀| dynamic thresholding clamps at.
    pub dynamic_thresholding_ratio: Option<f64>,
    /// The largest threshold dynamic thresholding uses.
    pub sample_max_value: Option<f64>,
    pub use_karras_sigmas: Option<bool>,
    /// Exponential and beta sigma schedules (the classes that have `use_karras_sigmas`).
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// Unsupported sigma schedules: an error when true for a class that would apply them.
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// Converted-schedule bounds (Euler, DPM-Solver, UniPC, as diffusers does).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler: `linear` or `log_linear`.
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` (`continuous` with v-prediction is unsupported).
    pub timestep_type: Option<String>,
    /// Euler, DPM-Solver: `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: `dpmsolver++`, `sde-dpmsolver++`, `dpmsolver`, `sde-dpmsolver`.
    pub algorithm_type: Option<String>,
    /// DPM-Solver: `midpoint` or `heun`; UniPC: `bh1` or `bh2`.
    pub solver_type: Option<String>,
    pub solver_order: Option<usize>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    /// UniPC: `false` predicts noise instead of x0.
    pub predict_x0: Option<bool>,
    /// UniPC: the steps whose corrector is skipped.
    pub disable_corrector: Option<Vec<usize>>,
    /// DDPM: `fixed_small`, `fixed_small_log`, `fixed_large` (DPM-Solver: learned variances are
    /// unsupported).
    pub variance_type: Option<String>,
    /// LCM.
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    /// The file this config was read from (for error messages); not a config field.
    pub source: Option<PathBuf>,
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value: Value = crate::io::read_json(path)?;
        Self::from_value(&value, Some(path))
    }

    /// Parses a config from a JSON string (errors name the offending field).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = crate::io::parse_json(text)
            .map_err(|e| Error::invalid(format!("scheduler config is not valid JSON: {e}")))?;
        Self::from_value(&value, None)
    }

    /// Parses a config from a JSON value; `source` is used in error messages.
    pub fn from_value(value: &Value, source: Option<&Path>) -> Result<Self> {
        let fail = |msg: String| match source {
            Some(p) => Error::config(p, msg),
            None => Error::invalid(format!("scheduler config: {msg}")),
        };
        let map = value.as_object().ok_or_else(|| fail(format!("expected a JSON object, found {}", short(value))))?;
        let r = Reader { map, fail: &fail };
        Ok(SchedulerConfig {
            class_name: r.get("_class_name")?,
            num_train_timesteps: r.get("num_train_timesteps")?,
            beta_start: r.get("beta_start")?,
            beta_end: r.get("beta_end")?,
            beta_schedule: r.get("beta_schedule")?,
            trained_betas: r.get("trained_betas")?,
            prediction_type: r.get("prediction_type")?,
            timestep_spacing: r.get("timestep_spacing")?,
            steps_offset: r.get("steps_offset")?,
            set_alpha_to_one: r.get("set_alpha_to_one")?,
            clip_sample: r.get("clip_sample")?,
            clip_sample_range: r.get("clip_sample_range")?,
            skip_prk_steps: r.get("skip_prk_steps")?,
            rescale_betas_zero_snr: r.get("rescale_betas_zero_snr")?,
            thresholding: r.get("thresholding")?,
            dynamic_thresholding_ratio: r.get("dynamic_thresholding_ratio")?,
            sample_max_value: r.get("sample_max_value")?,
            use_karras_sigmas: r.get("use_karras_sigmas")?,
            use_exponential_sigmas: r.get("use_exponential_sigmas")?,
            use_beta_sigmas: r.get("use_beta_sigmas")?,
            use_lu_lambdas: r.get("use_lu_lambdas")?,
            use_flow_sigmas: r.get("use_flow_sigmas")?,
            sigma_min: r.get("sigma_min")?,
            sigma_max: r.get("sigma_max")?,
            interpolation_type: r.get("interpolation_type")?,
            timestep_type: r.get("timestep_type")?,
            final_sigmas_type: r.get("final_sigmas_type")?,
            algorithm_type: r.get("algorithm_type")?,
            solver_type: r.get("solver_type")?,
            solver_order: r.get("solver_order")?,
            lower_order_final: r.get("lower_order_final")?,
            euler_at_final: r.get("euler_at_final")?,
            lambda_min_clipped: r.get("lambda_min_clipped")?,
            predict_x0: r.get("predict_x0")?,
            disable_corrector: r.get("disable_corrector")?,
            variance_type: r.get("variance_type")?,
            original_inference_steps: r.get("original_inference_steps")?,
            timestep_scaling: r.get("timestep_scaling")?,
            source: source.map(Path::to_path_buf),
        })
    }

    /// The kind named by `_class_name` (its sigma flags, such as `use_karras_sigmas`, stay in the
    /// config and apply when no schedule is chosen).
    pub fn kind(&self) -> Result<SchedulerKind> {
        let name =
            self.class_name.as_deref().ok_or_else(|| self.error("has no `_class_name`; choose a scheduler by name"))?;
        SchedulerKind::from_class_name(name).map_err(|e| self.error(e.to_string()))
    }

    /// An error about this config: [`Error::Config`] naming the file when it came from one.
    pub(crate) fn error(&self, msg: impl Into<String>) -> Error {
        match &self.source {
            Some(p) => Error::config(p, msg),
            None => Error::invalid(format!("scheduler config: {}", msg.into())),
        }
    }

    /// An error for a field whose value we do not support.
    pub(crate) fn bad_value(&self, field: &str, value: impl fmt::Display, valid: &str) -> Error {
        self.error(format!("`{field}` = {value} is not supported ({valid})"))
    }
}

impl<'de> serde::Deserialize<'de> for SchedulerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        SchedulerConfig::from_value(&value, None).map_err(serde::de::Error::custom)
    }
}

struct Reader<'a, F: Fn(String) -> Error> {
    map: &'a Map<String, Value>,
    fail: &'a F,
}

impl<F: Fn(String) -> Error> Reader<'_, F> {
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| (self.fail)(format!("field `{key}` = {}: {e}", short(v)))),
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 { format!("{}...", s.chars().take(60).collect::<String>()) } else { s }
}

/// Builds the scheduler `kind` from `config` for a run of `num_inference_steps` steps, with the
/// sigma schedule `schedule` (`None`: the config's own; see [`SigmaSchedule`] for what applies
/// to which sampler).
pub fn build(
    kind: SchedulerKind,
    schedule: Option<SigmaSchedule>,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("the number of inference steps must be at least 1"));
    }
    let train = config.num_train_timesteps.unwrap_or(1000);
    if num_inference_steps > train {
        return Err(Error::invalid(format!(
            "{num_inference_steps} inference steps is more than the scheduler's \
             {train} training timesteps"
        )));
    }
    let mut cfg = config.clone();
    match kind {
        SchedulerKind::DpmPp2mSde => {
            cfg.algorithm_type = Some("sde-dpmsolver++".into());
            cfg.solver_order = Some(2);
        }
        SchedulerKind::DpmPp3mSde => {
            cfg.algorithm_type = Some("sde-dpmsolver++".into());
            cfg.solver_order = Some(3);
        }
        _ => {}
    }
    let custom = match schedule {
        Some(schedule) => schedule.apply(kind, &mut cfg, num_inference_steps)?,
        None => None,
    };
    let custom = custom.as_deref();
    let n = num_inference_steps;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&cfg, n)?),
        SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(&cfg, n)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&cfg, n)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&cfg, n, custom)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(&cfg, n)?),
        SchedulerKind::Heun => Box::new(heun::Heun::new(&cfg, n, custom)?),
        SchedulerKind::Dpm2 => Box::new(kdpm2::Kdpm2::new(&cfg, n)?),
        SchedulerKind::Dpm2Ancestral => Box::new(kdpm2_ancestral::Kdpm2Ancestral::new(&cfg, n)?),
        SchedulerKind::Lms => Box::new(lms::Lms::new(&cfg, n)?),
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mSde | SchedulerKind::DpmPp3mSde => {
            Box::new(dpm_solver::DpmSolver::new(&cfg, n, custom)?)
        }
        SchedulerKind::DpmPp2sAncestral => Box::new(dpmpp_2s_ancestral::DpmPp2sAncestral::new(&cfg, n, custom)?),
        SchedulerKind::DpmPpSde => Box::new(dpmpp_sde::DpmPpSde::new(&cfg, n)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(&cfg, n)?),
        SchedulerKind::Deis => Box::new(deis::Deis::new(&cfg, n)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(&cfg, n)?),
        SchedulerKind::Tcd => Box::new(tcd::Tcd::new(&cfg, n)?),
    })
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

impl SchedulerConfig {
    /// The prediction type, checked against what the class supports.
    pub(crate) fn prediction(&self, class: &str, allowed: &[Prediction]) -> Result<Prediction> {
        let name = self.prediction_type.as_deref().unwrap_or("epsilon");
        let p = match name {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::Velocity),
            "sample" => Some(Prediction::Sample),
            // EulerDiscreteScheduler also accepts this older spelling
            "original_sample" if class == "EulerDiscreteScheduler" => Some(Prediction::Sample),
            _ => None,
        };
        match p {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => Err(self.bad_value("prediction_type", format!("`{name}`"), &valid_list(class, allowed))),
        }
    }

    /// Errors when dynamic thresholding is requested (for classes that would apply it).
    pub(crate) fn reject_thresholding(&self, class: &str) -> Result<()> {
        if self.thresholding == Some(true) {
            return Err(
                self.error(format!("`thresholding` = true (dynamic thresholding) is not supported for {class}"))
            );
        }
        Ok(())
    }
}

fn valid_list(class: &str, allowed: &[Prediction]) -> String {
    let names: Vec<&str> = allowed
        .iter()
        .map(|p| match p {
            Prediction::Epsilon => "epsilon",
            Prediction::Velocity => "v_prediction",
            Prediction::Sample => "sample",
        })
        .collect();
    format!("{class} supports {}", names.join(", "))
}

// --- small tensor helpers shared by the schedulers: f32 tensors, f32 scalar coefficients (as
// diffusers' 0-dim float32 tensors), true division like torch.

/// `x * c` elementwise in f32.
pub(crate) fn mul(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// `x / c` elementwise in f32 (a true division, not a multiplication by the reciprocal).
pub(crate) fn div(x: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

/// `a * x + b * y` evaluated as torch does `a * x + b * y` (two products, one sum) in f32.
pub(crate) fn lin2(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    Ok((mul(x, a)? + mul(y, b)?)?)
}

/// Forward noising in sigma space, `x + σ·ε` (the k-diffusion-style schedulers' `add_noise`).
pub(crate) fn add_noise_at_sigma(x: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok((x + mul(noise, sigma)?)?)
}

/// The model input at noise level `sigma` in sigma space, `x / √(σ² + 1)` (their
/// `scale_model_input`).
pub(crate) fn scale_at_sigma(x: &Tensor, sigma: f32) -> Result<Tensor> {
    div(x, (sigma * sigma + 1.0).sqrt())
}

/// `sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε` at integer timestep `t` (the DDPM-family `add_noise`, f32 as
/// diffusers computes it).
pub(crate) fn add_noise_at(train: &betas::Train, t: i64, x: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let a = usize::try_from(t).ok().and_then(|t| train.alphas_cumprod.get(t)).copied().ok_or_else(|| {
        crate::Error::invalid(format!("timestep {t} is outside the {} training timesteps", train.num_train_timesteps))
    })?;
    lin2(a.sqrt(), x, (1.0 - a).sqrt(), noise)
}
