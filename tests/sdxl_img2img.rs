//! SDXL img2img, inpainting (9-channel and blending) and the refiner, against diffusers'
//! StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on tiny SDXL-layout
//! models (the VAE posterior pinned to its mean, as in the SD1 img2img fixtures).

mod common;

use std::collections::HashMap;

use common::{ReplayNoise, assert_close, load_fixture, max_abs_diff, repo_path};
use diffctl::pipeline::{LoadOptions, MicroConditioning, Progress, StableDiffusion};
use diffctl::request::{InitImageSpec, Request};
use diffctl::schedulers::SchedulerKind;

/// One recorded diffusers run (tests/fixtures/sdxl-img2img/cases.json).
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    model: String,
    scheduler: String,
    steps: usize,
    strength: Option<f64>,
    strength_passed: bool,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    batch: usize,
    width: usize,
    height: usize,
    init_image: Option<String>,
    mask: Option<String>,
    aesthetic_score: Option<f64>,
    negative_aesthetic_score: Option<f64>,
    file: String,
    timesteps: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/sdxl-img2img/cases.json")).unwrap().cases
}

/// The library request a user makes for `case` (strength left to the default where diffusers'
/// default was used, except inpainting's 0.9999, which is given).
fn request(case: &Case) -> Request {
    let strength = if case.strength_passed || case.mask.is_some() { case.strength } else { None };
    Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        micro_conditioning: MicroConditioning {
            aesthetic_score: case.aesthetic_score,
            negative_aesthetic_score: case.negative_aesthetic_score,
            ..MicroConditioning::default()
        },
        steps: case.steps,
        guidance: case.guidance,
        scheduler: Some(case.scheduler.parse::<SchedulerKind>().unwrap()),
        width: Some(case.width),
        height: Some(case.height),
        batch: case.batch,
        init_image: case.init_image.as_ref().map(|image| InitImageSpec {
            image: repo_path(image),
            mask: case.mask.as_deref().map(repo_path),
            mask_blur: None,
            only_masked_padding: None,
            keep_unmasked: false,
            strength,
        }),
        ..Request::default()
    }
}

#[test]
fn sdxl_img2img_inpainting_and_refiner_match_diffusers() {
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut report = Vec::new();
    for case in cases().into_iter().filter(|c| c.kind != "ensemble") {
        let model = models
            .entry(case.model.clone())
            .or_insert_with(|| StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap());
        let fixture = load_fixture(&case.file);
        let mut prepared = request(&case).prepare(model, &LoadOptions::default()).unwrap();
        prepared.generate.init_latents = Some(fixture["init_noise"].clone());
        let r = common::replay_case(&case.name, model, &mut prepared, &fixture);
        assert_eq!(r.steps, Some(case.timesteps.len()), "{}: steps run", case.name);
        report.push(format!("{:26} latents {:.2e}  image {:.2e}", case.name, r.latent_err, r.image_err));
    }
    eprintln!("{}", report.join("\n"));
}

/// Base + refiner (diffusers' ensemble of experts: the base with `denoising_end`, the refiner with
/// `denoising_start` on its latents), through the library and through `diffctl generate --refiner`.
#[test]
fn base_and_refiner_hand_off_as_diffusers() {
    use diffctl::pipeline::ContinueFrom;
    let refiner =
        StableDiffusion::load(&repo_path("tests/fixtures/models/sdxl-tiny-refiner"), &LoadOptions::default()).unwrap();
    for case in cases().into_iter().filter(|c| c.kind == "ensemble") {
        let fixture = load_fixture(&case.file);
        let mut base_request = Request { width: None, height: None, init_image: None, ..request(&case) };
        base_request.refiner = None;
        let mut base_model = StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap();
        let mut prepared = base_request.prepare(&mut base_model, &LoadOptions::default()).unwrap();
        prepared.generate.init_latents = Some(fixture["init_latents"].clone());
        prepared.generate.denoising_end = Some(0.8);
        let mut noise = ReplayNoise(Vec::new());
        if let Some(draws) = fixture.get("base_step_noise") {
            noise.0.extend((0..draws.dim(0).unwrap()).map(|i| draws.get(i).unwrap()));
        }
        noise.0.extend(ReplayNoise::from_fixture(&fixture).0);
        let out = base_model.generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut |_| {}).unwrap();
        assert_close(&format!("{} base latents", case.name), &out.latents, &fixture["base_latents"], 2e-3);
        let finish = diffctl::pipeline::GenerateRequest {
            continue_from: Some(ContinueFrom { latents: out.latents, denoising_start: 0.8 }),
            denoising_end: None,
            init_latents: None,
            ..prepared.generate.clone()
        };
        let mut steps = None;
        let out = refiner
            .generate(&finish, &mut [], &mut noise, &mut |p| {
                if let Progress::Sampling { steps: n } = p {
                    steps = Some(n);
                }
            })
            .unwrap();
        assert_eq!(steps, Some(case.timesteps.len()), "{}: refiner steps", case.name);
        assert!(noise.0.is_empty(), "{}: {} recorded noise draws unused", case.name, noise.0.len());
        assert_close(&format!("{} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
        let image_err = max_abs_diff(&out.images.permute((0, 2, 3, 1)).unwrap(), &fixture["image"]);
        assert!(image_err <= 2.0 / 255.0, "{}: image max|diff| {image_err}", case.name);
    }

    // The CLI: one command, base then refiner (Euler: no noise drawn after the start).
    let case = cases().into_iter().find(|c| c.name == "xl-ensemble").unwrap();
    let fixture = load_fixture(&case.file);
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents", fixture["init_latents"].clone())]), &init).unwrap();
    let (png, latents) = (dir.path().join("out.png"), dir.path().join("out.safetensors"));
    let path = |p: &str| repo_path(p).to_str().unwrap().to_string();
    let out = common::diffctl(&[
        "generate",
        "--model",
        &path("tests/fixtures/models/sdxl-tiny"),
        "--refiner",
        &path("tests/fixtures/models/sdxl-tiny-refiner"),
        "--refiner-start",
        "0.8",
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        case.negative_prompt.as_deref().unwrap(),
        "--steps",
        &case.steps.to_string(),
        "--guidance",
        &case.guidance.to_string(),
        "--scheduler",
        "euler",
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_close("cli xl-ensemble", &got["latents"], &fixture["latents"], 2e-3);
    let bad = common::diffctl(&[
        "generate",
        "--model",
        &path("tests/fixtures/models/sdxl-tiny"),
        "--refiner",
        &path("tests/fixtures/models/sdxl-tiny-refiner"),
        "--refiner-start",
        "1.0",
        "--prompt",
        "x",
        "--output",
        png.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("strictly between 0 and 1"), "{stderr}");
}

/// The refiner as an SGM single file (bigG alone at `conditioner.embedders.0.model.*`, written by
/// `convert`): it loads with its folder's configs, gives the folder's refiner case, and converts
/// back to a refiner folder.
#[test]
fn refiner_single_file_round_trips() {
    use diffctl::io::model_files::SourceOptions;
    let folder = repo_path("tests/fixtures/models/sdxl-tiny-refiner");
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let single = dir.path().join("refiner.safetensors");
    let o = common::diffctl(&["convert", &s(&folder), &s(&single)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keys = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
    assert!(keys.contains_key("conditioner.embedders.0.model.text_projection"));
    assert!(!keys.keys().any(|k| k.starts_with("conditioner.embedders.1.")));
    let o = common::diffctl(&["inspect", &s(&single)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("SDXL refiner"), "{}", String::from_utf8_lossy(&o.stdout));

    let case = cases().into_iter().find(|c| c.name == "xl-refiner-i2i").unwrap();
    let fixture = load_fixture(&case.file);
    for (model_path, model_config) in [(single.clone(), Some(folder.clone())), (dir.path().join("back"), None)] {
        if model_config.is_none() {
            let o = common::diffctl(&["convert", &s(&single), &s(&model_path), "--model-config", &s(&folder)]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let options =
            LoadOptions { files: SourceOptions { model_config, ..Default::default() }, ..LoadOptions::default() };
        let mut model = StableDiffusion::load(&model_path, &options).unwrap();
        assert!(model.requires_aesthetics_score && !model.force_zeros_for_empty_prompt);
        let mut prepared = request(&case).prepare(&mut model, &options).unwrap();
        prepared.generate.init_latents = Some(fixture["init_noise"].clone());
        let out = model
            .generate(&prepared.generate, &mut prepared.controls, &mut ReplayNoise::from_fixture(&fixture), &mut |_| {})
            .unwrap();
        assert_close(&format!("refiner from {}", model_path.display()), &out.latents, &fixture["latents"], 2e-3);
    }
}
