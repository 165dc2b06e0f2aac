//! `--vae`: a VAE folder or file replacing the model's (diffusers folder, original-layout file with
//! or without the `first_stage_model.` prefix, diffusers-named file), for SD1 and SDXL models.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{ReplayNoise, load_fixture, max_abs_diff, repo_path};
use diffctl::io::model_files::SourceOptions;
use diffctl::pipeline::{LoadOptions, StableDiffusion};

/// The decoded image of pipeline case `name` (tests/fixtures/cases.json) with `vae` replacing the
/// model's VAE.
fn image_with_vae(name: &str, vae: Option<&Path>) -> candle_core::Tensor {
    let case = common::pipeline_cases().into_iter().find(|c| c.name == name).unwrap();
    let options = LoadOptions {
        files: SourceOptions { vae: vae.map(Path::to_path_buf), ..Default::default() },
        ..LoadOptions::default()
    };
    let model = StableDiffusion::load(&repo_path(&case.model), &options).unwrap();
    let fixture = load_fixture(&case.file);
    let out = model.generate(&case.request(&fixture), &mut [], &mut ReplayNoise::from_fixture(&fixture), &mut |_| {});
    out.unwrap().images
}

/// Writes the tensors of `file` whose keys start with `prefix` (stripped when `strip`) to `out`.
fn extract(file: &Path, prefix: &str, strip: bool, out: &Path) {
    let all = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let part: HashMap<String, candle_core::Tensor> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (if strip { k[prefix.len()..].to_string() } else { k }, v))
        .collect();
    assert!(!part.is_empty());
    candle_core::safetensors::save(&part, out).unwrap();
}

#[test]
fn a_vae_from_a_folder_or_a_file_replaces_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let plain = image_with_vae("sd1-euler", None);
    // The model's own VAE as a folder and as a diffusers-named file.
    let folder = repo_path("tests/fixtures/models/sd1-tiny/vae");
    assert_eq!(max_abs_diff(&image_with_vae("sd1-euler", Some(&folder)), &plain), 0.0);
    let file = folder.join("diffusion_pytorch_model.safetensors");
    assert_eq!(max_abs_diff(&image_with_vae("sd1-euler", Some(&file)), &plain), 0.0);
    // In the original layout, with and without the checkpoint prefix (from `convert`'s output).
    let single = dir.path().join("sd1.safetensors");
    let o = common::diffctl(&["convert", "tests/fixtures/models/sd1-tiny", single.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (strip, name) in [(true, "vae-bare.safetensors"), (false, "vae-prefixed.safetensors")] {
        let vae = dir.path().join(name);
        extract(&single, "first_stage_model.", strip, &vae);
        assert_eq!(max_abs_diff(&image_with_vae("sd1-euler", Some(&vae)), &plain), 0.0, "{name}");
    }
}

#[test]
fn sdxl_takes_an_original_layout_vae() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("sdxl_vae.safetensors");
    extract(&repo_path("tests/fixtures/models/sdxl-tiny.safetensors"), "first_stage_model.", true, &vae);
    let model = |vae: Option<&Path>| {
        let options = LoadOptions {
            files: SourceOptions { vae: vae.map(Path::to_path_buf), ..Default::default() },
            ..LoadOptions::default()
        };
        StableDiffusion::load(&repo_path("tests/fixtures/models/sdxl-tiny"), &options).unwrap()
    };
    let (plain, swapped) = (model(None), model(Some(&vae)));
    // SDXL's scaling factor is kept from the model's own config.
    assert_eq!(swapped.vae.config().scaling_factor, 0.13025);
    let latents = candle_core::Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &candle_core::Device::Cpu).unwrap();
    let a = plain.vae.decode_to_unit_range(&latents).unwrap();
    let b = swapped.vae.decode_to_unit_range(&latents).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
}

#[test]
fn a_file_that_is_not_a_vae_is_refused() {
    let options = LoadOptions {
        files: SourceOptions { vae: Some(repo_path("tests/fixtures/lora/kohya.safetensors")), ..Default::default() },
        ..LoadOptions::default()
    };
    let err = StableDiffusion::load(&repo_path("tests/fixtures/models/sd1-tiny"), &options).err().unwrap().to_string();
    assert!(err.contains("kohya.safetensors") && err.contains("not a VAE"), "{err}");
}
