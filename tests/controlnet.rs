//! ControlNet and T2I-Adapter parity with diffusers: the models on their own, and whole
//! StableDiffusionControlNetPipeline / StableDiffusionAdapterPipeline runs.

mod common;

use candle_core::DType;
use common::{assert_close, load_fixture, repo_path};
use diffctl::control::residual::controlnet::load_controlnet;
use diffctl::control::residual::t2i_adapter::load_t2i_adapter;
use diffctl::models::controlnet::ResidualScale;
use diffctl::pipeline::LoadOptions;

#[test]
fn controlnet_residuals_match_diffusers() {
    let unit = load_fixture("tests/fixtures/units/controlnet.safetensors");
    let net = load_controlnet(&repo_path("tests/fixtures/controlnets/cn-a"), &LoadOptions::default(), None).unwrap();
    let (sample, t, cond) = (&unit["sample"], &unit["timesteps"], &unit["cond"]);
    let ctx = &diffctl::models::unet::Conditioning::text(unit["context"].clone());
    let guess_scale = unit["guess.scale"].to_vec1::<f32>().unwrap()[0] as f64;
    for (prefix, scale) in [("", ResidualScale::Uniform(1.0)), ("guess.", ResidualScale::Guess(guess_scale))] {
        let res = net.forward(sample, t, ctx, cond, scale).unwrap();
        assert_eq!(res.down.len(), 9);
        for (i, d) in res.down.iter().enumerate() {
            assert_close(&format!("{prefix}down.{i}"), d, &unit[&format!("{prefix}down.{i}")], 2e-5);
        }
        assert_close(&format!("{prefix}mid"), &res.mid, &unit[&format!("{prefix}mid")], 2e-5);
    }
    // sd-webui-controlnet's soft injection (hook.py: `control_scales = [weight * 0.825 ** (12 - i)
    // for i in range(13)]`, zipped with the residuals): diffusers' residuals times those factors.
    let res = net.forward(sample, t, ctx, cond, ResidualScale::Soft(0.8)).unwrap();
    for (i, d) in res.down.iter().enumerate() {
        let expected = (&unit[&format!("down.{i}")] * (0.8 * 0.825f64.powi(12 - i as i32))).unwrap();
        assert_close(&format!("soft.down.{i}"), d, &expected, 2e-5);
    }
    let expected = (&unit["mid"] * (0.8 * 0.825f64.powi(12 - 9))).unwrap();
    assert_close("soft.mid", &res.mid, &expected, 2e-5);
}

#[test]
fn t2i_adapter_features_match_diffusers() {
    let unit = load_fixture("tests/fixtures/units/controlnet.safetensors");
    for kind in ["full", "light"] {
        // The diffusers folder and the TencentARC original layout of the same weights.
        for path in [
            format!("tests/fixtures/t2i-adapters/{kind}"),
            format!("tests/fixtures/t2i-adapters/{kind}-original.safetensors"),
        ] {
            let adapter = load_t2i_adapter(&repo_path(&path), &LoadOptions::default(), 3, 2).unwrap();
            let features = adapter.forward(&unit["t2i.image"].to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(features.len(), 3);
            for (i, f) in features.iter().enumerate() {
                assert_close(&format!("t2i {path} {i}"), f, &unit[&format!("t2i.{kind}.{i}")], 2e-5);
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct ControlCases {
    images: std::collections::HashMap<String, ImageEntry>,
    cases: Vec<ControlCase>,
}

#[derive(serde::Deserialize)]
struct ImageEntry {
    path: String,
}

#[derive(serde::Deserialize)]
struct ControlCase {
    name: String,
    model: String,
    scheduler: Option<String>,
    steps: usize,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    file: String,
    #[serde(default)]
    controlnets: Vec<ModelEntry>,
    #[serde(default)]
    adapters: Vec<ModelEntry>,
    #[serde(default)]
    guess_mode: bool,
    #[serde(default)]
    control_guidance_start: f64,
    #[serde(default = "one")]
    control_guidance_end: f64,
    #[serde(default = "one")]
    adapter_conditioning_factor: f64,
}

#[derive(serde::Deserialize)]
struct ModelEntry {
    path: String,
    image: String,
    scale: f64,
}

fn one() -> f64 {
    1.0
}

#[test]
fn controlnet_and_adapter_pipelines_match_diffusers() {
    use diffctl::control::Control;
    use diffctl::control::residual::controlnet::{ControlMode, ControlNetControl, ControlNetSettings};
    use diffctl::control::residual::load_condition_image;
    use diffctl::control::residual::t2i_adapter::T2IAdapterControl;
    use diffctl::pipeline::{GenerateRequest, StableDiffusion};
    use std::sync::Arc;

    let cases: ControlCases = diffctl::io::read_json(&repo_path("tests/fixtures/control_cases.json")).unwrap();
    let options = LoadOptions::default();
    let model = StableDiffusion::load(&repo_path("tests/fixtures/models/sd1-tiny"), &options).unwrap();
    let mut report = Vec::new();
    for case in cases.cases.iter().filter(|c| c.model.ends_with("sd1-tiny")) {
        let image = |name: &str| {
            let path = repo_path(&cases.images[name].path);
            load_condition_image(&path, case.width, case.height, &options.device).unwrap()
        };
        let mut controls: Vec<Box<dyn Control>> = Vec::new();
        for cn in &case.controlnets {
            let net = load_controlnet(&repo_path(&cn.path), &options, Some(model.unet.config())).unwrap();
            let settings = ControlNetSettings {
                scale: cn.scale,
                start: case.control_guidance_start,
                end: case.control_guidance_end,
                mode: if case.guess_mode { ControlMode::Guess } else { ControlMode::Balanced },
            };
            controls.push(Box::new(
                ControlNetControl::new(cn.path.clone(), Arc::new(net), image(&cn.image), settings).unwrap(),
            ));
        }
        for ad in &case.adapters {
            let adapter = load_t2i_adapter(&repo_path(&ad.path), &options, 3, 2).unwrap();
            let control = T2IAdapterControl::new(
                ad.path.clone(),
                &adapter,
                &image(&ad.image),
                ad.scale,
                case.adapter_conditioning_factor,
            )
            .unwrap();
            controls.push(Box::new(control));
        }
        let fixture = load_fixture(&case.file);
        let request = GenerateRequest {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            steps: case.steps,
            guidance: case.guidance,
            scheduler: case.scheduler.as_deref().map(|s| s.parse().unwrap()),
            schedule: None,
            width: case.width,
            height: case.height,
            batch: 1,
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
            .generate(&request, &mut controls, &mut diffctl::noise::SeededNoise::new(0), &mut |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        // cn-resize goes through our Lanczos resize, not PIL's, and still meets the same bounds.
        let err = assert_close(&format!("{} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
        let image_err = common::max_abs_diff(&out.images.permute((0, 2, 3, 1)).unwrap(), &fixture["image"]);
        assert!(image_err <= 2.0 / 255.0, "{}: image {image_err}", case.name);
        report.push(format!("{:14} latents {err:.2e} image {image_err:.2e}", case.name));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.len(), cases.cases.len(), "every case runs, the original-layout file included");
}

const SD1: &str = "tests/fixtures/models/sd1-tiny";
const CN_A: &str = "tests/fixtures/controlnets/cn-a";

fn path_str(rel: &str) -> String {
    repo_path(rel).to_str().unwrap().to_string()
}

#[test]
fn cli_controlnet_and_adapter_flags_reproduce_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = load_fixture("tests/fixtures/cases/cn-multi.safetensors");
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fixture["init_latents"].clone())]),
        &init,
    )
    .unwrap();
    let latents = dir.path().join("out.safetensors");
    let (model, cn_a, cn_b) = (path_str(SD1), path_str(CN_A), path_str("tests/fixtures/controlnets/cn-b"));
    let (img_a, img_b) =
        (path_str("tests/fixtures/images/control_a.png"), path_str("tests/fixtures/images/control_b.png"));
    let png = dir.path().join("o.png");
    let args = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "a photo of a cat wearing a red hat, highly detailed",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "5",
        "--scheduler",
        "euler",
        "--controlnet",
        &cn_a,
        "--control-image",
        &img_a,
        "--controlnet",
        &cn_b,
        "--control-image",
        &img_b,
        "--control-scale",
        "0.7",
        "--control-scale",
        "0.5",
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ];
    let out = common::diffctl(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_close("cli cn-multi", &got["latents"], &fixture["latents"], 2e-3);
}

#[test]
fn controlnet_bad_inputs_are_clear_errors() {
    let model = repo_path(SD1);
    let cn = path_str(CN_A);
    let img = path_str("tests/fixtures/images/control_a.png");
    common::expect_error(&["--controlnet", &cn], &model, "1 --controlnet but 0 --control-image");
    common::expect_error(&["--controlnet", &cn, "--control-image", "/nonexistent/x.png"], &model, "/nonexistent/x.png");
    let not_image = path_str("tests/fixtures/control_cases.json");
    common::expect_error(&["--controlnet", &cn, "--control-image", &not_image], &model, "not a readable image");
    common::expect_error(
        &["--controlnet", &cn, "--control-image", &img, "--control-start", "0.8", "--control-end", "0.5"],
        &model,
        "0 <= start < end <= 1",
    );
    common::expect_error(
        &["--controlnet", &cn, "--control-image", &img, "--control-scale", "1", "--control-scale", "2"],
        &model,
        "--control-scale was given 2 times for 1 models",
    );
    common::expect_error(
        &["--controlnet", &cn, "--control-image", &img, "--control-preprocess", "blur"],
        &model,
        "--control-preprocess blur",
    );
    common::expect_error(&["--t2i-adapter", &path_str("tests/fixtures/t2i-adapters/full")], &model, "--adapter-image");
    // sd2-tiny's down blocks are 8 and 24 channels wide.
    common::expect_error(
        &["--t2i-adapter", &path_str("tests/fixtures/t2i-adapters/full"), "--adapter-image", &img],
        &repo_path("tests/fixtures/models/sd2-tiny"),
        "T2I-Adapter's features have [8, 16, 16] channels, the SD1.x/2.x model's down blocks [8, 24]",
    );
    common::expect_error(
        &[
            "--t2i-adapter",
            &path_str("tests/fixtures/t2i-adapters/full"),
            "--adapter-image",
            &img,
            "--adapter-factor",
            "1.5",
        ],
        &model,
        "adapter factor 1.5",
    );
}

#[test]
fn controlnet_for_another_model_is_rejected_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let cn = dir.path().join("cn");
    std::fs::create_dir(&cn).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(repo_path(CN_A).join(f), cn.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(cn.join("config.json")).unwrap();
    std::fs::write(
        cn.join("config.json"),
        config.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 768"),
    )
    .unwrap();
    common::expect_error(
        &["--controlnet", cn.to_str().unwrap(), "--control-image", &path_str("tests/fixtures/images/control_a.png")],
        &repo_path(SD1),
        "ControlNet with cross_attention_dim 768 does not match the SD1.x/2.x model's 32",
    );
}

#[test]
fn control_preprocess_makes_the_condition_image_inline() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args = vec!["generate", "--model", SD1, "--prompt", "x", "--steps", "2", "--seed", "3"];
        let (cn, photo) = (path_str(CN_A), path_str("tests/fixtures/images/astronaut.png"));
        args.extend_from_slice(&["--width", "32", "--height", "32", "--controlnet", &cn, "--control-image", &photo]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", out.to_str().unwrap()]);
        let o = common::diffctl(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let plain = run(&[], "plain.png");
    let canny = run(&["--control-preprocess", "canny"], "canny.png");
    assert_ne!(plain, canny, "the canny map must change the control and so the image");
}

#[test]
fn original_controlnet_keys_map_as_diffusers_converts_them() {
    use diffctl::io::ldm::KeyMap;
    use diffctl::models::controlnet::ControlNetConfig;
    let expected: std::collections::BTreeMap<String, String> =
        diffctl::io::read_json(&repo_path("tests/fixtures/controlnets/cn-a-original.keys.json")).unwrap();
    let config = ControlNetConfig::load(&repo_path("tests/fixtures/controlnets/cn-a/config.json")).unwrap();
    let map = KeyMap::controlnet(&config);
    for (original, diffusers) in &expected {
        let names: Vec<String> = map.to_diffusers(original).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![diffusers.clone()], "{original}");
    }
}

#[test]
fn original_controlnet_needs_a_base_and_the_right_keys() {
    let options = LoadOptions::default();
    let file = repo_path("tests/fixtures/controlnets/cn-a-original.safetensors");
    let err = load_controlnet(&file, &options, None).unwrap_err().to_string();
    assert!(err.contains("needs the base model"), "{err}");
    let unet =
        diffctl::models::unet::UNetConfig::load(&repo_path("tests/fixtures/models/sd1-tiny/unet/config.json")).unwrap();
    let not_cn = repo_path("tests/fixtures/models/sd1-tiny/unet/diffusion_pytorch_model.safetensors");
    let err = load_controlnet(&not_cn, &options, Some(&unet)).unwrap_err().to_string();
    assert!(err.contains("not a ControlNet"), "{err}");
}
