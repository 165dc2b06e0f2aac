//! CLIP vision encoder and CLIPImageProcessor parity with transformers (fixtures from
//! tools/fixtures/make_ip_adapter_fixtures.py).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_fixture, max_abs_diff, repo_path};
use diffctl::io::image::load_rgb;
use diffctl::models::clip_vision::{ClipVisionConfig, ClipVisionEncoder};
use diffctl::models::image_processor::ClipImageProcessor;

const ENCODER: &str = "tests/fixtures/ip_adapter/image_encoder";
const UNITS: &str = "tests/fixtures/ip_adapter/units.safetensors";

fn photos() -> Vec<image::RgbImage> {
    ["astronaut", "coffee"]
        .iter()
        .map(|n| load_rgb(&repo_path(&format!("tests/fixtures/images/{n}.png"))).unwrap())
        .collect()
}

fn pixel_values(processor: &ClipImageProcessor) -> Tensor {
    let each: Vec<Tensor> = photos().iter().map(|img| processor.preprocess(img, &Device::Cpu).unwrap()).collect();
    Tensor::cat(&each, 0).unwrap()
}

#[test]
fn preprocessing_matches_transformers_pil_backend() {
    let units = load_fixture(UNITS);
    let processor = ClipImageProcessor::load(&repo_path(ENCODER).join("preprocessor_config.json")).unwrap();
    assert_eq!(processor, ClipImageProcessor::for_image_size(32), "the saved config is diffusers' default");
    let err = max_abs_diff(&pixel_values(&processor), &units["clip.pixel_values"]);
    eprintln!("pixel_values (bicubic 128x128 and 144x96 → 32x32): max|diff| {err:.2e}");
    assert!(err <= 1e-6, "pixel values differ by {err}");
    for alt in ["preprocessor_alt1", "preprocessor_alt2"] {
        let processor = ClipImageProcessor::load(&repo_path(&format!("tests/fixtures/ip_adapter/{alt}.json"))).unwrap();
        for (img, name) in photos().iter().zip(["astronaut", "coffee"]) {
            let got = processor.preprocess(img, &Device::Cpu).unwrap();
            let want = &units[&format!("{alt}.{name}")];
            let err = max_abs_diff(&got, want);
            eprintln!("{alt} {name} {:?}: max|diff| {err:.2e}", want.dims());
            assert!(err <= 1e-6, "{alt} {name}: pixel values differ by {err}");
        }
    }
}

fn check_outputs(encoder: &ClipVisionEncoder, units: &HashMap<String, Tensor>, what: &str) {
    let out = encoder.forward(&units["clip.pixel_values"]).unwrap();
    assert_close(&format!("{what} image_embeds"), &out.image_embeds, &units["clip.image_embeds"], 2e-5);
    assert_close(&format!("{what} hidden_states[-2]"), &out.penultimate, &units["clip.penultimate"], 2e-5);
    let zeros = encoder.forward(&units["clip.pixel_values"].zeros_like().unwrap()).unwrap();
    assert_close(
        &format!("{what} zero image hidden_states[-2]"),
        &zeros.penultimate,
        &units["clip.zero_penultimate"],
        2e-5,
    );
}

#[test]
fn encoder_matches_transformers() {
    let units = load_fixture(UNITS);
    let encoder = ClipVisionEncoder::from_dir(&repo_path(ENCODER), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(encoder.config().num_tokens(), 17);
    check_outputs(&encoder, &units, "clip vision");
}

/// Copies the encoder folder with its keys rewritten by `rename` and its config by `config`.
fn rewritten(dir: &Path, rename: impl Fn(&str) -> String, config: impl Fn(serde_json::Value) -> serde_json::Value) {
    let src = repo_path(ENCODER);
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    std::fs::write(dir.join("config.json"), config(json).to_string()).unwrap();
}

#[test]
fn flat_keys_and_nested_clip_config_load() {
    let units = load_fixture(UNITS);
    let dir = tempfile::tempdir().unwrap();
    // Keys without the `vision_model.` prefix, and a CLIPConfig whose vision part lacks projection_dim.
    rewritten(
        dir.path(),
        |k| k.strip_prefix("vision_model.").unwrap_or(k).to_string(),
        |mut vision| {
            let projection = vision.as_object_mut().unwrap().remove("projection_dim").unwrap();
            serde_json::json!({"model_type": "clip", "projection_dim": projection, "vision_config": vision})
        },
    );
    let config = ClipVisionConfig::load(&dir.path().join("config.json")).unwrap();
    assert_eq!(config.projection_dim(), 32);
    let encoder = ClipVisionEncoder::from_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    check_outputs(&encoder, &units, "flat keys");
}

#[test]
fn bad_encoder_folders_are_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipVisionEncoder::from_dir(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
    rewritten(
        dir.path(),
        |k| k.to_string(),
        |mut c| {
            c["hidden_size"] = 48.into();
            c["num_attention_heads"] = 4.into();
            c
        },
    );
    let err = ClipVisionEncoder::from_dir(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model.safetensors") && err.contains("[48"), "{err}");
    let encoder = ClipVisionEncoder::from_dir(&repo_path(ENCODER), DType::F32, &Device::Cpu).unwrap();
    let err = encoder.forward(&Tensor::zeros((1, 3, 24, 24), DType::F32, &Device::Cpu).unwrap()).err().unwrap();
    assert!(err.to_string().contains("[B, 3, 32, 32]"), "{err}");
}
