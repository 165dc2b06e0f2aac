//! Helpers shared by the parity tests: fixture paths and tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use diffctl::schedulers::NoiseSource;

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// All tensors of a fixture file.
pub fn load_fixture(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(repo_path(rel), &Device::Cpu).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Standard deviation of all elements.
pub fn std_all(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let var = (t - mean as f64).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    var.sqrt()
}

/// Asserts max |actual - expected| <= rel · max(1, std(expected)) and returns the error.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rel: f32) -> f32 {
    let err = max_abs_diff(actual, expected);
    let bound = rel * std_all(expected).max(1.0);
    eprintln!("{what}: max|diff| = {err:.3e} (bound {bound:.1e})");
    assert!(err <= bound, "{what}: max|diff| = {err} exceeds {bound}");
    err
}

/// Runs the `diffctl` binary with `args`.
pub fn diffctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffctl")).args(args).output().expect("run diffctl")
}

/// Runs a failing command and checks: non-zero exit, a single `error:` line naming `needle`,
/// and no output file.
pub fn expect_error(extra: &[&str], model: &Path, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--steps", "2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", png.to_str().unwrap()]);
    let out = diffctl(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(stderr.contains(needle), "stderr {stderr:?} should mention {needle:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one error line, got {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no output may be written");
}

/// One diffusers pipeline run recorded in tests/fixtures/cases.json.
#[derive(serde::Deserialize)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub scheduler: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub clip_skip: Option<usize>,
    pub file: String,
}

impl Case {
    /// The request that replays this case from its fixture's starting latents.
    pub fn request(&self, fixture: &HashMap<String, Tensor>) -> diffctl::pipeline::GenerateRequest {
        // `dpmpp-2m-karras` is a sampler and a schedule
        let choice = self.scheduler.as_deref().map(|s| diffctl::schedulers::SamplerChoice::parse(s).unwrap());
        diffctl::pipeline::GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: choice.map(|(kind, _)| kind),
            schedule: choice.and_then(|(_, schedule)| schedule),
            width: 0,
            height: 0,
            batch: 0,
            clip_skip: self.clip_skip.unwrap_or(0),
            init_latents: Some(fixture["init_latents"].clone()),
            init_image: None,
            prompt_2: None,
            negative_prompt_2: None,
            micro_conditioning: Default::default(),
            denoising_end: None,
            continue_from: None,
            concat_latents: None,
            deep_cache: None,
        }
    }
}

/// Every case of tests/fixtures/cases.json.
pub fn pipeline_cases() -> Vec<Case> {
    #[derive(serde::Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }
    let all: Cases = diffctl::io::read_json(&repo_path("tests/fixtures/cases.json")).unwrap();
    all.cases
}

/// Hands back the noise diffusers drew inside `scheduler.step`, in order.
pub struct ReplayNoise(pub Vec<Tensor>);

impl ReplayNoise {
    /// The draws recorded in a case fixture's `step_noise` tensor (none when absent).
    pub fn from_fixture(fixture: &HashMap<String, Tensor>) -> Self {
        Self(match fixture.get("step_noise") {
            Some(t) => (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect(),
            None => Vec::new(),
        })
    }
}

impl NoiseSource for ReplayNoise {
    fn sample(&mut self, shape: &[usize], _device: &Device) -> diffctl::Result<Tensor> {
        assert!(!self.0.is_empty(), "the scheduler drew more noise than diffusers did");
        let t = self.0.remove(0);
        assert_eq!(t.dims(), shape, "noise shape");
        Ok(t)
    }
}

/// Copies the folder `src` to `dst` recursively.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What [`replay_case`] measured.
pub struct Replayed {
    /// The generation's output.
    pub out: diffctl::pipeline::Generated,
    /// max |Δ| of the final latents.
    pub latent_err: f32,
    /// max |Δ| of the decoded image.
    pub image_err: f32,
    /// The steps the sampler reported it would run.
    pub steps: Option<usize>,
}

/// Runs `prepared` on `model` with the noise recorded in `fixture` (all of it must be used) and
/// checks the final latents (2e-3 · max(1, std)) and the image [B, H, W, 3] (2/255) against it.
pub fn replay_case(
    name: &str,
    model: &diffctl::pipeline::StableDiffusion,
    prepared: &mut diffctl::request::Prepared,
    fixture: &HashMap<String, Tensor>,
) -> Replayed {
    let mut noise = ReplayNoise::from_fixture(fixture);
    let mut steps = None;
    let out = model
        .generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut |p| {
            if let diffctl::pipeline::Progress::Sampling { steps: n } = p {
                steps = Some(n);
            }
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(noise.0.is_empty(), "{name}: {} recorded noise draws unused", noise.0.len());
    let latent_err = assert_close(&format!("{name} latents"), &out.latents, &fixture["latents"], 2e-3);
    let image_err = max_abs_diff(&out.images.permute((0, 2, 3, 1)).unwrap(), &fixture["image"]);
    assert!(image_err <= 2.0 / 255.0, "{name}: image max|diff| {image_err}");
    Replayed { out, latent_err, image_err, steps }
}
