//! SDXL parity with diffusers' StableDiffusionXLPipeline on a tiny SDXL-layout model (two text
//! encoders, `text_time` added conditioning, VAE scaling factor 0.13025): every scheduler, zero
//! negative embeddings, clip skip, second prompts, micro-conditioning, sizes; through the library
//! request and the CLI.

mod common;

use common::{ReplayNoise, assert_close, load_fixture, max_abs_diff, repo_path};
use diffctl::pipeline::{LoadOptions, MicroConditioning, StableDiffusion};
use diffctl::request::Request;
use diffctl::schedulers::SchedulerKind;

const MODEL: &str = "tests/fixtures/models/sdxl-tiny";

/// One recorded diffusers run (tests/fixtures/sdxl/cases.json).
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    scheduler: Option<String>,
    steps: usize,
    guidance: f64,
    prompt: String,
    prompt_2: Option<String>,
    negative_prompt: Option<String>,
    negative_prompt_2: Option<String>,
    batch: usize,
    clip_skip: Option<usize>,
    width: Option<usize>,
    height: Option<usize>,
    original_size: Option<(usize, usize)>,
    crops_coords_top_left: Option<(usize, usize)>,
    target_size: Option<(usize, usize)>,
    output_width: usize,
    output_height: usize,
    file: String,
    timesteps: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/sdxl/cases.json")).unwrap().cases
}

/// The library request a user makes for `case`.
fn request(case: &Case) -> Request {
    Request {
        prompt: case.prompt.clone(),
        prompt_2: case.prompt_2.clone(),
        negative_prompt: case.negative_prompt.clone(),
        negative_prompt_2: case.negative_prompt_2.clone(),
        micro_conditioning: MicroConditioning {
            original_size: case.original_size,
            crop_top_left: case.crops_coords_top_left.unwrap_or((0, 0)),
            target_size: case.target_size,
            negative: None,
            aesthetic_score: None,
            negative_aesthetic_score: None,
        },
        steps: case.steps,
        guidance: case.guidance,
        scheduler: case.scheduler.as_deref().map(|s| s.parse::<SchedulerKind>().unwrap()),
        width: case.width,
        height: case.height,
        batch: case.batch,
        clip_skip: case.clip_skip.unwrap_or(0),
        ..Request::default()
    }
}

#[test]
fn sdxl_pipeline_matches_diffusers() {
    let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    let mut report = Vec::new();
    for case in cases() {
        let fixture = load_fixture(&case.file);
        let mut prepared = request(&case).prepare(&mut model, &LoadOptions::default()).unwrap();
        let generate = &mut prepared.generate;
        assert_eq!((generate.width, generate.height), (case.output_width, case.output_height), "{}", case.name);
        generate.init_latents = Some(fixture["init_latents"].clone());
        let r = common::replay_case(&case.name, &model, &mut prepared, &fixture);
        assert_eq!(r.steps, Some(case.timesteps.len()), "{}", case.name);
        report.push(format!("{:20} latents {:.2e}  image {:.2e}", case.name, r.latent_err, r.image_err));
    }
    eprintln!("{}", report.join("\n"));
}

/// `diffctl generate` on the SDXL folder with the SDXL flags gives the library's latents.
#[test]
fn cli_generates_with_sdxl_flags() {
    let case = cases().into_iter().find(|c| c.name == "sdxl-microcond").unwrap();
    let fixture = load_fixture(&case.file);
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fixture["init_latents"].clone())]),
        &init,
    )
    .unwrap();
    let (png, latents) = (dir.path().join("out.png"), dir.path().join("out.safetensors"));
    let (oh, ow) = case.original_size.unwrap();
    let (ct, cl) = case.crops_coords_top_left.unwrap();
    let (th, tw) = case.target_size.unwrap();
    let out = common::diffctl(&[
        "generate",
        "--model",
        repo_path(MODEL).to_str().unwrap(),
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        case.negative_prompt.as_deref().unwrap(),
        "--steps",
        &case.steps.to_string(),
        "--guidance",
        &case.guidance.to_string(),
        "--original-size",
        &format!("{ow}x{oh}"),
        "--crop-top-left",
        &format!("{cl},{ct}"),
        "--target-size",
        &format!("{tw}x{th}"),
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_close("cli sdxl-microcond", &got["latents"], &fixture["latents"], 2e-3);
}

/// The tiny model as one SGM single-file checkpoint (f16, as SDXL base ships; configs from the
/// folder) gives the folder's latents; `convert` writes it back as a folder and as a single file
/// with every tensor of the SGM layout.
#[test]
fn single_file_sgm_checkpoint_matches_the_folder() {
    use diffctl::io::model_files::SourceOptions;
    let case = cases().into_iter().find(|c| c.name == "sdxl-default").unwrap();
    let fixture = load_fixture(&case.file);
    let single = repo_path("tests/fixtures/models/sdxl-tiny.safetensors");
    let options = LoadOptions {
        files: SourceOptions { model_config: Some(repo_path(MODEL)), ..Default::default() },
        ..LoadOptions::default()
    };
    let mut model = StableDiffusion::load(&single, &options).unwrap();
    let mut prepared = request(&case).prepare(&mut model, &options).unwrap();
    prepared.generate.init_latents = Some(fixture["init_latents"].clone());
    let out = model
        .generate(&prepared.generate, &mut prepared.controls, &mut ReplayNoise::from_fixture(&fixture), &mut |_| {})
        .unwrap();
    assert_close("single-file sdxl-default", &out.latents, &fixture["latents"], 2e-3);

    // Without the configs the tiny (non-standard) file is refused with what to pass.
    let err = StableDiffusion::load(&single, &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("non-standard SDXL") && err.contains("--model-config"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let folder = dir.path().join("folder");
    let o = common::diffctl(&["convert", &s(&single), &s(&folder), "--model-config", &s(&repo_path(MODEL))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = dir.path().join("again.safetensors");
    let o = common::diffctl(&["convert", &s(&folder), &s(&again)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let original = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
    let written = candle_core::safetensors::load(&again, &candle_core::Device::Cpu).unwrap();
    let mut missing: Vec<_> = original.keys().filter(|k| !written.contains_key(*k)).collect();
    missing.sort();
    // OpenCLIP's logit_scale belongs to its image-text head, which no pipeline reads.
    assert_eq!(missing, vec!["conditioner.embedders.1.model.logit_scale"]);
    for (key, tensor) in &written {
        assert_eq!(max_abs_diff(tensor, &original[key]), 0.0, "{key}");
    }
    let reloaded = StableDiffusion::load(&folder, &LoadOptions::default()).unwrap();
    assert!(reloaded.force_zeros_for_empty_prompt);
}

/// An f16 model's VAE runs in f32 when its config says `force_upcast` (SDXL's VAE overflows f16),
/// as diffusers upcasts it: its decode equals the f32 model's exactly.
#[test]
fn f16_models_keep_a_force_upcast_vae_in_f32() {
    let load =
        |dtype| StableDiffusion::load(&repo_path(MODEL), &LoadOptions { dtype, ..LoadOptions::default() }).unwrap();
    let (half, full) = (load(candle_core::DType::F16), load(candle_core::DType::F32));
    assert!(half.vae.config().force_upcast);
    let latents = candle_core::Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &candle_core::Device::Cpu).unwrap();
    let a = half.vae.decode_to_unit_range(&latents).unwrap();
    let b = full.vae.decode_to_unit_range(&latents).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
