//! End-to-end parity with diffusers' StableDiffusionPipeline on the tiny fixture models: every
//! scheduler, batch, no guidance, clip skip, non-square latents, SD2-style config.

mod common;

use std::collections::HashMap;

use common::{ReplayNoise, assert_close, load_fixture, max_abs_diff, repo_path};
use diffctl::models::unet::DeepCache;
use diffctl::pipeline::{GenerateRequest, LoadOptions, Progress, StableDiffusion};

#[test]
fn pipeline_matches_diffusers_for_every_case() {
    let cases = common::pipeline_cases();
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut report = Vec::new();
    for case in &cases {
        let model = models
            .entry(case.model.clone())
            .or_insert_with(|| StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap());
        let fixture = load_fixture(&case.file);
        let mut noise = ReplayNoise::from_fixture(&fixture);
        let request = case.request(&fixture);
        let mut steps_seen = 0;
        let out = model
            .generate(&request, &mut [], &mut noise, &mut |p| {
                if let Progress::Step { done, .. } = p {
                    steps_seen = done;
                }
            })
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(steps_seen >= case.steps, "{}: progress reported {steps_seen} steps", case.name);
        assert!(noise.0.is_empty(), "{}: {} recorded noise draws unused", case.name, noise.0.len());
        let latent_err = assert_close(&format!("{} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
        let image = out.images.permute((0, 2, 3, 1)).unwrap();
        let image_err = max_abs_diff(&image, &fixture["image"]);
        assert!(image_err <= 2.0 / 255.0, "{}: image max|diff| {image_err}", case.name);
        report.push(format!("{:24} latents {latent_err:.2e}  image {image_err:.2e}", case.name));
    }
    eprintln!("{}", report.join("\n"));
}

/// The one-shot path the CLI takes, which frees each network after its stage, gives exactly what
/// `generate` gives.
#[test]
fn generate_once_matches_generate() {
    let case = &common::pipeline_cases()[0];
    let load = || StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap();
    let fixture = load_fixture(&case.file);
    let request = case.request(&fixture);
    let mut progress = Vec::new();
    let kept = load().generate(&request, &mut [], &mut ReplayNoise::from_fixture(&fixture), &mut |_| {}).unwrap();
    let once = load()
        .generate_once(&request, &mut [], &mut ReplayNoise::from_fixture(&fixture), &mut |p| progress.push(p))
        .unwrap();
    assert_eq!(max_abs_diff(&once.latents, &kept.latents), 0.0);
    assert_eq!(max_abs_diff(&once.images, &kept.images), 0.0);
    assert_eq!(progress.first(), Some(&Progress::Sampling { steps: case.steps }));
    assert_eq!(progress.last(), Some(&Progress::Decoding));
}

/// DeepCache in the sampling loop: interval 1 refreshes at every call, so it is the exact pipeline;
/// interval 2 reuses the deep feature every other call, so the latents move (finite, still every
/// step reported).
#[test]
fn deep_cache_in_the_sampling_loop() {
    let case = &common::pipeline_cases()[0];
    let model = StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap();
    let fixture = load_fixture(&case.file);
    let run = |deep_cache: Option<DeepCache>| {
        let request = GenerateRequest { deep_cache, ..case.request(&fixture) };
        let mut steps = 0;
        let out = model
            .generate(&request, &mut [], &mut ReplayNoise::from_fixture(&fixture), &mut |p| {
                if let Progress::Step { done, .. } = p {
                    steps = done;
                }
            })
            .unwrap();
        assert_eq!(steps, case.steps);
        out.latents
    };
    let exact = run(None);
    assert_eq!(max_abs_diff(&run(Some(DeepCache::new(1, 0).unwrap())), &exact), 0.0);
    let cached = run(Some(DeepCache::new(2, 0).unwrap()));
    let diff = max_abs_diff(&cached, &exact);
    assert!(diff.is_finite() && diff > 1e-4, "interval 2 changed the latents by {diff}");
}
