//! IP-Adapter parity with diffusers' `load_ip_adapter` pipelines on the tiny SD1 model (fixtures from
//! tools/fixtures/make_ip_adapter_fixtures.py), and its bad-input paths through the CLI.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_fixture, max_abs_diff, repo_path, std_all};
use diffctl::control::Control;
use diffctl::control::cross_attention::ip_adapter::read_embedding_file;
use diffctl::control::cross_attention::{ImagePromptEmbeds, IpAdapter, IpAdapterWeights, IpScale, RegionMask};
use diffctl::io::image::load_rgb;
use diffctl::models::clip_vision::ClipVisionEncoder;
use diffctl::models::image_processor::ClipImageProcessor;
use diffctl::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use diffctl::schedulers::{NoiseSource, SchedulerKind};

const SD1: &str = "tests/fixtures/models/sd1-tiny";
const DIR: &str = "tests/fixtures/ip_adapter";
const ENCODER: &str = "tests/fixtures/ip_adapter/image_encoder";

#[derive(serde::Deserialize)]
struct Cases {
    cross_attention_layers: Vec<String>,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    adapters: Vec<String>,
    images: Vec<Vec<String>>,
    scale: serde_json::Value,
    #[serde(default)]
    masks: Vec<Option<Vec<String>>>,
    face_embedding: Option<String>,
    embeds_file: Option<String>,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    file: String,
}

fn cases() -> Cases {
    diffctl::io::read_json(&repo_path(&format!("{DIR}/cases.json"))).unwrap()
}

/// DDIM with eta 0 draws no noise.
struct NoNoise;

impl NoiseSource for NoNoise {
    fn sample(&mut self, _shape: &[usize], _device: &Device) -> diffctl::Result<Tensor> {
        panic!("DDIM draws no noise")
    }
}

/// The scale of adapter `i` as the case gives it (one value for all, or a list with one per adapter).
fn scale_of(case: &Case, i: usize) -> IpScale {
    let value = match &case.scale {
        serde_json::Value::Array(list) => &list[i],
        v => v,
    };
    value.to_string().parse().unwrap()
}

fn encoder() -> (ClipVisionEncoder, ClipImageProcessor) {
    let encoder = ClipVisionEncoder::from_dir(&repo_path(ENCODER), DType::F32, &Device::Cpu).unwrap();
    let processor = ClipImageProcessor::load(&repo_path(ENCODER).join("preprocessor_config.json")).unwrap();
    (encoder, processor)
}

/// The case's controls, built through the library (FaceID LoRAs attached to `model`);
/// `from_embeds_file` reads the projection inputs from the case's diffusers `ip_adapter_image_embeds`
/// file, `ext` swaps the adapter files' extension.
fn controls(model: &StableDiffusion, case: &Case, from_embeds_file: bool, ext: &str) -> Vec<Box<dyn Control>> {
    let (encoder, processor) = encoder();
    let mut images = case.images.iter();
    case.adapters
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let path = repo_path(file).with_extension(ext);
            // A FaceID adapter's control attaches its LoRA itself while it acts.
            let weights = IpAdapterWeights::load(&path, model.unet.config(), DType::F32, &Device::Cpu).unwrap();
            let input = weights.projection().input();
            let embeds = if from_embeds_file {
                let t = read_embedding_file(&repo_path(case.embeds_file.as_ref().unwrap()), &Device::Cpu).unwrap();
                ImagePromptEmbeds::from_diffusers(&t, input).unwrap()
            } else if let Some(face) = &case.face_embedding {
                ImagePromptEmbeds::from_face_embeddings(&read_embedding_file(&repo_path(face), &Device::Cpu).unwrap())
                    .unwrap()
            } else {
                let pictures: Vec<_> =
                    images.next().unwrap().iter().map(|p| load_rgb(&repo_path(p)).unwrap()).collect();
                ImagePromptEmbeds::from_images(&pictures, &encoder, &processor, input).unwrap()
            };
            let masks = case
                .masks
                .get(i)
                .cloned()
                .flatten()
                .map(|files| files.iter().map(|f| RegionMask::load(&repo_path(f)).unwrap()).collect::<Vec<_>>());
            Box::new(IpAdapter::new(&weights, &embeds, &scale_of(case, i), masks).unwrap()) as Box<dyn Control>
        })
        .collect()
}

fn run(model: &StableDiffusion, case: &Case, mut controls: Vec<Box<dyn Control>>) -> (Tensor, Tensor) {
    let fixture = load_fixture(&case.file);
    let request = GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance: case.guidance,
        scheduler: Some(SchedulerKind::Ddim),
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
    let out = model.generate(&request, &mut controls, &mut NoNoise, &mut |_| {}).unwrap();
    (out.latents, out.images.permute((0, 2, 3, 1)).unwrap())
}

fn check(case: &Case, latents: &Tensor, image: &Tensor, what: &str) -> String {
    let fixture = load_fixture(&case.file);
    let latent_err = assert_close(&format!("{what} latents"), latents, &fixture["latents"], 2e-3);
    let image_err = max_abs_diff(image, &fixture["image"]);
    assert!(image_err <= 2.0 / 255.0, "{what}: image max|diff| {image_err}");
    format!("{what:28} latents {latent_err:.2e}  image {image_err:.2e}")
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&repo_path(SD1), &LoadOptions::default()).unwrap()
}

#[test]
fn cross_attention_layers_follow_diffusers_attn_processors_order() {
    let ids: Vec<String> = model().unet.config().cross_attention_layers().into_iter().map(|l| l.id).collect();
    assert_eq!(ids, cases().cross_attention_layers);
}

#[test]
fn pipeline_matches_diffusers_for_every_case() {
    let model = model();
    let mut report = Vec::new();
    for case in &cases().cases {
        let mut variants = vec![(false, "safetensors", case.name.clone())];
        if case.embeds_file.is_some() {
            variants.push((true, "safetensors", format!("{} (embeds file)", case.name)));
        }
        if case.name == "ip-base" {
            variants.push((false, "bin", format!("{} (.bin adapter)", case.name)));
        }
        for (from_embeds, ext, what) in variants {
            let controls = controls(&model, case, from_embeds, ext);
            let (latents, image) = run(&model, case, controls);
            report.push(check(case, &latents, &image, &what));
            // A FaceID control owns its LoRA: nothing stays attached once the generation is over.
            assert!(model.lora_names().is_empty(), "{what}: LoRAs left attached: {:?}", model.lora_names());
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn projections_match_diffusers() {
    let units = load_fixture(&format!("{DIR}/units.safetensors"));
    let unet = model().unet.config().clone();
    for (kind, file, input) in [
        ("base", "ip-adapter_tiny", "clip.image_embeds"),
        ("plus", "ip-adapter-plus_tiny", "clip.penultimate"),
        ("full", "ip-adapter-full-face_tiny", "clip.penultimate"),
        ("faceid", "ip-adapter-faceid_tiny", "face_embedding"),
    ] {
        let path = repo_path(&format!("{DIR}/{file}.safetensors"));
        let weights = IpAdapterWeights::load(&path, &unet, DType::F32, &Device::Cpu).unwrap();
        let x = &units[input];
        let x = if kind == "faceid" { x.unsqueeze(0).unwrap() } else { x.clone() };
        let tokens = weights.projection().forward(&x).unwrap();
        assert_close(&format!("{kind} image tokens"), &tokens, &units[&format!("proj.{kind}")], 2e-5);
    }
}

#[test]
fn masks_match_ip_adapter_mask_processor() {
    let units = load_fixture(&format!("{DIR}/units.safetensors"));
    let left = RegionMask::load(&repo_path(&format!("{DIR}/mask_left.png"))).unwrap();
    let right = RegionMask::load(&repo_path(&format!("{DIR}/mask_right.png"))).unwrap();
    let pre = &units["mask.preprocessed"];
    for (i, mask) in [&left, &right].into_iter().enumerate() {
        let want = pre.get(i).unwrap().flatten_all().unwrap();
        let got = mask.downsample(32 * 32, &Device::Cpu).unwrap().flatten_all().unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "mask {i} binarisation");
    }
    for q in [256, 64, 16, 48, 10, 7] {
        let got = left.downsample(q, &Device::Cpu).unwrap().flatten_all().unwrap();
        let err = max_abs_diff(&got, &units[&format!("mask.left.down{q}")]);
        assert!(err <= 1e-6, "downsample to {q} queries: max|diff| {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

fn diffctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffctl")).args(args).output().expect("run diffctl")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `diffctl generate` for `case` with extra flags; returns the output and the PNG path.
fn generate(case: &Case, dir: &Path, extra: &[String]) -> (std::process::Output, PathBuf) {
    let fixture = load_fixture(&case.file);
    let init = dir.join("init.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents", fixture["init_latents"].clone())]), &init).unwrap();
    let png = dir.join("out.png");
    let mut args: Vec<String> = [
        "generate",
        "--model",
        s(&repo_path(SD1)),
        "--prompt",
        &case.prompt,
        "--steps",
        &case.steps.to_string(),
        "--guidance",
        &case.guidance.to_string(),
        "--scheduler",
        "ddim",
        "--init-latents",
        s(&init),
        "--output",
        s(&png),
        "--output-latents",
        s(&dir.join("out.safetensors")),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if let Some(neg) = &case.negative_prompt {
        args.extend(["--negative-prompt".into(), neg.clone()]);
    }
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (diffctl(&args), png)
}

/// The IP-Adapter flags that reproduce `case`; with `embeds`, from its `ip_adapter_image_embeds` file.
fn case_flags(case: &Case, embeds: bool) -> Vec<String> {
    let mut flags = vec!["--image-encoder".to_string(), s(&repo_path(ENCODER)).to_string()];
    for (i, adapter) in case.adapters.iter().enumerate() {
        flags.extend(["--ip-adapter".into(), s(&repo_path(adapter)).into()]);
        if embeds {
            flags.extend(["--ip-image-embeds".into(), s(&repo_path(case.embeds_file.as_ref().unwrap())).into()]);
        } else if let Some(face) = &case.face_embedding {
            flags.extend(["--ip-face-embedding".into(), s(&repo_path(face)).into()]);
        } else {
            let list: Vec<String> = case.images[i].iter().map(|p| s(&repo_path(p)).to_string()).collect();
            flags.extend(["--ip-image".into(), list.join(",")]);
        }
        let scale = match &case.scale {
            serde_json::Value::Array(list) => list[i].to_string(),
            v => v.to_string(),
        };
        flags.extend(["--ip-scale".into(), scale]);
        if !case.masks.is_empty() {
            let mask = match &case.masks[i] {
                Some(files) => files.iter().map(|p| s(&repo_path(p)).to_string()).collect::<Vec<_>>().join(","),
                None => "none".into(),
            };
            flags.extend(["--ip-mask".into(), mask]);
        }
    }
    flags
}

fn case(name: &str) -> Case {
    cases().cases.into_iter().find(|c| c.name == name).unwrap()
}

#[test]
fn cli_reproduces_masks_per_block_scales_faceid_and_embeds_files() {
    for (name, embeds) in [("ip-two-masks", false), ("ip-style", false), ("ip-faceid", false), ("ip-plus-batch2", true)]
    {
        let case = case(name);
        let dir = tempfile::tempdir().unwrap();
        let (out, png) = generate(&case, dir.path(), &case_flags(&case, embeds));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(png.is_file() || dir.path().join("out-0.png").is_file());
        let got = candle_core::safetensors::load(dir.path().join("out.safetensors"), &Device::Cpu).unwrap();
        assert_close(&format!("cli {name} latents"), &got["latents"], &load_fixture(&case.file)["latents"], 2e-3);
    }
}

/// Writes a copy of the base adapter with `edit` applied to its tensors.
/// `--dtype bf16` on the CPU: the image encoder, the image projection and the extra key/value streams
/// run with f32 activations like the rest of the model (bf16 products where the CPU has them). Latents
/// within 0.1 per unit of guidance, × max(1, std), between tests/checkpoints.rs's bf16 bounds (which
/// stay under diffusers' own bf16 error).
#[test]
fn cli_runs_in_bf16() {
    for (name, embeds) in [("ip-two-masks", false), ("ip-faceid", false), ("ip-plus-batch2", true)] {
        let case = case(name);
        let dir = tempfile::tempdir().unwrap();
        let mut flags = case_flags(&case, embeds);
        flags.extend(["--dtype".to_string(), "bf16".to_string()]);
        let (out, _) = generate(&case, dir.path(), &flags);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let saved = candle_core::safetensors::load(dir.path().join("out.safetensors"), &Device::Cpu).unwrap();
        let expected = &load_fixture(&case.file)["latents"];
        let err =
            max_abs_diff(&saved["latents"], expected) / std_all(expected).max(1.0) / case.guidance.max(1.0) as f32;
        assert!(err <= 0.1, "{name}: bf16 latent error {err} per unit of guidance");
    }
}

fn edited_adapter(dir: &Path, name: &str, edit: impl Fn(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(repo_path(&format!("{DIR}/ip-adapter_tiny.safetensors")), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let path = dir.join(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// Runs the ip-base case with `flags` replacing its IP-Adapter flags; asserts a clean failure
/// mentioning every one of `expected` and returns stderr.
fn fails(dir: &Path, flags: &[String], expected: &[&str]) -> String {
    let (out, png) = generate(&case("ip-base"), dir, flags);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure for {flags:?}");
    assert!(!png.exists() && !dir.join("out.safetensors").exists(), "output written despite the error");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks `{e}`: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    eprintln!("{}", stderr.trim());
    stderr
}

fn flags(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs.iter().flat_map(|(f, v)| [f.to_string(), v.to_string()]).collect()
}

#[test]
fn cli_bad_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let encoder = repo_path(ENCODER);
    let astronaut = repo_path("tests/fixtures/images/astronaut.png");
    let base = repo_path(&format!("{DIR}/ip-adapter_tiny.safetensors"));
    let plus = repo_path(&format!("{DIR}/ip-adapter-plus_tiny.safetensors"));
    let with = |adapter: &Path, extra: &[(&str, &str)]| {
        let mut all =
            vec![("--ip-adapter", s(adapter)), ("--image-encoder", s(&encoder)), ("--ip-image", s(&astronaut))];
        all.extend_from_slice(extra);
        flags(&all)
    };

    // Token width against the UNet's cross_attention_dim: 48-wide tokens.
    let wide = edited_adapter(d, "wide.safetensors", |t| {
        let g = |shape: &[usize]| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
        t.insert("image_proj.proj.weight".into(), g(&[4 * 48, 32]));
        t.insert("image_proj.proj.bias".into(), g(&[4 * 48]));
        t.insert("image_proj.norm.weight".into(), g(&[48]));
        t.insert("image_proj.norm.bias".into(), g(&[48]));
    });
    fails(d, &with(&wide, &[]), &["wide.safetensors", "48 wide", "cross_attention_dim is 32"]);

    // Token width against the image encoder: the base projection reads 64-wide image embeddings.
    let narrow = edited_adapter(d, "reads64.safetensors", |t| {
        t.insert("image_proj.proj.weight".into(), Tensor::ones((4 * 32, 64), DType::F32, &Device::Cpu).unwrap());
    });
    fails(d, &with(&narrow, &[]), &["reads64.safetensors", "width 64", "image encoder", "projection_dim"]);

    // Layer count: drop the last layer's weights.
    let short = edited_adapter(d, "short.safetensors", |t| {
        t.remove("ip_adapter.21.to_k_ip.weight");
        t.remove("ip_adapter.21.to_v_ip.weight");
    });
    fails(d, &with(&short, &[]), &["short.safetensors", "10 cross-attention layers", "the UNet has 11"]);

    // Missing image encoder.
    fails(d, &flags(&[("--ip-adapter", s(&plus)), ("--ip-image", s(&astronaut))]), &["Plus", "--image-encoder"]);

    // Unreadable image, and a missing one.
    let garbage = d.join("garbage.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    let stderr = fails(
        d,
        &flags(&[("--ip-adapter", s(&base)), ("--image-encoder", s(&encoder)), ("--ip-image", s(&garbage))]),
        &["garbage.png"],
    );
    assert!(stderr.contains("image"), "{stderr}");
    fails(
        d,
        &flags(&[("--ip-adapter", s(&base)), ("--image-encoder", s(&encoder)), ("--ip-image", "/nonexistent.png")]),
        &["/nonexistent.png"],
    );

    // Masks: two for one image, and one of the wrong size.
    let left = repo_path(&format!("{DIR}/mask_left.png"));
    let two = format!("{},{}", s(&left), s(&left));
    fails(d, &with(&base, &[("--ip-mask", &two)]), &["2 mask(s) for 1 prompt image(s)"]);
    let small = d.join("small_mask.png");
    image::RgbImage::new(16, 16).save(&small).unwrap();
    fails(d, &with(&base, &[("--ip-mask", s(&small))]), &["small_mask.png", "16x16", "32x32"]);

    // Flags that do not pair up.
    fails(d, &flags(&[("--ip-image", s(&astronaut))]), &["--ip-image was given without --ip-adapter"]);
    fails(d, &with(&base, &[("--ip-scale", "{\"up\": {\"block_0\": 1.0}}")]), &["up.block_0", "no attention layers"]);
    fails(d, &with(&base, &[("--ip-scale", "strong")]), &["strong"]);
    // A .bin that is not a PyTorch archive.
    let bad_bin = d.join("adapter.bin");
    std::fs::write(&bad_bin, b"PK\x03\x04 truncated").unwrap();
    fails(d, &with(&bad_bin, &[]), &["adapter.bin"]);
}
