//! Uni-ControlNet parity with the fixture script's reimplementation of the official modules: the
//! adapters on their own, whole pipeline runs (diffusers' StableDiffusionPipeline with the residuals
//! and tokens injected), the CLI, a run combined with a ControlNet, and bad inputs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_fixture, max_abs_diff, repo_path};
use diffctl::control::Control;
use diffctl::control::cross_attention::{ImagePromptEmbeds, ProjectionInput};
use diffctl::control::residual::controlnet::{ControlNetControl, ControlNetSettings, load_controlnet};
use diffctl::control::residual::load_condition_image;
use diffctl::control::residual::uni_controlnet::{
    LOCAL_CONDITIONS, UniControlNetControl, UniControlNetSettings, load_uni_controlnet, local_conditions,
};
use diffctl::io::image::load_rgb;
use diffctl::models::clip_vision::ClipVisionEncoder;
use diffctl::models::image_processor::ClipImageProcessor;
use diffctl::models::unet::UNetConfig;
use diffctl::models::uni_controlnet::UniControlNet;
use diffctl::pipeline::{GenerateRequest, Generated, LoadOptions, StableDiffusion};

const DIR: &str = "tests/fixtures/uni_controlnet";
const BASE: &str = "tests/fixtures/uni_controlnet/base";
const UNI: &str = "tests/fixtures/uni_controlnet/uni-tiny.safetensors";
const UNI_GLOBAL: &str = "tests/fixtures/uni_controlnet/uni-tiny-global.ckpt";
const ENCODER: &str = "tests/fixtures/ip_adapter/image_encoder";
const COFFEE: &str = "tests/fixtures/images/coffee.png";

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    scheduler: String,
    steps: usize,
    guidance: f64,
    prompt: String,
    negative_prompt: String,
    width: usize,
    height: usize,
    file: String,
    expected: String,
    local: HashMap<String, String>,
    global_image: Option<String>,
    local_scale: f64,
    global_scale: f64,
}

fn base_config() -> UNetConfig {
    UNetConfig::load(&repo_path(&format!("{BASE}/unet/config.json"))).unwrap()
}

fn load(path: &str) -> UniControlNet {
    load_uni_controlnet(&repo_path(path), &LoadOptions::default(), &base_config()).unwrap()
}

/// The CLIP `image_embeds` [1, 32] of the image at `rel`.
fn embeds_of(rel: &str) -> Tensor {
    let encoder = ClipVisionEncoder::from_dir(&repo_path(ENCODER), DType::F32, &Device::Cpu).unwrap();
    let processor = ClipImageProcessor::load(&repo_path(ENCODER).join("preprocessor_config.json")).unwrap();
    let image = load_rgb(&repo_path(rel)).unwrap();
    ImagePromptEmbeds::from_images(&[image], &encoder, &processor, ProjectionInput::ImageEmbeds).unwrap().positive
}

/// The condition maps [1, 21, height, width] from {condition name: image path}.
fn maps(local: &HashMap<String, String>, width: usize, height: usize) -> Tensor {
    let images: Vec<_> = local
        .iter()
        .map(|(name, path)| {
            let slot = LOCAL_CONDITIONS.iter().position(|n| n == name).unwrap();
            (slot, load_rgb(&repo_path(path)).unwrap())
        })
        .collect();
    local_conditions(&images, LOCAL_CONDITIONS.len(), width, height, &Device::Cpu).unwrap()
}

#[test]
fn adapters_match_the_reference_modules() {
    let unit = load_fixture(&format!("{DIR}/units.safetensors"));
    let uni = load(UNI);
    let local = uni.local.as_ref().unwrap();
    let c = local.config();
    assert_eq!((c.local_channels, c.inject_channels.clone()), (21, vec![8, 8, 16, 16]));
    assert_eq!(c.ldm_inject_layers(), vec![1, 4, 7, 10], "the official inject_layers numbering");
    let named = HashMap::from([
        ("canny".to_string(), format!("{DIR}/images/canny.png")),
        ("midas".to_string(), format!("{DIR}/images/midas.png")),
    ]);
    // 128x64 from the 128x128 maps: Pillow's Lanczos in the script, ours here.
    let maps = maps(&named, 128, 64);
    let features = local.features(&maps).unwrap();
    assert_eq!(features.len(), 4);
    for (i, f) in features.iter().enumerate() {
        assert_close(&format!("features.{i}"), f, &unit[&format!("features.{i}")], 2e-5);
    }
    let res = local.forward(&unit["sample"], &unit["timesteps"], &unit["context"], &features).unwrap();
    assert_eq!(res.down.len(), 12);
    for (i, d) in res.down.iter().enumerate() {
        assert_close(&format!("down.{i}"), d, &unit[&format!("down.{i}")], 2e-5);
    }
    assert_close("mid", &res.mid, &unit["mid"], 2e-5);

    let global = uni.global.as_ref().unwrap();
    assert_eq!(global.config().tokens, 2);
    let embeds = embeds_of(COFFEE);
    assert_close("global.embeds (CLIP, Rust)", &embeds, &unit["global.embeds"], 2e-5);
    assert_close("global.tokens", &global.forward(&unit["global.embeds"]).unwrap(), &unit["global.tokens"], 2e-5);
    let zeros = Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap();
    assert_close("global.zero_tokens", &global.forward(&zeros).unwrap(), &unit["global.zero_tokens"], 2e-5);
}

#[test]
fn global_only_pickle_loads_the_same_adapter() {
    let (full, pickle) = (load(UNI), load(UNI_GLOBAL));
    assert!(pickle.local.is_none(), "a global-only file has no local adapter");
    let embeds = load_fixture(&format!("{DIR}/units.safetensors"))["global.embeds"].clone();
    let a = full.global.as_ref().unwrap().forward(&embeds).unwrap();
    let b = pickle.global.as_ref().unwrap().forward(&embeds).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

fn cases() -> Vec<Case> {
    let cases: Cases = diffctl::io::read_json(&repo_path(&format!("{DIR}/cases.json"))).unwrap();
    cases.cases
}

/// The control of `case` (local maps at 8x the latent size, the global image through the Rust CLIP).
fn control(case: &Case, vae_factor: usize) -> Box<dyn Control> {
    let uni = load(&case.file);
    let local =
        (!case.local.is_empty()).then(|| maps(&case.local, case.width / vae_factor * 8, case.height / vae_factor * 8));
    let global = case.global_image.as_deref().map(embeds_of);
    let settings = UniControlNetSettings { local_scale: case.local_scale, global_scale: case.global_scale };
    Box::new(UniControlNetControl::new(case.file.clone(), Arc::new(uni), local, global, settings).unwrap())
}

fn request(case: &Case, init: &Tensor) -> GenerateRequest {
    GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: Some(case.negative_prompt.clone()),
        steps: case.steps,
        guidance: case.guidance,
        scheduler: Some(case.scheduler.parse().unwrap()),
        schedule: None,
        width: case.width,
        height: case.height,
        batch: 1,
        clip_skip: 0,
        init_latents: Some(init.clone()),
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

fn generate(model: &StableDiffusion, req: &GenerateRequest, controls: &mut [Box<dyn Control>]) -> Generated {
    model.generate(req, controls, &mut diffctl::noise::SeededNoise::new(0), &mut |_| {}).unwrap()
}

#[test]
fn pipeline_runs_match_the_reference() {
    let model = StableDiffusion::load(&repo_path(BASE), &LoadOptions::default()).unwrap();
    let mut report = Vec::new();
    for case in cases() {
        let fixture = load_fixture(&case.expected);
        let mut controls = vec![control(&case, model.vae_scale_factor())];
        let out = generate(&model, &request(&case, &fixture["init_latents"]), &mut controls);
        let err = assert_close(&format!("{} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
        let image_err = max_abs_diff(&out.images.permute((0, 2, 3, 1)).unwrap(), &fixture["image"]);
        assert!(image_err <= 2.0 / 255.0, "{}: image {image_err}", case.name);
        report.push(format!("{:18} latents {err:.2e} image {image_err:.2e}", case.name));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.len(), 4);
}

/// A ControlNet for the base model, written to `dir`: the base UNet's input half with deterministic
/// zero convolutions and condition embedding (32x32 image → 16x16 latents).
fn write_controlnet(dir: &Path) -> PathBuf {
    let unet_dir = repo_path(&format!("{BASE}/unet"));
    let base =
        candle_core::safetensors::load(unet_dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: HashMap<String, Tensor> = base
        .into_iter()
        .filter(|(k, _)| ["conv_in.", "time_embedding.", "down_blocks.", "mid_block."].iter().any(|p| k.starts_with(p)))
        .collect();
    let mut seed = 0.0;
    let mut wave = |shape: &[usize]| {
        seed += 1.0;
        let n: usize = shape.iter().product();
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        ((t * 0.37).unwrap() + seed).unwrap().sin().unwrap().affine(0.08, 0.0).unwrap().reshape(shape).unwrap()
    };
    let mut conv = |name: String, cout: usize, cin: usize, k: usize| {
        tensors.insert(format!("{name}.weight"), wave(&[cout, cin, k, k]));
        tensors.insert(format!("{name}.bias"), wave(&[cout]));
    };
    for i in 0..12 {
        conv(format!("controlnet_down_blocks.{i}"), 32, 32, 1);
    }
    conv("controlnet_mid_block".into(), 32, 32, 1);
    conv("controlnet_cond_embedding.conv_in".into(), 16, 3, 3);
    conv("controlnet_cond_embedding.blocks.0".into(), 16, 16, 3);
    conv("controlnet_cond_embedding.blocks.1".into(), 16, 16, 3);
    conv("controlnet_cond_embedding.conv_out".into(), 32, 16, 3);
    let out = dir.join("controlnet");
    std::fs::create_dir_all(&out).unwrap();
    candle_core::safetensors::save(&tensors, out.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unet_dir.join("config.json")).unwrap()).unwrap();
    config["_class_name"] = "ControlNetModel".into();
    config["conditioning_embedding_out_channels"] = serde_json::json!([16, 16]);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    out
}

#[test]
fn combines_with_a_controlnet() {
    let dir = tempfile::tempdir().unwrap();
    let options = LoadOptions::default();
    let model = StableDiffusion::load(&repo_path(BASE), &options).unwrap();
    let case = cases().into_iter().find(|c| c.name == "uni-local").unwrap();
    let fixture = load_fixture(&case.expected);
    let req = request(&case, &fixture["init_latents"]);
    let net = load_controlnet(&write_controlnet(dir.path()), &options, Some(model.unet.config())).unwrap();
    let image =
        load_condition_image(&repo_path("tests/fixtures/images/control_a.png"), 32, 32, &options.device).unwrap();
    let controlnet = ControlNetControl::new("cn".into(), Arc::new(net), image, ControlNetSettings::default()).unwrap();
    let alone = generate(&model, &req, &mut [control(&case, model.vae_scale_factor())]);
    let both = generate(&model, &req, &mut [control(&case, model.vae_scale_factor()), Box::new(controlnet)]);
    let diff = max_abs_diff(&alone.latents, &both.latents);
    let finite = both.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
    eprintln!("Uni-ControlNet + ControlNet vs Uni-ControlNet alone: max |latents diff| {diff:.3}");
    assert!(finite && diff > 1e-2, "the ControlNet must change the result ({diff})");
}

fn path_str(rel: &str) -> String {
    repo_path(rel).to_str().unwrap().to_string()
}

#[test]
fn cli_flags_reproduce_the_reference() {
    let case = cases().into_iter().find(|c| c.name == "uni-both").unwrap();
    let fixture = load_fixture(&case.expected);
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents", fixture["init_latents"].clone())]), &init).unwrap();
    let (latents, png) = (dir.path().join("out.safetensors"), dir.path().join("o.png"));
    let locals: Vec<String> = case.local.iter().map(|(k, v)| format!("{k}={}", path_str(v))).collect();
    let (model, uni, coffee, encoder) = (path_str(BASE), path_str(&case.file), path_str(COFFEE), path_str(ENCODER));
    let (local_scale, global_scale) = (case.local_scale.to_string(), case.global_scale.to_string());
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        &case.negative_prompt,
        "--steps",
        "5",
        "--scheduler",
        &case.scheduler,
        "--uni-controlnet",
        &uni,
        "--uni-global-image",
        &coffee,
        "--uni-image-encoder",
        &encoder,
        "--uni-local-scale",
        &local_scale,
        "--uni-global-scale",
        &global_scale,
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ];
    for local in &locals {
        args.extend(["--uni-local", local]);
    }
    let out = common::diffctl(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    assert_close("cli uni-both", &got["latents"], &fixture["latents"], 2e-3);
}

/// The fixture file with `local_adapter.feature_extractor.pre_extractor.0` taking 12 channels.
fn write_wrong_layout(dir: &Path) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(repo_path(UNI), &Device::Cpu).unwrap();
    let key = "local_adapter.feature_extractor.pre_extractor.0.weight";
    let narrowed = tensors[key].narrow(1, 0, 12).unwrap().contiguous().unwrap();
    tensors.insert(key.into(), narrowed);
    let path = dir.join("uni-12.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = repo_path(BASE);
    let (uni, canny) = (path_str(UNI), format!("canny={}", path_str(&format!("{DIR}/images/canny.png"))));
    let err = |extra: &[&str], needle: &str| common::expect_error(extra, &model, needle);
    err(&["--uni-controlnet", &uni, "--uni-local", "depth=x.png"], "unknown local condition `depth`");
    err(&["--uni-controlnet", &uni, "--uni-local", "canny"], "expected NAME=PNG");
    err(&["--uni-controlnet", &uni, "--uni-local", &canny, "--uni-local", &canny], "--uni-local canny was given twice");
    err(&["--uni-local", &canny], "--uni-local was given without --uni-controlnet");
    err(&["--uni-controlnet", &uni], "needs conditions");
    err(&["--uni-controlnet", &uni, "--uni-global-image", &path_str(COFFEE)], "needs --uni-image-encoder DIR");
    err(&["--uni-controlnet", &uni, "--uni-local", "canny=/nonexistent/c.png"], "/nonexistent/c.png");
    err(&["--uni-controlnet", &uni, "--uni-local", &canny, "--uni-local-scale", "NaN"], "local scale NaN");
    let not_uni = path_str(&format!("{BASE}/unet/diffusion_pytorch_model.safetensors"));
    err(&["--uni-controlnet", &not_uni, "--uni-local", &canny], "not a Uni-ControlNet: no `local_adapter.*`");
    err(&["--uni-controlnet", &path_str(UNI_GLOBAL), "--uni-local", &canny], "has no local adapter");
    let dir = tempfile::tempdir().unwrap();
    let wrong = write_wrong_layout(dir.path());
    err(
        &["--uni-controlnet", wrong.to_str().unwrap(), "--uni-local", &canny],
        "takes 12 condition channels, not the 21",
    );
    // An adapter for another base model.
    common::expect_error(
        &["--uni-controlnet", &uni, "--uni-local", &canny],
        &repo_path("tests/fixtures/models/sd1-tiny"),
        "does not fit the model's UNet",
    );
    err(
        &["--uni-controlnet", &uni, "--uni-local", &canny, "--uni-image-encoder", &path_str(ENCODER)],
        "without --uni-global-image",
    );
    let enc = path_str(ENCODER);
    let ok = ["--uni-controlnet", &uni, "--uni-global-image", &path_str(COFFEE), "--uni-image-encoder", &enc];
    err(&[&ok[..], &["--uni-global-scale", "inf"]].concat(), "global scale inf");
}
