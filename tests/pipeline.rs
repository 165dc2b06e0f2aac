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

/// DeepCache at interval 1 refreshes at every call: the exact pipeline, every step reported.
#[test]
fn deep_cache_interval_one_is_the_exact_pipeline() {
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
    assert_eq!(max_abs_diff(&run(Some(DeepCache::new(1, 0).unwrap())), &run(None)), 0.0);
}

/// DeepCache against its own helper (`DeepCacheSDHelper`, interval 2) on diffusers' pipeline, case
/// `sd1-ddim`, at every branch of the tiny UNet (tools/fixtures/make_deep_cache_fixtures.py).
#[test]
fn deep_cache_matches_the_deepcache_helper_at_every_branch() {
    let case = common::pipeline_cases().into_iter().find(|c| c.name == "sd1-ddim").unwrap();
    let model = StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap();
    let fixture = load_fixture("tests/fixtures/deep_cache.safetensors");
    let exact = &fixture["exact"];
    for branch in 0..model.unet.num_skips() {
        let request =
            GenerateRequest { deep_cache: Some(DeepCache::new(2, branch).unwrap()), ..case.request(&fixture) };
        let out = model.generate(&request, &mut [], &mut ReplayNoise(Vec::new()), &mut |_| {}).unwrap();
        let expected = &fixture[&format!("branch{branch}")];
        assert!(max_abs_diff(expected, exact) > 0.1, "branch {branch}: the fixture must differ from exact");
        assert_close(&format!("DeepCache branch {branch}"), &out.latents, expected, 1e-4);
    }
}
