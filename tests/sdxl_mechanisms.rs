//! Mechanisms on SDXL: kohya LoRAs in the SGM naming, and (from tests/fixtures/sdxl/mechanisms)
//! ControlNet, T2I-Adapter, IP-Adapter, LoRA and textual inversion pipelines against diffusers.

mod common;

use std::collections::HashMap;

use candle_core::Device;
use common::repo_path;
use diffctl::control::residual::controlnet::ControlMode;
use diffctl::control::weights::Lora;
use diffctl::pipeline::{LoadOptions, StableDiffusion};

const MODEL: &str = "tests/fixtures/models/sdxl-tiny";

/// A kohya SDXL LoRA names UNet modules by the original SGM layout (`lora_unet_input_blocks_4_1_…`)
/// and the encoders `lora_te1_…`/`lora_te2_…`: every module resolves to the layer diffusers maps it
/// to, and gives the same deltas as the same LoRA in diffusers/PEFT format.
#[test]
fn kohya_sdxl_names_resolve_as_diffusers_maps_them() {
    let model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    let kohya =
        Lora::load(&repo_path("tests/fixtures/lora/sdxl-kohya.safetensors"), &model.layers, &Device::Cpu).unwrap();
    assert!(kohya.unmatched.is_empty(), "unmatched: {:?}", kohya.unmatched);
    let expected: HashMap<String, String> =
        diffctl::io::read_json(&repo_path("tests/fixtures/lora/sdxl-kohya.keys.json")).unwrap();
    // The fixture names the first encoder `text_encoder.*` as transformers 5 does; our layer paths
    // keep the public `text_model.` level.
    let mut wanted: Vec<String> = expected
        .values()
        .map(|p| match p.strip_prefix("text_encoder.").filter(|r| !r.starts_with("text_model.")) {
            Some(rest) => format!("text_encoder.text_model.{rest}"),
            None => match p.strip_prefix("text_encoder_2.").filter(|r| !r.starts_with("text_model.")) {
                Some(rest) => format!("text_encoder_2.text_model.{rest}"),
                None => p.clone(),
            },
        })
        .collect();
    wanted.sort();
    let mut got: Vec<String> = kohya.deltas.iter().map(|(p, _)| p.clone()).collect();
    got.sort();
    assert_eq!(got, wanted);

    let peft =
        Lora::load(&repo_path("tests/fixtures/lora/sdxl-peft.safetensors"), &model.layers, &Device::Cpu).unwrap();
    assert!(peft.unmatched.is_empty(), "unmatched: {:?}", peft.unmatched);
    let peft: HashMap<_, _> = peft.deltas.into_iter().collect();
    for (path, delta) in &kohya.deltas {
        let kind = model.layers.get(path).unwrap().kind();
        let a = delta.weight(&kind).unwrap();
        let b = peft.get(path).unwrap_or_else(|| panic!("{path} missing from the PEFT file")).weight(&kind).unwrap();
        let err = common::max_abs_diff(&a, &b);
        assert!(err <= 1e-5 * (1.0 + common::std_all(&a)), "{path}: {err}");
    }
}

/// A ControlNet, T2I-Adapter, IP-Adapter, LoRA or textual-inversion case on the tiny SDXL model
/// (tests/fixtures/sdxl/mechanism_cases.json).
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    steps: usize,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    batch: usize,
    width: usize,
    height: usize,
    #[serde(default)]
    controlnets: Vec<ControlNetCase>,
    #[serde(default)]
    guess_mode: bool,
    #[serde(default)]
    control_guidance_start: f64,
    #[serde(default = "one")]
    control_guidance_end: f64,
    #[serde(default)]
    adapters: Vec<ImageModelCase>,
    #[serde(default = "one")]
    adapter_conditioning_factor: f64,
    #[serde(default)]
    ip_adapters: Vec<IpAdapterCase>,
    #[serde(default)]
    ip_adapter_scale: Option<serde_json::Value>,
    #[serde(default)]
    loras: Vec<LoraCase>,
    #[serde(default)]
    lora_apply: Option<String>,
    #[serde(default)]
    embeddings: Vec<EmbeddingCase>,
    file: String,
    timesteps: Vec<f64>,
}

fn one() -> f64 {
    1.0
}

#[derive(serde::Deserialize)]
struct ControlNetCase {
    path: String,
    image: String,
    scale: f64,
}

#[derive(serde::Deserialize)]
struct ImageModelCase {
    path: String,
    image: String,
    scale: f64,
}

#[derive(serde::Deserialize)]
struct IpAdapterCase {
    path: String,
    image_encoder: String,
    images: Vec<String>,
}

#[derive(serde::Deserialize)]
struct LoraCase {
    path: String,
    scale: f64,
}

#[derive(serde::Deserialize)]
struct EmbeddingCase {
    path: String,
    token: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

/// The library request a user makes for `case`.
fn request(case: &Case) -> diffctl::request::Request {
    use diffctl::control::residual::controlnet::ControlNetSettings;
    use diffctl::control::weights::LoraMode;
    use diffctl::request::{ControlNetSpec, EmbeddingSpec, IpAdapterRequest, LoraSpec, Request, T2IAdapterSpec};
    let path = |p: &str| repo_path(p);
    let ip_scale = case.ip_adapter_scale.as_ref().map(|v| match v {
        serde_json::Value::Number(n) => n.to_string().parse().unwrap(),
        other => other.to_string().parse().unwrap(),
    });
    Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance: case.guidance,
        width: Some(case.width),
        height: Some(case.height),
        batch: case.batch,
        controlnets: case
            .controlnets
            .iter()
            .map(|c| ControlNetSpec {
                path: path(&c.path),
                image: path(&c.image),
                preprocess: None,
                settings: ControlNetSettings {
                    scale: c.scale,
                    start: case.control_guidance_start,
                    end: case.control_guidance_end,
                    mode: if case.guess_mode { ControlMode::Guess } else { ControlMode::Balanced },
                },
            })
            .collect(),
        t2i_adapters: case
            .adapters
            .iter()
            .map(|a| T2IAdapterSpec {
                path: path(&a.path),
                image: path(&a.image),
                preprocess: None,
                scale: a.scale,
                factor: case.adapter_conditioning_factor,
            })
            .collect(),
        ip_adapters: IpAdapterRequest {
            adapters: case.ip_adapters.iter().map(|a| path(&a.path)).collect(),
            image_encoders: case.ip_adapters.iter().map(|a| path(&a.image_encoder)).collect(),
            images: case.ip_adapters.iter().map(|a| a.images.iter().map(|i| path(i)).collect()).collect(),
            scales: ip_scale.into_iter().collect(),
            ..IpAdapterRequest::default()
        },
        loras: case.loras.iter().map(|l| LoraSpec { path: path(&l.path), scale: l.scale }).collect(),
        lora_mode: if case.lora_apply.as_deref() == Some("fuse_lora") { LoraMode::Fused } else { LoraMode::Unfused },
        strict_lora: true,
        embeddings: case
            .embeddings
            .iter()
            .map(|e| EmbeddingSpec { path: path(&e.path), token: Some(e.token.clone()) })
            .collect(),
        ..Request::default()
    }
}

#[test]
fn sdxl_mechanisms_match_diffusers() {
    use common::load_fixture;
    let cases = diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/sdxl/mechanism_cases.json")).unwrap().cases;
    let mut report = Vec::new();
    for case in &cases {
        // A fresh model per case: embeddings and LoRAs change it.
        let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
        let fixture = load_fixture(&case.file);
        let mut prepared = request(case)
            .prepare(&mut model, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{} ({}): {e}", case.name, case.kind));
        prepared.generate.init_latents = Some(fixture["init_latents"].clone());
        let r = common::replay_case(&case.name, &model, &mut prepared, &fixture);
        assert_eq!(r.steps, Some(case.timesteps.len()), "{}", case.name);
        report.push(format!("{:22} latents {:.2e}  image {:.2e}", case.name, r.latent_err, r.image_err));
    }
    eprintln!("{}", report.join("\n"));
}

/// An SD1.x/2.x mechanism on an SDXL model, and the reverse: one error naming both families.
#[test]
fn mechanisms_of_the_other_family_are_refused_by_name() {
    use diffctl::control::residual::controlnet::ControlNetSettings;
    use diffctl::request::{ControlNetSpec, IpAdapterRequest, LoraSpec, Request, T2IAdapterSpec};
    let settings = ControlNetSettings::default();
    let image = repo_path("tests/fixtures/images/control_a.png");
    for (model, files, loaded) in [
        ("sdxl-tiny", ["kohya.safetensors", "cn-a", "ip-adapter_tiny.safetensors", "full"], ("SDXL", "SD1.x/2.x")),
        (
            "sd1-tiny",
            ["sdxl-kohya.safetensors", "sdxl-cn-a", "ip-adapter_sdxl_tiny.safetensors", "sdxl-full-xl"],
            ("SD1.x/2.x", "SDXL"),
        ),
    ] {
        let mut m =
            StableDiffusion::load(&repo_path(&format!("tests/fixtures/models/{model}")), &LoadOptions::default())
                .unwrap();
        let base = Request { prompt: "x".into(), steps: 2, width: Some(32), height: Some(32), ..Request::default() };
        let requests = [
            Request {
                loras: vec![LoraSpec { path: repo_path(&format!("tests/fixtures/lora/{}", files[0])), scale: 1.0 }],
                ..base.clone()
            },
            Request {
                controlnets: vec![ControlNetSpec {
                    path: repo_path(&format!("tests/fixtures/controlnets/{}", files[1])),
                    image: image.clone(),
                    preprocess: None,
                    settings,
                }],
                ..base.clone()
            },
            Request {
                ip_adapters: IpAdapterRequest {
                    adapters: vec![repo_path(&format!("tests/fixtures/ip_adapter/{}", files[2]))],
                    image_encoders: vec![repo_path("tests/fixtures/ip_adapter/image_encoder")],
                    images: vec![vec![repo_path("tests/fixtures/images/astronaut.png")]],
                    ..Default::default()
                },
                ..base.clone()
            },
            Request {
                t2i_adapters: vec![T2IAdapterSpec {
                    path: repo_path(&format!("tests/fixtures/t2i-adapters/{}", files[3])),
                    image: image.clone(),
                    preprocess: None,
                    scale: 1.0,
                    factor: 1.0,
                }],
                ..base.clone()
            },
        ];
        for (request, file) in requests.into_iter().zip(files) {
            let err = match request.prepare(&mut m, &LoadOptions::default()) {
                Err(e) => e.to_string(),
                Ok(mut p) => m
                    .generate(&p.generate, &mut p.controls, &mut diffctl::noise::SeededNoise::new(0), &mut |_| {})
                    .err()
                    .unwrap_or_else(|| panic!("{file} on {model} should fail"))
                    .to_string(),
            };
            assert!(err.contains(file), "{err}");
            assert!(err.contains(loaded.0), "{file} on {model} should name {}: {err}", loaded.0);
            // The IP-Adapter's own family shows only in its width (the tiny fixtures have no real one).
            if !file.starts_with("ip-adapter") {
                assert!(err.contains(loaded.1), "{file} on {model} should name {}: {err}", loaded.1);
            }
        }
    }
}

/// DeepCache on SDXL against its own helper (`DeepCacheSDHelper`, interval 2) on diffusers'
/// StableDiffusionXLPipeline, case `sdxl-default`, resuming at every skip connection of the tiny
/// UNet (tools/fixtures/make_deep_cache_fixtures.py).
#[test]
fn deep_cache_on_sdxl_matches_the_deepcache_helper_at_every_branch() {
    let cases: serde_json::Value = diffctl::io::read_json(&repo_path("tests/fixtures/sdxl/cases.json")).unwrap();
    let case = cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == "sdxl-default").unwrap();
    let fixture = common::load_fixture("tests/fixtures/deep_cache_sdxl.safetensors");
    let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    let skips = model.unet.num_skips();
    let base = diffctl::request::Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(Into::into),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        ..diffctl::request::Request::default()
    };
    let mut run = |deep_cache: Option<(usize, usize)>| {
        let request = diffctl::request::Request { deep_cache, ..base.clone() };
        let mut prepared = request.prepare(&mut model, &LoadOptions::default()).unwrap();
        prepared.generate.init_latents = Some(fixture["init_latents"].clone());
        let noise = &mut common::ReplayNoise(Vec::new());
        model.generate(&prepared.generate, &mut prepared.controls, noise, &mut |_| {}).unwrap().latents
    };
    common::assert_close("SDXL exact", &run(None), &fixture["exact"], 2e-3);
    assert_eq!(skips, 4);
    for branch in 0..skips {
        let expected = &fixture[&format!("branch{branch}")];
        assert!(common::max_abs_diff(expected, &fixture["exact"]) > 0.1, "branch {branch}: must differ from exact");
        common::assert_close(&format!("SDXL DeepCache branch {branch}"), &run(Some((2, branch))), expected, 1e-4);
    }
}
