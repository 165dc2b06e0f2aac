//! Resource bombs refused up front and garbage numbers refused instead of a black image: each case
//! gives one clear error line and writes nothing.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, expect_error, repo_path};

const SD1: &str = "tests/fixtures/models/sd1-tiny";

fn model() -> PathBuf {
    repo_path(SD1)
}

/// A copy of the tiny model with `edit` applied to the JSON config `file` (relative to the model).
fn model_with_config(dir: &Path, file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model = dir.join("model");
    copy_dir(&repo_path(SD1), &model);
    let path = model.join(file);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    model
}

#[test]
fn sizes_and_batches_over_the_limits_are_refused_before_loading() {
    expect_error(&["--width", "20000", "--height", "20000"], &model(), "--max-pixels");
    expect_error(&["--width", "18446744073709551608", "--height", "8"], &model(), "--max-pixels");
    expect_error(&["--batch", "1000000"], &model(), "--max-batch");
    expect_error(&["--batch", "18446744073709551615"], &model(), "--max-batch");
    expect_error(&["--width", "64", "--height", "64", "--max-pixels", "1000"], &model(), "over the limit of 1000");
    expect_error(&["--max-memory", "0.000001"], &model(), "--max-memory");
    expect_error(&["--max-memory", "NaN"], &model(), "--max-memory NaN");
}

#[test]
fn hostile_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = model_with_config(dir.path(), "unet/config.json", |c| c["sample_size"] = 100000.into());
    expect_error(&[], &big, "--max-pixels");
    let dir = tempfile::tempdir().unwrap();
    let steps = model_with_config(dir.path(), "scheduler/scheduler_config.json", |c| {
        c["num_train_timesteps"] = 2_000_000_000u64.into()
    });
    expect_error(&[], &steps, "num_train_timesteps");
    let dir = tempfile::tempdir().unwrap();
    let zero = model_with_config(dir.path(), "vae/config.json", |c| c["scaling_factor"] = 0.0.into());
    expect_error(&[], &zero, "scaling_factor 0");
}

#[test]
fn non_finite_and_diverging_numbers_are_refused() {
    expect_error(&["--guidance", "inf"], &model(), "guidance inf");
    expect_error(&["--guidance", "NaN"], &model(), "guidance NaN");
    expect_error(&["--guidance", "1e308"], &model(), "NaN or infinite");
    let lora = repo_path("tests/fixtures/lora/kohya.safetensors").display().to_string();
    expect_error(&["--lora", &format!("{lora}:1e308")], &model(), "NaN or infinite");
    expect_error(&["--lora", &format!("{lora}:inf")], &model(), "not a finite number");
}

/// A copy of the kohya fixture with the first alpha (or weight) replaced by `value`.
fn lora_with(dir: &Path, suffix: &str, value: f32) -> PathBuf {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(repo_path("tests/fixtures/lora/kohya.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<String> = tensors.keys().filter(|k| k.ends_with(suffix)).cloned().collect();
    keys.sort();
    let key = keys.first().unwrap_or_else(|| panic!("no key ends with {suffix}")).clone();
    let t = &tensors[&key];
    let poisoned = (t.to_dtype(DType::F32).unwrap().zeros_like().unwrap() + value as f64).unwrap();
    tensors.insert(key, poisoned);
    let path = dir.join(format!("poisoned{suffix}.safetensors"));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn loras_holding_nan_or_infinity_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nan_alpha = lora_with(dir.path(), ".alpha", f32::NAN);
    expect_error(&["--lora", nan_alpha.to_str().unwrap()], &model(), "NaN or infinite");
    let inf_weight = lora_with(dir.path(), ".lora_up.weight", f32::INFINITY);
    expect_error(&["--lora", inf_weight.to_str().unwrap()], &model(), "NaN or infinite");
}

#[test]
fn init_latents_with_nothing_to_generate_or_too_large_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, shape: &[usize]| {
        let path = dir.path().join(name);
        let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("latents", t)]), &path).unwrap();
        path
    };
    let empty = write("empty.safetensors", &[0, 4, 4, 4]);
    expect_error(&["--init-latents", empty.to_str().unwrap()], &model(), "[0, 4, 4, 4]");
    let huge = write("huge.safetensors", &[1, 4, 3000, 3000]);
    expect_error(&["--init-latents", huge.to_str().unwrap()], &model(), "--max-pixels");
}

/// An error with context ("loading ControlNet …: cause") prints its cause once.
#[test]
fn errors_with_context_print_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let cn = dir.path().join("cn");
    copy_dir(&repo_path("tests/fixtures/controlnets/cn-a"), &cn);
    let path = cn.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["conditioning_embedding_out_channels"] = serde_json::json!([7, 8]);
    std::fs::write(&path, config.to_string()).unwrap();
    let image = repo_path("tests/fixtures/images/control_a.png");
    let out = common::diffctl(&[
        "generate",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--controlnet",
        cn.to_str().unwrap(),
        "--control-image",
        image.to_str().unwrap(),
        "--output",
        dir.path().join("o.png").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("loading ControlNet"), "{stderr}");
    assert_eq!(stderr.matches("controlnet_cond_embedding").count(), 1, "{stderr}");
}
