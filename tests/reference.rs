//! Reference-only control against diffusers' community `StableDiffusionReferencePipeline`
//! (tools/fixtures/make_reference_fixtures.py): attention, AdaIN and both; style fidelity 0, 0.5,
//! 1; block-selection weights; no guidance; batch 2; a resized reference. The fixture's noise draws
//! (the VAE sample of the reference, then one reference noise per step) are replayed in order.

mod common;

use common::{ReplayNoise, assert_close, expect_error, load_fixture, max_abs_diff, repo_path};
use diffctl::control::Control;
use diffctl::control::self_attention::{ReferenceMode, ReferenceOnly, ReferenceSettings};
use diffctl::io::image::load_rgb;
use diffctl::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};

const DIR: &str = "tests/fixtures/reference";

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    style_fidelity: f64,
    reference_attn: bool,
    reference_adain: bool,
    attention_auto_machine_weight: f64,
    gn_auto_machine_weight: f64,
    guidance: f64,
    reference_image: String,
    file: String,
    model: String,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    scheduler: String,
    /// The SDXL pipeline's `reference_guidance_start` / `_end` (the SD1 pipeline has neither).
    #[serde(default)]
    reference_guidance_start: f64,
    #[serde(default = "one")]
    reference_guidance_end: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases(file: &str) -> Vec<Case> {
    let all: Cases = diffctl::io::read_json(&repo_path(&format!("{DIR}/{file}"))).unwrap();
    all.cases
}

fn settings(case: &Case) -> ReferenceSettings {
    let mode = match (case.reference_attn, case.reference_adain) {
        (true, false) => ReferenceMode::Attention,
        (false, true) => ReferenceMode::AdaIn,
        _ => ReferenceMode::Both,
    };
    ReferenceSettings {
        mode,
        style_fidelity: case.style_fidelity,
        attention_weight: case.attention_auto_machine_weight,
        gn_weight: case.gn_auto_machine_weight,
        start: case.reference_guidance_start,
        end: case.reference_guidance_end,
    }
}

/// The recorded draws in order: SD1 fixtures stack them in `noise`; SDXL ones keep the VAE's
/// (`vae_noise`) apart from the per-step reference noise (`ref_noise`, both guidance halves).
fn recorded_draws(fixture: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<candle_core::Tensor> {
    let rows = |t: &candle_core::Tensor| (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect::<Vec<_>>();
    match fixture.get("noise") {
        Some(noise) => rows(noise),
        None => std::iter::once(fixture["vae_noise"].clone()).chain(rows(&fixture["ref_noise"])).collect(),
    }
}

#[test]
fn reference_only_matches_the_diffusers_community_pipeline() {
    replay_cases("cases.json", 10);
}

/// SDXL against diffusers' `StableDiffusionXLReferencePipeline`: each guidance half noised on its
/// own, the reference window (`reference_guidance_end` 0.6), pooled embeddings and time ids.
#[test]
fn reference_only_on_sdxl_matches_the_diffusers_xl_community_pipeline() {
    replay_cases("sdxl-cases.json", 11);
}

fn replay_cases(file: &str, count: usize) {
    let cases = cases(file);
    assert_eq!(cases.len(), count);
    let model = StableDiffusion::load(&repo_path(&cases[0].model), &LoadOptions::default()).unwrap();
    let mut report = Vec::new();
    for case in &cases {
        let fixture = load_fixture(&case.file);
        let mut replay = ReplayNoise(recorded_draws(&fixture));
        let image = load_rgb(&repo_path(&format!("{DIR}/{}", case.reference_image))).unwrap();
        let mut controls: Vec<Box<dyn Control>> = vec![Box::new(ReferenceOnly::new(image, settings(case)).unwrap())];
        let request = GenerateRequest {
            prompt: case.prompt.clone(),
            negative_prompt: Some(case.negative_prompt.clone()),
            steps: case.steps,
            guidance: case.guidance,
            scheduler: Some(case.scheduler.parse().unwrap()),
            schedule: None,
            width: 0,
            height: 0,
            batch: 0,
            clip_skip: 0,
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
        let out = model
            .generate(&request, &mut controls, &mut replay, &mut |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(replay.0.is_empty(), "{}: {} recorded draws unused", case.name, replay.0.len());
        let what = format!("{} latents", case.name);
        let latent_err = assert_close(&what, &out.latents, &fixture["latents"], 2e-3);
        let image_err = max_abs_diff(&out.images.permute((0, 2, 3, 1)).unwrap(), &fixture["image"]);
        assert!(image_err <= 2.0 / 255.0, "{}: image max|diff| {image_err}", case.name);
        // The mechanism is visible: far from the plain pipeline's result.
        let effect = max_abs_diff(&out.latents, &fixture["plain_latents"]);
        assert!(effect > 1.0, "{}: the reference moved the latents by only {effect}", case.name);
        report.push(format!("{:14} latents {latent_err:.2e}  image {image_err:.2e}  effect {effect:.2}", case.name));
    }
    eprintln!("{}", report.join("\n"));
}

const SD1: &str = "tests/fixtures/models/sd1-tiny";

#[test]
fn reference_flags_reach_the_generation() {
    // The CLI path: a reference changes the image, and every mode runs.
    let dir = tempfile::tempdir().unwrap();
    let reference = repo_path(&format!("{DIR}/reference.png"));
    let run = |extra: &[&str], name: &str| -> Vec<u8> {
        let png = dir.path().join(name);
        let mut args = vec!["generate", "--model", SD1, "--prompt", "a cat", "--steps", "2", "--seed", "3"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", png.to_str().unwrap()]);
        let args: Vec<String> =
            args.iter().map(|a| if *a == SD1 { repo_path(SD1).display().to_string() } else { a.to_string() }).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::diffctl(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(&png).unwrap()
    };
    let plain = run(&[], "plain.png");
    for mode in ["attn", "adain", "attn+adain"] {
        let with =
            run(&["--reference-image", reference.to_str().unwrap(), "--reference-mode", mode], &format!("{mode}.png"));
        assert_ne!(with, plain, "--reference-mode {mode} changed nothing");
    }
}

#[test]
fn bad_reference_inputs_are_clear_errors() {
    let model = repo_path(SD1);
    let reference = repo_path(&format!("{DIR}/reference.png"));
    let reference = reference.to_str().unwrap();
    expect_error(&["--reference-image", "/nonexistent/ref.png"], &model, "/nonexistent/ref.png");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    expect_error(&["--reference-image", garbage.to_str().unwrap()], &model, "garbage.png");
    expect_error(&["--reference-image", reference, "--style-fidelity", "1.5"], &model, "style fidelity 1.5");
    expect_error(&["--reference-image", reference, "--style-fidelity", "NaN"], &model, "style fidelity NaN");
    expect_error(&["--reference-image", reference, "--reference-attn-weight=-0.1"], &model, "attention weight -0.1");
    expect_error(&["--reference-image", reference, "--reference-gn-weight", "3"], &model, "GN weight 3");
    expect_error(&["--reference-image", reference, "--reference-mode", "both"], &model, "reference mode");
    // Reference settings without a reference image: clap's usage error names the missing flag.
    let out =
        common::diffctl(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--style-fidelity", "0.3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reference-image"));
}

/// Reference-only in one generation with a ControlNet, a T2I-Adapter, an IP-Adapter and a LoRA,
/// through the library request the CLI is thin over: every mechanism still acts.
#[test]
fn reference_composes_with_every_other_mechanism() {
    use diffctl::control::residual::controlnet::ControlNetSettings;
    use diffctl::request::{ControlNetSpec, IpAdapterRequest, LoraSpec, ReferenceSpec, Request, T2IAdapterSpec};

    let path = |p: &str| repo_path(p);
    let control_image = path("tests/fixtures/images/control_a.png");
    let base = Request {
        prompt: "a photo of a cat".into(),
        steps: 3,
        width: Some(32),
        height: Some(32),
        seed: 7,
        ..Request::default()
    };
    let reference =
        ReferenceSpec { image: path(&format!("{DIR}/reference.png")), settings: ReferenceSettings::default() };
    let all = Request {
        reference: Some(reference.clone()),
        controlnets: vec![ControlNetSpec {
            path: path("tests/fixtures/controlnets/cn-a"),
            image: control_image.clone(),
            preprocess: None,
            settings: ControlNetSettings::default(),
        }],
        t2i_adapters: vec![T2IAdapterSpec {
            path: path("tests/fixtures/t2i-adapters/full"),
            image: control_image,
            preprocess: None,
            scale: 1.0,
            factor: 1.0,
        }],
        ip_adapters: IpAdapterRequest {
            adapters: vec![path("tests/fixtures/ip_adapter/ip-adapter_tiny.safetensors")],
            image_encoders: vec![path("tests/fixtures/ip_adapter/image_encoder")],
            images: vec![vec![path("tests/fixtures/images/astronaut.png")]],
            ..IpAdapterRequest::default()
        },
        loras: vec![LoraSpec { path: path("tests/fixtures/lora/kohya.safetensors"), scale: 1.0 }],
        ..base.clone()
    };
    let run = |request: &Request| {
        let options = LoadOptions::default();
        let model = StableDiffusion::load(&repo_path(SD1), &options).unwrap();
        request.run_once(model, &options, &mut |_| {}, &mut |_| {}).unwrap().latents
    };
    let everything = run(&all);
    // Taking any one mechanism out changes the result: each of them acted.
    let without = [
        ("reference", Request { reference: None, ..all.clone() }),
        ("ControlNet", Request { controlnets: Vec::new(), ..all.clone() }),
        ("T2I-Adapter", Request { t2i_adapters: Vec::new(), ..all.clone() }),
        ("IP-Adapter", Request { ip_adapters: IpAdapterRequest::default(), ..all.clone() }),
        ("LoRA", Request { loras: Vec::new(), ..all.clone() }),
    ];
    for (what, request) in without {
        let diff = max_abs_diff(&run(&request), &everything);
        assert!(diff > 1e-4, "taking the {what} out changed nothing ({diff})");
    }
}
