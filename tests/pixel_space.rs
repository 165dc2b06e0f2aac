//! Pixel-space models (a diffusers folder whose `model_index.json` lists no VAE, as the embedded
//! emoji model is): generation against diffusers' pipeline run with `vae=None`, and
//! `diffctl train full` writing a folder that loads again. The fixture is
//! `tools/emoji/make_initial_model.py --tiny`.

mod common;

use std::path::Path;

use common::{assert_close, diffctl, load_fixture, repo_path};

const MODEL: &str = "tests/fixtures/models/pixel-tiny";

/// DDIM with guidance from stored noise: the final images match diffusers' `output_type="latent"`.
#[test]
fn pixel_space_generation_matches_diffusers() {
    let out = tempfile::tempdir().unwrap();
    let (png, latents) = (out.path().join("a.png"), out.path().join("a.safetensors"));
    let fixture = "tests/fixtures/models/pixel-tiny-generation.safetensors";
    let run = diffctl(&[
        "generate",
        "--model",
        repo_path(MODEL).to_str().unwrap(),
        "--prompt",
        "smiling cat with heart eyes",
        "--negative-prompt",
        "red apple",
        "--steps",
        "4",
        "--guidance",
        "3",
        "--init-latents",
        repo_path(fixture).to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected = &load_fixture(fixture)["expected"];
    let ours = &load_fixture(latents.to_str().unwrap())["latents"];
    assert_close("pixel-space DDIM with guidance", ours, expected, 1e-4);
    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (16, 16), "the image is the latents' size");
}

/// Two captioned SVGs (the emoji data's format) in a fresh folder.
fn svg_data() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, colour, caption) in [("apple", "#e33", "red apple"), ("medal", "#fc2", "1st place medal")] {
        std::fs::write(
            dir.path().join(format!("{name}.svg")),
            format!(r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="16" cy="16" r="12" fill="{colour}"/></svg>"#),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{name}.txt")), caption).unwrap();
    }
    dir
}

/// `diffctl train full --train-text-encoder` on SVGs: a diffusers folder with both components
/// retrained (every tensor moved), the rest copied, that `generate --model` loads; refusing the
/// model's own folder and a file as the output.
#[test]
fn cli_trains_a_full_model_that_generate_loads() {
    let data = svg_data();
    let out = tempfile::tempdir().unwrap();
    let model = repo_path(MODEL);
    let train = |output: &Path| {
        diffctl(&[
            "train",
            "full",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.path().to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--resolution",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--caption-dropout",
            "0.5",
            "--train-text-encoder",
        ])
    };
    let trained = out.path().join("trained");
    let run = train(&trained);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for (component, file) in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")] {
        let before = load_fixture(&format!("{MODEL}/{component}/{file}"));
        let after = load_fixture(trained.join(component).join(file).to_str().unwrap());
        assert_eq!(before.len(), after.len(), "{component}: every tensor written");
        for (name, t) in &before {
            assert!(common::max_abs_diff(t, &after[name]) > 0.0, "{component} {name} did not move");
        }
    }
    for copied in
        ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json", "unet/config.json"]
    {
        assert_eq!(
            std::fs::read(model.join(copied)).unwrap(),
            std::fs::read(trained.join(copied)).unwrap(),
            "{copied} copied as it was"
        );
    }
    assert!(out.path().join("trained.state.safetensors").is_file(), "a checkpoint beside the folder");
    let png = out.path().join("a.png");
    let run = diffctl(&[
        "generate",
        "--model",
        trained.to_str().unwrap(),
        "--prompt",
        "red apple",
        "--steps",
        "2",
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let run = train(&model);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("the output folder is what is being trained"), "{err}");
    let file = out.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let run = train(&file);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("the output must be a folder"), "{err}");
}

/// `generate` without `--model` draws with the built-in emoji model, written once under the cache
/// folder: a 32x32 image.
#[test]
fn generate_without_a_model_uses_the_built_in_one() {
    let cache = tempfile::tempdir().unwrap();
    let png = cache.path().join("apple.png");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_diffctl"))
        .args(["generate", "--prompt", "red apple", "--steps", "4", "--seed", "1", "--output"])
        .arg(&png)
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (32, 32));
    let written: Vec<_> = std::fs::read_dir(cache.path().join("diffctl")).unwrap().collect();
    assert_eq!(written.len(), 1, "one model folder in the cache");
}
