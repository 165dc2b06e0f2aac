//! The `diffctl generate` contract: a run from `--init-latents` reproduces diffusers, and bad input
//! gives one clear error line, a non-zero exit and no output file.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{copy_dir, diffctl, expect_error, load_fixture, max_abs_diff, repo_path};

const SD1: &str = "tests/fixtures/models/sd1-tiny";

fn write_latents(path: &Path, latents: &Tensor) {
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", latents.clone())]), path).unwrap();
}

/// Copies the sd1 fixture model into a temp folder so a test can break it.
fn copy_model(dir: &Path) -> PathBuf {
    let dst = dir.join("model");
    copy_dir(&repo_path(SD1), &dst);
    dst
}

#[test]
fn generate_from_init_latents_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = load_fixture("tests/fixtures/cases/sd1-ddim.safetensors");
    let init = dir.path().join("init.safetensors");
    write_latents(&init, &fixture["init_latents"]);
    let (png, latents) = (dir.path().join("out.png"), dir.path().join("out.safetensors"));
    let out = diffctl(&[
        "generate",
        "--model",
        repo_path(SD1).to_str().unwrap(),
        "--prompt",
        "a photo of a cat wearing a red hat, highly detailed",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--scheduler",
        "ddim",
        "--seed",
        "1",
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    common::assert_close("cli latents", &got["latents"], &fixture["latents"], 2e-3);
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (32, 32));
    let pixels = Tensor::from_vec(img.into_raw(), (1, 32, 32, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let err = max_abs_diff(&(pixels / 255.0).unwrap(), &fixture["image"]);
    assert!(err <= 3.0 / 255.0, "png max|diff| {err}");
}

#[test]
fn batch_writes_numbered_images_and_seed_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        let o = diffctl(&[
            "generate",
            "--model",
            repo_path(SD1).to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--width",
            "24",
            "--height",
            "16",
            "--batch",
            "2",
            "--seed",
            "7",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run("a.png");
    run("b.png");
    for i in 0..2 {
        let a = std::fs::read(dir.path().join(format!("a-{i}.png"))).unwrap();
        let b = std::fs::read(dir.path().join(format!("b-{i}.png"))).unwrap();
        assert_eq!(a, b, "same seed, same image");
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (24, 16));
    }
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    expect_error(&[], Path::new("/nonexistent/model"), "does not exist");
}

#[test]
fn missing_component_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    expect_error(&[], &model, "no `vae` component");
}

#[test]
fn malformed_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    std::fs::write(model.join("unet/config.json"), "{\"block_out_channels\": [16, 32,").unwrap();
    expect_error(&[], &model, "unet/config.json");
}

#[test]
fn unsupported_config_value_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.join("unet/config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"resnet_time_scale_shift\": \"default\"", "\"resnet_time_scale_shift\": \"scale_shift\"");
    std::fs::write(&path, text).unwrap();
    expect_error(&[], &model, "resnet_time_scale_shift");
}

fn rewrite_unet_weights(model: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_weight_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    rewrite_unet_weights(&model, |t| {
        t.remove("mid_block.attentions.0.proj_out.weight");
    });
    expect_error(&[], &model, "missing tensor `mid_block.attentions.0.proj_out.weight`");
}

#[test]
fn wrong_weight_shape_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    rewrite_unet_weights(&model, |t| {
        t.insert("conv_in.bias".into(), Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    expect_error(&[], &model, "`conv_in.bias` has shape [7], expected [8]");
}

#[test]
fn truncated_weights_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&[], &model, "diffusion_pytorch_model.safetensors");
}

#[test]
fn width_not_multiple_of_8_is_a_clear_error() {
    expect_error(&["--width", "30"], &repo_path(SD1), "multiple of 8");
}

#[test]
fn unknown_scheduler_is_a_clear_error() {
    expect_error(&["--scheduler", "heunn"], &repo_path(SD1), "heunn");
}

#[test]
fn init_latents_with_wrong_channels_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("bad.safetensors");
    write_latents(&init, &Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
    expect_error(&["--init-latents", init.to_str().unwrap()], &repo_path(SD1), "3 channels");
}

#[test]
fn deep_cache_interval_zero_is_a_clear_error() {
    expect_error(&["--deep-cache", "0"], &repo_path(SD1), "DeepCache interval");
}

#[test]
fn deep_cache_branch_past_the_deepest_is_a_clear_error() {
    expect_error(&["--deep-cache", "2", "--deep-cache-branch", "40"], &repo_path(SD1), "DeepCache branch 40");
}
