//! Replays the cases of tests/fixtures/lora_cases.json (written by tools/fixtures/make_lora_fixtures.py):
//! LoRA, textual-inversion and A1111-syntax runs of the sd1-tiny pipeline from saved noise.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use diffctl::control::weights::{Lora, LoraMode};
use diffctl::pipeline::{GenerateRequest, Generated, LoadOptions, StableDiffusion};
use diffctl::schedulers::NoiseSource;

use crate::common::{assert_close, load_fixture, max_abs_diff, repo_path};

/// The tiny SD1 model every case runs on.
pub const SD1: &str = "tests/fixtures/models/sd1-tiny";

/// One recorded run.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// [file, multiplier]
    pub loras: Vec<(String, f64)>,
    /// [file, token]
    pub embeddings: Vec<(String, Option<String>)>,
    pub prompt_syntax: String,
    pub clip_skip: usize,
    pub steps: usize,
    pub guidance: f64,
    pub file: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

/// The case called `name`.
pub fn case(name: &str) -> Case {
    let cases: Cases = diffctl::io::read_json(&repo_path("tests/fixtures/lora_cases.json")).unwrap();
    cases.cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// The sd1-tiny model, freshly loaded.
pub fn load_model() -> StableDiffusion {
    StableDiffusion::load(&repo_path(SD1), &LoadOptions::default()).unwrap()
}

/// The cases run the model's own PNDM scheduler, which draws no noise.
struct NoNoise;

impl NoiseSource for NoNoise {
    fn sample(&mut self, shape: &[usize], _device: &Device) -> diffctl::Result<Tensor> {
        panic!("unexpected noise draw of shape {shape:?}")
    }
}

/// Attaches the case's LoRAs (named by file) in `mode`, loads its embeddings and sets its syntax.
pub fn prepare(model: &mut StableDiffusion, case: &Case, mode: LoraMode) {
    for (file, scale) in &case.loras {
        let lora = Lora::load(&repo_path(file), &model.layers, &Device::Cpu).unwrap();
        assert!(lora.unmatched.is_empty(), "{file}: unmatched {:?}", lora.unmatched);
        model.attach_lora(file, &lora, *scale, mode).unwrap();
    }
    for (file, token) in &case.embeddings {
        model.load_textual_inversion(&repo_path(file), token.as_deref()).unwrap();
    }
    model.prompt_syntax = case.prompt_syntax.parse().unwrap();
}

/// Runs `case` on `model` as it stands, from the case's starting noise.
pub fn generate(model: &StableDiffusion, case: &Case) -> Generated {
    let fixture = load_fixture(&case.file);
    let request = GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: Some(case.negative_prompt.clone()),
        steps: case.steps,
        guidance: case.guidance,
        scheduler: None,
        schedule: None,
        width: 0,
        height: 0,
        batch: 0,
        clip_skip: case.clip_skip,
        init_latents: Some(fixture["init_latents"].clone()),
        init_image: None,
        prompt_2: None,
        negative_prompt_2: None,
        micro_conditioning: Default::default(),
        denoising_end: None,
        continue_from: None,
        concat_latents: None,
        deep_cache: None,
    };
    model.generate(&request, &mut [], &mut NoNoise, &mut |_| {}).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// Compares a run with the recorded latents (2e-3 · max(1, std)) and image (2/255); returns both errors.
pub fn check(case: &Case, what: &str, out: &Generated) -> (f32, f32) {
    let fixture = load_fixture(&case.file);
    let latent_err = assert_close(&format!("{} {what} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
    let image = out.images.permute((0, 2, 3, 1)).unwrap();
    let image_err = max_abs_diff(&image, &fixture["image"]);
    eprintln!("{} {what} image: max|diff| = {image_err:.3e}", case.name);
    assert!(image_err <= 2.0 / 255.0, "{} {what}: image max|diff| {image_err}", case.name);
    (latent_err, image_err)
}

/// Runs `diffctl generate` for `case` with `extra` flags, writing the latents to `dir`; returns the
/// process output and the latents file.
pub fn run_cli(case: &Case, dir: &Path, extra: &[&str]) -> (std::process::Output, std::path::PathBuf) {
    let fixture = load_fixture(&case.file);
    let init = dir.join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fixture["init_latents"].clone())]),
        &init,
    )
    .unwrap();
    let (png, latents) = (dir.join("out.png"), dir.join("out.safetensors"));
    let (steps, guidance, clip_skip) = (case.steps.to_string(), case.guidance.to_string(), case.clip_skip.to_string());
    let model = repo_path(SD1);
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        &case.negative_prompt,
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--clip-skip",
        &clip_skip,
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_diffctl")).args(&args).output().expect("run diffctl");
    (out, latents)
}

/// Asserts a CLI run failed with one error line containing `needle` and wrote no output.
pub fn assert_cli_error(out: &std::process::Output, dir: &Path, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "stderr: {stderr}");
    assert!(error_lines[0].contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!dir.join("out.png").exists() && !dir.join("out.safetensors").exists(), "output written on failure");
}
